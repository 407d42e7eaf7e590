// vhostkit/frontend/viommu.h: a model of a guest IOMMU as the Linux DMA API drives it.
//
// Concepts
//   map()        the guest maps a buffer for DMA (dma_map_single): the IOMMU picks the
//                IOVA itself, from a window far above guest RAM, so an IOVA is never
//                numerically a GPA the test uses. Mappings are page-granular: they cover
//                every 4 KiB page the buffer touches, and the returned IOVA keeps the
//                buffer's offset within its page. A free guard page separates mappings.
//   unmap()      dma_unmap_single with the IOVA and length map() was given. The
//                translation disappears at once (a later translate() fails), then:
//                strict mode: the device IOTLB is invalidated before unmap() returns
//                  (the invalidation listener runs on the calling thread);
//                lazy mode (Linux's flush queue): the invalidation is queued and sent in
//                  a batch by flush() or when the queue reaches lazy_batch entries.
//                An IOVA range becomes reusable only after its invalidation was sent, and
//                is then reused first (like Linux's IOVA caches), so a device that keeps
//                a stale translation reads or writes the wrong guest page.
//   translate()  the translation of the page holding an IOVA, up to the end of the
//                contiguous mapping containing it: what answers a device's IOTLB miss.
//   answer_miss() translate() plus sending the answer, ordered against invalidations:
//                an answer computed before an unmap reaches the device before that
//                unmap's invalidation, never after it (QEMU gets the same order from its
//                big lock). Without it an IOVA reused after a strict unmap could be
//                answered with its previous, stale translation.
// Thread safety: every method may be called from any thread. Two mutexes: order_mu_
// serialises unmap/flush (removal, listener, IOVA recycling) against answer_miss();
// mu_ guards the tables and is never held while the listener or an answer runs, so
// either may block on the device (a vhost-user IOTLB message waits for REPLY_ACK) while
// other threads map or translate. The device must not wait for a miss answer before it
// acknowledges an invalidation.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "vhostkit/types.h"

namespace vhostkit::frontend {

enum class ViommuMode { strict, lazy };

struct ViommuMapping {
  Iova iova;              // page-aligned
  Gpa gpa;                // page-aligned, the GPA iova translates to
  std::uint64_t len = 0;  // a multiple of 4 KiB
  Access perm = Access::none;
};

class Viommu {
 public:
  using Mode = ViommuMode;
  using InvalidateListener = std::function<void(Iova iova, std::uint64_t len)>;
  static constexpr std::uint64_t kDefaultIovaBase = 0xfff000000000ULL;
  static constexpr std::size_t kDefaultLazyBatch = 64;

  // REQUIRES: iova_base page-aligned. lazy_batch 0 is taken as 1.
  explicit Viommu(ViommuMode mode = ViommuMode::strict, std::uint64_t iova_base = kDefaultIovaBase,
                  std::size_t lazy_batch = kDefaultLazyBatch);

  // Maps [gpa, gpa + len) for the device with perm; returns the IOVA of gpa.
  // len 0 is taken as 1 (one page is mapped).
  [[nodiscard]] Iova map(Gpa gpa, std::uint64_t len, Access perm);
  // Unmaps the mapping holding [iova, iova + len) (the whole mapping, as the DMA API
  // unmaps what it mapped). False, and nothing changes, unless that range lies inside one
  // live mapping.
  [[nodiscard]] bool unmap(Iova iova, std::uint64_t len);
  // Lazy mode: sends every queued invalidation now (a no-op in strict mode).
  void flush();

  // The translation of the page holding iova up to the end of its mapping, or nullopt.
  [[nodiscard]] std::optional<ViommuMapping> translate(Iova iova) const;
  // Calls send(translate(iova)) while no invalidation can be sent (see answer_miss in
  // the concepts above). False, without calling send, if iova is not mapped.
  bool answer_miss(Iova iova, const std::function<void(const ViommuMapping&)>& send);
  // Called with (page-aligned IOVA, length) of each invalidated mapping.
  void set_invalidate_listener(InvalidateListener listener);

  [[nodiscard]] ViommuMode mode() const { return mode_; }
  // Live mappings.
  [[nodiscard]] std::size_t mappings() const;
  // Lazy mode: unmapped ranges whose invalidation has not been sent yet.
  [[nodiscard]] std::size_t pending_invalidations() const;
  // Every live mapping, in IOVA order.
  [[nodiscard]] std::vector<ViommuMapping> all() const;

 private:
  struct Entry {
    ViommuMapping map;
    std::uint64_t reserved = 0;  // IOVA space taken, guard page included
  };
  struct Pending {
    Iova iova;
    std::uint64_t len = 0;
    std::uint64_t reserved = 0;
  };

  // Sends the invalidations (listener, without mu_), then recycles their IOVAs.
  // REQUIRES: order_mu_ held.
  void invalidate(const std::vector<Pending>& batch);

  const ViommuMode mode_;
  const std::size_t lazy_batch_;
  std::mutex order_mu_;    // see the concepts; taken before mu_
  mutable std::mutex mu_;  // guards everything below
  std::uint64_t next_iova_;
  std::map<std::uint64_t, Entry> maps_;                                     // by IOVA start
  std::unordered_map<std::uint64_t, std::vector<std::uint64_t>> reusable_;  // by reserved
  std::vector<Pending> queued_;
  InvalidateListener listener_;
};

}  // namespace vhostkit::frontend
