#!/usr/bin/env python3
"""The systemd units of the installed prefix, without systemd as PID 1:
- systemd-analyze verify checks the four units (vhostkit-{blk,net}@.{socket,service}),
  including that ExecStart's binary and the Documentation= man pages exist; any output
  fails the test.
- systemd-socket-activate runs each daemon the way systemd would: it listens on the
  socket, and on the first connection starts the unit's ExecStart (variables expanded
  from an EnvironmentFile written here) with the socket as fd 3 and LISTEN_FDS=1,
  LISTEN_PID. The test then speaks vhost-user (GET_FEATURES) over two connections and
  stops the daemon with SIGTERM (exit 0).
- Misuse is refused with a clear error: two sockets (LISTEN_FDS=2), or --fd naming
  another fd than the one passed.

Usage: socket_activation_test.py --prefix DIR --work-dir DIR
"""
import argparse
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

failures = []
VIRTIO_F_VERSION_1 = 1 << 32


def check(ok, what):
    print(("PASS: " if ok else "FAIL: ") + what)
    if not ok:
        failures.append(what)
    return ok


def unit_value(text, key):
    m = re.search(r"^" + key + r"=(.*)$", text, re.M)
    return m.group(1) if m else None


def expand(command, env):
    """systemd's ExecStart expansion: ${VAR} is one word, $VAR splits on whitespace."""
    words = []
    for word in shlex.split(command):
        m = re.fullmatch(r"\$\{(\w+)\}", word)
        if m:
            words.append(env.get(m.group(1), ""))
            continue
        m = re.fullmatch(r"\$(\w+)", word)
        if m:
            words.extend(env.get(m.group(1), "").split())
            continue
        words.append(word)
    return words


def read_env_file(path):
    env = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                k, v = line.split("=", 1)
                env[k] = v
    return env


def get_features(path, timeout=20):
    """Connects to the vhost-user socket and sends GET_FEATURES; returns the features."""
    deadline = time.time() + timeout
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    while True:
        try:
            s.connect(path)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)
    s.settimeout(timeout)
    s.sendall(struct.pack("<III", 1, 1, 0))  # request 1, version 1, no payload
    data = b""
    while len(data) < 20:
        chunk = s.recv(20 - len(data))
        if not chunk:
            raise RuntimeError("connection closed before the reply")
        data += chunk
    s.close()
    req, flags, size = struct.unpack("<III", data[:12])
    if req != 1 or not flags & 4 or size != 8:
        raise RuntimeError(f"unexpected reply header {req} {flags:#x} {size}")
    return struct.unpack("<Q", data[12:])[0]


def activate(sockets, argv, log):
    """systemd-socket-activate listening on `sockets`, running argv on first connection."""
    cmd = ["systemd-socket-activate"]
    for s in sockets:
        if os.path.exists(s):
            os.unlink(s)
        cmd += ["-l", s]
    p = subprocess.Popen(cmd + ["--"] + argv, stdout=log, stderr=log)
    deadline = time.time() + 10
    while not all(os.path.exists(s) for s in sockets):
        if time.time() > deadline or p.poll() is not None:
            raise RuntimeError("systemd-socket-activate did not listen")
        time.sleep(0.05)
    return p


def serve_test(name, unit_text, env, work):
    argv = expand(unit_value(unit_text, "ExecStart"), env)
    print(f"{name}: ExecStart expands to {argv}")
    sock = os.path.join(work, f"{name}-{os.getpid()}.sock")
    log_path = os.path.join(work, f"{name}.log")
    with open(log_path, "w") as log:
        p = activate([sock], argv, log)
        try:
            f1 = get_features(sock)
            f2 = get_features(sock)
            check(f1 & VIRTIO_F_VERSION_1 and f1 == f2,
                  f"{name}: the activated daemon answers GET_FEATURES on two connections")
        except (OSError, RuntimeError) as e:
            check(False, f"{name}: vhost-user over the activated socket: {e}")
        time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
    with open(log_path) as f:
        text = f.read()
    print(text[-2000:])
    check(rc == 0, f"{name}: exits 0 on SIGTERM (got {rc})")
    check("fd 3" in text, f"{name}: serves the socket passed as fd 3")


def refused_test(name, sockets, argv, expect, work):
    log_path = os.path.join(work, f"{name}.log")
    with open(log_path, "w") as log:
        p = activate(sockets, argv, log)
        try:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(sockets[0])  # the first connection starts the daemon
            c.close()
        except OSError:
            pass
        try:
            rc = p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = None
    with open(log_path) as f:
        text = f.read()
    check(rc == 1 and expect in text, f"{name}: refused with exit 1 and '{expect}' "
          f"(exit {rc}: {text.strip().splitlines()[-1:] if text.strip() else ''})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--work-dir", required=True)
    a = ap.parse_args()
    if shutil.which("systemd-socket-activate") is None:  # scripts/setup.sh installs it
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "systemd"],
                       env=env, check=True)
    work = a.work_dir
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    unit_dir = os.path.join(a.prefix, "lib/systemd/system")
    units = [os.path.join(unit_dir, u) for u in ("vhostkit-blk@.socket", "vhostkit-blk@.service",
                                                  "vhostkit-net@.socket", "vhostkit-net@.service")]
    r = subprocess.run(["systemd-analyze", "verify"] + units, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True,
                       env=dict(os.environ, MANPATH=os.path.join(a.prefix, "share/man")))
    check(r.returncode == 0 and r.stdout.strip() == "",
          f"systemd-analyze verify accepts the units {r.stdout.strip()}")

    with open(units[1]) as f:
        blk_unit = f.read()
    env_file = unit_value(blk_unit, "EnvironmentFile")
    check(env_file == os.path.join(a.prefix, "etc/vhostkit/blk-%i.conf"),
          f"vhostkit-blk@.service reads the instance's configuration ({env_file})")
    image = os.path.join(work, "disk.img")
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    conf = os.path.join(work, "blk-test.conf")
    with open(conf, "w") as f:
        f.write(f"# as in share/doc/vhostkit/examples/blk-example.conf\nBLK_FILE={image}\n"
                "BLK_OPTIONS=--num-queues 2 --read-only\n")
    serve_test("blk", blk_unit, read_env_file(conf), work)
    with open(units[3]) as f:
        net_unit = f.read()
    serve_test("net", net_unit, {}, work)  # no net-NAME.conf: the default (loopback)

    blk = expand(unit_value(blk_unit, "ExecStart"), read_env_file(conf))
    two = [os.path.join(work, f"two-{i}-{os.getpid()}.sock") for i in (1, 2)]
    refused_test("blk-two-sockets", two, blk, "passed 2 sockets", work)
    other_fd = [w if w != "3" else "4" for w in blk]
    refused_test("blk-wrong-fd", [os.path.join(work, f"one-{os.getpid()}.sock")], other_fd,
                 "use --fd 3", work)
    net = expand(unit_value(net_unit, "ExecStart"), {})
    refused_test("net-two-sockets", [os.path.join(work, f"two-n-{i}-{os.getpid()}.sock")
                                     for i in (1, 2)], net, "passed 2 sockets", work)
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print("PASS: the systemd units verify and the daemons run socket-activated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
