// vhostkit/frontend/virtio_driver.h: the guest driver side of one virtqueue.
//
// Concepts
//   VirtioDriver  a virtio 1.x driver for one split or packed virtqueue in GuestMemory,
//                 writing the bytes Linux's virtio_ring.c writes (virtio 1.2 sections 2.7
//                 and 2.8). The device side runs on another thread against the same
//                 memory.
//   Ring layout   split: one zeroed, page-aligned block as Linux allocates it for a modern
//                 device: descriptor table, available ring (flags, idx, ring[n],
//                 used_event) right after it, used ring (flags, idx, ring[n],
//                 avail_event) at the next 64-byte boundary. packed: three zeroed,
//                 page-aligned blocks: descriptor ring, driver event suppression, device
//                 event suppression. With an IOMMU each block is mapped read-write
//                 (coherent DMA memory) and addresses() gives IOVAs; gpas() always gives
//                 GPAs (the split used ring's GPA is vhost-user's log_guest_addr).
//   Ids           add() returns the id poll() reports the chain's completion with.
//                 split: the index of the chain's head descriptor (the device returns it
//                 in used->ring[].id). packed: the buffer id, written in every
//                 descriptor of the chain (Linux does); the device returns it in the one
//                 used descriptor it writes for the chain, and the driver skips as many
//                 ring slots as the chain occupied (1 for an indirect chain).
//   Indirect      with options.indirect, a chain of 2 .. max_indirect buffers goes into
//                 an indirect table in guest memory (one per id, preallocated) that one
//                 ring descriptor points to; longer chains and single buffers use ring
//                 descriptors directly. split tables chain with NEXT and next = i + 1;
//                 packed tables carry only WRITE.
//   Publishing    add(buffers) publishes at once. add(buffers, false) only writes the
//                 chain; publish() then makes every chain added since the last publish
//                 visible with one release store: avail->idx (split), or the flags of the
//                 first new chain's head, written after every other head (packed). So a
//                 batch appears to the device all at once. kick_needed() decides, after
//                 publish(), whether the device must be notified (VIRTIO_F_EVENT_IDX
//                 avail_event / used->flags NO_NOTIFY; packed device event suppression).
//   Interrupts    the driver's side of notification suppression, as Linux keeps it.
//                 split: without EVENT_IDX avail->flags NO_INTERRUPT; with it avail->flags
//                 stays 0 and poll() keeps used_event = the next used index while
//                 interrupts are on (disable_interrupts() parks it one behind). packed:
//                 driver event flags ENABLE (initially, as zeroed), DISABLE, or DESC
//                 after enable_interrupts() with EVENT_IDX, when poll() keeps off_wrap at
//                 the next used slot and wrap counter.
//   Memory order  descriptor fields and ring entries are written with relaxed atomic
//                 stores, then published by a release store (above); used->idx (split)
//                 and a used descriptor's flags (packed) are read with acquire before the
//                 used entry. kick_needed() and enable_interrupts() issue a seq_cst fence
//                 between their store and the load of the other side's state (Linux's
//                 virtio_mb), and poll() writes used_event / off_wrap seq_cst
//                 (virtio_store_mb).
//   IOMMU         each buffer (and indirect table) is mapped through the Viommu before
//                 its chain is published and unmapped when poll() collects its completion
//                 (dma_map/dma_unmap: readable buffers read-only, writable write-only
//                 unless map_writable_read_write), so strict/lazy invalidation timing is
//                 the Viommu's. Ring blocks stay mapped for the driver's lifetime. A
//                 premapped buffer (DriverBuffer::premapped) is the caller's: used as
//                 given, never mapped or unmapped by the driver.
//   Migration     set_write_observer() reports every range of guest memory the driver
//                 writes (descriptors, avail ring, indirect tables, event fields), after
//                 the store: the vCPU half of dirty tracking (KVM's dirty log in a real
//                 VMM). rehome() moves the driver onto another GuestMemory with the same
//                 layout once its bytes were copied there (the destination of a live
//                 migration); indices, free lists and IOMMU mappings carry over.
//   Device bugs   a completion for an id that is not outstanding, or a split used->idx
//                 more than the outstanding chains ahead, marks the driver broken (Linux's
//                 BAD_RING): counted in device_errors(), poll() returns nothing and add()
//                 fails from then on.
// Threading: one thread drives a VirtioDriver (it is not internally locked); the device
// may run concurrently on another thread. The driver never reads device-written memory
// other than used->flags, used->idx, used->ring[], avail_event (split) and the used
// descriptors and device event suppression area (packed).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "vhostkit/frontend/guest_memory.h"
#include "vhostkit/frontend/viommu.h"
#include "vhostkit/types.h"
#include "vhostkit/virtqueue.h"

