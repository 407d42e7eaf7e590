// Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) through the real socket.
// Two workloads: the echo device, and virtio-blk (BlkDevice) on an image whose contents a
// reference model predicts.
//
// Each back-end runs in a child process (fork) serving one end of a socketpair, with the
// echo device and a crash hook that _exits the child at a chosen CrashPoint: after a
// chain is marked in flight and before the device has it (between pop and I/O submit),
// at the start of push (I/O done, nothing pushed), after the used elements (mid-push),
// after the used index and before the records are cleared, after the records are cleared
// and before the region's used index (mid used-index update). The front-end (this
// process, FrontendClient + the guest-driver model) keeps the inflight area, reconnects
// to a new child and replays the session. Checked: every request completes exactly once
// (the driver model breaks on a completion for an id that is not outstanding) with the
// bytes a reference model expects, and the driver model never sees a device error. The
// front-end collects completions only when the call eventfd signals them, as a guest
// does: a successor must signal completions its predecessor published and died before
// signalling.
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <map>
#include <thread>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include "support/echo_device.h"
#include "vhostkit/devices/blk.h"
#include "vhostkit/frontend/frontend_client.h"
#include "vhostkit/frontend/guest_memory.h"
#include "vhostkit/frontend/virtio_driver.h"
#include "vhostkit/log.h"
#include "vhostkit/vhost_user/backend_server.h"

namespace vhostkit {
namespace {

using namespace frontend;
using namespace std::chrono_literals;
using vhost_user::FrontendRequest;
using vhost_user::InflightDesc;

constexpr std::uint64_t kA = 0x100000, kASize = 0x400000;
constexpr std::uint64_t kArena = kA + 0x80000;  // request buffers: kSlot bytes each
constexpr std::uint64_t kSlot = 0x3000;

std::uint64_t xorshift(std::uint64_t& s) {
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return s;
}

// What the requests are and what their completions must show (the reference model).
class Workload {
 public:
  virtual ~Workload() = default;
  // The device a back-end serves (called in the child).
  virtual std::unique_ptr<Device> make_device() = 0;
  // Request k's buffers, written into guest memory at base, or nullopt if it must wait.
  virtual std::optional<std::vector<DriverBuffer>> issue(std::uint32_t k, GuestMemory& mem,
                                                         Gpa base, std::uint64_t& rng) = 0;
  // Checks request k's completion; empty if right.
  virtual std::string complete(std::uint32_t k, std::uint32_t used_len, GuestMemory& mem) = 0;
  virtual std::string final_check() { return {}; }
};

// Echo: the device copies each request's bytes into its writable buffer.
class EchoWorkload : public Workload {
 public:
  std::unique_ptr<Device> make_device() override {
    auto d = std::make_unique<testing::EchoDevice>();
    d->track_inflight = true;
    return d;
  }
  std::optional<std::vector<DriverBuffer>> issue(std::uint32_t k, GuestMemory& mem, Gpa base,
                                                 std::uint64_t& rng) override {
    auto& r = reqs_[k];
    r.bytes.resize(8 + xorshift(rng) % 600);
    std::memcpy(r.bytes.data(), &k, 4);
    for (std::size_t i = 4; i < r.bytes.size(); ++i)
      r.bytes[i] = static_cast<std::uint8_t>(xorshift(rng));
    r.out = Gpa(base.value + 0x1000);
    if (!mem.write(base, r.bytes)) return std::nullopt;
    return std::vector<DriverBuffer>{{base, static_cast<std::uint32_t>(r.bytes.size()), false},
                                     {r.out, 0x1000, true}};
  }
  std::string complete(std::uint32_t k, std::uint32_t used_len, GuestMemory& mem) override {
    auto& r = reqs_[k];
    if (used_len != r.bytes.size())
      return fmt::format("request {}: {} bytes written, {} expected", k, used_len, r.bytes.size());
    std::vector<std::uint8_t> got(r.bytes.size());
    if (!mem.read(r.out, got) || got != r.bytes) return fmt::format("request {}: echo differs", k);
    reqs_.erase(k);
    return {};
  }

