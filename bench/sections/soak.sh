# bench/sections/soak.sh: the leak soak in full (docs/reliability.md, "Soak"). For each
# daemon, vhost_soak (tests/soak) runs VHOSTKIT_SOAK_CYCLES (default 10,000) front-end
# sessions, well-formed and hostile mixed, samples the daemon's open fds, mappings and RSS
# every 1,000 and fails if they grow past the baseline taken at cycle 1,000. Prints the
# samples and, per daemon:
#   soak_<net|blk>_{fd,maps,rss}_growth     the largest growth over the baseline
#   soak_<net|blk>_baseline_{fds,maps,rss}  the baseline
#   soak_<net|blk>_cycles, _seconds         how many sessions, and how long they took
# Sourced by bench/run.sh.
sections+=(soak)

section_soak() {
  build_targets vhost_soak vhostkit-net vhostkit-blk
  local kind status=0
  for kind in net blk; do
    "$build/tests/soak/vhost_soak" --daemon "$build/apps/vhostkit-$kind/vhostkit-$kind" \
      --kind "$kind" --cycles "${VHOSTKIT_SOAK_CYCLES:-10000}" --sample-every 1000 \
      --warmup 1000 --bench || status=1
  done
  if ((status != 0)); then
    echo "bench/run.sh: soak failed" >&2
    return 1
  fi
}
