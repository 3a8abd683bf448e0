#!/usr/bin/env bash
# The same-node data-path benchmark, as root on a fresh Debian bookworm machine: installs what
# it needs, builds release binaries, and prints each figure through Ambit, direct, and their
# ratio (measured in the same run). Arguments go to ambit-bench (--seconds, --iterations,
# --connections, --json FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
require_root bench/run.sh
ensure_node_packages
export AMBIT_PROFILE=release
exec cargo run --release --locked -q -p ambit-bench -- "$@"
