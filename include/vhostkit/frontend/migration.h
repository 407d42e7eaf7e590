// vhostkit/frontend/migration.h: live migration of a running vhost-user device, and the
// proof that nothing was lost.
//
// Concepts
//   Migration       moves a running device from a source back-end to a destination
//                   back-end the way a VMM does (design.md section 6):
//                   start()    SET_LOG_BASE + VHOST_F_LOG_ALL on the source, then copy every
//                              plugged page of guest RAM to the destination memory
//                              (iteration 0);
//                   iterate()  fetch-and-clear the dirty logs, copy those pages (one
//                              round); converged() once a round found fewer than
//                              converge_pages dirty pages or max_iterations were run;
//                   finish()   pause the guest, GET_VRING_BASE on every queue, save the
//                              source's device state, the last fetch-and-copy, the proof
//                              (below), then start the destination (negotiate,
//                              SET_MEM_TABLE with the destination memory, load the device
//                              state, the rings from the saved bases), re-home the
//                              drivers onto the destination memory and resume the guest.
//                   run() does all of it.
//   Two dirty logs  the device's writes are in the vhost-user log the source back-end
//                   fills; the guest's own writes (the driver model's ring stores, the
//                   payloads the guest writes) are in a GuestDirtyLog, the model of KVM's
//                   dirty log. A page is copied when either marks it. The guest log is
//                   private to this process and does not go through DirtyLog, so the
//                   fault-injection switch (dirty_log.h) only ever hits the back-end's
//                   log.
//   Memory layout   the destination GuestMemory is a separate set of memfds with the same
//                   layout. `plugged` says which regions the source back-end's memory table
//                   holds; add_region()/remove_region() send ADD_MEM_REG/REM_MEM_REG to the
//                   source during the migration (an added region is copied whole in the
//                   next round) and the destination gets the final table.
//   Device state    when both back-ends negotiated VHOST_USER_PROTOCOL_F_DEVICE_STATE,
//                   the source's own state (a net device's MAC and counters, a blk
//                   device's pending completions) is saved once its rings stopped and
//                   loaded into the destination before its rings start. A destination
//                   that refuses it fails the migration: the source, stopped, keeps its
//                   state and can be resumed.
//   The proof       after the source stopped and the last dirty pages were copied, source
//                   and destination RAM are compared byte for byte, page by page, over
//                   every plugged region. Any differing page (reported by GPA) is a write
//                   the back-end did not log. The ring state is checked too: the bases the
//                   source returned are the ones the destination is started with, and the
//                   split rings' avail/used indices are the same in both memories.
// Threading: one thread calls the Migration's methods. The guest (the drivers and its own
// memory writes) may run on another thread between pause_guest and resume_guest; both
// callbacks run on the migration thread.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "vhostkit/frontend/frontend_client.h"
#include "vhostkit/frontend/guest_memory.h"
#include "vhostkit/frontend/viommu.h"
#include "vhostkit/frontend/virtio_driver.h"
#include "vhostkit/types.h"

namespace vhostkit::frontend {

// The guest's (vCPU) writes to guest RAM, one bit per 4 KiB page, as KVM's dirty log
// keeps them. mark() may run on any thread concurrently with fetch_and_clear().
class GuestDirtyLog {
 public:
  // Covers [0, end).
  explicit GuestDirtyLog(Gpa end);
  // Marks every page of [gpa, gpa + len) (after the data was written: release). Pages
  // beyond the log are ignored. len 0 marks nothing.
  void mark(Gpa gpa, std::uint64_t len);
  // Marks the pages a driver writes from now on (VirtioDriver::set_write_observer).
  void attach(VirtioDriver& driver);
  // Calls fn(page) for each marked page and clears it; returns how many.
  template <typename Fn>
  std::uint64_t fetch_and_clear(Fn&& fn);
  [[nodiscard]] std::uint64_t pages() const { return words_.size() * 64; }

 private:
  std::vector<std::atomic<std::uint64_t>> words_;
};

// One round of the migration, as the progress callback gets it.
struct MigrationIteration {
  unsigned index = 0;                    // 0: the bulk copy; the final round is the last
  bool final = false;                    // the stop-and-copy round
  std::uint64_t device_dirtied = 0;      // pages found in the back-end's log
  std::uint64_t guest_dirtied = 0;       // pages found in the guest's log
  std::uint64_t pages_dirtied = 0;       // distinct pages of the two (0 for the bulk copy)
  std::uint64_t pages_copied = 0;        // pages copied this round
  double seconds = 0;                    // wall time of the round
  double throughput_mib_s = 0;           // pages_copied * 4 KiB / seconds
  std::uint64_t device_state_bytes = 0;  // final round: the source's device state saved
};

struct QueueMigrationState {
  std::uint32_t index = 0;
  std::uint32_t base = 0;  // GET_VRING_BASE from the source = SET_VRING_BASE to the dest
  bool packed = false;
  // split: avail->idx and used->idx as read from the source / destination memory.
  std::uint16_t source_avail_idx = 0, destination_avail_idx = 0;
  std::uint16_t source_used_idx = 0, destination_used_idx = 0;
  bool match = true;
};

struct MigrationResult {
  std::vector<MigrationIteration> iterations;
  std::uint64_t pages_compared = 0;
  std::vector<Gpa> differing_pages;  // page-aligned GPAs, ascending
  std::vector<QueueMigrationState> queues;
  bool rings_match = true;
  std::uint64_t pages_copied = 0;  // over all rounds
  // pause_guest .. resume_guest, without compare_ms: the proof is a test instrument, a
  // production VMM would not spend that time with the guest stopped.
  double downtime_ms = 0;
  double compare_ms = 0;  // the byte-for-byte comparison
  double total_s = 0;     // start() .. the end of finish()
  // The destination's eventfds per queue; resume_guest gets them first and may take them.
  std::vector<RingNotifiers> notifiers;
  // The back-ends' own state: carried from source to destination (both negotiated
  // VHOST_USER_PROTOCOL_F_DEVICE_STATE), its size, and why it was not carried otherwise.
  bool device_state_carried = false;
  std::uint64_t device_state_bytes = 0;
  std::string device_state_note;

