// Our front-end against our back-end over a real Unix socket: the full lifecycle,
// IOTLB misses and invalidations while traffic runs, logging with a memory-table change,
// disconnect and reconnect, hostile messages, and no fd leaks; device state transfer
// (SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE) and device reset (RESET_DEVICE, SET_STATUS(0)).
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <thread>

#include <map>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "support/echo_device.h"
#include "support/memfd.h"
#include "vhostkit/frontend/frontend_client.h"
#include "vhostkit/log.h"
#include "vhostkit/vhost_user/backend_server.h"
#include "vhostkit/vhost_user/device_state.h"
#include "vhostkit/vhost_user/socket.h"

namespace vhostkit {
namespace {

using namespace frontend;
using namespace std::chrono_literals;
using testing::EchoDevice;
using testing::open_fd_count;
using vhost_user::FrontendRequest;
using vhost_user::make_request;
using vhost_user::Message;

constexpr std::uint64_t kA = 0x40000, kASize = 0x200000;  // odd GPAs, two regions
constexpr std::uint64_t kB = 0x100000000, kBSize = 0x100000;

struct RigOptions {
  bool iommu = false;
  bool gpa_form = true;
  bool packed = false;
  ViommuMode mode = ViommuMode::strict;
};

struct Rig {
  EchoDevice device;
  BackendServer server{device};
  std::thread server_thread;
  std::unique_ptr<FrontendClient> client;
  GuestMemory mem = std::move(*GuestMemory::create({{Gpa(kA), kASize}, {Gpa(kB), kBSize}}));
  Viommu viommu;
  std::optional<VirtioDriver> drv;
  RingNotifiers notifiers;
  RigOptions opt;

