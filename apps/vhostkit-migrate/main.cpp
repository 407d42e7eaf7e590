// vhostkit-migrate: live-migrates a running vhost-user network device between two
// back-ends under receive traffic and proves that no page was lost.
//
// The program plays the VMM: it creates guest RAM (two regions at odd GPAs, one above
// 4 GiB), drives the device's receive queue (queue 0) with the guest driver model
// (through a strict vIOMMU unless --iommu off), and offers buffers at --rate per second
// that the source back-end fills with frames (vhostkit-net --mode source, or
// tests/sink_backend --source). The buffers are the pages of guest RAM in a shuffled
// order and the guest never writes them itself, so a frame write the back-end did not
// log leaves the page's older bytes on the destination. After --warmup-ms it migrates to the
// destination back-end (progress line per round), keeps the traffic going there for --after-ms, and
// prints
//   VERDICT pages_compared=<n> pages_differing=<n> downtime_ms=<x>
//   DEVICE_STATE carried=<0|1> bytes=<n>
// (carried when both back-ends offer VHOST_USER_PROTOCOL_F_DEVICE_STATE: their own state,
// counters for instance, goes from the source to the destination).
// Exit status 0 only if no page differs, the rings match and frames keep arriving on the
// destination; 1 otherwise; 2 on a usage error.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include "vhostkit/frontend/frontend_client.h"
#include "vhostkit/frontend/migration.h"
#include "vhostkit/log.h"
#include "vhostkit/virtio_spec.h"

