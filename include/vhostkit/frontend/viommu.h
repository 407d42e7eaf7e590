// vhostkit/frontend/viommu.h: a model of a guest IOMMU as the Linux DMA API drives it.
//
// Concepts
//   map()      the guest maps a buffer for DMA: the IOMMU picks an IOVA (never equal to
//              the GPA: IOVAs come from a high window), page-granular; the returned IOVA
//              keeps the buffer's offset within its page.
//   unmap()    strict mode: the translation is removed and the device's IOTLB is
//              invalidated at once (the invalidation listener runs before unmap returns).
//              Lazy mode (Linux's flush queue): the translation is removed at once, but
//              the device IOTLB invalidation is queued and sent in batches by flush() or
//              when the queue is full; an IOVA is not reused before its invalidation.
//   translate() answers a device's IOTLB miss: the mapping containing an IOVA.
// Thread safety: all methods may be called from any thread (one mutex).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <vector>

#include "vhostkit/types.h"

namespace vhostkit::frontend {

enum class ViommuMode { strict, lazy };

struct ViommuMapping {
  Iova iova;  // page-aligned start of the mapping
  Gpa gpa;    // page-aligned
  std::uint64_t len = 0;
  Access perm = Access::none;
};

class Viommu {
 public:
  using InvalidateListener = std::function<void(Iova iova, std::uint64_t len)>;

  explicit Viommu(ViommuMode mode = ViommuMode::strict, std::uint64_t iova_base = 0xfff000000000ULL,
                  std::size_t lazy_batch = 64);

  // Maps [gpa, gpa + len) for the device with perm; returns the IOVA of gpa.
  // REQUIRES: len > 0.
  [[nodiscard]] Iova map(Gpa gpa, std::uint64_t len, Access perm);
  // Maps at a caller-chosen IOVA (page offsets of iova and gpa must match).
  void map_at(Iova iova, Gpa gpa, std::uint64_t len, Access perm);
  // Unmaps the mapping that map() returned iova for.
  void unmap(Iova iova);
  // Lazy mode: sends every queued invalidation now.
  void flush();

  [[nodiscard]] std::optional<ViommuMapping> translate(Iova iova) const;
  void set_invalidate_listener(InvalidateListener listener);

  [[nodiscard]] ViommuMode mode() const { return mode_; }
  [[nodiscard]] std::size_t mappings() const;
  [[nodiscard]] std::size_t pending_invalidations() const;
  [[nodiscard]] std::vector<ViommuMapping> all() const;

 private:
  void invalidate_locked(std::vector<std::pair<Iova, std::uint64_t>>& out);

  ViommuMode mode_;
  std::size_t lazy_batch_;
  mutable std::mutex mu_;  // guards everything below
  std::uint64_t next_iova_;
  std::map<std::uint64_t, ViommuMapping> maps_;  // by IOVA start
  std::vector<std::pair<Iova, std::uint64_t>> queued_;
  InvalidateListener listener_;
};

}  // namespace vhostkit::frontend
