// vhostkit/rw_spinlock.h: a small reader-writer spinlock for data-path lookups.
//
// Readers take it with one atomic add and release it with one atomic subtract, inline,
// with no system call and no function call; writers (the control thread) announce
// themselves with a pending bit, so a stream of readers cannot starve them, then wait
// for the readers inside to leave. Meant for short critical sections on both sides:
// a lookup, or one IOTLB update.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>

namespace vhostkit {

class RwSpinLock {
 public:
  void lock_shared() {
    while (true) {
      // acquire: the protected data is read after the lock is held.
      std::uint32_t s = state_.fetch_add(kReader, std::memory_order_acquire);
      if ((s & kWriterBits) == 0) return;
      state_.fetch_sub(kReader, std::memory_order_relaxed);
      while (state_.load(std::memory_order_relaxed) & kWriterBits) pause();
    }
  }
  void unlock_shared() { state_.fetch_sub(kReader, std::memory_order_release); }

  void lock() {
    // Become the one pending writer, then wait for readers to drain.
    std::uint32_t s = state_.load(std::memory_order_relaxed);
    while (true) {
      if ((s & kWriterBits) == 0 &&
          state_.compare_exchange_weak(s, s | kPending, std::memory_order_acquire,
                                       std::memory_order_relaxed))
        break;
      pause();
      s = state_.load(std::memory_order_relaxed);
    }
    while (true) {
      std::uint32_t expected = kPending;
      if (state_.compare_exchange_weak(expected, kWriter, std::memory_order_acquire,
                                       std::memory_order_relaxed))
        return;
      pause();
    }
  }
  // Clears only the writer bit: readers that are briefly counted while they back off
  // (lock_shared's add-then-undo) must not be wiped out, or their undo would underflow.
  void unlock() { state_.fetch_and(~kWriterBits, std::memory_order_release); }

 private:
  static constexpr std::uint32_t kWriter = 1;
  static constexpr std::uint32_t kPending = 2;
  static constexpr std::uint32_t kWriterBits = kWriter | kPending;
  static constexpr std::uint32_t kReader = 4;

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
  }

  std::atomic<std::uint32_t> state_{0};
};

}  // namespace vhostkit
