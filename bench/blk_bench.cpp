// blk_bench: drives a vhost-user block back-end (vhostkit-blk or qemu-storage-daemon's
// vhost-user-blk export) with our FrontendClient + VirtioDriver and reports throughput.
//   blk_bench --socket PATH --mode randread|randwrite|seqread|seqwrite --bs BYTES --qd N
//             --seconds S --size BYTES [--queues Q] [--cpu-pid PID] [--logging-rounds R]
// Keeps N requests in flight on each of Q queues, one thread per queue (as a guest's
// vCPUs would); random offsets are block-aligned within --size, sequential ones walk
// each queue's own 1/Q of it. Prints: RESULT ops=<n> seconds=<s> iops=<x> mbps=<y>
// With --cpu-pid, also cpu_us=<microseconds of PID's utime+stime over the measured
// seconds (/proc/PID/stat, every thread)>.
// With --logging-rounds R: R rounds of two phases of S seconds, dirty logging off and on
// (SET_LOG_BASE + VHOST_F_LOG_ALL) in alternating order, one line each:
//   PHASE round=<r> logging=<on|off> ops=<n> seconds=<s> iops=<x> mbps=<y>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "devices/blk/blk_frontend.h"

using namespace vhostkit;
using frontend::DriverBuffer;

namespace {
// utime + stime of a process in microseconds, or -1.
double cpu_us(int pid) {
  if (pid <= 0) return -1;
  std::string path = "/proc/" + std::to_string(pid) + "/stat";
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (f == nullptr) return -1;
  char buf[1024];
  std::size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  std::string stat(buf, n);
  auto paren = stat.rfind(')');
  if (paren == std::string::npos) return -1;
  unsigned long long utime = 0, stime = 0;
  // After ") ": state, then fields 4..13; utime and stime are fields 14 and 15.
  if (std::sscanf(stat.c_str() + paren + 1,
                  " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime,
                  &stime) != 2)
    return -1;
  return static_cast<double>(utime + stime) * 1e6 / static_cast<double>(::sysconf(_SC_CLK_TCK));
}
}  // namespace

