#!/usr/bin/env python3
"""A real QEMU guest on vhostkit-net in tap mode.

Creates a TAP interface with 10.78.<n>.1/24 on the host, starts vhostkit-net on it, boots
the tiny guest (Debian's kernel and busybox, scripts/guest) under QEMU (TCG) with a
vhost-user virtio-net device, and checks, from inside the guest:
  - ping to the host side of the tap gets replies;
  - 4 MiB of random data sent guest -> host over TCP arrives intact (SHA-256 compared);
  - 4 MiB sent host -> guest arrives intact.
With --iommu the device sits behind QEMU's intel-iommu, and the back-end must have sent
IOTLB misses and received updates. Exits 0 only if everything held.
"""
import argparse
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "support"))
from qemu_guest import Guest, console_args, device_args, machine_args  # noqa: E402

SIZE = 4 << 20

GUEST_SCRIPT = """#!/bin/sh
ip link set eth0 up
ip addr add {guest}/24 dev eth0
if ping -c 5 -W 3 {host} > /tmp/ping 2>&1; then echo GUEST-PING-OK; fi
grep -E 'transmitted|received' /tmp/ping
if [ -n "{debug}" ]; then dmesg | tail -15; cat /proc/interrupts | grep -iE 'virtio|CPU'; for s in rx_packets rx_bytes rx_dropped rx_errors rx_length_errors tx_packets; do echo "$s $(cat /sys/class/net/eth0/statistics/$s)"; done; fi
dd if=/dev/urandom of=/tmp/out bs=65536 count={blocks} 2>/dev/null
sha256sum /tmp/out | sed 's/^/GUEST-SENT-SHA /'
nc {host} 5001 < /tmp/out
nc {host} 5002 < /dev/null > /tmp/in
sha256sum /tmp/in | sed 's/^/GUEST-RECV-SHA /'
echo "GUEST-RECV-BYTES $(wc -c < /tmp/in)"
"""


