// vhostkit/vhost_user/backend_server.h: the device-agnostic vhost-user back-end.
//
// Concepts
//   BackendServer  serves one Device to one front-end at a time over a Unix stream
//                  socket: it negotiates features, keeps the device's AddressSpace
//                  (memory table, IOTLB, dirty log) and one queue runner per virtqueue,
//                  and answers every request of the vhost-user specification that
//                  vhostkit offers (see docs/vhost-user.md). On disconnect it stops the
//                  rings, resets the device and all state, and (in run()) accepts again.
//   Addresses      ring addresses are IOVAs when VIRTIO_F_ACCESS_PLATFORM is negotiated;
//                  otherwise GPAs when VHOST_USER_PROTOCOL_F_GPA_ADDRESSES is, and the
//                  front-end's own virtual addresses (converted through the memory table
//                  when the ring starts) when neither is. IOTLB updates carry a GPA with
//                  GPA_ADDRESSES and a uaddr without; both end in the same IOTLB entries.
//   Quiescence     a change the data path must not race with (memory table, IOTLB
//                  invalidation, logging on/off, log base) is acknowledged only after
//                  AddressSpace::synchronize(): no worker still uses the old state.
//                  GET_VRING_BASE stops the ring's worker before it returns the state.
//   Device state   with every ring stopped, SET_DEVICE_STATE_FD saves the Device's state
//                  into, or loads it from, the front-end's fd on a thread of its own;
//                  CHECK_DEVICE_STATE reports the outcome (docs/vhost-user.md).
//   Reset          RESET_DEVICE and SET_STATUS(0) stop and forget the rings, clear the
//                  negotiated features (so the IOMMU and logging switches) and reset the
//                  Device; the connection's memory table and channels stay.
//   Hostile input  a malformed message is rejected (REPLY_ACK failure when asked for,
//                  and a log line naming the device and request); framing errors close
//                  the connection. Nothing a front-end sends can crash the process.
//   Threads        run() and serve() run on the caller's thread (the control thread);
//                  each group of queues Device::worker_of() names gets a worker thread
//                  while one of its rings runs. stop() may be called from any thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "vhostkit/export.h"
#include "vhostkit/iotlb.h"
#include "vhostkit/translate.h"
#include "vhostkit/types.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/vhost_user/device.h"

namespace vhostkit {

// How the queue workers wait for work.
struct RunnerOptions {
  // Busy-poll the rings instead of sleeping on kicks.
  bool poll = false;
  // Poll mode: sleep after this long without work (0: never sleep).
  std::chrono::microseconds poll_idle{1000};
  // IOMMU on: ask again for a missing translation after this long without an answer.
  std::chrono::milliseconds miss_retry{10};
  // Request every missing page of the waiting chains at once, not one miss per round trip.
  bool miss_lookahead = true;
};

struct BackendOptions {
  std::size_t max_mem_slots = 509;  // VHOST_USER_GET_MAX_MEM_SLOTS
  IotlbLimits iotlb;
  RunnerOptions runner;
  bool offer_gpa_addresses = true;  // VHOST_USER_PROTOCOL_F_GPA_ADDRESSES
  bool offer_packed = true;         // VIRTIO_F_RING_PACKED
  bool offer_iommu = true;          // VIRTIO_F_ACCESS_PLATFORM
  // CHECK_DEVICE_STATE waits this long for a device state transfer the front-end says
  // is done (it read to the end, or closed its end) before failing it.
  std::chrono::milliseconds state_transfer_grace{5000};
};

class VHOSTKIT_API BackendServer {
 public:
  // REQUIRES: device outlives the server.
  explicit BackendServer(Device& device, BackendOptions options = {});
  ~BackendServer();
  BackendServer(const BackendServer&) = delete;
  BackendServer& operator=(const BackendServer&) = delete;

  // Creates a listening socket at path. Refuses (with a message) if another server is
  // listening there; a stale socket file left by a dead server is replaced.
  [[nodiscard]] static Result<UniqueFd, std::string> listen_unix(const std::string& path);

  // Accepts one connection at a time on listen_fd and serves it; returns after stop().
  [[nodiscard]] Result<void, std::string> run(int listen_fd);
  // Serves one connected socket until the peer hangs up or stop() is called.
  void serve(UniqueFd conn);
  // Makes run()/serve() return soon. Safe from any thread and from a signal handler.
  void stop();

  // The virtio features the back-end offers (GET_FEATURES).
  [[nodiscard]] std::uint64_t offered_features() const;
  // The protocol features the back-end offers (GET_PROTOCOL_FEATURES).
  [[nodiscard]] std::uint64_t offered_protocol_features() const;
  // The device's guest memory, IOTLB and dirty log (for tools and tests).
  [[nodiscard]] AddressSpace& space();
  // Messages handled, and messages refused (malformed or failed), since construction.
  [[nodiscard]] std::uint64_t messages_handled() const;
  [[nodiscard]] std::uint64_t messages_rejected() const;

 private:
  class VHOSTKIT_LOCAL Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace vhostkit
