// vhostkit/frontend/guest_memory.h: guest RAM as the VMM side owns it.
//
// Concepts
//   GuestMemory  guest RAM made of real memfds mapped MAP_SHARED in this process, at
//                chosen guest-physical addresses, like QEMU's memory-backend-memfd with
//                share=on. A region's uaddr is the address of this process's mapping:
//                exactly what a legacy vhost-user frontend sends. region_specs() gives
//                what SET_MEM_TABLE carries (dup'd fds, mmap offsets, sizes, GPAs,
//                uaddrs), ready for MemoryTable::replace / AddressSpace::set_mem_table.
//   File layout  by default every region has a memfd of its own (mmap offset 0). A
//                region with separate_fd = false is carved out of one memfd shared by all
//                such regions, each at a distinct non-zero file offset with unused gaps
//                between them, so a back-end that confuses GPA, file offset and uaddr
//                reads the wrong bytes.
//   Aliases      a region with alias_of set shows bytes of an earlier region again at
//                another GPA, as QEMU does for an alias MemoryRegion: same memfd, file
//                offset = the source's + alias_offset, and uaddr = the source's mapping
//                address + alias_offset (the same host bytes, not a second mmap). Writes
//                through either GPA are visible through the other.
//   Allocation   alloc() is a bump allocator over the non-alias regions, in layout
//                order, for rings and buffers of the driver models; it moves to the next
//                region when the current one cannot hold the request. reset_allocator()
//                starts over (it does not zero memory).
// Threading: create/alloc/reset_allocator from one thread; host/read/write/lookups may
// run concurrently with each other (the region list is immutable after create). The
// device side reaches the same bytes through its own mappings of the same memfds.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "vhostkit/memory.h"
#include "vhostkit/types.h"
#include "vhostkit/unique_fd.h"

namespace vhostkit::frontend {

struct GuestRegionLayout {
  Gpa gpa;
  std::uint64_t size = 0;  // REQUIRES: a positive multiple of 4 KiB
  // false: carve the region out of one memfd shared with the other such regions, at a
  // non-zero file offset. Ignored for aliases.
  bool separate_fd = true;
  // Show the bytes of this earlier region (index into the layout) at gpa, starting
  // alias_offset bytes into it. REQUIRES: index < this entry's index; alias_offset a
  // multiple of 4 KiB; alias_offset + size <= that region's size.
  std::optional<std::size_t> alias_of = std::nullopt;
  std::uint64_t alias_offset = 0;
};

struct GuestRegion {
  Gpa gpa;
  std::uint64_t size = 0;
  std::uint8_t* host = nullptr;  // this process's address of gpa (also the uaddr)
  int fd = -1;                   // owned by GuestMemory (shared by carved regions/aliases)
  std::uint64_t file_offset = 0;
  bool alias = false;

  [[nodiscard]] Uaddr uaddr() const { return Uaddr(reinterpret_cast<std::uint64_t>(host)); }
  [[nodiscard]] bool contains(Gpa g) const { return g >= gpa && g - gpa < size; }
};

class GuestMemory {
 public:
  // Creates the memfds and maps them. Error on a bad layout (size, overlap, alias) or
  // when the kernel refuses a memfd or mapping; nothing leaks on error.
  [[nodiscard]] static Result<GuestMemory, std::string> create(
      std::vector<GuestRegionLayout> layout);

  GuestMemory(GuestMemory&& other) noexcept;
  GuestMemory& operator=(GuestMemory&& other) noexcept;
  GuestMemory(const GuestMemory&) = delete;
  GuestMemory& operator=(const GuestMemory&) = delete;
  ~GuestMemory();  // unmaps and closes everything

  // This process's pointer to [gpa, gpa + len), or nullptr unless it lies inside one
  // region.
  [[nodiscard]] std::uint8_t* host(Gpa gpa, std::uint64_t len) const;
  // Copy across region boundaries; false (nothing or part copied) if any byte is outside
  // guest RAM.
  [[nodiscard]] bool read(Gpa gpa, std::span<std::uint8_t> out) const;
  [[nodiscard]] bool write(Gpa gpa, std::span<const std::uint8_t> in);
  // The frontend virtual address of gpa, or nullopt outside guest RAM.
  [[nodiscard]] std::optional<Uaddr> uaddr_of(Gpa gpa) const;
  // [gpa, gpa + len) cut at region boundaries: each piece is contiguous in uaddr space
  // too (what a legacy frontend must send as one IOTLB update). Empty if any byte is
  // outside guest RAM.
  [[nodiscard]] std::vector<GpaRange> split_by_region(Gpa gpa, std::uint64_t len) const;

  // What SET_MEM_TABLE sends: one spec per region in layout order, with a dup of its fd.
  [[nodiscard]] std::vector<RegionSpec> region_specs() const;
  // The spec of one region (ADD_MEM_REG). REQUIRES: index < regions().size().
  [[nodiscard]] RegionSpec region_spec(std::size_t index) const;
  // The regions in layout order.
  [[nodiscard]] const std::vector<GuestRegion>& regions() const { return regions_; }
  // One past the highest GPA.
  [[nodiscard]] Gpa end_gpa() const;

  // size bytes aligned to align inside one non-alias region, or nullopt when no region
  // has room left. REQUIRES: align is a power of two.
  [[nodiscard]] std::optional<Gpa> alloc(std::uint64_t size, std::uint64_t align);
  void reset_allocator();

 private:
  struct Mapping {
    void* addr = nullptr;
    std::size_t len = 0;
  };

  GuestMemory() = default;
  void release();
  [[nodiscard]] const GuestRegion* find(Gpa gpa) const;

  std::vector<GuestRegion> regions_;
  std::vector<UniqueFd> files_;    // every memfd, once
  std::vector<Mapping> mappings_;  // every mmap, once (aliases have none)
  std::size_t alloc_region_ = 0;
  std::uint64_t alloc_next_ = 0;  // offset in regions_[alloc_region_]
};

}  // namespace vhostkit::frontend
