// vhostkit/frontend/guest_memory.h: guest RAM as the VMM side owns it.
//
// Concepts
//   GuestMemory  guest RAM made of real memfds mapped MAP_SHARED in this process, at
//                chosen guest-physical addresses, like QEMU's memory-backend-memfd with
//                share=on. A region's uaddr is the address of this process's mapping:
//                exactly what a legacy vhost-user frontend sends. region_specs() gives
//                what SET_MEM_TABLE carries (dup'd fds). An alias region maps bytes of an
//                earlier region's memfd again at another GPA (its own mapping, its own
//                uaddr), as QEMU can expose one RAM block twice.
//   Allocation   alloc() is a bump allocator over the non-alias regions for rings and
//                buffers of the driver models; reset_allocator() starts over.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "vhostkit/memory.h"
#include "vhostkit/types.h"

namespace vhostkit::frontend {

struct GuestRegionLayout {
  Gpa gpa;
  std::uint64_t size = 0;
  int alias_of = -1;              // >= 0: show bytes of that earlier region
  std::uint64_t alias_offset = 0;  // ... starting this far into it
};

struct GuestRegion {
  Gpa gpa;
  std::uint64_t size = 0;
  std::uint8_t* host = nullptr;  // this process's mapping (also the uaddr)
  int fd = -1;                   // owned by GuestMemory
  std::uint64_t file_offset = 0;
  bool alias = false;

  [[nodiscard]] Uaddr uaddr() const { return Uaddr(reinterpret_cast<std::uint64_t>(host)); }
  [[nodiscard]] bool contains(Gpa g) const { return g >= gpa && g - gpa < size; }
};

class GuestMemory {
 public:
  [[nodiscard]] static Result<GuestMemory, std::string> create(
      const std::vector<GuestRegionLayout>& layout);

  GuestMemory(GuestMemory&& other) noexcept;
  GuestMemory& operator=(GuestMemory&& other) noexcept;
  GuestMemory(const GuestMemory&) = delete;
  GuestMemory& operator=(const GuestMemory&) = delete;
  ~GuestMemory();

  // This process's pointer to [gpa, gpa + len), or nullptr unless inside one region.
  [[nodiscard]] std::uint8_t* host(Gpa gpa, std::uint64_t len) const;
  // Copies across regions; false if any byte is outside guest RAM.
  [[nodiscard]] bool read(Gpa gpa, std::span<std::uint8_t> out) const;
  [[nodiscard]] bool write(Gpa gpa, std::span<const std::uint8_t> in);
  [[nodiscard]] std::optional<Uaddr> uaddr_of(Gpa gpa) const;
  // [gpa, gpa + len) cut at region boundaries: each piece is contiguous in uaddr space
  // too (what a legacy frontend must send as one IOTLB update). Empty if any byte is
  // outside guest RAM.
  [[nodiscard]] std::vector<GpaRange> split_by_region(Gpa gpa, std::uint64_t len) const;

  // What SET_MEM_TABLE sends: one spec per region, with a dup of its fd.
  [[nodiscard]] std::vector<RegionSpec> region_specs() const;
  // The spec of one region (ADD_MEM_REG).
  [[nodiscard]] RegionSpec region_spec(std::size_t index) const;
  [[nodiscard]] const std::vector<GuestRegion>& regions() const { return regions_; }
  // One past the highest GPA.
  [[nodiscard]] Gpa end_gpa() const;

  // Allocates size bytes aligned to align (a power of two) inside one non-alias region.
  [[nodiscard]] std::optional<Gpa> alloc(std::uint64_t size, std::uint64_t align);
  void reset_allocator();

 private:
  GuestMemory() = default;
  void release();

  std::vector<GuestRegion> regions_;
  std::vector<std::size_t> mapping_len_;  // per region, for munmap
  std::size_t alloc_region_ = 0;
  std::uint64_t alloc_next_ = 0;  // offset in regions_[alloc_region_]
};

}  // namespace vhostkit::frontend
