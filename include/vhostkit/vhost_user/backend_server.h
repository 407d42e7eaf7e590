// vhostkit/vhost_user/backend_server.h: the device-agnostic vhost-user back-end.
//
// Concepts
//   BackendServer  serves one Device to one front-end at a time over a Unix stream
//                  socket: it negotiates features, keeps the device's AddressSpace
//                  (memory table, IOTLB, dirty log) and one QueueRunner per virtqueue,
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
//   Hostile input  a malformed message is rejected (REPLY_ACK failure when asked for,
//                  and a log line naming the device and request); framing errors close
//                  the connection. Nothing a front-end sends can crash the process.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "vhostkit/translate.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/vhost_user/device.h"
#include "vhostkit/vhost_user/queue_runner.h"
#include "vhostkit/vhost_user/wire.h"

namespace vhostkit {

struct BackendOptions {
  std::size_t max_mem_slots = 509;
  IotlbLimits iotlb;
  RunnerOptions runner;
  bool offer_gpa_addresses = true;  // VHOST_USER_PROTOCOL_F_GPA_ADDRESSES
  bool offer_packed = true;
  bool offer_iommu = true;
};

class BackendServer {
 public:
  BackendServer(Device& device, BackendOptions options = {});
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
  [[nodiscard]] std::uint64_t offered_protocol_features() const;
  [[nodiscard]] AddressSpace& space() { return *space_; }
  [[nodiscard]] std::uint64_t messages_handled() const { return handled_.load(); }
  [[nodiscard]] std::uint64_t messages_rejected() const { return rejected_.load(); }

 private:
  struct Queue {
    std::unique_ptr<QueueRunner> runner;
    std::uint32_t num = 0;
    std::optional<vhost_user::VringAddr> addr;
    std::uint32_t base = 0;  // SET_VRING_BASE num
    UniqueFd err;
    bool enabled = true;
    bool enable_set = false;  // SET_VRING_ENABLE received since the connection began
  };
  using Reply = Result<std::optional<vhost_user::Message>, std::string>;

  Reply handle(vhost_user::Message& m);
  Reply set_mem_table(vhost_user::Message& m);
  Reply add_mem_reg(vhost_user::Message& m);
  Reply rem_mem_reg(const vhost_user::Message& m);
  Reply set_log_base(vhost_user::Message& m);
  Reply set_features(std::uint64_t features);
  Reply set_vring_kick(vhost_user::Message& m);
  Reply get_vring_base(const vhost_user::Message& m);
  Reply iotlb_msg(const vhost_user::Message& m);
  Result<Queue*, std::string> queue(std::uint32_t index);
  Result<void, std::string> start_ring(std::uint32_t index, UniqueFd kick);
  void send_miss(std::uint32_t queue, const TranslateError& miss);
  void reset_connection();
  void stop_all_rings();
  bool has(unsigned feature) const { return (features_ >> feature) & 1; }
  bool has_protocol(unsigned feature) const { return (protocol_features_ >> feature) & 1; }

  Device& device_;
  BackendOptions options_;
  std::unique_ptr<AddressSpace> space_;
  std::vector<Queue> queues_;
  UniqueFd stop_fd_;  // eventfd
  std::atomic<bool> stopping_{false};
  std::atomic<std::uint64_t> handled_{0};
  std::atomic<std::uint64_t> rejected_{0};

  // Connection state (control thread only).
  bool owner_ = false;
  std::uint64_t features_ = 0;
  bool features_set_ = false;
  std::uint64_t protocol_features_ = 0;
  std::uint8_t status_ = 0;
  std::mutex backend_mu_;  // guards backend_fd_ (workers send IOTLB misses on it)
  UniqueFd backend_fd_;
};

}  // namespace vhostkit
