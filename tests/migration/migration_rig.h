// Test rig for live migration: a source and a destination BackendServer (EchoDevice) on
// their own threads over socketpairs, guest RAM on both sides with the same layout, and a
// guest that runs echo traffic on its own thread through the driver model the whole time:
// it writes a recognizable payload (queue, sequence number) into an out page, offers it
// with an in page the device echoes into, and checks every echo it collects, before the
// migration on the source memory and after it on the destination memory.
#pragma once

#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "support/echo_device.h"
#include "vhostkit/dirty_log.h"
#include "vhostkit/frontend/frontend_client.h"
#include "vhostkit/frontend/migration.h"
#include "vhostkit/vhost_user/backend_server.h"
#include "vhostkit/vhost_user/device.h"
#include "vhostkit/virtio_spec.h"

namespace vhostkit::testing {

using namespace std::chrono_literals;

struct InProcessBackend {
  EchoDevice device;
  BackendServer server;
  std::thread thread;
  std::unique_ptr<frontend::FrontendClient> client;

  InProcessBackend(std::string name, std::uint32_t queues)
      : device(queues, std::move(name)), server(device) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) std::abort();
    thread = std::thread([this, fd = sv[0]] { server.serve(UniqueFd(fd)); });
    client = frontend::FrontendClient::adopt(UniqueFd(sv[1]));
  }
  ~InProcessBackend() {
    client->close();
    server.stop();
    thread.join();
  }
};

struct RigConfig {
  bool packed = false;
  bool iommu = false;
  bool gpa_form = true;
  bool lazy = false;
  bool indirect = true;
  bool event_idx = true;
  std::uint16_t queue_size = 64;
  std::uint32_t queues = 1;
  // Region 0 holds the rings (and buffers after them).
  std::vector<frontend::GuestRegionLayout> layout;
  std::vector<bool> plugged;          // in the source's table at the start (empty: all)
  std::vector<bool> traffic;          // regions holding buffers (empty: all plugged)
  std::optional<std::size_t> add;     // ADD_MEM_REG during the migration, then traffic there
  std::optional<std::size_t> remove;  // REM_MEM_REG during the migration (no traffic there)
  unsigned inflight = 16;             // chains in flight per queue
  std::uint32_t max_payload = 1500;
  unsigned rounds = 4;  // iterate() calls
  unsigned add_at = 1;  // before which round
  unsigned remove_at = 2;
  // Land each memory-table change between a source worker's pop and its push (see
  // MidBurstGate), instead of wherever the worker happens to be.
  bool change_mid_burst = false;
  std::uint64_t warmup = 64;  // chains before the migration starts
  std::uint64_t during = 0;   // chains that must complete while the migration iterates
  std::uint64_t after = 64;   // chains on the destination
  std::uint64_t fault_one_in = 0;
  // Written into the source's config space (SET_CONFIG at offset 0) before the migration.
  std::vector<std::uint8_t> config_write;
  // Flip a byte of the device state on its way to the destination.
  bool corrupt_state = false;
};

struct RigOutcome {
  std::optional<frontend::MigrationResult> result;
  std::string error;
  std::uint64_t completed = 0;
  std::uint64_t mismatches = 0;  // echoes the guest found wrong
  std::uint64_t device_errors = 0;
  bool drained = false;
  bool destination_bases_ok = false;
  // The destination device's chain counter and config space at the end.
  std::uint64_t destination_chains = 0;
  std::vector<std::uint8_t> destination_config;
  std::string state;  // the drivers' positions when the guest stopped, for failure messages
};

// The guest: drivers, payload writes and checks, on its own thread.
class EchoGuest {
 public:
  EchoGuest(const RigConfig& cfg, frontend::GuestMemory* mem, frontend::GuestDirtyLog* log,
            frontend::Viommu* iommu)
      : cfg_(cfg), mem_(mem), log_(log), iommu_(iommu) {}
  ~EchoGuest() { stop(); }

  std::vector<frontend::VirtioDriver> drivers;
  std::vector<frontend::RingNotifiers> notifiers;

