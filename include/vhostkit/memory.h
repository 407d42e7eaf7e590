// vhostkit/memory.h: the guest memory table, the only source of host pointers.
//
// Concepts
//   RegionSpec      what the frontend sends for one region (SET_MEM_TABLE / ADD_MEM_REG):
//                   an fd, the offset of the region in it, its size, its guest-physical
//                   address and the frontend's own virtual address of it (uaddr).
//   MemorySnapshot  an immutable, validated table of mapped regions. Lookups
//                   (GPA -> host, uaddr -> GPA) return how many bytes are contiguous from
//                   the address, so callers loop over region boundaries.
//   MemoryTable     the control-side owner. Every change (replace, add, remove, clear)
//                   builds a new snapshot and publishes it; readers take a
//                   std::shared_ptr to the current one and keep it for as long as they
//                   use host pointers from it.
//
// Lifetime guarantee: a mapping is unmapped only when the last snapshot that contains
// it is destroyed. A data-path reader that holds a snapshot can therefore never touch
// unmapped memory, whatever the control thread does meanwhile. Readers never block on
// a writer: snapshot() copies one shared_ptr under a mutex that is held only for that
// copy (never during validation or mmap), and generation() is a single atomic load,
// so a reader re-fetches the snapshot only when the table actually changed.
//
// Aliases: two regions whose memory is the same bytes of the same file are aliases
// (QEMU can expose one RAM block at two GPAs). A write through one must be logged at
// every GPA it is visible at: for_each_alias() enumerates them.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "vhostkit/export.h"
#include "vhostkit/types.h"
#include "vhostkit/unique_fd.h"

namespace vhostkit {

enum class MemoryErrc {
  zero_size,         // a region of size 0
  gpa_overflow,      // gpa + size wraps past 2^64
  uaddr_overflow,    // uaddr + size wraps past 2^64
  offset_overflow,   // mmap_offset + size wraps past 2^64
  gpa_overlap,       // two regions claim the same guest-physical bytes
  uaddr_conflict,    // two regions claim the same uaddr for different host memory
  beyond_file,       // mmap_offset + size is past the end of the fd's file
  too_many_regions,  // more regions than the configured limit
  bad_fd,            // not an open fd of a regular file (fstat failed or wrong type)
  mmap_failed,       // the kernel refused the mapping
  no_such_region,    // REM_MEM_REG for a region that is not in the table
  not_mapped,        // a lookup for an address no region covers
};

[[nodiscard]] VHOSTKIT_API const char* to_string(MemoryErrc e);

struct VHOSTKIT_API MemoryError {
  MemoryErrc code;
  std::uint64_t addr = 0;   // the region's GPA (or the address looked up)
  std::uint64_t size = 0;   // the region's size (0 for lookups)
  int sys_errno = 0;        // errno for bad_fd / mmap_failed
  std::uint64_t limit = 0;  // the limit for too_many_regions, file size for beyond_file

  [[nodiscard]] std::string message() const;
};

// One region as the frontend describes it. The MemoryTable takes ownership of fd.
struct RegionSpec {
  UniqueFd fd;
  std::uint64_t mmap_offset = 0;
  std::uint64_t size = 0;
  Gpa gpa;
  Uaddr uaddr;
};

struct MemoryLimits {
  std::size_t max_regions = 509;  // as CONFIGURE_MEM_SLOTS allows by default
};

// A host range: `len` bytes starting at `host` are contiguous and mapped.
struct HostRange {
  HostPtr host = nullptr;
  std::uint64_t len = 0;
};

// A guest-physical range: `len` bytes from `gpa` belong to one region.
struct GpaRange {
  Gpa gpa;
  std::uint64_t len = 0;
};

namespace detail {
class Mapping;  // one mmap of one region; unmapped in its destructor
}

// A mapped, validated region.
struct Region {
  Gpa gpa;
  std::uint64_t size = 0;
  Uaddr uaddr;
  std::uint64_t mmap_offset = 0;
  HostPtr host = nullptr;      // host address of gpa
  std::uint64_t file_dev = 0;  // identity of the backing file, for alias detection
  std::uint64_t file_ino = 0;
  std::shared_ptr<const detail::Mapping> mapping;

  [[nodiscard]] Gpa gpa_end() const { return gpa + size; }
  [[nodiscard]] bool contains(Gpa a) const { return a >= gpa && a - gpa < size; }
};

class VHOSTKIT_API MemorySnapshot {
 public:
  // The regions, sorted by GPA.
  [[nodiscard]] std::span<const Region> regions() const { return regions_; }
  [[nodiscard]] bool empty() const { return regions_.empty(); }

