// vhostkit/vhost_user/queue_runner.h: one virtqueue, and the worker threads that serve
// virtqueues. Internal to the back-end server (not installed); RunnerOptions, the knobs a
// user sets, live in backend_server.h.
//
// Concepts
//   QueueRunner  owns a Virtqueue; while the ring is started, a QueueWorker calls
//                Device::process() whenever the queue may have work. The control
//                thread starts it (SET_VRING_KICK / first kick) and stops it
//                (GET_VRING_BASE): stop() waits until the worker has left the queue's
//                burst and let go of the queue, then returns the ring state, so the
//                state is taken at a quiescent point after the last logged write.
//   QueueWorker  one thread serving one or more started QueueRunners in turn (the
//                queues Device::worker_of() maps to it). It sleeps only when every queue
//                it serves may sleep, on all their kick and event fds at once; while any
//                of them has work it looks at each of them every round. The thread runs
//                while it serves at least one queue.
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
//   Recovery     a ring that starts on a crashed predecessor's inflight records notifies
//                the driver once (now, or when its call fd arrives): the predecessor may
//                have died between publishing completions and signalling them.
//   Disabled     a started ring that is disabled (SET_VRING_ENABLE 0) is not
//                processed; it keeps its buffers until enabled or stopped.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "vhostkit/translate.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/vhost_user/backend_server.h"
#include "vhostkit/vhost_user/device.h"
#include "vhostkit/virtqueue.h"

namespace vhostkit {

class QueueWorker;

class QueueRunner {
 public:
  using MissSink = std::function<void(std::uint32_t queue, const TranslateError& miss)>;
  using ErrorSink = std::function<void(std::uint32_t queue, const VirtqueueError& error)>;

  // worker: the thread that will serve this queue (shared with other runners, or not).
  QueueRunner(std::uint32_t index, AddressSpace& space, Device& device, RunnerOptions options,
              MissSink on_miss, ErrorSink on_error, std::shared_ptr<QueueWorker> worker);
  ~QueueRunner();
  QueueRunner(const QueueRunner&) = delete;
  QueueRunner& operator=(const QueueRunner&) = delete;

  // Starts the ring and its worker. kick may be invalid (poll the ring).
  [[nodiscard]] Result<void, VirtqueueError> start(const QueueConfig& config,
                                                   const RingState& state, bool used_from_ring,
                                                   UniqueFd kick);
  // Stops the worker at a quiescent point and returns the ring state.
  RingState stop();
  [[nodiscard]] bool running() const { return running_; }

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
  friend class QueueWorker;
  using Clock = std::chrono::steady_clock;
  // What one look at the queue found; the worker decides from all its queues' steps
  // whether to go round at once, spin, or sleep.
  enum class Step {
    busy,         // made progress: look again at once
    spin,         // poll mode, idle for less than poll_idle: look again soon
    sleep_kick,   // kicks enabled, nothing to do: may sleep on the kick fd
    sleep_event,  // blocked on the device's event fd
    wait_miss,    // waiting for an IOTLB update (wake) or until retry_at_
    parked,       // disabled or broken: nothing until wake()
  };
  // One burst and what follows it (worker thread only).
  Step step(Clock::time_point now);
  // Virtqueue::set_kick_enabled() in a burst of its own.
  Result<bool, VirtqueueError> kick_enabled(bool enabled);
  void notify();

  std::uint32_t index_;
  Device& device_;
  RunnerOptions options_;
  MissSink on_miss_;
  ErrorSink on_error_;
  std::shared_ptr<QueueWorker> worker_;
  Virtqueue vq_;
  UniqueFd kick_;
  int event_ = -1;        // Device::event_fd(index_), not owned
  bool running_ = false;  // control thread
  std::mutex call_mu_;    // guards call_ and notify_on_call_
  UniqueFd call_;
  // The ring took over a crashed predecessor's records: the driver may not have been
  // told of completions it published, so it is notified as soon as there is a call fd.
  bool notify_on_call_ = false;
  std::atomic<bool> enabled_{true};
  std::atomic<std::uint64_t> notifications_{0};
  // Worker thread only, reset by start():
  std::vector<TranslateError> misses_;
  bool poll_mode_ = false;
  bool may_sleep_ = false;
  bool kicks_enabled_ = false;  // we asked for kicks and consumed nothing since
  bool idle_ = false;
  Clock::time_point idle_since_{};
  Clock::time_point retry_at_{};
  Step last_ = Step::busy;
};

class QueueWorker {
 public:
  QueueWorker();
  ~QueueWorker();
  QueueWorker(const QueueWorker&) = delete;
  QueueWorker& operator=(const QueueWorker&) = delete;

  // Control thread: serve q from now on (starts the thread if it is not running).
  void add(QueueRunner* q);
  // Control thread: stop serving q; returns once the worker is outside q's burst and
  // will not touch q again (joins the thread if q was its last queue).
  void remove(QueueRunner* q);
  // Any thread: make the worker look at all its queues again now.
  void wake();
  // The thread serving the queues (default-constructed while not running).
  [[nodiscard]] std::thread::id thread_id() const;

 private:
  void run();

  UniqueFd wake_;  // eventfd: wake(), add() and remove() write it
  std::atomic<bool> woken_{false};
  std::atomic<bool> changes_{false};  // to_add_ or to_remove_ not empty
  mutable std::mutex mu_;             // guards the fields below and thread_
  std::condition_variable cv_;
  std::vector<QueueRunner*> to_add_;
  std::vector<QueueRunner*> to_remove_;
  std::uint64_t remove_requests_ = 0;
  std::uint64_t removes_done_ = 0;
  bool exiting_ = false;  // the thread found no queue left and ends
  std::thread thread_;
  std::vector<QueueRunner*> queues_;  // worker thread only
};

}  // namespace vhostkit