  void add_slots(std::size_t region) {
    const auto& r = mem_->regions()[region];
    std::lock_guard lk(mu_);
    for (std::uint64_t off = 0; off + 2 * kPageSize <= r.size; off += 2 * kPageSize)
      free_slots_.push_back(r.gpa + off);
  }
  void add_slot(Gpa g) { free_slots_.push_back(g); }

  void start() {
    thread_ = std::thread([this] {
      while (!stop_.load()) {
        {
          std::lock_guard lk(mu_);
          step();
        }
        std::this_thread::sleep_for(20us);
      }
    });
  }
  void stop() {
    if (paused_.owns_lock()) paused_.unlock();  // a migration that failed while paused
    stop_.store(true);
    if (thread_.joinable()) thread_.join();
  }
  void pause() { paused_ = std::unique_lock(mu_); }
  void unpause() { paused_.unlock(); }
  // While paused, so that the guest sends the back-end nothing (no IOTLB invalidation):
  // offers one more chain on queue 0, beyond the chains in flight, and kicks.
  bool offer_while_paused() {
    if (!paused_.owns_lock() || drivers.empty() || !issue_one(0)) return false;
    kick(0);
    return true;
  }
  void resume(frontend::GuestMemory* mem, std::vector<frontend::RingNotifiers>& n) {
    mem_ = mem;
    notifiers = std::move(n);
    paused_.unlock();
  }
  void set_issue(bool on) { issue_.store(on); }
  std::uint64_t completed() const { return completed_.load(); }
  std::uint64_t mismatches() const { return mismatches_.load(); }
  bool wait_completed(std::uint64_t n, std::chrono::milliseconds timeout) {
    auto until = std::chrono::steady_clock::now() + timeout;
    while (completed_.load() < n)
      if (std::chrono::steady_clock::now() > until)
        return false;
      else
        std::this_thread::sleep_for(200us);
    return true;
  }
  bool drained() {
    std::lock_guard lk(mu_);
    for (auto& d : drivers)
      if (d.outstanding() != 0) return false;
    return true;
  }
  std::string describe() {
    std::lock_guard lk(mu_);
    std::string s =
        fmt::format("completed {} free slots {};", completed_.load(), free_slots_.size());
    for (auto& d : drivers) {
      s += fmt::format(" [outstanding {} avail {} used {} free {}", d.outstanding(), d.avail_idx(),
                       d.used_idx(), d.free_descriptors());
      if (!d.options().packed) {
        std::uint16_t a = 0, u = 0, f = 0, ev = 0;
        std::memcpy(&a, d.driver_host() + 2, 2);
        std::memcpy(&f, d.device_host(), 2);
        std::memcpy(&u, d.device_host() + 2, 2);
        std::memcpy(&ev, d.device_host() + 4 + 8ULL * d.options().size, 2);
        s += fmt::format(" mem avail {} used {} used.flags {} avail_event {}", a, u, f, ev);
      }
      s += "]";
    }
    return s;
  }

 private:
  struct Pending {
    Gpa slot;
    std::uint64_t seq = 0;
    std::uint32_t len = 0;
  };

  static std::vector<std::uint8_t> payload(std::uint32_t q, std::uint64_t seq, std::uint32_t len) {
    std::vector<std::uint8_t> p(len);
    std::string head = fmt::format("queue {} seq {} ", q, seq);
    for (std::uint32_t i = 0; i < len; ++i)
      p[i] = i < head.size() ? static_cast<std::uint8_t>(head[i])
                             : static_cast<std::uint8_t>(seq * 131 + i * 7);
    return p;
  }

  // Offers one chain on queue q: false if there is no free slot or no room in the ring.
  bool issue_one(std::uint32_t q) {
    auto& d = drivers[q];
    if (free_slots_.empty() || d.free_descriptors() < 2) return false;
    Gpa slot = free_slots_.front();
    free_slots_.pop_front();
    std::uint64_t seq = ++seq_;
    auto len = static_cast<std::uint32_t>(32 + (seq * 2654435761u) % (cfg_.max_payload - 31));
    auto bytes = payload(q, seq, len);
    if (!mem_->write(slot, bytes)) std::abort();
    log_->mark(slot, len);  // the vCPU's write, in KVM's dirty log
    std::vector<frontend::DriverBuffer> bufs{{slot, len, false}, {slot + kPageSize, 4096, true}};
    auto id = d.add(bufs);
    if (!id) {
      free_slots_.push_front(slot);
      return false;
    }
    pending_[q][*id] = Pending{slot, seq, len};
    return true;
  }

