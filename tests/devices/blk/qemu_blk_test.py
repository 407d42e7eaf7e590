#!/usr/bin/env python3
"""QEMU (Debian's qemu-system-x86, TCG) boots the tiny guest with a vhost-user-blk-pci
disk served by vhostkit-blk over an image file.

The host fills the first MiB of the image with a known pattern; the guest checks the
disk's size, reads that MiB back (O_DIRECT) and prints its checksum, writes its own
pattern at 1 MiB with dd (conv=fsync: a FLUSH), syncs, reads it back with iflag=direct
and compares. Then it unbinds virtio_blk from the device and binds it again (the driver
resets the device: QEMU sends SET_STATUS(0), and GET_VRING_BASE, then sets the device up
from scratch) and reads its pattern back through the re-initialised device. Afterwards
the host checks the image file holds the guest's pattern.
Variants: --iommu (intel-iommu with device-iotlb; the device uses IOVAs and learns them
through IOTLB misses) and --queues N (the guest uses N queues, one per vCPU).
Installs what it needs (QEMU, the guest kernel) through scripts/guest/build-guest.sh.
"""
import argparse
import hashlib
import os
import re
import signal
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "support"))
from qemu_guest import Guest, console_args, device_args, machine_args  # noqa: E402

MIB = 1 << 20
IMAGE_BYTES = 64 * MIB
HOST_LINE = b"vhostkit host pattern 0123456789abcdefghijklmnopqrstuvwxyz\n"
GUEST_LINE = b"vhostkit-blk guest pattern\n"  # what `yes` prints, newline included

GUEST_SCRIPT = """#!/bin/sh
echo "GUEST-SIZE $(cat /sys/block/vda/size)"
echo "GUEST-RO $(cat /sys/block/vda/ro)"
echo "GUEST-MQ $(ls /sys/block/vda/mq | wc -l)"
echo "GUEST-MD5-A $(dd if=/dev/vda bs=4096 count=256 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
yes "vhostkit-blk guest pattern" | head -c 1048576 > /tmp/pat
dd if=/tmp/pat of=/dev/vda bs=4096 seek=256 conv=fsync 2>/dev/null || echo "GUEST-WRITE-FAILED"
sync
dd if=/dev/vda of=/tmp/back bs=4096 skip=256 count=256 iflag=direct 2>/dev/null || echo "GUEST-DIRECT-READ-FAILED"
if cmp /tmp/pat /tmp/back >/dev/null; then echo "GUEST-READBACK-OK"; else echo "GUEST-READBACK-BAD"; fi
echo "GUEST-MD5-B $(md5sum < /tmp/pat | cut -d' ' -f1)"
dev=$(basename "$(readlink /sys/block/vda/device)")
echo "$dev" > /sys/bus/virtio/drivers/virtio_blk/unbind || echo "GUEST-UNBIND-FAILED"
[ -e /sys/block/vda ] && echo "GUEST-UNBIND-KEPT-VDA"
echo "$dev" > /sys/bus/virtio/drivers/virtio_blk/bind || echo "GUEST-BIND-FAILED"
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 1; done
dd if=/dev/vda of=/tmp/again bs=4096 skip=256 count=256 iflag=direct 2>/dev/null || echo "GUEST-REBIND-READ-FAILED"
if cmp /tmp/pat /tmp/again >/dev/null; then echo "GUEST-REBIND-OK"; else echo "GUEST-REBIND-BAD"; fi
"""


