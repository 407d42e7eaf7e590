// vhostkit/virtqueue.h: the device side of one virtio 1.x virtqueue.
//
// Concepts
//   Virtqueue    one queue, split or packed (RingFormat), driven by one data-path thread.
//                Every ring and buffer address is an Iova and goes through the queue's
//                Translator, so the queue works the same with the IOMMU on (IOVAs) and
//                off (GPAs). Ring areas are translated once when the queue starts and
//                again whenever the address space changes (the queue holds the memory
//                snapshot they came from, so they can never point into unmapped memory).
//   ChainBatch   reusable storage for popped chains: each DescChain lists the translated
//                segments {host, gpa, len} of its driver-readable and device-writable
//                buffers. pop() appends up to N chains with one read of the avail index.
//   Completion   what the device hands back: the chain's id, the number of ring
//                descriptors it used (packed bookkeeping) and the bytes written.
//                push() writes a batch of completions with one index update (split) or
//                one head-flag store (packed), logs every write it makes to guest memory
//                (used elements, used index, packed descriptors) and returns whether
//                the driver must be notified.
//   Hostile rings A malformed chain (index out of range, loop or chain longer than the
//                queue, nested indirect, indirect with NEXT, bad indirect size,
//                readable after writable, 32-bit length overflow, untranslatable or
//                forbidden buffer) marks the queue broken with a specific error; the
//                queue then refuses all work until reset (the device should set
//                VIRTIO "needs reset"). An IOTLB miss is not an error: the chain is left
//                in the ring (deferred), pop() reports the missing IOVA, and the same
//                chain is popped again, exactly once, after the translation arrives.
//   Ring state   RingState holds the avail/used positions (and packed wrap counters):
//                what GET_VRING_BASE returns and SET_VRING_BASE restores.
//   Logging      with VHOST_VRING_F_LOG the frontend gives log_guest_addr, the GPA where
//                it expects used-ring writes to be logged. vhostkit logs every ring write
//                at the GPA its own translation produced (the single write path). It
//                compares log_guest_addr with that GPA when the rings are mapped and, if
//                they disagree, counts the mismatch (log_addr_mismatches()) and keeps
//                logging at its own translation, which is the address it really wrote.
//   Inflight     with an inflight region attached (set_inflight(); vhost-user's
//                VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, split rings) the queue records
//                in memory shared with the front-end which chains it popped and has not
//                completed: pop() marks a head in flight with an increasing counter
//                before the chain is handed out; push() writes the used elements, notes
//                the batch's last head (last_batch_head), publishes the used index, then
//                clears the heads and copies the used index into the region. A back-end
//                that died anywhere on that path leaves a region a successor repairs:
//                when a queue starts in recovery mode, heads whose completions reached
//                the used ring (the elements between the region's used index and the
//                ring's) are cleared, so no completion is delivered twice; the heads
//                still in flight are handed out again by pop() first, oldest first
//                (counter order), and the avail position becomes used index + in flight.
//                Layout per queue (inflight::queue_region_size()): a 16-byte header
//                {u64 features, u16 version, u16 desc_num, u16 last_batch_head,
//                u16 used_idx} and desc_num 16-byte states {u8 inflight, u8 pad[5],
//                u16 next, u64 counter}, rounded up to 64 bytes.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "vhostkit/export.h"
#include "vhostkit/translate.h"
#include "vhostkit/types.h"
#include "vhostkit/virtio_spec.h"

