#!/usr/bin/env bash
# vhostkit's one benchmark entry point. Builds the release preset, runs the benchmark
# sections whose name matches the optional filter (a regular expression), and prints
# machine-readable lines:
#   BENCH name=<name> value=<number> unit=<unit>
# Each value is the median of several repetitions; every section runs its baseline in
# the same process, side by side, and prints the ratio. The machine is shared and noisy:
# compare ratios and medians, not single runs.
# Usage: bench/run.sh [filter]      e.g. bench/run.sh foundation
set -euo pipefail
cd "$(dirname "$0")/.."
filter=${1:-.}
reps=${VHOSTKIT_BENCH_REPETITIONS:-5}
build=build/release

sections=(foundation virtqueue)

if [[ ! -f $build/build.ninja ]]; then
  cmake --preset release >/dev/null
fi

run_gbench() {  # run_gbench <binary> <benchmark filter> -> JSON file path on stdout
  local bin=$1 bfilter=$2 out
  out=$(mktemp /tmp/vhostkit-bench.XXXXXX.json)
  "$build/bench/$bin" --benchmark_filter="$bfilter" --benchmark_repetitions="$reps" \
    --benchmark_report_aggregates_only=true --benchmark_min_time=0.3 \
    --benchmark_format=json --benchmark_out="$out" --benchmark_out_format=json >/dev/null
  echo "$out"
}

section_foundation() {
  cmake --build --preset release --target foundation_bench >/dev/null
  local json
  json=$(run_gbench foundation_bench '.')
  python3 - "$json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
med = {}
for b in data["benchmarks"]:
    if b.get("aggregate_name") != "median":
        continue
    name = b["run_name"]
    t = b["real_time"]
    unit = b["time_unit"]
    scale = {"ns": 1.0, "us": 1e3, "ms": 1e6}[unit]
    per = b.get("pages_per_iter", 1.0)
    med[name] = t * scale / per
def emit(name, key, unit="ns"):
    if key in med:
        print(f"BENCH name={name} value={med[key]:.2f} unit={unit}")
emit("translate_cached_ns", "BM_TranslateCached/iommu:1")
emit("translate_cached_noiommu_ns", "BM_TranslateCached/iommu:0")
for n in (16, 2048, 65536, 1048576):
    emit(f"iotlb_lookup_ns_{n}", f"BM_IotlbLookup/entries:{n}/seq:0")
    emit(f"iotlb_lookup_seq_ns_{n}", f"BM_IotlbLookup/entries:{n}/seq:1")
for n in (16, 2048, 65536):
    emit(f"iotlb_linear_lookup_ns_{n}", f"BM_LinearIotlbLookup/entries:{n}")
    a, b = f"BM_LinearIotlbLookup/entries:{n}", f"BM_IotlbLookup/entries:{n}/seq:0"
    if a in med and b in med:
        print(f"BENCH name=iotlb_linear_over_vhostkit_{n} value={med[a] / med[b]:.2f} unit=x")
emit("memtable_lookup_ns_8", "BM_MemtableLookup/regions:8")
emit("memtable_lookup_ns_509", "BM_MemtableLookup/regions:509")
emit("dirty_log_ns_per_page_batched", "BM_DirtyLog/batched:1/random:0")
emit("dirty_log_ns_per_page_unbatched", "BM_DirtyLog/batched:0/random:0")
emit("dirty_log_ns_per_page_batched_random", "BM_DirtyLog/batched:1/random:1")
emit("dirty_log_ns_per_page_unbatched_random", "BM_DirtyLog/batched:0/random:1")
a, b = "BM_DirtyLog/batched:0/random:0", "BM_DirtyLog/batched:1/random:0"
if a in med and b in med:
    print(f"BENCH name=dirty_log_unbatched_over_batched value={med[a] / med[b]:.2f} unit=x")
PY
  rm -f "$json"
}

section_virtqueue() {
  if ! grep -q virtqueue_bench bench/CMakeLists.txt; then return 0; fi
  cmake --build --preset release --target virtqueue_bench >/dev/null
  "$build/bench/virtqueue_bench" --repetitions "$reps"
}

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
