// vhostkit/vhost_user/queue_runner.h: one virtqueue and the worker thread that serves it.
//
// Concepts
//   QueueRunner  owns a Virtqueue and, while the ring is started, a worker thread that
//                calls Device::process() whenever the queue may have work. The control
//                thread starts it (SET_VRING_KICK / first kick) and stops it
//                (GET_VRING_BASE): stop() waits until the worker has left its burst and
//                exited, then returns the ring state, so the state is taken at a
//                quiescent point after the last logged write.
//   Modes        sleep mode: when there is no work the worker asks the driver for kicks
//                (re-checking the ring after asking, so no buffer is missed) and sleeps
//                on the kick eventfd. Poll mode: the worker never sleeps (benchmarks,
//                and rings whose kick fd was sent with the NOFD flag). With poll_idle
//                non-zero a polling worker that found no work for that long sleeps
//                as in sleep mode until work arrives, so an idle queue (the receive
//                queue of a transmit-only flow) does not occupy a core.
//   Events       a device blocked on something other than its ring (QueueWork::blocked)
//                is woken by its Device::event_fd() instead of the kick.
//   Misses       when the device stops at an IOTLB miss, the runner passes the miss to
//                the miss sink (the backend request channel) the first time it is seen,
//                then waits for wake() (called when an IOTLB update arrives) or a short
//                retry timeout.
//   Disabled     a started ring that is disabled (SET_VRING_ENABLE 0) is not
//                processed; it keeps its buffers until enabled or stopped.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "vhostkit/translate.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/vhost_user/device.h"
#include "vhostkit/virtqueue.h"

namespace vhostkit {

struct RunnerOptions {
  bool poll = false;
  // Poll mode: sleep after this long without work (0: never sleep).
  std::chrono::microseconds poll_idle{1000};
  std::chrono::milliseconds miss_retry{10};
  bool miss_lookahead = true;  // request every missing page of the waiting chains at once
};

class QueueRunner {
 public:
  using MissSink = std::function<void(std::uint32_t queue, const TranslateError& miss)>;
  using ErrorSink = std::function<void(std::uint32_t queue, const VirtqueueError& error)>;

  QueueRunner(std::uint32_t index, AddressSpace& space, Device& device, RunnerOptions options,
              MissSink on_miss, ErrorSink on_error);
  ~QueueRunner();
  QueueRunner(const QueueRunner&) = delete;
  QueueRunner& operator=(const QueueRunner&) = delete;

  // Starts the ring and its worker. kick may be invalid (poll the ring).
  [[nodiscard]] Result<void, VirtqueueError> start(const QueueConfig& config,
                                                   const RingState& state, bool used_from_ring,
                                                   UniqueFd kick);
  // Stops the worker at a quiescent point and returns the ring state.
  RingState stop();
  [[nodiscard]] bool running() const { return worker_.joinable(); }

  // Replaces the call eventfd (SET_VRING_CALL; may arrive while running).
  void set_call(UniqueFd call);
  void set_enabled(bool enabled);
  [[nodiscard]] bool enabled() const { return enabled_.load(std::memory_order_relaxed); }
  // Makes the worker look at the ring again now (IOTLB update, enable).
  void wake();

  [[nodiscard]] std::uint32_t index() const { return index_; }
  [[nodiscard]] Virtqueue& queue() { return vq_; }
  // Notifications sent to the driver (call eventfd writes).
  [[nodiscard]] std::uint64_t notifications() const {
    return notifications_.load(std::memory_order_relaxed);
  }

 private:
  void run();
  void notify();
  void wait(bool for_kick, std::chrono::milliseconds timeout, bool for_event = false);

  std::uint32_t index_;
  Device& device_;
  RunnerOptions options_;
  MissSink on_miss_;
  ErrorSink on_error_;
  Virtqueue vq_;
  UniqueFd kick_;
  int event_ = -1;      // Device::event_fd(index_), not owned
  UniqueFd wake_;       // eventfd: stop() and wake() write it
  std::mutex call_mu_;  // guards call_
  UniqueFd call_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> enabled_{true};
  std::atomic<std::uint64_t> notifications_{0};
  std::vector<TranslateError> misses_;  // worker only
  std::thread worker_;
};

}  // namespace vhostkit
