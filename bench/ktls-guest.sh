#!/usr/bin/env bash
# Runs the kernel TLS spike (`ambit-bench --ktls-spike`) in a guest booted from Debian's
# kernel, for machines whose own kernel is built without CONFIG_TLS (ARCHITECTURE.md,
# "Kernel-side levers"). Run as root from the repository, after a build of ambit-bench:
#
#   bash bench/ktls-guest.sh [--seconds 5 --repeat 5 ...]
#
# AMBIT_GUEST_ACCEL=kvm (the default) runs the guest on the host's CPU model (AES-NI, VAES)
# under KVM: the figures mean something. AMBIT_GUEST_ACCEL=tcg emulates the CPU: a functional
# check only (the kernel's records open in rustls and rustls's in the kernel; the bench's smoke
# test runs it), its figures say nothing about speed. On the VMs this project runs on,
# /dev/kvm exists but a guest kernel stops in KVM's instruction emulator early in boot (nested
# without EPT), so figures need a host that can run a KVM guest or has CONFIG_TLS itself.
#
# Installs qemu-system-x86, kmod, cpio and busybox-static if missing, downloads the newest
# 6.12 cloud kernel package from Debian's archive (not installed: unpacked into a scratch
# dir), and boots it with an initramfs holding busybox, `ip`, the bench binary
# (AMBIT_BENCH, default target/release/ambit-bench) and the kernel modules the spike loads
# (tls, veth, the AES-GCM ones). The guest has two vCPUs; it runs the spike, prints its
# table and powers off. The arguments are passed to the spike; the table is also written to
# ktls-guest.md and every run to ktls-guest.json in the current directory.
set -euo pipefail

bench=${AMBIT_BENCH:-target/release/ambit-bench}
if [[ ! -x $bench ]]; then
  echo "no $bench: build it first (cargo build --release -p ambit-bench)" >&2
  exit 1
fi
accel=${AMBIT_GUEST_ACCEL:-kvm}
if [[ $accel == kvm && ! -c /dev/kvm ]]; then
  echo "no /dev/kvm (AMBIT_GUEST_ACCEL=tcg emulates the CPU)" >&2
  exit 1
fi
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v depmod >/dev/null || need+=(kmod)
command -v busybox >/dev/null || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
if ((${#need[@]})); then
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

work=$(mktemp -d /tmp/ambit-ktls-guest.XXXXXX)
trap 'rm -rf "$work"' EXIT
out=$PWD/ktls-guest

pkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$' \
  | cut -d' ' -f1 | sort -V | tail -1)
[[ -n $pkg ]] || { echo "no linux-image-6.12 cloud package in the apt sources" >&2; exit 1; }
echo "kernel: $pkg" >&2
(cd "$work" && apt-get download "$pkg" >/dev/null 2>&1 && dpkg-deb -x ./*.deb kernel)
ver=$(ls "$work/kernel/lib/modules")
depmod -b "$work/kernel" "$ver"

root=$work/initramfs
mkdir -p "$root"/{bin,lib64,modules,proc,sys,dev,run,tmp,var}
ln -s /run "$root/var/run"
cp "$(command -v busybox)" "$root/bin/busybox"
# The bench and `ip` with the shared libraries they load, at the same paths.
for bin in "$bench" "$(command -v ip)"; do
  cp "$bin" "$root/bin/"
  ldd "$bin" | grep -o '/[^ ]*' | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
done
strip "$root/bin/$(basename "$bench")" 2>/dev/null || true
# The modules, decompressed, in load order (dependencies first, each once).
i=0
for m in veth tls aesni_intel gcm ghash_clmulni_intel seqiv; do
  modprobe -d "$work/kernel" -S "$ver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
  i=$((i + 1))
  xz -dc "$ko" > "$root/modules/$(printf %02d $i)-$(basename "${ko%.xz}")"
done

cat > "$root/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
for m in /modules/*.ko; do insmod "\$m" || echo "insmod \$m failed"; done
ip link set lo up
echo "=== ktls spike begins"
$(basename "$bench") --ktls-spike --markdown /tmp/out.md --json /tmp/out.json $* 2>&1
echo "=== ktls spike exit \$?"
echo "=== table"
cat /tmp/out.md
echo "=== json"
cat /tmp/out.json
echo
echo "=== end"
poweroff -f
EOF
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initrd.gz"

case $accel in
  kvm) cpu=(-enable-kvm -cpu host) ;;
  tcg) cpu=(-accel tcg -cpu max) ;;
  *) echo "AMBIT_GUEST_ACCEL is kvm or tcg" >&2; exit 1 ;;
esac
qemu-system-x86_64 "${cpu[@]}" -smp 2 -m 4096 -nographic -no-reboot \
  -kernel "$work/kernel/boot/vmlinuz-$ver" -initrd "$work/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1" > "$work/console.log" 2>&1 &
qemu=$!
# Bounded (30 min). A KVM internal error pauses the guest instead of ending qemu: stop there.
for ((i = 0; i < 3600; i++)); do
  kill -0 "$qemu" 2>/dev/null || break
  if grep -q 'KVM internal error' "$work/console.log"; then
    kill "$qemu"
    echo "the guest stopped in KVM's instruction emulator (a nested hypervisor without" \
      "EPT?); AMBIT_GUEST_ACCEL=tcg runs it emulated, for a functional check" >&2
    exit 1
  fi
  sleep 0.5
done
kill "$qemu" 2>/dev/null || true
wait "$qemu" 2>/dev/null || true
sed -n '/=== ktls spike begins/,$p' "$work/console.log"
if ! grep -q '=== ktls spike exit 0' "$work/console.log"; then
  # Without the spike's own lines the guest never got that far: its console says why.
  grep -q '=== ktls spike begins' "$work/console.log" ||
    { echo "the guest's console, last lines:"; tail -n 40 "$work/console.log"; } >&2
  echo "the spike failed in the guest" >&2
  exit 1
fi
sed -n '/=== table/,/=== json/p' "$work/console.log" | sed '1d;$d' | tr -d '\r' > "$out.md"
sed -n '/=== json/,/=== end/p' "$work/console.log" | sed '1d;$d' | tr -d '\r' > "$out.json"
echo "table written to $out.md, every run to $out.json" >&2
