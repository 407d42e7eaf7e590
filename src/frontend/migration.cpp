// Migration: the live-migration orchestrator of the frontend layer (docs/migration.md).
#include "vhostkit/frontend/migration.h"

#include <algorithm>
#include <atomic>
#include <cstring>

#include <fmt/format.h>

#include "vhostkit/virtio_spec.h"

namespace vhostkit::frontend {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::uint16_t load16(const std::uint8_t* p) {
  return std::atomic_ref<std::uint16_t>(
             *reinterpret_cast<std::uint16_t*>(const_cast<std::uint8_t*>(p)))
      .load(std::memory_order_acquire);
}

}  // namespace

// ---- GuestDirtyLog -------------------------------------------------------------------

GuestDirtyLog::GuestDirtyLog(Gpa end) : words_((end.page() + 64 + 63) / 64) {}

void GuestDirtyLog::mark(Gpa gpa, std::uint64_t len) {
  if (len == 0) return;
  // Release: the guest's data before the bit (the copy that sees the bit sees the data).
  std::atomic_thread_fence(std::memory_order_release);
  const std::uint64_t first = gpa.page();
  const std::uint64_t last = (gpa.value + (len - 1)) >> 12;
  for (std::uint64_t p = first; p <= last && p < pages(); ++p)
    words_[p / 64].fetch_or(std::uint64_t{1} << (p % 64), std::memory_order_relaxed);
}

void GuestDirtyLog::attach(VirtioDriver& driver) {
  driver.set_write_observer([this](Gpa gpa, std::uint64_t len) { mark(gpa, len); });
}

// ---- Migration -----------------------------------------------------------------------

Migration::Migration(MigrationSource source, GuestMemory& destination_memory,
                     MigrationOptions options)
    : src_(std::move(source)), dst_(destination_memory), opt_(std::move(options)) {
  const std::size_t n = src_.memory->regions().size();
  plugged_ = src_.plugged.empty() ? std::vector<bool>(n, true) : src_.plugged;
  plugged_.resize(n, false);
  pending_regions_.assign(n, false);
}

bool Migration::plugged_page(std::uint64_t page) const {
  const Gpa g(page * kPageSize);
  const auto& regions = src_.memory->regions();
  for (std::size_t i = 0; i < regions.size(); ++i)
    if (plugged_[i] && regions[i].contains(g)) return true;
  return false;
}

std::uint64_t Migration::copy_page(std::uint64_t page) {
  const Gpa g(page * kPageSize);
  std::uint8_t* from = src_.memory->host(g, kPageSize);
  std::uint8_t* to = dst_.host(g, kPageSize);
  if (from == nullptr || to == nullptr) return 0;
  // The device may be writing this page right now: then its log bit is set again and
  // the page is copied again in a later round.
  std::memcpy(to, from, kPageSize);
  return 1;
}

void Migration::report(MigrationIteration it) {
  it.throughput_mib_s =
      it.seconds > 0 ? static_cast<double>(it.pages_copied) * kPageSize / (1 << 20) / it.seconds
                     : 0;
  result_.pages_copied += it.pages_copied;
  result_.iterations.push_back(it);
  if (opt_.on_progress) opt_.on_progress(it);
}

Result<void, std::string> Migration::start() {
  if (started_) return unexpected(std::string("migration already started"));
  const auto& a = src_.memory->regions();
  const auto& b = dst_.regions();
  if (a.size() != b.size())
    return unexpected(std::string("destination memory has a different number of regions"));
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].gpa != b[i].gpa || a[i].size != b[i].size || a[i].alias != b[i].alias)
      return unexpected(fmt::format("destination region {} differs from the source's", i));
    if (a[i].gpa.value % kPageSize != 0)
      return unexpected(fmt::format("region {} is not page-aligned", i));
  }
  if (src_.guest_log == nullptr) return unexpected(std::string("no guest dirty log"));
  t0_ = Clock::now();
  // The log covers the whole layout, regions plugged later included.
  const std::uint64_t pages = src_.memory->end_gpa().page() + 1;
  log_bytes_ = (pages + 63) / 64 * 8;
  seen_.assign(log_bytes_ / 8, 0);
  if (auto r = src_.client->enable_logging(log_bytes_, opt_.log_offset); !r)
    return unexpected("enable logging: " + r.error());
  // From here on every write is in one of the two logs: forget the guest's earlier ones,
  // then copy everything.
  src_.guest_log->fetch_and_clear([](std::uint64_t) {});
  started_ = true;
  auto t = Clock::now();
  MigrationIteration it;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!plugged_[i]) continue;
    for (std::uint64_t off = 0; off < a[i].size; off += kPageSize)
      it.pages_copied += copy_page((a[i].gpa + off).page());
  }
  it.seconds = seconds_since(t);
  report(it);
  return {};
}

