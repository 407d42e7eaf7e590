// Virtqueue: configuration, ring mapping, chain walking and buffer copies shared by
// the split and packed formats.
#include "vhostkit/virtqueue.h"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "virtio/internal/guest_access.h"

namespace vhostkit {

std::atomic<CrashHook> detail::crash_hook{nullptr};

void set_crash_hook(CrashHook hook) {
  detail::crash_hook.store(hook, std::memory_order_relaxed);
}

const char* to_string(VirtqueueErrc e) {
  switch (e) {
    case VirtqueueErrc::bad_config: return "bad queue configuration";
    case VirtqueueErrc::not_started: return "queue not started";
    case VirtqueueErrc::broken: return "queue is broken";
    case VirtqueueErrc::ring_unmapped: return "ring not in guest memory";
    case VirtqueueErrc::avail_idx_jump: return "available index moved by more than the queue size";
    case VirtqueueErrc::head_out_of_range: return "descriptor index out of range";
    case VirtqueueErrc::next_out_of_range: return "next descriptor index out of range";
    case VirtqueueErrc::chain_too_long: return "descriptor chain longer than the queue (or a loop)";
    case VirtqueueErrc::nested_indirect: return "indirect descriptor inside an indirect table";
    case VirtqueueErrc::indirect_not_negotiated: return "indirect descriptor without INDIRECT_DESC";
    case VirtqueueErrc::indirect_with_next: return "indirect descriptor with NEXT set";
    case VirtqueueErrc::bad_indirect_size:
      return "indirect table size is 0 or not a multiple of 16";
    case VirtqueueErrc::readable_after_writable:
      return "driver-readable descriptor after a device-writable one";
    case VirtqueueErrc::length_overflow: return "chain length exceeds 4 GiB";
    case VirtqueueErrc::bad_buffer: return "buffer not in guest memory or not permitted";
    case VirtqueueErrc::bad_completion: return "completion for a chain that is not outstanding";
    case VirtqueueErrc::log_failed: return "ring write could not be logged";
  }
  return "unknown virtqueue error";
}

std::string VirtqueueError::message() const {
  return fmt::format("{} (index {}, address {:#x})", to_string(code), index, addr);
}

HostPtr Virtqueue::RingArea::at_slow(std::uint64_t off, std::uint64_t size, Segment* seg) const {
  std::uint64_t base = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (off < base + segs[i].len) {
      std::uint64_t o = off - base;
      if (o + size > segs[i].len) return nullptr;  // a field straddling two mappings
      if (seg != nullptr) *seg = Segment{segs[i].host + o, segs[i].gpa + o, size};
      return segs[i].host + o;
    }
    base += segs[i].len;
  }
  return nullptr;
}

Virtqueue::Virtqueue(AddressSpace& space, LogMode log_mode) : space_(space), tr_(space, log_mode) {}

VirtqueueError Virtqueue::fail(VirtqueueError e) {
  if (!broken_) broken_ = e;
  return e;
}

Result<void, VirtqueueError> Virtqueue::start(const QueueConfig& config, const RingState& state,
                                              bool used_from_ring) {
  using namespace virtio;
  std::uint32_t n = config.size;
  bool packed = config.format == RingFormat::packed;
  if (n == 0 || n > kMaxQueueSize || (!packed && (n & (n - 1)) != 0))
    return unexpected(VirtqueueError{VirtqueueErrc::bad_config, n});
  std::uint64_t desc_align = packed ? packed::kDescAlign : split::kDescAlign;
  std::uint64_t driver_align = packed ? packed::kEventAlign : split::kAvailAlign;
  std::uint64_t device_align = packed ? packed::kEventAlign : split::kUsedAlign;
  if (config.addr.desc.value % desc_align != 0 || config.addr.driver.value % driver_align != 0 ||
      config.addr.device.value % device_align != 0)
    return unexpected(VirtqueueError{VirtqueueErrc::bad_config, n, config.addr.desc.value});
  reset();
  config_ = config;
  state_ = state;
  if (!packed) {
    state_.avail_wrap = true;
    state_.used_wrap = true;
  } else if (state_.avail_idx >= n || state_.used_idx >= n) {
    return unexpected(VirtqueueError{VirtqueueErrc::bad_config, state_.avail_idx});
  }
  started_ = true;
  // Inflight tracking is for split rings; a packed ring runs untracked.
  if (packed) inflight_ = {};
  if (!packed && used_from_ring) {
    // Resume where the used ring says the previous device stopped. If the ring is not
    // translatable yet (IOTLB miss) it is read when it first maps.
    if (auto m = ensure_mapped(); m) {
      state_.used_idx =
          detail::load<std::uint16_t>(device_.at(split::kUsedIdx, 2), std::memory_order_acquire);
    } else if (broken_) {
      return unexpected(*broken_);
    } else {
      pending_used_from_ring_ = true;
    }
  }
  if (!inflight_.empty()) {
    // The recovery reads the used ring: it waits, as the used index does, until the
    // rings map (an IOTLB miss).
    pending_recover_ = true;
    if (!pending_used_from_ring_) {
      auto m = ensure_mapped();  // recovers if it maps the rings now
      if (m && pending_recover_) {
        pending_recover_ = false;
        if (auto r = recover_inflight(); !r) {
          started_ = false;
          return unexpected(r.error());
        }
      } else if (!m && broken_) {
        started_ = false;
        return unexpected(*broken_);
      }
    }
  }
  return {};
}