namespace vhostkit {

enum class RingFormat : std::uint8_t { split, packed };

// The inflight region of one split queue (see Inflight above).
namespace inflight {
inline constexpr std::uint64_t kHeaderSize = 16;
inline constexpr std::uint64_t kDescStateSize = 16;
inline constexpr std::uint64_t kAlign = 64;
inline constexpr std::uint16_t kVersion = 1;
// Header fields.
inline constexpr std::uint64_t kFeatures = 0;
inline constexpr std::uint64_t kVersionOff = 8;
inline constexpr std::uint64_t kDescNum = 10;
inline constexpr std::uint64_t kLastBatchHead = 12;
inline constexpr std::uint64_t kUsedIdx = 14;
// Fields of desc[i], relative to desc_state(i).
inline constexpr std::uint64_t kInflight = 0;
inline constexpr std::uint64_t kNext = 6;
inline constexpr std::uint64_t kCounter = 8;
[[nodiscard]] constexpr std::uint64_t desc_state(std::uint32_t i) {
  return kHeaderSize + kDescStateSize * i;
}
// Bytes of one queue's region for a queue of `size` descriptors.
[[nodiscard]] constexpr std::uint64_t queue_region_size(std::uint32_t size) {
  return (kHeaderSize + kDescStateSize * size + kAlign - 1) / kAlign * kAlign;
}
}  // namespace inflight

// Points where a back-end may die while inflight tracking is on; a test installs a
// crash hook (set_crash_hook) that ends the process at one of them.
enum class CrashPoint : std::uint8_t {
  popped,            // a chain is marked in flight, not yet handed to the device
  push_begin,        // push() called: the device finished the I/O, nothing written yet
  used_written,      // used elements and last_batch_head written, used index not
  used_idx_stored,   // used index published, heads not yet cleared in the region
  inflight_cleared,  // heads cleared, the region's used index not yet updated
};
using CrashHook = void (*)(CrashPoint point);
// Installs a process-wide crash hook (nullptr: none). Tests only.
VHOSTKIT_API void set_crash_hook(CrashHook hook);

// Device addresses (Iova: an IOVA with the IOMMU on, numerically the GPA otherwise) of
// the three ring areas.
struct RingAddresses {
  Iova desc;    // descriptor table (split) / descriptor ring (packed)
  Iova driver;  // available ring (split) / driver event suppression (packed)
  Iova device;  // used ring (split) / device event suppression (packed)
};

struct QueueConfig {
  RingFormat format = RingFormat::split;
  std::uint16_t size = 256;  // split: power of two; both: 1 .. 32768
  bool indirect = false;     // VIRTIO_RING_F_INDIRECT_DESC negotiated
  bool event_idx = false;    // VIRTIO_RING_F_EVENT_IDX negotiated
  RingAddresses addr;
  std::optional<Gpa> log_guest_addr;  // VHOST_VRING_F_LOG
};

struct RingState {
  std::uint16_t avail_idx = 0;  // next available entry the device will read
  bool avail_wrap = true;       // packed only
  std::uint16_t used_idx = 0;   // next used entry the device will write
  bool used_wrap = true;        // packed only
};

enum class VirtqueueErrc {
  bad_config,               // size not allowed, or ring areas misaligned / overflowing
  not_started,              // pop/push before start()
  broken,                   // the queue was broken by an earlier error (see broken_error())
  ring_unmapped,            // a ring area is not in guest memory (IOMMU off) or forbidden
  avail_idx_jump,           // the driver's avail index moved by more than the queue size
  head_out_of_range,        // a descriptor index >= queue size
  next_out_of_range,        // a next index outside the table
  chain_too_long,           // more descriptors than the queue size (or a loop)
  nested_indirect,          // an indirect descriptor inside an indirect table
  indirect_not_negotiated,  // INDIRECT flag without VIRTIO_RING_F_INDIRECT_DESC
  indirect_with_next,       // INDIRECT together with NEXT
  bad_indirect_size,        // indirect table length 0 or not a multiple of 16
  readable_after_writable,  // a driver-readable descriptor after a device-writable one
  length_overflow,          // total readable or writable length exceeds 2^32 - 1
  bad_buffer,               // a buffer address not in guest memory or not permitted
  bad_completion,           // push() of an id that is not outstanding
  log_failed,               // a ring write could not be logged
};

[[nodiscard]] VHOSTKIT_API const char* to_string(VirtqueueErrc e);

struct VHOSTKIT_API VirtqueueError {
  VirtqueueErrc code;
  std::uint32_t index = 0;  // descriptor or ring index concerned
  std::uint64_t addr = 0;   // address concerned, if any

  [[nodiscard]] std::string message() const;
};

// One popped descriptor chain.
struct DescChain {
  std::uint16_t id = 0;          // head index (split) / buffer id (packed)
  std::uint16_t ring_descs = 0;  // ring descriptors the chain occupies
  std::uint32_t readable_len = 0;
  std::uint32_t writable_len = 0;
  std::uint32_t first_readable = 0;  // index into ChainBatch segments
  std::uint32_t n_readable = 0;
  std::uint32_t first_writable = 0;
  std::uint32_t n_writable = 0;
};

class ChainBatch {
 public:
  ChainBatch() { reserve(64, 256); }
  void reserve(std::size_t chains, std::size_t segments) {
    chains_.reserve(chains);
    segments_.reserve(segments);
  }
  void clear() {
    chains_.clear();
    segments_.clear();
  }
  [[nodiscard]] std::span<const DescChain> chains() const { return chains_; }
  [[nodiscard]] std::size_t size() const { return chains_.size(); }
  [[nodiscard]] const DescChain& operator[](std::size_t i) const { return chains_[i]; }
  [[nodiscard]] std::span<const Segment> readable(const DescChain& c) const {
    return {segments_.data() + c.first_readable, c.n_readable};
  }
  [[nodiscard]] std::span<const Segment> writable(const DescChain& c) const {
    return {segments_.data() + c.first_writable, c.n_writable};
  }

