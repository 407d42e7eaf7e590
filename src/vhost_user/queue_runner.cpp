// QueueRunner: one virtqueue's bursts; QueueWorker: the thread that serves runners.
#include "vhostkit/vhost_user/queue_runner.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>

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
                         RunnerOptions options, MissSink on_miss, ErrorSink on_error,
                         std::shared_ptr<QueueWorker> worker)
    : index_(index),
      device_(device),
      options_(options),
      on_miss_(std::move(on_miss)),
      on_error_(std::move(on_error)),
      worker_(std::move(worker)),
      vq_(space) {}

QueueRunner::~QueueRunner() {
  (void)stop();
}

Result<void, VirtqueueError> QueueRunner::start(const QueueConfig& config, const RingState& state,
                                                bool used_from_ring, UniqueFd kick) {
  (void)stop();
  if (auto r = vq_.start(config, state, used_from_ring); !r) return r;
  // Read before the worker owns the queue (it pops the resubmitted chains).
  if (std::size_t n = vq_.resubmit_pending(); n > 0)
    log(LogLevel::info, "{} queue {}: resubmits {} requests a previous back-end left in flight",
        device_.name(), index_, n);
  kick_ = std::move(kick);
  if (kick_.valid()) {
    int flags = ::fcntl(kick_.get(), F_GETFL);
    if (flags >= 0) (void)::fcntl(kick_.get(), F_SETFL, flags | O_NONBLOCK);
  }
  poll_mode_ = options_.poll || !kick_.valid();
  may_sleep_ = !poll_mode_ || (kick_.valid() && options_.poll_idle.count() > 0);
  kicks_enabled_ = false;  // unknown: the ring may come from another back-end (migration)
  idle_ = false;
  last_ = Step::busy;
  device_.queue_started(index_);
  event_ = device_.event_fd(index_);
  running_ = true;
  if (vq_.recovered()) {
    {
      std::lock_guard lock(call_mu_);
      notify_on_call_ = true;
    }
    notify();
  }
  worker_->add(this);
  return {};
}

RingState QueueRunner::stop() {
  if (!running_) return vq_.state();
  worker_->remove(this);
  running_ = false;
  device_.queue_stopped(index_);
  kick_.reset();
  return vq_.stop();
}

void QueueRunner::set_call(UniqueFd call) {
  bool pending;
  {
    std::lock_guard lock(call_mu_);
    call_ = std::move(call);
    pending = notify_on_call_;
  }
  if (pending) notify();
}

void QueueRunner::set_enabled(bool enabled) {
  enabled_.store(enabled, std::memory_order_relaxed);
  wake();
}

void QueueRunner::wake() {
  worker_->wake();
}

void QueueRunner::notify() {
  std::lock_guard lock(call_mu_);
  if (!call_.valid()) return;
  notify_on_call_ = false;
  std::uint64_t one = 1;
  if (::write(call_.get(), &one, sizeof one) == sizeof one)
    notifications_.fetch_add(1, std::memory_order_relaxed);
}

Result<bool, VirtqueueError> QueueRunner::kick_enabled(bool enabled) {
  // A ring write like any other: inside a burst, so that a memory-table change or an
  // invalidation waits for it (AddressSpace::synchronize()).
  vq_.begin_burst();
  auto more = vq_.set_kick_enabled(enabled);
  if (auto r = vq_.end_burst(); !r)
    log(LogLevel::warn, "{} queue {}: {}", device_.name(), index_, r.error().message());
  return more;
}

QueueRunner::Step QueueRunner::step(Clock::time_point now) {
  if (!enabled_.load(std::memory_order_relaxed) || vq_.broken()) return Step::parked;
  vq_.begin_burst();
  QueueWork w = device_.process(index_, vq_);
  if (w.deferred && w.deferred->report_miss) {
    // Request every missing page of every waiting chain in one burst, not one round trip
    // per chain. Look ahead only when this miss is new: on a retry the pages ahead were
    // requested already, and walking the ring again would only burn CPU. Inside the
    // burst: the look-ahead reads the ring through the burst's translation state.
    misses_.clear();
    misses_.push_back(*w.deferred);
    if (options_.miss_lookahead) (void)vq_.collect_misses(misses_, 256);
  }
  if (auto r = vq_.end_burst(); !r)
    log(LogLevel::warn, "{} queue {}: {}", device_.name(), index_, r.error().message());
  if (w.notify) notify();
  if (w.error) {
    if (on_error_) on_error_(index_, *w.error);
    return Step::parked;  // broken: nothing more until stopped
  }
  if (w.deferred) {
    if (w.deferred->report_miss && on_miss_)
      for (const auto& m : misses_) on_miss_(index_, m);
    retry_at_ = now + options_.miss_retry;
    return Step::wait_miss;
  }
  if (w.progress) {
    idle_ = false;
    if (kicks_enabled_) {
      // While there is work, the driver need not kick us.
      (void)kick_enabled(false);
      kicks_enabled_ = false;
    }
    return Step::busy;
  }
  if (poll_mode_) {
    if (!idle_) {
      idle_ = true;
      idle_since_ = now;
    }
    if (!may_sleep_ || now - idle_since_ < options_.poll_idle) return Step::spin;
    // Idle long enough: sleep, and stay asleep through wake-ups that bring no work
    // (idle_ stays set until progress), so that every queue of the worker gets there.
  }
  // Waiting for the device's own event (its input), not for the ring.
  if (w.blocked && event_ >= 0) return Step::sleep_event;
  if (!kicks_enabled_) {
    // Idle: ask for kicks, then re-check so a buffer added meanwhile is not missed.
    // (With kicks already on and nothing consumed since, the request stands.)
    auto more = kick_enabled(true);
    if (!more) {
      // The ring itself is not translatable (an IOTLB invalidation took it): kicks are
      // not enabled, so sleeping on the kick fd would sleep forever. Go round after the
      // retry wait: pop() reports the ring's miss and the worker waits for its answer.
      retry_at_ = now + options_.miss_retry;
      return Step::wait_miss;
    }
    kicks_enabled_ = true;
    if (*more) return Step::busy;
  }
  return Step::sleep_kick;
}