namespace {

using namespace vhostkit;
using namespace vhostkit::frontend;
using Clock = std::chrono::steady_clock;

constexpr std::uint32_t kRxLen = 2048;                      // bytes per receive buffer
constexpr std::uint64_t kLowGpa = 0x100000;                 // region 0: 1 MiB up
constexpr std::uint64_t kHighGpa = 0x100000000 + 0x200000;  // region 1: above 4 GiB

struct Args {
  std::string source, destination;
  std::uint64_t ram_mib = 256;
  std::string iommu = "on";
  std::string updates = "gpa";
  double rate = 50000;  // buffers per second; 0: as fast as the back-end fills them
  std::uint16_t queue_size = 256;
  bool packed = false;
  unsigned warmup_ms = 300;
  unsigned after_ms = 300;
  unsigned max_iterations = 30;
  std::uint64_t converge_pages = 64;
  unsigned round_interval_ms = 10;
};

std::unique_ptr<FrontendClient> connect_retry(const std::string& path) {
  for (int attempt = 0; attempt < 100; ++attempt) {
    if (auto c = FrontendClient::connect(path)) return std::move(*c);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return nullptr;
}

// The guest: posts receive buffers at the configured rate and collects frames.
class RxGuest {
 public:
  RxGuest(const Args& a, GuestMemory* mem, GuestDirtyLog* log, Viommu* iommu, VirtioDriver* drv)
      : args_(a), mem_(mem), log_(log), iommu_(iommu), drv_(drv) {}
  ~RxGuest() { stop(); }

  void add_buffer(Gpa g) { free_.push_back(g); }
  void set_kick(UniqueFd kick) { kick_ = std::move(kick); }
  void start() {
    thread_ = std::thread([this] { loop(); });
  }
  void stop() {
    if (paused_.owns_lock()) paused_.unlock();
    stop_.store(true);
    if (thread_.joinable()) thread_.join();
  }
  void pause() { paused_ = std::unique_lock(mu_); }
  void resume(GuestMemory* mem, std::vector<RingNotifiers>& n) {
    mem_ = mem;
    kick_ = std::move(n[0].kick);
    paused_.unlock();
  }
  std::uint64_t frames() const { return frames_.load(); }
  std::uint64_t offered() const { return offered_.load(); }
  std::uint64_t bad_frames() const { return bad_.load(); }

 private:
  void loop() {
    const auto t0 = Clock::now();
    std::uint64_t posted = 0;
    while (!stop_.load()) {
      {
        std::lock_guard lk(mu_);
        const double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
        const std::uint64_t allowed =
            args_.rate > 0 ? static_cast<std::uint64_t>(elapsed * args_.rate) : UINT64_MAX;
        bool added = false;
        while (posted < allowed && !free_.empty() && drv_->free_descriptors() > 0) {
          Gpa g = free_.front();
          free_.pop_front();
          DriverBuffer b{g, kRxLen, true};
          auto id = drv_->add(std::span(&b, 1), false);
          if (!id) {
            free_.push_front(g);
            break;
          }
          inflight_[*id] = g;
          ++posted;
          offered_.fetch_add(1);
          added = true;
        }
        if (added) {
          drv_->publish();
          if (drv_->kick_needed()) {
            std::uint64_t one = 1;
            (void)!::write(kick_.get(), &one, 8);
          }
        }
        while (auto u = drv_->poll()) {
          auto it = inflight_.find(u->id);
          if (it == inflight_.end()) {
            bad_.fetch_add(1);
            continue;
          }
          // A frame behind the 12-byte virtio-net header, to the broadcast address.
          std::uint8_t head[18];
          if (u->len < 12 + 60 || !mem_->read(it->second, head) ||
              std::memcmp(head + 12, "\xff\xff\xff\xff\xff\xff", 6) != 0)
            bad_.fetch_add(1);
          frames_.fetch_add(1);
          free_.push_back(it->second);
          inflight_.erase(it);
        }
        if (iommu_ != nullptr) iommu_->flush();
      }
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }

  const Args& args_;
  GuestMemory* mem_;
  [[maybe_unused]] GuestDirtyLog* log_;  // guest writes are recorded by the driver's observer
  Viommu* iommu_;
  VirtioDriver* drv_;
  UniqueFd kick_;
  std::mutex mu_;
  std::unique_lock<std::mutex> paused_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::deque<Gpa> free_;
  std::map<std::uint16_t, Gpa> inflight_;
  std::atomic<std::uint64_t> frames_{0};
  std::atomic<std::uint64_t> offered_{0};
  std::atomic<std::uint64_t> bad_{0};
};

int run(const Args& a) {
  set_log_sink(
      [](LogLevel l, std::string_view line) {
        std::fprintf(stderr, "vhostkit-migrate: %s: %.*s\n", to_string(l),
                     static_cast<int>(line.size()), line.data());
      },
      LogLevel::warn);
  const bool use_iommu = a.iommu == "on";
  const std::uint64_t half = a.ram_mib * (1ULL << 20) / 2;
  std::vector<GuestRegionLayout> layout{{Gpa(kLowGpa), half}, {Gpa(kHighGpa), half}};
  auto src_mem = GuestMemory::create(layout);
  auto dst_mem = GuestMemory::create(layout);
  if (!src_mem || !dst_mem) {
    std::fprintf(stderr, "vhostkit-migrate: guest memory: %s\n",
                 (!src_mem ? src_mem.error() : dst_mem.error()).c_str());
    return 1;
  }
  // Before the clients: their back-end channel threads answer IOTLB misses from it until
  // the clients are destroyed, so it must outlive them.
  Viommu viommu(ViommuMode::strict);
  auto source = connect_retry(a.source);
  auto destination = connect_retry(a.destination);
  if (!source || !destination) {
    std::fprintf(stderr, "vhostkit-migrate: cannot connect to %s\n",
                 (!source ? a.source : a.destination).c_str());
    return 1;
  }
  ClientOptions co;
  co.want_features = virtio::bit(virtio::kFRingEventIdx);
  if (use_iommu) co.want_features |= virtio::bit(virtio::kFAccessPlatform);
  if (a.packed) co.want_features |= virtio::bit(virtio::kFRingPacked);
  co.want_gpa_addresses = a.updates == "gpa";
  auto fail = [](const std::string& what, const std::string& e) {
    std::fprintf(stderr, "vhostkit-migrate: %s: %s\n", what.c_str(), e.c_str());
    return 1;
  };
  if (auto r = source->negotiate(co); !r) return fail("source negotiation", r.error());
  if (use_iommu && !source->iommu()) return fail("source", "VIRTIO_F_ACCESS_PLATFORM not accepted");
  if (co.want_gpa_addresses != source->gpa_addresses())
    return fail("source", "the requested IOTLB update form was not negotiated");
  if (auto r = source->set_mem_table(*src_mem); !r) return fail("source memory table", r.error());
  if (use_iommu) source->attach_viommu(viommu, *src_mem);
  DriverOptions d;
  d.packed = a.packed;
  d.size = a.queue_size;
  d.event_idx = true;
  d.iommu = use_iommu ? &viommu : nullptr;
  auto drv = VirtioDriver::create(*src_mem, d);
  if (!drv) return fail("driver", drv.error());
  GuestDirtyLog guest_log(src_mem->end_gpa());
  guest_log.attach(*drv);
  RxGuest guest(a, &*src_mem, &guest_log, use_iommu ? &viommu : nullptr, &*drv);
  // Receive buffers everywhere in guest RAM after the rings, one per page, in a shuffled
  // order as a guest's page allocator hands them out: each burst of frames lands in
  // pages spread over the whole log, so the back-end's log writes follow no fixed pattern.
  std::vector<Gpa> pages;
  while (auto g = src_mem->alloc(kPageSize, kPageSize)) pages.push_back(*g);
  std::shuffle(pages.begin(), pages.end(), std::mt19937_64(0x7668'6f73'746b'6974ULL));
  for (Gpa g : pages) guest.add_buffer(g);
  const std::uint64_t buffers = pages.size();
  auto n = source->start_queue(0, *src_mem, *drv);
  if (!n) return fail("source queue 0", n.error());
  if (auto r = source->driver_ok(); !r) return fail("source", r.error());
  guest.set_kick(std::move(n->kick));
  std::printf(
      "guest: %llu MiB in 2 regions (GPA %#llx, %#llx), %llu receive buffers, %s ring of "
      "%u, vIOMMU %s, %s updates, rate %s\n",
      static_cast<unsigned long long>(a.ram_mib), static_cast<unsigned long long>(kLowGpa),
      static_cast<unsigned long long>(kHighGpa), static_cast<unsigned long long>(buffers),
      a.packed ? "packed" : "split", a.queue_size, a.iommu.c_str(), a.updates.c_str(),
      a.rate > 0 ? fmt::format("{}/s", a.rate).c_str() : "unlimited");
  std::fflush(stdout);
  guest.start();
  std::this_thread::sleep_for(std::chrono::milliseconds(a.warmup_ms));
  const std::uint64_t before = guest.frames();
  std::printf("traffic: %llu frames received before the migration\n",
              static_cast<unsigned long long>(before));

  MigrationOptions mo;
  mo.max_iterations = a.max_iterations;
  mo.converge_pages = a.converge_pages;
  mo.on_progress = [&](const MigrationIteration& it) {
    std::printf(
        "%s %u: dirty %llu pages (device %llu, guest %llu), copied %llu pages in "
        "%.1f ms, %.0f MiB/s, frames %llu, buffers offered %llu\n",
        it.index == 0 ? "bulk"
        : it.final    ? "final"
                      : "iteration",
        it.index, static_cast<unsigned long long>(it.pages_dirtied),
        static_cast<unsigned long long>(it.device_dirtied),
        static_cast<unsigned long long>(it.guest_dirtied),
        static_cast<unsigned long long>(it.pages_copied), it.seconds * 1000, it.throughput_mib_s,
        static_cast<unsigned long long>(guest.frames()),
        static_cast<unsigned long long>(guest.offered()));
    std::fflush(stdout);
  };
  mo.pause_guest = [&] { guest.pause(); };
  mo.resume_guest = [&](std::vector<RingNotifiers>& dn) { guest.resume(&*dst_mem, dn); };
  MigrationSource ms{
      source.get(), &*src_mem, {&*drv}, &guest_log, use_iommu ? &viommu : nullptr, {}};
  Migration mig(ms, *dst_mem, mo);
  if (auto r = mig.start(); !r) return fail("migration", r.error());
  while (!mig.converged()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(a.round_interval_ms));
    if (auto r = mig.iterate(); !r) return fail("migration", r.error());
  }
  auto res = mig.finish(*destination);
  if (!res) return fail("migration", res.error());
  const std::uint64_t at_switch = guest.frames();
  std::this_thread::sleep_for(std::chrono::milliseconds(a.after_ms));
  const std::uint64_t after = guest.frames() - at_switch;
  guest.stop();
  std::printf("traffic: %llu frames on the destination in %u ms, %llu bad frames in all\n",
              static_cast<unsigned long long>(after), a.after_ms,
              static_cast<unsigned long long>(guest.bad_frames()));
  for (const auto& q : res->queues)
    std::printf("ring %u: base %#x%s\n", q.index, q.base, q.match ? "" : " MISMATCH");
  std::size_t shown = 0;
  for (Gpa g : res->differing_pages) {
    if (shown++ == 16) {
      std::printf("differing page: ... (%zu in all)\n", res->differing_pages.size());
      break;
    }
    std::printf("differing page: gpa %#llx\n", static_cast<unsigned long long>(g.value));
  }
  if (res->device_state_carried)
    std::printf("device state: %llu bytes carried from source to destination\n",
                static_cast<unsigned long long>(res->device_state_bytes));
  else
    std::printf("device state: not carried: %s\n", res->device_state_note.c_str());
  std::printf("DEVICE_STATE carried=%d bytes=%llu\n", res->device_state_carried ? 1 : 0,
              static_cast<unsigned long long>(res->device_state_bytes));
  std::printf("migration: %zu rounds, %llu pages copied, total %.3f s, comparison %.1f ms\n",
              res->iterations.size(), static_cast<unsigned long long>(res->pages_copied),
              res->total_s, res->compare_ms);
  std::printf("VERDICT pages_compared=%llu pages_differing=%zu downtime_ms=%.2f\n",
              static_cast<unsigned long long>(res->pages_compared), res->differing_pages.size(),
              res->downtime_ms);
  std::fflush(stdout);
  if (!res->differing_pages.empty()) return 1;
  if (!res->rings_match) return fail("verdict", "ring state differs");
  if (after == 0) return fail("verdict", "no frames arrived on the destination");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  CLI::App app{"vhostkit-migrate: live-migrate a vhost-user net device and prove no page is lost"};
  app.add_option("--source", a.source, "source back-end socket")->required();
  app.add_option("--destination", a.destination, "destination back-end socket")->required();
  app.add_option("--ram-mib", a.ram_mib, "guest RAM in MiB (two regions)")
      ->check(CLI::Range(4, 1 << 20));
  app.add_option("--iommu", a.iommu, "vIOMMU on or off")->check(CLI::IsMember({"on", "off"}));
  app.add_option("--updates", a.updates, "IOTLB update / address form: gpa or uaddr")
      ->check(CLI::IsMember({"gpa", "uaddr"}));
  app.add_option("--rate", a.rate, "receive buffers per second (0: unlimited)");
  app.add_option("--queue-size", a.queue_size, "receive ring size");
  app.add_flag("--packed", a.packed, "packed ring");
  app.add_option("--warmup-ms", a.warmup_ms, "traffic before the migration");
  app.add_option("--after-ms", a.after_ms, "traffic on the destination");
  app.add_option("--max-iterations", a.max_iterations, "rounds after the bulk copy, at most");
  app.add_option("--converge-pages", a.converge_pages, "stop iterating below this many");
  app.add_option("--round-interval-ms", a.round_interval_ms, "pause between rounds");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  return run(a);
}
