#!/usr/bin/env python3
"""QEMU (Debian's qemu-system-x86, TCG) drives vhostkit's back-end.

Boots the tiny test guest with a vhost-user virtio-net device served by sink_backend,
brings the guest's interface up and makes it transmit (ARP for a neighbour), then checks
in the back-end's log that QEMU negotiated, sent the memory table and set up the rings,
and that the back-end consumed the guest's transmit buffers. Installs what it needs
(QEMU, the guest kernel) through scripts/guest/build-guest.sh.
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support"))
from qemu_guest import Guest, console_args, device_args, machine_args  # noqa: E402

GUEST_SCRIPT = """#!/bin/sh
ip link set eth0 up
ip addr add 10.77.0.2/24 dev eth0
# Transmit: ARP requests for a neighbour nobody answers.
ping -c 3 -W 1 10.77.0.1 >/dev/null 2>&1
echo "GUEST-TX-DONE"
cat /sys/class/net/eth0/statistics/tx_packets | sed 's/^/GUEST-TX-PACKETS /'
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", required=True)
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--iommu", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    guest = Guest(args.source_dir, args.work_dir, GUEST_SCRIPT)

    sock = os.path.join(args.work_dir, "vhost.sock")
    backend_log = open(os.path.join(args.work_dir, "backend.log"), "w+")
    backend = subprocess.Popen([args.backend, "--socket-path", sock, "--queues", "2", "--log-level", "debug"],
                               stderr=backend_log, stdout=subprocess.DEVNULL)
    deadline = time.time() + 10
    while not os.path.exists(sock):
        if time.time() > deadline or backend.poll() is not None:
            print("backend did not start"); return 1
        time.sleep(0.05)

    qemu_cmd = machine_args("256M") + console_args() + [
        "-chardev", f"socket,id=vu,path={sock}", "-netdev", "vhost-user,id=net0,chardev=vu"]
    # With the vIOMMU the device uses IOVAs and the back-end learns translations through
    # IOTLB misses that QEMU answers. This test keeps the device on the root bus (no ATS):
    # it checks negotiation, not invalidations.
    qemu_cmd += device_args("virtio-net-pci,netdev=net0,vectors=0,disable-legacy=on", args.iommu,
                            root_port=False)
    qemu_cmd += guest.boot_args(args.iommu)
    guest_out = ""
    try:
        qemu = subprocess.run(qemu_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
        guest_out = qemu.stdout.decode(errors="replace")
    except subprocess.TimeoutExpired as e:
        guest_out = (e.stdout or b"").decode(errors="replace")
        print("QEMU timed out")
    backend.send_signal(signal.SIGTERM)
    try:
        backend.wait(timeout=10)
    except subprocess.TimeoutExpired:
        backend.kill()
        print("FAIL: the back-end did not exit on SIGTERM")
        return 1
    backend_log.seek(0)
    log = backend_log.read()

    print("---- guest ----"); print(guest_out[-3000:])
    print("---- back-end (tail) ----"); print(log[-3000:])
    failures = []
    if "GUEST-TX-DONE" not in guest_out:
        failures.append("the guest did not finish its script")
    for req in ["GET_FEATURES", "SET_FEATURES", "SET_OWNER", "SET_VRING_NUM",
                "SET_VRING_ADDR", "SET_VRING_BASE", "SET_VRING_KICK", "SET_VRING_CALL"]:
        if f": {req} (" not in log:
            failures.append(f"the back-end never received {req}")
    # QEMU shares guest memory with SET_MEM_TABLE, or region by region with ADD_MEM_REG
    # when CONFIGURE_MEM_SLOTS is negotiated (QEMU 7.2 does the latter with vhostkit).
    if ": SET_MEM_TABLE (" not in log and ": ADD_MEM_REG (" not in log:
        failures.append("the back-end never received guest memory")
    if " failed: " in log or "rejected" in re.sub(r"rejected=\d+", "", log):
        failures.append("the back-end refused a request from QEMU")
    stats = re.search(r"STATS messages=(\d+) rejected=(\d+) chains_q0=(\d+) bytes_q0=(\d+) chains_q1=(\d+) bytes_q1=(\d+)", log)
    if not stats:
        failures.append("no STATS line from the back-end")
    else:
        chains_tx = int(stats.group(5))
        print(f"back-end consumed {chains_tx} transmit chains, {stats.group(6)} bytes")
        if chains_tx == 0:
            failures.append("the back-end consumed no transmit buffer")
    if args.iommu:
        if ": IOTLB_MSG (" not in log:
            failures.append("no IOTLB update reached the back-end")
        if "IOTLB miss at" not in log:
            failures.append("the back-end sent no IOTLB miss")
    if backend.returncode != 0:
        failures.append(f"the back-end exited with {backend.returncode}")
    if failures:
        print("FAIL: " + "; ".join(failures)); return 1
    print("PASS: QEMU negotiated with vhostkit, shared its memory, set up the rings, and the back-end consumed the guest's packets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
