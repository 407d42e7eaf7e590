#!/usr/bin/env bash
# vhostkit's one benchmark entry point. Builds the release preset, runs the benchmark
# sections whose name matches the optional filter (a regular expression), and prints
# machine-readable lines:
#   BENCH name=<name> value=<number> unit=<unit>
# Each value is the median of several repetitions; every section runs its baseline in
# the same process, side by side, and prints the ratio. The machine is shared and noisy:
# compare ratios and medians, not single runs.
# Usage: bench/run.sh [filter]      e.g. bench/run.sh foundation
# Sections: add a section_<name> function and its name to `sections` below.
# VHOSTKIT_BENCH_REPETITIONS (default 5) sets the repetitions per benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
filter=${1:-.}
reps=${VHOSTKIT_BENCH_REPETITIONS:-5}
build=build/release

sections=(foundation virtqueue iotlb_miss)
# More sections live in bench/sections/<name>.sh: each defines section_<name> and appends
# its name to `sections`; the helpers above are available to them.

if [[ ! -f $build/build.ninja ]]; then
  cmake --preset release >/dev/null
fi

build_targets() {  # build_targets <target>...: quiet unless the build fails
  local log
  log=$(mktemp /tmp/vhostkit-bench-build.XXXXXX.log)
  if ! cmake --build --preset release --target "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "bench/run.sh: build of $* failed" >&2
    exit 1
  fi
  rm -f "$log"
}

run_gbench() {  # run_gbench <binary> <benchmark filter> -> JSON file path on stdout
  local bin=$1 bfilter=$2 out
  out=$(mktemp /tmp/vhostkit-bench.XXXXXX.json)
  "$build/bench/$bin" --benchmark_filter="$bfilter" --benchmark_repetitions="$reps" \
    --benchmark_report_aggregates_only=true --benchmark_min_time=0.3 \
    --benchmark_enable_random_interleaving=true \
    --benchmark_format=json --benchmark_out="$out" --benchmark_out_format=json >/dev/null
  echo "$out"
}

section_foundation() {
  build_targets foundation_bench
  local json
  json=$(run_gbench foundation_bench '.')
  python3 - "$json" <<'PY'
import json, sys

data = json.load(open(sys.argv[1]))
# Median over the repetitions of each benchmark. CPU time, not wall time: these are
# single-threaded loops, and on a shared machine wall time also counts the time the
# process was not running at all.
med = {}
for b in data["benchmarks"]:
    if b.get("aggregate_name") != "median":
        continue
    scale = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}[b["time_unit"]]
    med[b["run_name"]] = b["cpu_time"] * scale / b.get("pages_per_iter", 1.0)

def emit(name, key, unit="ns"):
    if key in med:
        print(f"BENCH name={name} value={med[key]:.2f} unit={unit}")

def ratio(name, num, den):
    if num in med and den in med and med[den] > 0:
        print(f"BENCH name={name} value={med[num] / med[den]:.2f} unit=x")

emit("translate_cached_ns", "BM_TranslateCached/iommu:1")
emit("translate_cached_noiommu_ns", "BM_TranslateCached/iommu:0")
tree = lambda n, seq: f"BM_IotlbLookup/entries:{n}/seq:{seq}"
linear = lambda n, seq: f"BM_LinearIotlbLookup/entries:{n}/seq:{seq}"
for n in (16, 2048, 65536, 1048576):
    emit(f"iotlb_lookup_ns_{n}", tree(n, 0))
    emit(f"iotlb_lookup_seq_ns_{n}", tree(n, 1))
for n in (16, 2048, 65536):
    emit(f"iotlb_linear_lookup_ns_{n}", linear(n, 0))
    emit(f"iotlb_linear_lookup_seq_ns_{n}", linear(n, 1))
for n in (16, 2048, 65536):
    ratio(f"iotlb_linear_over_vhostkit_{n}", linear(n, 0), tree(n, 0))
# 32 times the entries: 16/11 = 1.45x the search steps if logarithmic (cache misses add
# to the time), 32x the time if linear.
ratio("iotlb_lookup_growth_65536_over_2048", tree(65536, 0), tree(2048, 0))
ratio("iotlb_linear_lookup_growth_65536_over_2048", linear(65536, 0), linear(2048, 0))
emit("memtable_lookup_ns_8", "BM_MemtableLookup/regions:8")
emit("memtable_lookup_ns_509", "BM_MemtableLookup/regions:509")
log = lambda batched, pattern: f"BM_DirtyLog/batched:{batched}/pattern:{pattern}"
for suffix, pattern in (("", 0), ("_random", 1), ("_clustered", 2)):
    emit(f"dirty_log_ns_per_page_batched{suffix}", log(1, pattern))
    emit(f"dirty_log_ns_per_page_unbatched{suffix}", log(0, pattern))
    ratio(f"dirty_log_unbatched_over_batched{suffix}", log(0, pattern), log(1, pattern))
PY
  rm -f "$json"
}

section_virtqueue() {
  if ! grep -q virtqueue_bench bench/CMakeLists.txt; then return 0; fi
  build_targets virtqueue_bench
  "$build/bench/virtqueue_bench" --repetitions "$reps"
}

section_iotlb_miss() {
  cmake --build --preset release --target iotlb_miss_bench >/dev/null
  "$build/bench/iotlb_miss_bench" "$reps"
}

for f in bench/sections/*.sh; do
  [[ -e $f ]] || continue
  # shellcheck source=/dev/null
  source "$f"
done

ran=0
for s in "${sections[@]}"; do
  if [[ $s =~ $filter ]]; then
    echo "# section $s" >&2
    "section_$s"
    ran=1
  fi
done
if ((ran == 0)); then
  echo "bench/run.sh: no section matches '$filter' (sections: ${sections[*]})" >&2
  exit 1
fi