void Virtqueue::set_inflight(std::span<std::uint8_t> region, bool recover) {
  inflight_ = region;
  inflight_recover_ = recover && !region.empty();
}

void Virtqueue::clear_inflight() {
  if (!inflight_.empty()) std::memset(inflight_.data(), 0, inflight_.size());
  resubmit_.clear();
  resubmit_pos_ = 0;
}

// Brings the region in line with the ring at start (used index known). Without
// recovery the records are this back-end's own: kept as they are. With recovery they
// are a predecessor's: completions that reached the used ring are cleared, the heads
// still in flight are queued for pop() in counter order, and the avail position is
// what was consumed: completed (used index) plus still in flight.
Result<void, VirtqueueError> Virtqueue::recover_inflight() {
  using namespace virtio;
  const std::uint32_t n = config_.size;
  if (inflight_.size() < inflight::queue_region_size(n))
    return unexpected(VirtqueueError{VirtqueueErrc::bad_config, n, inflight_.size()});
  HostPtr r = inflight_.data();
  auto version = detail::load<std::uint16_t>(r + inflight::kVersionOff, std::memory_order_acquire);
  auto desc_num = detail::load<std::uint16_t>(r + inflight::kDescNum, std::memory_order_relaxed);
  const bool recover = inflight_recover_;
  inflight_recover_ = false;
  if (version == 0 || (!recover && (version != inflight::kVersion || desc_num != n))) {
    // A fresh region (or our own for another ring size): start empty.
    std::memset(r, 0, inflight::queue_region_size(n));
    detail::store<std::uint16_t>(r + inflight::kDescNum, static_cast<std::uint16_t>(n),
                                 std::memory_order_relaxed);
    detail::store<std::uint16_t>(r + inflight::kUsedIdx, state_.used_idx,
                                 std::memory_order_relaxed);
    detail::store<std::uint16_t>(r + inflight::kVersionOff, inflight::kVersion,
                                 std::memory_order_release);
    inflight_counter_ = 1;
    return {};
  }
  if (version != inflight::kVersion)
    return unexpected(VirtqueueError{VirtqueueErrc::bad_config, version});
  if (desc_num != n) return unexpected(VirtqueueError{VirtqueueErrc::bad_config, desc_num});
  recovered_ = recover;
  auto region_used = detail::load<std::uint16_t>(r + inflight::kUsedIdx, std::memory_order_relaxed);
  if (recover && region_used != state_.used_idx) {
    // The predecessor published completions and died before it recorded them.
    auto ahead = static_cast<std::uint16_t>(state_.used_idx - region_used);
    auto clear = [&](std::uint32_t head) {
      if (head < n)
        detail::store<std::uint8_t>(r + inflight::desc_state(head) + inflight::kInflight, 0,
                                    std::memory_order_relaxed);
    };
    if (ahead <= n) {
      for (std::uint16_t k = region_used; k != state_.used_idx; ++k) {
        HostPtr e = device_.at(split::used_ring(k % n), sizeof(UsedElem));
        if (e == nullptr) return unexpected(fail(VirtqueueError{VirtqueueErrc::ring_unmapped, k}));
        clear(detail::load<std::uint32_t>(e, std::memory_order_relaxed));
      }
    } else {
      clear(detail::load<std::uint16_t>(r + inflight::kLastBatchHead, std::memory_order_relaxed));
    }
  }
  detail::store<std::uint16_t>(r + inflight::kUsedIdx, state_.used_idx, std::memory_order_release);
  // The records left, oldest first.
  std::vector<std::pair<std::uint64_t, std::uint16_t>> live;
  std::uint64_t max_counter = 0;
  for (std::uint32_t i = 0; i < n; ++i) {
    HostPtr d = r + inflight::desc_state(i);
    auto counter = detail::load<std::uint64_t>(d + inflight::kCounter, std::memory_order_relaxed);
    if (detail::load<std::uint8_t>(d + inflight::kInflight, std::memory_order_relaxed) == 0)
      continue;
    live.emplace_back(counter, static_cast<std::uint16_t>(i));
    max_counter = std::max(max_counter, counter);
  }
  inflight_counter_ = max_counter + 1;
  if (!recover) return {};
  std::sort(live.begin(), live.end());
  resubmit_.clear();
  for (const auto& l : live) resubmit_.push_back(l.second);
  resubmit_pos_ = 0;
  state_.avail_idx = static_cast<std::uint16_t>(state_.used_idx + live.size());
  return {};
}

