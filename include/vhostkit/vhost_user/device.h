// vhostkit/vhost_user/device.h: what a device plugs into the backend server.
//
// Concepts
//   Device      a virtio device implementation (net, blk, test devices). The server
//               owns the protocol; the device supplies its feature bits, its number of
//               queues, its config space, and the work done on a queue. Everything a
//               device touches in guest memory goes through the Virtqueue it is handed,
//               so translation and dirty logging are never the device's business.
//   process()   called on the queue's worker thread whenever the queue may have work
//               (after a kick, or continuously in poll mode). It pops, does its work and
//               pushes; it reports whether it made progress and whether the driver must
//               be notified. It must not block for long: the server's control thread
//               waits for it at a quiescent point (GET_VRING_BASE, memory changes).
//               It must push every chain it pops within the same call.
//   Workers     queues that worker_of() maps to the same number share one worker thread,
//               which serves them in turn (a net device's receive and transmit queue of
//               one pair); by default every queue has a worker of its own.
//   Events      a device fed from outside the ring (a tap, another queue, a clock)
//               reports QueueWork::blocked and offers event_fd(); the worker then
//               sleeps on that fd instead of the ring's kick.
//   State       what the device keeps beyond the protocol's own state (a MAC a driver
//               set, counters, completions not yet pushed) travels in a live migration
//               through save_state() / load_state() (VHOST_USER_PROTOCOL_F_DEVICE_STATE,
//               vhostkit/vhost_user/device_state.h). Both run on the control thread while
//               every ring is stopped. A device that keeps nothing needs neither: by
//               default it saves no records under the kind "stateless".
//   Inflight    a device that returns true from inflight_tracking() is offered with
//               VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: the server keeps, in memory the
//               front-end holds across back-end restarts, which chains each split ring
//               popped and has not completed, and a back-end that starts after a crash
//               pops those chains again first, in their original order (see Inflight in
//               vhostkit/virtqueue.h). The device must tolerate a request it may already
//               have carried out (a block write is written again).
//   Reset       RESET_DEVICE, SET_STATUS(0) and a disconnect stop every ring, then call
//               reset(): the device returns to its state right after construction (the
//               configuration it was created with), except for statistics, which may
//               keep counting.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "vhostkit/export.h"
#include "vhostkit/translate.h"
#include "vhostkit/vhost_user/device_state.h"
#include "vhostkit/virtqueue.h"

namespace vhostkit {

struct QueueWork {
  bool progress = false;                   // popped or pushed anything
  bool notify = false;                     // signal the queue's call eventfd
  std::optional<TranslateError> deferred;  // stopped at an IOTLB miss (IOMMU on)
  std::optional<VirtqueueError> error;     // the queue broke
  // Nothing can be done until the device's event_fd(queue) becomes readable (a tap with
  // no packet to read, a full loopback, a rate limit): the worker sleeps on that fd
  // rather than on the ring.
  bool blocked = false;
};

class VHOSTKIT_API Device {
 public:
  virtual ~Device() = default;

  // A short name for log lines ("net0", "blk0").
  [[nodiscard]] virtual std::string name() const = 0;
  // Device-type feature bits offered, without ring or transport bits (the server adds
  // VERSION_1, ACCESS_PLATFORM, RING_PACKED, EVENT_IDX, INDIRECT_DESC, LOG_ALL, ...).
  [[nodiscard]] virtual std::uint64_t device_features() const = 0;
  // For load_state(): the device-type bits (0-23) of the features a driver accepted that
  // this device does not offer (the transport bits are the server's); 0 if none.
  [[nodiscard]] std::uint64_t unoffered_device_bits(std::uint64_t accepted) const {
    return accepted & ((std::uint64_t{1} << 24) - 1) & ~device_features();
  }
  // Number of virtqueues (VHOST_USER_GET_QUEUE_NUM).
  [[nodiscard]] virtual std::uint32_t num_queues() const = 0;
  // Whether the server offers inflight I/O tracking for this device (see Inflight).
  [[nodiscard]] virtual bool inflight_tracking() const { return false; }
  // The device config space (GET_CONFIG); empty if the device has none.
  [[nodiscard]] virtual std::vector<std::uint8_t> config() const { return {}; }
  // SET_CONFIG: a write to the config space. False if refused.
  [[nodiscard]] virtual bool set_config(std::uint32_t /*offset*/,
                                        std::span<const std::uint8_t> /*data*/) {
    return false;
  }
  // The features the driver accepted (SET_FEATURES), before any queue starts.
  virtual void set_features(std::uint64_t /*features*/) {}
  // The worker thread that serves the queue: queues with the same number share one.
  // Must not change while the device lives.
  [[nodiscard]] virtual std::uint32_t worker_of(std::uint32_t queue) const { return queue; }
  // Does the queue's work. Runs on the queue's worker thread.
  virtual QueueWork process(std::uint32_t queue, Virtqueue& vq) = 0;
  // An fd that becomes readable when a blocked queue (QueueWork::blocked) may proceed;
  // -1 if the device never blocks on anything but its ring. Level-triggered: the
  // device drains it in process(). Asked once each time the queue starts.
  [[nodiscard]] virtual int event_fd(std::uint32_t /*queue*/) const { return -1; }
  // A queue started (on the control thread, before its worker runs).
  virtual void queue_started(std::uint32_t /*queue*/) {}
  // A queue stopped; its worker has finished (on the control thread).
  virtual void queue_stopped(std::uint32_t /*queue*/) {}
  // RESET_DEVICE, SET_STATUS(0), disconnect: every ring is stopped; forget what the
  // driver set up and what is pending (see Reset above). Control thread.
  virtual void reset() {}

  // The kind and version of the state save_state() writes. A state is loaded only into a
  // device of the same kind whose version is at least the state's.
  [[nodiscard]] virtual DeviceStateFormat state_format() const { return {"stateless", 0}; }
  // Writes the device's state as records. Control thread, every ring stopped.
  virtual void save_state(DeviceStateWriter& /*out*/) const {}
  // Replaces the device's state by one save_state() wrote (same kind, `version` no newer
  // than state_format().version). All or nothing: on error the device is unchanged and
  // the reason says what was refused. Control thread, every ring stopped.
  [[nodiscard]] virtual Result<void, std::string> load_state(const DeviceStateReader& /*in*/,
                                                             std::uint32_t /*version*/) {
    return {};
  }
};

}  // namespace vhostkit
