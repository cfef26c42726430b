package system.health

# Written by the kopa chart. OPA's /health/ready evaluates data.system.health.ready: OPA is ready only once
# kopa has loaded everything (kopa writes data.system.kopa.ready after its first full load, and again after
# it refills an OPA that restarted empty). /health/live evaluates live.

default live := true

default ready := false

ready if data.system.kopa.ready == true
