# bench/sections/blk.sh: vhostkit-blk against qemu-storage-daemon's vhost-user-blk export
# (Debian 12 ships it in qemu-system-common), both driven by the same front-end
# (bench/blk_bench.cpp: our FrontendClient + VirtioDriver, one queue, queue depth 32) on
# the same 256 MiB raw image (buffered I/O on both sides: vhostkit-blk opens the file
# without O_DIRECT, qemu-storage-daemon runs with cache.direct=off, its default).
# Prints, medians over VHOSTKIT_BENCH_REPETITIONS runs of 2 s each:
#   blk_randread_kiops_4k_{vhostkit,qsd}   4 KiB random reads, thousands per second
#   blk_randwrite_kiops_4k_{vhostkit,qsd}  4 KiB random writes, thousands per second
#   blk_seqread_mbps_1m_{vhostkit,qsd}     1 MiB sequential reads, MB/s
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
  dir=$(mktemp -d /tmp/vhostkit-bench-blk.XXXXXX)
  local img=$dir/disk.img
  dd if=/dev/urandom of="$img" bs=1M count=256 status=none
  python3 - "$build" "$img" "$dir" "$reps" "${qsd:-}" <<'PY'
import os, re, signal, statistics, subprocess, sys, time

build, img, work, reps, qsd = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
bench = os.path.join(build, "tests/devices/blk/blk_bench")
daemon = os.path.join(build, "apps/vhostkit-blk/vhostkit-blk")
modes = [("randread", 4096, "blk_randread_kiops_4k", "kiops"),
         ("randwrite", 4096, "blk_randwrite_kiops_4k", "kiops"),
         ("seqread", 1 << 20, "blk_seqread_mbps_1m", "MB/s")]


def start(kind):
    sock = os.path.join(work, kind + ".sock")
    if os.path.exists(sock):
        os.unlink(sock)
    if kind == "vhostkit":
        cmd = [daemon, "--socket-path", sock, "--blk-file", img, "--log-level", "warn"]
    else:
        cmd = [qsd, "--blockdev", f"driver=file,node-name=file0,filename={img}",
               "--export", f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,"
               f"addr.path={sock},writable=on"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while not os.path.exists(sock):
        if time.time() > deadline or p.poll() is not None:
            raise SystemExit(f"bench blk: {kind} did not start")
        time.sleep(0.05)
    return p, sock


results = {}
kinds = ["vhostkit"] + (["qsd"] if qsd else [])
if not qsd:
    print("bench blk: qemu-storage-daemon not found (package qemu-system-common); "
          "no _qsd figures", file=sys.stderr)
for _ in range(reps):
    for kind in kinds:  # interleaved, so drift on the shared machine hits both alike
        p, sock = start(kind)
        try:
            for mode, bs, name, unit in modes:
                out = subprocess.run([bench, "--socket", sock, "--mode", mode, "--bs", str(bs),
                                      "--qd", "32", "--seconds", "2", "--size", str(256 << 20)],
                                     capture_output=True, text=True, timeout=60)
                m = re.search(r"iops=([\d.]+) mbps=([\d.]+)", out.stdout)
                if not m:
                    raise SystemExit(f"bench blk: {kind} {mode}: {out.stderr.strip()}")
                v = float(m.group(1)) / 1000 if unit == "kiops" else float(m.group(2))
                results.setdefault((name, kind, unit), []).append(v)
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=10)
for (name, kind, unit), vals in results.items():
    print(f"BENCH name={name}_{kind} value={statistics.median(vals):.2f} unit={unit}")
for mode, bs, name, unit in modes:
    a, b = results.get((name, "vhostkit", unit)), results.get((name, "qsd", unit))
    if a and b and statistics.median(b) > 0:
        print(f"BENCH name={name}_vhostkit_over_qsd "
              f"value={statistics.median(a) / statistics.median(b):.2f} unit=x")
PY
  rm -rf "$dir"
}