RingState Virtqueue::stop() {
  started_ = false;
  mapped_ = false;
  ring_memory_.reset();
  tr_.release();  // flushes the log; a stopped queue holds no memory table or log
  return state_;
}

void Virtqueue::reset() {
  started_ = false;
  mapped_ = false;
  broken_.reset();
  ring_memory_.reset();
  in_flight_ = 0;
  state_ = RingState{};
  pending_used_from_ring_ = false;
  pending_recover_ = false;
  recovered_ = false;
  resubmit_.clear();
  resubmit_pos_ = 0;
  unreported_miss_.reset();
  tr_.release();
}

Result<void, VirtqueueError> Virtqueue::map_area(Iova addr, std::uint64_t len, Access access,
                                                 std::uint64_t align, RingArea& area) {
  auto n = tr_.translate(addr, len, access, area.segs);
  if (!n) {
    const TranslateError& e = n.error();
    if (e.code == TranslateErrc::iotlb_miss) {
      last_miss_ = e;
      // Only pop() hands a ring miss on to be sent (PopResult::deferred). If start(),
      // push(), set_kick_enabled() or has_available() met it first, the next pop() must
      // still report it, or the miss would wait for the IOTLB's miss timeout.
      if (e.report_miss) unreported_miss_ = e;
      return unexpected(VirtqueueError{VirtqueueErrc::ring_unmapped, 0, e.addr.value});
    }
    return unexpected(fail(VirtqueueError{VirtqueueErrc::ring_unmapped, 0, addr.value}));
  }
  area.n = *n;
  area.len = len;
  for (std::size_t i = 0; i < area.n; ++i)
    if (reinterpret_cast<std::uintptr_t>(area.segs[i].host) % align != 0 ||
        (i + 1 < area.n && area.segs[i].len % align != 0))
      return unexpected(fail(VirtqueueError{VirtqueueErrc::ring_unmapped, 0, addr.value}));
  return {};
}

Result<void, VirtqueueError> Virtqueue::map_rings() {
  using namespace virtio;
  std::uint32_t n = config_.size;
  bool packed = config_.format == RingFormat::packed;
  for (int attempt = 0; attempt < 4; ++attempt) {
    std::uint64_t g = tr_.sync();
    last_miss_.reset();
    if (packed) {
      if (auto r = map_area(config_.addr.desc, packed::desc_ring_size(n), Access::read_write,
                            packed::kDescAlign, desc_);
          !r)
        return r;
      if (auto r = map_area(config_.addr.driver, packed::kEventSize, Access::read,
                            packed::kEventAlign, driver_);
          !r)
        return r;
      if (auto r = map_area(config_.addr.device, packed::kEventSize, Access::write,
                            packed::kEventAlign, device_);
          !r)
        return r;
    } else {
      if (auto r = map_area(config_.addr.desc, split::desc_table_size(n), Access::read,
                            split::kDescAlign, desc_);
          !r)
        return r;
      if (auto r = map_area(config_.addr.driver, split::avail_size(n), Access::read,
                            split::kAvailAlign, driver_);
          !r)
        return r;
      if (auto r = map_area(config_.addr.device, split::used_size(n), Access::read_write,
                            split::kUsedAlign, device_);
          !r)
        return r;
    }
    if (tr_.sync() != g) continue;  // the space changed while mapping: map again
    ring_generation_ = g;
    ring_memory_ = tr_.memory();
    mapped_ = true;
    if (config_.log_guest_addr && *config_.log_guest_addr != device_.segs[0].gpa)
      ++log_addr_mismatches_;
    return {};
  }
  return unexpected(VirtqueueError{VirtqueueErrc::ring_unmapped, 0, config_.addr.desc.value});
}

