"""Helpers of the fault-injection suite (tests/integration/test_faults.py, test_bad_input.py).

- `proxy`: a loopback TLS proxy in front of OPA that injects latency, HTTP 500s and connection resets.
- `workload`: a seeded stream of ConfigMap changes, run in a thread while faults are injected.
- `state`: OPA's state read over its REST API, the cluster's from a fresh list, and their differences.
- `report`: the figures the suite gathers, written to docs/reliability.md at the end of a full run.
"""
