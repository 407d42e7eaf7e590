// viommu_driver: our front-end and guest driver model transmitting 64-byte frames through
// a vIOMMU that holds many live mappings, against any vhost-user net back-end (vhostkit-net
// --mode sink, DPDK's vhost PMD in testpmd rxonly). bench/viommu_bench.py runs it for
// `bench/run.sh viommu`, and in a quick form as the ctest interop.viommu_driver.
//
//   --entries N   N live mappings besides the rings, each one page at its own IOVA (a guard
//                 page apart, so no two merge), installed in the back-end's IOTLB before
//                 the run by one IOTLB update each.
//   --mode lazy   the N mappings are the transmit buffers, mapped once and kept (a page
//                 pool in premapped mode): frames use them in a scattered order that
//                 visits every one, nothing is mapped or invalidated per frame.
//   --mode strict every frame's buffer is mapped before it is offered and unmapped when it
//                 completes (dma_map/dma_unmap with a strict IOMMU: an invalidation per
//                 frame, and a miss per frame as the recycled IOVA was invalidated); the
//                 N mappings stay live beside them.
// Sends for --warmup seconds, then counts the completions of --seconds, then stops
// offering, waits for every frame in flight and prints
//   RESULT mode=<m> entries=<n> mpps=<completions per us> measured=<n> completed=<n>
//          misses=<n>
// `completed` counts every frame the back-end consumed (the harness compares it with the
// back-end's own counter); misses, the back-end's IOTLB misses the front-end answered
// during the measured seconds. Exits non-zero on any error, or if a frame stays in flight.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "tool_support.h"
#include "vhostkit/frontend/frontend_client.h"
#include "vhostkit/log.h"

using namespace vhostkit;
using namespace vhostkit::frontend;

namespace {

constexpr std::uint64_t kPage = 4096;
constexpr std::uint32_t kFrame = 12 + 64;    // virtio-net header + a minimal Ethernet frame
constexpr std::uint64_t kPoolPages = 1024;   // the pages the lazy mappings point into
constexpr std::uint64_t kStrictSlots = 512;  // strict buffers: twice the ring, never in use twice

int usage() {
  std::fprintf(stderr,
               "usage: viommu_driver --socket-path PATH --mode strict|lazy --entries N "
               "[--seconds S] [--warmup S]\n");
  return 2;
}

// An odd step near N * 0.618 that is coprime with N: k * step mod N visits every mapping
// once per N frames, far from its neighbours (a sorted list is walked a different
// distance each time, a last-hit cache does not help).
std::uint64_t scatter_step(std::uint64_t n) {
  std::uint64_t s = (n * 618 / 1000) | 1;
  while (std::gcd(s, n) != 1) s += 2;
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  std::string path, mode;
  std::uint64_t entries = 0;
  double seconds = 2, warmup = 0.5;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (i + 1 >= argc) return usage();
    if (a == "--socket-path")
      path = argv[++i];
    else if (a == "--mode")
      mode = argv[++i];
    else if (a == "--entries")
      entries = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--seconds")
      seconds = std::atof(argv[++i]);
    else if (a == "--warmup")
      warmup = std::atof(argv[++i]);
    else
      return usage();
  }
  if (path.empty() || (mode != "strict" && mode != "lazy") || entries == 0 ||
      entries > (1U << 22) || seconds <= 0 || warmup < 0)
    return usage();
  const bool lazy = mode == "lazy";
  tools::log_to_stderr(LogLevel::warn);

  std::unique_ptr<FrontendClient> client = tools::connect_when_up(path);
  if (!client) {
    std::fprintf(stderr, "viommu_driver: cannot connect to %s\n", path.c_str());
    return 1;
  }
  auto mem = GuestMemory::create({{Gpa(0), 16ULL << 20}});
  if (!mem) {
    std::fprintf(stderr, "guest memory: %s\n", mem.error().c_str());
    return 1;
  }
  Viommu io(ViommuMode::strict);
  ClientOptions co;
  co.want_features = virtio::bit(virtio::kFRingEventIdx) | virtio::bit(virtio::kFAccessPlatform);
  if (auto r = client->negotiate(co); !r) {
    std::fprintf(stderr, "negotiate: %s\n", r.error().c_str());
    return 1;
  }
  if (!client->iommu()) {
    std::fprintf(stderr, "the back-end did not accept VIRTIO_F_ACCESS_PLATFORM\n");
    return 1;
  }
  if (auto r = client->set_mem_table(*mem); !r) {
    std::fprintf(stderr, "set_mem_table: %s\n", r.error().c_str());
    return 1;
  }
  client->attach_viommu(io, *mem);
  DriverOptions d;
  d.size = 256;
  d.event_idx = true;
  d.iommu = &io;
  auto rx = VirtioDriver::create(*mem, d);
  auto tx = VirtioDriver::create(*mem, d);
  if (!rx || !tx) {
    std::fprintf(stderr, "rings: %s\n", (!rx ? rx.error() : tx.error()).c_str());
    return 1;
  }
  // The frames: one in each pool page and strict slot, written once.
  auto pool = mem->alloc(kPoolPages * kPage, kPage);
  auto slots = mem->alloc(kStrictSlots * kPage, kPage);
  if (!pool || !slots) {
    std::fprintf(stderr, "guest memory too small for the buffers\n");
    return 1;
  }
  std::uint8_t frame[kFrame] = {};
  std::uint8_t* eth = frame + 12;
  std::memset(eth, 0x02, 6);      // destination
  std::memset(eth + 6, 0x04, 6);  // source
  eth[12] = 0x88;                 // local experimental EtherType
  eth[13] = 0xb5;
  for (std::uint64_t i = 0; i < kPoolPages; ++i)
    if (!mem->write(*pool + i * kPage, frame)) return 1;
  for (std::uint64_t i = 0; i < kStrictSlots; ++i)
    if (!mem->write(*slots + i * kPage, frame)) return 1;

