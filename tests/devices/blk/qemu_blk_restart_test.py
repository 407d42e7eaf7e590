#!/usr/bin/env python3
"""vhostkit-blk killed (SIGKILL) and started again under a running QEMU guest.

QEMU (Debian's qemu-system-x86, TCG) connects to vhostkit-blk with
`-chardev socket,...,reconnect=1` and `vhost-user-blk-pci`. The guest writes a pattern
of its own (1 MiB, O_DIRECT) to one of 8 slots of the disk, reads it back (O_DIRECT) and
compares, round after round, until the host puts a stop mark in the image. Meanwhile the
host kills vhostkit-blk with SIGKILL at random moments (--restarts times), each time while
the guest's I/O runs, and starts a new one on the same socket path at once; QEMU
reconnects, sends the inflight area back (SET_INFLIGHT_FD), and the new back-end carries
out the requests its predecessor left in flight. The guest must see no I/O error and no
mismatch; at the end it reads every slot back and checks each holds its last pattern,
and the host checks the image file the same way.
Prints the restart count, how many requests the back-ends resubmitted, and the longest
time from a kill to the guest's next completed round.
"""
import argparse
import os
import random
import re
import signal
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "support"))
from qemu_guest import (Guest, console_args, device_args, machine_args, read_text,  # noqa: E402
                        start_backend, stop_backend, wait_for)