MigrationIteration Migration::round(bool final) {
  auto t = Clock::now();
  MigrationIteration it;
  it.index = static_cast<unsigned>(result_.iterations.size());
  it.final = final;
  std::fill(seen_.begin(), seen_.end(), 0);
  auto set = [&](std::uint64_t page) {
    if (page / 64 < seen_.size()) seen_[page / 64] |= std::uint64_t{1} << (page % 64);
  };
  if (DirtyLog* log = src_.client->log(); log != nullptr)
    it.device_dirtied = log->fetch_and_clear(0, log_bytes_ * 8, set);
  it.guest_dirtied = src_.guest_log->fetch_and_clear(set);
  const auto& regions = src_.memory->regions();
  for (std::size_t i = 0; i < regions.size(); ++i) {
    if (!pending_regions_[i]) continue;
    pending_regions_[i] = false;
    for (std::uint64_t off = 0; off < regions[i].size; off += kPageSize)
      set((regions[i].gpa + off).page());
  }
  for (std::size_t w = 0; w < seen_.size(); ++w) {
    for (std::uint64_t v = seen_[w]; v != 0; v &= v - 1) {
      std::uint64_t page = w * 64 + static_cast<unsigned>(__builtin_ctzll(v));
      ++it.pages_dirtied;
      if (plugged_page(page)) it.pages_copied += copy_page(page);
    }
  }
  it.seconds = seconds_since(t);
  return it;
}

Result<MigrationIteration, std::string> Migration::iterate() {
  if (!started_) return unexpected(std::string("migration not started"));
  MigrationIteration it = round(false);
  ++iterations_;
  last_dirty_ = it.pages_dirtied;
  report(it);
  return it;
}

bool Migration::converged() const {
  return started_ && (last_dirty_ < opt_.converge_pages || iterations_ >= opt_.max_iterations);
}

Result<void, std::string> Migration::add_region(std::size_t index) {
  if (index >= plugged_.size() || plugged_[index])
    return unexpected(fmt::format("region {} cannot be added", index));
  if (auto r = src_.client->add_mem_reg(*src_.memory, index); !r) return r;
  plugged_[index] = true;
  pending_regions_[index] = true;
  return {};
}

Result<void, std::string> Migration::remove_region(std::size_t index) {
  if (index >= plugged_.size() || !plugged_[index])
    return unexpected(fmt::format("region {} cannot be removed", index));
  if (auto r = src_.client->rem_mem_reg(*src_.memory, index); !r) return r;
  plugged_[index] = false;
  pending_regions_[index] = false;
  return {};
}

void Migration::compare(MigrationResult& r) const {
  const auto& regions = src_.memory->regions();
  for (std::size_t i = 0; i < regions.size(); ++i) {
    if (!plugged_[i] || regions[i].alias) continue;  // an alias shows its source's bytes
    for (std::uint64_t off = 0; off < regions[i].size; off += kPageSize) {
      const Gpa g = regions[i].gpa + off;
      ++r.pages_compared;
      const std::uint8_t* a = src_.memory->host(g, kPageSize);
      const std::uint8_t* b = dst_.host(g, kPageSize);
      if (a == nullptr || b == nullptr || std::memcmp(a, b, kPageSize) != 0)
        r.differing_pages.push_back(g);
    }
  }
  std::sort(r.differing_pages.begin(), r.differing_pages.end());
}

