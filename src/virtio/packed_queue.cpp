// Packed virtqueue (virtio 1.2 section 2.8), device side.
#include "vhostkit/virtqueue.h"
#include "virtio/internal/guest_access.h"

namespace vhostkit {

using namespace virtio;

namespace {
constexpr std::uint64_t kFlagsOff = 14;  // offsetof(PackedDesc, flags)
constexpr std::uint64_t kIdOff = 12;     // offsetof(PackedDesc, id)
constexpr std::uint64_t kLenOff = 8;     // offsetof(PackedDesc, len)

bool is_available(std::uint16_t flags, bool wrap) {
  return ((flags & kPackedDescFAvail) != 0) == wrap && ((flags & kPackedDescFUsed) != 0) != wrap;
}
}  // namespace

Result<PopResult, VirtqueueError> Virtqueue::pop_packed(ChainBatch& out, std::size_t max) {
  const std::uint32_t n = config_.size;
  PopResult result;
  while (result.popped < max) {
    std::uint16_t head = state_.avail_idx;
    bool wrap = state_.avail_wrap;
    HostPtr hp = desc_.at(16ULL * head, 16);
    if (hp == nullptr) return unexpected(fail(VirtqueueError{VirtqueueErrc::ring_unmapped, head}));
    // Acquire: the head's flags are written last by the driver; everything in the chain
    // is visible once they say "available".
    auto head_flags = detail::load<std::uint16_t>(hp + kFlagsOff, std::memory_order_acquire);
    if (!is_available(head_flags, wrap)) break;

    std::size_t seg_mark = out.segments_.size();
    DescChain chain;
    chain.first_readable = static_cast<std::uint32_t>(seg_mark);
    bool seen_writable = false;
    std::uint32_t count = 0;
    std::uint16_t pos = head;
    bool complete = false;
    std::uint16_t ring_descs = 0;
    while (true) {
      if (++count > n || ring_descs >= n)
        return unexpected(fail(VirtqueueError{VirtqueueErrc::chain_too_long, head}));
      HostPtr p = desc_.at(16ULL * pos, 16);
      if (p == nullptr) return unexpected(fail(VirtqueueError{VirtqueueErrc::ring_unmapped, pos}));
      auto d = detail::snapshot_of<PackedDesc>(p);
      if (ring_descs == 0) d.flags = head_flags;  // use the value the acquire validated
      ++ring_descs;
      chain.id = d.id;  // the buffer id is the one in the chain's last descriptor
      if (d.flags & kDescFIndirect) {
        if (d.flags & kDescFNext)
          return unexpected(fail(VirtqueueError{VirtqueueErrc::indirect_with_next, pos, d.addr}));
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
      pos = static_cast<std::uint16_t>(pos + 1);
      if (pos >= n) pos = 0;
    }
    if (!complete) {
      out.segments_.resize(seg_mark);
      result.deferred = deferred_;
      break;
    }
    chain.ring_descs = ring_descs;
    chain.first_writable = chain.first_readable + chain.n_readable;
    out.chains_.push_back(chain);
    std::uint32_t next = static_cast<std::uint32_t>(head) + ring_descs;
    if (next >= n) {
      next -= n;
      state_.avail_wrap = !state_.avail_wrap;
    }
    state_.avail_idx = static_cast<std::uint16_t>(next);
    ++in_flight_;
    ++result.popped;
  }
  return result;
}

Result<bool, VirtqueueError> Virtqueue::push_packed(std::span<const Completion> done) {
  const std::uint32_t n = config_.size;
  std::uint16_t old_used = state_.used_idx;
  bool old_wrap = state_.used_wrap;
  std::uint16_t first_flags = 0;
  HostPtr first = nullptr;
  std::uint16_t idx = state_.used_idx;
  bool wrap = state_.used_wrap;
  for (std::size_t k = 0; k < done.size(); ++k) {
    const Completion& c = done[k];
    if (c.ring_descs == 0 || c.ring_descs > n)
      return unexpected(fail(VirtqueueError{VirtqueueErrc::bad_completion, c.id}));
    HostPtr p = desc_.at(16ULL * idx, 16);
    if (p == nullptr) return unexpected(fail(VirtqueueError{VirtqueueErrc::ring_unmapped, idx}));
    auto flags = static_cast<std::uint16_t>(wrap ? (kPackedDescFAvail | kPackedDescFUsed) : 0);
    if (c.len > 0) flags |= kDescFWrite;
    detail::store<std::uint16_t>(p + kIdOff, c.id, std::memory_order_relaxed);
    detail::store<std::uint32_t>(p + kLenOff, c.len, std::memory_order_relaxed);
    if (k == 0) {
      first = p;
      first_flags = flags;
    } else {
      // Release: this element's id/len before its flags.
      detail::store<std::uint16_t>(p + kFlagsOff, flags, std::memory_order_release);
    }
    if (auto r = log_ring(desc_, 16ULL * idx, 16); !r) return unexpected(fail(r.error()));
    std::uint32_t next = static_cast<std::uint32_t>(idx) + c.ring_descs;
    if (next >= n) {
      next -= n;
      wrap = !wrap;
    }
    idx = static_cast<std::uint16_t>(next);
  }
  // The head's flags last: the driver sees the whole batch at once.
  detail::store<std::uint16_t>(first + kFlagsOff, first_flags, std::memory_order_release);
  state_.used_idx = idx;
  state_.used_wrap = wrap;
  if (auto r = tr_.flush_log(); !r)
    return unexpected(VirtqueueError{VirtqueueErrc::log_failed, 0, r.error().addr.value});

  std::atomic_thread_fence(std::memory_order_seq_cst);
  auto flags = detail::load<std::uint16_t>(driver_.at(2, 2), std::memory_order_relaxed);
  if (flags == kEventFlagsDisable) return false;
  if (flags != kEventFlagsDesc || !config_.event_idx) return true;
  auto off_wrap = detail::load<std::uint16_t>(driver_.at(0, 2), std::memory_order_relaxed);
  // Compare in a space where the new used position is never below the old one: unwrap
  // old (and the event offset) by one ring if they belong to the previous lap.
  auto event = static_cast<std::uint16_t>(off_wrap & ~packed::kWrapBit);
  bool event_wrap = (off_wrap & packed::kWrapBit) != 0;
  std::uint16_t new_idx = idx;
  std::uint16_t old_idx = old_used;
  if (old_wrap != wrap || new_idx <= old_idx) old_idx = static_cast<std::uint16_t>(old_idx - n);
  if (event_wrap != wrap) event = static_cast<std::uint16_t>(event - n);
  return need_event(event, new_idx, old_idx);
}

}  // namespace vhostkit
