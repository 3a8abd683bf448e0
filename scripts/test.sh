#!/usr/bin/env bash
# Runs every test of Ambit on a fresh Debian bookworm machine, as root:
# installs what the tests need (Debian packages; prometheus for promtool, which checks the
# agent's /metrics), then lints, builds and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh: the end-to-end tests create network namespaces: run as root" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
need_apt=0
for bin in go nft ip jq podman runc containerd protoc tcpdump openssl; do
  command -v "$bin" >/dev/null 2>&1 || need_apt=1
done
[ -d /usr/share/gocode/src/github.com/containernetworking/cni/libcni ] || need_apt=1
[ -x /usr/lib/cni/bridge ] || need_apt=1
[ -x /usr/bin/python3 ] || need_apt=1
command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1 || need_apt=1
if [ "$need_apt" = 1 ]; then
  apt-get update -q
  apt-get install -y -q \
    golang-go golang-github-appc-cni-dev containernetworking-plugins \
    iproute2 nftables iptables jq busybox-static iputils-ping util-linux \
    podman runc containerd protobuf-compiler tcpdump python3 python3-pip openssl
fi
# promtool checks the agent's /metrics (the exporter it recommends is not needed).
if ! command -v promtool >/dev/null 2>&1; then
  [ "$need_apt" = 1 ] || apt-get update -q
  need_apt=1
  apt-get install -y -q --no-install-recommends prometheus
fi
# The kernel TLS spike's check (bench/tests/smoke.rs) boots Debian's kernel in an emulated
# guest (bench/ktls-guest.sh, which downloads the kernel package: the lists must be fresh).
[ "$need_apt" = 1 ] || apt-get update -q
for bin in qemu-system-x86_64 depmod cpio; do
  if ! command -v "$bin" >/dev/null 2>&1; then
    apt-get install -y -q --no-install-recommends qemu-system-x86 kmod cpio
    break
  fi
done

# tests/tests/deploy.rs installs kubernetes-validate from PyPI under target/ (pip --target);
# Debian's python3 marks itself externally managed, which does not concern --target installs.
export PIP_BREAK_SYSTEM_PACKAGES=1

# A fresh clone gains nothing from incremental compilation; its caches were ~2.8 GB of the run's
# target dir.
export CARGO_INCREMENTAL=0

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --locked
# The end-to-end tests use the binaries just built instead of building ambit-cni, ambit-agent
# and ambit-install again with a smaller package selection's features, which compiled the shared
# dependencies (ring, rustls, kube, ...) a third time.
export AMBIT_BINS_BUILT=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --all-targets --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite (cargo prints one result line per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
