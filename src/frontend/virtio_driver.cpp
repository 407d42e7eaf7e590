// VirtioDriver: split and packed rings, guest side.
#include "vhostkit/frontend/virtio_driver.h"

#include <atomic>
#include <cstring>

#include <fmt/format.h>

namespace vhostkit::frontend {

using namespace vhostkit::virtio;

namespace {
template <typename T>
T load(const std::uint8_t* p, std::memory_order o) {
  return std::atomic_ref<T>(*reinterpret_cast<T*>(const_cast<std::uint8_t*>(p))).load(o);
}
template <typename T>
void store(std::uint8_t* p, T v, std::memory_order o) {
  std::atomic_ref<T>(*reinterpret_cast<T*>(p)).store(v, o);
}
}  // namespace

Result<VirtioDriver, std::string> VirtioDriver::create(GuestMemory& memory, DriverOptions opt) {
  std::uint32_t n = opt.size;
  if (n == 0 || n > kMaxQueueSize || (!opt.packed && (n & (n - 1)) != 0))
    return unexpected(fmt::format("bad queue size {}", n));
  VirtioDriver d(opt);
  std::uint64_t desc_len = opt.packed ? packed::desc_ring_size(n) : split::desc_table_size(n);
  std::uint64_t drv_len = opt.packed ? packed::kEventSize : split::avail_size(n);
  std::uint64_t dev_len = opt.packed ? packed::kEventSize : split::used_size(n);
  auto desc = memory.alloc(desc_len, 4096);
  auto drv = memory.alloc(drv_len, opt.packed ? 4 : 4096);
  auto dev = memory.alloc(dev_len, opt.packed ? 4 : 4096);
  if (!desc || !drv || !dev) return unexpected(std::string("guest memory too small for the rings"));
  d.gpas_ = RingGpas{*desc, *drv, *dev};
  d.desc_ = memory.host(*desc, desc_len);
  d.driver_ = memory.host(*drv, drv_len);
  d.device_ = memory.host(*dev, dev_len);
  std::memset(d.desc_, 0, desc_len);
  std::memset(d.driver_, 0, drv_len);
  std::memset(d.device_, 0, dev_len);
  if (opt.indirect) {
    std::uint64_t len = static_cast<std::uint64_t>(n) * opt.max_indirect * 16;
    auto ind = memory.alloc(len, 16);
    if (!ind) return unexpected(std::string("guest memory too small for indirect tables"));
    d.indirect_gpa_ = *ind;
    d.indirect_ = memory.host(*ind, len);
  }
  if (opt.iommu != nullptr) {
    Viommu& io = *opt.iommu;
    // Rings come from coherent DMA memory, which Linux maps read-write for the device
    // (dma_alloc_coherent); DPDK's back-end translates every ring area read-write too.
    d.addr_ = RingAddresses{io.map(*desc, desc_len, Access::read_write),
                            io.map(*drv, drv_len, Access::read_write),
                            io.map(*dev, dev_len, Access::read_write)};
  } else {
    d.addr_ = RingAddresses{Iova(desc->value), Iova(drv->value), Iova(dev->value)};
  }
  d.chains_.resize(n);
  d.extra_descs_.resize(n);
  d.free_list_.reserve(n);
  for (std::uint32_t i = n; i-- > 0;) d.free_list_.push_back(static_cast<std::uint16_t>(i));
  // A 32768-entry ring holds at most 32767 free descriptors in a uint16_t counter.
  d.free_count_ = static_cast<std::uint16_t>(n == kMaxQueueSize ? n - 1 : n);
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

Iova VirtioDriver::device_addr(Gpa gpa, std::uint64_t len, Access perm, ChainInfo* chain) {
  if (opt_.iommu == nullptr) return Iova(gpa.value);
  Iova iova = opt_.iommu->map(gpa, len == 0 ? 1 : len, perm);
  if (chain != nullptr) chain->mapped.push_back(iova);
  return iova;
}

std::uint64_t VirtioDriver::write_indirect(std::uint16_t slot, std::span<const DriverBuffer> bufs,
                                           ChainInfo& chain) {
  std::uint8_t* table = indirect_ + static_cast<std::uint64_t>(slot) * opt_.max_indirect * 16;
  for (std::size_t i = 0; i < bufs.size(); ++i) {
    const DriverBuffer& b = bufs[i];
    Iova a = device_addr(b.gpa, b.len, b.device_writes ? writable_access() : Access::read, &chain);
    if (opt_.packed) {
      PackedDesc pd{a.value, b.len, 0, static_cast<std::uint16_t>(b.device_writes ? kDescFWrite : 0)};
      std::memcpy(table + 16 * i, &pd, 16);
    } else {
      auto flags = static_cast<std::uint16_t>((b.device_writes ? kDescFWrite : 0) |
                                              (i + 1 < bufs.size() ? kDescFNext : 0));
      SplitDesc sd{a.value, b.len, flags, static_cast<std::uint16_t>(i + 1)};
      std::memcpy(table + 16 * i, &sd, 16);
    }
  }
  Gpa table_gpa = indirect_gpa_ + static_cast<std::uint64_t>(slot) * opt_.max_indirect * 16;
  return device_addr(table_gpa, 16 * bufs.size(), Access::read, &chain).value;
}

Result<std::uint16_t, std::string> VirtioDriver::add(std::span<const DriverBuffer> buffers,
                                                     bool publish_now) {
  if (buffers.empty()) return unexpected(std::string("empty chain"));
  bool seen_write = false;
  for (const DriverBuffer& b : buffers) {
    if (!b.device_writes && seen_write)
      return unexpected(std::string("driver-readable buffer after a device-writable one"));
    seen_write |= b.device_writes;
  }
  if (buffers.size() > opt_.size)
    return unexpected(std::string("chain longer than the queue"));
  bool use_indirect = opt_.indirect && buffers.size() > 1;
  if (use_indirect && buffers.size() > opt_.max_indirect)
    return unexpected(std::string("chain longer than an indirect table"));
  std::size_t need = use_indirect ? 1 : buffers.size();
  if (need > free_count_ || free_list_.empty()) return unexpected(std::string("ring full"));
  auto r = opt_.packed ? add_packed(buffers) : add_split(buffers);
  if (r && publish_now) publish();
  return r;
}

Result<std::uint16_t, std::string> VirtioDriver::add_split(std::span<const DriverBuffer> bufs) {
  const std::uint32_t n = opt_.size;
  bool use_indirect = opt_.indirect && bufs.size() > 1;
  std::size_t k = use_indirect ? 1 : bufs.size();
  const std::uint16_t head = free_list_.back();  // add() checked the list is not empty
  std::vector<std::uint16_t>& ds = extra_descs_[head];  // reused: no allocation per chain
  ds.clear();
  for (std::size_t i = 0; i < k; ++i) {
    ds.push_back(free_list_.back());
    free_list_.pop_back();
  }
  ChainInfo& c = chains_[head];
  c.mapped.clear();
  c.live = true;
  c.descs = static_cast<std::uint16_t>(k);
  if (use_indirect) {
    std::uint64_t table = write_indirect(head, bufs, c);
    SplitDesc sd{table, static_cast<std::uint32_t>(16 * bufs.size()), kDescFIndirect, 0};
    std::memcpy(desc_ + 16ULL * head, &sd, 16);
  } else {
    for (std::size_t i = 0; i < k; ++i) {
      const DriverBuffer& b = bufs[i];
      Iova a = device_addr(b.gpa, b.len, b.device_writes ? writable_access() : Access::read, &c);
      auto flags = static_cast<std::uint16_t>((b.device_writes ? kDescFWrite : 0) |
                                              (i + 1 < k ? kDescFNext : 0));
      SplitDesc sd{a.value, b.len, flags, i + 1 < k ? ds[i + 1] : std::uint16_t{0}};
      std::memcpy(desc_ + 16ULL * ds[i], &sd, 16);
    }
  }
  // ds stays as the chain's descriptor list in driver-private memory: the device may
  // scribble on the table, the driver must not trust it to free them.
  store<std::uint16_t>(driver_ + split::avail_ring(avail_idx_ % n), head, std::memory_order_relaxed);
  ++avail_idx_;
  free_count_ = static_cast<std::uint16_t>(free_count_ - k);
  ++outstanding_;
  return head;
}

Result<std::uint16_t, std::string> VirtioDriver::add_packed(std::span<const DriverBuffer> bufs) {
  const std::uint32_t n = opt_.size;
  bool use_indirect = opt_.indirect && bufs.size() > 1;
  std::uint16_t id = free_list_.back();
  free_list_.pop_back();
  ChainInfo& c = chains_[id];
  c.mapped.clear();
  c.live = true;
  std::size_t k = use_indirect ? 1 : bufs.size();
  c.descs = static_cast<std::uint16_t>(k);
  for (std::size_t i = 0; i < k; ++i) {
    std::uint64_t addr;
    std::uint32_t len;
    std::uint16_t flags;
    if (use_indirect) {
      addr = write_indirect(id, bufs, c);
      len = static_cast<std::uint32_t>(16 * bufs.size());
      flags = kDescFIndirect;
    } else {
      const DriverBuffer& b = bufs[i];
      addr = device_addr(b.gpa, b.len, b.device_writes ? writable_access() : Access::read, &c).value;
      len = b.len;
      flags = static_cast<std::uint16_t>((b.device_writes ? kDescFWrite : 0) |
                                         (i + 1 < k ? kDescFNext : 0));
    }
    flags |= avail_wrap_ ? kPackedDescFAvail : kPackedDescFUsed;
    std::uint8_t* p = desc_ + 16ULL * avail_idx_;
    store<std::uint64_t>(p, addr, std::memory_order_relaxed);
    store<std::uint32_t>(p + 8, len, std::memory_order_relaxed);
    store<std::uint16_t>(p + 12, id, std::memory_order_relaxed);
    if (i == 0)
      pending_heads_.emplace_back(avail_idx_, flags);
    else
      store<std::uint16_t>(p + 14, flags, std::memory_order_relaxed);
    if (++avail_idx_ == n) {
      avail_idx_ = 0;
      avail_wrap_ = !avail_wrap_;
    }
  }
  free_count_ = static_cast<std::uint16_t>(free_count_ - k);
  ++outstanding_;
  return id;
}

void VirtioDriver::publish() {
  if (opt_.packed) {
    // Release: each head's descriptors before its flags; the first new head last, so
    // the device sees the whole batch at once.
    for (auto it = pending_heads_.rbegin(); it != pending_heads_.rend(); ++it)
      store<std::uint16_t>(desc_ + 16ULL * it->first + 14, it->second, std::memory_order_release);
    pending_heads_.clear();
    return;
  }
  store<std::uint16_t>(driver_ + split::kAvailIdx, avail_idx_, std::memory_order_release);
  published_idx_ = avail_idx_;
}

bool VirtioDriver::kick_needed() {
  // The full fence orders our publish before reading the device's suppression state.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  const std::uint32_t n = opt_.size;
  if (!opt_.packed) {
    std::uint16_t old = kicked_idx_;
    kicked_idx_ = published_idx_;
    if (opt_.event_idx)
      return need_event(load<std::uint16_t>(device_ + split::avail_event(n), std::memory_order_relaxed),
                        published_idx_, old);
    return (load<std::uint16_t>(device_ + split::kUsedFlags, std::memory_order_relaxed) & kUsedFNoNotify) == 0;
  }
  std::uint16_t old = kicked_pos_;
  bool old_wrap = kicked_wrap_;
  kicked_pos_ = avail_idx_;
  kicked_wrap_ = avail_wrap_;
  auto flags = load<std::uint16_t>(device_ + 2, std::memory_order_relaxed);
  if (flags == kEventFlagsDisable) return false;
  if (flags != kEventFlagsDesc || !opt_.event_idx) return true;
  auto off_wrap = load<std::uint16_t>(device_, std::memory_order_relaxed);
  auto event = static_cast<std::uint16_t>(off_wrap & ~packed::kWrapBit);
  bool event_wrap = (off_wrap & packed::kWrapBit) != 0;
  std::uint16_t new_idx = avail_idx_;
  if (old_wrap != avail_wrap_ || new_idx <= old) old = static_cast<std::uint16_t>(old - n);
  if (event_wrap != avail_wrap_) event = static_cast<std::uint16_t>(event - n);
  return need_event(event, new_idx, old);
}

void VirtioDriver::release(std::uint16_t id) {
  ChainInfo& c = chains_[id];
  if (opt_.iommu != nullptr)
    for (Iova a : c.mapped) opt_.iommu->unmap(a);
  c.mapped.clear();
  c.live = false;
  if (opt_.packed) {
    free_list_.push_back(id);
  } else {
    for (std::uint16_t x : extra_descs_[id]) free_list_.push_back(x);  // head included
    extra_descs_[id].clear();
  }
  free_count_ = static_cast<std::uint16_t>(free_count_ + c.descs);
  --outstanding_;
}

std::optional<UsedBuffer> VirtioDriver::poll() {
  while (true) {
    auto r = opt_.packed ? poll_packed() : poll_split();
    if (!r || r->id != 0xffff) return r;  // 0xffff: a bogus completion was skipped
  }
}

std::optional<UsedBuffer> VirtioDriver::poll_split() {
  const std::uint32_t n = opt_.size;
  auto dev_idx = load<std::uint16_t>(device_ + split::kUsedIdx, std::memory_order_acquire);
  if (dev_idx == used_idx_) return std::nullopt;
  std::uint8_t* e = device_ + split::used_ring(used_idx_ % n);
  auto id = load<std::uint32_t>(e, std::memory_order_relaxed);
  auto len = load<std::uint32_t>(e + 4, std::memory_order_relaxed);
  ++used_idx_;
  if (interrupts_ && opt_.event_idx)
    store<std::uint16_t>(driver_ + split::used_event(n), used_idx_, std::memory_order_relaxed);
  if (id >= n || !chains_[id].live) {
    ++device_errors_;
    return UsedBuffer{0xffff, 0};
  }
  release(static_cast<std::uint16_t>(id));
  return UsedBuffer{static_cast<std::uint16_t>(id), len};
}

std::optional<UsedBuffer> VirtioDriver::poll_packed() {
  const std::uint32_t n = opt_.size;
  std::uint8_t* p = desc_ + 16ULL * used_idx_;
  auto flags = load<std::uint16_t>(p + 14, std::memory_order_acquire);
  bool avail = (flags & kPackedDescFAvail) != 0;
  bool used = (flags & kPackedDescFUsed) != 0;
  if (avail != used_wrap_ || used != used_wrap_) return std::nullopt;
  auto id = load<std::uint16_t>(p + 12, std::memory_order_relaxed);
  auto len = load<std::uint32_t>(p + 8, std::memory_order_relaxed);
  if (id >= n || !chains_[id].live) {
    ++device_errors_;
    // Without a trustworthy id the driver cannot know how far to skip; step one slot.
    if (++used_idx_ == n) {
      used_idx_ = 0;
      used_wrap_ = !used_wrap_;
    }
    return UsedBuffer{0xffff, 0};
  }
  std::uint32_t next = static_cast<std::uint32_t>(used_idx_) + chains_[id].descs;
  if (next >= n) {
    next -= n;
    used_wrap_ = !used_wrap_;
  }
  used_idx_ = static_cast<std::uint16_t>(next);
  release(id);
  if (interrupts_ && opt_.event_idx) {
    auto off_wrap = static_cast<std::uint16_t>(used_idx_ | (used_wrap_ ? packed::kWrapBit : 0));
    store<std::uint16_t>(driver_, off_wrap, std::memory_order_relaxed);
  }
  return UsedBuffer{id, len};
}

void VirtioDriver::set_interrupts(bool enabled) {
  interrupts_ = enabled;
  const std::uint32_t n = opt_.size;
  if (!opt_.packed) {
    if (opt_.event_idx) {
      // Notify when used->idx passes what we have seen; disabled: an index far behind.
      auto ev = static_cast<std::uint16_t>(enabled ? used_idx_ : used_idx_ - 1);
      store<std::uint16_t>(driver_ + split::used_event(n), ev, std::memory_order_relaxed);
    }
    store<std::uint16_t>(driver_ + split::kAvailFlags, enabled ? 0 : kAvailFNoInterrupt,
                         std::memory_order_relaxed);
  } else {
    if (enabled && opt_.event_idx) {
      auto off_wrap = static_cast<std::uint16_t>(used_idx_ | (used_wrap_ ? packed::kWrapBit : 0));
      store<std::uint16_t>(driver_, off_wrap, std::memory_order_relaxed);
      store<std::uint16_t>(driver_ + 2, kEventFlagsDesc, std::memory_order_relaxed);
    } else {
      store<std::uint16_t>(driver_ + 2, enabled ? kEventFlagsEnable : kEventFlagsDisable,
                           std::memory_order_relaxed);
    }
  }
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

}  // namespace vhostkit::frontend
