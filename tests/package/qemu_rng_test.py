#!/usr/bin/env python3
"""QEMU 7.2 (TCG) boots the tiny guest with -device vhost-user-rng-pci served by
vhostkit-rng, the example device built out of tree against the installed vhostkit
(examples/vhostkit-rng). The guest checks that virtio_rng is the current hardware RNG and
reads 64 KiB from /dev/hwrng; the host checks the bytes look random (every byte value
occurs, no long run of one value), that the back-end served at least what the guest read
and no more than the guest kernel's own reads explain, and that the back-end exits 0 on
SIGTERM. --iommu puts the device behind the vIOMMU (qemu_guest.device_args): the
back-end then learns every buffer's translation through IOTLB misses.

Usage: qemu_rng_test.py --daemon PATH --source-dir DIR --work-dir DIR [--iommu]
"""
import argparse
import os
import re
import subprocess
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support"))
from qemu_guest import (Guest, console_args, device_args, machine_args, read_text,  # noqa: E402
                        start_backend, stop_backend)

READ_BYTES = 64 * 1024
# The guest kernel reads the device itself too: when the RNG is registered (early
# randomness) and, until it is stopped below, from the hwrng fill thread. Bytes the
# back-end may serve beyond what the test reads.
KERNEL_SLACK = 16 * 1024

GUEST_SCRIPT = f"""#!/bin/sh
echo "GUEST-RNG-CURRENT $(cat /sys/class/misc/hw_random/rng_current 2>&1)"
head -c {READ_BYTES} /dev/hwrng > /tmp/r || echo GUEST-RNG-READ-FAILED
echo "GUEST-RNG-BYTES $(wc -c < /tmp/r)"
echo "GUEST-RNG-MD5 $(md5sum < /tmp/r | cut -d' ' -f1)"
echo "GUEST-RNG-DISTINCT $(od -An -v -tu1 /tmp/r | tr -s ' ' '\\n' | grep -v '^$' | sort -un | wc -l)"
echo "GUEST-RNG-MAXRUN $(od -An -v -tx1 /tmp/r | tr -s ' ' '\\n' | grep -v '^$' | uniq -c | sort -rn | head -n1 | tr -s ' ' | cut -d' ' -f2)"
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemon", required=True)
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--iommu", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.work_dir, exist_ok=True)
    guest = Guest(a.source_dir, a.work_dir, GUEST_SCRIPT)

    sock = os.path.join(a.work_dir, f"rng-{os.getpid()}.sock")
    log = open(os.path.join(a.work_dir, "backend.log"), "w+")
    backend = start_backend([a.daemon, "--socket-path", sock, "--log-level", "debug"], sock, log)

    # hw_random's fill thread would keep reading the device to feed the kernel's entropy
    # pool; rng_core.default_quality=0 keeps it off (it only reads on behalf of users).
    qemu = machine_args("256M") + console_args() + ["-chardev", f"socket,id=rng,path={sock}"]
    qemu += device_args("vhost-user-rng-pci,chardev=rng", a.iommu)
    qemu += guest.boot_args(a.iommu, extra_cmdline="rng_core.default_quality=0")
    out = ""
    for attempt in range(2):
        try:
            r = subprocess.run(qemu, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
            out = r.stdout.decode(errors="replace")
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace")
            print("QEMU timed out")
        # Another job's clean-up on a shared machine may signal every QEMU: boot again once
        # if that happened before the guest ran its script.
        if "terminating on signal" in out and "VHOSTKIT-GUEST-UP" not in out:
            print("QEMU was killed from outside before the guest came up; booting again")
            continue
        break
    stop_s = stop_backend(backend)
    text = read_text(log.name)
    print("---- guest ----")
    print(out[-3000:])
    print("---- back-end (tail) ----")
    print(text[-3000:])

    failures = []

    def guest(key):
        m = re.search(key + r" (\S+)", out)
        return m.group(1) if m else None

    if "VHOSTKIT-TEST-EXIT 0" not in out:
        failures.append("the guest did not finish its script")
    if guest("GUEST-RNG-CURRENT") is None or "virtio_rng" not in guest("GUEST-RNG-CURRENT"):
        failures.append(f"the guest's current hwrng is {guest('GUEST-RNG-CURRENT')}, not virtio_rng")
    if "GUEST-RNG-READ-FAILED" in out:
        failures.append("reading /dev/hwrng failed in the guest")
    if guest("GUEST-RNG-BYTES") != str(READ_BYTES):
        failures.append(f"the guest read {guest('GUEST-RNG-BYTES')} bytes, not {READ_BYTES}")
    distinct = int(guest("GUEST-RNG-DISTINCT") or 0)
    if distinct != 256:
        failures.append(f"only {distinct} of 256 byte values occur in 64 KiB")
    max_run = int(guest("GUEST-RNG-MAXRUN") or 0)
    if max_run == 0 or max_run > 8:
        failures.append(f"a run of {max_run} equal bytes (random data has none over 8)")
    m = re.search(r"STATS requests=(\d+) bytes=(\d+) unwritable=(\d+) source_errors=(\d+)", text)
    if not m:
        failures.append("no counters from the back-end")
    else:
        requests, served, unwritable, errors = map(int, m.groups())
        print(f"back-end: {requests} requests, {served} bytes; the guest read {READ_BYTES}")
        if not READ_BYTES <= served <= READ_BYTES + KERNEL_SLACK:
            failures.append(f"the back-end served {served} bytes for {READ_BYTES} read "
                            f"(allowed: up to {KERNEL_SLACK} more)")
        if unwritable or errors:
            failures.append(f"unwritable={unwritable} source_errors={errors}")
    if "front-end connected" not in text:
        failures.append("the back-end logged no connection")
    if a.iommu and "IOTLB miss at" not in text:
        failures.append("behind the vIOMMU the back-end sent no IOTLB miss")
    if " failed: " in text or "broken" in text:
        failures.append("the back-end refused a request or broke a queue")
    if stop_s is None or stop_s > 1.0 or backend.returncode != 0:
        failures.append(f"SIGTERM: exit {backend.returncode} after {stop_s} s")
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print(f"PASS: the guest read {READ_BYTES} random bytes from vhostkit-rng "
          f"(iommu={a.iommu})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
