// blk_bench: drives a vhost-user block back-end (vhostkit-blk or qemu-storage-daemon's
// vhost-user-blk export) with our FrontendClient + VirtioDriver and reports throughput.
//   blk_bench --socket PATH --mode randread|randwrite|seqread --bs BYTES --qd N
//             --seconds S --size BYTES
// Keeps N requests in flight on one queue; random offsets are block-aligned within
// --size. Prints: RESULT ops=<n> seconds=<s> iops=<x> mbps=<y>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "devices/blk/blk_frontend.h"

using namespace vhostkit;
using frontend::DriverBuffer;

int main(int argc, char** argv) {
  std::string sock, mode = "randread";
  std::uint64_t bs = 4096, size = 256ull << 20;
  unsigned qd = 32;
  double seconds = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i], v = argv[i + 1];
    if (a == "--socket")
      sock = v;
    else if (a == "--mode")
      mode = v;
    else if (a == "--bs")
      bs = std::stoull(v);
    else if (a == "--qd")
      qd = static_cast<unsigned>(std::stoul(v));
    else if (a == "--seconds")
      seconds = std::stod(v);
    else if (a == "--size")
      size = std::stoull(v);
    else {
      std::fprintf(stderr, "blk_bench: unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  bool write = mode == "randwrite", seq = mode == "seqread";
  if (sock.empty() || (!write && !seq && mode != "randread") || bs % 512 || bs == 0 || qd == 0 ||
      qd > 128 || size < bs) {
    std::fprintf(stderr, "blk_bench: bad arguments\n");
    return 2;
  }
  auto client = frontend::FrontendClient::connect(sock);
  if (!client) {
    std::fprintf(stderr, "blk_bench: %s\n", client.error().c_str());
    return 1;
  }
  testing::BlkFrontendOptions o;
  o.ring_size = 256;
  o.mem_bytes = ((qd * (bs + 4096) + (8ull << 20)) + 0xfffff) & ~0xfffffull;
  o.gpa_addresses = false;  // as QEMU 7.2 does; qemu-storage-daemon knows no other form
  testing::BlkFrontend fe(std::move(*client), o);
  if (auto r = fe.start(); !r) {
    std::fprintf(stderr, "blk_bench: %s\n", r.error().c_str());
    return 1;
  }
  struct Slot {
    Gpa hdr, data, status;
  };
  std::vector<Slot> slots(qd);
  for (auto& s : slots) {
    s.hdr = fe.alloc(16);
    s.data = fe.alloc(bs);
    s.status = fe.alloc(1);
    std::memset(fe.host(s.data, bs), 0x5a, bs);
  }
  std::mt19937_64 rng(42);
  const std::uint64_t blocks = size / bs;
  std::uint64_t next_seq = 0;
  std::vector<int> slot_of_id(65536, -1);
  auto submit = [&](int si, bool publish) {
    Slot& s = slots[static_cast<std::size_t>(si)];
    std::uint64_t block = seq ? (next_seq++ % blocks) : rng() % blocks;
    std::uint32_t type = write ? blk::kTOut : blk::kTIn;
    std::uint64_t sector = block * bs / 512;
    std::uint8_t* h = fe.host(s.hdr, 16);
    std::memset(h, 0, 16);
    std::memcpy(h, &type, 4);
    std::memcpy(h + 8, &sector, 8);
    *fe.host(s.status, 1) = 0xff;
    std::vector<DriverBuffer> b{
        {s.hdr, 16, false}, {s.data, static_cast<std::uint32_t>(bs), !write}, {s.status, 1, true}};
    auto id = fe.add(0, b, publish);
    if (!id) {
      std::fprintf(stderr, "blk_bench: %s\n", id.error().c_str());
      std::exit(1);
    }
    slot_of_id[*id] = si;
  };
  for (unsigned i = 0; i < qd; ++i) submit(static_cast<int>(i), false);
  fe.publish(0);
  std::uint64_t ops = 0;
  auto t0 = std::chrono::steady_clock::now();
  auto end = t0 + std::chrono::duration<double>(seconds);
  for (;;) {
    auto u = fe.wait(0);
    if (!u) {
      std::fprintf(stderr, "blk_bench: no completion within 10 s\n");
      return 1;
    }
    int si = slot_of_id[u->id];
    if (si < 0 || *fe.host(slots[static_cast<std::size_t>(si)].status, 1) != blk::kSOk) {
      std::fprintf(stderr, "blk_bench: request failed\n");
      return 1;
    }
    ++ops;
    if (std::chrono::steady_clock::now() >= end) break;
    submit(si, false);
    // Publish whatever completed meanwhile in one go, as a guest's blk-mq does.
    while (fe.driver(0).more_used()) {
      auto more = fe.driver(0).poll();
      if (!more) break;
      int sj = slot_of_id[more->id];
      ++ops;
      submit(sj, false);
    }
    fe.publish(0);
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("RESULT ops=%llu seconds=%.3f iops=%.1f mbps=%.2f\n",
              static_cast<unsigned long long>(ops), secs, ops / secs,
              ops * static_cast<double>(bs) / secs / 1e6);
  return 0;
}
