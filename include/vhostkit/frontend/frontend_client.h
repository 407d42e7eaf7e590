// vhostkit/frontend/frontend_client.h: the VMM side of vhost-user.
//
// Concepts
//   FrontendClient  connects to a back-end socket and drives it the way QEMU does:
//                   feature negotiation, SET_OWNER, the memory table (whole or one region
//                   at a time), ring setup from a VirtioDriver, the dirty log, ring stop
//                   (GET_VRING_BASE). Requests and their replies are serialised by a
//                   mutex, so several threads may use one client.
//   Address forms   with VHOST_USER_PROTOCOL_F_GPA_ADDRESSES negotiated the client sends
//                   GPAs in every "user address" field (regions, rings, IOTLB updates);
//                   without it, its own virtual addresses, as QEMU 7.2 does.
//   vIOMMU          attach_viommu() makes the client the IOMMU's voice: it answers the
//                   back-end's IOTLB misses (read on the back-end request channel by a
//                   thread of the client) with updates from the Viommu, ordered against
//                   its invalidations (Viommu::answer_miss), and forwards the Viommu's
//                   invalidations. Updates in the legacy form are split at region
//                   boundaries, so each piece is contiguous in the client's address space.
//   Dirty log       enable_logging() shares a memfd log (SET_LOG_BASE) and sets
//                   VHOST_F_LOG_ALL; the log is readable through log().
//   Device state    with VHOST_USER_PROTOCOL_F_DEVICE_STATE, save_device_state() and
//                   load_device_state() move the back-end's own state (every ring
//                   stopped) over a pipe: SET_DEVICE_STATE_FD, the transfer on the pipe or
//                   on the channel the back-end returned instead, CHECK_DEVICE_STATE.
//   Inflight        with VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, setup_inflight() asks the
//                   back-end for its inflight area once (GET_INFLIGHT_FD) and hands it
//                   back (SET_INFLIGHT_FD); the client keeps the fd for the connection's
//                   life and across reconnect(), as QEMU does, so a back-end started
//                   after a crash finds the requests its predecessor left in flight.
//   Reconnect       reconnect() replaces a dead back-end's socket by a new one and
//                   replays the session: negotiation, the memory table, the inflight
//                   area, then every ring from the guest-driver model with the base
//                   QEMU sends after a back-end crash (the used ring's index).
//   Reset           reset_device() (RESET_DEVICE) or set_status(0) return the device to
//                   its initial state; a driver then starts over with set_features(), the
//                   memory table (kept by vhostkit's back-end) and the rings.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "vhostkit/dirty_log.h"
#include "vhostkit/frontend/guest_memory.h"
#include "vhostkit/frontend/viommu.h"
#include "vhostkit/frontend/virtio_driver.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/vhost_user/message.h"

namespace vhostkit::frontend {

struct ClientOptions {
  std::uint64_t want_features = 0;  // virtio features to accept if offered
  bool want_gpa_addresses = true;   // negotiate VHOST_USER_PROTOCOL_F_GPA_ADDRESSES if offered
  bool want_inflight = true;        // negotiate VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD if offered
};

// Eventfds for one ring: the client keeps its ends, the back-end gets duplicates.
struct RingNotifiers {
  UniqueFd kick;
  UniqueFd call;
};

class FrontendClient {
 public:
  [[nodiscard]] static Result<std::unique_ptr<FrontendClient>, std::string> connect(
      const std::string& path);
  [[nodiscard]] static std::unique_ptr<FrontendClient> adopt(UniqueFd socket);
  ~FrontendClient();
  FrontendClient(const FrontendClient&) = delete;
  FrontendClient& operator=(const FrontendClient&) = delete;

  // GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_BACKEND_REQ_FD, SET_OWNER, SET_FEATURES.
  [[nodiscard]] Result<void, std::string> negotiate(const ClientOptions& options);
  [[nodiscard]] std::uint64_t features() const { return features_.load(std::memory_order_relaxed); }
  [[nodiscard]] std::uint64_t protocol_features() const {
    return protocol_features_.load(std::memory_order_relaxed);
  }
  [[nodiscard]] vhost_user::Negotiated negotiated() const {
    return {features(), protocol_features()};
  }
  [[nodiscard]] bool gpa_addresses() const;
  [[nodiscard]] bool iommu() const;

  [[nodiscard]] Result<void, std::string> set_mem_table(const GuestMemory& memory);
  // SET_MEM_TABLE with the regions i of memory for which plugged[i] is true (all of them
  // if plugged is empty). Error if none is, or more than 8 are.
  [[nodiscard]] Result<void, std::string> set_mem_table_regions(const GuestMemory& memory,
                                                                const std::vector<bool>& plugged);
  [[nodiscard]] Result<void, std::string> add_mem_reg(const GuestMemory& memory,
                                                      std::size_t region);
  [[nodiscard]] Result<void, std::string> rem_mem_reg(const GuestMemory& memory,
                                                      std::size_t region);

  // SET_VRING_NUM/BASE/ADDR/CALL/KICK/ENABLE for one ring. The base (SET_VRING_BASE)
  // is the driver's current position unless given: split, the avail index; packed, the
  // avail index and wrap counter in bits 0-15 and the used ones in bits 16-31, as QEMU
  // encodes them.
  [[nodiscard]] Result<RingNotifiers, std::string> start_queue(
      std::uint32_t index, const GuestMemory& memory, const VirtioDriver& driver,
      std::optional<std::uint32_t> base = std::nullopt, bool log_ring = false);
  // SET_STATUS with ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK once the rings are set
  // up (a no-op unless VHOST_USER_PROTOCOL_F_STATUS was negotiated; DPDK's back-end
  // starts processing only after it).
  [[nodiscard]] Result<void, std::string> driver_ok();

  // GET_VRING_BASE: stops the ring and returns the back-end's state.
  [[nodiscard]] Result<std::uint32_t, std::string> stop_queue(std::uint32_t index);

  // Whether VHOST_USER_PROTOCOL_F_DEVICE_STATE was negotiated.
  [[nodiscard]] bool device_state() const;
  // The back-end's device state (a save). REQUIRES: device_state(), every ring stopped.
  [[nodiscard]] Result<std::vector<std::uint8_t>, std::string> save_device_state();
  // Hands `state` (from save_device_state() of the source) to the back-end (a load); the
  // error says why the back-end refused it. REQUIRES: device_state(), no ring started.
  [[nodiscard]] Result<void, std::string> load_device_state(std::span<const std::uint8_t> state);

  // Whether VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD was negotiated.
  [[nodiscard]] bool inflight() const;
  // GET_INFLIGHT_FD for num_queues rings of queue_size (the first time only; the area is
  // kept), then SET_INFLIGHT_FD. Call before the rings start. REQUIRES: inflight().
  [[nodiscard]] Result<void, std::string> setup_inflight(std::uint16_t num_queues,
                                                         std::uint16_t queue_size);
  // The inflight area the client holds (empty before setup_inflight()).
  [[nodiscard]] std::span<const std::uint8_t> inflight_area() const;
  // Drops the held inflight area (the guest reset the device: its requests are gone).
  void drop_inflight();

  // Replaces the connection by `socket` (a new back-end on the same path) and replays the
  // session: negotiate(options), set_mem_table(memory), setup_inflight() if an area is
  // held and the new back-end offers it, start_queue() for each drivers[i] as ring i with
  // the base QEMU sends after a crash (the used ring's index), then driver_ok().
  [[nodiscard]] Result<std::vector<RingNotifiers>, std::string> reconnect(
      UniqueFd socket, const ClientOptions& options, const GuestMemory& memory,
      std::span<const VirtioDriver* const> drivers);

