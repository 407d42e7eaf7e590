# bench/sections/net.sh: vhostkit-net against DPDK's vhost back-end, side by side, both
# driven by DPDK's virtio-user front-end in testpmd (bench/net_bench.py says how).
# Prints, medians over rounds that alternate the back-ends:
#   net_{g2h,h2g}_mpps_{64b,1500b}_{vhostkit,dpdk}       packets per second, millions
#   net_{g2h,h2g}_mpps_{64b,1500b}_vhostkit_over_dpdk     the ratio (target: >= 1.0; h2g
#                                                         64 B: >= 1.2)
#   net_{g2h,h2g}_mpps_{64b,1500b}_vhostkit_over_dpdk_min the lowest ratio of one round
#   net_g2h_mpps_{64b,1500b}_vhostkit_read[_over_dpdk[_min]] the sink copying every payload
#                                                         out (--sink-read): like for like
# VHOSTKIT_BENCH_REPETITIONS sets the rounds (default 5; a round is 3 runs of 7 s guest
# to host and 2 host to guest, per size: about 8 minutes for 5 rounds).
sections+=(net)

section_net() {
  build_targets vhostkit-net
  python3 bench/net_bench.py --daemon "$build/apps/vhostkit-net/vhostkit-net" --rounds "$reps" |
    grep '^BENCH'
}
