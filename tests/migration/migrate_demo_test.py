#!/usr/bin/env python3
"""Runs apps/vhostkit-migrate against two sink_backend processes in source mode.

Without --fault: the demo must print a VERDICT line with pages_differing=0 and exit 0, and
carry the back-ends' device state: the destination's counters go on from the source's
(its chains_q0 at exit is at least the source's plus the frames the guest received from it).
With --fault N: the source back-end runs with VHOSTKIT_FAULT_DROP_LOG_ONE_IN=N in its
environment; the demo must report differing pages and exit non-zero (the proof can fail).
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import time


def start_backend(binary, sock, env):
    if os.path.exists(sock):
        os.unlink(sock)
    p = subprocess.Popen([binary, "--socket-path", sock, "--source"], env=env,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 10
    while not os.path.exists(sock):
        if p.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{binary} did not listen on {sock}: {p.stderr.read()}")
        time.sleep(0.02)
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", required=True)
    ap.add_argument("--backend", required=True)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--fault", type=int, default=0)
    ap.add_argument("demo_args", nargs="*")
    a = ap.parse_args()
    os.makedirs(a.work_dir, exist_ok=True)
    src_sock = os.path.join(a.work_dir, "source.sock")
    dst_sock = os.path.join(a.work_dir, "destination.sock")
    src_env = dict(os.environ)
    src_env.pop("VHOSTKIT_FAULT_DROP_LOG_ONE_IN", None)
    dst_env = dict(src_env)
    if a.fault:
        src_env["VHOSTKIT_FAULT_DROP_LOG_ONE_IN"] = str(a.fault)
    backends = [start_backend(a.backend, src_sock, src_env),
                start_backend(a.backend, dst_sock, dst_env)]
    try:
        cmd = [a.demo, "--source", src_sock, "--destination", dst_sock] + a.demo_args
        print("+", " ".join(cmd), flush=True)
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=300)
        print(r.stdout)
    finally:
        for p in backends:
            p.send_signal(signal.SIGTERM)
        stats = []
        for p in backends:
            try:
                _, err = p.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            sys.stdout.write("".join(l + "\n" for l in err.splitlines()[-3:]))
            s = re.search(r"^STATS .*\bchains_q0=(\d+)", err, re.M)
            stats.append(int(s.group(1)) if s else None)
    m = re.search(r"^VERDICT pages_compared=(\d+) pages_differing=(\d+) downtime_ms=([\d.]+)$",
                  r.stdout, re.M)
    if not m:
        print("FAIL: no VERDICT line")
        return 1
    compared, differing = int(m.group(1)), int(m.group(2))
    if compared == 0:
        print("FAIL: nothing compared")
        return 1
    if a.fault:
        if differing == 0 or r.returncode == 0:
            print(f"FAIL: with one log write in {a.fault} dropped the demo reported "
                  f"{differing} differing pages and exit status {r.returncode}")
            return 1
        print(f"PASS: the fault was caught ({differing} differing pages, exit {r.returncode})")
        return 0
    if differing != 0 or r.returncode != 0:
        print(f"FAIL: {differing} differing pages, exit status {r.returncode}")
        return 1
    d = re.search(r"^DEVICE_STATE carried=(\d) bytes=(\d+)$", r.stdout, re.M)
    after = re.search(r"^traffic: (\d+) frames on the destination", r.stdout, re.M)
    if not d or d.group(1) != "1" or int(d.group(2)) == 0:
        print("FAIL: the device state was not carried")
        return 1
    if None in stats or not after:
        print(f"FAIL: no counters (STATS {stats}) or destination traffic line")
        return 1
    source, destination, received = stats[0], stats[1], int(after.group(1))
    if destination < source + received:
        print(f"FAIL: the destination counted {destination} chains, less than the source's "
              f"{source} plus the {received} frames it delivered: its counters did not "
              f"continue from the source's")
        return 1
    print(f"PASS (device state {d.group(2)} bytes; chains: source {source}, destination "
          f"{destination})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
