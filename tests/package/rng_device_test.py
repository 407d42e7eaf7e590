#!/usr/bin/env python3
"""vhostkit-rng (examples/vhostkit-rng, built out of tree against the installed vhostkit)
as a program: QEMU's back-end conventions, and the device driven by our front-end
(rng_frontend_check) with ordinary and hostile requests, split and packed, with and
without the IOMMU. The daemon must survive a request that breaks its queue, serve the
next connection, log every connection, and exit 0 on SIGTERM with its counters.

Usage: rng_device_test.py --daemon PATH --tool PATH --work-dir DIR
"""
import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support"))
from qemu_guest import read_text, start_backend, stop_backend  # noqa: E402

failures = []


def check(ok, what):
    print(("PASS: " if ok else "FAIL: ") + what)
    if not ok:
        failures.append(what)


def run(cmd, **kw):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=30, **kw)


def conventions(daemon, work):
    r = run([daemon, "--print-capabilities"])
    caps = json.loads(r.stdout) if r.returncode == 0 else {}
    check(caps == {"type": "rng"}, f"--print-capabilities prints {{\"type\": \"rng\"}} ({r.stdout!r})")
    r = run([daemon, "--help"])
    check(r.returncode == 0 and "--socket-path" in r.stdout, "--help exits 0 with the usage")
    r = run([daemon, "--version"])
    check(r.returncode == 0 and "0.2.0" in r.stdout, f"--version: {r.stdout.strip()}")
    for args, what in ((["--bogus"], "an unknown option"), ([], "neither --socket-path nor --fd"),
                       (["--socket-path", "a", "--fd", "3"], "both --socket-path and --fd"),
                       (["--fd", "x"], "a malformed --fd"),
                       (["--socket-path", "a", "--log-level", "loud"], "a bad --log-level")):
        r = run([daemon] + args)
        check(r.returncode == 2 and r.stderr.startswith("vhostkit-rng: "),
              f"{what} exits 2 with a message ({r.stderr.strip().splitlines()[:1]})")
    r = run([daemon, "--socket-path", os.path.join(work, "x.sock"), "--source", "/nonexistent"])
    check(r.returncode == 1 and "/nonexistent" in r.stderr,
          f"a missing entropy source exits 1 naming it ({r.stderr.strip()})")
    with open(os.path.join(work, "file"), "w") as f:
        r = run([daemon, "--fd", str(f.fileno())], pass_fds=(f.fileno(),))
    check(r.returncode == 1 and "not a stream socket" in r.stderr,
          f"--fd of a regular file exits 1 ({r.stderr.strip()})")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    r = run([daemon, "--fd", str(s.fileno())], pass_fds=(s.fileno(),))
    s.close()
    check(r.returncode == 1 and "not listening" in r.stderr,
          f"--fd of a socket that does not listen exits 1 ({r.stderr.strip()})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemon", required=True)
    ap.add_argument("--tool", required=True)
    ap.add_argument("--work-dir", required=True)
    a = ap.parse_args()
    os.makedirs(a.work_dir, exist_ok=True)
    conventions(a.daemon, a.work_dir)

    sock = os.path.join(a.work_dir, f"rng-{os.getpid()}.sock")
    log = open(os.path.join(a.work_dir, "daemon.log"), "w+")
    p = start_backend([a.daemon, "--socket-path", sock], sock, log)
    connections = 0
    for variant in ([], ["--packed"], ["--iommu"], ["--iommu", "--packed"]):
        r = run([a.tool, "--socket", sock] + variant)
        connections += 1
        print(r.stdout + r.stderr)
        check(r.returncode == 0, f"rng_frontend_check {' '.join(variant)} passes")
    r = run([a.tool, "--socket", sock, "--bad-address"])
    connections += 1
    print(r.stdout + r.stderr)
    check(r.returncode == 0, "a buffer outside guest memory gets no completion")
    time.sleep(0.2)
    check(p.poll() is None, "the daemon survives a hostile buffer")
    r = run([a.tool, "--socket", sock])
    connections += 1
    check(r.returncode == 0, "the next connection is served normally")
    stop_s = stop_backend(p)
    check(stop_s is not None and stop_s < 1.0 and p.returncode == 0,
          f"SIGTERM: exit {p.returncode} after {stop_s} s")
    text = read_text(log.name)
    print("---- daemon log (tail) ----")
    print(text[-3000:])
    check(text.count("front-end connected") == connections,
          f"one 'front-end connected' line per connection ({connections})")
    check(re.search(r"rng0: queue 0 broken: .*", text) is not None,
          "the broken queue is logged with the device name")
    check("has no device-writable buffer" in text, "a read-only chain is logged")
    m = re.search(r"STATS requests=(\d+) bytes=(\d+) unwritable=(\d+) source_errors=(\d+)", text)
    check(m is not None, "the daemon prints its counters at exit")
    if m:
        requests, nbytes, unwritable, errors = map(int, m.groups())
        # Per good run: 1 + 1 + 1 + 1 + 1 + 64 requests; 4096 * 2 + 200 + 65536 + 64 * 256 bytes.
        good_runs = 5
        check(requests == good_runs * 69, f"requests={requests}, expected {good_runs * 69}")
        check(nbytes == good_runs * (4096 * 2 + 200 + 65536 + 64 * 256),
              f"bytes={nbytes} matches what the front-end received")
        check(unwritable == good_runs, f"unwritable={unwritable} (one per run)")
        check(errors == 0, "no entropy source errors")
    check(not os.path.exists(sock), "the socket file is removed at exit")
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print("PASS: vhostkit-rng follows the conventions and handles hostile requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
