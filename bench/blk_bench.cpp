// blk_bench: drives a vhost-user block back-end (vhostkit-blk or qemu-storage-daemon's
// vhost-user-blk export) with our FrontendClient + VirtioDriver and reports throughput.
//   blk_bench --socket PATH --mode randread|randwrite|seqread --bs BYTES --qd N
//             --seconds S --size BYTES [--logging-rounds R]
// Keeps N requests in flight on one queue; random offsets are block-aligned within
// --size. Prints: RESULT ops=<n> seconds=<s> iops=<x> mbps=<y>
// With --logging-rounds R: R rounds of two phases of S seconds, dirty logging off and on
// (SET_LOG_BASE + VHOST_F_LOG_ALL) in alternating order, one line each:
//   PHASE round=<r> logging=<on|off> ops=<n> seconds=<s> iops=<x> mbps=<y>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
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
  unsigned logging_rounds = 0;
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
    else if (a == "--logging-rounds")
      logging_rounds = static_cast<unsigned>(std::stoul(v));
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
  // Keeps qd requests in flight for `secs` seconds, calling tick() about every 20 ms;
  // returns the requests completed, or nullopt on a failure (already reported).
  auto measure = [&](double secs, auto&& tick) -> std::optional<std::uint64_t> {
    std::uint64_t ops = 0;
    const auto t0 = std::chrono::steady_clock::now();
    const auto end = t0 + std::chrono::duration<double>(secs);
    auto next_tick = t0 + std::chrono::milliseconds(20);
    for (;;) {
      auto u = fe.wait(0);
      if (!u) {
        std::fprintf(stderr, "blk_bench: no completion within 10 s\n");
        return std::nullopt;
      }
      int si = slot_of_id[u->id];
      if (si < 0 || *fe.host(slots[static_cast<std::size_t>(si)].status, 1) != blk::kSOk) {
        std::fprintf(stderr, "blk_bench: request failed\n");
        return std::nullopt;
      }
      ++ops;
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
      const auto now = std::chrono::steady_clock::now();
      if (now >= end) break;
      if (now >= next_tick) {
        tick();
        next_tick = now + std::chrono::milliseconds(20);
      }
    }
    return ops;
  };
  if (logging_rounds == 0) {
    auto t0 = std::chrono::steady_clock::now();
    auto ops = measure(seconds, [] {});
    if (!ops) return 1;
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("RESULT ops=%llu seconds=%.3f iops=%.1f mbps=%.2f\n",
                static_cast<unsigned long long>(*ops), secs, *ops / secs,
                *ops * static_cast<double>(bs) / secs / 1e6);
    return 0;
  }
  // Logging off versus on, alternating (off/on, then on/off), each phase after 100 ms
  // in its mode; with logging on the log is fetched and cleared every 20 ms, as a
  // migration's rounds would.
  const std::uint64_t log_bytes = (fe.mem().end_gpa().value / kPageSize + 7) / 8;
  bool logging = false;
  std::uint64_t logged = 0;
  auto clear_log = [&] {
    if (logging && fe.client().log() != nullptr)
      logged += fe.client().log()->fetch_and_clear(0, fe.client().log()->size_bytes() * 8,
                                                   [](std::uint64_t) {});
  };
  for (unsigned r = 0; r < logging_rounds; ++r) {
    for (int k = 0; k < 2; ++k) {
      const bool on = (r % 2 == 0) ? k == 1 : k == 0;
      if (on != logging) {
        auto s = on ? fe.client().enable_logging(log_bytes) : fe.client().disable_logging();
        if (!s) {
          std::fprintf(stderr, "blk_bench: logging: %s\n", s.error().c_str());
          return 1;
        }
        logging = on;
      }
      if (!measure(0.1, clear_log)) return 1;
      auto t0 = std::chrono::steady_clock::now();
      auto ops = measure(seconds, clear_log);
      if (!ops) return 1;
      double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("PHASE round=%u logging=%s ops=%llu seconds=%.3f iops=%.1f mbps=%.2f\n", r,
                  on ? "on" : "off", static_cast<unsigned long long>(*ops), secs, *ops / secs,
                  *ops * static_cast<double>(bs) / secs / 1e6);
      std::fflush(stdout);
    }
  }
  // A read writes guest memory, so it must have been logged; a write does not.
  std::printf("SUMMARY pages_logged=%llu\n", static_cast<unsigned long long>(logged));
  if (!write && logged == 0) {
    std::fprintf(stderr, "blk_bench: reads with logging on logged no page\n");
    return 1;
  }
  return 0;
}
