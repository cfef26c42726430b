#!/usr/bin/env bash
# Runs kopa in the bench's peer slot (`python -m bench --kube-mgmt scripts/kopa-as-peer.sh`), with the
# flags the bench gives kube-mgmt: an A/A run, kopa against itself, shows how far two identical sidecars
# land apart in one run (the harness's own noise); with KOPA_PEER_TREE naming another checkout (a
# `git worktree` of an older commit), an A/B run compares two versions of kopa on one stack in one run.
#
# Env:   KOPA_PEER_TREE   the checkout whose app/ runs (default: this one)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tree=${KOPA_PEER_TREE:-$here}
# The bench byte-compiles this checkout's app/ before it runs; another checkout's is compiled here, once.
[ "$tree" = "$here" ] || "$here/.venv/bin/python" -m compileall -q "$tree/app" >/dev/null
cd "$tree"
exec env PYTHONPATH="$tree" "$here/.venv/bin/python" -P -m app "$@"