def run(cmd, check=True):
    return subprocess.run(cmd, check=check, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


class HostPeer:
    """TCP servers on the host side of the tap: one receives SIZE bytes, one sends them."""

    def __init__(self, addr):
        self.received_sha = None
        self.received_len = 0
        self.sent = os.urandom(SIZE)
        self.sent_sha = hashlib.sha256(self.sent).hexdigest()
        self.errors = []
        self.rx = self._listen(addr, 5001)
        self.tx = self._listen(addr, 5002)
        threading.Thread(target=self._receive, daemon=True).start()
        threading.Thread(target=self._send, daemon=True).start()

    @staticmethod
    def _listen(addr, port):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(1)
        s.settimeout(300)
        return s

    def _receive(self):
        try:
            c, _ = self.rx.accept()
            c.settimeout(120)
            h = hashlib.sha256()
            while self.received_len < SIZE:
                d = c.recv(65536)
                if not d:
                    break
                h.update(d)
                self.received_len += len(d)
            c.close()
            self.received_sha = h.hexdigest()
        except OSError as e:
            self.errors.append(f"receive: {e}")

    def _send(self):
        try:
            c, _ = self.tx.accept()
            c.settimeout(120)
            c.sendall(self.sent)
            c.close()
        except OSError as e:
            self.errors.append(f"send: {e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemon", required=True, help="the vhostkit-net binary")
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--iommu", action="store_true")
    ap.add_argument("--mib", type=int, default=4, help="MiB to send each way")
    ap.add_argument("--timeout", type=int, default=300, help="seconds the guest may run")
    args = ap.parse_args()
    global SIZE
    SIZE = args.mib << 20
    os.makedirs(args.work_dir, exist_ok=True)

    # A subnet of our own, so that a tap another run left behind cannot take our route.
    subnet = f"10.{78 + (1 if args.iommu else 0)}.{os.getpid() % 250}"
    host_ip, guest_ip = f"{subnet}.1", f"{subnet}.2"
    tap = f"vkn{os.getpid() % 100000}"
    guest = Guest(args.source_dir, args.work_dir,
                  GUEST_SCRIPT.format(guest=guest_ip, host=host_ip, blocks=SIZE // 65536,
                                      debug="1" if os.environ.get("VHOSTKIT_GUEST_DEBUG") else ""))

    run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
    daemon = None
    try:
        run(["ip", "addr", "add", f"{host_ip}/24", "dev", tap])
        run(["ip", "link", "set", tap, "up"])
        peer = HostPeer(host_ip)
        sock = os.path.join(args.work_dir, "net.sock")
        daemon_log = open(os.path.join(args.work_dir, "daemon.log"), "w+")
        daemon = subprocess.Popen([args.daemon, "--socket-path", sock, "--mode", "tap", "--tap", tap,
                                   "--log-level", "debug"] + os.environ.get("VHOSTKIT_NET_ARGS", "").split(),
                                  stderr=daemon_log, stdout=subprocess.DEVNULL)
        deadline = time.time() + 10
        while not os.path.exists(sock):
            if time.time() > deadline or daemon.poll() is not None:
                daemon_log.seek(0)
                print("vhostkit-net did not start:\n" + daemon_log.read())
                return 1
            time.sleep(0.05)
        qemu_cmd = machine_args("256M") + console_args() + [
            "-chardev", f"socket,id=vu,path={sock}", "-netdev", "vhost-user,id=net0,chardev=vu"]
        dev = "virtio-net-pci,netdev=net0,vectors=0,disable-legacy=on,mac=52:54:00:12:34:56"
        dev += os.environ.get("VHOSTKIT_QEMU_DEV_EXTRA", "")  # debugging aid
        # With the vIOMMU the device sits behind a PCI Express root port (qemu_guest.py says why).
        qemu_cmd += device_args(dev, args.iommu)
        qemu_cmd += guest.boot_args(args.iommu, os.environ.get("VHOSTKIT_GUEST_CMDLINE", ""))
        start = time.time()
        guest_log = os.path.join(args.work_dir, "guest.log")
        with open(guest_log, "wb") as gl:
            q = subprocess.Popen(qemu_cmd, stdout=gl, stderr=subprocess.STDOUT)
            try:
                q.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                q.kill()
                q.wait()
        with open(guest_log, "rb") as gl:
            out = gl.read().decode(errors="replace")
        if q.returncode != 0:
            out += f"\nQEMU exited with {q.returncode} (killed after {args.timeout} s?)"
        elapsed = time.time() - start
        t0 = time.time()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.kill()
        stop_s = time.time() - t0
        daemon_log.seek(0)
        log = daemon_log.read()
        print("---- guest ----")
        print(out[-3000:])
        print("---- vhostkit-net (tail) ----")
        print(log[-2500:])
        failures = []
        if "GUEST-PING-OK" not in out:
            failures.append("the guest's ping got no replies")
        m = re.search(r"GUEST-SENT-SHA ([0-9a-f]{64})", out)
        if not m:
            failures.append("the guest did not send its data")
        elif peer.received_sha != m.group(1) or peer.received_len != SIZE:
            failures.append(f"guest -> host: host received {peer.received_len} bytes, "
                            f"sha {peer.received_sha}, guest sent {m.group(1)}")
        m = re.search(r"GUEST-RECV-SHA ([0-9a-f]{64})", out)
        if not m or m.group(1) != peer.sent_sha:
            got = re.search(r"GUEST-RECV-BYTES (\d+)", out)
            failures.append(f"host -> guest: guest got sha {m.group(1) if m else None}, "
                            f"{got.group(1) if got else '?'} bytes; host sent {peer.sent_sha}")
        stats = re.search(r"STATS .*rx0_packets=(\d+) .*tx0_packets=(\d+)", log)
        if not stats or int(stats.group(1)) == 0 or int(stats.group(2)) == 0:
            failures.append("vhostkit-net's counters show no traffic")
        if args.iommu and "IOTLB miss" not in log:
            failures.append("the back-end sent no IOTLB miss under the vIOMMU")
        if daemon.returncode != 0:
            failures.append(f"vhostkit-net exited with {daemon.returncode}")
        if stop_s > 1.5:
            failures.append(f"vhostkit-net took {stop_s:.1f} s to exit on SIGTERM")
        failures += peer.errors
        print(f"guest run took {elapsed:.1f} s; {SIZE} bytes each way")
        if failures:
            print("FAIL: " + "; ".join(failures))
            return 1
        print(f"PASS: ping and {args.mib} MiB each way intact through vhostkit-net on a tap"
              + (" behind the vIOMMU" if args.iommu else ""))
        return 0
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        run(["ip", "link", "del", tap], check=False)


if __name__ == "__main__":
    sys.exit(main())
