// vhostkit/translate.h: the one path from a device address to guest memory.
//
// Concepts
//   AddressSpace  per device: the memory table, the device IOTLB, the dirty log and the
//                 two switches (IOMMU on = VIRTIO_F_ACCESS_PLATFORM negotiated; logging
//                 on = VHOST_F_LOG_ALL). Only the control thread (the vhost-user message
//                 handler) changes it. Every change bumps generation(); a memory-table
//                 change also flushes the IOTLB (a translation never outlives the
//                 mapping it came from).
//   Translator    per queue, used by one data-path thread: translate(addr, len, access)
//                 returns segments {host, gpa, len}. addr is an Iova: a real IOVA when
//                 the IOMMU is on, numerically the GPA when it is off; the same code
//                 serves both. write() copies into guest memory and logs every written
//                 segment by the segment's own gpa (there is no host -> GPA lookup), at
//                 every alias of that gpa. A small translation cache is dropped whenever
//                 the translator refreshes to a newer generation of the space.
//   Bursts        begin_burst()/end_burst() bracket a worker's unit of work. end_burst()
//                 flushes batched dirty bits. A burst sees one state: the translator
//                 refreshes when the burst begins and not again until it ends, so what a
//                 worker translated early in a burst (a popped chain, the ring areas) is
//                 still valid when it completes the work later in the same burst. A change
//                 made meanwhile is seen by the next burst; inside the burst an IOTLB
//                 lookup that meets an IOTLB already rebound to a newer memory table is a
//                 miss. Outside a burst every call refreshes first.
//                 AddressSpace::synchronize() waits until no translator is still inside a
//                 burst that began before the latest change (an RCU-style grace period):
//                 after it returns, no worker uses a translation, log or mapping state
//                 older than that change.
//
// Lifetime: a Translator holds shared references to the memory snapshot and the log it
// translates with, so the memory behind any pointer it returns stays mapped until the
// translator refreshes (after a change: when the next burst begins, or outside a burst at
// the next call) or is destroyed.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "vhostkit/dirty_log.h"
#include "vhostkit/export.h"
#include "vhostkit/iotlb.h"
#include "vhostkit/memory.h"
#include "vhostkit/types.h"

namespace vhostkit {

// One piece of a translated range: len bytes at host, guest-physical address gpa.
struct Segment {
  HostPtr host = nullptr;
  Gpa gpa;
  std::uint64_t len = 0;
};

enum class TranslateErrc {
  not_mapped,         // no memory region covers the address (IOMMU off)
  iotlb_miss,         // no IOTLB entry covers the IOVA (IOMMU on): ask the frontend
  permission_denied,  // the IOTLB entry does not grant the access
  too_many_segments,  // the range needs more segments than the caller provided
  range_overflow,     // addr + len wraps past 2^64
  log_failed,         // data written, but a page could not be logged (beyond the log)
};

[[nodiscard]] VHOSTKIT_API const char* to_string(TranslateErrc e);

struct VHOSTKIT_API TranslateError {
  TranslateErrc code;
  Iova addr;              // the address that failed (for a miss: the missing IOVA)
  std::uint64_t len = 0;  // bytes still to translate from addr
  Access access = Access::none;
  bool report_miss = false;  // iotlb_miss: first time for this page, send VHOST_IOTLB_MISS

  [[nodiscard]] std::string message() const;
};

class Translator;

class VHOSTKIT_API AddressSpace {
 public:
  explicit AddressSpace(MemoryLimits memory_limits = {}, IotlbLimits iotlb_limits = {});
  ~AddressSpace();
  AddressSpace(const AddressSpace&) = delete;
  AddressSpace& operator=(const AddressSpace&) = delete;

  // Memory table changes; each flushes the IOTLB.
  [[nodiscard]] Result<void, MemoryError> set_mem_table(std::vector<RegionSpec> regions);
  [[nodiscard]] Result<void, MemoryError> add_region(RegionSpec region);
  [[nodiscard]] Result<void, MemoryError> remove_region(Gpa gpa, std::uint64_t size);
  void clear_memory();

