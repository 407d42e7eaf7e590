// vhostkit/virtio_spec.h: the virtio 1.x ring layouts and feature bits, as the
// specification defines them ("Virtual I/O Device (VIRTIO) Version 1.2", sections 2.7
// split virtqueues and 2.8 packed virtqueues). Shared by the device side (virtio layer)
// and the guest-side driver model (frontend layer), so both read and write the same
// bytes a real driver and device would.
//
// All ring fields are little-endian (virtio 1.x); vhostkit runs on little-endian hosts
// only (checked below), so fields are accessed in place.
#pragma once

#include <bit>
#include <cstdint>

namespace vhostkit::virtio {

static_assert(std::endian::native == std::endian::little, "virtio 1.x rings are little-endian");

// Feature bits (device-independent part).
inline constexpr unsigned kFNotifyOnEmpty = 24;
inline constexpr unsigned kFAnyLayout = 27;
inline constexpr unsigned kFRingIndirectDesc = 28;
inline constexpr unsigned kFRingEventIdx = 29;
inline constexpr unsigned kFVersion1 = 32;
inline constexpr unsigned kFAccessPlatform = 33;
inline constexpr unsigned kFRingPacked = 34;
inline constexpr unsigned kFInOrder = 35;
// vhost: VHOST_F_LOG_ALL, the frontend asks the backend to log all writes.
inline constexpr unsigned kVhostFLogAll = 26;

[[nodiscard]] constexpr std::uint64_t bit(unsigned b) {
  return 1ULL << b;
}

// Largest queue size either ring format allows.
inline constexpr std::uint32_t kMaxQueueSize = 32768;

// Descriptor flags (split and packed share NEXT/WRITE/INDIRECT).
inline constexpr std::uint16_t kDescFNext = 1;
inline constexpr std::uint16_t kDescFWrite = 2;
inline constexpr std::uint16_t kDescFIndirect = 4;
// Packed ring only.
inline constexpr std::uint16_t kPackedDescFAvail = 1u << 7;
inline constexpr std::uint16_t kPackedDescFUsed = 1u << 15;

// Split ring notification suppression flags.
inline constexpr std::uint16_t kAvailFNoInterrupt = 1;
inline constexpr std::uint16_t kUsedFNoNotify = 1;

// Packed ring event suppression flags.
inline constexpr std::uint16_t kEventFlagsEnable = 0;
inline constexpr std::uint16_t kEventFlagsDisable = 1;
inline constexpr std::uint16_t kEventFlagsDesc = 2;

struct SplitDesc {
  std::uint64_t addr;
  std::uint32_t len;
  std::uint16_t flags;
  std::uint16_t next;
};
static_assert(sizeof(SplitDesc) == 16);

struct PackedDesc {
  std::uint64_t addr;
  std::uint32_t len;
  std::uint16_t id;
  std::uint16_t flags;
};
static_assert(sizeof(PackedDesc) == 16);

struct UsedElem {
  std::uint32_t id;
  std::uint32_t len;
};
static_assert(sizeof(UsedElem) == 8);

// Packed ring driver/device event suppression structure.
struct EventSuppress {
  std::uint16_t off_wrap;  // bits 0-14 descriptor offset, bit 15 wrap counter
  std::uint16_t flags;
};
static_assert(sizeof(EventSuppress) == 4);

// Split ring layout: byte offsets and sizes for a queue of n entries.
namespace split {
inline constexpr std::uint64_t desc_table_size(std::uint32_t n) {
  return 16ULL * n;
}
// Driver area ("available ring"): flags, idx, ring[n], used_event.
inline constexpr std::uint64_t kAvailFlags = 0;
inline constexpr std::uint64_t kAvailIdx = 2;
inline constexpr std::uint64_t avail_ring(std::uint32_t i) {
  return 4 + 2ULL * i;
}
inline constexpr std::uint64_t used_event(std::uint32_t n) {
  return 4 + 2ULL * n;
}
inline constexpr std::uint64_t avail_size(std::uint32_t n) {
  return 6 + 2ULL * n;
}
// Device area ("used ring"): flags, idx, ring[n] of UsedElem, avail_event.
inline constexpr std::uint64_t kUsedFlags = 0;
inline constexpr std::uint64_t kUsedIdx = 2;
inline constexpr std::uint64_t used_ring(std::uint32_t i) {
  return 4 + 8ULL * i;
}
inline constexpr std::uint64_t avail_event(std::uint32_t n) {
  return 4 + 8ULL * n;
}
inline constexpr std::uint64_t used_size(std::uint32_t n) {
  return 6 + 8ULL * n;
}
// Required alignments of the three areas.
inline constexpr std::uint64_t kDescAlign = 16;
inline constexpr std::uint64_t kAvailAlign = 2;
inline constexpr std::uint64_t kUsedAlign = 4;
}  // namespace split

namespace packed {
inline constexpr std::uint64_t desc_ring_size(std::uint32_t n) {
  return 16ULL * n;
}
inline constexpr std::uint64_t kEventSize = 4;
inline constexpr std::uint64_t kDescAlign = 16;
inline constexpr std::uint64_t kEventAlign = 4;
inline constexpr std::uint16_t kWrapBit = 1u << 15;
}  // namespace packed

// EVENT_IDX: must the other side be notified, given that it asked to be notified at
// event_idx and the index moved from old_idx to new_idx? (spec 2.7.10, vring_need_event)
[[nodiscard]] constexpr bool need_event(std::uint16_t event_idx, std::uint16_t new_idx,
                                        std::uint16_t old_idx) {
  return static_cast<std::uint16_t>(new_idx - event_idx - 1) <
         static_cast<std::uint16_t>(new_idx - old_idx);
}

}  // namespace vhostkit::virtio