namespace vhostkit::frontend {

struct DriverOptions {
  bool packed = false;
  std::uint16_t size = 256;         // 1 .. 32768; split: a power of two
  bool indirect = false;            // VIRTIO_RING_F_INDIRECT_DESC negotiated: use indirect tables
  bool event_idx = false;           // VIRTIO_RING_F_EVENT_IDX negotiated
  Viommu* iommu = nullptr;          // nullptr: the device sees GPAs
  std::uint16_t max_indirect = 64;  // entries per indirect table
  // Map device-writable buffers read-write instead of write-only (DMA_FROM_DEVICE). DPDK's
  // back-end checks read-write access on every receive buffer it fills.
  bool map_writable_read_write = false;
};

// One buffer of a chain. The device reads it unless device_writes. premapped: the
// buffer's device address, already mapped by the caller (Linux's premapped DMA mode: a
// page pool that maps its pages once); the driver puts it in the descriptor as it is and
// neither maps nor unmaps it. Without it the driver maps gpa through options.iommu.
struct DriverBuffer {
  Gpa gpa;
  std::uint32_t len = 0;
  bool device_writes = false;
  std::optional<Iova> premapped = std::nullopt;
};

// A completion as the driver sees it: the id add() returned and the number of bytes the
// device wrote. (Named apart from vhostkit::Completion, the device side's.)
struct UsedBuffer {
  std::uint16_t id = 0;
  std::uint32_t len = 0;
};

struct RingGpas {
  Gpa desc, driver, device;
};

class VirtioDriver {
 public:
  // Allocates and zeroes the rings (and the indirect tables) in memory, maps them through
  // options.iommu if set. Error if the size is not allowed or memory is short.
  [[nodiscard]] static Result<VirtioDriver, std::string> create(GuestMemory& memory,
                                                                DriverOptions options);

  // What the device is given: {desc, driver area, device area}, IOVAs with an IOMMU,
  // numerically the GPAs without.
  [[nodiscard]] RingAddresses addresses() const { return addr_; }
  // The GPAs of the three areas.
  [[nodiscard]] RingGpas gpas() const { return gpas_; }
  // A QueueConfig for the device side with these addresses and options.
  [[nodiscard]] QueueConfig queue_config() const;

  // Adds a chain: driver-readable buffers first, then device-writable ones. Returns its
  // id. Error (nothing written) if the list is empty or misordered, longer than the
  // queue, over 4 GiB in total, if there are not enough free descriptors, or if the
  // driver is broken. Publishes at once unless publish_now is false.
  [[nodiscard]] Result<std::uint16_t, std::string> add(std::span<const DriverBuffer> buffers,
                                                       bool publish_now = true);
  // Makes every chain added since the last publish visible to the device at once.
  void publish();
  // Must the device be notified of what was published since the last call?
  [[nodiscard]] bool kick_needed();

  // The next completion, if any; frees its descriptors and unmaps its buffers.
  [[nodiscard]] std::optional<UsedBuffer> poll();
  // Would poll() return a completion now? (Linux's more_used.)
  [[nodiscard]] bool more_used() const;

  // Ask for used-buffer notifications again. Check more_used() afterwards: a completion
  // may have arrived while they were off.
  void enable_interrupts();
  // Tell the device notifications are not needed (avail->flags NO_INTERRUPT; with
  // EVENT_IDX used_event far behind instead; packed: driver event flags DISABLE).
  void disable_interrupts();
  void set_interrupts(bool enabled) { enabled ? enable_interrupts() : disable_interrupts(); }

  [[nodiscard]] const DriverOptions& options() const { return opt_; }
  // Free ring descriptors (ring slots for packed).
  [[nodiscard]] std::uint16_t free_descriptors() const {
    return static_cast<std::uint16_t>(free_count_);  // <= 32768
  }
  // Chains added and not yet collected.
  [[nodiscard]] std::uint16_t outstanding() const {
    return static_cast<std::uint16_t>(outstanding_);
  }
  [[nodiscard]] std::uint64_t device_errors() const { return device_errors_; }
  [[nodiscard]] bool broken() const { return broken_; }
  // Driver positions. split: the free-running 16-bit avail index (including unpublished
  // chains) and the next used index expected; packed: the next ring slot to fill / to
  // read a used descriptor from, with their wrap counters.
  [[nodiscard]] std::uint16_t avail_idx() const { return avail_idx_; }
  [[nodiscard]] bool avail_wrap() const { return avail_wrap_; }
  [[nodiscard]] std::uint16_t used_idx() const { return used_idx_; }
  [[nodiscard]] bool used_wrap() const { return used_wrap_; }
  // Ring memory as this process maps it, for tests that inspect or corrupt rings:
  // the descriptor table/ring, the driver area, the device area.
  [[nodiscard]] std::uint8_t* desc_host() const { return desc_; }
  [[nodiscard]] std::uint8_t* driver_host() const { return driver_; }
  [[nodiscard]] std::uint8_t* device_host() const { return device_; }
  // The indirect table of an id (max_indirect entries), or nullptr without indirect.
  [[nodiscard]] std::uint8_t* indirect_host(std::uint16_t id) const;

