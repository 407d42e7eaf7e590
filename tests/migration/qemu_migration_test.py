#!/usr/bin/env python3
"""Live migration of a real QEMU guest whose device back-end is a vhostkit process.

Each run starts two QEMU 7.2 (TCG, q35, qboot) processes with the tiny test guest
(scripts/guest) and one vhost-user device, each served by its own back-end process.
The back-end writes guest memory the whole time:

- --device net (default): a virtio-net device whose source back-end (sink_backend
  --source --marker, or vhostkit-net --mode source) fills the guest's receive buffers with
  marked frames; the guest only brings its interface up (the kernel reposts receive
  buffers as it receives).
- --device blk: a virtio-blk device served by vhostkit-blk; both back-ends open the same
  image file (shared storage), every 512-byte sector of which starts with the marker
  "VHOSTKIT-BLKSECT" and its sector number; the guest reads the disk in a loop with
  `dd iflag=direct` (O_DIRECT: the device writes the data straight into the reader's
  buffer, no guest CPU copies it).

The source migrates over TCP on 127.0.0.1 to a destination started with -incoming ... -S;
when the source reports "completed" and the destination has left "inmigrate", both save
guest RAM with pmemsave and the two images are compared page by page. A differing page is
a "lost device write" when the source's page holds a back-end marker (a frame or a disk
sector) that the destination's page does not hold identically, else "other".

Every run must end with no differing page. With --mutation N the source back-end runs
with VHOSTKIT_FAULT_DROP_LOG_ONE_IN=N (it drops every N-th dirty-log write) and the test
instead requires every run to find lost device writes: the comparison can fail.

Guest RAM is 512 MiB + 8 KiB on purpose: QEMU 7.2's TCG loses guest-CPU writes during
migration when RAM is a multiple of 256 KiB (docs/migration-qemu.md).
"""
import argparse
import mmap
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support"))
from qemu_guest import Guest, Qmp, console_args, device_args, machine_args, read_text, wait_for  # noqa: E402

PAGE = 4096
RAM_KIB = 512 * 1024 + 8  # default --ram-kib: not a multiple of 256 KiB (module docstring)
MARKER = b"VHOSTKIT-MIGRATE"  # sink_backend --marker: marker, le64 sequence number
NET_MARKER = b"\x88\xb5VHOSTKIT"  # vhostkit-net --mode source: ethertype, marker, le32 queue, le64 seq
SECTOR = 512
SECTOR_MARKER = b"VHOSTKIT-BLKSECT"  # --device blk: starts every sector, then its le64 number

# Both guest scripts print the device's virtio feature bits (bit 33: ACCESS_PLATFORM, the
# device uses the vIOMMU) and then "GUEST-RX <count>" every 0.2 s.
NET_GUEST_SCRIPT = """#!/bin/sh
echo "GUEST-FEATURES $(cat /sys/bus/virtio/devices/virtio0/features)"
ip link set eth0 up
echo "GUEST-LINK-UP"
# The back-end floods; the kernel reposts a receive buffer for each frame it takes.
while true; do
  echo "GUEST-RX $(cat /sys/class/net/eth0/statistics/rx_packets)"
  usleep 200000
done
"""

# --device blk. "GUEST-RX" counts the sectors read so far (field 3 of /sys/block/vda/stat).
BLK_GUEST_SCRIPT = """#!/bin/sh
echo "GUEST-FEATURES $(cat /sys/bus/virtio/devices/virtio0/features)"
echo "GUEST-DISK $(cat /sys/block/vda/size) sectors"
{reader}
while true; do
  echo "GUEST-RX $(awk '{{print $3}}' /sys/block/vda/stat)"
  usleep 200000
done
"""
# Unpaced: one dd reads as fast as the device answers. Each dd process reads the whole disk
# into one buffer, then the next one starts with a fresh buffer.
BLK_READER_FLOOD = ("while true; do dd if=/dev/vda of=/dev/null bs={bs} iflag=direct 2>/dev/null "
                    "|| {{ echo GUEST-DD-FAILED; sleep 1; }}; done &")