QueueWorker::QueueWorker() : wake_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {}

QueueWorker::~QueueWorker() {
  std::unique_lock lock(mu_);
  if (thread_.joinable()) {
    // Runners remove themselves before they go; a thread still here serves nobody
    // who is still alive. Ask it to end.
    to_remove_.assign(queues_.begin(), queues_.end());
    changes_.store(true, std::memory_order_release);
    ++remove_requests_;
    lock.unlock();
    wake();
    thread_.join();
  }
}

void QueueWorker::add(QueueRunner* q) {
  std::lock_guard lock(mu_);
  to_add_.push_back(q);
  changes_.store(true, std::memory_order_release);
  if (!thread_.joinable()) {
    exiting_ = false;
    thread_ = std::thread([this] { run(); });
  } else {
    wake();
  }
}

void QueueWorker::remove(QueueRunner* q) {
  std::unique_lock lock(mu_);
  if (!thread_.joinable()) return;
  auto pending = std::find(to_add_.begin(), to_add_.end(), q);
  if (pending != to_add_.end()) to_add_.erase(pending);
  to_remove_.push_back(q);
  changes_.store(true, std::memory_order_release);
  const std::uint64_t ticket = ++remove_requests_;
  wake();
  cv_.wait(lock, [&] { return removes_done_ >= ticket; });
  if (exiting_) {
    std::thread t = std::move(thread_);
    lock.unlock();
    t.join();
  }
}

void QueueWorker::wake() {
  woken_.store(true, std::memory_order_release);
  std::uint64_t one = 1;
  (void)!::write(wake_.get(), &one, sizeof one);
}

std::thread::id QueueWorker::thread_id() const {
  std::lock_guard lock(mu_);
  return thread_.get_id();
}

void QueueWorker::run() {
  using Step = QueueRunner::Step;
  using Clock = QueueRunner::Clock;
  std::vector<pollfd> fds;
  for (;;) {
    // Drain before taking the flag, and both before looking for queue changes: a wake()
    // after the drain leaves its write in the fd for the next poll, and a change is
    // queued before its wake(); none is lost. No syscall unless there was a wake.
    bool woken = false;
    if (woken_.load(std::memory_order_relaxed)) {
      drain(wake_.get());
      woken = woken_.exchange(false, std::memory_order_acquire);
    }
    if (changes_.load(std::memory_order_acquire)) {
      // Between bursts: take and let go of queues, and acknowledge removals.
      std::lock_guard lock(mu_);
      changes_.store(false, std::memory_order_relaxed);
      for (QueueRunner* q : to_add_) queues_.push_back(q);
      to_add_.clear();
      for (QueueRunner* q : to_remove_)
        queues_.erase(std::remove(queues_.begin(), queues_.end(), q), queues_.end());
      to_remove_.clear();
      if (removes_done_ != remove_requests_) {
        removes_done_ = remove_requests_;
        cv_.notify_all();
      }
      if (queues_.empty()) {
        exiting_ = true;
        return;
      }
    }
    Clock::time_point now = Clock::now();
    bool busy = false;
    bool spin = false;
    for (QueueRunner* q : queues_) {
      // A queue waiting for an IOTLB update or parked is looked at again only after a
      // wake() (an update arrived, the ring was enabled) or its retry time.
      if ((q->last_ == Step::wait_miss && !woken && now < q->retry_at_) ||
          (q->last_ == Step::parked && !woken))
        continue;
      q->last_ = q->step(now);
      busy |= q->last_ == Step::busy;
      spin |= q->last_ == Step::spin;
    }
    if (busy) continue;
    if (spin) {
      std::this_thread::yield();
      continue;
    }
    // Every queue may sleep: on the wake fd, the kicks of those waiting for the driver,
    // the event fds of those waiting for their device, until the earliest retry.
    fds.clear();
    fds.push_back({wake_.get(), POLLIN, 0});
    int timeout_ms = -1;
    for (QueueRunner* q : queues_) {
      switch (q->last_) {
        case Step::sleep_kick:
          if (q->kick_.valid()) fds.push_back({q->kick_.get(), POLLIN, 0});
          break;
        case Step::sleep_event: fds.push_back({q->event_, POLLIN, 0}); break;
        case Step::wait_miss: {
          auto left = std::chrono::ceil<std::chrono::milliseconds>(q->retry_at_ - now).count();
          int ms = static_cast<int>(std::clamp<long long>(left, 0, 60000));
          timeout_ms = timeout_ms < 0 ? ms : std::min(timeout_ms, ms);
          break;
        }
        default: break;
      }
    }
    if (::poll(fds.data(), fds.size(), timeout_ms) > 0) {
      // Kicks are drained here; event fds by their device; the wake fd at the top.
      for (std::size_t i = 1; i < fds.size(); ++i)
        if ((fds[i].revents & POLLIN) != 0) {
          for (QueueRunner* q : queues_)
            if (q->last_ == Step::sleep_kick && q->kick_.get() == fds[i].fd) drain(fds[i].fd);
        }
    }
  }
}

}  // namespace vhostkit