  // Called with (gpa, len) of every store the driver makes to guest memory, after the
  // store. An empty function turns it off. REQUIRES: the driving thread is not inside a
  // driver call.
  using WriteObserver = std::function<void(Gpa gpa, std::uint64_t len)>;
  void set_write_observer(WriteObserver observer) { observer_ = std::move(observer); }
  // Points the driver at `to`, which must have the same layout as the memory the driver
  // was created in and hold a copy of its rings. Error (nothing changes) if a ring or
  // table is not mapped in `to`.
  [[nodiscard]] Result<void, std::string> rehome(const GuestMemory& to);
  // The guest memory the rings and indirect tables occupy (GPAs).
  [[nodiscard]] std::vector<GpaRange> ring_ranges() const;

 private:
  struct Chain {
    std::uint16_t ring_descs = 0;  // ring descriptors (slots) the chain occupies
    bool live = false;
    std::vector<std::uint16_t> descs;                    // split: its descriptors, head first
    std::vector<std::pair<Iova, std::uint64_t>> mapped;  // to unmap on completion
  };

  explicit VirtioDriver(DriverOptions options) : opt_(options) {}
  Iova device_addr(Gpa gpa, std::uint64_t len, Access perm, Chain& chain);
  Iova buffer_addr(const DriverBuffer& b, Chain& chain);
  Iova write_indirect(std::uint16_t id, std::span<const DriverBuffer> buffers, Chain& chain);
  std::uint16_t add_split(std::span<const DriverBuffer> buffers, bool use_indirect);
  std::uint16_t add_packed(std::span<const DriverBuffer> buffers, bool use_indirect);
  std::optional<UsedBuffer> poll_split();
  std::optional<UsedBuffer> poll_packed();
  void release(std::uint16_t id);
  void device_error();
  // Reports [p, p + len) (driver ring or table memory) to the write observer.
  void wrote(const std::uint8_t* p, std::uint64_t len) const {
    if (observer_) report(p, len);
  }
  void report(const std::uint8_t* p, std::uint64_t len) const;

  DriverOptions opt_;
  RingAddresses addr_;
  RingGpas gpas_;
  std::uint8_t* desc_ = nullptr;
  std::uint8_t* driver_ = nullptr;
  std::uint8_t* device_ = nullptr;
  Gpa indirect_gpa_;  // one table of max_indirect entries per id
  std::uint8_t* indirect_ = nullptr;
  // Bytes of each block the driver owns: descriptors, driver area, device area, tables.
  std::uint64_t desc_len_ = 0, driver_len_ = 0, device_len_ = 0, indirect_len_ = 0;
  WriteObserver observer_;

  std::vector<Chain> chains_;             // by id
  std::vector<std::uint16_t> free_list_;  // split: free descriptors; packed: free ids
  std::uint32_t free_count_ = 0;          // free ring descriptors
  std::uint32_t outstanding_ = 0;
  std::uint64_t device_errors_ = 0;
  bool broken_ = false;

  // Available side. split: free-running index; packed: next slot and its wrap counter.
  std::uint16_t avail_idx_ = 0;
  bool avail_wrap_ = true;
  // split: avail->idx as last published and as seen by the last kick decision.
  std::uint16_t published_idx_ = 0;
  std::uint16_t kicked_idx_ = 0;
  // packed: heads written but not yet made available (slot, flags), and the published
  // position, and descriptors published since the last kick decision.
  std::vector<std::pair<std::uint16_t, std::uint16_t>> pending_heads_;
  std::uint32_t unpublished_descs_ = 0;
  std::uint16_t published_pos_ = 0;
  bool published_wrap_ = true;
  std::uint32_t num_added_ = 0;

  // Used side. split: free-running index; packed: next slot and its wrap counter.
  std::uint16_t used_idx_ = 0;
  bool used_wrap_ = true;
  // Shadows of what the driver last wrote to its notification-suppression fields:
  // split avail->flags, packed driver event flags.
  std::uint16_t avail_flags_shadow_ = 0;
  std::uint16_t event_flags_shadow_ = 0;
};

}  // namespace vhostkit::frontend
