// VirtioDriver: split and packed rings, guest side (modelled on Linux's virtio_ring.c).
#include "vhostkit/frontend/virtio_driver.h"

#include <atomic>
#include <cstring>

#include <fmt/format.h>

#include "vhostkit/virtio_spec.h"

namespace vhostkit::frontend {

using namespace vhostkit::virtio;

namespace {

constexpr std::uint64_t kPage = 4096;
// Linux aligns the split used ring to SMP_CACHE_BYTES for modern (virtio 1.x) devices.
constexpr std::uint64_t kSplitUsedAlign = 64;

// Ring memory is shared with the device thread: every access is atomic.
template <typename T>
T load(const std::uint8_t* p, std::memory_order o) {
  return std::atomic_ref<T>(*reinterpret_cast<T*>(const_cast<std::uint8_t*>(p))).load(o);
}
template <typename T>
void store(std::uint8_t* p, T v, std::memory_order o) {
  std::atomic_ref<T>(*reinterpret_cast<T*>(p)).store(v, o);
}

constexpr std::uint64_t align_up(std::uint64_t v, std::uint64_t a) {
  return (v + a - 1) & ~(a - 1);
}

// Offsets inside a packed descriptor and an event suppression structure.
constexpr std::uint64_t kDescAddr = 0, kDescLen = 8, kPackedId = 12, kPackedFlags = 14;
constexpr std::uint64_t kSplitFlags = 12, kSplitNext = 14;
constexpr std::uint64_t kEventOffWrap = 0, kEventFlags = 2;

}  // namespace

Result<VirtioDriver, std::string> VirtioDriver::create(GuestMemory& memory, DriverOptions opt) {
  const std::uint32_t n = opt.size;
  if (n == 0 || n > kMaxQueueSize || (!opt.packed && (n & (n - 1)) != 0))
    return unexpected(fmt::format("queue size {} is not allowed for a {} ring", n,
                                  opt.packed ? "packed" : "split"));
  VirtioDriver d(opt);
  auto block = [&](std::uint64_t len) -> std::optional<std::pair<Gpa, std::uint8_t*>> {
    // dma_alloc_coherent: whole zeroed pages.
    auto g = memory.alloc(align_up(len, kPage), kPage);
    if (!g) return std::nullopt;
    std::uint8_t* h = memory.host(*g, align_up(len, kPage));
    std::memset(h, 0, align_up(len, kPage));
    return std::pair{*g, h};
  };
  auto dma = [&](Gpa g, std::uint64_t len) {
    return opt.iommu != nullptr ? opt.iommu->map(g, len, Access::read_write) : Iova(g.value);
  };
  if (!opt.packed) {
    const std::uint64_t avail_off = split::desc_table_size(n);
    const std::uint64_t used_off = align_up(avail_off + split::avail_size(n), kSplitUsedAlign);
    const std::uint64_t total = used_off + split::used_size(n);
    auto b = block(total);
    if (!b) return unexpected(fmt::format("guest memory too small for a split ring of {}", n));
    auto [g, h] = *b;
    d.gpas_ = RingGpas{g, g + avail_off, g + used_off};
    d.desc_ = h;
    d.driver_ = h + avail_off;
    d.device_ = h + used_off;
    d.desc_len_ = split::desc_table_size(n);
    d.driver_len_ = split::avail_size(n);
    d.device_len_ = split::used_size(n);
    Iova base = dma(g, total);  // one coherent block, one mapping
    d.addr_ = RingAddresses{base, base + avail_off, base + used_off};
  } else {
    auto ring = block(packed::desc_ring_size(n));
    auto drv = block(packed::kEventSize);
    auto dev = block(packed::kEventSize);
    if (!ring || !drv || !dev)
      return unexpected(fmt::format("guest memory too small for a packed ring of {}", n));
    d.gpas_ = RingGpas{ring->first, drv->first, dev->first};
    d.desc_ = ring->second;
    d.driver_ = drv->second;
    d.device_ = dev->second;
    d.desc_len_ = packed::desc_ring_size(n);
    d.driver_len_ = packed::kEventSize;
    d.device_len_ = packed::kEventSize;
    d.addr_ =
        RingAddresses{dma(ring->first, packed::desc_ring_size(n)),
                      dma(drv->first, packed::kEventSize), dma(dev->first, packed::kEventSize)};
  }
  if (opt.indirect && opt.max_indirect > 1) {
    const std::uint64_t len = static_cast<std::uint64_t>(n) * opt.max_indirect * 16;
    auto ind = memory.alloc(len, 16);
    if (!ind) return unexpected(std::string("guest memory too small for the indirect tables"));
    d.indirect_gpa_ = *ind;
    d.indirect_ = memory.host(*ind, len);
    d.indirect_len_ = len;
  }
  d.chains_.resize(n);
  d.free_list_.reserve(n);
  // Lowest first, as Linux's free lists start.
  for (std::uint32_t i = n; i-- > 0;) d.free_list_.push_back(static_cast<std::uint16_t>(i));
  d.free_count_ = n;
  return d;
}

QueueConfig VirtioDriver::queue_config() const {
  QueueConfig c;
  c.format = opt_.packed ? RingFormat::packed : RingFormat::split;
  c.size = opt_.size;
  c.indirect = opt_.indirect;
  c.event_idx = opt_.event_idx;
  c.addr = addr_;
  return c;
}

std::uint8_t* VirtioDriver::indirect_host(std::uint16_t id) const {
  if (indirect_ == nullptr || id >= opt_.size) return nullptr;
  return indirect_ + static_cast<std::uint64_t>(id) * opt_.max_indirect * 16;
}

Iova VirtioDriver::device_addr(Gpa gpa, std::uint64_t len, Access perm, Chain& chain) {
  if (opt_.iommu == nullptr) return Iova(gpa.value);
  Iova iova = opt_.iommu->map(gpa, len, perm);
  chain.mapped.emplace_back(iova, len == 0 ? 1 : len);
  return iova;
}

Iova VirtioDriver::buffer_addr(const DriverBuffer& b, Chain& chain) {
  if (b.premapped) return *b.premapped;  // the caller's mapping: not ours to unmap
  Access perm = !b.device_writes               ? Access::read
                : opt_.map_writable_read_write ? Access::read_write
                                               : Access::write;
  return device_addr(b.gpa, b.len, perm, chain);
}

Iova VirtioDriver::write_indirect(std::uint16_t id, std::span<const DriverBuffer> bufs,
                                  Chain& chain) {
  // The device reads the table only after the release that publishes its chain, so
  // plain stores suffice here.
  std::uint8_t* table = indirect_host(id);
  for (std::size_t i = 0; i < bufs.size(); ++i) {
    const DriverBuffer& b = bufs[i];
    Iova a = buffer_addr(b, chain);
    auto write = static_cast<std::uint16_t>(b.device_writes ? kDescFWrite : 0);
    if (opt_.packed) {
      PackedDesc pd{a.value, b.len, 0, write};
      std::memcpy(table + 16 * i, &pd, 16);
    } else {
      // As Linux's alloc_indirect_split: next = i + 1 in every entry, NEXT on all but the
      // last.
      auto flags = static_cast<std::uint16_t>(write | (i + 1 < bufs.size() ? kDescFNext : 0));
      SplitDesc sd{a.value, b.len, flags, static_cast<std::uint16_t>(i + 1)};
      std::memcpy(table + 16 * i, &sd, 16);
    }
  }
  wrote(table, 16 * bufs.size());
  const Gpa table_gpa = indirect_gpa_ + static_cast<std::uint64_t>(id) * opt_.max_indirect * 16;
  return device_addr(table_gpa, 16 * bufs.size(), Access::read, chain);
}

Result<std::uint16_t, std::string> VirtioDriver::add(std::span<const DriverBuffer> buffers,
                                                     bool publish_now) {
  if (broken_) return unexpected(std::string("the driver is broken (device error)"));
  if (buffers.empty()) return unexpected(std::string("empty chain"));
  bool seen_write = false;
  std::uint64_t total = 0;
  for (const DriverBuffer& b : buffers) {
    if (!b.device_writes && seen_write)
      return unexpected(std::string("driver-readable buffer after a device-writable one"));
    seen_write |= b.device_writes;
    total += b.len;
  }
  if (buffers.size() > opt_.size)
    return unexpected(fmt::format("chain of {} buffers is longer than the queue ({})",
                                  buffers.size(), opt_.size));
  if (total > (1ULL << 32))
    return unexpected(fmt::format("chain of {:#x} bytes exceeds 4 GiB", total));
  const bool use_indirect =
      indirect_ != nullptr && buffers.size() > 1 && buffers.size() <= opt_.max_indirect;
  const std::size_t need = use_indirect ? 1 : buffers.size();
  if (need > free_count_)
    return unexpected(fmt::format("ring full: {} descriptors needed, {} free", need, free_count_));
  std::uint16_t id =
      opt_.packed ? add_packed(buffers, use_indirect) : add_split(buffers, use_indirect);
  free_count_ -= static_cast<std::uint32_t>(need);
  ++outstanding_;
  if (publish_now) publish();
  return id;
}

std::uint16_t VirtioDriver::add_split(std::span<const DriverBuffer> bufs, bool use_indirect) {
  const std::uint32_t n = opt_.size;
  const std::size_t k = use_indirect ? 1 : bufs.size();
  const std::uint16_t head = free_list_.back();  // add() checked there are k free
  Chain& c = chains_[head];
  c.descs.clear();  // keeps its capacity: no allocation per chain in steady state
  c.mapped.clear();
  for (std::size_t i = 0; i < k; ++i) {
    c.descs.push_back(free_list_.back());
    free_list_.pop_back();
  }
  c.ring_descs = static_cast<std::uint16_t>(k);
  c.live = true;
  auto put = [&](std::uint16_t i, std::uint64_t addr, std::uint32_t len, std::uint16_t flags,
                 std::uint16_t next) {
    std::uint8_t* p = desc_ + 16ULL * i;
    store<std::uint64_t>(p + kDescAddr, addr, std::memory_order_relaxed);
    store<std::uint32_t>(p + kDescLen, len, std::memory_order_relaxed);
    store<std::uint16_t>(p + kSplitFlags, flags, std::memory_order_relaxed);
    store<std::uint16_t>(p + kSplitNext, next, std::memory_order_relaxed);
    wrote(p, 16);
  };
  if (use_indirect) {
    Iova table = write_indirect(head, bufs, c);
    put(head, table.value, static_cast<std::uint32_t>(16 * bufs.size()), kDescFIndirect, 0);
  } else {
    for (std::size_t i = 0; i < k; ++i) {
      const DriverBuffer& b = bufs[i];
      Iova a = buffer_addr(b, c);
      bool more = i + 1 < k;
      auto flags =
          static_cast<std::uint16_t>((b.device_writes ? kDescFWrite : 0) | (more ? kDescFNext : 0));
      put(c.descs[i], a.value, b.len, flags, more ? c.descs[i + 1] : std::uint16_t{0});
    }
  }
  // The descriptor list stays in driver-private memory (c.descs): the device may
  // scribble on the table, the driver never trusts it to free descriptors.
  store<std::uint16_t>(driver_ + split::avail_ring(avail_idx_ % n), head,
                       std::memory_order_relaxed);
  wrote(driver_ + split::avail_ring(avail_idx_ % n), 2);
  ++avail_idx_;
  return head;
}

std::uint16_t VirtioDriver::add_packed(std::span<const DriverBuffer> bufs, bool use_indirect) {
  const std::uint32_t n = opt_.size;
  const std::uint16_t id = free_list_.back();  // as many ids as slots: one is free
  free_list_.pop_back();
  Chain& c = chains_[id];
  c.mapped.clear();
  const std::size_t k = use_indirect ? 1 : bufs.size();
  c.ring_descs = static_cast<std::uint16_t>(k);
  c.live = true;
  for (std::size_t i = 0; i < k; ++i) {
    std::uint64_t addr;
    std::uint32_t len;
    std::uint16_t flags;
    if (use_indirect) {
      addr = write_indirect(id, bufs, c).value;
      len = static_cast<std::uint32_t>(16 * bufs.size());
      flags = kDescFIndirect;
    } else {
      const DriverBuffer& b = bufs[i];
      addr = buffer_addr(b, c).value;
      len = b.len;
      flags = static_cast<std::uint16_t>((b.device_writes ? kDescFWrite : 0) |
                                         (i + 1 < k ? kDescFNext : 0));
    }
    // AVAIL = the wrap counter at this slot, USED = its inverse (2.8.1); a chain that
    // crosses the end of the ring flips them for the descriptors after the end.
    flags |= avail_wrap_ ? kPackedDescFAvail : kPackedDescFUsed;
    std::uint8_t* p = desc_ + 16ULL * avail_idx_;
    store<std::uint64_t>(p + kDescAddr, addr, std::memory_order_relaxed);
    store<std::uint32_t>(p + kDescLen, len, std::memory_order_relaxed);
    store<std::uint16_t>(p + kPackedId, id, std::memory_order_relaxed);
    if (i == 0)
      pending_heads_.emplace_back(avail_idx_, flags);  // made available by publish()
    else
      store<std::uint16_t>(p + kPackedFlags, flags, std::memory_order_relaxed);
    wrote(p, 16);
    if (++avail_idx_ == n) {
      avail_idx_ = 0;
      avail_wrap_ = !avail_wrap_;
    }
  }
  unpublished_descs_ += static_cast<std::uint32_t>(k);
  return id;
}

void VirtioDriver::publish() {
  if (opt_.packed) {
    // Release: a head's flags after its chain's other descriptors. The first new head
    // last, so the device, which reads slots in order, sees the whole batch at once.
    for (auto it = pending_heads_.rbegin(); it != pending_heads_.rend(); ++it)
      store<std::uint16_t>(desc_ + 16ULL * it->first + kPackedFlags, it->second,
                           std::memory_order_release);
    for (auto it = pending_heads_.rbegin(); it != pending_heads_.rend(); ++it)
      wrote(desc_ + 16ULL * it->first + kPackedFlags, 2);
    pending_heads_.clear();
    num_added_ += unpublished_descs_;
    unpublished_descs_ = 0;
    published_pos_ = avail_idx_;
    published_wrap_ = avail_wrap_;
    return;
  }
  // Release: the descriptors and avail->ring[] entries before the index (2.7.13.3).
  store<std::uint16_t>(driver_ + split::kAvailIdx, avail_idx_, std::memory_order_release);
  wrote(driver_ + split::kAvailIdx, 2);
  published_idx_ = avail_idx_;
}

bool VirtioDriver::kick_needed() {
  // The published index must be visible before the device's suppression state is read,
  // or a device going to sleep and this check could miss each other (virtio_mb).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  const std::uint32_t n = opt_.size;
  if (!opt_.packed) {
    const std::uint16_t old_idx = kicked_idx_;
    kicked_idx_ = published_idx_;
    if (opt_.event_idx)
      return need_event(
          load<std::uint16_t>(device_ + split::avail_event(n), std::memory_order_relaxed),
          published_idx_, old_idx);
    return (load<std::uint16_t>(device_ + split::kUsedFlags, std::memory_order_relaxed) &
            kUsedFNoNotify) == 0;
  }
  // As Linux's virtqueue_kick_prepare_packed: positions continue across the wrap, an
  // event offset from the previous lap counts n lower.
  const std::uint16_t new_idx = published_pos_;
  const auto old_idx = static_cast<std::uint16_t>(new_idx - num_added_);
  num_added_ = 0;
  const auto snapshot = load<std::uint32_t>(device_, std::memory_order_relaxed);
  const auto flags = static_cast<std::uint16_t>(snapshot >> 16);
  if (flags != kEventFlagsDesc) return flags != kEventFlagsDisable;
  const auto off_wrap = static_cast<std::uint16_t>(snapshot & 0xffff);
  auto event = static_cast<std::uint16_t>(off_wrap & ~packed::kWrapBit);
  if (((off_wrap & packed::kWrapBit) != 0) != published_wrap_)
    event = static_cast<std::uint16_t>(event - n);
  return need_event(event, new_idx, old_idx);
}

void VirtioDriver::release(std::uint16_t id) {
  Chain& c = chains_[id];
  if (opt_.iommu != nullptr)
    for (auto [iova, len] : c.mapped)
      (void)opt_.iommu->unmap(iova, len);  // mapped by us: cannot fail
  c.mapped.clear();
  c.live = false;
  if (opt_.packed) {
    free_list_.push_back(id);
  } else {
    for (auto it = c.descs.rbegin(); it != c.descs.rend(); ++it) free_list_.push_back(*it);
  }
  free_count_ += c.ring_descs;
  --outstanding_;
}

void VirtioDriver::device_error() {
  ++device_errors_;
  broken_ = true;
}

std::optional<UsedBuffer> VirtioDriver::poll() {
  if (broken_) return std::nullopt;
  return opt_.packed ? poll_packed() : poll_split();
}

bool VirtioDriver::more_used() const {
  if (broken_) return false;
  if (!opt_.packed)
    return load<std::uint16_t>(device_ + split::kUsedIdx, std::memory_order_acquire) != used_idx_;
  auto flags =
      load<std::uint16_t>(desc_ + 16ULL * used_idx_ + kPackedFlags, std::memory_order_acquire);
  return ((flags & kPackedDescFAvail) != 0) == used_wrap_ &&
         ((flags & kPackedDescFUsed) != 0) == used_wrap_;
}

std::optional<UsedBuffer> VirtioDriver::poll_split() {
  const std::uint32_t n = opt_.size;
  // Acquire: the used element is read only after the index that covers it (2.7.14).
  auto dev_idx = load<std::uint16_t>(device_ + split::kUsedIdx, std::memory_order_acquire);
  if (dev_idx == used_idx_) return std::nullopt;
  if (static_cast<std::uint16_t>(dev_idx - used_idx_) > outstanding_) {
    device_error();  // more completions than chains in flight
    return std::nullopt;
  }
  const std::uint8_t* e = device_ + split::used_ring(used_idx_ % n);
  auto id = load<std::uint32_t>(e, std::memory_order_relaxed);
  auto len = load<std::uint32_t>(e + 4, std::memory_order_relaxed);
  if (id >= n || !chains_[id].live) {
    device_error();
    return std::nullopt;
  }
  release(static_cast<std::uint16_t>(id));
  ++used_idx_;
  // With interrupts on, ask to be notified of the next entry (virtio_store_mb).
  if (opt_.event_idx && (avail_flags_shadow_ & kAvailFNoInterrupt) == 0)
    store<std::uint16_t>(driver_ + split::used_event(n), used_idx_, std::memory_order_seq_cst);
  wrote(driver_ + split::used_event(n), 2);
  return UsedBuffer{static_cast<std::uint16_t>(id), len};
}

std::optional<UsedBuffer> VirtioDriver::poll_packed() {
  const std::uint32_t n = opt_.size;
  std::uint8_t* p = desc_ + 16ULL * used_idx_;
  // Acquire: id and len are read only after the flags that make the descriptor used.
  auto flags = load<std::uint16_t>(p + kPackedFlags, std::memory_order_acquire);
  bool avail = (flags & kPackedDescFAvail) != 0;
  bool used = (flags & kPackedDescFUsed) != 0;
  if (avail != used_wrap_ || used != used_wrap_) return std::nullopt;  // 2.8.1
  auto id = load<std::uint16_t>(p + kPackedId, std::memory_order_relaxed);
  auto len = load<std::uint32_t>(p + kDescLen, std::memory_order_relaxed);
  if (id >= n || !chains_[id].live) {
    device_error();
    return std::nullopt;
  }
  // The next used descriptor follows the slots this chain occupied (2.8.6).
  std::uint32_t next = used_idx_ + static_cast<std::uint32_t>(chains_[id].ring_descs);
  if (next >= n) {
    next -= n;
    used_wrap_ = !used_wrap_;
  }
  used_idx_ = static_cast<std::uint16_t>(next);
  release(id);
  if (event_flags_shadow_ == kEventFlagsDesc) {
    auto off_wrap = static_cast<std::uint16_t>(used_idx_ | (used_wrap_ ? packed::kWrapBit : 0));
    store<std::uint16_t>(driver_ + kEventOffWrap, off_wrap, std::memory_order_seq_cst);
    wrote(driver_, packed::kEventSize);
  }
  return UsedBuffer{id, len};
}

void VirtioDriver::enable_interrupts() {
  const std::uint32_t n = opt_.size;
  if (!opt_.packed) {
    if ((avail_flags_shadow_ & kAvailFNoInterrupt) != 0) {
      avail_flags_shadow_ = 0;
      // With EVENT_IDX avail->flags stays 0 (2.7.10): used_event does the work.
      if (!opt_.event_idx)
        store<std::uint16_t>(driver_ + split::kAvailFlags, 0, std::memory_order_relaxed);
    }
    if (opt_.event_idx)
      store<std::uint16_t>(driver_ + split::used_event(n), used_idx_, std::memory_order_relaxed);
  } else {
    if (opt_.event_idx) {
      auto off_wrap = static_cast<std::uint16_t>(used_idx_ | (used_wrap_ ? packed::kWrapBit : 0));
      store<std::uint16_t>(driver_ + kEventOffWrap, off_wrap, std::memory_order_relaxed);
    }
    std::uint16_t want = opt_.event_idx ? kEventFlagsDesc : kEventFlagsEnable;
    if (event_flags_shadow_ != want) {
      event_flags_shadow_ = want;
      // Release: off_wrap before the flags that make the device look at it.
      store<std::uint16_t>(driver_ + kEventFlags, want, std::memory_order_release);
    }
  }
  wrote(driver_, driver_len_);
  // Before the caller re-checks more_used(): the device either sees the request or its
  // completion is seen (virtio_mb in virtqueue_poll).
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

void VirtioDriver::disable_interrupts() {
  const std::uint32_t n = opt_.size;
  if (!opt_.packed) {
    if ((avail_flags_shadow_ & kAvailFNoInterrupt) != 0) return;
    avail_flags_shadow_ = kAvailFNoInterrupt;
    if (opt_.event_idx)
      // avail->flags must stay 0 with EVENT_IDX; an event index just behind what was
      // consumed is reached again only after 65536 more entries.
      store<std::uint16_t>(driver_ + split::used_event(n),
                           static_cast<std::uint16_t>(used_idx_ - 1), std::memory_order_relaxed);
    else
      store<std::uint16_t>(driver_ + split::kAvailFlags, kAvailFNoInterrupt,
                           std::memory_order_relaxed);
    wrote(driver_, driver_len_);
    return;
  }
  if (event_flags_shadow_ == kEventFlagsDisable) return;
  event_flags_shadow_ = kEventFlagsDisable;
  store<std::uint16_t>(driver_ + kEventFlags, kEventFlagsDisable, std::memory_order_relaxed);
  wrote(driver_, driver_len_);
}

void VirtioDriver::report(const std::uint8_t* p, std::uint64_t len) const {
  // Ranges are tested in this order because the split driver area follows the
  // descriptor table in the same block.
  const std::pair<const std::uint8_t*, std::pair<Gpa, std::uint64_t>> blocks[] = {
      {desc_, {gpas_.desc, desc_len_}},
      {driver_, {gpas_.driver, driver_len_}},
      {indirect_, {indirect_gpa_, indirect_len_}}};
  for (const auto& [host, area] : blocks) {
    if (host == nullptr || p < host || p >= host + area.second) continue;
    observer_(area.first + static_cast<std::uint64_t>(p - host), len);
    return;
  }
}

Result<void, std::string> VirtioDriver::rehome(const GuestMemory& to) {
  std::uint8_t* desc = to.host(gpas_.desc, desc_len_);
  std::uint8_t* driver = to.host(gpas_.driver, driver_len_);
  std::uint8_t* device = to.host(gpas_.device, device_len_);
  std::uint8_t* indirect = indirect_ != nullptr ? to.host(indirect_gpa_, indirect_len_) : nullptr;
  if (desc == nullptr || driver == nullptr || device == nullptr ||
      (indirect_ != nullptr && indirect == nullptr))
    return unexpected(std::string("the rings are not mapped in the new guest memory"));
  desc_ = desc;
  driver_ = driver;
  device_ = device;
  indirect_ = indirect;
  return {};
}

std::vector<GpaRange> VirtioDriver::ring_ranges() const {
  std::vector<GpaRange> r{
      {gpas_.desc, desc_len_}, {gpas_.driver, driver_len_}, {gpas_.device, device_len_}};
  if (indirect_ != nullptr) r.push_back({indirect_gpa_, indirect_len_});
  return r;
}

}  // namespace vhostkit::frontend
