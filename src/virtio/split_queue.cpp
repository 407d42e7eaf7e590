// Split virtqueue (virtio 1.2 section 2.7), device side.
#include "vhostkit/virtqueue.h"
#include "virtio/internal/guest_access.h"

namespace vhostkit {

using namespace virtio;

Result<bool, VirtqueueError> Virtqueue::walk_split(ChainBatch& out, std::uint16_t head) {
  const std::uint32_t n = config_.size;
  std::size_t seg_mark = out.segments_.size();
  DescChain chain;
  chain.id = head;
  chain.ring_descs = 1;
  chain.first_readable = static_cast<std::uint32_t>(seg_mark);
  bool seen_writable = false;
  std::uint32_t count = 0;
  std::uint16_t i = head;
  bool complete = false;
  while (true) {
    if (++count > n) return unexpected(fail(VirtqueueError{VirtqueueErrc::chain_too_long, head}));
    HostPtr p = desc_.at(16ULL * i, 16);
    if (p == nullptr) return unexpected(fail(VirtqueueError{VirtqueueErrc::ring_unmapped, i}));
    auto d = detail::snapshot_of<SplitDesc>(p);
    if (d.flags & kDescFIndirect) {
      if (d.flags & kDescFNext)
        return unexpected(fail(VirtqueueError{VirtqueueErrc::indirect_with_next, i, d.addr}));
      --count;  // the limit counts buffers: the table pointer itself is not one
      auto r = walk_indirect(out, chain, d.addr, d.len, seen_writable, count);
      if (!r) return unexpected(r.error());
      complete = *r;
      break;
    }
    auto r = add_buffer(out, chain, d.addr, d.len, (d.flags & kDescFWrite) != 0, seen_writable);
    if (!r) return unexpected(r.error());
    complete = *r;
    if (!complete || !(d.flags & kDescFNext)) break;
    if (d.next >= n)
      return unexpected(fail(VirtqueueError{VirtqueueErrc::next_out_of_range, i, d.next}));
    i = d.next;
  }
  if (!complete) {
    // Deferred: drop this chain's segments; it stays in the ring for the next pop.
    out.segments_.resize(seg_mark);
    return false;
  }
  chain.first_writable = chain.first_readable + chain.n_readable;
  out.chains_.push_back(chain);
  return true;
}

void Virtqueue::mark_inflight(std::uint16_t head) {
  // The spec's order: the counter, then the flag that makes the record count.
  HostPtr d = inflight_.data() + inflight::desc_state(head);
  detail::store<std::uint64_t>(d + inflight::kCounter, inflight_counter_++,
                               std::memory_order_relaxed);
  detail::store<std::uint8_t>(d + inflight::kInflight, 1, std::memory_order_release);
  detail::crash_point(CrashPoint::popped);
}

Result<PopResult, VirtqueueError> Virtqueue::pop_split(ChainBatch& out, std::size_t max) {
  const std::uint32_t n = config_.size;
  PopResult result;
  // Chains a previous back-end popped and never completed go first, oldest first. They
  // are still marked in flight.
  while (resubmit_pos_ < resubmit_.size() && result.popped < max) {
    auto r = walk_split(out, resubmit_[resubmit_pos_]);
    if (!r) return unexpected(r.error());
    if (!*r) {
      result.deferred = deferred_;
      return result;
    }
    ++resubmit_pos_;
    ++in_flight_;
    ++result.popped;
  }
  if (resubmit_pos_ < resubmit_.size()) return result;
  // Acquire: the ring entries and descriptors the driver wrote before publishing idx.
  std::uint16_t avail_idx =
      detail::load<std::uint16_t>(driver_.at(split::kAvailIdx, 2), std::memory_order_acquire);
  avail_shadow_ = avail_idx;
  auto pending = static_cast<std::uint16_t>(avail_idx - state_.avail_idx);
  if (pending > n)
    return unexpected(fail(VirtqueueError{VirtqueueErrc::avail_idx_jump, avail_idx}));
  std::size_t todo = std::min<std::size_t>(pending, max - result.popped);
  for (std::size_t k = 0; k < todo; ++k) {
    std::uint16_t slot = state_.avail_idx % n;
    auto head = detail::load<std::uint16_t>(driver_.at(split::avail_ring(slot), 2),
                                            std::memory_order_relaxed);
    if (head >= n) return unexpected(fail(VirtqueueError{VirtqueueErrc::head_out_of_range, head}));
    auto r = walk_split(out, head);
    if (!r) return unexpected(r.error());
    if (!*r) {
      result.deferred = deferred_;
      break;
    }
    if (!inflight_.empty()) mark_inflight(head);
    ++state_.avail_idx;
    ++in_flight_;
    ++result.popped;
  }
  return result;
}

Result<bool, VirtqueueError> Virtqueue::push_split(std::span<const Completion> done) {
  const std::uint32_t n = config_.size;
  const bool tracked = !inflight_.empty();
  if (tracked) detail::crash_point(CrashPoint::push_begin);
  std::uint16_t old_used = state_.used_idx;
  std::uint16_t idx = old_used;
  for (const Completion& c : done)
    if (c.id >= n) return unexpected(fail(VirtqueueError{VirtqueueErrc::bad_completion, c.id}));
  for (const Completion& c : done) {
    std::uint64_t off = split::used_ring(idx % n);
    HostPtr p = device_.at(off, sizeof(UsedElem));
    if (p == nullptr) return unexpected(fail(VirtqueueError{VirtqueueErrc::ring_unmapped, idx}));
    detail::store<std::uint32_t>(p, c.id, std::memory_order_relaxed);
    detail::store<std::uint32_t>(p + 4, c.len, std::memory_order_relaxed);
    ++idx;
  }
  // Log the used elements written: one contiguous run of the ring, or two if it wrapped.
  if (tr_.logging()) {
    std::uint32_t first = old_used % n;
    std::uint32_t count = static_cast<std::uint32_t>(done.size());
    std::uint32_t run = std::min(count, n - first);
    if (auto r = log_ring(device_, split::used_ring(first), 8ULL * run); !r)
      return unexpected(fail(r.error()));
    if (run < count)
      if (auto r = log_ring(device_, split::used_ring(0), 8ULL * (count - run)); !r)
        return unexpected(fail(r.error()));
  }
  HostPtr region = inflight_.data();
  if (tracked) {
    // A successor that finds the ring's used index ahead of the region's clears the
    // heads of the elements in between (for a batch of one: last_batch_head).
    detail::store<std::uint16_t>(region + inflight::kLastBatchHead, done.back().id,
                                 std::memory_order_release);
    detail::crash_point(CrashPoint::used_written);
  }
  // Release: the used elements (and the buffer data before them) become visible to the
  // driver no later than the new index.
  detail::store<std::uint16_t>(device_.at(split::kUsedIdx, 2), idx, std::memory_order_release);
  if (tracked) {
    detail::crash_point(CrashPoint::used_idx_stored);
    for (const Completion& c : done)
      detail::store<std::uint8_t>(region + inflight::desc_state(c.id) + inflight::kInflight, 0,
                                  std::memory_order_release);
    detail::crash_point(CrashPoint::inflight_cleared);
    detail::store<std::uint16_t>(region + inflight::kUsedIdx, idx, std::memory_order_release);
  }
  if (auto r = log_ring(device_, split::kUsedIdx, 2); !r) return unexpected(fail(r.error()));
  state_.used_idx = idx;
  if (auto r = tr_.flush_log(); !r)
    return unexpected(VirtqueueError{VirtqueueErrc::log_failed, 0, r.error().addr.value});

  // Notification decision. The full fence orders our used->idx store before the read of
  // the driver's suppression state (the driver does the mirror image).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (config_.event_idx) {
    auto used_event =
        detail::load<std::uint16_t>(driver_.at(split::used_event(n), 2), std::memory_order_relaxed);
    return need_event(used_event, idx, old_used);
  }
  auto flags =
      detail::load<std::uint16_t>(driver_.at(split::kAvailFlags, 2), std::memory_order_relaxed);
  return (flags & kAvailFNoInterrupt) == 0;
}