 private:
  friend class Virtqueue;
  std::vector<DescChain> chains_;
  std::vector<Segment> segments_;
};

struct Completion {
  std::uint16_t id = 0;
  std::uint16_t ring_descs = 1;
  std::uint32_t len = 0;  // bytes the device wrote into the chain's writable buffers
};

// What pop() did.
struct PopResult {
  std::size_t popped = 0;
  // Set when popping stopped at a chain whose translation is missing (IOMMU on). The
  // chain stays in the ring; report_miss says whether to send VHOST_IOTLB_MISS now.
  std::optional<TranslateError> deferred;
};

class VHOSTKIT_API Virtqueue {
 public:
  Virtqueue(AddressSpace& space, LogMode log_mode = LogMode::batched);

  // Validates config and starts the queue at state. For split rings, if
  // used_from_ring is true the used index is read from the used ring in guest memory
  // (as vhost does on SET_VRING_BASE) instead of taken from state.
  [[nodiscard]] Result<void, VirtqueueError> start(const QueueConfig& config,
                                                   const RingState& state = {},
                                                   bool used_from_ring = true);
  // Stops the queue (GET_VRING_BASE) and returns the state to resume from. REQUIRES:
  // every popped chain has been pushed (the caller drains first).
  RingState stop();
  // Forgets everything (RESET_DEVICE / disconnect). The inflight region stays attached.
  void reset();

  // Attaches an inflight region (split rings; at least
  // inflight::queue_region_size(config.size) bytes, mapped until detached) or detaches it
  // (empty span). With recover, the next start() repairs the region and resubmits the
  // chains it records as in flight (see Inflight above); without, start() keeps the
  // records and continues them. Call before start().
  void set_inflight(std::span<std::uint8_t> region, bool recover);
  // Chains the last recovery found in flight and pop() has not yet handed out again.
  [[nodiscard]] std::size_t resubmit_pending() const { return resubmit_.size() - resubmit_pos_; }
  // Whether the last start() took over a predecessor's records. Its completions may
  // be in the used ring without the driver having been notified of them: the caller
  // notifies the driver once.
  [[nodiscard]] bool recovered() const { return recovered_; }
  // Clears every record of the attached region (the driver was reset).
  void clear_inflight();

  [[nodiscard]] bool started() const { return started_; }
  [[nodiscard]] bool broken() const { return broken_.has_value(); }
  [[nodiscard]] const std::optional<VirtqueueError>& broken_error() const { return broken_; }
  [[nodiscard]] RingState state() const { return state_; }
  [[nodiscard]] const QueueConfig& config() const { return config_; }
  // Chains popped and not yet pushed.
  [[nodiscard]] std::uint32_t in_flight() const { return in_flight_; }
  // Counts n chains popped before this start (by this device before the ring stopped, or
  // by a migration's source, Device::load_state) as in flight, so that their completions
  // can be pushed. Error not_started, or bad_completion if more chains than the ring
  // holds would be in flight.
  [[nodiscard]] Result<void, VirtqueueError> adopt_in_flight(std::uint32_t n);

  // Brackets one unit of data-path work (AddressSpace::synchronize waits for it).
  void begin_burst() { tr_.begin_burst(); }
  [[nodiscard]] Result<void, TranslateError> end_burst() { return tr_.end_burst(); }

  // Pops up to max available chains into out (appending).
  [[nodiscard]] Result<PopResult, VirtqueueError> pop(ChainBatch& out, std::size_t max);

  // Completes chains; returns whether the driver must be notified (call eventfd).
  [[nodiscard]] Result<bool, VirtqueueError> push(std::span<const Completion> done);

  // Copies data into a chain's writable buffers starting at offset, logging every page.
  // Returns the number of bytes written (less than data.size() if the buffers end).
  [[nodiscard]] Result<std::uint32_t, VirtqueueError> write_chain(
      const ChainBatch& batch, const DescChain& chain, std::uint32_t offset,
      std::span<const std::uint8_t> data);
  // Copies from a chain's readable buffers starting at offset; returns bytes copied.
  [[nodiscard]] std::uint32_t read_chain(const ChainBatch& batch, const DescChain& chain,
                                         std::uint32_t offset, std::span<std::uint8_t> out) const;

  // Asks the driver to kick (true) or not (false) on new buffers. Returns, when
  // enabling, whether buffers became available meanwhile (the caller must then pop
  // again rather than sleep).
  [[nodiscard]] Result<bool, VirtqueueError> set_kick_enabled(bool enabled);

  // IOTLB look-ahead: walks up to max_chains available chains without consuming them
  // and appends every translation miss to be reported to the frontend (report_miss
  // set; each page once), so all missing pages can be requested in one burst rather
  // than one round trip per chain. Leaves the ring state untouched.
  std::size_t collect_misses(std::vector<TranslateError>& out, std::size_t max_chains);