  // IOTLB changes.
  [[nodiscard]] Result<void, IotlbError> iotlb_update(Iova iova, std::uint64_t size, Gpa gpa,
                                                      Access perm);
  [[nodiscard]] Result<void, IotlbError> iotlb_update_uaddr(Iova iova, std::uint64_t size,
                                                            Uaddr uaddr, Access perm);
  [[nodiscard]] Result<void, IotlbError> iotlb_invalidate(Iova iova, std::uint64_t size);
  void iotlb_flush();

  // VIRTIO_F_ACCESS_PLATFORM: addresses are IOVAs translated by the IOTLB.
  void set_iommu(bool on);
  // Attaches a log (nullptr detaches). Error too_small if it does not cover the current
  // memory table; a region added later beyond the log makes writes there fail loudly
  // (log_failed, counted) until a larger log is attached.
  [[nodiscard]] Result<void, DirtyLogError> set_log(std::shared_ptr<DirtyLog> log);
  // VHOST_F_LOG_ALL.
  void set_logging(bool on);

  // Waits until every translator inside a burst has seen the current generation, or
  // the timeout passes. Returns false on timeout.
  [[nodiscard]] bool synchronize(std::chrono::milliseconds timeout = std::chrono::seconds(5));

  [[nodiscard]] std::uint64_t generation() const {
    return generation_.load(std::memory_order_acquire);
  }
  [[nodiscard]] std::shared_ptr<const MemorySnapshot> memory() const { return memory_.snapshot(); }
  [[nodiscard]] const DeviceIotlb& iotlb() const { return iotlb_; }
  [[nodiscard]] DeviceIotlb& iotlb() { return iotlb_; }
  [[nodiscard]] bool iommu() const;
  [[nodiscard]] bool logging() const;
  [[nodiscard]] std::shared_ptr<DirtyLog> log() const;

 private:
  friend class Translator;
  struct State {
    std::shared_ptr<const MemorySnapshot> memory;
    std::shared_ptr<DirtyLog> log;
    bool iommu = false;
    bool logging = false;
  };
  State state() const;
  void publish_memory();
  void bump();
  void enroll(Translator* t);
  void withdraw(Translator* t);

  MemoryTable memory_;
  DeviceIotlb iotlb_;
  mutable std::mutex mu_;  // guards state_ (and orders IOTLB rebinds with it)
  State state_;
  std::atomic<std::uint64_t> generation_{1};
  std::mutex translators_mu_;  // guards translators_
  std::vector<Translator*> translators_;
};

enum class LogMode { immediate, batched };

class VHOSTKIT_API Translator {
 public:
  static constexpr std::size_t kCacheEntries = 8;

  explicit Translator(AddressSpace& space, LogMode mode = LogMode::batched);
  ~Translator();
  Translator(const Translator&) = delete;
  Translator& operator=(const Translator&) = delete;

  // Brackets a unit of data-path work (see AddressSpace::synchronize).
  void begin_burst();
  // Flushes batched dirty bits and leaves the burst.
  [[nodiscard]] Result<void, TranslateError> end_burst();

  // Translates [addr, addr + len) into out; returns the number of segments used.
  // Adjacent pieces that are contiguous in both host and guest-physical memory are
  // merged. REQUIRES: len > 0.
  [[nodiscard]] Result<std::size_t, TranslateError> translate(Iova addr, std::uint64_t len,
                                                              Access access,
                                                              std::span<Segment> out) {
    // Fast path, inline: the most recently used cache entry covers the whole range.
    const Chunk& c = cache_[mru_];
    std::uint64_t off = addr.value - c.start;
    if (space_.generation_.load(std::memory_order_acquire) == generation_ && off < c.len &&
        len - 1 < c.len - off && permits(c.perm, access) && !out.empty()) {
      ++hits_;
      out[0] = Segment{c.host + off, c.gpa + off, len};
      return std::size_t{1};
    }
    return translate_slow(addr, len, access, out);
  }

