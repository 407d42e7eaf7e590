// net_logging_bench: what dirty logging costs a vhostkit-net back-end in source mode.
//   net_logging_bench --socket PATH [--rounds R] [--seconds S] [--ram-mib M]
//                     [--queue-size N] [--iommu on|off] [--layout packed|scattered]
// Works against any vhost-user net back-end (vhostkit-net --mode source, DPDK's vhost
// PMD in testpmd txonly). Sets up both queues of pair 0; the transmit queue stays empty.
// Drives the device's receive queue (queue 0) with the guest driver model
// (FrontendClient + VirtioDriver) from one thread that never sleeps and asks for no
// interrupts (a polling driver, as DPDK's virtio PMD): it keeps every free
// receive buffer posted and collects frames as fast as the back-end fills them. Receive
// buffers are 2 KiB, over the whole guest RAM, used in turn (first in, first out):
//   scattered  one per page in a shuffled order (as vhostkit-migrate does): consecutive
//              frames land in pages all over the log, the worst case for the back-end's
//              log cache;
//   packed     two per page in address order, as Linux's virtio-net carves receive
//              buffers out of page fragments: consecutive frames share log words.
//
// Each round measures two phases of S seconds, logging off and logging on, in alternating
// order (off/on, then on/off) so a drift of the shared machine hurts both the same. With
// logging on, SET_LOG_BASE + VHOST_F_LOG_ALL are in force and the log is fetched and
// cleared every 20 ms, as a migration's rounds would, so the back-end keeps setting bits
// that were clear. Each phase starts after 100 ms of traffic in its mode.
// Prints one line per phase:
//   PHASE round=<r> logging=<on|off> frames=<n> seconds=<s> mpps=<x>
// and exits non-zero if the device stops delivering or a frame is malformed.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "vhostkit/devices/net.h"
#include "vhostkit/frontend/frontend_client.h"
#include "vhostkit/frontend/guest_memory.h"
#include "vhostkit/frontend/viommu.h"
#include "vhostkit/frontend/virtio_driver.h"
#include "vhostkit/virtio_spec.h"

namespace {

using namespace vhostkit;
using namespace vhostkit::frontend;
using Clock = std::chrono::steady_clock;

constexpr std::uint32_t kRxLen = 2048;
constexpr std::uint64_t kLowGpa = 0x100000;
constexpr std::uint64_t kHighGpa = 0x100000000 + 0x200000;

struct Args {
  std::string socket;
  unsigned rounds = 5;
  double seconds = 2;
  std::uint64_t ram_mib = 64;
  std::uint16_t queue_size = 256;
  bool iommu = false;
  std::string layout = "packed";
};

class Receiver {
 public:
  Receiver(GuestMemory& mem, VirtioDriver& drv, Viommu* iommu, UniqueFd kick,
           std::vector<Gpa> pages)
      : mem_(mem), drv_(drv), iommu_(iommu), kick_(std::move(kick)) {
    for (Gpa g : pages) free_.push_back(g);
    slot_.assign(65536, Gpa(0));
  }

  // Runs for `seconds`, calling tick() about every 20 ms; returns the frames collected.
  template <typename Tick>
  std::uint64_t run(double seconds, Tick&& tick) {
    const auto t0 = Clock::now();
    const auto end =
        t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
    auto next_tick = t0 + std::chrono::milliseconds(20);
    std::uint64_t frames = 0;
    std::uint32_t spins = 0;
    for (;;) {
      bool added = false;
      while (!free_.empty() && drv_.free_descriptors() > 0) {
        Gpa g = free_.front();
        DriverBuffer b{g, kRxLen, true};
        auto id = drv_.add(std::span(&b, 1), false);
        if (!id) break;
        free_.pop_front();
        slot_[*id] = g;
        added = true;
      }
      if (added) {
        drv_.publish();
        if (drv_.kick_needed()) {
          std::uint64_t one = 1;
          (void)!::write(kick_.get(), &one, 8);
        }
      }
      while (auto u = drv_.poll()) {
        Gpa g = slot_[u->id];
        if (u->len < 12 + 60) ++bad_;
        free_.push_back(g);
        ++frames;
      }
      if (iommu_ != nullptr) iommu_->flush();
      if (++spins % 64 == 0) {
        const auto now = Clock::now();
        if (now >= end) break;
        if (now >= next_tick) {
          tick();
          next_tick = now + std::chrono::milliseconds(20);
        }
      }
    }
    return frames;
  }
  std::uint64_t bad() const { return bad_; }
  std::uint64_t errors() const { return drv_.device_errors(); }

