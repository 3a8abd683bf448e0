#!/usr/bin/env bash
# The same-node data-path benchmark, as root on a fresh Debian bookworm machine: installs what
# it needs, builds release binaries, and prints each figure through Ambit, direct, and their
# ratio (measured in the same run). Arguments go to ambit-bench (--seconds, --iterations,
# --connections, --json FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "bench/run.sh: creates network namespaces: run as root" >&2
  exit 1
fi
need_apt=0
for bin in go nft ip; do command -v "$bin" >/dev/null 2>&1 || need_apt=1; done
[ -d /usr/share/gocode/src/github.com/containernetworking/cni/libcni ] || need_apt=1
[ -x /usr/lib/cni/bridge ] || need_apt=1
if [ "$need_apt" = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q golang-go golang-github-appc-cni-dev containernetworking-plugins iproute2 nftables
fi
export AMBIT_PROFILE=release
exec cargo run --release --locked -q -p ambit-bench -- "$@"
