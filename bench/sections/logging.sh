# bench/sections/logging.sh: what dirty logging (a migration in progress) costs the
# devices, logging off versus on, side by side on one connection (docs/benchmarks.md,
# "Dirty logging"). Sourced by bench/run.sh.
#
# net: vhostkit-net --mode source --packet-size 64 --poll (core 0) into the guest driver
#      model (bench/net_logging_bench.cpp, core 1, never sleeps; 2 KiB receive buffers
#      one per page in a shuffled order over 64 MiB).
# blk: vhostkit-blk on a 256 MiB image, 4 KiB random reads at queue depth 32 from our
#      front-end (bench/blk_bench.cpp --logging-rounds).
# Each round measures logging off and on for 2 s each, in alternating order; with logging
# on the front-end fetches and clears the log every 20 ms as a migration would. Prints the
# medians over VHOSTKIT_BENCH_REPETITIONS rounds:
#   net_h2g_logging_{off,on}_mpps       frames per second into the guest, millions
#   net_h2g_logging_on_over_off         median of the per-round ratios (target >= 0.9)
#   blk_randread_logging_{off,on}_kiops thousands of reads per second
#   blk_randread_logging_on_over_off    median of the per-round ratios (target >= 0.9)
sections+=(logging)

logging_summary() {  # logging_summary <phase log> <name prefix> <field> <scale> <unit>
  python3 - "$@" <<'PY'
import re, statistics, sys

path, prefix, field, scale, unit = sys.argv[1:6]
rounds = {}
for line in open(path):
    m = re.match(r"PHASE round=(\d+) logging=(on|off) .*\b" + field + r"=([\d.]+)", line)
    if m:
        rounds.setdefault(int(m.group(1)), {})[m.group(2)] = float(m.group(3)) * float(scale)
pairs = [r for r in rounds.values() if "on" in r and "off" in r]
if not pairs:
    sys.exit(f"bench/run.sh: {prefix}: no complete round")
med = statistics.median
print(f"BENCH name={prefix}_logging_off_{unit} value={med(r['off'] for r in pairs):.3f} unit={unit}")
print(f"BENCH name={prefix}_logging_on_{unit} value={med(r['on'] for r in pairs):.3f} unit={unit}")
print(f"BENCH name={prefix}_logging_on_over_off value={med(r['on'] / r['off'] for r in pairs):.3f} unit=ratio")
PY
}

section_logging() {
  build_targets vhostkit-net net_logging_bench vhostkit-blk blk_bench
  local dir
  dir=$(mktemp -d /tmp/vhostkit-bench-logging.XXXXXX)
  # net
  taskset -c 0 "$build/apps/vhostkit-net/vhostkit-net" --socket-path "$dir/net.sock" \
    --mode source --packet-size 64 --poll --log-level warn 2>"$dir/net.log" &
  local daemon=$!
  local status=0
  taskset -c 1 "$build/bench/net_logging_bench" --socket "$dir/net.sock" --rounds "$reps" \
    --seconds 2 >"$dir/net.phases" 2>&1 || status=$?
  kill "$daemon" 2>/dev/null || true
  wait "$daemon" 2>/dev/null || true
  if ((status != 0)); then
    cat "$dir/net.phases" "$dir/net.log" >&2
    rm -rf "$dir"
    echo "bench/run.sh: net logging benchmark failed" >&2
    return 1
  fi
  logging_summary "$dir/net.phases" net_h2g mpps 1 mpps
  # blk
  dd if=/dev/urandom of="$dir/disk.img" bs=1M count=256 status=none
  "$build/apps/vhostkit-blk/vhostkit-blk" --socket-path "$dir/blk.sock" \
    --blk-file "$dir/disk.img" --log-level warn 2>"$dir/blk.log" &
  daemon=$!
  local tries=0
  while [[ ! -S $dir/blk.sock ]] && ((tries++ < 100)); do sleep 0.05; done
  "$build/tests/devices/blk/blk_bench" --socket "$dir/blk.sock" --mode randread --bs 4096 \
    --qd 32 --seconds 2 --logging-rounds "$reps" >"$dir/blk.phases" 2>&1 || status=$?
  kill "$daemon" 2>/dev/null || true
  wait "$daemon" 2>/dev/null || true
  if ((status != 0)); then
    cat "$dir/blk.phases" "$dir/blk.log" >&2
    rm -rf "$dir"
    echo "bench/run.sh: blk logging benchmark failed" >&2
    return 1
  fi
  logging_summary "$dir/blk.phases" blk_randread iops 0.001 kiops
  rm -rf "$dir"
}