  void kick(std::uint32_t q) {
    std::uint64_t one = 1;
    if (::write(notifiers[q].kick.get(), &one, 8) != 8) std::abort();
  }

  void step() {
    for (std::uint32_t q = 0; q < drivers.size(); ++q) {
      auto& d = drivers[q];
      bool added = false;
      while (issue_.load() && d.outstanding() < cfg_.inflight && issue_one(q)) added = true;
      if (added && d.kick_needed()) kick(q);
      while (auto u = d.poll()) {
        auto it = pending_[q].find(u->id);
        if (it == pending_[q].end()) {
          mismatches_.fetch_add(1);
          continue;
        }
        Pending p = it->second;
        pending_[q].erase(it);
        std::vector<std::uint8_t> got(p.len);
        if (u->len != p.len || !mem_->read(p.slot + kPageSize, got) ||
            got != payload(q, p.seq, p.len))
          mismatches_.fetch_add(1);
        free_slots_.push_back(p.slot);
        completed_.fetch_add(1);
      }
    }
    if (iommu_ != nullptr && iommu_->mode() == frontend::ViommuMode::lazy) iommu_->flush();
  }

  RigConfig cfg_;
  frontend::GuestMemory* mem_;
  frontend::GuestDirtyLog* log_;
  frontend::Viommu* iommu_;
  std::mutex mu_;
  std::unique_lock<std::mutex> paused_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> issue_{true};
  std::deque<Gpa> free_slots_;
  std::map<std::uint16_t, Pending> pending_[8];
  std::uint64_t seq_ = 0;
  std::atomic<std::uint64_t> completed_{0};
  std::atomic<std::uint64_t> mismatches_{0};
};

// Makes a memory-table change land inside a source worker's burst, between a pop and its
// push (by chance that happens in about one migration in 150): the next worker to pop
// chains holds them until the control thread has applied the change, then echoes and
// pushes them while the control thread waits for it. The guest must be paused meanwhile:
// a control message that waits for the parked worker (an IOTLB invalidation) would
// otherwise hold up the change the worker waits for.
class MidBurstGate {
 public:
  void attach(AddressSpace* space) { space_ = space; }

  // Worker side: EchoDevice::after_pop.
  void after_pop() {
    std::shared_ptr<const MemorySnapshot> before;
    {
      std::lock_guard lk(mu_);
      if (!armed_) return;
      armed_ = false;
      before = space_->memory();
      parked_ = true;
    }
    cv_.notify_all();
    // Wait until the control thread has published the new table and rebound the IOTLB to
    // it. It bumps the space's generation right after that, then waits for this worker's
    // burst to end: give it that moment, then go on.
    const auto until = std::chrono::steady_clock::now() + 5s;
    while (std::chrono::steady_clock::now() < until) {
      auto now = space_->memory();
      if (now != before && !space_->iotlb().lookup(Iova(0), now->generation()).stale) break;
      std::this_thread::sleep_for(20us);
    }
    std::this_thread::sleep_for(2ms);
  }

  // Control side.
  void arm() {
    std::lock_guard lk(mu_);
    armed_ = true;
    parked_ = false;
  }
  // Returns once a worker holds popped chains (false on timeout).
  bool wait_parked(std::chrono::milliseconds timeout) {
    std::unique_lock lk(mu_);
    bool ok = cv_.wait_for(lk, timeout, [&] { return parked_; });
    armed_ = false;
    return ok;
  }

 private:
  AddressSpace* space_ = nullptr;
  std::mutex mu_;
  std::condition_variable cv_;
  bool armed_ = false;
  bool parked_ = false;
};

