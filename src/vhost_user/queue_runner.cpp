// QueueRunner: the worker thread of one virtqueue.
#include "vhostkit/vhost_user/queue_runner.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "vhostkit/log.h"

namespace vhostkit {

namespace {
void drain(int fd) {
  std::uint64_t v;
  while (::read(fd, &v, sizeof v) == sizeof v) {
  }
}
}  // namespace

QueueRunner::QueueRunner(std::uint32_t index, AddressSpace& space, Device& device,
                         RunnerOptions options, MissSink on_miss, ErrorSink on_error)
    : index_(index),
      device_(device),
      options_(options),
      on_miss_(std::move(on_miss)),
      on_error_(std::move(on_error)),
      vq_(space),
      wake_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {}

QueueRunner::~QueueRunner() {
  (void)stop();
}

Result<void, VirtqueueError> QueueRunner::start(const QueueConfig& config, const RingState& state,
                                                bool used_from_ring, UniqueFd kick) {
  (void)stop();
  if (auto r = vq_.start(config, state, used_from_ring); !r) return r;
  kick_ = std::move(kick);
  if (kick_.valid()) {
    int flags = ::fcntl(kick_.get(), F_GETFL);
    if (flags >= 0) (void)::fcntl(kick_.get(), F_SETFL, flags | O_NONBLOCK);
  }
  stop_.store(false, std::memory_order_relaxed);
  drain(wake_.get());
  device_.queue_started(index_);
  event_ = device_.event_fd(index_);
  worker_ = std::thread([this] { run(); });
  return {};
}

RingState QueueRunner::stop() {
  if (!worker_.joinable()) return vq_.state();
  stop_.store(true, std::memory_order_release);
  wake();
  worker_.join();
  device_.queue_stopped(index_);
  kick_.reset();
  return vq_.stop();
}

void QueueRunner::set_call(UniqueFd call) {
  std::lock_guard lock(call_mu_);
  call_ = std::move(call);
}

void QueueRunner::set_enabled(bool enabled) {
  enabled_.store(enabled, std::memory_order_relaxed);
  wake();
}

void QueueRunner::wake() {
  std::uint64_t one = 1;
  (void)!::write(wake_.get(), &one, sizeof one);
}

void QueueRunner::notify() {
  std::lock_guard lock(call_mu_);
  if (!call_.valid()) return;
  std::uint64_t one = 1;
  if (::write(call_.get(), &one, sizeof one) == sizeof one)
    notifications_.fetch_add(1, std::memory_order_relaxed);
}

void QueueRunner::wait(bool for_kick, std::chrono::milliseconds timeout, bool for_event) {
  pollfd fds[3] = {{wake_.get(), POLLIN, 0}, {-1, POLLIN, 0}, {-1, POLLIN, 0}};
  if (for_kick && kick_.valid()) fds[1].fd = kick_.get();
  if (for_event && event_ >= 0) fds[2].fd = event_;  // the device drains it
  int ms = timeout.count() < 0 ? -1 : static_cast<int>(timeout.count());
  int r = ::poll(fds, 3, ms);
  if (r > 0) {
    if (fds[0].revents & POLLIN) drain(wake_.get());
    if (fds[1].revents & POLLIN) drain(kick_.get());
  }
}

void QueueRunner::run() {
  bool poll_mode = options_.poll || !kick_.valid();
  bool may_sleep = !poll_mode || (kick_.valid() && options_.poll_idle.count() > 0);
  bool kicks_enabled = true;  // the ring starts with kicks requested
  using Clock = std::chrono::steady_clock;
  Clock::time_point idle_since{};
  bool idle = false;
  while (!stop_.load(std::memory_order_acquire)) {
    if (!enabled_.load(std::memory_order_relaxed) || vq_.broken()) {
      wait(false, std::chrono::milliseconds(-1));
      continue;
    }
    vq_.begin_burst();
    QueueWork w = device_.process(index_, vq_);
    if (auto r = vq_.end_burst(); !r)
      log(LogLevel::warn, "{} queue {}: {}", device_.name(), index_, r.error().message());
    if (w.notify) notify();
    if (w.error) {
      if (on_error_) on_error_(index_, *w.error);
      continue;  // broken: the loop above sleeps until stopped
    }
    if (w.deferred) {
      // Request every missing page of every waiting chain in one burst, not one round
      // trip per chain.
      misses_.clear();
      if (w.deferred->report_miss) {
        misses_.push_back(*w.deferred);
        // Look ahead only when this miss is new: on a retry the pages ahead were
        // requested already, and walking the ring again would only burn CPU.
        if (options_.miss_lookahead) (void)vq_.collect_misses(misses_, 256);
      }
      if (on_miss_)
        for (const auto& m : misses_) on_miss_(index_, m);
      wait(false, options_.miss_retry);
      continue;
    }
    if (w.progress) {
      idle = false;
      if (kicks_enabled) {
        // While there is work, the driver need not kick us.
        (void)vq_.set_kick_enabled(false);
        kicks_enabled = false;
      }
      continue;
    }
    if (poll_mode) {
      Clock::time_point now = Clock::now();
      if (!idle) {
        idle = true;
        idle_since = now;
      }
      if (!may_sleep || now - idle_since < options_.poll_idle) {
        std::this_thread::yield();
        continue;
      }
    }
    idle = false;
    if (w.blocked && event_ >= 0) {
      // Waiting for the device's own event (its input), not for the ring.
      wait(false, std::chrono::milliseconds(-1), true);
      continue;
    }
    // Idle: ask for kicks, then re-check so a buffer added meanwhile is not missed.
    auto more = vq_.set_kick_enabled(true);
    if (!more) {
      // The ring itself is not translatable (an IOTLB invalidation took it): kicks are
      // not enabled, so sleeping on the kick fd would sleep forever. Go round again:
      // pop() reports the ring's miss and the worker waits for its answer.
      kicks_enabled = false;
      wait(false, options_.miss_retry);
      continue;
    }
    kicks_enabled = true;
    if (*more) continue;
    wait(true, std::chrono::milliseconds(-1));
  }
}

}  // namespace vhostkit
