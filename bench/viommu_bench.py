#!/usr/bin/env python3
"""The vIOMMU at scale: vhostkit-net against DPDK's vhost back-end, one front-end.

The front-end is ours (tests/interop/viommu_driver: the guest driver model with its vIOMMU,
transmitting 64-byte frames). The back-ends consume them: vhostkit-net --mode sink --poll
(pinned to one core, its IOTLB sized with --iotlb-entries to hold every live mapping) and
DPDK's vhost PMD in testpmd rxonly with iommu-support=1 (one forwarding core; its IOTLB
size is fixed at build time). Each run first installs N live mappings in the back-end's
IOTLB, then measures, in the driver, the frames per second the back-end completes:
  strict  every frame mapped before it is offered and unmapped on completion (an IOTLB
          miss and an invalidation per frame), the N mappings live beside them;
  lazy    the N mappings are the buffers, kept, used in a scattered order.
Every run also checks that the back-end counted exactly the frames the driver saw
complete. Rounds alternate the back-ends; each value is the median over rounds.

Prints BENCH lines:
  viommu_<mode>_<entries>_{vhostkit,dpdk}  (Mpps), ..._vhostkit_over_dpdk (ratio), and
  viommu_<mode>_growth_<max>_over_<min>_{vhostkit,dpdk}: Mpps at the most entries over
  Mpps at the fewest (1.0: no slowdown as the IOTLB grows).

--quick is the ctest (interop.viommu_driver): correctness only, short runs, no timing.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import net_bench  # noqa: E402  (one set of back-end start-up helpers)

# The rings and the frames in flight take a few hundred entries beyond the live ones.
IOTLB_SLACK = 1024


def one_run(kind, mode, entries, args, work, iotlb_entries=None, seconds=None, warmup=None):
    """Runs the driver against a fresh back-end. Returns (result dict, back-end count)."""
    sock = os.path.join(work, f"{kind}-{mode}-{entries}.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    cap = iotlb_entries if iotlb_entries is not None else entries + IOTLB_SLACK
    blog_path = os.path.join(work, f"back-{kind}-{mode}-{entries}-{cap}.log")
    with open(blog_path, "w") as blog:
        back = net_bench.start_backend(kind, "g2h", 64, sock, args.daemon, blog, iommu=True,
                                       daemon_args=("--iotlb-entries", str(cap)))
        try:
            drv = subprocess.run(
                ["taskset", "-c", str(net_bench.FRONT_CORE), args.driver, "--socket-path", sock,
                 "--mode", mode, "--entries", str(entries),
                 "--seconds", str(seconds or args.seconds), "--warmup", str(warmup or args.warmup)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                timeout=300)
        finally:
            net_bench.stop_backend(kind, back)
    out = drv.stdout.decode(errors="replace")
    with open(os.path.join(work, f"driver-{kind}-{mode}-{entries}-{cap}.log"), "w") as f:
        f.write(out)
    m = re.search(r"RESULT mode=\S+ entries=\d+ mpps=([\d.]+) measured=(\d+) completed=(\d+) "
                  r"misses=(\d+)", out)
    if drv.returncode != 0 or not m:
        raise RuntimeError(f"{kind} {mode} {entries}: the driver failed ({drv.returncode}): "
                           f"{out[-800:]}")
    blog_text = open(blog_path, errors="replace").read()
    if kind == "vhostkit":
        counts = [int(x) for x in re.findall(r"STATS .*? tx0_packets=(\d+)", blog_text)]
    else:
        counts = [int(x) for x in re.findall(r"RX-packets:\s+(\d+)", blog_text)]
    res = {"mpps": float(m.group(1)), "measured": int(m.group(2)),
           "completed": int(m.group(3)), "misses": int(m.group(4))}
    return res, (max(counts) if counts else None)


def check_counts(kind, mode, entries, res, counted):
    if counted != res["completed"]:
        raise RuntimeError(f"{kind} {mode} {entries}: the back-end counted {counted} frames, "
                           f"the driver saw {res['completed']} complete")


def quick(args, work):
    """Correctness: frames arrive and the counts match, for both modes and back-ends; and
    vhostkit-net's --iotlb-entries is what spares it misses on mappings it could not
    hold."""
    failures = []

    def run(kind, mode, entries, **kw):
        try:
            res, counted = one_run(kind, mode, entries, args, work, seconds=0.5, warmup=0.2, **kw)
            check_counts(kind, mode, entries, res, counted)
        except RuntimeError as e:
            failures.append(str(e))
            print(f"FAIL {e}")
            return None
        print(f"ok   {kind} {mode} {entries} entries (IOTLB {kw.get('iotlb_entries', 'sized')}): "
              f"{res['completed']} frames, counted alike, {res['misses']} misses measured")
        return res

    for kind in ("vhostkit", "dpdk"):
        for mode in ("strict", "lazy"):
            res = run(kind, mode, 2048)
            if res and mode == "strict" and res["misses"] == 0:
                failures.append(f"{kind} strict: no IOTLB miss, so no per-frame churn")
    sized = run("vhostkit", "lazy", 4096, iotlb_entries=4096 + IOTLB_SLACK)
    if sized and sized["misses"] != 0:
        failures.append(f"vhostkit lazy 4096 with --iotlb-entries {4096 + IOTLB_SLACK}: "
                        f"{sized['misses']} misses (every mapping was installed and fits)")
    small = run("vhostkit", "lazy", 4096, iotlb_entries=2048)
    if small and small["misses"] == 0:
        failures.append("vhostkit lazy 4096 with --iotlb-entries 2048: no misses, so the "
                        "option did not size the IOTLB")
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print("PASS: frames arrive and counts match through the vIOMMU, both modes, both back-ends")
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemon", required=True, help="the vhostkit-net binary")
    ap.add_argument("--driver", required=True, help="the viommu_driver binary")
    ap.add_argument("--entries", default="2048,16384,65536")
    ap.add_argument("--modes", default="strict,lazy")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--quick", action="store_true", help="correctness only (the ctest)")
    args = ap.parse_args()
    net_bench.ensure_testpmd()
    work = args.work_dir or tempfile.mkdtemp(prefix="vhostkit-viommu-bench-")
    os.makedirs(work, exist_ok=True)
    if args.quick:
        return quick(args, work)
    sizes = [int(s) for s in args.entries.split(",")]
    for mode in args.modes.split(","):
        med = {}
        for entries in sizes:
            res = {"vhostkit": [], "dpdk": []}
            for r in range(args.rounds):
                order = ("vhostkit", "dpdk") if r % 2 == 0 else ("dpdk", "vhostkit")
                for kind in order:
                    one, counted = one_run(kind, mode, entries, args, work)
                    check_counts(kind, mode, entries, one, counted)
                    res[kind].append(one["mpps"])
                    print(f"# {mode} {entries} round {r} {kind}: {one['mpps']:.4f} Mpps, "
                          f"{one['misses']} misses in {one['measured']} frames", flush=True)
            name = f"viommu_{mode}_{entries}"
            vk, dp = statistics.median(res["vhostkit"]), statistics.median(res["dpdk"])
            med[entries] = (vk, dp)
            print(f"BENCH name={name}_vhostkit value={vk:.4f} unit=Mpps")
            print(f"BENCH name={name}_dpdk value={dp:.4f} unit=Mpps")
            print(f"BENCH name={name}_vhostkit_over_dpdk value={vk / dp:.2f} unit=ratio",
                  flush=True)
        lo, hi = min(sizes), max(sizes)
        if lo != hi:
            for i, kind in enumerate(("vhostkit", "dpdk")):
                print(f"BENCH name=viommu_{mode}_growth_{hi}_over_{lo}_{kind} "
                      f"value={med[hi][i] / med[lo][i]:.2f} unit=ratio", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
