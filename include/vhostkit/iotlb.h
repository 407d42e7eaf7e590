// vhostkit/iotlb.h: the device IOTLB, IOVA -> {GPA, host pointer, permission}.
//
// Concepts
//   IotlbEntry   one translation: [iova, iova + size) maps to [gpa, gpa + size), which is
//                host memory [host, host + size) of exactly one memory region. Entries
//                never overlap and are never merged (two IOVA-adjacent entries stay two
//                even if their GPAs happen to be adjacent), so an entry is always what
//                one update installed, possibly trimmed.
//   Updates      update_gpa() takes the GPA the IOVA maps to (the IOTLB-GPA extension,
//                VHOST_USER_PROTOCOL_F_GPA_ADDRESSES). update_uaddr() takes the
//                frontend's virtual address (legacy frontends) and computes the GPA now
//                through the memory snapshot. Either way the range is split at region
//                boundaries, and an update whose range is not fully backed by the memory
//                table is rejected whole (nothing is installed). An update replaces
//                whatever it overlaps.
//   Snapshot     the IOTLB is bound to one memory snapshot; host pointers in its entries
//                come from it. rebind() (any memory-table change) flushes every entry.
//   Limit        at most max_entries entries. Eviction policy: FIFO by installation
//                time: when an update (or an invalidation that splits an entry) needs
//                room, the oldest installed entries are dropped first (as Linux vhost
//                does with its retire flag). A dropped translation is simply missed
//                again and re-requested.
//   Misses       note_miss() tells the caller whether a miss must be reported to the
//                frontend: once per (page, access) until an update covers the page or
//                the miss times out.
//
// Thread safety: lookups may run on any number of data-path threads concurrently with
// one control thread doing updates; a reader-writer spinlock (one atomic add per
// lookup) protects the entries and is held by a writer only for one update
// (O(log n + 128) work, or O(n) for a flush).
// generation() changes on every modification and is a single atomic load.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "vhostkit/export.h"
#include "vhostkit/memory.h"
#include "vhostkit/rw_spinlock.h"
#include "vhostkit/types.h"

namespace vhostkit {

enum class IotlbErrc {
  zero_size,         // an update or invalidation of size 0
  iova_overflow,     // iova + size wraps
  address_overflow,  // gpa/uaddr + size wraps
  bad_permission,    // an update granting no access
  not_backed,        // the range is not fully covered by the memory table
  over_limit,        // one update needs more entries than the limit allows
};

[[nodiscard]] VHOSTKIT_API const char* to_string(IotlbErrc e);

struct VHOSTKIT_API IotlbError {
  IotlbErrc code;
  Iova iova;
  std::uint64_t size = 0;
  std::uint64_t addr = 0;  // the GPA or uaddr of the update (for not_backed: first unbacked)

  [[nodiscard]] std::string message() const;
};

struct IotlbEntry {
  Iova iova;
  std::uint64_t size = 0;
  Gpa gpa;
  HostPtr host = nullptr;
  Access perm = Access::none;

  [[nodiscard]] Iova iova_end() const { return iova + size; }
};

struct IotlbLimits {
  std::size_t max_entries = 2048;
  std::chrono::nanoseconds miss_timeout = std::chrono::seconds(1);
};

class VHOSTKIT_API DeviceIotlb {
 public:
  explicit DeviceIotlb(IotlbLimits limits = {});
  ~DeviceIotlb();
  DeviceIotlb(const DeviceIotlb&) = delete;
  DeviceIotlb& operator=(const DeviceIotlb&) = delete;

  // Binds to a new memory snapshot and flushes every entry.
  void rebind(std::shared_ptr<const MemorySnapshot> snapshot);

  // Installs [iova, iova + size) -> [gpa, gpa + size) with perm.
  [[nodiscard]] Result<void, IotlbError> update_gpa(Iova iova, std::uint64_t size, Gpa gpa,
                                                    Access perm);

  // Installs [iova, iova + size) -> the GPAs of frontend addresses [uaddr, uaddr + size).
  [[nodiscard]] Result<void, IotlbError> update_uaddr(Iova iova, std::uint64_t size, Uaddr uaddr,
                                                      Access perm);

  // Removes every translation in [iova, iova + size); entries partly inside are trimmed
  // or split. Size 0 is rejected; a range wrapping past 2^64 is clamped at 2^64 - 1.
  [[nodiscard]] Result<void, IotlbError> invalidate(Iova iova, std::uint64_t size);

  // Removes every entry.
  void flush();

  // The entry containing iova, or nullopt (a miss). If mem_generation is given and the
  // IOTLB is bound to another memory generation, also nullopt-with-stale (see
  // LookupResult).
  struct LookupResult {
    std::optional<IotlbEntry> entry;
    bool stale = false;  // bound to another memory generation than the caller holds
  };
  [[nodiscard]] LookupResult lookup(Iova iova, std::uint64_t mem_generation) const;
  [[nodiscard]] std::optional<IotlbEntry> lookup(Iova iova) const;

  // Records a miss for (page of iova, access) and returns true if the caller should
  // send it to the frontend: the first time, or again after the timeout.
  [[nodiscard]] bool note_miss(Iova iova, Access access, std::chrono::steady_clock::time_point now);

  // Number of misses recorded and not yet answered.
  [[nodiscard]] std::size_t pending_misses() const;

  [[nodiscard]] std::size_t size() const;
  [[nodiscard]] std::uint64_t evictions() const {
    return evictions_.load(std::memory_order_relaxed);
  }
  [[nodiscard]] std::uint64_t generation() const {
    return generation_.load(std::memory_order_acquire);
  }
  // All entries in IOVA order (tests and diagnostics).
  [[nodiscard]] std::vector<IotlbEntry> entries() const;
  [[nodiscard]] const IotlbLimits& limits() const { return limits_; }

 private:
  struct Store;  // the ordered entry container (src/iotlb/device_iotlb.cpp)
  Result<void, IotlbError> install(Iova iova, std::uint64_t size,
                                   const std::vector<IotlbEntry>& parts);
  void answer_misses(Iova iova, std::uint64_t size);
  void bump();

  IotlbLimits limits_;
  mutable RwSpinLock mu_;  // guards store_ and snapshot_
  std::unique_ptr<Store> store_;
  std::shared_ptr<const MemorySnapshot> snapshot_;
  std::atomic<std::uint64_t> generation_{1};
  std::atomic<std::uint64_t> evictions_{0};

  mutable std::mutex miss_mu_;  // guards misses_
  std::unordered_map<std::uint64_t, std::chrono::steady_clock::time_point> misses_;
};

}  // namespace vhostkit
