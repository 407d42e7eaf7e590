# bench/sections/migration.sh: live migration of a large guest under full-rate receive
# traffic (docs/benchmarks.md, "Migration"). Sourced by bench/run.sh.
#
# apps/vhostkit-migrate against two tests/sink_backend --source processes: guest RAM of
# VHOSTKIT_BENCH_MIGRATION_MIB MiB (default 4096; source and destination each need that
# much shared memory), no vIOMMU, buffers offered as fast as the back-end fills them
# (--rate 0), 30 rounds at most. Prints the median over the repetitions of
#   migration_downtime_ms  pause of the guest to its resumption on the destination
#                          (GET_VRING_BASE, last copy, destination start; without the
#                          byte-for-byte comparison, which a VMM would not do)
#   migration_total_s      start of logging to the end of the switch
#   migration_pages_copied / migration_pages_dirtied   over all rounds after the bulk copy
#   migration_rounds       rounds including bulk and final
# and fails if any run's proof finds a differing page.
sections+=(migration)

section_migration() {
  local mib=${VHOSTKIT_BENCH_MIGRATION_MIB:-4096}
  local runs=${VHOSTKIT_BENCH_MIGRATION_RUNS:-3}
  build_targets vhostkit-migrate sink_backend
  local dir
  dir=$(mktemp -d /tmp/vhostkit-bench-migration.XXXXXX)
  local out="$dir/runs.txt"
  : >"$out"
  for ((i = 0; i < runs; ++i)); do
    "$build/tests/sink_backend" --socket-path "$dir/src.sock" --source 2>"$dir/src.log" &
    local p1=$!
    "$build/tests/sink_backend" --socket-path "$dir/dst.sock" --source 2>"$dir/dst.log" &
    local p2=$!
    local status=0
    "$build/apps/vhostkit-migrate/vhostkit-migrate" --source "$dir/src.sock" \
      --destination "$dir/dst.sock" --ram-mib "$mib" --iommu off --rate 0 \
      --warmup-ms 1000 --after-ms 300 --max-iterations 30 >"$dir/run$i.log" 2>&1 || status=$?
    kill "$p1" "$p2" 2>/dev/null || true
    wait "$p1" "$p2" 2>/dev/null || true
    if ((status != 0)); then
      cat "$dir/run$i.log" >&2
      echo "bench/run.sh: migration run $i failed (exit $status)" >&2
      rm -rf "$dir"
      return 1
    fi
    cat "$dir/run$i.log" >>"$out"
  done
  python3 - "$out" "$mib" <<'PY'
import re, statistics, sys

text = open(sys.argv[1]).read()
runs = text.split("guest: ")[1:]
down, total, copied, dirtied, rounds = [], [], [], [], []
for r in runs:
    v = re.search(r"VERDICT pages_compared=(\d+) pages_differing=(\d+) downtime_ms=([\d.]+)", r)
    m = re.search(r"migration: (\d+) rounds, (\d+) pages copied, total ([\d.]+) s", r)
    down.append(float(v.group(3)))
    total.append(float(m.group(3)))
    rounds.append(int(m.group(1)))
    it = re.findall(r"^(?:iteration|final) \d+: dirty (\d+) pages .*?copied (\d+) pages", r, re.M)
    dirtied.append(sum(int(d) for d, _ in it))
    copied.append(sum(int(c) for _, c in it))
med = statistics.median
print(f"BENCH name=migration_downtime_ms value={med(down):.2f} unit=ms")
print(f"BENCH name=migration_total_s value={med(total):.3f} unit=s")
print(f"BENCH name=migration_pages_dirtied value={med(dirtied):.0f} unit=pages")
print(f"BENCH name=migration_pages_copied value={med(copied):.0f} unit=pages")
print(f"BENCH name=migration_rounds value={med(rounds):.0f} unit=rounds")
print(f"BENCH name=migration_guest_mib value={sys.argv[2]} unit=MiB")
PY
  rm -rf "$dir"
}
