// Worker threads shared by queues (Device::worker_of): which thread serves which queue,
// stopping one queue of a worker while the other runs, waking for either queue, and the
// poll-mode idle sleep. Our front-end against our back-end over a socketpair.
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "support/echo_device.h"
#include "vhostkit/frontend/frontend_client.h"
#include "vhostkit/vhost_user/backend_server.h"

namespace vhostkit {
namespace {

using namespace frontend;
using namespace std::chrono_literals;

// EchoDevice whose queues q share a worker with the other queues of q / per_worker, and
// which records the threads that ran each queue and how often process() ran.
class GroupedEcho : public testing::EchoDevice {
 public:
  GroupedEcho(std::uint32_t queues, std::uint32_t per_worker)
      : EchoDevice(queues), per_worker_(per_worker), calls_(queues) {}
  std::uint32_t worker_of(std::uint32_t q) const override { return q / per_worker_; }
  QueueWork process(std::uint32_t q, Virtqueue& vq) override {
    calls_[q].fetch_add(1, std::memory_order_relaxed);
    {
      std::lock_guard lock(mu_);
      threads_[q].insert(std::this_thread::get_id());
    }
    return EchoDevice::process(q, vq);
  }
  std::set<std::thread::id> threads(std::uint32_t q) {
    std::lock_guard lock(mu_);
    return threads_[q];
  }
  std::uint64_t calls(std::uint32_t q) const { return calls_[q].load(); }

 private:
  std::uint32_t per_worker_;
  std::vector<std::atomic<std::uint64_t>> calls_;
  std::mutex mu_;
  std::map<std::uint32_t, std::set<std::thread::id>> threads_;
};

constexpr std::uint64_t kBase = 0x100000, kSize = 0x800000;

struct Rig {
  GroupedEcho device;
  BackendServer server;
  std::thread server_thread;
  std::unique_ptr<FrontendClient> client;
  GuestMemory mem = std::move(*GuestMemory::create({{Gpa(kBase), kSize}}));
  std::vector<std::optional<VirtioDriver>> drv;
  std::vector<RingNotifiers> n;
  std::vector<Gpa> area;  // per queue: 64 out/in page pairs
  bool event_idx = true;
  // Before a queue starts: what to leave in its rings (a ring handed over by another
  // back-end, as after a migration).
  std::function<void(std::uint32_t q, VirtioDriver& d)> before_start;