  explicit Rig(RigOptions o) : viommu(o.mode), opt(o) {
    if (std::getenv("VHOSTKIT_TEST_LOG") != nullptr)
      set_log_sink(
          [](LogLevel l, std::string_view line) {
            std::fprintf(
                stderr, "%.6f [%s] %.*s\n",
                std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
                    .count(),
                to_string(l), static_cast<int>(line.size()), line.data());
          },
          LogLevel::debug);
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    server_thread = std::thread([this, fd = sv[0]] { server.serve(UniqueFd(fd)); });
    client = FrontendClient::adopt(UniqueFd(sv[1]));
  }
  ~Rig() {
    client->close();
    server.stop();
    server_thread.join();
  }
  void bring_up() {
    ClientOptions co;
    co.want_features =
        virtio::bit(virtio::kFRingIndirectDesc) | virtio::bit(virtio::kFRingEventIdx);
    if (opt.iommu) co.want_features |= virtio::bit(virtio::kFAccessPlatform);
    if (opt.packed) co.want_features |= virtio::bit(virtio::kFRingPacked);
    co.want_gpa_addresses = opt.gpa_form;
    ASSERT_TRUE(client->negotiate(co).has_value());
    ASSERT_EQ(client->gpa_addresses(), opt.gpa_form);
    ASSERT_TRUE(client->set_mem_table(mem).has_value());
    if (opt.iommu) client->attach_viommu(viommu, mem);
    DriverOptions d;
    d.packed = opt.packed;
    d.size = 64;
    d.indirect = true;
    d.event_idx = true;
    d.iommu = opt.iommu ? &viommu : nullptr;
    auto created = VirtioDriver::create(mem, d);
    ASSERT_TRUE(created.has_value());
    drv.emplace(std::move(*created));
    auto n = client->start_queue(0, mem, *drv);
    ASSERT_TRUE(n.has_value()) << n.error();
    notifiers = std::move(*n);
  }
  void kick() {
    if (drv->kick_needed()) {
      std::uint64_t one = 1;
      ASSERT_EQ(::write(notifiers.kick.get(), &one, 8), 8);
    }
  }
  // Sends `count` echo chains with payloads in guest memory at `base`, waits for all.
  void traffic(std::uint64_t base, int count, int tag) {
    int sent = 0, got = 0;
    std::map<std::uint16_t, int> ids;
    auto deadline = std::chrono::steady_clock::now() + 10s;
    while (got < count) {
      ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "sent " << sent << " got " << got;
      while (sent < count && drv->free_descriptors() >= 2) {
        std::uint64_t slot = static_cast<std::uint64_t>(sent % 64);
        Gpa out(base + slot * 0x2000), in(base + slot * 0x2000 + 0x1000);
        std::string payload = fmt::format("chain {} of run {}", sent, tag);
        ASSERT_TRUE(mem.write(
            out, std::span(reinterpret_cast<const std::uint8_t*>(payload.data()), payload.size())));
        std::vector<DriverBuffer> bufs{{out, static_cast<std::uint32_t>(payload.size()), false},
                                       {in, 256, true}};
        auto id = drv->add(bufs);
        ASSERT_TRUE(id.has_value()) << id.error();
        ids[*id] = sent;
        ++sent;
      }
      kick();
      while (auto u = drv->poll()) {
        int which = ids.at(u->id);
        std::string expect = fmt::format("chain {} of run {}", which, tag);
        ASSERT_EQ(u->len, expect.size());
        std::string echoed(expect.size(), '\0');
        std::uint64_t slot = static_cast<std::uint64_t>(which % 64);
        ASSERT_TRUE(
            mem.read(Gpa(base + slot * 0x2000 + 0x1000),
                     std::span(reinterpret_cast<std::uint8_t*>(echoed.data()), echoed.size())));
        ASSERT_EQ(echoed, expect);
        ++got;
      }
      if (opt.iommu && opt.mode == ViommuMode::lazy) viommu.flush();
      std::this_thread::sleep_for(50us);
    }
    EXPECT_EQ(drv->device_errors(), 0u);
  }
};

TEST(BackendIntegration, FullLifecycleGpaForm) {
  Rig rig({.iommu = false, .gpa_form = true});
  rig.bring_up();
  rig.traffic(kA + 0x100000, 200, 1);
  auto base = rig.client->stop_queue(0);
  ASSERT_TRUE(base.has_value());
  EXPECT_EQ(*base, 200u);
  EXPECT_EQ(rig.device.chains.load(), 200u);
}

TEST(BackendIntegration, FullLifecycleLegacyUaddrForm) {
  Rig rig({.iommu = false, .gpa_form = false});
  rig.bring_up();
  rig.traffic(kB, 150, 2);  // buffers in the second region
  ASSERT_EQ(*rig.client->stop_queue(0), 150u);
}

TEST(BackendIntegration, PackedRing) {
  Rig rig({.iommu = false, .gpa_form = true, .packed = true});
  rig.bring_up();
  rig.traffic(kA + 0x100000, 300, 3);
  auto base = rig.client->stop_queue(0);
  ASSERT_TRUE(base.has_value());
  // 300 chains of 2 descriptors through a 64-entry ring: avail and used at the same spot.
  EXPECT_EQ(*base & 0xffff, *base >> 16);
}

class IommuIntegration : public ::testing::TestWithParam<std::tuple<bool, ViommuMode, bool>> {};

TEST_P(IommuIntegration, MissesAreAnsweredAndInvalidationsApplyWhileTrafficRuns) {
  auto [gpa_form, mode, packed] = GetParam();
  Rig rig({.iommu = true, .gpa_form = gpa_form, .packed = packed, .mode = mode});
  rig.bring_up();
  // The driver maps each buffer before use and unmaps it after: every chain misses,
  // every completion invalidates (strict) or batches invalidations (lazy).
  rig.traffic(kA + 0x100000, 120, 4);
  EXPECT_GT(rig.client->misses_answered(), 0u);
  rig.traffic(kB, 120, 5);
  // Indirect tables: one ring descriptor per chain on a packed ring.
  EXPECT_EQ(*rig.client->stop_queue(0) & 0x7fff, packed ? 240u % 64 : 240u);
}

INSTANTIATE_TEST_SUITE_P(Forms, IommuIntegration,
                         ::testing::Combine(::testing::Bool(),
                                            ::testing::Values(ViommuMode::strict, ViommuMode::lazy),
                                            ::testing::Bool()));

TEST(BackendIntegration, LoggingWithLegacyUpdatesAndAnOffsetLog) {
  Rig rig({.iommu = true, .gpa_form = false});
  rig.bring_up();
  std::uint64_t log_bytes = (kB + 0x400000) / 4096 / 8;  // covers the region added below
  ASSERT_TRUE(rig.client->enable_logging(log_bytes, 4096 + 8).has_value());  // non-zero offset
  rig.traffic(kA + 0x100000, 64, 6);
  DirtyLog* log = rig.client->log();
  // Every echoed buffer page is dirty at its GPA; no IOVA is ever marked.
  for (std::uint64_t slot = 0; slot < 64; ++slot)
    EXPECT_TRUE(log->test((kA + 0x100000 + slot * 0x2000 + 0x1000) / 4096)) << slot;
  EXPECT_TRUE(log->test(rig.drv->gpas().device.value / 4096));  // the used ring
  EXPECT_EQ(log->out_of_range_count(), 0u);
  // Logging off again: later writes leave the log alone.
  ASSERT_TRUE(rig.client->disable_logging().has_value());
}

TEST(BackendIntegration, DirtyLogMarksGpasNotIovasAndAddedRegions) {
  // A fresh rig whose guest memory already has a third region the back-end learns of
  // only through ADD_MEM_REG, after logging started.
  Rig rig({.iommu = true, .gpa_form = true});
  rig.mem = std::move(
      *GuestMemory::create({{Gpa(kA), kASize}, {Gpa(kB), kBSize}, {Gpa(kB + 0x200000), 0x100000}}));
  // Send only the first two regions in SET_MEM_TABLE.
  ClientOptions co;
  co.want_features = virtio::bit(virtio::kFAccessPlatform) | virtio::bit(virtio::kFRingEventIdx);
  ASSERT_TRUE(rig.client->negotiate(co).has_value());
  ASSERT_TRUE(rig.client->set_mem_table_regions(rig.mem, {true, true, false}).has_value());
  rig.client->attach_viommu(rig.viommu, rig.mem);
  DriverOptions d;
  d.size = 64;
  d.event_idx = true;
  d.iommu = &rig.viommu;
  rig.drv.emplace(std::move(*VirtioDriver::create(rig.mem, d)));
  rig.notifiers = std::move(*rig.client->start_queue(0, rig.mem, *rig.drv));
  std::uint64_t log_bytes = (kB + 0x400000) / 4096 / 8;
  ASSERT_TRUE(rig.client->enable_logging(log_bytes).has_value());
  ASSERT_TRUE(rig.client->add_mem_reg(rig.mem, 2).has_value());
  rig.traffic(kB + 0x200000, 40, 7);  // buffers in the hot-added region
  DirtyLog* log = rig.client->log();
  for (std::uint64_t slot = 0; slot < 40; ++slot)
    EXPECT_TRUE(log->test((kB + 0x200000 + slot * 0x2000 + 0x1000) / 4096)) << slot;
  // Nothing is marked in the IOVA window the vIOMMU hands out.
  for (const auto& map : rig.viommu.all()) EXPECT_FALSE(log->test(map.iova.value / 4096));
  EXPECT_EQ(log->out_of_range_count(), 0u);
  // Removing the region again: REM_MEM_REG is acknowledged after the workers quiesce.
  ASSERT_TRUE(rig.client->rem_mem_reg(rig.mem, 2).has_value());
}

TEST(BackendIntegration, DisconnectAndReconnect) {
  auto dir = std::filesystem::temp_directory_path() / fmt::format("vhostkit-test-{}", ::getpid());
  std::filesystem::create_directories(dir);
  std::string path = (dir / "sock").string();
  EchoDevice device;
  BackendServer server(device);
  auto listener = BackendServer::listen_unix(path);
  ASSERT_TRUE(listener.has_value()) << listener.error();
  std::thread t([&] { ASSERT_TRUE(server.run(listener->get()).has_value()); });
  std::size_t fds_before = open_fd_count();
  for (int round = 0; round < 3; ++round) {
    auto c = FrontendClient::connect(path);
    ASSERT_TRUE(c.has_value()) << c.error();
    ASSERT_TRUE((*c)->negotiate({}).has_value());
    auto mem = GuestMemory::create({{Gpa(kA), kASize}});
    ASSERT_TRUE((*c)->set_mem_table(*mem).has_value());
    auto drv = VirtioDriver::create(*mem, DriverOptions{.size = 16});
    auto n = (*c)->start_queue(0, *mem, *drv);
    ASSERT_TRUE(n.has_value());
    std::vector<DriverBuffer> bufs{{Gpa(kA + 0x100000), 8, false}, {Gpa(kA + 0x101000), 8, true}};
    ASSERT_TRUE(drv->add(bufs).has_value());
    std::uint64_t one = 1;
    ASSERT_EQ(::write(n->kick.get(), &one, 8), 8);
    auto deadline = std::chrono::steady_clock::now() + 5s;
    std::optional<UsedBuffer> u;
    while (!(u = drv->poll()) && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(100us);
    ASSERT_TRUE(u.has_value()) << "round " << round;
    std::uint64_t resets = device.resets.load();
    (*c)->close();
    // The server resets the device after the disconnect.
    deadline = std::chrono::steady_clock::now() + 5s;
    while (device.resets.load() == resets && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(1ms);
    EXPECT_GT(device.resets.load(), resets);
  }
  // All of each session's fds (memory, eventfds, log, channel) were released; the
  // connection's own socket closes just after the reset, so allow it a moment.
  auto until = std::chrono::steady_clock::now() + 2s;
  while (open_fd_count() != fds_before && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(1ms);
  EXPECT_EQ(open_fd_count(), fds_before);
  // A second server on the same path is refused while this one listens.
  EXPECT_FALSE(BackendServer::listen_unix(path).has_value());
  server.stop();
  t.join();
  std::filesystem::remove_all(dir);
}

TEST(BackendIntegration, HostileMessagesAreRefused) {
  Rig rig({});
  auto& c = *rig.client;
  // Before SET_OWNER, state-changing requests are refused.
  auto mem = GuestMemory::create({{Gpa(kA), kASize}});
  Message early = make_request(FrontendRequest::set_vring_num, vhost_user::VringState{0, 64},
                               vhost_user::kVersion | vhost_user::kFlagNeedReply);
  auto refused = c.request_reply(std::move(early));
  ASSERT_TRUE(refused.has_value());
  EXPECT_EQ(*vhost_user::decode_u64(*refused), 1u);
  ASSERT_TRUE(c.negotiate({}).has_value());
  ASSERT_TRUE(c.set_mem_table(*mem).has_value());
  // A ring index out of range (qemu-storage-daemon once aborted on index 255).
  EXPECT_FALSE(
      c.request_ack(make_request(FrontendRequest::set_vring_num, vhost_user::VringState{255, 64}))
          .has_value());
  // A queue size out of range.
  EXPECT_FALSE(
      c.request_ack(make_request(FrontendRequest::set_vring_num, vhost_user::VringState{0, 70000}))
          .has_value());
  // A memory table claiming 1000 regions is refused by the codec, not by an abort.
  EXPECT_FALSE(c.request_ack(make_request(FrontendRequest::set_mem_table,
                                          vhost_user::MemTableHeader{1000, 0}))
                   .has_value());
  // A region overlapping another, added with ADD_MEM_REG.
  RegionSpec s = mem->region_spec(0);
  Message add = vhost_user::make_mem_reg(
      FrontendRequest::add_mem_reg, {Gpa(kA + 0x1000), 0x1000, kA + 0x1000, 0}, std::move(s.fd));
  EXPECT_FALSE(c.request_ack(std::move(add)).has_value());
  // An IOTLB update without the IOMMU feature.
  EXPECT_FALSE(c.iotlb_invalidate(Iova(0), 4096).has_value());
  // Protocol features never offered.
  EXPECT_FALSE(
      c.request_ack(make_request(FrontendRequest::set_protocol_features, std::uint64_t{1} << 40))
          .has_value());
  // A log too small for the memory table.
  auto reply = c.request_reply(
      vhost_user::make_log_base(vhost_user::LogDesc{8, 0}, testing::make_memfd(4096)));
  ASSERT_TRUE(reply.has_value());  // answered (no payload), and logged as refused
  EXPECT_GE(rig.server.messages_rejected(), 7u);
  // The connection still works.
  auto qn = c.request_reply(make_request(FrontendRequest::get_queue_num));
  ASSERT_TRUE(qn.has_value());
  EXPECT_EQ(*vhost_user::decode_u64(*qn), 1u);
}

// ---- Device state -------------------------------------------------------------------

using vhost_user::DeviceStateTransfer;
using vhost_user::kDeviceStateNoFdMask;

// A device whose state is `bytes` of a pattern: larger than a pipe holds, so that a
// back-end writing it all before replying (the front-end reads only after the reply)
// would never reply.
class BulkStateDevice : public Device {
 public:
  explicit BulkStateDevice(std::size_t bytes) : blob_(bytes) {
    for (std::size_t i = 0; i < bytes; ++i) blob_[i] = static_cast<std::uint8_t>(i * 13 + 5);
  }
  std::string name() const override { return "bulk0"; }
  std::uint64_t device_features() const override { return 0; }
  std::uint32_t num_queues() const override { return 1; }
  QueueWork process(std::uint32_t, Virtqueue&) override { return {}; }
  DeviceStateFormat state_format() const override { return {"bulk", 1}; }
  void save_state(DeviceStateWriter& out) const override { out.bytes(1, blob_); }
  Result<void, std::string> load_state(const DeviceStateReader& in, std::uint32_t) override {
    auto b = in.bytes(1);
    if (!b) return unexpected(b.error().message());
    blob_.assign(b->begin(), b->end());
    return {};
  }
  std::vector<std::uint8_t> blob_;
};

// Any device served on a socketpair to a FrontendClient.
struct Served {
  Device& device;
  BackendServer server;
  std::thread thread;
  std::unique_ptr<FrontendClient> client;
  explicit Served(Device& d, BackendOptions o = {}) : device(d), server(d, o) {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    thread = std::thread([this, fd = sv[0]] { server.serve(UniqueFd(fd)); });
    client = FrontendClient::adopt(UniqueFd(sv[1]));
  }
  ~Served() {
    client->close();
    server.stop();
    thread.join();
  }
};

std::pair<UniqueFd, UniqueFd> make_pipe() {
  int p[2];
  EXPECT_EQ(::pipe2(p, O_CLOEXEC), 0);
  return {UniqueFd(p[0]), UniqueFd(p[1])};
}

// SET_DEVICE_STATE_FD with `fd`; the reply's u64.
std::uint64_t set_state_fd(FrontendClient& c, std::uint32_t direction, std::uint32_t phase,
                           UniqueFd fd) {
  Message m =
      make_request(FrontendRequest::set_device_state_fd, DeviceStateTransfer{direction, phase});
  m.fds.push_back(std::move(fd));
  auto r = c.request_reply(std::move(m));
  EXPECT_TRUE(r.has_value()) << r.error();
  if (!r) return ~0ULL;
  EXPECT_TRUE(r->fds.empty());
  return *vhost_user::decode_u64(*r);
}

std::uint64_t check_state(FrontendClient& c) {
  auto r = c.request_reply(make_request(FrontendRequest::check_device_state));
  EXPECT_TRUE(r.has_value()) << r.error();
  return r ? *vhost_user::decode_u64(*r) : ~0ULL;
}

std::vector<std::uint8_t> read_config(FrontendClient& c) {
  std::vector<std::uint8_t> zeros(8, 0);
  auto req = vhost_user::make_config(FrontendRequest::get_config, 0, 0, zeros);
  auto r = c.request_reply(std::move(*req));
  EXPECT_TRUE(r.has_value());
  if (!r) return {};
  auto cfg = vhost_user::decode_config(*r);
  return {cfg->bytes().begin(), cfg->bytes().end()};
}

TEST(DeviceStateTransfer, EchoStateGoesFromOneBackEndToAnother) {
  Rig source({.iommu = true, .gpa_form = true});
  source.bring_up();
  ASSERT_TRUE(source.client->device_state());
  source.traffic(kA + 0x100000, 50, 11);
  const std::uint8_t written[2] = {0xaa, 0xbb};
  ASSERT_TRUE(
      source.client
          ->request_ack(*vhost_user::make_config(FrontendRequest::set_config, 2, 0, written))
          .has_value());
  // Suspended first: every ring stopped.
  ASSERT_EQ(*source.client->stop_queue(0), 50u);
  auto state = source.client->save_device_state();
  ASSERT_TRUE(state.has_value()) << state.error();
  auto decoded = decode_device_state(*state);
  ASSERT_TRUE(decoded.has_value());
  EXPECT_EQ(decoded->header.format.kind, "echo");
  EXPECT_EQ(decoded->header.queues, 1u);

  Rig destination({});
  ASSERT_TRUE(destination.client->negotiate({}).has_value());
  ASSERT_TRUE(destination.client->set_mem_table(destination.mem).has_value());
  EXPECT_EQ(read_config(*destination.client), (std::vector<std::uint8_t>{1, 2, 3, 4, 5, 6, 7, 8}));
  auto loaded = destination.client->load_device_state(*state);
  ASSERT_TRUE(loaded.has_value()) << loaded.error();
  EXPECT_EQ(read_config(*destination.client),
            (std::vector<std::uint8_t>{1, 2, 0xaa, 0xbb, 5, 6, 7, 8}));
  EXPECT_EQ(destination.device.chains.load(), 50u);
  // The source can save again (a migration that failed and is tried again).
  auto again = source.client->save_device_state();
  ASSERT_TRUE(again.has_value()) << again.error();
  EXPECT_EQ(*again, *state);
}

TEST(DeviceStateTransfer, AStateLargerThanAPipeMovesWhileTheControlThreadAnswers) {
  constexpr std::size_t kBytes = 8 << 20;  // 8 MiB against a 64 KiB pipe
  BulkStateDevice a(kBytes), b(16);
  Served src(a), dst(b);
  ASSERT_TRUE(src.client->negotiate({}).has_value());
  ASSERT_TRUE(dst.client->negotiate({}).has_value());
  auto state = src.client->save_device_state();
  ASSERT_TRUE(state.has_value()) << state.error();
  EXPECT_GT(state->size(), kBytes);
  auto loaded = dst.client->load_device_state(*state);
  ASSERT_TRUE(loaded.has_value()) << loaded.error();
  EXPECT_EQ(b.blob_, a.blob_);
}

TEST(DeviceStateTransfer, RefusedOutsideTheSuspendedStateOrWithBadParameters) {
  Rig rig({});
  rig.bring_up();  // queue 0 runs
  auto running = rig.client->save_device_state();
  ASSERT_FALSE(running.has_value());
  EXPECT_NE(running.error().find("refused"), std::string::npos) << running.error();
  ASSERT_TRUE(rig.client->stop_queue(0).has_value());
  // Bits 0-7 an error, bit 8 "no fd": for a direction or phase the spec does not define.
  auto [r1, w1] = make_pipe();
  std::uint64_t v = set_state_fd(*rig.client, 2, 0, std::move(w1));
  EXPECT_NE(v & 0xff, 0u);
  EXPECT_NE(v & kDeviceStateNoFdMask, 0u);
  auto [r2, w2] = make_pipe();
  v = set_state_fd(*rig.client, 0, 1, std::move(w2));
  EXPECT_NE(v & 0xff, 0u);
  EXPECT_NE(v & kDeviceStateNoFdMask, 0u);
  // Nothing to check before any transfer.
  EXPECT_NE(check_state(*rig.client), 0u);
  // Without the protocol feature.
  ASSERT_TRUE(
      rig.client
          ->send(make_request(FrontendRequest::set_protocol_features,
                              rig.client->protocol_features() &
                                  ~vhost_user::bit(vhost_user::ProtocolFeature::device_state)))
          .has_value());
  auto [r3, w3] = make_pipe();
  v = set_state_fd(*rig.client, 0, 0, std::move(w3));
  EXPECT_NE(v & 0xff, 0u);
  EXPECT_NE(check_state(*rig.client), 0u);
}

TEST(DeviceStateTransfer, ASecondTransferWaitsAndAFrontEndThatGoesAwayIsSurvived) {
  BulkStateDevice a(1 << 20);
  Served s(a);
  ASSERT_TRUE(s.client->negotiate({}).has_value());
  // A save whose reader reads nothing: the back-end's thread blocks on the full pipe.
  auto [rd, wr] = make_pipe();
  EXPECT_EQ(set_state_fd(*s.client, 0, 0, std::move(wr)), kDeviceStateNoFdMask);
  std::this_thread::sleep_for(20ms);
  auto [rd2, wr2] = make_pipe();
  std::uint64_t v = set_state_fd(*s.client, 0, 0, std::move(wr2));
  EXPECT_NE(v & 0xff, 0u) << "a second transfer started while the first ran";
  // The front-end goes away: the back-end's write fails with EPIPE (no SIGPIPE kills the
  // process), and CHECK_DEVICE_STATE reports the failure at once.
  rd.reset();
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_NE(check_state(*s.client), 0u);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);
  // The session goes on: a proper save works.
  auto state = s.client->save_device_state();
  ASSERT_TRUE(state.has_value()) << state.error();
  EXPECT_GT(state->size(), 1u << 20);
}

TEST(DeviceStateTransfer, AFrontEndThatChecksWithoutReadingDoesNotHangTheBackEnd) {
  BulkStateDevice a(1 << 20);
  BackendOptions o;
  o.state_transfer_grace = 300ms;
  Served s(a, o);
  ASSERT_TRUE(s.client->negotiate({}).has_value());
  auto [rd, wr] = make_pipe();
  EXPECT_EQ(set_state_fd(*s.client, 0, 0, std::move(wr)), kDeviceStateNoFdMask);
  // CHECK while the state is still in the pipe: the back-end waits the grace period, then
  // gives the transfer up as failed and goes on.
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_NE(check_state(*s.client), 0u);
  const auto waited = std::chrono::steady_clock::now() - t0;
  EXPECT_GE(waited, 300ms);
  EXPECT_LT(waited, 10s);
  auto qn = s.client->request_reply(make_request(FrontendRequest::get_queue_num));
  ASSERT_TRUE(qn.has_value());
}

TEST(DeviceStateTransfer, HostileStatesAreRefusedAndLeaveTheDeviceAsItWas) {
  Rig source({});
  ASSERT_TRUE(source.client->negotiate({}).has_value());
  const std::uint8_t written[1] = {0x77};
  ASSERT_TRUE(
      source.client
          ->request_ack(*vhost_user::make_config(FrontendRequest::set_config, 0, 0, written))
          .has_value());
  auto good = source.client->save_device_state();
  ASSERT_TRUE(good.has_value()) << good.error();

  Rig dst({});
  ASSERT_TRUE(dst.client->negotiate({}).has_value());
  const auto initial = read_config(*dst.client);
  auto refused = [&](std::span<const std::uint8_t> image, const std::string& why) {
    auto r = dst.client->load_device_state(image);
    EXPECT_FALSE(r.has_value()) << why;
    EXPECT_EQ(read_config(*dst.client), initial) << why;
  };
  // Corrupted in transit: one byte of the records.
  auto corrupted = *good;
  corrupted[corrupted.size() / 2] ^= 0x10;
  refused(corrupted, "a corrupted state");
  refused({}, "an empty state");
  std::vector<std::uint8_t> junk(1000, 0x41);
  refused(junk, "not a state");
  // Well-formed images of the wrong device.
  BulkStateDevice bulk(10);
  DeviceStateWriter w;
  bulk.save_state(w);
  refused(*encode_device_state({bulk.state_format(), 1}, w), "another kind of device");
  DeviceStateWriter echo;
  echo.bytes(1, std::vector<std::uint8_t>(8, 9));
  echo.u64(2, 1);
  refused(*encode_device_state({{"echo", 2}, 1}, echo), "a newer state version");
  refused(*encode_device_state({{"echo", 1}, 2}, echo), "another number of queues");
  DeviceStateWriter short_config;
  short_config.bytes(1, std::vector<std::uint8_t>(3, 9));
  short_config.u64(2, 1);
  refused(*encode_device_state({{"echo", 1}, 1}, short_config), "a record the device refuses");
  // More than the limit: the back-end stops reading and says so; no SIGPIPE here either.
  std::vector<std::uint8_t> huge(kMaxDeviceStateBytes + 4096, 0);
  refused(huge, "a state beyond the limit");
  // And the good one still loads.
  auto ok = dst.client->load_device_state(*good);
  ASSERT_TRUE(ok.has_value()) << ok.error();
  EXPECT_EQ(read_config(*dst.client)[0], 0x77);
}

TEST(DeviceStateTransfer, AStateBeingLoadedIsInPlaceBeforeTheFirstRingStarts) {
  Rig source({});
  ASSERT_TRUE(source.client->negotiate({}).has_value());
  const std::uint8_t written[1] = {0x5c};
  ASSERT_TRUE(
      source.client
          ->request_ack(*vhost_user::make_config(FrontendRequest::set_config, 7, 0, written))
          .has_value());
  auto state = source.client->save_device_state();
  ASSERT_TRUE(state.has_value());

  Rig rig({});
  ASSERT_TRUE(rig.client->negotiate({}).has_value());
  ASSERT_TRUE(rig.client->set_mem_table(rig.mem).has_value());
  // A front-end that starts a ring before CHECK_DEVICE_STATE: the load completes first.
  auto [rd, wr] = make_pipe();
  ASSERT_EQ(set_state_fd(*rig.client, 1, 0, std::move(rd)), kDeviceStateNoFdMask);
  ASSERT_EQ(::write(wr.get(), state->data(), state->size()), static_cast<ssize_t>(state->size()));
  wr.reset();
  auto drv = VirtioDriver::create(rig.mem, DriverOptions{.size = 16});
  ASSERT_TRUE(rig.client->start_queue(0, rig.mem, *drv).has_value());
  EXPECT_EQ(read_config(*rig.client)[7], 0x5c);
  EXPECT_EQ(check_state(*rig.client), 0u);  // the outcome is kept for the check
}

// A back-end that answers SET_DEVICE_STATE_FD with a channel of its own (the spec lets it):
// the front-end must use that one and drop its pipe.
TEST(DeviceStateTransfer, TheFrontEndUsesTheChannelTheBackEndReturns) {
  using vhost_user::ProtocolFeature;
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  const std::vector<std::uint8_t> saved = {'s', 't', 'a', 't', 'e', '!'};
  std::vector<std::uint8_t> loaded;
  std::thread fake([&, fd = UniqueFd(sv[0])] {
    bool loading = false;
    UniqueFd load_end;
    while (auto m = vhost_user::read_message(fd.get())) {
      std::optional<Message> reply;
      switch (m->frontend_request()) {
        case FrontendRequest::get_features:
          reply = vhost_user::make_u64_reply(
              *m, virtio::bit(vhost_user::kFProtocolFeatures) | virtio::bit(virtio::kFVersion1));
          break;
        case FrontendRequest::get_protocol_features:
          reply = vhost_user::make_u64_reply(*m, vhost_user::bit(ProtocolFeature::device_state));
          break;
        case FrontendRequest::set_device_state_fd: {
          auto t = vhost_user::decode_payload<DeviceStateTransfer>(*m);
          auto [r, w] = make_pipe();
          reply = vhost_user::make_u64_reply(*m, 0);  // success, an fd of ours
          loading = t->direction == 1;
          if (loading) {
            reply->fds.push_back(std::move(w));
            load_end = std::move(r);
          } else {
            EXPECT_EQ(::write(w.get(), saved.data(), saved.size()),
                      static_cast<ssize_t>(saved.size()));
            reply->fds.push_back(std::move(r));
          }
          break;
        }
        case FrontendRequest::check_device_state: {
          if (loading) {
            std::uint8_t buf[64];
            ssize_t n;
            while ((n = ::read(load_end.get(), buf, sizeof buf)) > 0)
              loaded.insert(loaded.end(), buf, buf + n);
          }
          reply = vhost_user::make_u64_reply(*m, 0);
          break;
        }
        default:
          if (m->need_reply()) reply = vhost_user::make_ack(*m, true);
          break;
      }
      if (reply) (void)vhost_user::write_message(fd.get(), *reply);
    }
  });
  auto client = FrontendClient::adopt(UniqueFd(sv[1]));
  ASSERT_TRUE(client->negotiate({}).has_value());
  ASSERT_TRUE(client->device_state());
  auto s = client->save_device_state();
  ASSERT_TRUE(s.has_value()) << s.error();
  EXPECT_EQ(*s, saved);
  const std::vector<std::uint8_t> out = {1, 2, 3, 4, 5};
  auto l = client->load_device_state(out);
  ASSERT_TRUE(l.has_value()) << l.error();
  client->close();
  fake.join();
  EXPECT_EQ(loaded, out);
}

// ---- Device reset -------------------------------------------------------------------

enum class ResetBy { reset_device, status_zero };

class DeviceReset : public ::testing::TestWithParam<std::tuple<ResetBy, bool>> {};

// Reset in the middle of traffic with the vIOMMU and dirty logging on, then a driver
// initialises the device again from scratch and uses it.
TEST_P(DeviceReset, InTheMiddleOfTrafficThenAFullReinitialisation) {
  auto [by, packed] = GetParam();
  Rig rig({.iommu = true, .gpa_form = true, .packed = packed});
  rig.bring_up();
  const std::uint64_t log_bytes = (kB + kBSize) / 4096 / 8 + 8;
  ASSERT_TRUE(rig.client->enable_logging(log_bytes).has_value());
  ASSERT_TRUE(rig.client->driver_ok().has_value());
  const std::uint8_t written[1] = {0xee};
  ASSERT_TRUE(
      rig.client->request_ack(*vhost_user::make_config(FrontendRequest::set_config, 0, 0, written))
          .has_value());
  rig.traffic(kA + 0x100000, 30, 21);
  // Chains in flight when the reset lands.
  for (int i = 0; i < 8; ++i) {
    std::vector<DriverBuffer> bufs{{Gpa(kB + i * 0x2000), 64, false},
                                   {Gpa(kB + i * 0x2000 + 0x1000), 64, true}};
    ASSERT_TRUE(rig.drv->add(bufs).has_value());
  }
  rig.kick();
  ASSERT_TRUE(rig.server.space().iommu());
  ASSERT_TRUE(rig.server.space().logging());
  const std::uint64_t resets = rig.device.resets.load();
  auto r = by == ResetBy::reset_device ? rig.client->reset_device() : rig.client->set_status(0);
  ASSERT_TRUE(r.has_value()) << r.error();

  // Clean: no features (so neither the IOMMU nor logging), no IOTLB entry, status 0, the
  // device's own reset, its config back to the initial one.
  EXPECT_FALSE(rig.server.space().iommu());
  EXPECT_FALSE(rig.server.space().logging());
  EXPECT_EQ(rig.server.space().iotlb().size(), 0u);
  EXPECT_EQ(rig.device.resets.load(), resets + 1);
  auto st = rig.client->request_reply(make_request(FrontendRequest::get_status));
  ASSERT_TRUE(st.has_value());
  EXPECT_EQ(*vhost_user::decode_u64(*st), 0u);
  EXPECT_EQ(read_config(*rig.client)[0], 1);
  // Nothing more lands in the old log once the reset is acknowledged.
  DirtyLog* old_log = rig.client->log();
  (void)old_log->fetch_and_clear(0, log_bytes * 8, [](std::uint64_t) {});

  // The driver starts over: features, fresh rings, logging again, traffic.
  std::uint64_t features = rig.client->features() & ~virtio::bit(virtio::kVhostFLogAll);
  ASSERT_TRUE(rig.client->set_features(features).has_value());
  DriverOptions d;
  d.packed = packed;
  d.size = 32;
  d.indirect = true;
  d.event_idx = true;
  d.iommu = &rig.viommu;
  auto fresh = VirtioDriver::create(rig.mem, d);
  ASSERT_TRUE(fresh.has_value()) << fresh.error();
  rig.drv.emplace(std::move(*fresh));
  auto n = rig.client->start_queue(0, rig.mem, *rig.drv);
  ASSERT_TRUE(n.has_value()) << n.error();
  rig.notifiers = std::move(*n);
  ASSERT_TRUE(rig.client->driver_ok().has_value());
  EXPECT_TRUE(rig.server.space().iommu());
  rig.traffic(kA + 0x100000, 40, 22);
  std::uint64_t stale = 0;
  (void)old_log->fetch_and_clear(0, log_bytes * 8, [&](std::uint64_t) { ++stale; });
  EXPECT_EQ(stale, 0u) << "writes after the reset went to the log with logging off";
  ASSERT_TRUE(rig.client->enable_logging(log_bytes).has_value());
  rig.traffic(kA + 0x100000, 20, 23);
  EXPECT_TRUE(rig.client->log()->test(rig.drv->gpas().device.value / 4096));
  EXPECT_EQ(rig.client->log()->out_of_range_count(), 0u);
}

INSTANTIATE_TEST_SUITE_P(ResetDeviceOrStatusZero, DeviceReset,
                         ::testing::Combine(::testing::Values(ResetBy::reset_device,
                                                              ResetBy::status_zero),
                                            ::testing::Bool()));

// QEMU 7.2 stops a device with SET_STATUS(0) first and GET_VRING_BASE after: the ring's
// position must survive the reset for that one GET_VRING_BASE.
TEST(DeviceReset, GetVringBaseAfterSetStatusZeroReturnsWhereTheRingStopped) {
  for (bool packed : {false, true}) {
    SCOPED_TRACE(packed ? "packed" : "split");
    Rig rig({.packed = packed});
    rig.bring_up();
    rig.traffic(kA + 0x100000, 37, 31);
    ASSERT_TRUE(rig.client->set_status(0).has_value());
    auto base = rig.client->stop_queue(0);
    ASSERT_TRUE(base.has_value());
    if (packed) {
      // 37 chains of 2 descriptors (indirect: 1 each) through a 64-entry ring.
      EXPECT_EQ(*base & 0x7fff, 37u);
      EXPECT_EQ(*base >> 16, *base & 0xffff);
    } else {
      EXPECT_EQ(*base, 37u);
    }
    // Read once: the ring is forgotten afterwards.
    EXPECT_EQ(*rig.client->stop_queue(0), 0u);
  }
}

}  // namespace
}  // namespace vhostkit