Result<void, VirtqueueError> Virtqueue::ensure_mapped() {
  if (broken_)
    return unexpected(VirtqueueError{VirtqueueErrc::broken, broken_->index, broken_->addr});
  if (!started_) return unexpected(VirtqueueError{VirtqueueErrc::not_started});
  if (mapped_ && tr_.sync() == ring_generation_) return {};
  mapped_ = false;
  if (auto r = map_rings(); !r) return r;
  if (pending_used_from_ring_) {
    pending_used_from_ring_ = false;
    state_.used_idx = detail::load<std::uint16_t>(device_.at(virtio::split::kUsedIdx, 2),
                                                  std::memory_order_acquire);
  }
  if (pending_recover_) {
    pending_recover_ = false;
    if (auto r = recover_inflight(); !r) return unexpected(fail(r.error()));
  }
  return {};
}

Result<void, VirtqueueError> Virtqueue::log_ring(const RingArea& area, std::uint64_t off,
                                                 std::uint64_t len) {
  // The range may span several of the area's segments (a ring mapped page by page).
  std::uint64_t base = 0;
  for (std::size_t i = 0; i < area.n && len > 0; ++i) {
    const Segment& s = area.segs[i];
    if (off < base + s.len) {
      std::uint64_t o = off - base;
      std::uint64_t take = std::min(len, s.len - o);
      if (auto r = tr_.log_write(Segment{s.host + o, s.gpa + o, take}); !r)
        return unexpected(VirtqueueError{VirtqueueErrc::log_failed, 0, r.error().addr.value});
      off += take;
      len -= take;
    }
    base += s.len;
  }
  if (len > 0) return unexpected(VirtqueueError{VirtqueueErrc::ring_unmapped, 0, off});
  return {};
}

Result<bool, VirtqueueError> Virtqueue::add_buffer(ChainBatch& out, DescChain& chain,
                                                   std::uint64_t addr, std::uint32_t len,
                                                   bool writable, bool& seen_writable) {
  if (writable) {
    seen_writable = true;
    if (static_cast<std::uint64_t>(chain.writable_len) + len > UINT32_MAX)
      return unexpected(fail(VirtqueueError{VirtqueueErrc::length_overflow, chain.id, addr}));
    chain.writable_len += len;
  } else {
    if (seen_writable)
      return unexpected(
          fail(VirtqueueError{VirtqueueErrc::readable_after_writable, chain.id, addr}));
    if (static_cast<std::uint64_t>(chain.readable_len) + len > UINT32_MAX)
      return unexpected(fail(VirtqueueError{VirtqueueErrc::length_overflow, chain.id, addr}));
    chain.readable_len += len;
  }
  if (len == 0) return true;
  // The common case: the buffer translates into one segment (the translation cache's
  // inline hit), appended to the batch as it is. Anything else is add_buffer_slow's,
  // which starts from this attempt's error (a miss is noted once: not translated again).
  Segment one;
  auto n = tr_.translate(Iova(addr), len, writable ? Access::write : Access::read,
                         std::span<Segment>(&one, 1));
  if (!n) return add_buffer_slow(out, chain, addr, len, writable, n.error());
  out.segments_.push_back(one);
  if (writable)
    ++chain.n_writable;
  else
    ++chain.n_readable;
  return true;
}

Result<bool, VirtqueueError> Virtqueue::add_buffer_slow(ChainBatch& out, DescChain& chain,
                                                        std::uint64_t addr, std::uint32_t len,
                                                        bool writable, TranslateError first) {
  // Growing heap storage for a fragmented buffer; the look-ahead of a dry run continues
  // after a missing page with the rest of the buffer.
  auto& segs = out.segments_;
  std::vector<Segment> dst;
  std::size_t room = 1;
  TranslateError e = first;
  while (true) {
    if (e.code == TranslateErrc::too_many_segments && room < 4096) {
      room *= 4;
      dst.resize(room);
    } else if (e.code == TranslateErrc::iotlb_miss) {
      if (dry_run_ == nullptr) {
        deferred_ = e;
        return false;
      }
      if (e.report_miss) dry_run_->push_back(e);
      // Look-ahead: the rest of this buffer and chain may miss other pages too.
      std::uint64_t next = (e.addr.value | (kPageSize - 1)) + 1;
      std::uint64_t end = addr + len;
      if (next <= e.addr.value || next >= end) return true;
      len = static_cast<std::uint32_t>(end - next);
      addr = next;
      if (room == 1) dst.resize(1);
    } else {
      return unexpected(fail(VirtqueueError{VirtqueueErrc::bad_buffer, chain.id, addr}));
    }
    auto n = tr_.translate(Iova(addr), len, writable ? Access::write : Access::read,
                           std::span<Segment>(dst));
    if (n) {
      segs.insert(segs.end(), dst.begin(), dst.begin() + static_cast<std::ptrdiff_t>(*n));
      if (writable)
        chain.n_writable += static_cast<std::uint32_t>(*n);
      else
        chain.n_readable += static_cast<std::uint32_t>(*n);
      return true;
    }
    e = n.error();
  }
}

