# bench/sections/net.sh: vhostkit-net against DPDK's vhost back-end, side by side, both
# driven by DPDK's virtio-user front-end in testpmd (bench/net_bench.py says how).
# Prints, medians over rounds that alternate the two back-ends:
#   net_{g2h,h2g}_mpps_{64b,1500b}_{vhostkit,dpdk}   packets per second, millions
#   net_{g2h,h2g}_mpps_{64b,1500b}_vhostkit_over_dpdk the ratio (target: >= 1.0)
# VHOSTKIT_BENCH_REPETITIONS sets the rounds (default 5; each round is 2 runs of 7 s).
sections+=(net)

section_net() {
  build_targets vhostkit-net
  python3 bench/net_bench.py --daemon "$build/apps/vhostkit-net/vhostkit-net" --rounds "$reps" |
    grep '^BENCH'
}