# Paced: {readers} long-lived dd processes, each reading into its own buffer, writing
# nothing anywhere (of=/dev/null: no guest CPU ever copies a sector). The guest's own block
# layer paces them: they run in a cgroup whose io.max lets {rbps} bytes a second through to
# the disk, so a given buffer is rewritten only every {readers} reads (docs/migration-qemu.md
# says why that matters).
BLK_READER_PACED = """mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup \
  && echo +io > /sys/fs/cgroup/cgroup.subtree_control && mkdir /sys/fs/cgroup/readers \
  && echo "$(cat /sys/block/vda/dev) rbps={rbps}" > /sys/fs/cgroup/readers/io.max \
  && echo $$ > /sys/fs/cgroup/readers/cgroup.procs || echo GUEST-THROTTLE-FAILED
echo "GUEST-IO-MAX $(cat /sys/fs/cgroup/readers/io.max)"
i=0
while [ $i -lt {readers} ]; do
  (while true; do dd if=/dev/vda of=/dev/null bs={bs} skip=$((i * {skip_blocks})) iflag=direct 2>/dev/null \
     || {{ echo GUEST-DD-FAILED; sleep 1; }}; done) &
  i=$((i + 1))
done
echo $$ > /sys/fs/cgroup/cgroup.procs"""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Side:
    """One QEMU plus its back-end process."""

    def __init__(self, name, args, work, guest, env, incoming_port=None):
        self.name = name
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir, exist_ok=True)
        self.sock = os.path.join(self.dir, "vhost.sock")
        self.qmp_path = os.path.join(self.dir, "qmp.sock")
        self.serial = os.path.join(self.dir, "serial.log")
        self.backend_log_path = os.path.join(self.dir, "backend.log")
        self.qemu = None
        for p in (self.sock, self.qmp_path, self.serial):
            if os.path.exists(p):
                os.unlink(p)
        self.backend_log = open(self.backend_log_path, "w")
        self.qemu_log = open(os.path.join(self.dir, "qemu.log"), "w")
        cmd = [args.backend, "--socket-path", self.sock]
        if args.device == "blk":
            cmd += ["--blk-file", args.image]  # both sides: shared storage
        cmd += shlex.split(args.backend_args)
        self.backend = subprocess.Popen(cmd, stderr=self.backend_log, stdout=subprocess.DEVNULL, env=env)
        wait_for(lambda: os.path.exists(self.sock) or self.backend.poll() is not None, 10,
                 f"the {name} back-end's socket")
        if self.backend.poll() is not None:
            raise RuntimeError(f"the {name} back-end exited: {read_text(self.backend_log_path)[-2000:]}")
        qemu = (machine_args(f"{args.ram_kib}K") + console_args(self.serial)
                + ["-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                   "-chardev", f"socket,id=vu,path={self.sock}"])
        if args.device == "blk":
            dev = "vhost-user-blk-pci,chardev=vu,num-queues=1,vectors=0,disable-legacy=on"
        else:
            qemu += ["-netdev", "vhost-user,id=net0,chardev=vu"]
            dev = "virtio-net-pci,netdev=net0,vectors=0,disable-legacy=on"
        if args.device_opts:
            dev += "," + args.device_opts
        qemu += device_args(dev, args.iommu, root_port=not args.root_bus)
        qemu += guest.boot_args(args.iommu)
        if incoming_port is not None:
            qemu += ["-incoming", f"tcp:127.0.0.1:{incoming_port}", "-S"]
        self.qemu = subprocess.Popen(qemu, stdout=self.qemu_log, stderr=subprocess.STDOUT)
        self.qmp = Qmp(self.qmp_path)

    def stop(self):
        """Quits QEMU and stops the back-end; returns the back-end's log."""
        try:
            self.qmp.cmd("quit")
        except Exception:
            pass
        self.qmp.close()
        try:
            self.qemu.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.qemu.kill()
            self.qemu.wait()
        if self.backend.poll() is None:
            self.backend.send_signal(signal.SIGTERM)
            try:
                self.backend.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.backend.kill()
                self.backend.wait()
        self.backend_log.close()
        self.qemu_log.close()
        return read_text(self.backend_log_path)

    def exit_note(self):
        """What to add to an error: whether this side's QEMU or back-end died, and why."""
        notes = []
        if self.qemu is not None:
            try:
                self.qemu.wait(timeout=2)  # a QEMU that failed may still be on its way out
            except subprocess.TimeoutExpired:
                pass
        if self.qemu is not None and self.qemu.poll() is not None:
            self.qemu_log.flush()
            tail = read_text(os.path.join(self.dir, "qemu.log")).strip().splitlines()[-3:]
            notes.append(f"{self.name} QEMU exited ({self.qemu.returncode}): {' | '.join(tail)}")
        if self.backend.poll() is not None:
            tail = read_text(self.backend_log_path).strip().splitlines()[-2:]
            notes.append(f"{self.name} back-end exited ({self.backend.returncode}): {' | '.join(tail)}")
        return "; ".join(notes)

    def kill(self):
        for p in (self.qemu, self.backend):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def sector_marks(page):
    """The byte offsets of the page's sectors that start with SECTOR_MARKER."""
    return [o for o in range(0, len(page), SECTOR) if page[o:o + len(SECTOR_MARKER)] == SECTOR_MARKER]


def classify(s, d):
    """A differing page: 'lost device write' if the source's page holds something the
    back-end wrote that the destination's page does not hold identically: a frame of
    sink_backend (marker + sequence number) or of vhostkit-net (ethertype 0x88b5, marker,
    queue, sequence number), or a disk sector (marker + sector number, compared whole)."""
    lost = []
    i = s.find(MARKER)
    while i >= 0:
        if s[i:i + 24] != d[i:i + 24]:
            seq_s = int.from_bytes(s[i + 16:i + 24], "little")
            seq_d = int.from_bytes(d[i + 16:i + 24], "little") if d[i:i + 16] == MARKER else None
            lost.append(f"@{i:#x} frame {seq_s} (destination: "
                        f"{'frame ' + str(seq_d) if seq_d is not None else 'no frame'})")
        i = s.find(MARKER, i + 1)
    i = s.find(NET_MARKER)
    while i >= 0:
        # i + 2: "VHOSTKIT"; + 10: le32 queue; + 14: le64 sequence number.
        if s[i:i + 22] != d[i:i + 22]:
            q = int.from_bytes(s[i + 10:i + 14], "little")
            seq_s = int.from_bytes(s[i + 14:i + 22], "little")
            seq_d = int.from_bytes(d[i + 14:i + 22], "little") if d[i:i + 10] == NET_MARKER else None
            lost.append(f"@{i - 12:#x} queue {q} frame {seq_s} (destination: "
                        f"{'frame ' + str(seq_d) if seq_d is not None else 'no frame'})")
        i = s.find(NET_MARKER, i + 1)
    sectors = []
    for o in sector_marks(s):
        if s[o:o + SECTOR] != d[o:o + SECTOR]:
            n_s = int.from_bytes(s[o + 16:o + 24], "little")
            n_d = int.from_bytes(d[o + 16:o + 24], "little") if d[o:o + 16] == SECTOR_MARKER else None
            sectors.append((o, n_s, n_d))
    if sectors:
        o, n_s, n_d = sectors[0]
        lost.append(f"{len(sectors)} sectors, first @{o:#x} sector {n_s} (destination: "
                    f"{'sector ' + str(n_d) if n_d is not None else 'no sector'})")
    if lost:
        return "lost device write", "; ".join(lost)
    return "other", f"{sum(1 for a, b in zip(s, d) if a != b)} bytes differ"


def make_image(path, mib):
    """A raw image whose every sector starts with SECTOR_MARKER and its le64 number, the
    rest of the sector filled with that number again (so that no two sectors are alike)."""
    sectors = mib * (1 << 20) // SECTOR
    with open(path, "wb") as f:
        for base in range(0, sectors, 2048):
            chunk = bytearray()
            for n in range(base, min(base + 2048, sectors)):
                num = n.to_bytes(8, "little")
                chunk += SECTOR_MARKER + num * ((SECTOR - len(SECTOR_MARKER)) // 8)
            f.write(chunk)


def compare(src_path, dst_path, size):
    """Returns [(gpa, class, detail)] for every page that differs."""
    out = []
    with open(src_path, "rb") as fs, open(dst_path, "rb") as fd:
        if os.fstat(fs.fileno()).st_size != size or os.fstat(fd.fileno()).st_size != size:
            raise RuntimeError("pmemsave wrote a file of the wrong size")
        ms = mmap.mmap(fs.fileno(), 0, access=mmap.ACCESS_READ)
        md = mmap.mmap(fd.fileno(), 0, access=mmap.ACCESS_READ)
        chunk = 1 << 20
        for base in range(0, size, chunk):
            end = min(base + chunk, size)
            if ms[base:end] == md[base:end]:
                continue
            for off in range(base, end, PAGE):
                s, d = ms[off:off + PAGE], md[off:off + PAGE]
                if s != d:
                    out.append((off,) + classify(s, d))
        ms.close()
        md.close()
    return out


def last_rx(serial_text):
    m = re.findall(r"GUEST-RX (\d+)", serial_text)
    return int(m[-1]) if m else None


def guest_failed(serial):
    """Raises if the guest's script reported a failure (blk: the throttle, a dd)."""
    for bad in ("GUEST-THROTTLE-FAILED", "GUEST-DD-FAILED"):
        if bad in read_text(serial):
            raise RuntimeError(f"the guest's reader failed ({bad})")


def one_run(args, n, guest, ram_bytes):
    work = os.path.join(args.work_dir, f"run{n}")
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    dst_env = dict(os.environ)
    dst_env.pop("VHOSTKIT_FAULT_DROP_LOG_ONE_IN", None)
    src_env = dict(dst_env)
    if args.mutation:
        src_env["VHOSTKIT_FAULT_DROP_LOG_ONE_IN"] = str(args.mutation)
    port = free_port()
    src = dst = None
    images = ()
    try:
        src = Side("source", args, work, guest, src_env)
        dst = Side("destination", args, work, guest, dst_env, incoming_port=port)

        def receiving():  # two GUEST-RX lines, the count growing
            c = re.findall(r"GUEST-RX (\d+)", read_text(src.serial))
            return len(c) >= 2 and int(c[-1]) > int(c[-2]) > 0
        try:
            wait_for(receiving, 90, "the guest to receive the back-end's data")
        except RuntimeError:
            print(read_text(src.serial)[-2000:])
            raise
        t_boot = time.time() - t0
        guest_failed(src.serial)
        features = re.search(r"GUEST-FEATURES ([01]+)", read_text(src.serial))
        access_platform = bool(features) and len(features.group(1)) > 33 and features.group(1)[33] == "1"
        if access_platform != args.iommu:
            raise RuntimeError(f"the device {'does not use' if args.iommu else 'uses'} the vIOMMU "
                               f"(virtio features {features.group(1) if features else None})")
        rx_before = last_rx(read_text(src.serial))
        src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": args.max_bandwidth,
                                                 "downtime-limit": args.downtime_ms})
        t1 = time.time()
        src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")

        def completed():
            info = src.qmp.cmd("query-migrate")
            if info.get("status") in ("failed", "cancelled"):
                raise RuntimeError(f"migration {info.get('status')}: {info.get('error-desc', '')}")
            return info if info.get("status") == "completed" else None
        info = wait_for(completed, 120, "the migration to complete")
        wait_for(lambda: src.qmp.cmd("query-status")["status"] == "postmigrate", 30, "the source's postmigrate")
        wait_for(lambda: dst.qmp.cmd("query-status")["status"] != "inmigrate", 60, "the destination to load")
        t_mig = time.time() - t1
        dst_status = dst.qmp.cmd("query-status")["status"]
        rx_after = last_rx(read_text(src.serial))
        guest_failed(src.serial)
        # The two RAM images (1 GiB together) go to tmpfs unless they are to be kept: written
        # to a disk they cost seconds of writeback per run.
        img_dir = work if args.keep or not os.path.isdir("/dev/shm") else "/dev/shm"
        src_img = os.path.join(img_dir, f"vhostkit-qmig-{os.getpid()}-source.ram")
        dst_img = os.path.join(img_dir, f"vhostkit-qmig-{os.getpid()}-destination.ram")
        images = (src_img, dst_img)
        for p in images:
            if os.path.exists(p):
                os.unlink(p)
        # Both sides save at once (two QEMU processes): it halves the wait on two cores.
        saver = threading.Thread(target=dst.qmp.cmd, args=("pmemsave",),
                                 kwargs=dict(val=0, size=ram_bytes, filename=dst_img))
        saver.start()
        src.qmp.cmd("pmemsave", val=0, size=ram_bytes, filename=src_img)
        saver.join()
        diffs = compare(src_img, dst_img, ram_bytes)
        src_log = src.stop()
        dst_log = dst.stop()
        src = dst = None
        if not args.keep:
            for p in images:
                os.unlink(p)
        # What the source back-end wrote: sink_backend's receive chains, vhostkit-net's
        # receive packets, vhostkit-blk's completed reads.
        frames = re.search(r"chains_q0=(\d+)|rx0_packets=(\d+)|exiting: reads=(\d+)", src_log)
        ram = info.get("ram", {})
        return dict(
            diffs=diffs, boot_s=t_boot, migrate_s=t_mig, total_s=time.time() - t0,
            rx_during=(rx_after - rx_before) if None not in (rx_before, rx_after) else None,
            frames=int(next(g for g in frames.groups() if g)) if frames else None, dst_status=dst_status,
            syncs=ram.get("dirty-sync-count"), transferred=ram.get("transferred") or 0,
            downtime=info.get("downtime"), fault_on="FAULT INJECTION ON" in src_log,
            backend_errors=[l for l in (src_log + dst_log).splitlines()
                            if re.match(r"([\w-]+: )?error: ", l)])
    except Exception as e:
        notes = [side.exit_note() for side in (src, dst) if side is not None]
        raise RuntimeError("; ".join([str(e)] + [n for n in notes if n])) from e
    finally:
        for side in (src, dst):
            if side is not None:
                side.kill()
        if not args.keep:
            for p in images:
                if os.path.exists(p):
                    os.unlink(p)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("net", "blk"), default="net",
                    help="net: virtio-net, the back-end injects receive frames; blk: virtio-blk "
                         "served by vhostkit-blk, the guest reads the disk with O_DIRECT")
    ap.add_argument("--backend", required=True,
                    help="the back-end program; it gets --socket-path PATH first (and --blk-file "
                         "IMAGE with --device blk)")
    ap.add_argument("--backend-args", default="--queues 2 --source --marker --big --interval-us 3000",
                    help="further arguments for the back-end, one shell-quoted string")
    ap.add_argument("--device-opts", default="",
                    help="more properties for QEMU's -device (e.g. mrg_rxbuf=off,host_mtu=9000)")
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--iommu", action="store_true", help="with a vIOMMU (intel-iommu, device-iotlb, ATS)")
    ap.add_argument("--root-bus", action="store_true",
                    help="with --iommu: the device on q35's root bus (no ATS), not behind a root port")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mutation", type=int, default=0, metavar="N",
                    help="the source back-end drops every N-th dirty-log write; every run must then "
                         "find lost device writes")
    ap.add_argument("--max-bandwidth", type=int, default=1 << 30, help="migration bandwidth, bytes/s")
    ap.add_argument("--downtime-ms", type=int, default=300)
    ap.add_argument("--ram-kib", type=int, default=RAM_KIB,
                    help="guest RAM; a multiple of 256 KiB shows QEMU 7.2's own TCG bug")
    ap.add_argument("--keep", action="store_true", help="keep the RAM images")
    ap.add_argument("--disk-mib", type=int, default=128, help="--device blk: the image's size")
    ap.add_argument("--read-bs", type=int, default=1024, metavar="KIB",
                    help="--device blk: dd's block size in the guest, KiB")
    ap.add_argument("--readers", type=int, default=16,
                    help="--device blk: paced dd processes in the guest, each with its own buffer")
    ap.add_argument("--read-pace-us", type=int, default=1500000,
                    help="--device blk: each reader reads one block about every this many "
                         "microseconds (the guest throttles them all together to readers * "
                         "read-bs bytes per period); 0: one reader, as fast as the disk answers")
    args = ap.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    args.work_dir = os.path.abspath(args.work_dir)

    if args.device == "blk":
        reader = (BLK_READER_PACED if args.read_pace_us else BLK_READER_FLOOD).format(
            bs=f"{args.read_bs}k", readers=args.readers,
            rbps=args.read_bs * 1024 * args.readers * 1000000 // max(1, args.read_pace_us),
            skip_blocks=args.disk_mib * 1024 // args.read_bs // max(1, args.readers))
        guest = Guest(args.source_dir, args.work_dir, BLK_GUEST_SCRIPT.format(reader=reader))
        args.image = os.path.join(args.work_dir, "disk.img")
        make_image(args.image, args.disk_mib)
    else:
        guest = Guest(args.source_dir, args.work_dir, NET_GUEST_SCRIPT)
    ram_bytes = args.ram_kib * 1024

    config = args.device + ", " + ("vIOMMU" if args.iommu else "no vIOMMU") + (
        f", MUTATION: the source back-end drops 1 in {args.mutation} dirty-log writes" if args.mutation else "")
    print(f"configuration: {config}; {args.runs} runs; guest RAM {args.ram_kib} KiB; back-end "
          f"{os.path.basename(args.backend)} {args.backend_args}"
          + (f"; device options {args.device_opts}" if args.device_opts else ""), flush=True)
    failures = []
    results = []
    for n in range(1, args.runs + 1):
        try:
            r = one_run(args, n, guest, ram_bytes)
        except Exception as e:  # a run that cannot complete fails the test
            print(f"run {n}: ERROR {e}", flush=True)
            failures.append(f"run {n}: {e}")
            continue
        results.append(r)
        lost = [d for d in r["diffs"] if d[1] == "lost device write"]
        other = [d for d in r["diffs"] if d[1] == "other"]
        print(f"run {n}: {len(r['diffs'])} of {ram_bytes // PAGE} pages differ ({len(lost)} lost device write, {len(other)} other); "
              f"boot {r['boot_s']:.1f} s, migration {r['migrate_s']:.1f} s ({r['syncs']} dirty syncs, "
              f"{r['transferred'] >> 20} MiB, downtime {r['downtime']} ms), run {r['total_s']:.1f} s; "
              + (f"guest read {r['rx_during']} sectors during the migration, back-end completed {r['frames']} "
                 f"reads; " if args.device == "blk" else
                 f"guest received {r['rx_during']} frames during the migration, back-end wrote {r['frames']}; ")
              + f"destination {r['dst_status']}", flush=True)
        for gpa, cls, detail in r["diffs"][:10]:
            print(f"    page {gpa:#011x}: {cls}: {detail[:300]}")
        if len(r["diffs"]) > 10:
            print(f"    ... and {len(r['diffs']) - 10} more")
        for line in r["backend_errors"][:5]:
            print(f"    back-end: {line}")
        if not r["rx_during"]:
            failures.append(f"run {n}: the guest received nothing during the migration")
        if r["backend_errors"]:
            failures.append(f"run {n}: back-end errors")
        if args.mutation:
            if not r["fault_on"]:
                failures.append(f"run {n}: the source back-end did not turn fault injection on")
            if not lost:
                failures.append(f"run {n}: dropping dirty-log writes lost no device write")
        elif r["diffs"]:
            failures.append(f"run {n}: {len(r['diffs'])} pages differ")
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    if args.device == "blk" and not args.keep:
        os.unlink(args.image)  # kept for a look after a failure
    if args.mutation:
        counts = ", ".join(str(sum(1 for d in r["diffs"] if d[1] == "lost device write")) for r in results)
        print(f"PASS: with 1 in {args.mutation} dirty-log writes dropped, every run lost device writes "
              f"(pages per run: {counts}): the comparison detects an incomplete dirty log")
    else:
        print(f"PASS: {len(results)} migrations ({config}): guest RAM identical on both sides after every run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