std::size_t Virtqueue::collect_misses(std::vector<TranslateError>& out, std::size_t max_chains) {
  std::size_t before = out.size();
  if (auto m = ensure_mapped(); !m) {
    if (last_miss_ && last_miss_->report_miss) {
      out.push_back(*last_miss_);
      unreported_miss_.reset();  // reported here
    }
    return out.size() - before;
  }
  RingState saved_state = state_;
  std::uint32_t saved_in_flight = in_flight_;
  std::optional<VirtqueueError> saved_broken = broken_;
  dry_run_ = &out;
  scratch_.clear();
  (void)(config_.format == RingFormat::packed ? pop_packed(scratch_, max_chains)
                                              : pop_split(scratch_, max_chains));
  dry_run_ = nullptr;
  scratch_.clear();
  // A malformed chain is reported by the real pop, not by the look-ahead.
  state_ = saved_state;
  in_flight_ = saved_in_flight;
  broken_ = saved_broken;
  return out.size() - before;
}

Result<bool, VirtqueueError> Virtqueue::walk_indirect(ChainBatch& out, DescChain& chain,
                                                      std::uint64_t addr, std::uint32_t len,
                                                      bool& seen_writable, std::uint32_t& count) {
  bool packed = config_.format == RingFormat::packed;
  if (!config_.indirect)
    return unexpected(fail(VirtqueueError{VirtqueueErrc::indirect_not_negotiated, chain.id, addr}));
  if (len == 0 || len % 16 != 0)
    return unexpected(fail(VirtqueueError{VirtqueueErrc::bad_indirect_size, chain.id, addr}));
  std::uint32_t entries = len / 16;
  if (entries > config_.size)
    return unexpected(fail(VirtqueueError{VirtqueueErrc::chain_too_long, chain.id, addr}));
  // Copy the table out of guest memory once: the walk below then never reads guest
  // memory past the table's end, and sees one consistent table.
  indirect_scratch_.resize(len);
  if (auto r = tr_.read(Iova(addr), indirect_scratch_); !r) {
    if (r.error().code == TranslateErrc::iotlb_miss) {
      if (dry_run_ == nullptr) {
        deferred_ = r.error();
        return false;
      }
      if (r.error().report_miss) dry_run_->push_back(r.error());
      return true;  // cannot look inside a missing table
    }
    return unexpected(fail(VirtqueueError{VirtqueueErrc::bad_buffer, chain.id, addr}));
  }
  const std::uint8_t* table = indirect_scratch_.data();
  if (packed) {
    // Packed indirect tables are used in order, all entries (spec 2.8.19).
    for (std::uint32_t i = 0; i < entries; ++i) {
      if (++count > config_.size)
        return unexpected(fail(VirtqueueError{VirtqueueErrc::chain_too_long, chain.id, i}));
      auto d = detail::snapshot_of<virtio::PackedDesc>(table + 16ULL * i);
      if (d.flags & virtio::kDescFIndirect)
        return unexpected(fail(VirtqueueError{VirtqueueErrc::nested_indirect, chain.id, d.addr}));
      auto r = add_buffer(out, chain, d.addr, d.len, (d.flags & virtio::kDescFWrite) != 0,
                          seen_writable);
      if (!r || !*r) return r;
    }
    return true;
  }
  std::uint32_t i = 0;
  while (true) {
    if (++count > config_.size)
      return unexpected(fail(VirtqueueError{VirtqueueErrc::chain_too_long, chain.id, i}));
    auto d = detail::snapshot_of<virtio::SplitDesc>(table + 16ULL * i);
    if (d.flags & virtio::kDescFIndirect)
      return unexpected(fail(VirtqueueError{VirtqueueErrc::nested_indirect, chain.id, d.addr}));
    auto r =
        add_buffer(out, chain, d.addr, d.len, (d.flags & virtio::kDescFWrite) != 0, seen_writable);
    if (!r || !*r) return r;
    if (!(d.flags & virtio::kDescFNext)) return true;
    if (d.next >= entries)
      return unexpected(fail(VirtqueueError{VirtqueueErrc::next_out_of_range, chain.id, d.next}));
    i = d.next;
  }
}