  [[nodiscard]] bool ok() const { return differing_pages.empty() && rings_match; }
};

struct MigrationOptions {
  std::uint64_t converge_pages = 64;  // a round with fewer dirty pages ends the iteration
  unsigned max_iterations = 30;       // rounds after the bulk copy, at most
  std::uint64_t log_offset = 0;       // SET_LOG_BASE mmap offset
  // Negotiated with the destination; by default the source's features and address form.
  std::optional<ClientOptions> destination_options;
  // Called after every round (bulk, iterations, final).
  std::function<void(const MigrationIteration&)> on_progress;
  // Stop the vCPUs: no driver call and no guest write until resume_guest. May be empty
  // when the caller drives the guest between the Migration's calls.
  std::function<void()> pause_guest;
  // The drivers now live in the destination memory; kick and wait on these eventfds.
  std::function<void(std::vector<RingNotifiers>& destination)> resume_guest;
  // Called with the source's device state before it goes to the destination: where a
  // VMM would put it in its migration stream (tests alter it here).
  std::function<void(std::vector<std::uint8_t>& state)> on_device_state;
};

// What the source side consists of.
struct MigrationSource {
  FrontendClient* client = nullptr;    // negotiated, rings started
  GuestMemory* memory = nullptr;       // the guest RAM the source back-end maps
  std::vector<VirtioDriver*> queues;   // queue i's driver
  GuestDirtyLog* guest_log = nullptr;  // the guest's writes; drivers attached
  Viommu* iommu = nullptr;             // the guest's vIOMMU when the device uses one
  std::vector<bool> plugged;           // regions in the source's memory table; empty: all
};

class Migration {
 public:
  // REQUIRES: destination_memory has source.memory's layout and outlives the Migration;
  // so do everything in source.
  Migration(MigrationSource source, GuestMemory& destination_memory, MigrationOptions options = {});

  // Turns on logging on the source and copies every plugged page (iteration 0).
  [[nodiscard]] Result<void, std::string> start();
  // One round: fetch-and-clear both logs, copy the dirty pages.
  [[nodiscard]] Result<MigrationIteration, std::string> iterate();
  [[nodiscard]] bool converged() const;
  // ADD_MEM_REG of region `index` on the source; the whole region is copied next round.
  [[nodiscard]] Result<void, std::string> add_region(std::size_t index);
  // REM_MEM_REG of region `index` on the source; it is no longer copied or compared.
  [[nodiscard]] Result<void, std::string> remove_region(std::size_t index);
  // Stop-and-copy, the proof, and the switch to `destination` (a connected client that
  // has not negotiated yet). The result holds the proof whatever it says; an error means
  // the migration could not be carried out (the guest then stays paused, the source
  // stopped). REQUIRES: called once.
  [[nodiscard]] Result<MigrationResult, std::string> finish(FrontendClient& destination);
  // start(), iterate() until converged(), finish().
  [[nodiscard]] Result<MigrationResult, std::string> run(FrontendClient& destination);

 private:
  [[nodiscard]] bool plugged_page(std::uint64_t page) const;
  std::uint64_t copy_page(std::uint64_t page);
  MigrationIteration round(bool final);
  void report(MigrationIteration it);
  void compare(MigrationResult& r) const;

  MigrationSource src_;
  GuestMemory& dst_;
  MigrationOptions opt_;
  std::vector<bool> plugged_;
  std::vector<bool> pending_regions_;  // added: copy whole next round
  std::vector<std::uint64_t> seen_;    // per-round scratch bitmap of pages
  std::uint64_t log_bytes_ = 0;
  bool started_ = false;
  unsigned iterations_ = 0;
  std::uint64_t last_dirty_ = UINT64_MAX;
  MigrationResult result_;
  std::chrono::steady_clock::time_point t0_;
};

// SET_MEM_TABLE with the regions of memory whose `plugged` flag is set (all if empty),
// in the client's address form. For a source whose table must leave room for a region
// added later with ADD_MEM_REG.
[[nodiscard]] Result<void, std::string> set_mem_table_regions(FrontendClient& client,
                                                              const GuestMemory& memory,
                                                              const std::vector<bool>& plugged);

template <typename Fn>
std::uint64_t GuestDirtyLog::fetch_and_clear(Fn&& fn) {
  std::uint64_t found = 0;
  for (std::size_t w = 0; w < words_.size(); ++w) {
    if (words_[w].load(std::memory_order_relaxed) == 0) continue;
    // acquire: the guest's data written before the bit is visible to the copy.
    std::uint64_t v = words_[w].exchange(0, std::memory_order_acq_rel);
    while (v != 0) {
      unsigned b = static_cast<unsigned>(__builtin_ctzll(v));
      v &= v - 1;
      ++found;
      fn(static_cast<std::uint64_t>(w) * 64 + b);
    }
  }
  return found;
}

}  // namespace vhostkit::frontend
