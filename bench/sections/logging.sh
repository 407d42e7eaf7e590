# bench/sections/logging.sh: what dirty logging (a migration in progress) costs the
# devices, logging off versus on, side by side on one connection (docs/benchmarks.md,
# "Dirty logging"). Sourced by bench/run.sh.
#
# net: vhostkit-net --mode source --packet-size 64 --poll (core 0) into the guest driver
#      model (bench/net_logging_bench.cpp, core 1, never sleeps; 2 KiB receive buffers
#      over 64 MiB, used in turn), with two buffer layouts: "packed", two per page in
#      address order as Linux's virtio-net carves them from page fragments (the
#      headline), and "scattered", one per page in a shuffled order (the worst case for
#      the log cache). The baseline: the same driver model and phases against DPDK's
#      vhost back-end (testpmd --vdev net_vhost0, txonly --txpkts=64, forwarding core 0).
# blk: vhostkit-blk on a 256 MiB image, 4 KiB random reads at queue depth 32 from our
#      front-end (bench/blk_bench.cpp --logging-rounds).
# Each round measures logging off and on for 2 s each, in alternating order; with logging
# on the front-end fetches and clears the log every 20 ms as a migration would. Prints the
# medians over VHOSTKIT_BENCH_REPETITIONS rounds:
#   net_h2g_logging_{off,on}_mpps       frames per second into the guest, millions
#   net_h2g_logging_on_over_off         median of the per-round ratios (target >= 0.9)
#   ..._scattered                       the same with scattered buffers
#   ..._dpdk, ..._scattered_dpdk        the baseline
#   blk_randread_logging_{off,on}_kiops thousands of reads per second
#   blk_randread_logging_on_over_off    median of the per-round ratios (target >= 0.9)
sections+=(logging)

logging_summary() {  # logging_summary <phase log> <name prefix> <field> <scale> <unit> [suffix]
  python3 - "$@" <<'PY'
import re, statistics, sys

path, prefix, field, scale, unit = sys.argv[1:6]
sfx = sys.argv[6] if len(sys.argv) > 6 else ""
rounds = {}
for line in open(path):
    m = re.match(r"PHASE round=(\d+) logging=(on|off) .*\b" + field + r"=([\d.]+)", line)
    if m:
        rounds.setdefault(int(m.group(1)), {})[m.group(2)] = float(m.group(3)) * float(scale)
pairs = [r for r in rounds.values() if "on" in r and "off" in r]
if not pairs:
    sys.exit(f"bench/run.sh: {prefix}: no complete round")
med = statistics.median
print(f"BENCH name={prefix}_logging_off_{unit}{sfx} value={med(r['off'] for r in pairs):.3f} unit={unit}")
print(f"BENCH name={prefix}_logging_on_{unit}{sfx} value={med(r['on'] for r in pairs):.3f} unit={unit}")
print(f"BENCH name={prefix}_logging_on_over_off{sfx} value={med(r['on'] / r['off'] for r in pairs):.3f} unit=ratio")
PY
}

logging_net_run() {  # logging_net_run <dir> <vhostkit|dpdk> <layout> -> phases in <dir>
  local dir=$1 kind=$2 layout=$3 daemon status=0 tries=0
  local sock=$dir/$kind-$layout.sock
  if [[ $kind == vhostkit ]]; then
    taskset -c 0 "$build/apps/vhostkit-net/vhostkit-net" --socket-path "$sock" \
      --mode source --packet-size 64 --poll --log-level warn >"$dir/$kind-$layout.log" 2>&1 &
  else
    dpdk-testpmd --no-huge -m 1024 --no-pci --single-file-segments \
      --file-prefix="vkl-$$-$layout" -l 0-1 --main-lcore 1 \
      --vdev "net_vhost0,iface=$sock,queues=1" -- --forward-mode=txonly \
      --txpkts=64 --auto-start --stats-period 1 --nb-cores=1 </dev/null \
      >"$dir/$kind-$layout.log" 2>&1 &
  fi
  daemon=$!
  while [[ ! -S $sock ]] && ((tries++ < 200)); do sleep 0.05; done
  taskset -c 1 "$build/bench/net_logging_bench" --socket "$sock" --rounds "$reps" \
    --seconds 2 --layout "$layout" >"$dir/$kind-$layout.phases" 2>&1 || status=$?
  kill -INT "$daemon" 2>/dev/null || true
  wait "$daemon" 2>/dev/null || true
  if ((status != 0)); then
    cat "$dir/$kind-$layout.phases" "$dir/$kind-$layout.log" >&2
    echo "bench/run.sh: net logging benchmark ($kind, $layout buffers) failed" >&2
    return 1
  fi
}

section_logging() {
  build_targets vhostkit-net net_logging_bench vhostkit-blk blk_bench
  local dir daemon status=0 tries=0
  dir=$(mktemp -d /tmp/vhostkit-bench-logging.XXXXXX)
  if ! command -v dpdk-testpmd >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dpdk-dev \
      >/dev/null 2>&1 || true
  fi
  local kinds=(vhostkit)
  if command -v dpdk-testpmd >/dev/null; then
    kinds+=(dpdk)
  else
    echo "bench/run.sh: dpdk-testpmd not available: no DPDK baseline" >&2
  fi
  local kind layout sfx
  for layout in packed scattered; do
    for kind in "${kinds[@]}"; do
      if ! logging_net_run "$dir" "$kind" "$layout"; then
        rm -rf "$dir"
        return 1
      fi
      sfx=""
      [[ $layout == scattered ]] && sfx+="_scattered"
      [[ $kind == dpdk ]] && sfx+="_dpdk"
      logging_summary "$dir/$kind-$layout.phases" net_h2g mpps 1 mpps "$sfx"
    done
  done
  # blk
  dd if=/dev/urandom of="$dir/disk.img" bs=1M count=256 status=none
  "$build/apps/vhostkit-blk/vhostkit-blk" --socket-path "$dir/blk.sock" \
    --blk-file "$dir/disk.img" --log-level warn 2>"$dir/blk.log" &
  daemon=$!
  tries=0
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
