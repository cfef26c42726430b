"""kopa's benchmarks: `make bench` (or `python -m bench`) runs them against the local real stack.

See docs/benchmarks.md for what is measured, how, and the latest figures.
"""
