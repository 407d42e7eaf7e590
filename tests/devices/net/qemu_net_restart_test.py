#!/usr/bin/env python3
"""vhostkit-net killed (SIGKILL) and started again under a running QEMU guest.

vhostkit-net serves a TAP interface (10.80.<n>.1/24 on the host); QEMU connects to it with
`-chardev socket,...,reconnect=1` and `-netdev vhost-user`. The guest pings the host
every 0.2 s the whole time. The host kills vhostkit-net with SIGKILL at a random moment
--restarts times and starts a new one on the same socket and tap at once; after each
restart it pings the guest until it answers and records how long the network was gone
(from the kill). Frames may be lost while no back-end runs; the network must be back
within --max-outage seconds each time. Then, to show that no queue is stuck, the guest
sends 4 MiB to the host and receives 4 MiB over TCP, both checked by SHA-256.
vhostkit-net does not use inflight tracking (QEMU's vhost-user net front-end does not
ask for it): after a crash QEMU restarts each ring from its used index, so chains the
dead back-end had taken and not completed are taken again by its successor (a transmit
frame may go out twice, a receive buffer is filled by a later frame).
"""
import argparse
import os
import random
import re
import select
import socket
import struct
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "support"))
sys.path.insert(0, here)
from qemu_guest import (Guest, console_args, device_args, machine_args, read_text,  # noqa: E402
                        start_backend, stop_backend, wait_for)
import qemu_net_test  # noqa: E402  (its HostPeer: the TCP transfers)

GUEST_SCRIPT = """#!/bin/sh
ip link set eth0 up
ip addr add {guest}/24 dev eth0
echo GUEST-NET-UP
ping -i 0.2 -W 1 {host} > /tmp/ping 2>&1 &
pinger=$!
# The host opens port 5003 once its restarts are over.
while ! nc {host} 5003 < /dev/null > /dev/null 2>&1; do sleep 0.5; done
kill -INT $pinger; sleep 0.5
grep -E 'transmitted' /tmp/ping | sed 's/^/GUEST-PING /'
dd if=/dev/urandom of=/tmp/out bs=65536 count={blocks} 2>/dev/null
sha256sum /tmp/out | sed 's/^/GUEST-SENT-SHA /'
nc {host} 5001 < /tmp/out
nc {host} 5002 < /dev/null > /tmp/in
sha256sum /tmp/in | sed 's/^/GUEST-RECV-SHA /'
echo "GUEST-RECV-BYTES $(wc -c < /tmp/in)"
"""


def run(cmd, check=True):
    return subprocess.run(cmd, check=check, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xffff)
    s += s >> 16
    return ~s & 0xffff


_seq = 0