MIB = 1 << 20
IMAGE_BYTES = 16 * MIB
SLOTS = 8
STOP_AT = 12 * MIB  # the host writes STOP_MARK here when it is done
STOP_MARK = b"VHOSTKIT-STOP"
GUEST_SCRIPT = """#!/bin/sh
d=/dev/vda
i=0
while :; do
  slot=$((i %% %(slots)d))
  yes "vhostkit restart round $i" | head -c 1048576 > /tmp/p
  if ! dd if=/tmp/p of=$d bs=65536 seek=$((slot * 16)) oflag=direct 2>/tmp/err; then
    echo "GUEST-IO-ERROR write $i $(head -n1 /tmp/err | tr ' ' _)"
  fi
  if ! dd if=$d of=/tmp/b bs=65536 skip=$((slot * 16)) count=16 iflag=direct 2>/tmp/err; then
    echo "GUEST-IO-ERROR read $i $(head -n1 /tmp/err | tr ' ' _)"
  fi
  if cmp -s /tmp/p /tmp/b; then echo "GUEST-ROUND $i OK"; else echo "GUEST-ROUND $i BAD"; fi
  eval "last_$slot=$i"
  i=$((i + 1))
  if dd if=$d bs=512 skip=%(stop_sector)d count=1 iflag=direct 2>/dev/null | grep -q %(mark)s; then
    break
  fi
done
# Every slot holds the pattern of the last round that wrote it.
bad=0
s=0
while [ $s -lt %(slots)d ]; do
  eval "r=\\$last_$s"
  if [ -n "$r" ]; then
    yes "vhostkit restart round $r" | head -c 1048576 > /tmp/p
    dd if=$d of=/tmp/b bs=65536 skip=$((s * 16)) count=16 iflag=direct 2>/dev/null
    cmp -s /tmp/p /tmp/b || { bad=1; echo "GUEST-FINAL-BAD slot $s round $r"; }
    echo "GUEST-SLOT $s $r"
  fi
  s=$((s + 1))
done
[ $bad = 0 ] && echo GUEST-FINAL-OK
dmesg | grep -i -E "I/O error|blk_update_request|timed out" | head -n 5 | sed 's/^/GUEST-DMESG /'
echo "GUEST-ROUNDS $i"
""" % {"slots": SLOTS, "stop_sector": STOP_AT // 512, "mark": STOP_MARK.decode()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemon", required=True)
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--restarts", type=int, default=20)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    print(f"seed {seed}")
    os.makedirs(args.work_dir, exist_ok=True)
    guest = Guest(args.source_dir, args.work_dir, GUEST_SCRIPT)
    image = os.path.join(args.work_dir, "disk.img")
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    sock = os.path.join(args.work_dir, "blk.sock")
    serial = os.path.join(args.work_dir, "serial.txt")
    if os.path.exists(serial):
        os.unlink(serial)
    log = open(os.path.join(args.work_dir, "backend.log"), "w+")
    cmd = [args.daemon, "--socket-path", sock, "--blk-file", image, "--num-queues", "1",
           "--log-level", "debug"]
    backend = start_backend(cmd, sock, log)
    qemu_cmd = machine_args("256M") + console_args(serial) + [
        "-chardev", f"socket,id=vu,path={sock},reconnect=1"]
    qemu_cmd += device_args("vhost-user-blk-pci,chardev=vu,num-queues=1,disable-legacy=on")
    qemu_cmd += guest.boot_args()
    qemu = subprocess.Popen(qemu_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    failures = []
    restarts = 0
    worst_stall = 0.0
    try:
        wait_for(lambda: "GUEST-ROUND 1 " in read_text(serial) or qemu.poll() is not None, 180,
                 "the guest's first rounds")
        for _ in range(args.restarts):
            if qemu.poll() is not None:
                failures.append("QEMU exited during the restarts")
                break
            rounds_before = read_text(serial).count("GUEST-ROUND")
            env = None
            if restarts % 2 == 0:
                # A random moment within a round (a round takes a fraction of a second);
                # the next back-end will kill itself inside one of the requests.
                time.sleep(rng.uniform(0.05, 0.6))
                backend.kill()
                backend.wait()
                env = dict(os.environ,
                           VHOSTKIT_TEST_CRASH=f"{rng.randrange(5)}:{rng.randint(1, 60)}")
            else:
                backend.wait(timeout=60)
            t_kill = time.time()
            if env is not None:
                log.write(f"test: next back-end with VHOSTKIT_TEST_CRASH={env['VHOSTKIT_TEST_CRASH']}\n")
                log.flush()
            backend = start_backend(cmd, sock, log, env=env)
            restarts += 1
            if env is not None:
                continue
            # The guest completes a round again: its I/O came back.
            wait_for(lambda: read_text(serial).count("GUEST-ROUND") > rounds_before + 1 or
                     qemu.poll() is not None, 60, "the guest's next round after a restart")
            worst_stall = max(worst_stall, time.time() - t_kill)
        with open(image, "r+b") as f:
            f.seek(STOP_AT)
            f.write(STOP_MARK)
        qemu.wait(timeout=120)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        failures.append(str(e))
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
        stop_backend(backend)
    out = read_text(serial)
    log.seek(0)
    blog = log.read()
    print("---- guest (tail) ----")
    print(out[-2500:])
    resubmitted = sum(int(n) for n in re.findall(r"resubmits (\d+) requests", blog))
    rounds = re.search(r"GUEST-ROUNDS (\d+)", out)
    print(f"restarts {restarts}, guest rounds {rounds.group(1) if rounds else '?'}, "
          f"requests resubmitted by a new back-end {resubmitted}, "
          f"longest time from a self-kill to the guest's next round {worst_stall:.2f} s")
    if restarts != args.restarts:
        failures.append(f"{restarts} restarts of {args.restarts}")
    if "VHOSTKIT-TEST-EXIT" not in out:
        failures.append("the guest did not finish its script")
    for bad in ("GUEST-IO-ERROR", "BAD", "GUEST-DMESG"):
        if bad in out:
            failures.append(f"the guest printed {bad}")
    if "GUEST-FINAL-OK" not in out:
        failures.append("the guest's final read of every slot did not verify")
    # The host's view: each slot holds its last round's pattern.
    with open(image, "rb") as f:
        data = f.read()
    for slot, r in re.findall(r"GUEST-SLOT (\d+) (\d+)", out):
        want = (f"vhostkit restart round {r}\n".encode() * (MIB // 20 + 1))[:MIB]
        at = int(slot) * MIB
        if data[at:at + MIB] != want:
            failures.append(f"image slot {slot} does not hold round {r}")
    if failures:
        print("FAIL: " + "; ".join(failures))
        print("---- back-end log (tail) ----")
        print(blog[-3000:])
        return 1
    print("PASS: no I/O error and every slot verified across the restarts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
