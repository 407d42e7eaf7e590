// The virtio-blk device state (docs/vhost-user.md, "Device state"): the completions a
// queue still owes the driver, the serial and the counters go from one back-end to
// another; the destination pushes those completions before anything else once its ring
// starts. A state for another disk or other options, or a malformed one, is refused and
// leaves the device as it was; a reset drops the owed completions.
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>

#include <gtest/gtest.h>

#include "vhostkit/devices/blk.h"
#include "vhostkit/frontend/frontend_client.h"
#include "vhostkit/vhost_user/backend_server.h"
#include "vhostkit/vhost_user/device_state.h"

namespace vhostkit {
namespace {

using namespace blk;
using namespace std::chrono_literals;
using frontend::ClientOptions;
using frontend::DriverBuffer;
using frontend::DriverOptions;
using frontend::FrontendClient;
using frontend::GuestMemory;
using frontend::VirtioDriver;

constexpr std::uint64_t kImageBytes = 8ull << 20;

struct Image {
  std::string path;
  explicit Image(std::uint64_t bytes = kImageBytes) {
    char tmpl[] = "/tmp/vhostkit-blk-state.XXXXXX";
    int fd = ::mkstemp(tmpl);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(::ftruncate(fd, static_cast<off_t>(bytes)), 0);
    ::close(fd);
    path = tmpl;
  }
  ~Image() { ::unlink(path.c_str()); }
};

// A BlkDevice served on a socketpair.
struct Served {
  std::unique_ptr<BlkDevice> device;
  std::unique_ptr<BackendServer> server;
  std::thread thread;
  std::unique_ptr<FrontendClient> client;
  explicit Served(BlkOptions o) {
    auto d = BlkDevice::open(std::move(o));
    EXPECT_TRUE(d.has_value()) << d.error();
    device = std::move(*d);
    server = std::make_unique<BackendServer>(*device);
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    thread = std::thread([this, fd = sv[0]] { server->serve(UniqueFd(fd)); });
    client = FrontendClient::adopt(UniqueFd(sv[1]));
    ClientOptions co;
    co.want_features = virtio::bit(kFFlush) | virtio::bit(kFBlkSize) | virtio::bit(kFSegMax) |
                       virtio::bit(kFConfigWce);
    auto n = client->negotiate(co);
    EXPECT_TRUE(n.has_value()) << n.error();
  }
  ~Served() {
    client->close();
    server->stop();
    thread.join();
  }
};

BlkOptions options(const Image& image, std::string serial) {
  BlkOptions o;
  o.path = image.path;
  o.serial = std::move(serial);
  o.engine = BlkEngine::sync;
  o.queues = 1;
  return o;
}

// A virtio-blk state as BlkDevice writes it (version 1; the record layout of
// docs/vhost-user.md), for a device with config space `config`.
struct BlkStateSpec {
  std::vector<std::uint8_t> config;
  std::string serial = "source-serial";
  std::uint64_t features = virtio::bit(kFFlush) | virtio::bit(virtio::kFVersion1);
  std::uint64_t reads = 41;
  std::vector<Completion> completions;
  std::size_t completion_bytes = 8;  // per completion (8 is right)
  std::uint32_t queues = 1;
};

std::vector<std::uint8_t> blk_state(const BlkStateSpec& s) {
  DeviceStateWriter w, stats, queues;
  w.bytes(1, s.config);
  w.text(2, s.serial);
  w.u64(3, s.features);
  for (std::uint16_t i = 1; i <= 9; ++i) stats.u64(i, i == 1 ? s.reads : 100 + i);
  w.group(4, stats);
  for (std::uint32_t q = 0; q < s.queues; ++q) {
    std::vector<std::uint8_t> done;
    for (const Completion& c : s.completions) {
      std::uint8_t b[8];
      std::memcpy(b, &c.id, 2);
      std::memcpy(b + 2, &c.ring_descs, 2);
      std::memcpy(b + 4, &c.len, 4);
      done.insert(done.end(), b, b + s.completion_bytes);
    }
    DeviceStateWriter one;
    one.bytes(1, done);
    queues.group(static_cast<std::uint16_t>(q), one);
  }
  w.group(5, queues);
  return *encode_device_state({{"virtio-blk", 1}, 1}, w);
}

TEST(BlkDeviceState, OwedCompletionsSerialAndCountersMoveAndArePushedFirst) {
  Image image;
  auto mem = GuestMemory::create({{Gpa(0x100000), 4 << 20}});
  ASSERT_TRUE(mem.has_value());
  auto drv = VirtioDriver::create(*mem, DriverOptions{.size = 16});
  ASSERT_TRUE(drv.has_value());
  // A read the source took from the ring and finished, but whose completion did not reach
  // the used ring before the ring stopped: its data and status are in guest memory.
  Gpa hdr = *mem->alloc(16, 16), data = *mem->alloc(4096, 4096), status = *mem->alloc(1, 1);
  std::uint8_t h[16] = {};
  std::memcpy(h, &kTIn, 4);
  ASSERT_TRUE(mem->write(hdr, h));
  std::vector<std::uint8_t> payload(4096, 0x3c);
  ASSERT_TRUE(mem->write(data, payload));
  *mem->host(status, 1) = kSOk;
  std::vector<DriverBuffer> bufs{{hdr, 16, false}, {data, 4096, true}, {status, 1, true}};
  auto id = drv->add(bufs);
  ASSERT_TRUE(id.has_value());
  const std::uint32_t base = drv->avail_idx();  // the source consumed it

  Served source(options(image, "source-serial"));
  BlkStateSpec spec;
  spec.config = source.device->config();
  spec.completions = {Completion{*id, 3, 4096 + 1}};
  auto loaded = source.client->load_device_state(blk_state(spec));
  ASSERT_TRUE(loaded.has_value()) << loaded.error();
  EXPECT_EQ(source.device->pending_completions(0), 1u);
  auto state = source.client->save_device_state();
  ASSERT_TRUE(state.has_value()) << state.error();

  Served destination(options(image, "other-serial"));
  ASSERT_TRUE(destination.client->set_mem_table(*mem).has_value());
  auto r = destination.client->load_device_state(*state);
  ASSERT_TRUE(r.has_value()) << r.error();
  EXPECT_EQ(destination.device->stats().reads.load(), 41u);
  EXPECT_EQ(destination.device->stats().writes.load(), 102u);
  auto n = destination.client->start_queue(0, *mem, *drv, base);
  ASSERT_TRUE(n.has_value()) << n.error();
  ASSERT_TRUE(destination.client->driver_ok().has_value());
  std::optional<frontend::UsedBuffer> u;
  auto deadline = std::chrono::steady_clock::now() + 5s;
  while (!(u = drv->poll()) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(1ms);
  ASSERT_TRUE(u.has_value()) << "the owed completion never arrived";
  EXPECT_EQ(u->id, *id);
  EXPECT_EQ(u->len, 4097u);
  EXPECT_EQ(*mem->host(status, 1), kSOk);
  // The destination serves new requests, under the source's serial.
  Gpa idh = *mem->alloc(16, 16), idb = *mem->alloc(kIdBytes, 16), ids = *mem->alloc(1, 1);
  std::uint8_t gh[16] = {};
  std::memcpy(gh, &kTGetId, 4);
  ASSERT_TRUE(mem->write(idh, gh));
  *mem->host(ids, 1) = 0xff;
  std::vector<DriverBuffer> get_id{{idh, 16, false}, {idb, kIdBytes, true}, {ids, 1, true}};
  ASSERT_TRUE(drv->add(get_id).has_value());
  std::uint64_t one = 1;
  ASSERT_EQ(::write(n->kick.get(), &one, 8), 8);
  deadline = std::chrono::steady_clock::now() + 5s;
  while (!(u = drv->poll()) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(1ms);
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(*mem->host(ids, 1), kSOk);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(mem->host(idb, 13)), 13), "source-serial");
  ASSERT_TRUE(destination.client->stop_queue(0).has_value());
  EXPECT_EQ(destination.device->pending_completions(0), 0u);
}

TEST(BlkDeviceState, AnotherDiskOrOtherOptionsAreRefused) {
  Image image, bigger(2 * kImageBytes);
  Served source(options(image, "s"));
  auto state = source.client->save_device_state();
  ASSERT_TRUE(state.has_value()) << state.error();
  Served other_disk(options(bigger, "s"));
  EXPECT_FALSE(other_disk.client->load_device_state(*state).has_value());
  BlkOptions o = options(image, "s");
  o.seg_max = 7;
  Served other_options(o);
  EXPECT_FALSE(other_options.client->load_device_state(*state).has_value());
  Served same(options(image, "s"));
  auto r = same.client->load_device_state(*state);
  EXPECT_TRUE(r.has_value()) << r.error();
}

// The cache mode the source's driver chose (CONFIG_WCE) moves with the state; it is the
// one config field allowed to differ from the destination's own.
TEST(BlkDeviceState, TheDriversCacheModeMoves) {
  Image image;
  Served source(options(image, "s"));
  auto wt = vhost_user::make_config(vhost_user::FrontendRequest::set_config, kCfgWriteback, 0,
                                    std::vector<std::uint8_t>{0});
  ASSERT_TRUE(wt.has_value());
  ASSERT_TRUE(source.client->request_ack(std::move(*wt)).has_value());
  ASSERT_EQ(source.device->config()[kCfgWriteback], 0);
  auto state = source.client->save_device_state();
  ASSERT_TRUE(state.has_value()) << state.error();
  Served destination(options(image, "s"));
  ASSERT_EQ(destination.device->config()[kCfgWriteback], 1);
  auto r = destination.client->load_device_state(*state);
  ASSERT_TRUE(r.has_value()) << r.error();
  EXPECT_EQ(destination.device->config()[kCfgWriteback], 0);
}

TEST(BlkDeviceState, MalformedStatesLeaveTheDeviceAsItWas) {
  Image image;
  auto dev = std::move(*BlkDevice::open(options(image, "mine")));
  BlkStateSpec good;
  good.config = dev->config();
  good.completions = {Completion{3, 1, 1}};
  auto refused = [&](const BlkStateSpec& s, const char* what) {
    auto image_bytes = blk_state(s);
    auto d = decode_device_state(image_bytes);
    ASSERT_TRUE(d.has_value()) << what;
    EXPECT_FALSE(dev->load_state(d->records, 1).has_value()) << what;
    EXPECT_EQ(dev->stats().reads.load(), 0u) << what;
    EXPECT_EQ(dev->pending_completions(0), 0u) << what;
  };
  BlkStateSpec s = good;
  s.completion_bytes = 7;
  refused(s, "a completion record of 7 bytes");
  s = good;
  s.completions = {Completion{3, 0, 1}};
  refused(s, "a completion of no descriptor");
  s = good;
  s.serial = std::string(21, 's');
  refused(s, "a serial longer than 20 bytes");
  s = good;
  s.features |= virtio::bit(0);  // VIRTIO_BLK_F_BARRIER: not offered
  refused(s, "a feature this device does not offer");
  s = good;
  s.queues = 2;
  refused(s, "two queues' completions for one queue");
  s = good;
  s.config.resize(60);
  refused(s, "a shorter config space");
  const auto good_image = blk_state(good);  // the reader is a view of it
  auto d = decode_device_state(good_image);
  ASSERT_TRUE(dev->load_state(d->records, 1).has_value());
  EXPECT_EQ(dev->pending_completions(0), 1u);
  EXPECT_EQ(dev->stats().reads.load(), 41u);
}

TEST(BlkDeviceState, AResetDropsTheOwedCompletions) {
  Image image;
  Served s(options(image, "r"));
  BlkStateSpec spec;
  spec.config = s.device->config();
  spec.completions = {Completion{1, 1, 1}, Completion{2, 1, 1}};
  ASSERT_TRUE(s.client->load_device_state(blk_state(spec)).has_value());
  EXPECT_EQ(s.device->pending_completions(0), 2u);
  ASSERT_TRUE(s.client->set_status(0).has_value());
  EXPECT_EQ(s.device->pending_completions(0), 0u);
  EXPECT_EQ(s.device->stats().reads.load(), 41u);  // counters keep counting
}

}  // namespace
}  // namespace vhostkit
