# Shared by the repository's scripts (sourced, not run).

# Fails unless root: everything here creates network namespaces.
require_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "$1: creates network namespaces: run as root" >&2
    exit 1
  fi
}

# Installs the Debian packages the node fixtures need (libcni, the reference CNI plugins,
# nftables, iproute2, tcpdump, Go for the libcni client) when any is missing.
ensure_node_packages() {
  local need=0 bin
  for bin in go nft ip tcpdump; do command -v "$bin" >/dev/null 2>&1 || need=1; done
  [ -d /usr/share/gocode/src/github.com/containernetworking/cni/libcni ] || need=1
  [ -x /usr/lib/cni/bridge ] || need=1
  if [ "$need" = 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q golang-go golang-github-appc-cni-dev containernetworking-plugins \
      iproute2 nftables tcpdump
  fi
}