  // The region containing gpa, or nullptr.
  [[nodiscard]] const Region* find(Gpa gpa) const;

  // Host address of gpa and the number of bytes mapped contiguously from it (to the end
  // of its region). Error not_mapped if no region contains gpa.
  [[nodiscard]] Result<HostRange, MemoryError> gpa_to_host(Gpa gpa) const;

  // GPA of a frontend virtual address and the bytes contiguous from it within one
  // region. With aliased regions the lowest GPA is returned (writes are logged at
  // every alias anyway). Error not_mapped if no region contains uaddr.
  [[nodiscard]] Result<GpaRange, MemoryError> uaddr_to_gpa(Uaddr uaddr) const;

  // One past the highest GPA of any region (0 for an empty table). The dirty log must
  // cover [0, end_gpa()).
  [[nodiscard]] Gpa end_gpa() const { return end_gpa_; }

  // True when at least two regions share host memory.
  [[nodiscard]] bool has_aliases() const { return !aliases_.empty(); }

  // Calls fn(Gpa, len) for every other GPA range at which the bytes of
  // [gpa, gpa + len) are also visible. REQUIRES: the range lies inside one region.
  template <typename Fn>
  void for_each_alias(Gpa gpa, std::uint64_t len, Fn&& fn) const {
    if (aliases_.empty()) return;
    // Every alias whose range intersects [gpa, gpa + len), not only those containing
    // gpa: a write may start before an aliased part of its region.
    for (const auto& a : aliases_) {
      std::uint64_t lo = std::max(gpa.value, a.from.value);
      std::uint64_t hi = std::min(gpa.value + len, a.from.value + a.len);
      if (lo >= hi) continue;
      fn(a.to + (lo - a.from.value), hi - lo);
    }
  }

  // Which table version this is (every published change increments it).
  [[nodiscard]] std::uint64_t generation() const { return generation_; }

 private:
  friend class MemoryTable;
  struct Alias {  // [from, from + len) shows the same bytes as [to, to + len)
    Gpa from;
    std::uint64_t len;
    Gpa to;
  };
  void index();  // builds starts_, uaddr order, aliases_, end_gpa_

  std::vector<Region> regions_;          // sorted by gpa
  std::vector<std::uint64_t> starts_;    // regions_[i].gpa.value, for binary search
  std::vector<std::uint32_t> by_uaddr_;  // region indices sorted by uaddr
  std::vector<Alias> aliases_;
  Gpa end_gpa_;
  std::uint64_t generation_ = 0;
};

class VHOSTKIT_API MemoryTable {
 public:
  explicit MemoryTable(MemoryLimits limits = {});

  // SET_MEM_TABLE: replaces every region. Validates all specs, maps them, then
  // publishes; on any error the previous table stays in force and every fd and
  // mapping taken so far is released.
  [[nodiscard]] Result<void, MemoryError> replace(std::vector<RegionSpec> specs);

  // ADD_MEM_REG: adds one region, validated against the others.
  [[nodiscard]] Result<void, MemoryError> add(RegionSpec spec);

  // REM_MEM_REG: removes the region with this GPA and size.
  [[nodiscard]] Result<void, MemoryError> remove(Gpa gpa, std::uint64_t size);

  // Removes every region (RESET_DEVICE, disconnect).
  void clear();

  // The current snapshot. Never null (an empty table is a snapshot without regions).
  [[nodiscard]] std::shared_ptr<const MemorySnapshot> snapshot() const;

  // The current generation; cheap enough to call on every data-path access.
  [[nodiscard]] std::uint64_t generation() const {
    return generation_.load(std::memory_order_acquire);
  }

  [[nodiscard]] const MemoryLimits& limits() const { return limits_; }

 private:
  Result<void, MemoryError> publish(std::vector<Region> regions);

  MemoryLimits limits_;
  mutable std::mutex mu_;  // guards current_ (held only to copy or swap the pointer)
  std::shared_ptr<const MemorySnapshot> current_;
  std::atomic<std::uint64_t> generation_{0};
};

// Checks one spec in isolation (sizes, overflow, fd type, file size). Exposed for the
// codec, which rejects a bad region before it touches the table.
[[nodiscard]] VHOSTKIT_API Result<void, MemoryError> validate_region(const RegionSpec& spec);

}  // namespace vhostkit
