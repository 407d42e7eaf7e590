#!/usr/bin/env python3
"""vhostkit-net as a program: QEMU's back-end program conventions and our own promises.

  --print-capabilities prints JSON naming the type "net" and exits 0;
  --version and --help exit 0;
  bad arguments exit non-zero with a one-line message on stderr;
  SIGTERM and SIGINT end a listening daemon within a second, exit status 0, socket removed;
  a second daemon on the same socket path is refused while the first one lives;
  --fd serves an inherited listening socket;
  tap mode without a tap name, or with an impossible one, fails at start-up.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


def wait_for(path, proc, seconds=10):
    deadline = time.time() + seconds
    while not os.path.exists(path):
        if time.time() > deadline or proc.poll() is not None:
            return False
        time.sleep(0.02)
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemon", required=True)
    args = ap.parse_args()
    d = args.daemon
    work = tempfile.mkdtemp(prefix="vhostkit-net-daemon-")

    r = subprocess.run([d, "--print-capabilities"], capture_output=True, text=True)
    try:
        caps = json.loads(r.stdout)
    except ValueError:
        caps = None
    check(r.returncode == 0 and isinstance(caps, dict) and caps.get("type") == "net",
          f"--print-capabilities prints JSON with type net: {r.stdout.strip()!r}")
    r = subprocess.run([d, "--version"], capture_output=True, text=True)
    check(r.returncode == 0 and "vhostkit-net" in r.stdout, "--version")
    r = subprocess.run([d, "--help"], capture_output=True, text=True)
    check(r.returncode == 0 and "--socket-path" in r.stdout, "--help lists the options")

    bad = [
        ([], "neither --socket-path nor --fd"),
        (["--socket-path", "x", "--fd", "3"], "both --socket-path and --fd"),
        (["--socket-path", "x", "--mode", "bridge"], "unknown mode"),
        (["--socket-path", "x", "--queues", "0"], "zero queue pairs"),
        (["--socket-path", "x", "--mac", "52:54:00"], "bad MAC"),
        (["--socket-path", "x", "--packet-size", "10", "--mode", "source"], "tiny packet size"),
        (["--socket-path", "x", "--mode", "tap"], "tap mode without --tap"),
        (["--socket-path", "x", "--iotlb-entries", "0"], "an IOTLB of no entries"),
        (["--socket-path", "x", "--iotlb-entries", "4194305"], "an IOTLB above 2^22 entries"),
        (["--socket-path", "x", "--sink-read"], "--sink-read outside sink mode"),
        (["--socket-path", "x", "--frobnicate"], "unknown option"),
        (["--socket-path", os.path.join(work, "no/such/dir/s.sock")], "socket in a missing dir"),
    ]
    for argv, what in bad:
        r = subprocess.run([d] + argv, capture_output=True, text=True, timeout=10)
        msg = r.stderr.strip().splitlines()
        check(r.returncode != 0 and msg and msg[0].startswith("vhostkit-net:"),
              f"bad arguments ({what}) exit {r.returncode} with: {msg[0] if msg else ''!r}")

    for sig in (signal.SIGTERM, signal.SIGINT):
        sock = os.path.join(work, f"net-{int(sig)}.sock")
        p = subprocess.Popen([d, "--socket-path", sock], stderr=subprocess.PIPE, text=True)
        check(wait_for(sock, p), f"daemon listens on {sock}")
        # A second daemon on the same path is refused, and the first keeps its socket.
        r = subprocess.run([d, "--socket-path", sock], capture_output=True, text=True, timeout=10)
        check(r.returncode != 0 and "already listening" in r.stderr,
              f"a second daemon on the same path is refused: {r.stderr.strip()!r}")
        c = socket.socket(socket.AF_UNIX)
        try:
            c.connect(sock)
            connected = True
        except OSError:
            connected = False
        c.close()
        check(connected, "the first daemon still accepts connections")
        t0 = time.time()
        p.send_signal(sig)
        try:
            rc = p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = None
        took = time.time() - t0
        check(rc == 0 and took < 1.0, f"{sig.name} ends the daemon in {took:.2f} s with status {rc}")
        check(not os.path.exists(sock), "the socket file is removed on exit")
        err = p.stderr.read()
        check("STATS " in err, "the daemon prints its counters on exit")

    # --fd: an inherited listening socket.
    path = os.path.join(work, "fd.sock")
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(path)
    ls.listen(1)
    fd = ls.fileno()
    os.set_inheritable(fd, True)
    p = subprocess.Popen([d, "--fd", str(fd)], pass_fds=(fd,), stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(5)
    c.connect(path)
    # GET_FEATURES (request 1), flags 0x1 (version 1), size 0: the reply carries a u64.
    c.sendall((1).to_bytes(4, "little") + (1).to_bytes(4, "little") + (0).to_bytes(4, "little"))
    reply = b""
    while len(reply) < 20:
        chunk = c.recv(20 - len(reply))
        if not chunk:
            break
        reply += chunk
    c.close()
    features = int.from_bytes(reply[12:20], "little") if len(reply) == 20 else 0
    check(len(reply) == 20 and features & (1 << 32),
          f"--fd: the inherited socket answers GET_FEATURES ({features:#x})")
    p.send_signal(signal.SIGTERM)
    check(p.wait(timeout=5) == 0, "--fd daemon exits 0 on SIGTERM")
    r = subprocess.run([d, "--fd", "0"], capture_output=True, text=True, stdin=subprocess.PIPE,
                       timeout=10)
    check(r.returncode != 0, "--fd of something that is not a socket fails")

    if os.geteuid() == 0:
        r = subprocess.run([d, "--socket-path", os.path.join(work, "t.sock"), "--mode", "tap",
                            "--tap", "y" * 16], capture_output=True, text=True, timeout=10)
        check(r.returncode != 0 and "longer" in r.stderr, "an over-long tap name is refused")

    if failures:
        print(f"FAIL: {len(failures)} check(s) failed")
        return 1
    print("PASS: vhostkit-net follows the back-end program conventions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
