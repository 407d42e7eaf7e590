// Our front-end against our back-end over a real Unix socket: the full lifecycle,
// IOTLB misses and invalidations while traffic runs, logging with a memory-table change,
// disconnect and reconnect, hostile messages, and no fd leaks.
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

}  // namespace
}  // namespace vhostkit