Result<PopResult, VirtqueueError> Virtqueue::pop(ChainBatch& out, std::size_t max) {
  if (auto m = ensure_mapped(); !m) {
    if (last_miss_ && !broken_) {
      PopResult r;
      r.deferred = last_miss_;
      if (unreported_miss_ && unreported_miss_->addr.page() == last_miss_->addr.page())
        r.deferred->report_miss = true;
      unreported_miss_.reset();
      return r;
    }
    return unexpected(m.error());
  }
  unreported_miss_.reset();
  return config_.format == RingFormat::packed ? pop_packed(out, max) : pop_split(out, max);
}

Result<void, VirtqueueError> Virtqueue::adopt_in_flight(std::uint32_t n) {
  if (!started_) return unexpected(VirtqueueError{VirtqueueErrc::not_started});
  if (n > config_.size || in_flight_ > config_.size - n)
    return unexpected(VirtqueueError{VirtqueueErrc::bad_completion, n});
  in_flight_ += n;
  return {};
}

Result<bool, VirtqueueError> Virtqueue::push(std::span<const Completion> done) {
  if (done.empty()) return false;
  if (auto m = ensure_mapped(); !m) return unexpected(m.error());
  if (done.size() > in_flight_)
    return unexpected(fail(VirtqueueError{VirtqueueErrc::bad_completion, done[0].id}));
  auto r = config_.format == RingFormat::packed ? push_packed(done) : push_split(done);
  if (r) in_flight_ -= static_cast<std::uint32_t>(done.size());
  return r;
}

Result<std::uint32_t, VirtqueueError> Virtqueue::write_chain(const ChainBatch& batch,
                                                             const DescChain& chain,
                                                             std::uint32_t offset,
                                                             std::span<const std::uint8_t> data) {
  const std::span<const Segment> segs = batch.writable(chain);
  // The common case first: the data fits in the first segment (a receive buffer of one
  // descriptor, translated in one piece).
  if (!data.empty() && !segs.empty() && offset < segs[0].len &&
      data.size() <= segs[0].len - offset) {
    const Segment& s = segs[0];
    std::memcpy(s.host + offset, data.data(), data.size());
    if (auto r = tr_.log_write(Segment{s.host + offset, s.gpa + offset, data.size()}); !r)
      return unexpected(VirtqueueError{VirtqueueErrc::log_failed, chain.id, r.error().addr.value});
    return static_cast<std::uint32_t>(data.size());
  }
  std::uint32_t written = 0;
  std::uint64_t skip = offset;
  for (const Segment& s : segs) {
    if (written == data.size()) break;
    if (skip >= s.len) {
      skip -= s.len;
      continue;
    }
    std::uint64_t n = std::min<std::uint64_t>(s.len - skip, data.size() - written);
    std::memcpy(s.host + skip, data.data() + written, n);
    if (auto r = tr_.log_write(Segment{s.host + skip, s.gpa + skip, n}); !r)
      return unexpected(VirtqueueError{VirtqueueErrc::log_failed, chain.id, r.error().addr.value});
    written += static_cast<std::uint32_t>(n);
    skip = 0;
  }
  return written;
}

std::uint32_t Virtqueue::read_chain(const ChainBatch& batch, const DescChain& chain,
                                    std::uint32_t offset, std::span<std::uint8_t> out) const {
  std::uint32_t copied = 0;
  std::uint64_t skip = offset;
  for (const Segment& s : batch.readable(chain)) {
    if (copied == out.size()) break;
    if (skip >= s.len) {
      skip -= s.len;
      continue;
    }
    std::uint64_t n = std::min<std::uint64_t>(s.len - skip, out.size() - copied);
    std::memcpy(out.data() + copied, s.host + skip, n);
    copied += static_cast<std::uint32_t>(n);
    skip = 0;
  }
  return copied;
}

}  // namespace vhostkit