def pattern(line, n):
    return (line * (n // len(line) + 1))[:n]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemon", required=True)
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--iommu", action="store_true")
    ap.add_argument("--queues", type=int, default=1)
    args = ap.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    guest = Guest(args.source_dir, args.work_dir, GUEST_SCRIPT)

    image = os.path.join(args.work_dir, "disk.img")
    host_a = pattern(HOST_LINE, MIB)
    with open(image, "wb") as f:
        f.write(host_a)
        f.truncate(IMAGE_BYTES)
    sock = os.path.join(args.work_dir, "blk.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    backend_log = open(os.path.join(args.work_dir, "backend.log"), "w+")
    backend = subprocess.Popen([args.daemon, "--socket-path", sock, "--blk-file", image,
                                "--queues", str(args.queues), "--log-level", "debug"],
                               stderr=backend_log, stdout=subprocess.DEVNULL)
    deadline = time.time() + 10
    while not os.path.exists(sock):
        if time.time() > deadline or backend.poll() is not None:
            backend_log.seek(0)
            print("backend did not start:", backend_log.read())
            return 1
        time.sleep(0.05)

    qemu_cmd = machine_args("256M", smp=max(1, args.queues)) + console_args() + [
        "-chardev", f"socket,id=vu,path={sock}"]
    dev = f"vhost-user-blk-pci,chardev=vu,vectors=0,num-queues={args.queues},disable-legacy=on"
    # With the vIOMMU the device sits behind a PCI Express root port (qemu_guest.py says why).
    qemu_cmd += device_args(dev, args.iommu)
    qemu_cmd += guest.boot_args(args.iommu)
    guest_out = ""
    for attempt in range(2):
        try:
            qemu = subprocess.run(qemu_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=300)
            guest_out = qemu.stdout.decode(errors="replace")
        except subprocess.TimeoutExpired as e:
            guest_out = (e.stdout or b"").decode(errors="replace")
            print("QEMU timed out")
        # On a shared machine another job's clean-up may signal every QEMU: boot again
        # once if that happened before the guest ran its script.
        if "terminating on signal" in guest_out and "VHOSTKIT-GUEST-UP" not in guest_out:
            print("QEMU was killed from outside before the guest came up; booting again")
            continue
        break
    t0 = time.time()
    backend.send_signal(signal.SIGTERM)
    try:
        backend.wait(timeout=10)
    except subprocess.TimeoutExpired:
        backend.kill()
        backend.wait()
        print("FAIL: the back-end did not exit on SIGTERM")
        return 1
    stop_s = time.time() - t0
    backend_log.seek(0)
    log = backend_log.read()

    print("---- guest ----"); print(guest_out[-3000:])
    print("---- back-end (tail) ----"); print(log[-3000:])
    failures = []

    def guest(key):
        m = re.search(key + r" (\S+)", guest_out)
        return m.group(1) if m else None

    if "VHOSTKIT-TEST-EXIT" not in guest_out:
        failures.append("the guest did not finish its script")
    if guest("GUEST-SIZE") != str(IMAGE_BYTES // 512):
        failures.append(f"guest sees {guest('GUEST-SIZE')} sectors, not {IMAGE_BYTES // 512}")
    if guest("GUEST-RO") != "0":
        failures.append("guest sees a read-only disk")
    if guest("GUEST-MQ") != str(args.queues):
        failures.append(f"guest uses {guest('GUEST-MQ')} queues, not {args.queues}")
    if guest("GUEST-MD5-A") != hashlib.md5(host_a).hexdigest():
        failures.append("the guest read back something other than the host's pattern")
    for bad in ("GUEST-WRITE-FAILED", "GUEST-DIRECT-READ-FAILED", "GUEST-READBACK-BAD",
                "GUEST-UNBIND-FAILED", "GUEST-UNBIND-KEPT-VDA", "GUEST-BIND-FAILED",
                "GUEST-REBIND-READ-FAILED", "GUEST-REBIND-BAD"):
        if bad in guest_out:
            failures.append(bad)
    if "GUEST-READBACK-OK" not in guest_out:
        failures.append("the guest's read-back did not match what it wrote")
    if "GUEST-REBIND-OK" not in guest_out:
        failures.append("the device did not work again after the driver was rebound")
    if ": device reset" not in log:
        failures.append("the driver's unbind did not reset the device (no SET_STATUS(0))")
    guest_b = pattern(GUEST_LINE, MIB)
    if guest("GUEST-MD5-B") != hashlib.md5(guest_b).hexdigest():
        failures.append("the guest's pattern is not what the host expects")
    with open(image, "rb") as f:
        f.seek(MIB)
        on_disk = f.read(MIB)
    if on_disk != guest_b:
        failures.append("the image file does not hold the guest's pattern at 1 MiB")
    if os.path.getsize(image) != IMAGE_BYTES:
        failures.append("the image file changed size")
    if ": GET_CONFIG (" not in log:
        failures.append("QEMU never read the config space")
    if args.iommu:
        if ": IOTLB_MSG (" not in log:
            failures.append("no IOTLB update reached the back-end")
        if "IOTLB miss at" not in log:
            failures.append("the back-end sent no IOTLB miss")
    if " failed: " in log:
        failures.append("the back-end refused a request from QEMU")
    stats = re.search(r"reads=(\d+) writes=(\d+) flushes=(\d+) errors=(\d+)", log)
    if not stats:
        failures.append("no exit statistics from the back-end")
    else:
        reads, writes, flushes, errors = map(int, stats.groups())
        print(f"back-end: {reads} reads, {writes} writes, {flushes} flushes, {errors} errors")
        if writes == 0 or reads == 0 or flushes == 0:
            failures.append("the back-end saw no reads, writes or flushes")
        if errors:
            failures.append("requests completed with IOERR")
    if backend.returncode != 0:
        failures.append(f"the back-end exited with {backend.returncode}")
    if stop_s > 1.0:
        failures.append(f"the back-end took {stop_s:.2f} s to exit on SIGTERM")
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print(f"PASS: the guest wrote and read back its pattern through vhostkit-blk "
          f"(queues={args.queues}, iommu={args.iommu}); the image holds it")
    os.unlink(image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
