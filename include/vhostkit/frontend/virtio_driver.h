// vhostkit/frontend/virtio_driver.h: the guest driver side of one virtqueue.
//
// Concepts
//   VirtioDriver  allocates a split or packed ring in GuestMemory, maps it through the
//                 Viommu when one is given (the device then sees IOVAs), adds buffer
//                 chains and collects completions, writing the same bytes a Linux virtio
//                 driver would (virtio 1.2 sections 2.7 and 2.8).
//   Publishing    add() writes a chain's descriptors; publish() makes every chain added
//                 since the last publish visible with one release store: avail->idx
//                 (split), or the head flags of the first new chain, written last (packed).
//                 add(..., publish=true) publishes at once.
//   Ids           a chain's id is its head descriptor index (split) or its buffer id
//                 (packed); poll() returns it with the length the device wrote.
//   IOMMU         each buffer is mapped before the chain is published and unmapped when
//                 its completion is collected (strict or lazy, per the Viommu), like the
//                 Linux DMA API; indirect tables are mapped too.
//   Device bugs   a completion for an id that is not outstanding is not trusted; it is
//                 counted in device_errors() and skipped.
// Threading: one thread drives the driver; the device runs concurrently on another.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "vhostkit/frontend/guest_memory.h"
#include "vhostkit/frontend/viommu.h"
#include "vhostkit/types.h"
#include "vhostkit/virtqueue.h"

namespace vhostkit::frontend {

struct DriverOptions {
  bool packed = false;
  std::uint16_t size = 256;  // split: power of two
  bool indirect = false;     // use indirect tables for chains of more than one buffer
  bool event_idx = false;
  Viommu* iommu = nullptr;   // nullptr: the device sees GPAs
  std::uint16_t max_indirect = 64;  // entries per indirect table
  // Map device-writable buffers read-write instead of write-only (DMA_FROM_DEVICE). DPDK's
  // back-end checks read-write access on every receive buffer it fills.
  bool map_writable_read_write = false;
};

struct DriverBuffer {
  Gpa gpa;
  std::uint32_t len = 0;
  bool device_writes = false;
};

struct UsedBuffer {
  std::uint16_t id = 0;
  std::uint32_t len = 0;
};

struct RingGpas {
  Gpa desc, driver, device;
};

class VirtioDriver {
 public:
  [[nodiscard]] static Result<VirtioDriver, std::string> create(GuestMemory& memory,
                                                               DriverOptions options);

  // The ring addresses the device is given (IOVAs with an IOMMU) and their GPAs (the
  // device area's GPA is vhost-user's log_guest_addr).
  [[nodiscard]] RingAddresses addresses() const { return addr_; }
  [[nodiscard]] RingGpas gpas() const { return gpas_; }
  // A QueueConfig for the device side with these addresses.
  [[nodiscard]] QueueConfig queue_config() const;

  // Adds a chain (driver-readable buffers first). Error if there is no room or the
  // buffer list is malformed.
  [[nodiscard]] Result<std::uint16_t, std::string> add(std::span<const DriverBuffer> buffers,
                                                      bool publish_now = true);
  void publish();
  // After publish(): must the device be kicked (notification suppression)?
  [[nodiscard]] bool kick_needed();

  // The next completion, if any.
  [[nodiscard]] std::optional<UsedBuffer> poll();

  // Ask for (or suppress) used-buffer notifications.
  void set_interrupts(bool enabled);

  [[nodiscard]] std::uint16_t free_descriptors() const { return free_count_; }
  [[nodiscard]] std::uint16_t outstanding() const { return outstanding_; }
  [[nodiscard]] std::uint64_t device_errors() const { return device_errors_; }
  [[nodiscard]] const DriverOptions& options() const { return opt_; }
  // Driver-side positions: next avail index (split: free-running), wrap counters (packed).
  [[nodiscard]] std::uint16_t avail_idx() const { return avail_idx_; }
  [[nodiscard]] bool avail_wrap() const { return avail_wrap_; }
  [[nodiscard]] std::uint16_t used_idx() const { return used_idx_; }
  [[nodiscard]] bool used_wrap() const { return used_wrap_; }
  // Raw ring memory (tests that corrupt rings on purpose).
  [[nodiscard]] std::uint8_t* desc_host() const { return desc_; }
  [[nodiscard]] std::uint8_t* driver_host() const { return driver_; }
  [[nodiscard]] std::uint8_t* device_host() const { return device_; }

 private:
  struct ChainInfo {
    std::uint16_t descs = 0;         // ring descriptors used
    std::uint16_t last = 0;          // split: last descriptor of a direct chain
    std::vector<Iova> mapped;        // IOVAs to unmap on completion
    bool live = false;
  };

  explicit VirtioDriver(DriverOptions options) : opt_(options) {}
  Iova device_addr(Gpa gpa, std::uint64_t len, Access perm, ChainInfo* chain);
  Access writable_access() const { return opt_.map_writable_read_write ? Access::read_write : Access::write; }
  Result<std::uint16_t, std::string> add_split(std::span<const DriverBuffer> buffers);
  Result<std::uint16_t, std::string> add_packed(std::span<const DriverBuffer> buffers);
  std::optional<UsedBuffer> poll_split();
  std::optional<UsedBuffer> poll_packed();
  void release(std::uint16_t id);
  std::uint64_t write_indirect(std::uint16_t slot, std::span<const DriverBuffer> buffers,
                               ChainInfo& chain);

  DriverOptions opt_;
  RingAddresses addr_;
  RingGpas gpas_;
  std::uint8_t* desc_ = nullptr;
  std::uint8_t* driver_ = nullptr;
  std::uint8_t* device_ = nullptr;
  Gpa indirect_gpa_;              // opt_.size tables of max_indirect entries
  std::uint8_t* indirect_ = nullptr;

  std::vector<ChainInfo> chains_;  // by id
  std::vector<std::vector<std::uint16_t>> extra_descs_;  // split: non-head descriptors by head
  std::vector<std::uint16_t> free_list_;  // split: free descriptors; packed: free ids
  std::uint16_t free_count_ = 0;   // free ring descriptors
  std::uint16_t outstanding_ = 0;
  std::uint64_t device_errors_ = 0;

  std::uint16_t avail_idx_ = 0;       // split: free-running; packed: next slot
  bool avail_wrap_ = true;
  std::uint16_t published_idx_ = 0;   // split: avail->idx as last published
  std::uint16_t kicked_idx_ = 0;      // split: avail->idx at the last kick decision
  std::vector<std::pair<std::uint16_t, std::uint16_t>> pending_heads_;  // packed: (slot, flags)
  std::uint16_t used_idx_ = 0;        // split: free-running; packed: next slot
  bool used_wrap_ = true;
  bool interrupts_ = true;
  // packed kick decision: position when last kicked
  std::uint16_t kicked_pos_ = 0;
  bool kicked_wrap_ = true;
};

}  // namespace vhostkit::frontend
