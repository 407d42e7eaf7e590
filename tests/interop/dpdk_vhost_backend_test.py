#!/usr/bin/env python3
"""vhostkit's front-end drives DPDK's vhost back-end (testpmd from Debian's dpdk-dev).

testpmd serves a vhost-user port (net_vhost0) in macswap mode: every frame our front-end
transmits on queue 1 comes back on queue 0. Run without and with the IOMMU feature
(iommu-support=1; our front-end then answers DPDK's IOTLB misses from its vIOMMU model in
the legacy form, as DPDK does not offer GPA_ADDRESSES). Without the IOMMU every frame must
come back intact; with it DPDK drops the frames whose buffers miss in its IOTLB (it does not
wait for the translation), so frames must come back and every one that does must be intact.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time


def ensure_testpmd():
    if shutil.which("dpdk-testpmd"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "dpdk-dev"], check=True, env=env)


def run(tool, work, iommu):
    name = "iommu" if iommu else "plain"
    sock = os.path.join(work, f"{name}.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    vdev = f"net_vhost0,iface={sock},queues=1" + (",iommu-support=1" if iommu else "")
    tp = subprocess.Popen(["timeout", "-s", "INT", "60", "dpdk-testpmd", "--no-huge", "-m", "1024", "--no-pci",
                           f"--file-prefix=vhostkit-fe-{name}-{os.getpid()}", "--vdev", vdev, "-l", "0-1", "--",
                           "--forward-mode=macswap", "--auto-start", "--stats-period", "2"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 20
    while not os.path.exists(sock) and time.time() < deadline:
        time.sleep(0.1)
    cmd = [tool, "--socket-path", sock, "--packets", "3000"] + (["--iommu"] if iommu else ["--expect-echo"])
    fe = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    tp.send_signal(2)
    try:
        out = tp.communicate(timeout=20)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        tp.kill()
        out = tp.communicate()[0].decode(errors="replace")
    fe_out = fe.stdout.decode(errors="replace")
    print(f"---- front-end ({name}) ----"); print(fe_out[-1500:])
    print(f"---- testpmd ({name}, tail) ----"); print(out[-1200:])
    m = re.search(r"RESULT sent=(\d+) received=(\d+) matched=(\d+) misses=(\d+)", fe_out)
    if not m:
        return [f"{name}: no RESULT from the front-end"]
    failures = []
    if fe.returncode != 0:
        failures.append(f"{name}: front-end failed: {m.group(0)}")
    if iommu and int(m.group(4)) == 0:
        failures.append(f"{name}: DPDK never asked for a translation")
    return failures


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", required=True)
    ap.add_argument("--work-dir", required=True)
    args = ap.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    ensure_testpmd()
    failures = run(args.tool, args.work_dir, False) + run(args.tool, args.work_dir, True)
    if failures:
        print("FAIL: " + "; ".join(failures)); return 1
    print("PASS: vhostkit's front-end exchanged frames with DPDK's vhost back-end, with and without the IOMMU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