Result<bool, VirtqueueError> Virtqueue::set_kick_enabled(bool enabled) {
  if (auto m = ensure_mapped(); !m) return unexpected(m.error());
  const std::uint32_t n = config_.size;
  if (config_.format == RingFormat::packed) {
    std::uint16_t flags = enabled ? kEventFlagsEnable : kEventFlagsDisable;
    if (enabled && config_.event_idx) {
      flags = kEventFlagsDesc;
      auto off_wrap =
          static_cast<std::uint16_t>(state_.avail_idx | (state_.avail_wrap ? packed::kWrapBit : 0));
      detail::store<std::uint16_t>(device_.at(0, 2), off_wrap, std::memory_order_relaxed);
    }
    detail::store<std::uint16_t>(device_.at(2, 2), flags, std::memory_order_relaxed);
    if (auto r = log_ring(device_, 0, packed::kEventSize); !r) return unexpected(fail(r.error()));
  } else if (config_.event_idx) {
    // Kick me when avail->idx passes our position.
    detail::store<std::uint16_t>(device_.at(split::avail_event(n), 2), state_.avail_idx,
                                 std::memory_order_relaxed);
    if (auto r = log_ring(device_, split::avail_event(n), 2); !r)
      return unexpected(fail(r.error()));
  } else {
    auto p = device_.at(split::kUsedFlags, 2);
    detail::store<std::uint16_t>(p, enabled ? 0 : kUsedFNoNotify, std::memory_order_relaxed);
    if (auto r = log_ring(device_, split::kUsedFlags, 2); !r) return unexpected(fail(r.error()));
  }
  if (auto r = tr_.flush_log(); !r)
    return unexpected(VirtqueueError{VirtqueueErrc::log_failed, 0, r.error().addr.value});
  if (!enabled) return false;
  // Re-check after publishing: a buffer added before the driver saw our request would
  // otherwise never be kicked.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return has_available();
}

bool Virtqueue::has_available() {
  if (!ensure_mapped()) return false;
  if (resubmit_pos_ < resubmit_.size()) return true;
  if (config_.format == RingFormat::packed) {
    HostPtr p = desc_.at(16ULL * state_.avail_idx, 16);
    auto flags = detail::load<std::uint16_t>(p + 14, std::memory_order_acquire);
    bool avail = (flags & kPackedDescFAvail) != 0;
    bool used = (flags & kPackedDescFUsed) != 0;
    return avail == state_.avail_wrap && used != state_.avail_wrap;
  }
  auto idx =
      detail::load<std::uint16_t>(driver_.at(split::kAvailIdx, 2), std::memory_order_acquire);
  return idx != state_.avail_idx;
}

}  // namespace vhostkit
