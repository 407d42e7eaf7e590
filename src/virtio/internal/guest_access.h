// Access to ring fields in shared guest memory.
//
// The driver runs concurrently on another CPU, so every field the two sides hand over
// (indices, packed descriptor flags, event suppression) is accessed through
// std::atomic_ref with an explicit order; plain fields published by those are read
// with relaxed loads after the acquire. Ring host pointers are checked for natural
// alignment when the rings are mapped, which atomic_ref requires.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>

#include "vhostkit/types.h"
#include "vhostkit/virtqueue.h"

namespace vhostkit::detail {

template <typename T>
inline T load(HostPtr p, std::memory_order order) {
  return std::atomic_ref<T>(*reinterpret_cast<T*>(p)).load(order);
}

template <typename T>
inline void store(HostPtr p, T v, std::memory_order order) {
  std::atomic_ref<T>(*reinterpret_cast<T*>(p)).store(v, order);
}

// Copies a descriptor (or any plain record) out of guest memory once, so the device
// validates and uses one consistent value even if the guest changes it meanwhile.
template <typename T>
inline T snapshot_of(const std::uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// The hook set_crash_hook() installed (tests), called at each CrashPoint of a tracked
// queue.
extern std::atomic<CrashHook> crash_hook;
inline void crash_point(CrashPoint p) {
  if (CrashHook h = crash_hook.load(std::memory_order_relaxed)) h(p);
}

}  // namespace vhostkit::detail