// Runs one whole migration under traffic. Never throws; the outcome says what happened.
inline RigOutcome run_migration(
    const RigConfig& cfg,
    std::function<void(const frontend::MigrationIteration&)> on_progress = {}) {
  using namespace frontend;
  RigOutcome out;
  auto fail = [&](std::string e) {
    out.error = std::move(e);
    return std::move(out);
  };
  auto src_mem = GuestMemory::create(cfg.layout);
  auto dst_mem = GuestMemory::create(cfg.layout);
  if (!src_mem || !dst_mem) return fail("guest memory");
  const std::size_t nregions = cfg.layout.size();
  std::vector<bool> plugged = cfg.plugged.empty() ? std::vector<bool>(nregions, true) : cfg.plugged;
  std::vector<bool> traffic = cfg.traffic.empty() ? plugged : cfg.traffic;
  // Junk everywhere, so a region or page that is not copied shows.
  for (const auto& r : src_mem->regions())
    if (!r.alias)
      for (std::uint64_t off = 0; off < r.size; off += 8) std::memcpy(r.host + off, &off, 8);

  // Declared before the clients that answer misses from it, and the workers that use it.
  Viommu viommu(cfg.lazy ? ViommuMode::lazy : ViommuMode::strict);
  MidBurstGate gate;
  InProcessBackend source("source-echo", cfg.queues), destination("destination-echo", cfg.queues);
  if (cfg.change_mid_burst) {
    gate.attach(&source.server.space());
    source.device.after_pop = [&gate](std::uint32_t) { gate.after_pop(); };
  }
  ClientOptions co;
  co.want_features = virtio::bit(virtio::kFRingIndirectDesc) | virtio::bit(virtio::kFRingEventIdx);
  if (cfg.iommu) co.want_features |= virtio::bit(virtio::kFAccessPlatform);
  if (cfg.packed) co.want_features |= virtio::bit(virtio::kFRingPacked);
  co.want_gpa_addresses = cfg.gpa_form;
  if (auto r = source.client->negotiate(co); !r) return fail("negotiate: " + r.error());
  if (auto r = source.client->set_mem_table_regions(*src_mem, plugged); !r)
    return fail("set_mem_table: " + r.error());
  if (cfg.iommu) source.client->attach_viommu(viommu, *src_mem);

  GuestDirtyLog guest_log(src_mem->end_gpa());
  EchoGuest guest(cfg, &*src_mem, &guest_log, cfg.iommu ? &viommu : nullptr);
  for (std::uint32_t q = 0; q < cfg.queues; ++q) {
    DriverOptions d;
    d.packed = cfg.packed;
    d.size = cfg.queue_size;
    d.indirect = cfg.indirect;
    d.event_idx = cfg.event_idx;
    d.max_indirect = 4;
    d.iommu = cfg.iommu ? &viommu : nullptr;
    auto drv = VirtioDriver::create(*src_mem, d);
    if (!drv) return fail("driver: " + drv.error());
    guest.drivers.push_back(std::move(*drv));
  }
  for (auto& d : guest.drivers) guest_log.attach(d);
  // Buffers: what is left of region 0 after the rings, then the other traffic regions.
  if (traffic[0])
    while (auto g = src_mem->alloc(2 * kPageSize, kPageSize)) {
      if (!src_mem->regions()[0].contains(*g)) break;
      guest.add_slot(*g);
    }
  for (std::size_t i = 1; i < nregions; ++i)
    if (traffic[i] && plugged[i]) guest.add_slots(i);
  for (std::uint32_t q = 0; q < cfg.queues; ++q) {
    auto n = source.client->start_queue(q, *src_mem, guest.drivers[q]);
    if (!n) return fail("start_queue: " + n.error());
    guest.notifiers.push_back(std::move(*n));
  }
  if (auto r = source.client->driver_ok(); !r) return fail(r.error());
  if (!cfg.config_write.empty()) {
    auto m =
        vhost_user::make_config(vhost_user::FrontendRequest::set_config, 0, 0, cfg.config_write);
    if (!m) return fail("config write: " + m.error().message());
    if (auto r = source.client->request_ack(std::move(*m)); !r)
      return fail("config write: " + r.error());
  }

  guest.start();
  if (!guest.wait_completed(cfg.warmup, 20s)) return fail("no traffic before the migration");

  // Before a memory-table change with change_mid_burst: pauses the guest and parks a
  // source worker between a pop and its push; after the change: resumes the guest.
  auto hold_a_burst = [&]() -> Result<void, std::string> {
    if (!cfg.change_mid_burst) return {};
    for (int attempt = 0; attempt < 100; ++attempt) {
      guest.pause();
      gate.arm();
      (void)guest.offer_while_paused();  // a full ring has chains to pop already
      if (gate.wait_parked(50ms)) return {};
      guest.unpause();  // nothing to pop: let the guest collect completions, then again
      std::this_thread::sleep_for(1ms);
    }
    return unexpected(std::string("no pop to land the memory-table change in"));
  };
  auto release_the_burst = [&] {
    if (cfg.change_mid_burst) guest.unpause();
  };

  MigrationOptions mo;
  mo.on_progress = std::move(on_progress);
  mo.pause_guest = [&] { guest.pause(); };
  mo.resume_guest = [&](std::vector<RingNotifiers>& n) { guest.resume(&*dst_mem, n); };
  if (cfg.corrupt_state)
    mo.on_device_state = [](std::vector<std::uint8_t>& s) { s[s.size() / 2] ^= 0x01; };
  MigrationSource ms{source.client.get(),           &*src_mem, {}, &guest_log,
                     cfg.iommu ? &viommu : nullptr, plugged};
  for (auto& d : guest.drivers) ms.queues.push_back(&d);
  Migration mig(ms, *dst_mem, mo);
  set_fault_drop_one_in(cfg.fault_one_in);
  if (auto r = mig.start(); !r) return fail("start: " + r.error());
  const std::uint64_t at_start = guest.completed();
  for (unsigned k = 0; k < cfg.rounds; ++k) {
    if (cfg.add && k == cfg.add_at) {
      if (auto r = hold_a_burst(); !r) return fail("add_region: " + r.error());
      if (auto r = mig.add_region(*cfg.add); !r) return fail("add_region: " + r.error());
      release_the_burst();
      if (traffic[*cfg.add]) guest.add_slots(*cfg.add);
    }
    if (cfg.remove && k == cfg.remove_at) {
      if (auto r = hold_a_burst(); !r) return fail("remove_region: " + r.error());
      if (auto r = mig.remove_region(*cfg.remove); !r) return fail("remove_region: " + r.error());
      release_the_burst();
    }
    std::this_thread::sleep_for(1ms);
    if (auto r = mig.iterate(); !r) return fail("iterate: " + r.error());
  }
  if (cfg.during > 0 && !guest.wait_completed(at_start + cfg.during, 30s))
    return fail("no traffic during the migration");
  auto res = mig.finish(*destination.client);
  set_fault_drop_one_in(0);
  if (!res) {
    guest.stop();
    return fail("finish: " + res.error());
  }
  out.result = std::move(*res);
  // The guest goes on against the destination, then stops issuing and drains.
  bool more = guest.wait_completed(guest.completed() + cfg.after, 20s);
  guest.set_issue(false);
  auto until = std::chrono::steady_clock::now() + 10s;
  while (!(out.drained = guest.drained()) && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(1ms);
  out.state = guest.describe();
  guest.stop();
  out.completed = guest.completed();
  out.mismatches = guest.mismatches();
  for (auto& d : guest.drivers) out.device_errors += d.device_errors();
  out.destination_bases_ok = more;
  out.destination_chains = destination.device.chains.load();
  out.destination_config = destination.device.config();
  for (std::uint32_t q = 0; q < cfg.queues; ++q) {
    auto b = destination.client->stop_queue(q);
    const auto& d = guest.drivers[q];
    std::uint32_t expect = cfg.packed ? ((d.avail_idx() | (d.avail_wrap() ? 0x8000u : 0u)) |
                                         ((d.used_idx() | (d.used_wrap() ? 0x8000u : 0u)) << 16))
                                      : d.avail_idx();
    if (!b || (cfg.packed ? *b != expect : (*b & 0xffff) != expect))
      out.destination_bases_ok = false;
  }
  return out;
}

}  // namespace vhostkit::testing