  // RESET_DEVICE. REQUIRES: VHOST_USER_PROTOCOL_F_RESET_DEVICE negotiated.
  [[nodiscard]] Result<void, std::string> reset_device();
  // SET_STATUS (0 resets the device). REQUIRES: VHOST_USER_PROTOCOL_F_STATUS negotiated.
  [[nodiscard]] Result<void, std::string> set_status(std::uint8_t status);
  // SET_FEATURES with `features` (after a reset: the driver negotiates again).
  [[nodiscard]] Result<void, std::string> set_features(std::uint64_t features);

  // The dirty log: a memfd of `bytes` shared with SET_LOG_BASE, then LOG_ALL on.
  [[nodiscard]] Result<void, std::string> enable_logging(std::uint64_t bytes,
                                                         std::uint64_t offset = 0);
  [[nodiscard]] Result<void, std::string> disable_logging();
  [[nodiscard]] DirtyLog* log() const { return log_view_.get(); }

  // vIOMMU: answer misses from iommu, forward its invalidations.
  void attach_viommu(Viommu& iommu, const GuestMemory& memory);
  [[nodiscard]] Result<void, std::string> iotlb_update(const ViommuMapping& mapping);
  [[nodiscard]] Result<void, std::string> iotlb_invalidate(Iova iova, std::uint64_t len);
  [[nodiscard]] std::uint64_t misses_answered() const { return misses_answered_.load(); }

  // Generic request with REPLY_ACK: true if the back-end acknowledged success.
  [[nodiscard]] Result<void, std::string> request_ack(vhost_user::Message m);
  // Request with a reply of the same type.
  [[nodiscard]] Result<vhost_user::Message, std::string> request_reply(vhost_user::Message m);
  // Raw send, no reply expected (tests that send malformed messages).
  [[nodiscard]] Result<void, std::string> send(const vhost_user::Message& m);

  // Closes the connection (the back-end sees a disconnect).
  void close();

 private:
  explicit FrontendClient(UniqueFd socket);
  void backend_channel_loop();
  Result<void, std::string> request_ack_locked(vhost_user::Message m);
  // CHECK_DEVICE_STATE. REQUIRES: mu_ held.
  Result<void, std::string> check_device_state_locked();
  // Sends m and reads and validates its reply. REQUIRES: mu_ held.
  Result<vhost_user::Message, std::string> exchange_locked(vhost_user::Message m);
  [[nodiscard]] vhost_user::MemRegion region_of(const RegionSpec& s) const;
  std::uint64_t ring_address(const GuestMemory& memory, Iova device_addr, Gpa gpa) const;

  std::mutex mu_;  // serialises requests and replies on sock_
  UniqueFd sock_;
  // Atomic: the back-end channel thread reads them (the address form of its IOTLB
  // answers) while a request on another thread may change them (SET_FEATURES, logging).
  std::atomic<std::uint64_t> features_{0};
  std::atomic<std::uint64_t> protocol_features_{0};
  UniqueFd backend_sock_;  // our end of the back-end request channel
  std::thread backend_thread_;
  std::atomic<bool> closing_{false};
  // Set by attach_viommu() while the back-end channel thread may already run: memory_
  // is stored before iommu_ (release), the thread loads iommu_ (acquire) first.
  std::atomic<Viommu*> iommu_{nullptr};
  std::atomic<const GuestMemory*> memory_{nullptr};
  std::atomic<std::uint64_t> misses_answered_{0};
  UniqueFd log_fd_;
  void* log_map_ = nullptr;
  std::size_t log_map_len_ = 0;
  std::shared_ptr<DirtyLog> log_view_;
  // The inflight area (GET_INFLIGHT_FD's reply), kept across reconnect().
  UniqueFd inflight_fd_;
  vhost_user::InflightDesc inflight_desc_{};
  void* inflight_map_ = nullptr;
};

}  // namespace vhostkit::frontend