Result<MigrationResult, std::string> Migration::finish(FrontendClient& destination) {
  if (!started_) {
    if (auto s = start(); !s) return unexpected(s.error());
  }
  const auto t_pause = Clock::now();
  if (opt_.pause_guest) opt_.pause_guest();
  // Stop the device: GET_VRING_BASE returns once the ring's worker stopped, its log
  // writes flushed.
  std::vector<std::uint32_t> bases;
  for (std::size_t q = 0; q < src_.queues.size(); ++q) {
    auto b = src_.client->stop_queue(static_cast<std::uint32_t>(q));
    if (!b) return unexpected(fmt::format("GET_VRING_BASE {}: {}", q, b.error()));
    bases.push_back(*b);
  }
  MigrationResult& r = result_;
  // The source's own state, with every ring stopped (the device is suspended).
  std::optional<std::vector<std::uint8_t>> state;
  if (src_.client->device_state()) {
    auto s = src_.client->save_device_state();
    if (!s) return unexpected("saving the source's device state: " + s.error());
    state = std::move(*s);
    if (opt_.on_device_state) opt_.on_device_state(*state);
  } else {
    r.device_state_note = "the source back-end does not offer VHOST_USER_PROTOCOL_F_DEVICE_STATE";
  }
  MigrationIteration last = round(true);
  last.device_state_bytes = state ? state->size() : 0;
  report(last);

  const auto t_compare = Clock::now();
  compare(r);
  r.compare_ms = std::chrono::duration<double, std::milli>(Clock::now() - t_compare).count();
  for (std::size_t q = 0; q < src_.queues.size(); ++q) {
    const VirtioDriver& d = *src_.queues[q];
    QueueMigrationState s;
    s.index = static_cast<std::uint32_t>(q);
    s.base = bases[q];
    s.packed = d.options().packed;
    if (!s.packed) {
      const RingGpas g = d.gpas();
      auto idx = [&](const GuestMemory& m, Gpa area, std::uint64_t off) -> std::uint16_t {
        const std::uint8_t* p = m.host(area + off, 2);
        return p != nullptr ? load16(p) : 0;
      };
      s.source_avail_idx = idx(*src_.memory, g.driver, virtio::split::kAvailIdx);
      s.destination_avail_idx = idx(dst_, g.driver, virtio::split::kAvailIdx);
      s.source_used_idx = idx(*src_.memory, g.device, virtio::split::kUsedIdx);
      s.destination_used_idx = idx(dst_, g.device, virtio::split::kUsedIdx);
      // The same indices on both sides, and the device consumed no more than was
      // published and completed no more than it consumed.
      const auto base16 = static_cast<std::uint16_t>(s.base);
      s.match = s.source_avail_idx == s.destination_avail_idx &&
                s.source_used_idx == s.destination_used_idx &&
                static_cast<std::uint16_t>(s.source_avail_idx - base16) <= d.options().size &&
                static_cast<std::uint16_t>(base16 - s.source_used_idx) <= d.options().size;
    } else {
      // Packed: the ring's state is the descriptor ring itself (compared above) and the
      // positions in the base; the device cannot be past the driver's avail position.
      const std::uint16_t avail = s.base & 0x7fff;
      s.match = avail < d.options().size && ((s.base >> 16) & 0x7fff) < d.options().size;
    }
    r.rings_match = r.rings_match && s.match;
    r.queues.push_back(s);
  }

  // The destination: the same features and address form as the source, logging off.
  ClientOptions co;
  if (opt_.destination_options) {
    co = *opt_.destination_options;
  } else {
    co.want_features = src_.client->features() & ~virtio::bit(virtio::kVhostFLogAll);
    co.want_gpa_addresses = src_.client->gpa_addresses();
  }
  if (auto n = destination.negotiate(co); !n) return unexpected("destination: " + n.error());
  const std::uint64_t want = src_.client->features() & ~virtio::bit(virtio::kVhostFLogAll);
  if (destination.features() != want)
    return unexpected(fmt::format("destination features {:#x} differ from the source's {:#x}",
                                  destination.features(), want));
  if (auto m = destination.set_mem_table_regions(dst_, plugged_); !m)
    return unexpected("destination SET_MEM_TABLE: " + m.error());
  if (state && destination.device_state()) {
    if (auto l = destination.load_device_state(*state); !l)
      return unexpected("the destination refused the device state: " + l.error());
    r.device_state_carried = true;
    r.device_state_bytes = state->size();
  } else if (state) {
    r.device_state_note =
        "the destination back-end does not offer VHOST_USER_PROTOCOL_F_DEVICE_STATE";
  }
  if (src_.iommu != nullptr && destination.iommu()) destination.attach_viommu(*src_.iommu, dst_);
  for (std::size_t q = 0; q < src_.queues.size(); ++q) {
    VirtioDriver& d = *src_.queues[q];
    if (auto h = d.rehome(dst_); !h) return unexpected(h.error());
    auto n = destination.start_queue(static_cast<std::uint32_t>(q), dst_, d, bases[q]);
    if (!n) return unexpected(fmt::format("destination queue {}: {}", q, n.error()));
    r.notifiers.push_back(std::move(*n));
  }
  if (auto ok = destination.driver_ok(); !ok) return unexpected("destination: " + ok.error());
  if (opt_.resume_guest) opt_.resume_guest(r.notifiers);
  r.downtime_ms =
      std::chrono::duration<double, std::milli>(Clock::now() - t_pause).count() - r.compare_ms;
  r.total_s = seconds_since(t0_);
  return std::move(r);
}

Result<MigrationResult, std::string> Migration::run(FrontendClient& destination) {
  if (auto s = start(); !s) return unexpected(s.error());
  while (!converged())
    if (auto it = iterate(); !it) return unexpected(it.error());
  return finish(destination);
}

}  // namespace vhostkit::frontend
