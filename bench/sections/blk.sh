# bench/sections/blk.sh: vhostkit-blk against qemu-storage-daemon's vhost-user-blk export
# (Debian 12 ships it in qemu-system-common), both driven by the same front-end
# (bench/blk_bench.cpp: our FrontendClient + VirtioDriver, one thread per queue) on the
# same 1 GiB raw image of random bytes. The rows:
#   workloads  randread4k and randwrite4k at queue depth 1 and 32, seqread1m and
#              seqwrite1m at queue depth 32 (per queue);
#   I/O        buffered (vhostkit-blk --direct off; qsd cache.direct=off) or direct
#              (--direct on; cache.direct=on);
#   cache      cache: the image is in the host's page cache (read through once before
#              the cache rows); disk: `sync; echo 1 > /proc/sys/vm/drop_caches` before
#              every run, so reads start cold (the rows are skipped, with a note, when
#              /proc/sys/vm/drop_caches is not writable);
#   queues     q1 or q2 (--num-queues; qsd num-queues), the front-end using all of them.
# qemu-storage-daemon runs with aio=io_uring and with aio=threads; its better median is
# the row's qsd figure (a note on stderr says which). Each run lasts
# VHOSTKIT_BENCH_BLK_SECONDS (default 0.6); VHOSTKIT_BENCH_BLK_REPETITIONS (default 3)
# rounds, in each the back-ends alternate; figures are medians over the rounds.
# Per-request CPU: the back-end process's utime+stime (/proc/PID/stat, every thread,
# io_uring's kernel workers included) over the measured seconds (blk_bench --cpu-pid
# samples it when it starts and stops counting), divided by the requests completed.
# Prints, for each row R = blk_<workload>_<qd1|qd32>_<buffered|direct>_<cache|disk>_<q1|q2>:
#   BENCH name=R_vhostkit / R_qsd   kIOPS (4k rows) or MB/s (1m rows)
#   BENCH name=R_ratio              vhostkit / qsd
#   BENCH name=R_vhostkit_cpu / R_qsd_cpu   microseconds of back-end CPU per request
sections+=(blk)

section_blk() {
  build_targets vhostkit-blk blk_bench
  local qsd
  qsd=$(command -v qemu-storage-daemon || true)
  if [[ -z $qsd ]] && ! dpkg-query -W -f='${Status}' qemu-system-common 2>/dev/null |
    grep -q "install ok installed"; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      qemu-system-common >/dev/null 2>&1 || true
    qsd=$(command -v qemu-storage-daemon || true)
  fi
  local dir
  # On the disk the machine's files live on (not a tmpfs /tmp), so "disk" means a disk.
  dir=$(mktemp -d "$PWD/build/bench-blk.XXXXXX")
  local img=$dir/disk.img
  dd if=/dev/urandom of="$img" bs=1M count=1024 status=none
  sync  # the first back-end starts without the image's dirty pages waiting
  local status=0
  python3 - "$build" "$img" "$dir" "${VHOSTKIT_BENCH_BLK_REPETITIONS:-3}" \
    "${VHOSTKIT_BENCH_BLK_SECONDS:-0.6}" "${qsd:-}" <<'PY' || status=$?
import os, re, signal, statistics, subprocess, sys, time

build, img, work, reps, seconds, qsd = (sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]),
                                        float(sys.argv[5]), sys.argv[6])
bench = os.path.join(build, "tests/devices/blk/blk_bench")
daemon = os.path.join(build, "apps/vhostkit-blk/vhostkit-blk")
size = os.path.getsize(img)
# (name, blk_bench mode, block size, queue depth)
workloads = [("randread4k", "randread", 4096, 1), ("randread4k", "randread", 4096, 32),
             ("randwrite4k", "randwrite", 4096, 1), ("randwrite4k", "randwrite", 4096, 32),
             ("seqread1m", "seqread", 1 << 20, 32), ("seqwrite1m", "seqwrite", 1 << 20, 32)]
can_drop = os.access("/proc/sys/vm/drop_caches", os.W_OK)
if not can_drop:
    print("bench blk: /proc/sys/vm/drop_caches is not writable; no _disk rows", file=sys.stderr)
caches = ["cache"] + (["disk"] if can_drop else [])
backends = ["vhostkit"] + (["qsd_io_uring", "qsd_threads"] if qsd else [])
if not qsd:
    print("bench blk: qemu-storage-daemon not found (package qemu-system-common); "
          "no _qsd figures", file=sys.stderr)