  // The N live mappings, installed in the back-end's IOTLB before any traffic.
  std::vector<Iova> live;
  live.reserve(entries);
  for (std::uint64_t i = 0; i < entries; ++i) {
    Iova v = io.map(*pool + (i % kPoolPages) * kPage, kFrame, Access::read);
    live.push_back(v);
    auto m = io.translate(v);
    if (!m) return 1;
    if (auto r = client->iotlb_update(*m); !r) {
      std::fprintf(stderr, "IOTLB update %llu: %s\n", static_cast<unsigned long long>(i),
                   r.error().c_str());
      return 1;
    }
  }

  auto nrx = client->start_queue(0, *mem, *rx);
  auto ntx = client->start_queue(1, *mem, *tx);
  if (!nrx || !ntx) {
    std::fprintf(stderr, "start_queue: %s\n", (!nrx ? nrx.error() : ntx.error()).c_str());
    return 1;
  }
  if (auto r = client->driver_ok(); !r) {
    std::fprintf(stderr, "driver_ok: %s\n", r.error().c_str());
    return 1;
  }

  const std::uint64_t step = scatter_step(entries);
  std::uint64_t offered = 0, completed = 0;
  auto offer = [&] {
    bool added = false;
    while (tx->free_descriptors() > 0) {
      DriverBuffer b{};
      if (lazy) {
        const std::uint64_t i = offered * step % entries;
        b = DriverBuffer{*pool + (i % kPoolPages) * kPage, kFrame, false, live[i]};
      } else {
        b = DriverBuffer{*slots + (offered % kStrictSlots) * kPage, kFrame, false};
      }
      if (!tx->add(std::span(&b, 1), false)) return false;
      ++offered;
      added = true;
    }
    if (added) {
      tx->publish();
      if (tx->kick_needed()) {
        std::uint64_t one = 1;
        (void)!::write(ntx->kick.get(), &one, 8);
      }
    }
    return true;
  };
  auto collect = [&] {
    while (tx->poll()) ++completed;
    return tx->device_errors() == 0;
  };

  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const auto measure_from =
      start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(warmup));
  const auto end = measure_from + std::chrono::duration_cast<Clock::duration>(
                                      std::chrono::duration<double>(seconds));
  std::uint64_t completed_at_start = 0, misses_at_start = 0;
  bool measuring = warmup == 0;
  auto now = start;
  while (now < end) {
    if (!offer() || !collect()) {
      std::fprintf(stderr, "viommu_driver: the driver failed (device error)\n");
      return 1;
    }
    now = Clock::now();
    if (!measuring && now >= measure_from) {
      measuring = true;
      completed_at_start = completed;
      misses_at_start = client->misses_answered();
    }
  }
  const std::uint64_t measured = completed - completed_at_start;
  const std::uint64_t misses = client->misses_answered() - misses_at_start;
  const double took = std::chrono::duration<double>(now - measure_from).count();
  // Drain: every frame offered must complete.
  const auto drain_end = Clock::now() + std::chrono::seconds(10);
  while (tx->outstanding() > 0 && Clock::now() < drain_end) {
    if (!collect()) break;
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  std::printf("RESULT mode=%s entries=%llu mpps=%.4f measured=%llu completed=%llu misses=%llu\n",
              mode.c_str(), static_cast<unsigned long long>(entries),
              static_cast<double>(measured) / took / 1e6, static_cast<unsigned long long>(measured),
              static_cast<unsigned long long>(completed), static_cast<unsigned long long>(misses));
  std::fflush(stdout);
  const bool ok = tx->outstanding() == 0 && tx->device_errors() == 0 && measured > 0;
  if (tx->outstanding() > 0)
    std::fprintf(stderr, "viommu_driver: %u frames still in flight after 10 s\n",
                 tx->outstanding());
  client->close();
  return ok ? 0 : 1;
}