  // Whether the avail ring holds buffers not yet popped.
  [[nodiscard]] bool has_available();

  [[nodiscard]] Translator& translator() { return tr_; }
  [[nodiscard]] std::uint64_t log_addr_mismatches() const { return log_addr_mismatches_; }

 private:
  // A ring area translated to host memory; usually one segment.
  struct RingArea {
    static constexpr std::size_t kMaxSegments = 8;
    std::uint64_t len = 0;
    Segment segs[kMaxSegments];
    std::size_t n = 0;
    // Host pointer and segment for [off, off + size), or nullptr if it straddles.
    HostPtr at(std::uint64_t off, std::uint64_t size, Segment* seg = nullptr) const {
      if (n == 1) {  // the common case: the whole area is one host range
        if (seg != nullptr) *seg = Segment{segs[0].host + off, segs[0].gpa + off, size};
        return segs[0].host + off;
      }
      return at_slow(off, size, seg);
    }
    HostPtr at_slow(std::uint64_t off, std::uint64_t size, Segment* seg) const;
  };

  Result<void, VirtqueueError> ensure_mapped();
  Result<void, VirtqueueError> map_rings();
  Result<void, VirtqueueError> map_area(Iova addr, std::uint64_t len, Access access,
                                        std::uint64_t align, RingArea& area);
  VirtqueueError fail(VirtqueueError e);
  Result<void, VirtqueueError> log_ring(const RingArea& area, std::uint64_t off, std::uint64_t len);

  // Chain walking: appends the chain's segments. true: the buffer (or table) was
  // added; false: its translation is missing (IOMMU on) and deferred_ says where.
  Result<bool, VirtqueueError> add_buffer(ChainBatch& out, DescChain& chain, std::uint64_t addr,
                                          std::uint32_t len, bool writable, bool& seen_writable);
  // add_buffer's rest after the one-segment translation failed with `first`: fragmented
  // buffers, misses (and the dry run's look-ahead), bad addresses.
  Result<bool, VirtqueueError> add_buffer_slow(ChainBatch& out, DescChain& chain,
                                               std::uint64_t addr, std::uint32_t len, bool writable,
                                               TranslateError first);
  Result<bool, VirtqueueError> walk_indirect(ChainBatch& out, DescChain& chain, std::uint64_t addr,
                                             std::uint32_t len, bool& seen_writable,
                                             std::uint32_t& count);

  Result<PopResult, VirtqueueError> pop_split(ChainBatch& out, std::size_t max);
  // Walks the split chain at head into out. true: complete; false: deferred.
  Result<bool, VirtqueueError> walk_split(ChainBatch& out, std::uint16_t head);
  Result<void, VirtqueueError> recover_inflight();
  void mark_inflight(std::uint16_t head);
  Result<PopResult, VirtqueueError> pop_packed(ChainBatch& out, std::size_t max);
  Result<bool, VirtqueueError> push_split(std::span<const Completion> done);
  Result<bool, VirtqueueError> push_packed(std::span<const Completion> done);

  AddressSpace& space_;
  Translator tr_;
  QueueConfig config_;
  RingState state_;
  bool started_ = false;
  std::optional<VirtqueueError> broken_;
  std::uint32_t in_flight_ = 0;
  std::uint64_t log_addr_mismatches_ = 0;

  // Ring mapping, valid for ring_generation_ while ring_memory_ is held.
  bool mapped_ = false;
  std::uint64_t ring_generation_ = 0;
  std::shared_ptr<const MemorySnapshot> ring_memory_;
  RingArea desc_;
  RingArea driver_;
  RingArea device_;
  std::vector<std::uint8_t> indirect_scratch_;
  std::optional<TranslateError> deferred_;          // why the last walk stopped
  std::vector<TranslateError>* dry_run_ = nullptr;  // collect_misses() in progress
  ChainBatch scratch_;
  bool pending_used_from_ring_ = false;            // read used->idx once the ring maps
  std::optional<TranslateError> last_miss_;        // why the rings could not be mapped
  std::optional<TranslateError> unreported_miss_;  // a ring miss pop() has yet to report
  std::uint16_t avail_shadow_ = 0;                 // split: last avail->idx read

  // Inflight tracking (split rings).
  std::span<std::uint8_t> inflight_;     // this queue's region; empty: not tracked
  bool inflight_recover_ = false;        // the next start() recovers
  bool pending_recover_ = false;         // recover once used->idx has been read
  bool recovered_ = false;               // the last start() recovered a predecessor's records
  std::uint64_t inflight_counter_ = 1;   // the next pop's counter
  std::vector<std::uint16_t> resubmit_;  // heads to hand out again, oldest first
  std::size_t resubmit_pos_ = 0;
};

}  // namespace vhostkit