 private:
  [[maybe_unused]] GuestMemory& mem_;
  VirtioDriver& drv_;
  Viommu* iommu_;
  UniqueFd kick_;
  std::deque<Gpa> free_;
  std::vector<Gpa> slot_;
  std::uint64_t bad_ = 0;
};

int fail(const std::string& what, const std::string& e) {
  std::fprintf(stderr, "net_logging_bench: %s: %s\n", what.c_str(), e.c_str());
  return 1;
}

int run(const Args& a) {
  const std::uint64_t half = a.ram_mib * (1ULL << 20) / 2;
  auto mem = GuestMemory::create({{Gpa(kLowGpa), half}, {Gpa(kHighGpa), half}});
  if (!mem) return fail("guest memory", mem.error());
  // Before the client: its back-end channel thread answers IOTLB misses from it.
  Viommu viommu(ViommuMode::strict);
  std::unique_ptr<FrontendClient> client;
  for (int attempt = 0; attempt < 100 && !client; ++attempt) {
    if (auto c = FrontendClient::connect(a.socket))
      client = std::move(*c);
    else
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (!client) return fail("connect", a.socket);
  ClientOptions co;
  co.want_features = virtio::bit(virtio::kFRingEventIdx) | virtio::bit(kNetFMrgRxbuf);
  if (a.iommu) co.want_features |= virtio::bit(virtio::kFAccessPlatform);
  if (auto r = client->negotiate(co); !r) return fail("negotiation", r.error());
  if (a.iommu && !client->iommu()) return fail("negotiation", "no VIRTIO_F_ACCESS_PLATFORM");
  if (auto r = client->set_mem_table(*mem); !r) return fail("memory table", r.error());
  if (a.iommu) client->attach_viommu(viommu, *mem);
  DriverOptions d;
  d.size = a.queue_size;
  d.event_idx = true;
  d.iommu = a.iommu ? &viommu : nullptr;
  auto drv = VirtioDriver::create(*mem, d);
  if (!drv) return fail("driver", drv.error());
  drv->disable_interrupts();  // a polling guest driver, as DPDK's virtio PMD
  // The transmit queue of the pair too, empty: a guest sets up both, and DPDK's vhost
  // back-end starts a net device only when the pair is ready.
  DriverOptions td = d;
  td.size = 64;
  auto tx = VirtioDriver::create(*mem, td);
  if (!tx) return fail("driver", tx.error());
  std::vector<Gpa> pages;
  if (a.layout == "scattered") {
    while (auto g = mem->alloc(kPageSize, kPageSize)) pages.push_back(*g);
    std::shuffle(pages.begin(), pages.end(), std::mt19937_64(0x6c6f6767696e67ULL));
  } else {
    while (auto g = mem->alloc(kRxLen, kRxLen)) pages.push_back(*g);
  }
  auto n = client->start_queue(0, *mem, *drv);
  if (!n) return fail("queue 0", n.error());
  auto tn = client->start_queue(1, *mem, *tx);
  if (!tn) return fail("queue 1", tn.error());
  if (auto r = client->driver_ok(); !r) return fail("driver_ok", r.error());
  Receiver rx(*mem, *drv, a.iommu ? &viommu : nullptr, std::move(n->kick), std::move(pages));

  const std::uint64_t log_bytes = (mem->end_gpa().value / kPageSize + 7) / 8;
  bool logging = false;
  auto set_logging = [&](bool on) -> Result<void, std::string> {
    if (on == logging) return {};
    logging = on;
    return on ? client->enable_logging(log_bytes) : client->disable_logging();
  };
  std::uint64_t cleared = 0;
  auto clear_log = [&] {
    if (!logging || client->log() == nullptr) return;
    cleared +=
        client->log()->fetch_and_clear(0, client->log()->size_bytes() * 8, [](std::uint64_t) {});
  };
  rx.run(0.3, [] {});  // warm-up
  for (unsigned r = 0; r < a.rounds; ++r) {
    for (int k = 0; k < 2; ++k) {
      const bool on = (r % 2 == 0) ? k == 1 : k == 0;
      if (auto s = set_logging(on); !s) return fail("logging", s.error());
      rx.run(0.1, clear_log);
      const auto t0 = Clock::now();
      const std::uint64_t frames = rx.run(a.seconds, clear_log);
      const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
      std::printf("PHASE round=%u logging=%s frames=%llu seconds=%.3f mpps=%.4f\n", r,
                  on ? "on" : "off", static_cast<unsigned long long>(frames), secs,
                  static_cast<double>(frames) / secs / 1e6);
      std::fflush(stdout);
      if (frames == 0) return fail("traffic", "no frames in a phase");
    }
  }
  if (auto s = set_logging(false); !s) return fail("logging", s.error());
  std::printf("SUMMARY pages_logged=%llu bad_frames=%llu device_errors=%llu\n",
              static_cast<unsigned long long>(cleared), static_cast<unsigned long long>(rx.bad()),
              static_cast<unsigned long long>(rx.errors()));
  if (rx.bad() != 0 || rx.errors() != 0) return fail("traffic", "malformed frames or ring errors");
  if (cleared == 0) return fail("logging", "the back-end logged no page");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--socket")
      a.socket = v;
    else if (k == "--rounds")
      a.rounds = static_cast<unsigned>(std::stoul(v));
    else if (k == "--seconds")
      a.seconds = std::stod(v);
    else if (k == "--ram-mib")
      a.ram_mib = std::stoull(v);
    else if (k == "--queue-size")
      a.queue_size = static_cast<std::uint16_t>(std::stoul(v));
    else if (k == "--iommu")
      a.iommu = v == "on";
    else if (k == "--layout")
      a.layout = v;
    else {
      std::fprintf(stderr, "net_logging_bench: unknown argument %s\n", k.c_str());
      return 2;
    }
  }
  if (a.socket.empty() || a.rounds == 0 || a.seconds <= 0 || a.ram_mib < 8 ||
      (a.layout != "scattered" && a.layout != "packed")) {
    std::fprintf(stderr, "net_logging_bench: bad arguments (need --socket PATH)\n");
    return 2;
  }
  return run(a);
}