def pings(ip, timeout=0.2):
    """True if `ip` answers one ICMP echo within `timeout` s (a raw socket: root)."""
    global _seq
    _seq = (_seq + 1) & 0xffff
    ident = os.getpid() & 0xffff
    payload = b"vhostkit-restart"
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, _seq)
    pkt = struct.pack("!BBHHH", 8, 0, checksum(hdr + payload), ident, _seq) + payload
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.sendto(pkt, (ip, 0))
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            if left <= 0 or not select.select([s], [], [], left)[0]:
                return False
            data, addr = s.recvfrom(2048)
            ihl = (data[0] & 0xf) * 4
            typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if addr[0] == ip and typ == 0 and rid == ident and rseq == _seq:
                return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemon", required=True, help="the vhostkit-net binary")
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--restarts", type=int, default=20)
    ap.add_argument("--max-outage", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    print(f"seed {seed}")
    size = qemu_net_test.SIZE
    os.makedirs(args.work_dir, exist_ok=True)
    subnet = f"10.80.{os.getpid() % 250}"
    host_ip, guest_ip = f"{subnet}.1", f"{subnet}.2"
    tap = f"vkr{os.getpid() % 100000}"
    guest = Guest(args.source_dir, args.work_dir,
                  GUEST_SCRIPT.format(guest=guest_ip, host=host_ip, blocks=size // 65536))
    run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
    backend = qemu = go = None
    failures = []
    outages = []
    try:
        run(["ip", "addr", "add", f"{host_ip}/24", "dev", tap])
        run(["ip", "link", "set", tap, "up"])
        peer = qemu_net_test.HostPeer(host_ip)
        sock = os.path.join(args.work_dir, "net.sock")
        serial = os.path.join(args.work_dir, "serial.txt")
        if os.path.exists(serial):
            os.unlink(serial)
        log = open(os.path.join(args.work_dir, "daemon.log"), "w+")
        cmd = [args.daemon, "--socket-path", sock, "--mode", "tap", "--tap", tap,
               "--log-level", "info"]
        backend = start_backend(cmd, sock, log)
        qemu_cmd = machine_args("256M") + console_args(serial) + [
            "-chardev", f"socket,id=vu,path={sock},reconnect=1",
            "-netdev", "vhost-user,id=net0,chardev=vu"]
        qemu_cmd += device_args(
            "virtio-net-pci,netdev=net0,vectors=0,disable-legacy=on,mac=52:54:00:12:34:57")
        qemu_cmd += guest.boot_args()
        qemu = subprocess.Popen(qemu_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "GUEST-NET-UP" in read_text(serial) or qemu.poll() is not None,
                     180, "the guest's network set-up")
            wait_for(lambda: pings(guest_ip) or qemu.poll() is not None, 60,
                     "the guest's first answer")
            for _ in range(args.restarts):
                if qemu.poll() is not None:
                    failures.append("QEMU exited during the restarts")
                    break
                time.sleep(rng.uniform(0.1, 1.0))
                t_kill = time.time()
                backend.kill()
                backend.wait()
                backend = start_backend(cmd, sock, log)
                wait_for(lambda: pings(guest_ip) or qemu.poll() is not None, 30,
                         "the guest's network after a restart")
                outages.append(time.time() - t_kill)
            go = qemu_net_test.HostPeer._listen(host_ip, 5003)
            go.settimeout(60)
            c, _ = go.accept()
            c.close()
            qemu.wait(timeout=180)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            failures.append(str(e))
        out = read_text(serial)
        log.seek(0)
        blog = log.read()
        print("---- guest (tail) ----")
        print(out[-2000:])
        if outages:
            print(f"restarts {len(outages)}, outage from kill to the guest's next answer: "
                  f"max {max(outages):.2f} s, mean {sum(outages) / len(outages):.2f} s")
        if len(outages) != args.restarts:
            failures.append(f"{len(outages)} restarts of {args.restarts}")
        slow = [f"{o:.2f}" for o in outages if o > args.max_outage]
        if slow:
            failures.append(f"network gone longer than {args.max_outage} s: {slow}")
        m = re.search(r"GUEST-SENT-SHA ([0-9a-f]{64})", out)
        if not m or peer.received_sha != m.group(1) or peer.received_len != size:
            failures.append("guest -> host transfer after the restarts did not arrive intact")
        m = re.search(r"GUEST-RECV-SHA ([0-9a-f]{64})", out)
        if not m or m.group(1) != peer.sent_sha:
            failures.append("host -> guest transfer after the restarts did not arrive intact")
        failures += peer.errors
        if failures:
            print("FAIL: " + "; ".join(failures))
            print("---- vhostkit-net (tail) ----")
            print(blog[-2500:])
            return 1
        print("PASS: the guest's network came back after every restart; "
              "4 MiB each way intact afterwards")
        return 0
    finally:
        if qemu is not None and qemu.poll() is None:
            qemu.kill()
            qemu.wait()
        if backend is not None:
            stop_backend(backend)
        if go is not None:
            go.close()
        run(["ip", "link", "del", tap], check=False)


if __name__ == "__main__":
    sys.exit(main())
