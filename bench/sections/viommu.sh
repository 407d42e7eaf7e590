# bench/sections/viommu.sh: the vIOMMU at scale, vhostkit-net against DPDK's vhost
# back-end, both driven by our front-end (bench/viommu_bench.py says how). Prints, medians
# over rounds that alternate the two back-ends:
#   viommu_{strict,lazy}_{2048,16384,65536}_{vhostkit,dpdk}   Mpps
#   viommu_{strict,lazy}_{2048,16384,65536}_vhostkit_over_dpdk the ratio (target at
#                                                               16384: >= 10)
#   viommu_{strict,lazy}_growth_65536_over_2048_{vhostkit,dpdk} Mpps ratio (1.0: flat)
# VHOSTKIT_BENCH_REPETITIONS sets the rounds (default 5; a round is 12 runs of about 10 s
# each, start-up and IOTLB filling included: about 10 minutes for 5 rounds).
sections+=(viommu)

section_viommu() {
  build_targets vhostkit-net viommu_driver
  python3 bench/viommu_bench.py --daemon "$build/apps/vhostkit-net/vhostkit-net" \
    --driver "$build/tests/viommu_driver" --rounds "$reps" | grep '^BENCH'
}
