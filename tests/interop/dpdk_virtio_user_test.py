#!/usr/bin/env python3
"""DPDK's virtio-user front-end (testpmd from Debian's dpdk-dev) drives vhostkit's back-end.

Two runs of a few seconds each: testpmd in txonly mode (guest to host: the back-end
consumes every packet), then in rxonly mode with the back-end generating packets (host to
guest). Each run checks that both sides count the same packets and that there were some.
Installs dpdk-dev when testpmd is missing.
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time

RING = 256  # virtio-user queue size


def ensure_testpmd():
    if shutil.which("dpdk-testpmd"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "dpdk-dev"], check=True, env=env)


def run(backend_bin, work, mode, seconds):
    sock = os.path.join(work, f"{mode}.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    blog = open(os.path.join(work, f"backend-{mode}.log"), "w+")
    cmd = [backend_bin, "--socket-path", sock, "--queues", "2"]
    if mode == "rxonly":
        cmd.append("--source")
    backend = subprocess.Popen(cmd, stderr=blog, stdout=subprocess.DEVNULL)
    deadline = time.time() + 10
    while not os.path.exists(sock):
        if time.time() > deadline or backend.poll() is not None:
            return [f"{mode}: back-end did not start"]
        time.sleep(0.05)
    tp = subprocess.run(["timeout", "-s", "INT", str(seconds), "dpdk-testpmd", "--no-huge", "-m", "1024",
                         "--no-pci", "--single-file-segments", f"--file-prefix=vhostkit-{mode}-{os.getpid()}",
                         "--vdev", f"net_virtio_user0,path={sock},queues=1,queue_size={RING}", "-l", "0-1", "--",
                         f"--forward-mode={mode}", "--auto-start", "--stats-period", "1"],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = tp.stdout.decode(errors="replace")
    backend.send_signal(signal.SIGTERM)
    try:
        backend.wait(timeout=10)
    except subprocess.TimeoutExpired:
        backend.kill()
        return [f"{mode}: the back-end did not exit on SIGTERM"]
    blog.seek(0)
    log = blog.read()
    print(f"---- testpmd {mode} (tail) ----"); print(out[-1500:])
    print(f"---- back-end {mode} (tail) ----"); print(log[-800:])
    failures = []
    stats = re.search(r"STATS messages=\d+ rejected=(\d+) chains_q0=(\d+) bytes_q0=\d+ chains_q1=(\d+)", log)
    if not stats:
        return [f"{mode}: no STATS line from the back-end"]
    if int(stats.group(1)) != 0:
        failures.append(f"{mode}: the back-end refused {stats.group(1)} requests")
    # testpmd's final per-port totals.
    totals = re.findall(r"RX-packets: (\d+)\s+RX-dropped: \d+\s+RX-total: \d+", out)
    tx_totals = re.findall(r"TX-packets: (\d+)\s+TX-dropped: \d+\s+TX-total: \d+", out)
    if mode == "txonly":
        consumed = int(stats.group(3))
        sent = int(tx_totals[-1]) if tx_totals else -1
        print(f"{mode}: testpmd sent {sent}, vhostkit consumed {consumed}")
        # testpmd counts a packet as sent once it is on the available ring. When testpmd
        # stops, the back-end stops the ring (GET_VRING_BASE) without draining it, so at
        # most one ring of packets may stay unconsumed; nothing else may go missing.
        if consumed == 0 or not 0 <= sent - consumed <= RING:
            failures.append(f"{mode}: testpmd sent {sent} packets, vhostkit consumed {consumed}")
    else:
        produced = int(stats.group(2))
        received = int(totals[-1]) if totals else -1
        print(f"{mode}: vhostkit produced {produced}, testpmd received {received}")
        # Buffers filled after testpmd stopped polling are never counted by it.
        if received <= 0 or received > produced:
            failures.append(f"{mode}: vhostkit produced {produced} packets, testpmd received {received}")
    return failures


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", required=True)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--seconds", type=int, default=4)
    args = ap.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    ensure_testpmd()
    failures = run(args.backend, args.work_dir, "txonly", args.seconds)
    failures += run(args.backend, args.work_dir, "rxonly", args.seconds)
    if failures:
        print("FAIL: " + "; ".join(failures)); return 1
    print("PASS: DPDK virtio-user exchanged packets with vhostkit in both directions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