def start(kind, direct, queues):
    sock = os.path.join(work, kind + ".sock")
    if os.path.exists(sock):
        os.unlink(sock)
    if kind == "vhostkit":
        cmd = [daemon, "--socket-path", sock, "--blk-file", img, "--log-level", "warn",
               "--num-queues", str(queues), "--direct", "on" if direct else "off"]
    else:
        aio = kind.split("_", 1)[1]
        cmd = [qsd, "--blockdev",
               f"driver=file,node-name=file0,filename={img},aio={aio},"
               f"cache.direct={'on' if direct else 'off'}",
               "--export", f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,"
               f"addr.path={sock},writable=on,num-queues={queues}"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while not os.path.exists(sock):
        if time.time() > deadline or p.poll() is not None:
            raise SystemExit(f"bench blk: {kind} did not start: {cmd}")
        time.sleep(0.02)
    return p, sock


def drop_caches():
    subprocess.run(["sync"], check=False)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def warm():
    with open(img, "rb") as f:
        while f.read(8 << 20):
            pass


results = {}  # (row, backend) -> [(value, cpu_us_per_io)]
t_start = time.time()
for rep in range(reps):
    for direct in (False, True):
        for queues in (1, 2):
            for cache in caches:
                if cache == "cache":
                    warm()
                # Alternate the back-ends, and their order from round to round.
                order = backends if rep % 2 == 0 else backends[::-1]
                for kind in order:
                    # Every back-end starts without the others' dirty pages waiting to
                    # be written.
                    os.sync()
                    p, sock = start(kind, direct, queues)
                    try:
                        for name, mode, bs, qd in workloads:
                            if cache == "disk":
                                drop_caches()
                            row = (f"blk_{name}_qd{qd}_{'direct' if direct else 'buffered'}_"
                                   f"{cache}_q{queues}")
                            out = subprocess.run(
                                [bench, "--socket", sock, "--mode", mode, "--bs", str(bs),
                                 "--qd", str(qd), "--queues", str(queues), "--seconds",
                                 str(seconds), "--size", str(size), "--cpu-pid", str(p.pid)],
                                capture_output=True, text=True, timeout=120)
                            m = re.search(r"ops=(\d+) seconds=\S+ iops=([\d.]+) mbps=([\d.]+) "
                                          r"cpu_us=(\d+)", out.stdout)
                            if not m:
                                raise SystemExit(f"bench blk: {kind} {row}: {out.stderr.strip()}")
                            ops = int(m.group(1))
                            value = float(m.group(2)) / 1000 if bs == 4096 else float(m.group(3))
                            cpu = float(m.group(4)) / ops if ops else 0.0
                            results.setdefault((row, kind), []).append((value, cpu))
                    finally:
                        p.send_signal(signal.SIGTERM)
                        try:
                            p.wait(timeout=10)
                        except subprocess.TimeoutExpired:
                            p.kill()
                            p.wait()
print(f"bench blk: {reps} rounds of {seconds} s runs in {time.time() - t_start:.0f} s",
      file=sys.stderr)

for row in dict.fromkeys(row for row, _ in results):
    unit = "kiops" if "4k_" in row else "MB/s"
    med = {}
    for kind in backends:
        vals = results.get((row, kind))
        if vals:
            med[kind] = (statistics.median(v for v, _ in vals),
                         statistics.median(c for _, c in vals))
    vk = med.get("vhostkit")
    q = max((k for k in med if k.startswith("qsd")), key=lambda k: med[k][0], default=None)
    if vk:
        print(f"BENCH name={row}_vhostkit value={vk[0]:.2f} unit={unit}")
    if q:
        print(f"BENCH name={row}_qsd value={med[q][0]:.2f} unit={unit}")
        print(f"# {row}: qsd's better mode is aio={q.split('_', 1)[1]}", file=sys.stderr)
    if vk and q and med[q][0] > 0:
        print(f"BENCH name={row}_ratio value={vk[0] / med[q][0]:.2f} unit=x")
    if vk:
        print(f"BENCH name={row}_vhostkit_cpu value={vk[1]:.2f} unit=us_per_io")
    if q:
        print(f"BENCH name={row}_qsd_cpu value={med[q][1]:.2f} unit=us_per_io")
PY
  rm -rf "$dir"  # the 1 GiB image, also after a failure
  return "$status"
}