  Rig(std::uint32_t queues, std::uint32_t per_worker, RunnerOptions runner)
      : device(queues, per_worker), server(device, options(runner)), drv(queues), n(queues) {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    server_thread = std::thread([this, fd = sv[0]] { server.serve(UniqueFd(fd)); });
    client = FrontendClient::adopt(UniqueFd(sv[1]));
  }
  static BackendOptions options(RunnerOptions runner) {
    BackendOptions o;
    o.runner = runner;
    return o;
  }
  ~Rig() {
    client->close();
    server.stop();
    server_thread.join();
  }
  void bring_up() {
    ClientOptions co;
    co.want_features = event_idx ? virtio::bit(virtio::kFRingEventIdx) : 0;
    ASSERT_TRUE(client->negotiate(co).has_value());
    ASSERT_TRUE(client->set_mem_table(mem).has_value());
    for (std::uint32_t q = 0; q < drv.size(); ++q) {
      DriverOptions d;
      d.size = 64;
      d.event_idx = event_idx;
      auto created = VirtioDriver::create(mem, d);
      ASSERT_TRUE(created.has_value());
      drv[q].emplace(std::move(*created));
      area.push_back(*mem.alloc(64 * 0x2000, 0x1000));
      if (before_start) before_start(q, *drv[q]);
      start(q);
    }
  }
  void start(std::uint32_t q) {
    auto r = client->start_queue(q, mem, *drv[q]);
    ASSERT_TRUE(r.has_value()) << r.error();
    n[q] = std::move(*r);
  }
  // `count` echo chains on queue q; waits for every echo and checks it.
  void traffic(std::uint32_t q, int count) {
    VirtioDriver& d = *drv[q];
    int sent = 0, got = 0;
    std::map<std::uint16_t, int> ids;
    auto deadline = std::chrono::steady_clock::now() + 10s;
    while (got < count) {
      ASSERT_LT(std::chrono::steady_clock::now(), deadline)
          << "queue " << q << ": sent " << sent << " got " << got;
      while (sent < count && d.free_descriptors() >= 2) {
        std::uint64_t slot = static_cast<std::uint64_t>(sent % 64);
        Gpa out = area[q] + slot * 0x2000;
        std::string payload = fmt::format("queue {} chain {}", q, sent);
        ASSERT_TRUE(mem.write(
            out, std::span(reinterpret_cast<const std::uint8_t*>(payload.data()), payload.size())));
        std::vector<DriverBuffer> bufs{{out, static_cast<std::uint32_t>(payload.size()), false},
                                       {out + 0x1000, 256, true}};
        auto id = d.add(bufs);
        ASSERT_TRUE(id.has_value()) << id.error();
        ids[*id] = sent++;
      }
      if (d.kick_needed()) {
        std::uint64_t one = 1;
        ASSERT_EQ(::write(n[q].kick.get(), &one, 8), 8);
      }
      while (auto u = d.poll()) {
        int which = ids.at(u->id);
        std::string expect = fmt::format("queue {} chain {}", q, which);
        ASSERT_EQ(u->len, expect.size());
        std::string echoed(expect.size(), '\0');
        Gpa in = area[q] + static_cast<std::uint64_t>(which % 64) * 0x2000 + 0x1000;
        ASSERT_TRUE(
            mem.read(in, std::span(reinterpret_cast<std::uint8_t*>(echoed.data()), echoed.size())));
        ASSERT_EQ(echoed, expect);
        ++got;
      }
      std::this_thread::sleep_for(50us);
    }
    EXPECT_EQ(d.device_errors(), 0u);
  }
};

void check_threads(GroupedEcho& dev) {
  // Queues 0 and 1 on one thread, 2 and 3 on another, never on more than one each.
  for (std::uint32_t q = 0; q < 4; ++q) ASSERT_EQ(dev.threads(q).size(), 1u) << q;
  EXPECT_EQ(*dev.threads(0).begin(), *dev.threads(1).begin());
  EXPECT_EQ(*dev.threads(2).begin(), *dev.threads(3).begin());
  EXPECT_NE(*dev.threads(0).begin(), *dev.threads(2).begin());
}

TEST(QueueWorker, QueuesOfOneWorkerShareItsThreadSleepMode) {
  Rig rig(4, 2, RunnerOptions{});
  rig.bring_up();
  // One queue at a time, with pauses: each worker sleeps and must wake for either queue.
  for (int round = 0; round < 3; ++round)
    for (std::uint32_t q = 0; q < 4; ++q) {
      rig.traffic(q, 100);
      std::this_thread::sleep_for(5ms);
    }
  check_threads(rig.device);
}

TEST(QueueWorker, QueuesOfOneWorkerShareItsThreadPollMode) {
  RunnerOptions r;
  r.poll = true;
  Rig rig(4, 2, r);
  rig.bring_up();
  // Both queues of a worker at once from two driver threads.
  std::thread t0([&] { rig.traffic(0, 2000); });
  std::thread t1([&] { rig.traffic(1, 2000); });
  rig.traffic(2, 500);
  rig.traffic(3, 500);
  t0.join();
  t1.join();
  check_threads(rig.device);
}

TEST(QueueWorker, ByDefaultEveryQueueHasAThreadOfItsOwn) {
  Rig rig(3, 1, RunnerOptions{});
  rig.bring_up();
  for (std::uint32_t q = 0; q < 3; ++q) rig.traffic(q, 50);
  std::set<std::thread::id> all;
  for (std::uint32_t q = 0; q < 3; ++q) {
    ASSERT_EQ(rig.device.threads(q).size(), 1u);
    all.insert(*rig.device.threads(q).begin());
  }
  EXPECT_EQ(all.size(), 3u);
}

TEST(QueueWorker, StoppingOneQueueLeavesItsSiblingRunning) {
  for (bool poll : {false, true}) {
    SCOPED_TRACE(poll ? "poll" : "sleep");
    RunnerOptions r;
    r.poll = poll;
    Rig rig(2, 2, r);
    rig.bring_up();
    rig.traffic(0, 100);
    rig.traffic(1, 100);
    // GET_VRING_BASE on queue 0: its state is taken while queue 1 keeps running.
    auto base = rig.client->stop_queue(0);
    ASSERT_TRUE(base.has_value()) << base.error();
    EXPECT_EQ(*base, 100u);  // split ring: the next avail index
    const std::uint64_t calls0 = rig.device.calls(0);
    rig.traffic(1, 300);
    EXPECT_EQ(rig.device.calls(0), calls0);  // the stopped queue is not looked at
    // And queue 0 starts again where it stopped, served by the same thread.
    rig.start(0);
    rig.traffic(0, 100);
    rig.traffic(1, 100);
    EXPECT_EQ(rig.device.threads(0), rig.device.threads(1));
  }
}

TEST(QueueWorker, StoppingBothQueuesEndsTheThreadAndStartingAgainWorks) {
  Rig rig(2, 2, RunnerOptions{});
  rig.bring_up();
  rig.traffic(0, 50);
  ASSERT_TRUE(rig.client->stop_queue(0).has_value());
  ASSERT_TRUE(rig.client->stop_queue(1).has_value());
  rig.start(1);
  rig.start(0);
  rig.traffic(1, 50);
  rig.traffic(0, 50);
}

TEST(QueueWorker, AQueueThatStartsWithKicksSuppressedAsksForThemBeforeSleeping) {
  // A ring taken over from another back-end (the destination of a migration) may say
  // "do not kick" (split: VRING_USED_F_NO_NOTIFY): the source was busy when it stopped.
  // The new worker must ask for kicks before it sleeps, or the driver never kicks.
  for (bool poll : {false, true}) {
    SCOPED_TRACE(poll ? "poll" : "sleep");
    RunnerOptions r;
    r.poll = poll;
    r.poll_idle = 1ms;
    Rig rig(2, 2, r);
    rig.event_idx = false;
    rig.before_start = [&](std::uint32_t, VirtioDriver& d) {
      const std::uint8_t no_notify[2] = {1, 0};
      ASSERT_TRUE(rig.mem.write(d.ring_ranges()[2].gpa, no_notify));  // used->flags
    };
    rig.bring_up();
    std::this_thread::sleep_for(30ms);  // both queues idle, the worker asleep
    rig.traffic(1, 20);                 // kicks only if the ring asks for them
    rig.traffic(0, 20);
  }
}

TEST(QueueWorker, AnIdlePollingWorkerSleepsAfterPollIdle) {
  RunnerOptions r;
  r.poll = true;
  r.poll_idle = 2ms;
  Rig rig(2, 2, r);
  rig.bring_up();
  rig.traffic(0, 100);
  rig.traffic(1, 100);
  std::this_thread::sleep_for(50ms);  // well past poll_idle: both queues asleep
  const std::uint64_t before = rig.device.calls(0) + rig.device.calls(1);
  std::this_thread::sleep_for(200ms);
  // Asleep: process() does not run at all while nothing arrives (a polling worker would
  // call it hundreds of thousands of times in 200 ms).
  EXPECT_EQ(rig.device.calls(0) + rig.device.calls(1), before);
  // And a kick wakes it.
  rig.traffic(1, 100);
  rig.traffic(0, 100);
}

TEST(QueueWorker, APollingWorkerWithoutIdleSleepKeepsPolling) {
  RunnerOptions r;
  r.poll = true;
  r.poll_idle = 0us;  // never sleep
  Rig rig(2, 2, r);
  rig.bring_up();
  rig.traffic(0, 10);
  std::this_thread::sleep_for(20ms);
  const std::uint64_t before = rig.device.calls(0);
  std::this_thread::sleep_for(200ms);
  // Unloaded, hundreds of thousands; on a loaded 2-core machine a yielding thread may get
  // only a few slices. Asleep, it would be none.
  EXPECT_GT(rig.device.calls(0), before + 10);
}

}  // namespace
}  // namespace vhostkit
