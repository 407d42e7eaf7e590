#!/usr/bin/env bash
# Builds the tiny Linux guest the QEMU tests boot:
#   <out>/vmlinuz          Debian's cloud kernel (linux-image-cloud-amd64), unpacked from its .deb
#   <out>/initramfs.cpio   busybox-static + the virtio modules (net, blk, rng) + /init
# A test adds its own /test.sh by appending a second cpio archive (the kernel unpacks
# concatenated archives), see scripts/guest/add-test.sh.
# Usage: scripts/guest/build-guest.sh [out-dir]   (default build/guest; cached)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../build/guest}
mkdir -p "$out"
out=$(cd "$out" && pwd)
# The virtio modules, in dependency order. The cache is reused only if it was built with
# this list (a guest from before a module was added is rebuilt).
order=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover
  net_failover virtio_net virtio_blk rng-core virtio-rng)
if [[ -s $out/vmlinuz && -s $out/initramfs.cpio && -f $out/modules.list ]] &&
  [[ $(cat "$out/modules.list") == "${order[*]}" ]]; then
  echo "guest: cached in $out"
  exit 0
fi
rm -f "$out/modules.list"

need=(busybox-static cpio qemu-system-x86 qemu-utils)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# The metapackage depends on the versioned image package; fetch that one.
kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [[ -z $kpkg ]]; then
  apt-get update -qq
  kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
echo "guest: kernel package $kpkg"
apt-get download -qq "$kpkg"
dpkg-deb -x ./*.deb kernel
kver=$(ls kernel/lib/modules | head -n1)
cp kernel/boot/vmlinuz-"$kver" "$out/vmlinuz"

root=$work/root
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,mnt,modules,etc}
cp /bin/busybox "$root/bin/busybox"
for app in $("$root/bin/busybox" --list); do
  [[ -e $root/bin/$app ]] || ln -s busybox "$root/bin/$app"
done
: > "$root/modules/order"
for m in "${order[@]}"; do
  f=$(find kernel/lib/modules/"$kver" -name "$m.ko*" | head -n1)
  if [[ -z $f ]]; then
    echo "guest: module $m is built in or missing" >&2
    continue
  fi
  case $f in
    *.xz) xz -dc "$f" > "$root/modules/$m.ko" ;;
    *.zst) zstd -qdc "$f" > "$root/modules/$m.ko" ;;
    *) cp "$f" "$root/modules/$m.ko" ;;
  esac
  echo "$m" >> "$root/modules/order"
done

cat > "$root/init" <<'INIT'
#!/bin/sh
# vhostkit test guest: mount, load virtio, run /test.sh, power off.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read m; do insmod /modules/$m.ko 2>/dev/null || echo "init: insmod $m failed"; done < /modules/order
echo "VHOSTKIT-GUEST-UP"
if [ -x /test.sh ]; then
  /test.sh
  echo "VHOSTKIT-TEST-EXIT $?"
else
  echo "VHOSTKIT-NO-TEST"
fi
sync
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) > "$out/initramfs.cpio"
echo "${order[*]}" > "$out/modules.list"
echo "guest: kernel $kver, initramfs $(stat -c %s "$out/initramfs.cpio") bytes in $out"
