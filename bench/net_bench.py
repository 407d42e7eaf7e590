#!/usr/bin/env python3
"""vhostkit-net against DPDK's vhost back-end, side by side, driven by the same front-end.

The front-end is DPDK's virtio-user in testpmd (--no-huge). The back-end is either
vhostkit-net (--poll, pinned to one core) or DPDK's own vhost PMD in a second testpmd (one
forwarding core). Guest-to-host: the front-end transmits (txonly), the back-end consumes
(vhostkit-net --mode sink, testpmd rxonly). Host-to-guest: the back-end generates
(vhostkit-net --mode source, testpmd txonly), the front-end receives (rxonly). Both
back-ends are measured by the same instrument: the front-end's per-second Tx-pps / Rx-pps,
median of the steady-state seconds. Rounds alternate the two back-ends so that machine
noise hits both alike; the value reported for each is the median over rounds.

Prints BENCH lines:
  net_{g2h,h2g}_mpps_{64b,1500b}_{vhostkit,dpdk}, ..._vhostkit_over_dpdk (the ratio of the
  medians) and ..._vhostkit_over_dpdk_min (the lowest ratio of any one round);
  guest to host also net_g2h_mpps_{64b,1500b}_vhostkit_read and ..._vhostkit_read_over_dpdk:
  the sink copying every payload out of the guest (--sink-read), as DPDK's vhost PMD copies
  each packet into an mbuf before rxonly frees it (the like-for-like comparison).
"""
import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

FRONT_CORE, BACK_CORE = 1, 0


def ensure_testpmd():
    if shutil.which("dpdk-testpmd"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "dpdk-dev"],
                   check=True, env=env)


def testpmd(prefix, main_core, vdev, mode, size, extra=()):
    return ["dpdk-testpmd", "--no-huge", "-m", "1024", "--no-pci", "--single-file-segments",
            f"--file-prefix={prefix}", "-l", "0-1", "--main-lcore", str(main_core),
            "--vdev", vdev, "--log-level=user1,7", "--", f"--forward-mode={mode}",
            f"--txpkts={size}", "--auto-start", "--stats-period", "1", "--nb-cores=1", *extra]


def start_backend(kind, direction, size, sock, daemon, log, iommu=False, daemon_args=()):
    """Starts a back-end on sock; with iommu it offers VIRTIO_F_ACCESS_PLATFORM
    (bench/viommu_bench.py). daemon_args: more vhostkit-net options."""
    if kind.startswith("vhostkit"):
        mode = "sink" if direction == "g2h" else "source"
        cmd = ["taskset", "-c", str(BACK_CORE), daemon, "--socket-path", sock, "--mode", mode,
               "--packet-size", str(max(size, 60)), "--poll",
               *([] if iommu else ["--no-iommu"]), *daemon_args]
        if kind == "vhostkit_read":
            cmd.append("--sink-read")
    else:
        mode = "rxonly" if direction == "g2h" else "txonly"
        vdev = f"net_vhost0,iface={sock},queues=1" + (",iommu-support=1" if iommu else "")
        cmd = testpmd(f"vkb-back-{os.getpid()}", 1 - BACK_CORE, vdev, mode, size)
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.time() + 20
    while not os.path.exists(sock):
        if time.time() > deadline or p.poll() is not None:
            raise RuntimeError(f"{kind} back-end did not start (see {log.name})")
        time.sleep(0.05)
    return p


def stop_backend(kind, back):
    """Stops a back-end start_backend started: testpmd quits on SIGINT, our daemons on SIGTERM."""
    back.send_signal(signal.SIGINT if kind == "dpdk" else signal.SIGTERM)
    try:
        back.wait(timeout=15)
    except subprocess.TimeoutExpired:
        back.kill()
        back.wait()


def one_run(kind, direction, size, seconds, daemon, work):
    sock = os.path.join(work, f"{kind}-{direction}-{size}.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    blog = open(os.path.join(work, f"back-{kind}-{direction}-{size}.log"), "w")
    back = start_backend(kind, direction, size, sock, daemon, blog)
    try:
        mode = "txonly" if direction == "g2h" else "rxonly"
        front = subprocess.run(
            ["timeout", "-s", "INT", str(seconds)] +
            testpmd(f"vkb-front-{os.getpid()}", 1 - FRONT_CORE,
                    f"net_virtio_user0,path={sock},queues=1,queue_size=1024", mode, size),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out = front.stdout.decode(errors="replace")
        with open(os.path.join(work, f"front-{kind}-{direction}-{size}.log"), "w") as f:
            f.write(out)
    finally:
        stop_backend(kind, back)
    key = "Tx-pps" if direction == "g2h" else "Rx-pps"
    samples = [int(x) for x in re.findall(key + r":\s+(\d+)", out)]
    steady = samples[2:] if len(samples) > 4 else samples[1:]
    if not steady or max(steady) == 0:
        raise RuntimeError(f"{kind} {direction} {size}B: no traffic measured (see {work})")
    return statistics.median(steady) / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemon", required=True, help="the vhostkit-net binary")
    ap.add_argument("--seconds", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="64,1500")
    ap.add_argument("--work-dir", default=None)
    args = ap.parse_args()
    ensure_testpmd()
    work = args.work_dir or tempfile.mkdtemp(prefix="vhostkit-net-bench-")
    os.makedirs(work, exist_ok=True)
    for size in [int(s) for s in args.sizes.split(",")]:
        for direction in ("g2h", "h2g"):
            # Guest to host also with the sink reading every payload (vhostkit_read): DPDK's
            # vhost PMD copies each packet into an mbuf, so that is the like-for-like row.
            kinds = ("vhostkit", "vhostkit_read", "dpdk") if direction == "g2h" else ("vhostkit", "dpdk")
            res = {k: [] for k in kinds}
            for r in range(args.rounds):
                order = kinds if r % 2 == 0 else tuple(reversed(kinds))
                for kind in order:
                    mpps = one_run(kind, direction, size, args.seconds, args.daemon, work)
                    res[kind].append(mpps)
                    print(f"# {direction} {size}B round {r} {kind}: {mpps:.2f} Mpps", flush=True)
            name = f"net_{direction}_mpps_{size}b"
            dp = statistics.median(res["dpdk"])
            for kind in kinds:
                if kind == "dpdk":
                    continue
                vk = statistics.median(res[kind])
                # The worst round: each round's own ratio (its runs were side by side).
                worst = min(v / d for v, d in zip(res[kind], res["dpdk"]))
                print(f"BENCH name={name}_{kind} value={vk:.3f} unit=Mpps")
                print(f"BENCH name={name}_{kind}_over_dpdk value={vk / dp:.3f} unit=ratio")
                print(f"BENCH name={name}_{kind}_over_dpdk_min value={worst:.3f} unit=ratio")
            print(f"BENCH name={name}_dpdk value={dp:.3f} unit=Mpps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
