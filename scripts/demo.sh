#!/usr/bin/env bash
# Ambit's demo on a fresh Debian bookworm machine, as root: installs what it needs, builds,
# then runs one node with three pods (productpage, reviews, ratings) and shows HBONE, the wire,
# a policy and the metrics. Everything it creates is removed on exit or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
require_root scripts/demo.sh
ensure_node_packages
export AMBIT_PROFILE=release
echo "building (release)..."
cargo build --release --locked -q -p ambit-demo -p ambit-cni -p ambit-agent -p ambit-install
demo_pid=""
cleanup() {
  [ -n "$demo_pid" ] || return 0
  kill -INT "$demo_pid" 2>/dev/null || true
  wait "$demo_pid" 2>/dev/null || true
  # Names the demo's harness gave: <prefix><pid % 100000>x<n>.
  tag="$((demo_pid % 100000))x"
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^(amn|ap)${tag}" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf /tmp/ambit-test-*"${tag}"* 2>/dev/null || true
  # The agent's cgroup (the harness gives it one of its own, as a DaemonSet container has).
  cg=$(awk '$3 == "cgroup2" {print $2; exit}' /proc/mounts)
  for d in "$cg"/ambit-test-*"${tag}"*; do
    [ -d "$d" ] || continue
    echo 1 > "$d/cgroup.kill" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do rmdir "$d" 2>/dev/null && break; sleep 0.2; done
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM
./target/release/ambit-demo &
demo_pid=$!
wait "$demo_pid"
status=$?
demo_pid=""
exit "$status"
