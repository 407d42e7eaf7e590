#!/usr/bin/env python3
"""vhostkit-blk as a program: QEMU's back-end program conventions and clean lifecycle.

--print-capabilities prints JSON with type "block"; --help and --version exit 0; bad
arguments and start-up failures exit non-zero with one clear line on stderr; SIGTERM and
SIGINT end the daemon (idle, and with a front-end connected) within a second; a second
daemon on the same socket path is refused while the first one runs; --fd serves an
inherited listening socket.
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


def wait_for(path, proc, timeout=10):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline or proc.poll() is not None:
            return False
        time.sleep(0.02)
    return True


def stop_within(proc, sig, limit=1.0):
    t0 = time.time()
    proc.send_signal(sig)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False, None
    return time.time() - t0 <= limit, proc.returncode


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemon", required=True)
    args = ap.parse_args()
    d = args.daemon
    work = tempfile.mkdtemp(prefix="vhostkit-blk-daemon-")
    image = os.path.join(work, "disk.img")
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    sock = os.path.join(work, "blk.sock")

    r = subprocess.run([d, "--print-capabilities"], capture_output=True, text=True, timeout=10)
    check(r.returncode == 0, "--print-capabilities exits 0")
    try:
        caps = json.loads(r.stdout)
        check(caps.get("type") == "block", "capabilities type is block")
        check("read-only" in caps.get("features", []) and "blk-file" in caps["features"],
              "capabilities list read-only and blk-file")
    except json.JSONDecodeError:
        check(False, "capabilities parse as JSON: " + r.stdout)

    for opt in ("--help", "--version"):
        r = subprocess.run([d, opt], capture_output=True, text=True, timeout=10)
        check(r.returncode == 0 and r.stdout.strip() != "", f"{opt} exits 0 and prints")

    bad = [
        ["--bogus"],
        ["--socket-path", sock],  # no --blk-file
        ["--blk-file", image],  # no socket
        ["--socket-path", sock, "--fd", "3", "--blk-file", image],
        ["--socket-path", sock, "--blk-file", image, "--num-queues", "0"],
        ["--socket-path", sock, "--blk-file", image, "--num-queues", "two"],
        ["--socket-path", sock, "--blk-file", image, "--num-queues", "65"],
        ["--socket-path", sock, "--blk-file", image, "--queues", "2"],  # the old spelling
        ["--socket-path", sock, "--blk-file", image, "--num-queues", "2", "--workers", "3"],
        ["--socket-path", sock, "--blk-file", image, "--workers", "0"],
        ["--socket-path", sock, "--blk-file", image, "--direct", "yes"],
        ["--socket-path", sock, "--blk-file", image, "--cache", "none"],
        ["--socket-path", sock, "--blk-file", image, "--logical-block-size", "1000"],
        ["--socket-path", sock, "--blk-file", image, "--logical-block-size", "8192"],
        ["--socket-path", sock, "--blk-file", image, "--physical-block-size", "3000"],
        ["--socket-path", sock, "--blk-file", image, "--logical-block-size", "4096",
         "--physical-block-size", "512"],
        ["--socket-path", sock, "--blk-file", image, "--log-level", "loud"],
        ["--socket-path", sock, "--blk-file", image, "--engine", "aio"],
        ["--socket-path", sock, "--blk-file", os.path.join(work, "missing.img")],
        ["--socket-path", sock, "--blk-file", "/dev/null"],
        ["--fd", "1000", "--blk-file", image],
        ["--socket-path", sock, "--blk-file"],
    ]
    for argv in bad:
        r = subprocess.run([d] + argv, capture_output=True, text=True, timeout=10)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        check(r.returncode != 0 and len(lines) == 1 and "vhostkit-blk" in lines[0],
              f"bad args {argv[-2:]} -> exit {r.returncode}, message {lines}")
    check(not os.path.exists(sock), "no socket left behind by failed starts")

    for sig in (signal.SIGTERM, signal.SIGINT):
        p = subprocess.Popen([d, "--socket-path", sock, "--blk-file", image],
                             stderr=subprocess.PIPE, text=True)
        check(wait_for(sock, p), "daemon creates its socket")
        # A second daemon on the same path is refused while the first runs.
        r = subprocess.run([d, "--socket-path", sock, "--blk-file", image],
                           capture_output=True, text=True, timeout=10)
        check(r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1,
              f"second daemon refused: exit {r.returncode}, {r.stderr.strip()}")
        check(os.path.exists(sock), "the first daemon's socket survives the refused one")
        # With a front-end connected (idle connection) the signal still ends it promptly.
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(sock)
        time.sleep(0.1)
        fast, rc = stop_within(p, sig)
        c.close()
        check(fast and rc == 0, f"{signal.Signals(sig).name} -> exit {rc} within 1 s")
        check(not os.path.exists(sock), "socket removed on exit")

    # --fd: an inherited listening socket.
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(sock)
    ls.listen(1)
    p = subprocess.Popen([d, "--fd", str(ls.fileno()), "--blk-file", image, "--read-only"],
                         pass_fds=[ls.fileno()], stderr=subprocess.PIPE, text=True)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(sock)
    # VHOST_USER_GET_FEATURES: request 1, flags 1 (version), size 0.
    c.sendall((1).to_bytes(4, "little") + (1).to_bytes(4, "little") + (0).to_bytes(4, "little"))
    c.settimeout(5)
    reply = c.recv(20)
    check(len(reply) == 20 and int.from_bytes(reply[12:20], "little") & (1 << 5),
          "--fd serves the inherited socket; GET_FEATURES offers VIRTIO_BLK_F_RO with --read-only")
    c.close()
    fast, rc = stop_within(p, signal.SIGTERM)
    check(fast and rc == 0, f"--fd daemon exits {rc} on SIGTERM within 1 s")
    ls.close()

    # Every block option at once: the daemon starts, says what it serves, and offers the
    # queues asked for (VHOST_USER_GET_QUEUE_NUM, request 17).
    if os.path.exists(sock):
        os.unlink(sock)  # the --fd check's socket file
    p = subprocess.Popen([d, "--socket-path", sock, "--blk-file", image, "--num-queues", "3",
                          "--workers", "2", "--direct", "on", "--cache", "writethrough",
                          "--logical-block-size", "4096", "--physical-block-size", "8192",
                          "--serial", "vhostkit-daemon-test"], stderr=subprocess.PIPE, text=True)
    check(wait_for(sock, p), "daemon with every block option creates its socket")
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(sock)
    c.sendall((17).to_bytes(4, "little") + (1).to_bytes(4, "little") + (0).to_bytes(4, "little"))
    c.settimeout(5)
    reply = c.recv(20)
    check(len(reply) == 20 and int.from_bytes(reply[12:20], "little") == 3,
          "--num-queues 3: GET_QUEUE_NUM says 3")
    c.close()
    fast, rc = stop_within(p, signal.SIGTERM)
    err = p.stderr.read()
    check(fast and rc == 0, f"daemon with every block option exits {rc} on SIGTERM")
    check("3 queue(s) on 2 worker(s)" in err and "writethrough, O_DIRECT" in err and
          "blocks 4096/8192" in err, "the start-up line names the options: " + err[:400])

    os.unlink(image)
    if os.path.exists(sock):
        os.unlink(sock)
    os.rmdir(work)
    if failures:
        print(f"FAIL: {len(failures)} check(s) failed")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
