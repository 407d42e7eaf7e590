"""What the QEMU guest tests share: the tiny test guest, QEMU's command line for one
vhost-user device (with or without the vIOMMU), starting a back-end, a QMP client.

Users: tests/interop/qemu_negotiation_test.py, tests/devices/net/qemu_net_test.py,
tests/devices/blk/qemu_blk_test.py, tests/migration/qemu_migration_test.py. They import
it after putting this directory on sys.path (see any of them). Python 3 stdlib only.

Concepts:
- Guest: Debian's cloud kernel plus a busybox initramfs (scripts/guest/build-guest.sh,
  cached in <source>/build/guest) with the test's own /test.sh appended
  (scripts/guest/add-test.sh). The guest prints VHOSTKIT-GUEST-UP, runs /test.sh, prints
  VHOSTKIT-TEST-EXIT <status> and powers off.
- The machine: TCG, q35, qboot, guest RAM in a shared memfd (vhost-user maps it).
- The vIOMMU: intel-iommu with device-iotlb and without interrupt remapping; the device
  behind its own PCIe root port with ATS. On q35's root bus a virtio-pci device is not PCI
  Express, has no ATS, the guest sends no device-IOTLB invalidations, and QEMU (which
  listens for nothing else once device-iotlb is on) never tells the back-end about an
  unmap (docs/vhostkit-blk.md). root_port=False keeps the device on the root bus.
"""
import json
import os
import socket
import subprocess
import time

QEMU = "qemu-system-x86_64"
# no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can fail and
# panic the guest ("timer doesn't work through Interrupt-remapped IO-APIC").
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1 no_timer_check"
# intel_iommu=on: the guest programs the vIOMMU (in Linux's default lazy mode).
IOMMU_CMDLINE = " intel_iommu=on"


class Guest:
    """The test guest with `script` as its /test.sh, built under `work_dir`."""

    def __init__(self, source_dir, work_dir, script):
        guest_dir = os.path.join(source_dir, "build", "guest")
        subprocess.run([os.path.join(source_dir, "scripts/guest/build-guest.sh"), guest_dir],
                       check=True)
        os.makedirs(work_dir, exist_ok=True)
        path = os.path.join(work_dir, "test.sh")
        with open(path, "w") as f:
            f.write(script)
        self.kernel = os.path.join(guest_dir, "vmlinuz")
        self.initrd = os.path.join(work_dir, "initramfs.cpio")
        subprocess.run([os.path.join(source_dir, "scripts/guest/add-test.sh"),
                        os.path.join(guest_dir, "initramfs.cpio"), path, self.initrd], check=True)

    def boot_args(self, iommu=False, extra_cmdline=""):
        """-kernel, -initrd and -append for QEMU."""
        cmdline = KERNEL_CMDLINE + (" " + extra_cmdline if extra_cmdline else "")
        return ["-kernel", self.kernel, "-initrd", self.initrd,
                "-append", cmdline + (IOMMU_CMDLINE if iommu else "")]


def machine_args(mem, smp=1):
    """QEMU's machine: TCG, q35, qboot, `mem` (a QEMU size such as "256M") of shared memfd
    guest RAM, no default devices, no reboot."""
    return [QEMU, "-accel", "tcg", "-machine", "q35", "-bios", "/usr/share/qemu/qboot.rom",
            "-m", mem, "-smp", str(smp), "-no-reboot", "-nodefaults",
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-numa", "node,memdev=mem"]


def console_args(serial_file=None):
    """The guest's console: QEMU's stdout, or `serial_file`."""
    if serial_file is None:
        return ["-nographic", "-serial", "stdio"]
    return ["-display", "none", "-serial", f"file:{serial_file}"]


def device_args(dev, iommu=False, root_port=True):
    """-device arguments for the virtio-pci device `dev` (a -device string without bus or
    IOMMU properties), behind the vIOMMU if `iommu`; see the module's concepts."""
    if not iommu:
        return ["-device", dev]
    if not root_port:
        return ["-device", "intel-iommu,device-iotlb=on",
                "-device", dev + ",iommu_platform=on,ats=on"]
    return ["-device", "intel-iommu,intremap=off,device-iotlb=on",
            "-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1",
            "-device", dev + ",bus=rp0,iommu_platform=on,ats=on"]


def read_text(path):
    """The file's text ('' if it does not exist)."""
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def wait_for(pred, timeout, what):
    """Polls pred() every 50 ms until it returns something true, which it returns.
    REQUIRES: pred() returns within the timeout. Raises RuntimeError naming `what`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def start_backend(cmd, sock, log, env=None, timeout=10):
    """Starts the back-end `cmd` (stderr to the open file `log`) and waits until it listens
    on `sock`. Returns the Popen; raises RuntimeError with the log's tail if it exits or
    does not listen within `timeout` seconds."""
    if os.path.exists(sock):
        os.unlink(sock)
    p = subprocess.Popen(cmd, stderr=log, stdout=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout
    while not os.path.exists(sock):
        if time.time() > deadline or p.poll() is not None:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.flush()
            raise RuntimeError(f"{os.path.basename(cmd[0])} did not start: "
                               f"{read_text(log.name)[-2000:]}")
        time.sleep(0.05)
    return p


def stop_backend(p, timeout=10):
    """SIGTERM, then SIGKILL after `timeout` s. Returns the seconds it took to exit on
    SIGTERM, or None if it had to be killed."""
    if p.poll() is not None:
        return 0.0
    t0 = time.time()
    p.terminate()
    try:
        p.wait(timeout=timeout)
        return time.time() - t0
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return None


class Qmp:
    """A minimal QMP client over a UNIX socket (QEMU's -qmp unix:PATH,server=on,wait=off)."""

    def __init__(self, path, timeout=30):
        deadline = time.time() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > deadline:
                    raise RuntimeError(f"QMP socket {path} did not open")
                time.sleep(0.05)
        self.sock.settimeout(120)
        self.buf = b""
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        """Runs command `name` and returns its "return" value (events are skipped).
        Raises RuntimeError on an error reply."""
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error']}")
            return r.get("return")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
