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
# One cargo invocation for the bench and the binaries it runs (one feature resolution, so
# repeated runs rebuild nothing).
cargo build --release --locked -q -p ambit-bench -p ambit-cni -p ambit-agent -p ambit-install
export AMBIT_BINS_BUILT=1
exec "${CARGO_TARGET_DIR:-target}/release/ambit-bench" "$@"