  // Copies guest memory at addr into dst.
  [[nodiscard]] Result<void, TranslateError> read(Iova addr, std::span<std::uint8_t> dst);
  // Copies src into guest memory at addr and logs every page written. On a translation
  // error nothing after the failing address is written.
  [[nodiscard]] Result<void, TranslateError> write(Iova addr, std::span<const std::uint8_t> src);

  // Logs a segment the caller wrote directly (at its gpa and every alias).
  [[nodiscard]] Result<void, TranslateError> log_write(const Segment& seg) {
    check_generation();
    if (!state_.logging || !state_.log) return {};  // inline: free when logging is off
    if (fast_log_ && batch_.try_mark(seg.gpa, seg.len)) return {};  // inline: a cached word
    return log_range(seg.gpa, seg.len);
  }
  // Writes batched dirty bits to the shared log.
  [[nodiscard]] Result<void, TranslateError> flush_log();
  // Writes batched dirty bits, then lets go of the memory snapshot and the log until the
  // next call (which refreshes): a stopped queue must not keep a replaced memory table
  // mapped or a detached log alive. REQUIRES: outside a burst.
  void release();

  // Whether writes are currently being logged (as of the last refresh).
  [[nodiscard]] bool logging() {
    check_generation();
    return state_.logging && state_.log;
  }
  [[nodiscard]] bool iommu() {
    check_generation();
    return state_.iommu;
  }

  // Refreshes if the address space changed (outside a burst; inside one the state the
  // burst began with stays); returns the generation now in use.
  std::uint64_t sync() {
    check_generation();
    return generation_;
  }
  // The memory snapshot current translations come from (keeps its mappings alive).
  [[nodiscard]] const std::shared_ptr<const MemorySnapshot>& memory() const {
    return state_.memory;
  }

  // Cache statistics (benchmarks, tests).
  [[nodiscard]] std::uint64_t cache_hits() const { return hits_; }
  [[nodiscard]] std::uint64_t cache_misses() const { return misses_; }

 private:
  friend class AddressSpace;
  struct Chunk {  // a contiguous piece: [start, start + len) of device addresses
    std::uint64_t start = 0;
    std::uint64_t len = 0;
    Gpa gpa;
    HostPtr host = nullptr;
    Access perm = Access::none;
  };
  [[nodiscard]] bool in_burst() const { return active_.load(std::memory_order_relaxed) != 0; }
  // Refreshes if the space changed, unless inside a burst (see Bursts above).
  void check_generation() {
    if (space_.generation_.load(std::memory_order_acquire) != generation_ && !in_burst()) refresh();
  }
  void refresh();
  Result<Chunk, TranslateError> resolve(std::uint64_t addr, std::uint64_t len, Access access);
  Result<std::size_t, TranslateError> translate_slow(Iova addr, std::uint64_t len, Access access,
                                                     std::span<Segment> out);
  Result<void, TranslateError> log_range(Gpa gpa, std::uint64_t len);

  AddressSpace& space_;
  LogMode mode_;
  AddressSpace::State state_;
  std::uint64_t generation_ = 0;
  std::atomic<std::uint64_t> active_{0};  // generation seen in the current burst, 0 = idle
  Chunk cache_[kCacheEntries];
  std::size_t next_victim_ = 0;
  std::size_t mru_ = 0;  // the cache entry that served the last lookup
  DirtyLogBatch batch_;
  // Logging on, batched, and no aliases to mark too: a mark may take batch_.try_mark().
  bool fast_log_ = false;
  std::uint64_t hits_ = 0;
  std::uint64_t misses_ = 0;
};

}  // namespace vhostkit