 private:
  struct Req {
    std::vector<std::uint8_t> bytes;
    Gpa out;
  };
  std::map<std::uint32_t, Req> reqs_;
};

// virtio-blk on an image: writes and reads of 1-8 sectors in 64 slots of 4 KiB, never two
// requests on one slot at a time (so the reference image is unambiguous even when a
// successor writes a request again). Reads must return the reference; at the end the
// image file must equal it.
class BlkWorkload : public Workload {
 public:
  static constexpr std::uint32_t kSlots = 64;
  explicit BlkWorkload(std::string path) : path_(std::move(path)), ref_(kSlots * 4096, 0) {
    UniqueFd fd(::open(path_.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    EXPECT_TRUE(fd.valid());
    EXPECT_EQ(::ftruncate(fd.get(), static_cast<off_t>(ref_.size())), 0);
  }
  ~BlkWorkload() override { ::unlink(path_.c_str()); }
  std::unique_ptr<Device> make_device() override {
    BlkOptions o;
    o.path = path_;
    o.queues = 1;
    o.workers = 1;
    auto d = BlkDevice::open(o);
    if (!d) ::_exit(2);
    return std::move(*d);
  }
  std::optional<std::vector<DriverBuffer>> issue(std::uint32_t k, GuestMemory& mem, Gpa base,
                                                 std::uint64_t& rng) override {
    std::vector<std::uint32_t> free;
    for (std::uint32_t s = 0; s < kSlots; ++s)
      if (!busy_[s]) free.push_back(s);
    if (free.empty()) return std::nullopt;
    Req r;
    r.slot = free[xorshift(rng) % free.size()];
    r.write = xorshift(rng) % 2 == 0;
    r.len = static_cast<std::uint32_t>(512 * (1 + xorshift(rng) % 8));
    r.data = Gpa(base.value + 0x1000);
    r.status = Gpa(base.value + 0x20);
    struct {
      std::uint32_t type, reserved;
      std::uint64_t sector;
    } hdr{r.write ? 1u : 0u, 0, r.slot * 8ull};
    if (!mem.write(base, std::span(reinterpret_cast<const std::uint8_t*>(&hdr), 16)))
      return std::nullopt;
    std::uint8_t poison = 0xee;
    if (!mem.write(r.status, std::span(&poison, 1))) return std::nullopt;
    if (r.write) {
      std::vector<std::uint8_t> bytes(r.len);
      for (auto& b : bytes) b = static_cast<std::uint8_t>(xorshift(rng));
      if (!mem.write(r.data, bytes)) return std::nullopt;
      std::memcpy(ref_.data() + r.slot * 4096ull, bytes.data(), r.len);
    }
    busy_[r.slot] = true;
    reqs_[k] = r;
    return std::vector<DriverBuffer>{
        {base, 16, false}, {r.data, r.len, !r.write}, {r.status, 1, true}};
  }
  std::string complete(std::uint32_t k, std::uint32_t used_len, GuestMemory& mem) override {
    Req r = reqs_[k];
    reqs_.erase(k);
    busy_[r.slot] = false;
    std::uint8_t status = 0xff;
    if (!mem.read(r.status, std::span(&status, 1)) || status != 0)
      return fmt::format("request {}: status {}", k, status);
    if (used_len != (r.write ? 1 : r.len + 1))
      return fmt::format("request {}: used length {}", k, used_len);
    if (!r.write) {
      std::vector<std::uint8_t> got(r.len);
      if (!mem.read(r.data, got) ||
          std::memcmp(got.data(), ref_.data() + r.slot * 4096ull, r.len) != 0)
        return fmt::format("request {}: read of slot {} differs from the reference", k, r.slot);
    }
    return {};
  }
  std::string final_check() override {
    std::vector<std::uint8_t> image(ref_.size());
    UniqueFd fd(::open(path_.c_str(), O_RDONLY | O_CLOEXEC));
    if (::pread(fd.get(), image.data(), image.size(), 0) != static_cast<ssize_t>(image.size()))
      return "image read";
    if (image != ref_) return "the image differs from the reference";
    return {};
  }

 private:
  struct Req {
    std::uint32_t slot = 0, len = 0;
    bool write = false;
    Gpa data, status;
  };
  std::string path_;
  std::vector<std::uint8_t> ref_;
  bool busy_[kSlots] = {};
  std::map<std::uint32_t, Req> reqs_;
};

// The crash plan of the child being forked (the child reads it after fork).
CrashPoint g_point = CrashPoint::popped;
int g_countdown = 0;
void crash_hook(CrashPoint p) {
  if (p == g_point && --g_countdown == 0) ::_exit(42);
}

struct Child {
  pid_t pid = -1;
  UniqueFd sock;  // the front-end's end
};

// A back-end in a child process; with countdown > 0 it dies at the countdown-th time it
// reaches point.
Child spawn_backend(Workload& w, CrashPoint point, int countdown) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return {};
  pid_t pid = ::fork();
  if (pid == 0) {
    ::close(sv[1]);
    set_log_sink([](LogLevel, std::string_view) {}, LogLevel::error);
    if (countdown > 0) {
      g_point = point;
      g_countdown = countdown;
      set_crash_hook(&crash_hook);
    }
    auto dev = w.make_device();
    BackendServer server(*dev);
    server.serve(UniqueFd(sv[0]));
    ::_exit(0);
  }
  ::close(sv[0]);
  return Child{pid, UniqueFd(sv[1])};
}

// How the children that ended otherwise than planned (0: served to the end, 42: the crash
// hook) ended: a sanitizer's report in a back-end (its exit code) fails the run too.
std::string g_child_failures;

void reaped(pid_t pid, int status) {
  if (WIFEXITED(status) && (WEXITSTATUS(status) == 0 || WEXITSTATUS(status) == 42)) return;
  g_child_failures +=
      fmt::format("back-end {} ended with {} {}; ", pid, WIFEXITED(status) ? "exit code" : "signal",
                  WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
}

// Whether the child has ended (reaped).
bool ended(Child& c) {
  if (c.pid < 0) return true;
  int status = 0;
  if (::waitpid(c.pid, &status, WNOHANG) == c.pid) {
    reaped(c.pid, status);
    c.pid = -1;
    return true;
  }
  return false;
}

void finish(Child& c) {
  c.sock.reset();
  if (c.pid > 0) {
    int status = 0;
    if (::waitpid(c.pid, &status, 0) == c.pid) reaped(c.pid, status);
    c.pid = -1;
  }
}

struct Plan {
  std::uint16_t size = 16;
  bool indirect = false;
  bool event_idx = false;
  std::uint32_t requests = 60;
  std::vector<std::pair<CrashPoint, int>> crashes;  // one per back-end, in order
};

struct Outcome {
  std::string error;  // empty: every request completed exactly once with the right bytes
  int restarts = 0;
};

// Drives plan.requests requests of w through back-ends that crash as planned.
Outcome run(Workload& w, const Plan& plan, std::uint64_t seed) {
  Outcome out;
  g_child_failures.clear();
  auto mem = GuestMemory::create({{Gpa(kA), kASize}});
  if (!mem) return {"memory: " + mem.error()};
  auto drv = VirtioDriver::create(
      *mem,
      DriverOptions{.size = plan.size, .indirect = plan.indirect, .event_idx = plan.event_idx});
  if (!drv) return {"driver: " + drv.error()};
  ClientOptions opts;
  opts.want_features = (plan.indirect ? virtio::bit(virtio::kFRingIndirectDesc) : 0) |
                       (plan.event_idx ? virtio::bit(virtio::kFRingEventIdx) : 0);
  std::size_t next_crash = 0;
  auto plan_of = [&]() -> std::pair<CrashPoint, int> {
    if (next_crash < plan.crashes.size()) return plan.crashes[next_crash++];
    return {CrashPoint::popped, 0};
  };
  auto [p0, c0] = plan_of();
  Child child = spawn_backend(w, p0, c0);
  if (child.pid < 0) return {"fork failed"};
  auto client = FrontendClient::adopt(std::move(child.sock));
  std::vector<RingNotifiers> rings;
  {
    if (auto r = client->negotiate(opts); !r) return {"negotiate: " + r.error()};
    if (!client->inflight()) return {"INFLIGHT_SHMFD not negotiated"};
    if (auto r = client->set_mem_table(*mem); !r) return {"mem table: " + r.error()};
    if (auto r = client->setup_inflight(1, plan.size); !r) return {"inflight: " + r.error()};
    auto n = client->start_queue(0, *mem, *drv);
    if (!n) return {"start: " + n.error()};
    rings.push_back(std::move(*n));
    if (auto r = client->driver_ok(); !r) return {"driver_ok: " + r.error()};
  }

  std::uint64_t rng = seed | 1;
  std::vector<int> completions(plan.requests, 0);
  std::map<std::uint16_t, std::uint32_t> by_id;  // outstanding: driver id -> request
  std::uint32_t issued = 0, completed = 0;
  auto kick = [&] {
    std::uint64_t one = 1;
    if (!rings.empty()) (void)!::write(rings[0].kick.get(), &one, 8);
  };
  auto deadline = std::chrono::steady_clock::now() + 5s;
  while (completed < plan.requests) {
    if (std::chrono::steady_clock::now() > deadline) {
      out.error = fmt::format("stuck: {} of {} completed, {} outstanding", completed, plan.requests,
                              by_id.size());
      break;
    }
    // Issue what fits.
    bool added = false;
    while (issued < plan.requests && drv->free_descriptors() >= 3 && by_id.size() < plan.size) {
      auto bufs = w.issue(issued, *mem, Gpa(kArena + (issued % 256) * kSlot), rng);
      if (!bufs) break;
      auto id = drv->add(*bufs);
      if (!id) return {"add: " + id.error()};
      by_id[*id] = issued++;
      added = true;
    }
    if (added) {
      drv->publish();
      kick();
    }
    // Collect completions when the back-end signals them, as a guest driver does (a
    // completion published without a signal would never be seen).
    bool progress = false;
    bool signalled = false;
    if (!rings.empty()) {
      pollfd pfd{rings[0].call.get(), POLLIN, 0};
      if (::poll(&pfd, 1, 1) == 1) {
        std::uint64_t v;
        signalled = ::read(rings[0].call.get(), &v, sizeof v) == sizeof v;
      }
    } else {
      std::this_thread::sleep_for(1ms);
    }
    while (signalled) {
      auto u = drv->poll();
      if (!u) break;
      progress = true;
      auto it = by_id.find(u->id);
      if (it == by_id.end()) return {fmt::format("completion for id {} not outstanding", u->id)};
      const std::uint32_t k = it->second;
      by_id.erase(it);
      ++completions[k];
      ++completed;
      if (auto e = w.complete(k, u->len, *mem); !e.empty()) return {e};
    }
    if (drv->broken()) return {"the driver model saw a device error (a completion twice?)"};
    if (progress) continue;
    if (ended(child)) {
      // The back-end died: a new one on the same "path", the session replayed.
      auto [p, c] = plan_of();
      Child fresh = spawn_backend(w, p, c);
      if (fresh.pid < 0) return {"fork failed"};
      child.pid = fresh.pid;
      const VirtioDriver* ds[] = {&*drv};
      auto rs = client->reconnect(std::move(fresh.sock), opts, *mem, ds);
      if (!rs) {
        // The new back-end may itself die during the replay (its crash point came
        // early): the next round sees it gone and starts another.
        rings.clear();
        continue;
      }
      rings = std::move(*rs);
      ++out.restarts;
      kick();
      continue;
    }
    kick();  // a kick a dead back-end never read goes to its successor
  }
  client->close();
  finish(child);
  if (out.error.empty() && !g_child_failures.empty()) out.error = g_child_failures;
  g_child_failures.clear();
  for (std::size_t k = 0; k < completions.size() && out.error.empty(); ++k)
    if (completions[k] != 1)
      out.error = fmt::format("request {} completed {} times", k, completions[k]);
  if (out.error.empty()) out.error = w.final_check();
  return out;
}

std::string image_path() {
  static int n = 0;
  const char* dir = ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
  return fmt::format("{}/vhostkit-inflight-{}-{}.img", dir, ::getpid(), n++);
}

constexpr CrashPoint kPoints[] = {CrashPoint::popped, CrashPoint::push_begin,
                                  CrashPoint::used_written, CrashPoint::used_idx_stored,
                                  CrashPoint::inflight_cleared};

// Each crash point on its own, deterministically: the back-end dies there once.
class InflightCrash : public ::testing::TestWithParam<CrashPoint> {};

TEST_P(InflightCrash, EveryRequestCompletesExactlyOnceAfterARestart) {
  for (int countdown : {1, 2, 7}) {
    Plan plan;
    plan.crashes = {{GetParam(), countdown}};
    EchoWorkload echo;
    Outcome o = run(echo, plan, 12345 + countdown);
    EXPECT_EQ(o.error, "") << "echo, countdown " << countdown;
    EXPECT_EQ(o.restarts, 1) << "echo, countdown " << countdown;
    BlkWorkload blk(image_path());
    o = run(blk, plan, 54321 + countdown);
    EXPECT_EQ(o.error, "") << "blk, countdown " << countdown;
    EXPECT_EQ(o.restarts, 1) << "blk, countdown " << countdown;
  }
}

INSTANTIATE_TEST_SUITE_P(Points, InflightCrash, ::testing::ValuesIn(kPoints),
                         [](const auto& param_info) {
                           return std::to_string(static_cast<int>(param_info.param));
                         });

RC_GTEST_PROP(InflightProperty, RandomWorkloadsAndCrashesCompleteEveryRequestOnce, ()) {
  Plan plan;
  plan.size = *rc::gen::element<std::uint16_t>(4, 16, 64);
  plan.indirect = *rc::gen::arbitrary<bool>();
  plan.event_idx = *rc::gen::arbitrary<bool>();
  plan.requests = *rc::gen::inRange<std::uint32_t>(1, 150);
  const auto n = *rc::gen::inRange(1, 4);
  for (int i = 0; i < n; ++i)
    plan.crashes.emplace_back(kPoints[*rc::gen::inRange<std::size_t>(0, std::size(kPoints))],
                              *rc::gen::inRange(1, 12));
  const auto seed = *rc::gen::arbitrary<std::uint64_t>();
  std::unique_ptr<Workload> w;
  if (*rc::gen::arbitrary<bool>())
    w = std::make_unique<BlkWorkload>(image_path());
  else
    w = std::make_unique<EchoWorkload>();
  Outcome o = run(*w, plan, seed);
  RC_TAG(o.restarts);
  RC_ASSERT(o.error == "");
}

// The offer, and hostile GET/SET_INFLIGHT_FD requests.
struct Direct {
  testing::EchoDevice dev;
  std::unique_ptr<BackendServer> server;
  std::thread t;
  std::unique_ptr<FrontendClient> client;
  explicit Direct(bool track) {
    dev.track_inflight = track;
    server = std::make_unique<BackendServer>(dev);
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    t = std::thread([this, fd = sv[0]] { server->serve(UniqueFd(fd)); });
    client = FrontendClient::adopt(UniqueFd(sv[1]));
    EXPECT_TRUE(client->negotiate({}).has_value());
  }
  ~Direct() {
    client->close();
    t.join();
  }
};

TEST(Inflight, OfferedOnlyWhenTheDeviceOptsIn) {
  Direct off(false);
  EXPECT_FALSE(off.client->inflight());
  EXPECT_FALSE(off.client->setup_inflight(1, 16).has_value());
  Direct on(true);
  EXPECT_TRUE(on.client->inflight());
  ASSERT_TRUE(on.client->setup_inflight(1, 16).has_value());
  EXPECT_EQ(on.client->inflight_area().size(), inflight::queue_region_size(16));
}

UniqueFd memfd_of(std::uint64_t size) {
  UniqueFd fd(::memfd_create("inflight-test", MFD_CLOEXEC));
  EXPECT_EQ(::ftruncate(fd.get(), static_cast<off_t>(size)), 0);
  return fd;
}

TEST(Inflight, HostileSizesAndOffsetsAreRefused) {
  Direct d(true);
  auto& c = *d.client;
  auto get = [&](std::uint16_t queues, std::uint16_t size) {
    auto r = c.request_reply(vhost_user::make_request(FrontendRequest::get_inflight_fd,
                                                      InflightDesc{0, 0, queues, size, {}}));
    EXPECT_TRUE(r.has_value());
    return r ? vhost_user::decode_payload<InflightDesc>(*r)->mmap_size : 1;
  };
  EXPECT_EQ(get(0, 16), 0u);     // no queue
  EXPECT_EQ(get(2, 16), 0u);     // more queues than the device has
  EXPECT_EQ(get(1, 0), 0u);      // empty queue
  EXPECT_EQ(get(1, 32768), 0u);  // beyond what we run
  EXPECT_EQ(get(1, 256), inflight::queue_region_size(256));
  const std::uint64_t need = inflight::queue_region_size(16);
  auto set = [&](InflightDesc desc, std::uint64_t file) {
    auto m = vhost_user::make_request(FrontendRequest::set_inflight_fd, desc);
    m.fds.push_back(memfd_of(file));
    return c.request_ack(std::move(m)).has_value();
  };
  EXPECT_FALSE(set({need - 1, 0, 1, 16, {}}, 1 << 20));         // too small for the queues
  EXPECT_FALSE(set({need, 0, 1, 16, {}}, need - 1));            // beyond the file
  EXPECT_FALSE(set({need, 4096, 1, 16, {}}, need));             // offset past the end
  EXPECT_FALSE(set({need, 100, 1, 16, {}}, 1 << 20));           // unaligned offset
  EXPECT_FALSE(set({~0ULL - 4095, 4096, 1, 16, {}}, 1 << 20));  // size overflowing
  EXPECT_FALSE(set({need * 9, 0, 1, 16, {}}, 1 << 20));         // far larger than needed
  EXPECT_FALSE(set({need, 0, 3, 16, {}}, 1 << 20));             // too many queues
  EXPECT_TRUE(set({need, 4096, 1, 16, {}}, 4096 + need));       // well formed
  EXPECT_EQ(d.server->messages_rejected(), 11u);
}

// A driver reset (RESET_DEVICE) clears the records; a disconnect keeps them.
TEST(Inflight, AResetClearsTheRecordsADisconnectKeepsThem) {
  auto mem = GuestMemory::create({{Gpa(kA), kASize}});
  ASSERT_TRUE(mem.has_value());
  auto drv = VirtioDriver::create(*mem, DriverOptions{.size = 16});
  ASSERT_TRUE(drv.has_value());
  Direct d(true);
  // Hold the worker after its pop: the chain stays in flight while we look.
  std::atomic<bool> hold{true};
  d.dev.after_pop = [&](std::uint32_t) {
    while (hold.load()) std::this_thread::sleep_for(1ms);
  };
  auto& c = *d.client;
  ASSERT_TRUE(c.set_mem_table(*mem).has_value());
  ASSERT_TRUE(c.setup_inflight(1, 16).has_value());
  auto n = c.start_queue(0, *mem, *drv);
  ASSERT_TRUE(n.has_value());
  ASSERT_TRUE(c.driver_ok().has_value());
  std::vector<DriverBuffer> bufs{{Gpa(kA + 0x80000), 8, false}, {Gpa(kA + 0x81000), 8, true}};
  auto id = drv->add(bufs);
  ASSERT_TRUE(id.has_value());
  drv->publish();
  std::uint64_t one = 1;
  ASSERT_EQ(::write(n->kick.get(), &one, 8), 8);
  auto area = c.inflight_area();
  auto flag = [&] { return area[inflight::desc_state(*id) + inflight::kInflight]; };
  auto until = std::chrono::steady_clock::now() + 5s;
  while (flag() != 1 && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(1ms);
  ASSERT_EQ(flag(), 1) << "pop marks the head in flight";
  hold = false;
  until = std::chrono::steady_clock::now() + 5s;
  std::optional<UsedBuffer> u;
  while (!(u = drv->poll()) && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(1ms);
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(flag(), 0) << "push clears it";
  std::uint16_t used_rec;
  std::memcpy(&used_rec, area.data() + inflight::kUsedIdx, 2);
  EXPECT_EQ(used_rec, 1);
  // A record left in flight (as a crashed predecessor would) goes with a reset.
  auto* w = const_cast<std::uint8_t*>(area.data());
  w[inflight::desc_state(3) + inflight::kInflight] = 1;
  ASSERT_TRUE(c.reset_device().has_value());
  EXPECT_EQ(area[inflight::desc_state(3) + inflight::kInflight], 0);
  // A disconnect leaves them for the next back-end.
  w[inflight::desc_state(5) + inflight::kInflight] = 1;
  const std::uint64_t resets = d.dev.resets.load();
  c.close();
  until = std::chrono::steady_clock::now() + 5s;
  while (d.dev.resets.load() == resets && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(1ms);
  EXPECT_GT(d.dev.resets.load(), resets);
  EXPECT_EQ(area[inflight::desc_state(5) + inflight::kInflight], 1);
}

}  // namespace
}  // namespace vhostkit

namespace vhostkit {
namespace {

// The Virtqueue on its own: a successor started from a given used index (not read from
// the ring first) still maps the used ring to repair the region (the completion published
// but not recorded is not resubmitted), and resubmits the rest in pop order.
TEST(InflightQueue, ResubmitsInPopOrderWhenStartedFromAGivenUsedIndex) {
  auto mem = frontend::GuestMemory::create({{Gpa(kA), kASize}});
  ASSERT_TRUE(mem.has_value());
  AddressSpace space;
  ASSERT_TRUE(space.set_mem_table(mem->region_specs()).has_value());
  auto drv = frontend::VirtioDriver::create(*mem, frontend::DriverOptions{.size = 8});
  ASSERT_TRUE(drv.has_value());
  std::vector<std::uint64_t> storage(inflight::queue_region_size(8) / 8, 0);
  std::span<std::uint8_t> region(reinterpret_cast<std::uint8_t*>(storage.data()),
                                 storage.size() * 8);
  std::vector<std::uint16_t> ids;
  for (int k = 0; k < 3; ++k) {
    std::vector<frontend::DriverBuffer> bufs{{Gpa(kArena + k * kSlot), 8, false},
                                             {Gpa(kArena + k * kSlot + 0x1000), 8, true}};
    auto id = drv->add(bufs);
    ASSERT_TRUE(id.has_value());
    ids.push_back(*id);
  }
  drv->publish();
  {
    Virtqueue first(space);
    first.set_inflight(region, false);
    ASSERT_TRUE(first.start(drv->queue_config()).has_value());
    ChainBatch b;
    auto p = first.pop(b, 8);
    ASSERT_TRUE(p.has_value());
    ASSERT_EQ(p->popped, 3u);
    Completion middle{ids[1], 1, 0};
    ASSERT_TRUE(first.push(std::span(&middle, 1)).has_value());
  }
  // As if the first back-end died right after publishing the used index: the region
  // still has ids[1] in flight and its used index behind the ring's.
  region[inflight::desc_state(ids[1]) + inflight::kInflight] = 1;
  region[inflight::kUsedIdx] = 0;
  Virtqueue next(space);
  next.set_inflight(region, true);
  ASSERT_TRUE(
      next.start(drv->queue_config(), RingState{.avail_idx = 1, .used_idx = 1}, false).has_value());
  EXPECT_TRUE(next.recovered());
  EXPECT_EQ(next.resubmit_pending(), 2u);
  EXPECT_EQ(next.state().avail_idx, 3);  // used index 1 + 2 in flight
  ChainBatch b;
  auto p = next.pop(b, 8);
  ASSERT_TRUE(p.has_value());
  ASSERT_EQ(p->popped, 2u);
  EXPECT_EQ(b[0].id, ids[0]);
  EXPECT_EQ(b[1].id, ids[2]);
}

}  // namespace
}  // namespace vhostkit