int main(int argc, char** argv) {
  std::string sock, mode = "randread";
  std::uint64_t bs = 4096, size = 256ull << 20;
  unsigned qd = 32;
  unsigned logging_rounds = 0;
  unsigned queues = 1;
  int cpu_pid = 0;
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
    else if (a == "--cpu-pid")
      cpu_pid = std::stoi(v);
    else if (a == "--queues")
      queues = static_cast<unsigned>(std::stoul(v));
    else if (a == "--logging-rounds")
      logging_rounds = static_cast<unsigned>(std::stoul(v));
    else {
      std::fprintf(stderr, "blk_bench: unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  bool write = mode == "randwrite" || mode == "seqwrite";
  bool seq = mode == "seqread" || mode == "seqwrite";
  if (sock.empty() || (!write && !seq && mode != "randread") || bs % 512 || bs == 0 || qd == 0 ||
      qd > 128 || size < bs * queues || queues == 0 || queues > 16 ||
      (logging_rounds > 0 && queues != 1)) {
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
  o.queues = queues;
  o.mem_bytes = ((queues * qd * (bs + 4096) + (8ull << 20)) + 0xfffff) & ~0xfffffull;
  o.gpa_addresses = false;  // as QEMU 7.2 does; qemu-storage-daemon knows no other form
  testing::BlkFrontend fe(std::move(*client), o);
  if (auto r = fe.start(); !r) {
    std::fprintf(stderr, "blk_bench: %s\n", r.error().c_str());
    return 1;
  }
  struct Slot {
    Gpa hdr, data, status;
  };
  // One queue's driver: qd slots kept in flight.
  struct Driver {
    std::uint32_t q = 0;
    std::vector<Slot> slots;
    std::mt19937_64 rng;
    std::uint64_t first_block = 0, blocks = 0, next_seq = 0;
    std::vector<int> slot_of_id = std::vector<int>(65536, -1);
  };
  std::vector<Driver> drivers(queues);
  const std::uint64_t blocks = size / bs;
  for (unsigned q = 0; q < queues; ++q) {
    Driver& d = drivers[q];
    d.q = q;
    d.rng.seed(42 + q);
    d.blocks = seq ? blocks / queues : blocks;
    d.first_block = seq ? q * d.blocks : 0;
    d.slots.resize(qd);
    for (auto& s : d.slots) {
      s.hdr = fe.alloc(16);
      // Page-aligned data, as a guest's page-cache and O_DIRECT buffers are.
      Gpa raw = fe.alloc(bs + 4096);
      s.data = Gpa((raw.value + 4095) & ~4095ull);
      s.status = fe.alloc(1);
      std::memset(fe.host(s.data, bs), 0x5a, bs);
    }
  }
  auto submit = [&](Driver& d, int si, bool publish) {
    Slot& s = d.slots[static_cast<std::size_t>(si)];
    std::uint64_t block = d.first_block + (seq ? (d.next_seq++ % d.blocks) : d.rng() % d.blocks);
    std::uint32_t type = write ? blk::kTOut : blk::kTIn;
    std::uint64_t sector = block * bs / 512;
    std::uint8_t* h = fe.host(s.hdr, 16);
    std::memset(h, 0, 16);
    std::memcpy(h, &type, 4);
    std::memcpy(h + 8, &sector, 8);
    *fe.host(s.status, 1) = 0xff;
    std::vector<DriverBuffer> b{
        {s.hdr, 16, false}, {s.data, static_cast<std::uint32_t>(bs), !write}, {s.status, 1, true}};
    auto id = fe.add(d.q, b, publish);
    if (!id) {
      std::fprintf(stderr, "blk_bench: %s\n", id.error().c_str());
      std::exit(1);
    }
    d.slot_of_id[*id] = si;
  };
  for (Driver& d : drivers) {
    for (unsigned i = 0; i < qd; ++i) submit(d, static_cast<int>(i), false);
    fe.publish(d.q);
  }
  // Keeps qd requests in flight on d's queue for `secs` seconds, calling tick() about
  // every 20 ms; returns the requests completed, or nullopt on a failure (reported).
  auto measure_queue = [&](Driver& d, double secs, auto&& tick) -> std::optional<std::uint64_t> {
    std::uint64_t ops = 0;
    const auto t0 = std::chrono::steady_clock::now();
    const auto end = t0 + std::chrono::duration<double>(secs);
    auto next_tick = t0 + std::chrono::milliseconds(20);
    for (;;) {
      auto u = fe.wait(d.q);
      if (!u) {
        std::fprintf(stderr, "blk_bench: no completion within 10 s\n");
        return std::nullopt;
      }
      int si = d.slot_of_id[u->id];
      if (si < 0 || *fe.host(d.slots[static_cast<std::size_t>(si)].status, 1) != blk::kSOk) {
        std::fprintf(stderr, "blk_bench: request failed\n");
        return std::nullopt;
      }
      ++ops;
      submit(d, si, false);
      // Publish whatever completed meanwhile in one go, as a guest's blk-mq does.
      while (fe.driver(d.q).more_used()) {
        auto more = fe.driver(d.q).poll();
        if (!more) break;
        int sj = d.slot_of_id[more->id];
        if (sj < 0 || *fe.host(d.slots[static_cast<std::size_t>(sj)].status, 1) != blk::kSOk) {
          std::fprintf(stderr, "blk_bench: request failed\n");
          return std::nullopt;
        }
        ++ops;
        submit(d, sj, false);
      }
      fe.publish(d.q);
      const auto now = std::chrono::steady_clock::now();
      if (now >= end) break;
      if (now >= next_tick) {
        tick();
        next_tick = now + std::chrono::milliseconds(20);
      }
    }
    return ops;
  };
  auto measure = [&](double secs, auto&& tick) -> std::optional<std::uint64_t> {
    return measure_queue(drivers[0], secs, tick);
  };
  // Waits for the qd requests still in flight on d's queue, so that the back-end is not
  // left with requests of a front-end that is gone (qemu-storage-daemon 7.2 aborts on
  // that now and then).
  auto drain = [&](Driver& d) {
    for (unsigned left = qd; left > 0; --left)
      if (!fe.wait(d.q)) return false;
    return true;
  };
  if (logging_rounds == 0) {
    std::vector<std::optional<std::uint64_t>> got(queues);
    const double cpu0 = cpu_us(cpu_pid);
    auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> threads;
    for (unsigned q = 1; q < queues; ++q)
      threads.emplace_back([&, q] { got[q] = measure_queue(drivers[q], seconds, [] {}); });
    got[0] = measure_queue(drivers[0], seconds, [] {});
    for (auto& t : threads) t.join();
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double cpu1 = cpu_us(cpu_pid);
    for (Driver& d : drivers)
      if (!drain(d)) {
        std::fprintf(stderr, "blk_bench: requests still in flight after 10 s\n");
        return 1;
      }
    std::uint64_t ops = 0;
    for (auto& g : got) {
      if (!g) return 1;
      ops += *g;
    }
    std::printf("RESULT ops=%llu seconds=%.3f iops=%.1f mbps=%.2f",
                static_cast<unsigned long long>(ops), secs, ops / secs,
                ops * static_cast<double>(bs) / secs / 1e6);
    if (cpu0 >= 0 && cpu1 >= 0) std::printf(" cpu_us=%.0f", cpu1 - cpu0);
    std::printf("\n");
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
  if (!drain(drivers[0])) {
    std::fprintf(stderr, "blk_bench: requests still in flight after 10 s\n");
    return 1;
  }
  // A read writes guest memory, so it must have been logged; a write does not.
  std::printf("SUMMARY pages_logged=%llu\n", static_cast<unsigned long long>(logged));
  if (!write && logged == 0) {
    std::fprintf(stderr, "blk_bench: reads with logging on logged no page\n");
    return 1;
  }
  return 0;
}
