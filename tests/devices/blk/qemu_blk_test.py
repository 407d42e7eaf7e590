#!/usr/bin/env python3
"""QEMU (Debian's qemu-system-x86, TCG) boots the tiny guest with a vhost-user-blk-pci
disk served by vhostkit-blk over an image file.

The host fills the first MiB of the image with a known pattern; the guest checks the
disk's size, reads that MiB back (O_DIRECT) and prints its checksum, writes its own
pattern at 1 MiB with dd (conv=fsync: a FLUSH), syncs, reads it back with iflag=direct
and compares. The guest also prints what it sees of the back-end's options (serial, block
sizes, write cache, queues), and the host checks them against the options it gave. Then it
unbinds virtio_blk from the device and binds it again (the driver resets the device: QEMU
sends SET_STATUS(0), and GET_VRING_BASE, then sets the device up from scratch) and reads
its pattern back through the re-initialised device. Afterwards the host checks the image
file holds the guest's pattern.
Variants: --iommu (intel-iommu with device-iotlb; the device uses IOVAs and learns them
through IOTLB misses), --queues N (the guest uses N queues, one per vCPU),
--backend-args (more vhostkit-blk options) and --features (in the same boot: the guest
discards a MiB with blkdiscard and the host finds a hole there, switches the write cache
to write through and back through /sys/block/vdX/cache_type, and a second, read-only
vhostkit-blk disk refuses the guest's write while its image stays unchanged).
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

RO_SERIAL = "vhostkit-ro-disk"
DISCARD_AT = 8 * MIB  # the guest discards [8 MiB, 9 MiB) with --features
GUEST_SCRIPT = """#!/bin/sh
# The writable disk is the one whose serial is not the read-only disk's.
rw=vda; ro=
for d in /sys/block/vd*; do
  n=${d##*/}
  if [ "$(cat $d/serial)" = "%(ro_serial)s" ]; then ro=$n; else rw=$n; fi
done
q=/sys/block/$rw/queue
echo "GUEST-SIZE $(cat /sys/block/$rw/size)"
echo "GUEST-RO $(cat /sys/block/$rw/ro)"
echo "GUEST-MQ $(ls /sys/block/$rw/mq | wc -l)"
echo "GUEST-SERIAL $(cat /sys/block/$rw/serial)"
echo "GUEST-LBS $(cat $q/logical_block_size)"
echo "GUEST-PBS $(cat $q/physical_block_size)"
echo "GUEST-WCACHE $(cat $q/write_cache | tr ' ' _)"
echo "GUEST-MD5-A $(dd if=/dev/$rw bs=4096 count=256 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
yes "vhostkit-blk guest pattern" | head -c 1048576 > /tmp/pat
dd if=/tmp/pat of=/dev/$rw bs=4096 seek=256 conv=fsync 2>/dev/null || echo "GUEST-WRITE-FAILED"
sync
dd if=/dev/$rw of=/tmp/back bs=4096 skip=256 count=256 iflag=direct 2>/dev/null || echo "GUEST-DIRECT-READ-FAILED"
if cmp /tmp/pat /tmp/back >/dev/null; then echo "GUEST-READBACK-OK"; else echo "GUEST-READBACK-BAD"; fi
echo "GUEST-MD5-B $(md5sum < /tmp/pat | cut -d' ' -f1)"
if [ -e /tmp/features ]; then
  echo "GUEST-DISCARD-MAX $(cat $q/discard_max_bytes)"
  if blkdiscard -o %(discard_at)d -l 1048576 /dev/$rw; then echo GUEST-DISCARD-OK; else echo GUEST-DISCARD-FAILED; fi
  echo "write through" > /sys/block/$rw/cache_type
  echo "GUEST-WCACHE-SET $(cat $q/write_cache | tr ' ' _)"
  dd if=/tmp/pat of=/dev/$rw bs=4096 seek=512 count=16 oflag=direct 2>/dev/null || echo "GUEST-WT-WRITE-FAILED"
  echo "write back" > /sys/block/$rw/cache_type
  echo "GUEST-WCACHE-BACK $(cat $q/write_cache | tr ' ' _)"
  echo "GUEST-RO2 $(cat /sys/block/$ro/ro)"
  echo "GUEST-RO2-MD5 $(dd if=/dev/$ro bs=4096 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
  if dd if=/tmp/pat of=/dev/$ro bs=4096 count=1 oflag=direct 2>/tmp/ro-err; then
    echo GUEST-RO2-WRITE-ACCEPTED
  else
    echo "GUEST-RO2-WRITE-REFUSED $(tr ' ' _ < /tmp/ro-err | head -n1)"
  fi
fi
# Unbind and bind the driver again (a device reset), then read the pattern back through
# the re-initialised device, found again by its serial.
serial=$(cat /sys/block/$rw/serial)
dev=$(basename "$(readlink /sys/block/$rw/device)")
echo "$dev" > /sys/bus/virtio/drivers/virtio_blk/unbind || echo "GUEST-UNBIND-FAILED"
[ -e /sys/block/$rw ] && echo "GUEST-UNBIND-KEPT-VDA"
echo "$dev" > /sys/bus/virtio/drivers/virtio_blk/bind || echo "GUEST-BIND-FAILED"
again=
for i in 1 2 3 4 5 6 7 8 9 10; do
  for d in /sys/block/vd*; do
    [ "$(cat $d/serial 2>/dev/null)" = "$serial" ] && again=${d##*/}
  done
  [ -n "$again" ] && [ -b /dev/$again ] && break
  sleep 1
done
dd if=/dev/$again of=/tmp/again bs=4096 skip=256 count=256 iflag=direct 2>/dev/null || echo "GUEST-REBIND-READ-FAILED"
if cmp /tmp/pat /tmp/again >/dev/null; then echo "GUEST-REBIND-OK"; else echo "GUEST-REBIND-BAD"; fi
""" % {"ro_serial": RO_SERIAL, "discard_at": DISCARD_AT}
# The --features boot: the guest finds this file and runs the feature part of its script.
FEATURES_SCRIPT = GUEST_SCRIPT.replace("#!/bin/sh\n", "#!/bin/sh\ntouch /tmp/features\n", 1)


def pattern(line, n):
    return (line * (n // len(line) + 1))[:n]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemon", required=True)
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--iommu", action="store_true")
    ap.add_argument("--queues", type=int, default=1, help="the guest's queues (QEMU num-queues)")
    ap.add_argument("--backend-args", default="", help="more vhostkit-blk options")
    ap.add_argument("--features", action="store_true",
                    help="also discard, switch the write cache, and add a read-only disk")
    args = ap.parse_args()
    extra = args.backend_args.split()

    def option(name, default):
        return extra[extra.index(name) + 1] if name in extra else default

    lbs = int(option("--logical-block-size", "512"))
    pbs = int(option("--physical-block-size", str(lbs)))
    serial = option("--serial", "disk.img")
    cache = option("--cache", "writeback")
    os.makedirs(args.work_dir, exist_ok=True)
    guest = Guest(args.source_dir, args.work_dir,
                  FEATURES_SCRIPT if args.features else GUEST_SCRIPT)

    image = os.path.join(args.work_dir, "disk.img")
    host_a = pattern(HOST_LINE, MIB)
    with open(image, "wb") as f:
        f.write(host_a)
        f.seek(DISCARD_AT)
        f.write(pattern(HOST_LINE, MIB))
        f.truncate(IMAGE_BYTES)
    ro_image = os.path.join(args.work_dir, "ro.img")
    ro_data = pattern(b"vhostkit read-only disk\n", 16 * MIB)
    backends = []  # (process, log file, what)

    def start(what, sock, argv):
        if os.path.exists(sock):
            os.unlink(sock)
        log_file = open(os.path.join(args.work_dir, what + ".log"), "w+")
        p = subprocess.Popen([args.daemon, "--socket-path", sock, "--log-level", "debug"] + argv,
                             stderr=log_file, stdout=subprocess.DEVNULL)
        backends.append((p, log_file, what))
        deadline = time.time() + 10
        while not os.path.exists(sock):
            if time.time() > deadline or p.poll() is not None:
                log_file.seek(0)
                print(what, "did not start:", log_file.read())
                return False
            time.sleep(0.05)
        return True

    def stop_all():
        for p, _, _ in backends:
            if p.poll() is None:
                p.kill()
                p.wait()

    sock = os.path.join(args.work_dir, "blk.sock")
    if not start("backend", sock, ["--blk-file", image] + extra):
        stop_all()
        return 1
    qemu_cmd = machine_args("256M", smp=max(1, args.queues)) + console_args() + [
        "-chardev", f"socket,id=vu,path={sock}"]
    dev = f"vhost-user-blk-pci,chardev=vu,vectors=0,num-queues={args.queues},disable-legacy=on"
    # With the vIOMMU the device sits behind a PCI Express root port (qemu_guest.py says why).
    qemu_cmd += device_args(dev, args.iommu)
    if args.features:
        with open(ro_image, "wb") as f:
            f.write(ro_data)
        ro_sock = os.path.join(args.work_dir, "ro.sock")
        if not start("backend-ro", ro_sock, ["--blk-file", ro_image, "--read-only",
                                             "--serial", RO_SERIAL, "--num-queues", "1"]):
            stop_all()
            return 1
        qemu_cmd += ["-chardev", f"socket,id=vro,path={ro_sock}", "-device",
                     "vhost-user-blk-pci,chardev=vro,vectors=0,num-queues=1,disable-legacy=on"]
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
    failures = []
    logs = {}
    for backend, backend_log, what in backends:
        t0 = time.time()
        backend.send_signal(signal.SIGTERM)
        try:
            backend.wait(timeout=10)
        except subprocess.TimeoutExpired:
            backend.kill()
            backend.wait()
            failures.append(f"{what} did not exit on SIGTERM")
        if time.time() - t0 > 1.0:
            failures.append(f"{what} took {time.time() - t0:.2f} s to exit on SIGTERM")
        if backend.returncode != 0:
            failures.append(f"{what} exited with {backend.returncode}")
        backend_log.seek(0)
        logs[what] = backend_log.read()
    log = logs["backend"]

    print("---- guest ----"); print(guest_out[-3500:])
    print("---- back-end (tail) ----"); print(log[-3000:])

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
    if guest("GUEST-SERIAL") != serial[:20]:
        failures.append(f"guest sees serial {guest('GUEST-SERIAL')}, not {serial[:20]}")
    if guest("GUEST-LBS") != str(lbs) or guest("GUEST-PBS") != str(pbs):
        failures.append(f"guest sees blocks {guest('GUEST-LBS')}/{guest('GUEST-PBS')}, "
                        f"not {lbs}/{pbs}")
    want_cache = "write_back" if cache == "writeback" else "write_through"
    if guest("GUEST-WCACHE") != want_cache:
        failures.append(f"guest sees write cache {guest('GUEST-WCACHE')}, not {want_cache}")
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
    if args.features:
        if "GUEST-DISCARD-OK" not in guest_out or guest("GUEST-DISCARD-MAX") in (None, "0"):
            failures.append("blkdiscard failed in the guest (or the disk offers no discard)")
        with open(image, "rb") as f:
            hole = os.lseek(f.fileno(), DISCARD_AT, os.SEEK_HOLE)
            f.seek(DISCARD_AT)
            discarded = f.read(MIB)
        if hole != DISCARD_AT or discarded != bytes(MIB):
            failures.append(f"no hole of zeros at {DISCARD_AT} after the guest's discard "
                            f"(next hole at {hole})")
        if guest("GUEST-WCACHE-SET") != "write_through" or "GUEST-WT-WRITE-FAILED" in guest_out:
            failures.append(f"switching to write through: {guest('GUEST-WCACHE-SET')}")
        if guest("GUEST-WCACHE-BACK") != "write_back":
            failures.append(f"switching back to write back: {guest('GUEST-WCACHE-BACK')}")
        if ("the driver set the cache to writethrough" not in log or
                "the driver set the cache to writeback" not in log):
            failures.append("the back-end did not see the guest switch its cache")
        syncs = re.search(r"durable_syncs=(\d+)", log)
        if not syncs or int(syncs.group(1)) == 0:
            failures.append("no write was made durable while the cache was write through")
        ro_log = logs.get("backend-ro", "")
        if guest("GUEST-RO2") != "1":
            failures.append(f"the read-only disk shows ro={guest('GUEST-RO2')}")
        if guest("GUEST-RO2-MD5") != hashlib.md5(ro_data[:16 * 4096]).hexdigest():
            failures.append("the guest read something else from the read-only disk")
        if "GUEST-RO2-WRITE-REFUSED" not in guest_out:
            failures.append("the guest wrote to the read-only disk")
        with open(ro_image, "rb") as f:
            if f.read() != ro_data:
                failures.append("the read-only image changed")
        if "read-only" not in ro_log:
            failures.append("the read-only back-end did not say it is read-only")
    if cache == "writethrough":
        syncs = re.search(r"durable_syncs=(\d+)", log)
        if not syncs or int(syncs.group(1)) == 0:
            failures.append("--cache writethrough made no write durable before completing it")
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
        if writes == 0 or reads == 0:
            failures.append("the back-end saw no reads or writes")
        # A write-through disk needs no flush; Linux sends none.
        if cache == "writeback" and flushes == 0:
            failures.append("the back-end saw no flush (dd conv=fsync on a write-back disk)")
        if errors:
            failures.append("requests completed with IOERR")
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print(f"PASS: the guest wrote and read back its pattern through vhostkit-blk "
          f"(queues={args.queues}, iommu={args.iommu}, options '{args.backend_args}', "
          f"features={args.features}); the image holds it")
    os.unlink(image)
    if os.path.exists(ro_image):
        os.unlink(ro_image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
