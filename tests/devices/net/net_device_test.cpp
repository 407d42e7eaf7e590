// NetDevice driven by our front-end and driver model over a real Unix socket: config
// space, headers, source frames, loopback (with back-pressure, mergeable buffers, the
// vIOMMU, packed rings), malformed transmit chains, a real TAP interface, and its device
// state (MAC, MTU, counters, waiting frames) from one back-end to another.
#include <arpa/inet.h>
#include <linux/if.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <deque>
#include <map>
#include <thread>

#include <gtest/gtest.h>

#include "vhostkit/devices/net.h"
#include "vhostkit/frontend/frontend_client.h"
#include "vhostkit/vhost_user/backend_server.h"

namespace vhostkit {
namespace {

using namespace frontend;
using namespace std::chrono_literals;

constexpr std::uint64_t kRam = 0x40000, kRamSize = 0x800000;  // at an odd GPA

std::uint64_t bit(unsigned b) {
  return 1ULL << b;
}

struct NetRigOptions {
  NetOptions net;
  bool iommu = false;
  bool packed = false;
  bool mrg = true;
  std::uint32_t rx_buf = 2048;  // receive buffer size
};

// One queue pair of a NetDevice served on a socketpair, with driver models for both.
struct NetRig {
  NetRigOptions opt;
  std::unique_ptr<NetDevice> device;
  std::unique_ptr<BackendServer> server;
  std::thread server_thread;
  std::unique_ptr<FrontendClient> client;
  GuestMemory mem = std::move(*GuestMemory::create({{Gpa(kRam), kRamSize}}));
  Viommu viommu{ViommuMode::strict};
  std::optional<VirtioDriver> rx, tx;
  RingNotifiers rx_n, tx_n;
  Gpa rx_area, tx_area;
  std::map<std::uint16_t, Gpa> rx_bufs;  // id -> buffer
  std::vector<Gpa> rx_free;

  explicit NetRig(NetRigOptions o) : opt(std::move(o)) {
    auto d = NetDevice::create(opt.net);
    EXPECT_TRUE(d.has_value()) << d.error();
    device = std::move(*d);
    server = std::make_unique<BackendServer>(*device);
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    server_thread = std::thread([this, fd = sv[0]] { server->serve(UniqueFd(fd)); });
    client = FrontendClient::adopt(UniqueFd(sv[1]));
  }
  ~NetRig() {
    client->close();
    server->stop();
    server_thread.join();
  }
  void bring_up() {
    negotiate_and_map();
    start_rings();
  }
  // Negotiation and the memory table: where a migration's destination loads the state.
  void negotiate_and_map() {
    ClientOptions co;
    co.want_features = bit(virtio::kFRingIndirectDesc) | bit(virtio::kFRingEventIdx) |
                       bit(kNetFMac) | bit(kNetFStatus) | bit(kNetFMtu);
    if (opt.mrg) co.want_features |= bit(kNetFMrgRxbuf);
    if (opt.iommu) co.want_features |= bit(virtio::kFAccessPlatform);
    if (opt.packed) co.want_features |= bit(virtio::kFRingPacked);
    ASSERT_TRUE(client->negotiate(co).has_value());
    ASSERT_TRUE(client->set_mem_table(mem).has_value());
    if (opt.iommu) client->attach_viommu(viommu, mem);
  }
  void start_rings() {
    DriverOptions d;
    d.packed = opt.packed;
    d.size = 128;
    d.event_idx = true;
    d.iommu = opt.iommu ? &viommu : nullptr;
    auto r = VirtioDriver::create(mem, d);
    ASSERT_TRUE(r.has_value()) << r.error();
    rx.emplace(std::move(*r));
    auto t = VirtioDriver::create(mem, d);
    ASSERT_TRUE(t.has_value()) << t.error();
    tx.emplace(std::move(*t));
    rx_area = *mem.alloc(128 * std::uint64_t{opt.rx_buf}, 4096);
    tx_area = *mem.alloc(128 * 2048, 4096);
    for (std::uint64_t i = 0; i < 128; ++i) rx_free.push_back(Gpa(rx_area.value + i * opt.rx_buf));
    auto rn = client->start_queue(0, mem, *rx);
    ASSERT_TRUE(rn.has_value()) << rn.error();
    rx_n = std::move(*rn);
    auto tn = client->start_queue(1, mem, *tx);
    ASSERT_TRUE(tn.has_value()) << tn.error();
    tx_n = std::move(*tn);
    ASSERT_TRUE(client->driver_ok().has_value());
  }
  static void kick(VirtioDriver& d, const RingNotifiers& n) {
    if (d.kick_needed()) {
      std::uint64_t one = 1;
      ASSERT_EQ(::write(n.kick.get(), &one, 8), 8);
    }
  }
  // Posts up to `count` receive buffers.
  void post_rx(std::size_t count) {
    for (std::size_t i = 0; i < count && !rx_free.empty() && rx->free_descriptors() > 0; ++i) {
      Gpa g = rx_free.back();
      DriverBuffer b{g, opt.rx_buf, true};
      auto id = rx->add(std::span(&b, 1));
      ASSERT_TRUE(id.has_value()) << id.error();
      rx_free.pop_back();
      rx_bufs[*id] = g;
    }
    kick(*rx, rx_n);
  }
  // Collects received packets (reassembling mergeable ones): each is header + frame.
  std::vector<std::vector<std::uint8_t>> pending_parts;
  std::size_t parts_left = 0;
  void poll_rx(std::vector<std::vector<std::uint8_t>>& out) {
    while (auto u = rx->poll()) {
      Gpa g = rx_bufs.at(u->id);
      rx_bufs.erase(u->id);
      std::vector<std::uint8_t> data(u->len);
      ASSERT_TRUE(mem.read(g, data));
      rx_free.push_back(g);
      if (parts_left == 0) {
        ASSERT_GE(data.size(), 12u);
        std::uint16_t nb = static_cast<std::uint16_t>(data[10] | (data[11] << 8));
        ASSERT_GE(nb, 1);
        parts_left = nb;
        pending_parts.clear();
      }
      pending_parts.push_back(std::move(data));
      if (--parts_left == 0) {
        std::vector<std::uint8_t> whole;
        for (auto& p : pending_parts) whole.insert(whole.end(), p.begin(), p.end());
        out.push_back(std::move(whole));
      }
    }
  }
  // Sends one frame (header + frame in one buffer, or split header / frame).
  std::size_t tx_slot = 0;
  bool send(std::span<const std::uint8_t> frame, bool split_header = false) {
    if (tx->free_descriptors() < 2) return false;
    Gpa g(tx_area.value + (tx_slot++ % 128) * 2048);
    std::vector<std::uint8_t> buf(12, 0);
    buf.insert(buf.end(), frame.begin(), frame.end());
    EXPECT_TRUE(mem.write(g, buf));
    std::vector<DriverBuffer> bufs;
    if (split_header) {
      bufs = {{g, 12, false}, {Gpa(g.value + 12), static_cast<std::uint32_t>(frame.size()), false}};
    } else {
      bufs = {{g, static_cast<std::uint32_t>(buf.size()), false}};
    }
    auto id = tx->add(bufs);
    EXPECT_TRUE(id.has_value()) << id.error();
    return id.has_value();
  }
  void reap_tx() {
    while (tx->poll()) {
    }
  }
};

std::vector<std::uint8_t> test_frame(std::size_t len, std::uint32_t n) {
  std::vector<std::uint8_t> f(len);
  for (std::size_t i = 0; i < len; ++i) f[i] = static_cast<std::uint8_t>(i * 7 + n);
  std::memcpy(f.data() + 14, &n, 4);
  return f;
}

TEST(NetDevice, RejectsBadOptions) {
  NetOptions o;
  o.queue_pairs = 0;
  EXPECT_FALSE(NetDevice::create(o).has_value());
  o = {};
  o.packet_size = 59;
  EXPECT_FALSE(NetDevice::create(o).has_value());
  o = {};
  o.mode = NetMode::tap;
  EXPECT_FALSE(NetDevice::create(o).has_value());  // no interface name
  EXPECT_FALSE(parse_net_mode("bridge").has_value());
  EXPECT_FALSE(parse_mac("52:54:00:12:34").has_value());
  EXPECT_FALSE(parse_mac("52:54:00:12:34:zz").has_value());
  auto mac = parse_mac("02:aB:00:12:34:ff");
  ASSERT_TRUE(mac.has_value());
  EXPECT_EQ((*mac)[1], 0xab);
  EXPECT_EQ((*mac)[5], 0xff);
}

TEST(NetDevice, ConfigSpaceFeaturesAndHeaderLength) {
  NetOptions o;
  o.queue_pairs = 4;
  o.mtu = 9000;
  o.mac = {2, 1, 2, 3, 4, 5};
  auto d = std::move(*NetDevice::create(o));
  auto c = d->config();
  ASSERT_EQ(c.size(), 12u);
  EXPECT_EQ(std::vector<std::uint8_t>(c.begin(), c.begin() + 6),
            (std::vector<std::uint8_t>{2, 1, 2, 3, 4, 5}));
  EXPECT_EQ(c[6] | (c[7] << 8), kNetSLinkUp);
  EXPECT_EQ(c[8] | (c[9] << 8), 4);
  EXPECT_EQ(c[10] | (c[11] << 8), 9000);
  EXPECT_EQ(d->num_queues(), 8u);
  EXPECT_TRUE(d->device_features() & bit(kNetFMq));
  EXPECT_TRUE(d->device_features() & bit(kNetFMrgRxbuf));
  d->set_features(0);
  EXPECT_EQ(d->header_len(), 10u);  // legacy header without MRG_RXBUF
  d->set_features(bit(kNetFMrgRxbuf));
  EXPECT_EQ(d->header_len(), 12u);
  d->set_features(1ULL << 32);
  EXPECT_EQ(d->header_len(), 12u);
  o.queue_pairs = 1;
  EXPECT_FALSE(std::move(*NetDevice::create(o))->device_features() & bit(kNetFMq));
}

TEST(NetDevice, SourceFillsEveryReceiveBufferWithMarkedSequencedFrames) {
  NetRigOptions o;
  o.net.mode = NetMode::source;
  o.net.packet_size = 100;
  NetRig rig(o);
  rig.bring_up();
  std::vector<std::vector<std::uint8_t>> got;
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (got.size() < 500 && std::chrono::steady_clock::now() < deadline) {
    rig.post_rx(128);
    rig.poll_rx(got);
    std::this_thread::sleep_for(100us);
  }
  ASSERT_GE(got.size(), 500u);
  for (std::size_t i = 0; i < 500; ++i) {
    const auto& p = got[i];
    ASSERT_EQ(p.size(), 12u + 100u);
    EXPECT_EQ(p[10], 1);  // num_buffers
    for (int k = 0; k < 10; ++k) EXPECT_EQ(p[k], 0) << "header byte " << k;
    EXPECT_EQ(0, std::memcmp(p.data() + 12 + 14, kNetSourceMarker.data(), 8));
    std::uint64_t seq = 0;
    std::memcpy(&seq, p.data() + 12 + 26, 8);
    EXPECT_EQ(seq, i);
  }
  EXPECT_GE(rig.device->stats(0).packets, 500u);
}

TEST(NetDevice, SourceRateLimitHoldsThePace) {
  NetRigOptions o;
  o.net.mode = NetMode::source;
  o.net.rate_pps = 2000;
  NetRig rig(o);
  rig.bring_up();
  std::vector<std::vector<std::uint8_t>> got;
  auto start = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - start < 500ms) {
    rig.post_rx(128);
    rig.poll_rx(got);
    std::this_thread::sleep_for(1ms);
  }
  // 2000 pps for 0.5 s: about 1000 frames; a generous band for a loaded machine, but
  // an unlimited source would deliver tens of thousands.
  EXPECT_GT(got.size(), 300u);
  EXPECT_LT(got.size(), 1300u);
}

class NetLoopback : public ::testing::TestWithParam<std::tuple<bool, bool>> {};

TEST_P(NetLoopback, EveryFrameComesBackInOrderUnderBackPressure) {
  auto [iommu, packed] = GetParam();
  NetRigOptions o;
  o.net.mode = NetMode::loopback;
  o.net.loopback_depth = 16;  // small: the transmit side must wait for the receive side
  o.iommu = iommu;
  o.packed = packed;
  NetRig rig(o);
  rig.bring_up();
  constexpr std::uint32_t kFrames = 600;
  std::uint32_t sent = 0;
  std::uint64_t rounds = 0;
  std::vector<std::vector<std::uint8_t>> got;
  auto deadline = std::chrono::steady_clock::now() + 20s;
  while (got.size() < kFrames) {
    ASSERT_LT(std::chrono::steady_clock::now(), deadline)
        << "sent " << sent << " got " << got.size();
    while (sent < kFrames && rig.send(test_frame(60 + sent % 1400, sent), sent % 3 == 0)) ++sent;
    NetRig::kick(*rig.tx, rig.tx_n);
    rig.reap_tx();
    // Receive buffers only now and then: frames wait in the loopback.
    if (++rounds % 8 == 0) rig.post_rx(32);
    rig.poll_rx(got);
    std::this_thread::sleep_for(50us);
  }
  for (std::uint32_t i = 0; i < kFrames; ++i) {
    auto want = test_frame(60 + i % 1400, i);
    ASSERT_EQ(got[i].size(), 12 + want.size()) << i;
    ASSERT_EQ(0, std::memcmp(got[i].data() + 12, want.data(), want.size())) << i;
  }
  EXPECT_EQ(rig.device->stats(1).packets, kFrames);
  EXPECT_EQ(rig.device->stats(0).dropped, 0u);
}

INSTANTIATE_TEST_SUITE_P(IommuPacked, NetLoopback,
                         ::testing::Combine(::testing::Bool(), ::testing::Bool()));

TEST(NetDevice, MergeableBuffersCarryAFrameLargerThanOneBuffer) {
  NetRigOptions o;
  o.net.mode = NetMode::loopback;
  o.rx_buf = 512;
  NetRig rig(o);
  rig.bring_up();
  rig.post_rx(64);
  auto f = test_frame(1500, 77);
  ASSERT_TRUE(rig.send(f));
  NetRig::kick(*rig.tx, rig.tx_n);
  std::vector<std::vector<std::uint8_t>> got;
  auto deadline = std::chrono::steady_clock::now() + 5s;
  while (got.empty() && std::chrono::steady_clock::now() < deadline) {
    rig.poll_rx(got);
    std::this_thread::sleep_for(100us);
  }
  ASSERT_EQ(got.size(), 1u);
  ASSERT_EQ(got[0].size(), 12u + 1500u);
  EXPECT_EQ(got[0][10], 3);  // 1512 bytes in 512-byte buffers: num_buffers 3
  EXPECT_EQ(0, std::memcmp(got[0].data() + 12, f.data(), f.size()));
}

TEST(NetDevice, WithoutMergeableBuffersATooLargeFrameIsDroppedNotTruncated) {
  NetRigOptions o;
  o.net.mode = NetMode::loopback;
  o.rx_buf = 512;
  o.mrg = false;
  NetRig rig(o);
  rig.bring_up();
  rig.post_rx(8);
  ASSERT_TRUE(rig.send(test_frame(1500, 1)));
  ASSERT_TRUE(rig.send(test_frame(200, 2)));
  NetRig::kick(*rig.tx, rig.tx_n);
  std::vector<std::uint32_t> lens;
  auto deadline = std::chrono::steady_clock::now() + 5s;
  while (lens.size() < 2 && std::chrono::steady_clock::now() < deadline) {
    while (auto u = rig.rx->poll()) lens.push_back(u->len);
    std::this_thread::sleep_for(100us);
  }
  EXPECT_EQ(lens, (std::vector<std::uint32_t>{0, 212}));
  EXPECT_EQ(rig.device->stats(0).dropped, 1u);
}

TEST(NetDevice, MalformedTransmitChainsAreCountedAndCompleted) {
  NetRigOptions o;
  o.net.mode = NetMode::sink;
  NetRig rig(o);
  rig.bring_up();
  // Shorter than a virtio-net header plus an Ethernet header.
  Gpa g = rig.tx_area;
  DriverBuffer b{g, 20, false};
  ASSERT_TRUE(rig.tx->add(std::span(&b, 1)).has_value());
  ASSERT_TRUE(rig.send(test_frame(60, 1)));
  NetRig::kick(*rig.tx, rig.tx_n);
  int done = 0;
  auto deadline = std::chrono::steady_clock::now() + 5s;
  while (done < 2 && std::chrono::steady_clock::now() < deadline) {
    while (rig.tx->poll()) ++done;
    std::this_thread::sleep_for(100us);
  }
  EXPECT_EQ(done, 2);
  EXPECT_EQ(rig.device->stats(1).dropped, 1u);
  EXPECT_EQ(rig.device->stats(1).packets, 1u);
  EXPECT_EQ(rig.device->stats(1).bytes, 60u);
}

// --sink-read: the sink copies every frame out of the guest (bytes_read), split header or
// not; without it, it only counts them.
TEST(NetDevice, SinkReadCopiesEveryFrameOut) {
  for (bool read : {false, true}) {
    NetRigOptions o;
    o.net.mode = NetMode::sink;
    o.net.sink_read = read;
    NetRig rig(o);
    rig.bring_up();
    ASSERT_TRUE(rig.send(test_frame(60, 1)));
    ASSERT_TRUE(rig.send(test_frame(1514, 2), true));
    NetRig::kick(*rig.tx, rig.tx_n);
    int done = 0;
    auto deadline = std::chrono::steady_clock::now() + 5s;
    while (done < 2 && std::chrono::steady_clock::now() < deadline) {
      while (rig.tx->poll()) ++done;
      std::this_thread::sleep_for(100us);
    }
    EXPECT_EQ(done, 2);
    EXPECT_EQ(rig.device->stats(1).packets, 2u);
    EXPECT_EQ(rig.device->stats(1).bytes, 60u + 1514u);
    EXPECT_EQ(rig.device->stats(1).bytes_read, read ? 60u + 1514u : 0u) << "sink_read " << read;
  }
}

// A real TAP interface: frames the guest sends appear on the interface (seen with a
// packet socket), frames sent on the interface reach the guest.
TEST(NetDevice, TapCarriesFramesBothWays) {
  UniqueFd ctl(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (::access("/dev/net/tun", R_OK | W_OK) != 0 || ::geteuid() != 0)
    GTEST_SKIP() << "needs root and /dev/net/tun";
  NetRigOptions o;
  o.net.mode = NetMode::tap;
  o.net.tap = "vktest" + std::to_string(::getpid() % 100000);
  NetRig rig(o);
  rig.bring_up();
  // Bring the interface up.
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, rig.device->tap_name().c_str(), IFNAMSIZ - 1);
  ASSERT_EQ(::ioctl(ctl.get(), SIOCGIFFLAGS, &ifr), 0);
  ifr.ifr_flags |= IFF_UP;
  ASSERT_EQ(::ioctl(ctl.get(), SIOCSIFFLAGS, &ifr), 0);
  ASSERT_EQ(::ioctl(ctl.get(), SIOCGIFINDEX, &ifr), 0);
  UniqueFd pkt(::socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, htons(0x88b5)));
  ASSERT_TRUE(pkt.valid());
  sockaddr_ll sll{};
  sll.sll_family = AF_PACKET;
  sll.sll_protocol = htons(0x88b5);
  sll.sll_ifindex = ifr.ifr_ifindex;
  ASSERT_EQ(::bind(pkt.get(), reinterpret_cast<sockaddr*>(&sll), sizeof sll), 0);

  auto frame = [](std::uint32_t n) {
    std::vector<std::uint8_t> f(128, 0);
    for (int i = 0; i < 6; ++i) f[i] = 0xff;
    f[6] = 0x02;
    f[11] = 0x09;
    f[12] = 0x88;
    f[13] = 0xb5;
    std::memcpy(f.data() + 14, &n, 4);
    for (std::size_t i = 18; i < f.size(); ++i) f[i] = static_cast<std::uint8_t>(i + n);
    return f;
  };
  // Guest -> tap.
  for (std::uint32_t n = 0; n < 20; ++n) ASSERT_TRUE(rig.send(frame(n)));
  NetRig::kick(*rig.tx, rig.tx_n);
  std::vector<std::vector<std::uint8_t>> seen;
  auto deadline = std::chrono::steady_clock::now() + 5s;
  while (seen.size() < 20 && std::chrono::steady_clock::now() < deadline) {
    std::vector<std::uint8_t> buf(2048);
    ssize_t n = ::recv(pkt.get(), buf.data(), buf.size(), 0);
    if (n > 0) {
      buf.resize(static_cast<std::size_t>(n));
      seen.push_back(buf);
    } else {
      std::this_thread::sleep_for(1ms);
    }
    rig.reap_tx();
  }
  ASSERT_EQ(seen.size(), 20u);
  for (std::uint32_t n = 0; n < 20; ++n) EXPECT_EQ(seen[n], frame(n)) << n;
  // Tap -> guest.
  rig.post_rx(64);
  for (std::uint32_t n = 100; n < 120; ++n) {
    auto f = frame(n);
    ASSERT_EQ(
        ::sendto(pkt.get(), f.data(), f.size(), 0, reinterpret_cast<sockaddr*>(&sll), sizeof sll),
        static_cast<ssize_t>(f.size()));
  }
  std::vector<std::vector<std::uint8_t>> got;
  deadline = std::chrono::steady_clock::now() + 5s;
  while (got.size() < 20 && std::chrono::steady_clock::now() < deadline) {
    rig.poll_rx(got);
    std::this_thread::sleep_for(1ms);
  }
  // The kernel may also send its own frames (none with our ethertype): keep ours.
  std::vector<std::vector<std::uint8_t>> ours;
  for (auto& p : got)
    if (p.size() >= 12 + 14 && p[12 + 12] == 0x88 && p[12 + 13] == 0xb5)
      ours.emplace_back(p.begin() + 12, p.end());
  ASSERT_EQ(ours.size(), 20u);
  for (std::uint32_t n = 0; n < 20; ++n) EXPECT_EQ(ours[n], frame(100 + n)) << n;
}

// ---- Device state -------------------------------------------------------------------

// Frames the guest sent into a loopback that nobody received yet, the counters, the MAC
// and MTU: all of it goes from one back-end to another, and the destination delivers the
// waiting frames once its receive ring runs.
TEST(NetDeviceState, MacMtuCountersAndWaitingFramesMoveToAnotherBackEnd) {
  NetRigOptions so;
  so.net.mode = NetMode::loopback;
  so.net.loopback_depth = 32;
  so.net.mac = {0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc};
  so.net.mtu = 1500;
  NetRig src(so);
  src.bring_up();
  // Some traffic both ways, then frames that wait: no receive buffer posted for them.
  src.post_rx(8);
  for (std::uint32_t i = 0; i < 5; ++i) ASSERT_TRUE(src.send(test_frame(100, i)));
  NetRig::kick(*src.tx, src.tx_n);
  std::vector<std::vector<std::uint8_t>> got;
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (got.size() < 5 && std::chrono::steady_clock::now() < deadline) {
    src.poll_rx(got);
    src.reap_tx();
    std::this_thread::sleep_for(1ms);
  }
  ASSERT_EQ(got.size(), 5u);
  // The 3 receive buffers left take 3 more; 10 wait.
  for (std::uint32_t i = 5; i < 18; ++i) ASSERT_TRUE(src.send(test_frame(200 + i, i)));
  NetRig::kick(*src.tx, src.tx_n);
  deadline = std::chrono::steady_clock::now() + 10s;
  while ((src.device->stats(1).packets < 18 || got.size() < 8) &&
         std::chrono::steady_clock::now() < deadline) {
    src.poll_rx(got);
    src.reap_tx();
    std::this_thread::sleep_for(1ms);
  }
  ASSERT_EQ(src.device->stats(1).packets, 18u);
  ASSERT_EQ(got.size(), 8u);
  ASSERT_TRUE(src.client->stop_queue(0).has_value());
  ASSERT_TRUE(src.client->stop_queue(1).has_value());
  EXPECT_EQ(src.device->waiting_frames(0), 10u);
  auto state = src.client->save_device_state();
  ASSERT_TRUE(state.has_value()) << state.error();

  NetRigOptions dopt = so;
  dopt.net.mac = {0x02, 0, 0, 0, 0, 1};
  dopt.net.mtu = 9000;
  NetRig dst(dopt);
  dst.negotiate_and_map();
  auto loaded = dst.client->load_device_state(*state);
  ASSERT_TRUE(loaded.has_value()) << loaded.error();
  EXPECT_EQ(dst.device->mac(), so.net.mac);
  EXPECT_EQ(dst.device->mtu(), 1500);
  auto cfg = dst.device->config();
  EXPECT_EQ(std::vector<std::uint8_t>(cfg.begin(), cfg.begin() + 6),
            std::vector<std::uint8_t>(so.net.mac.begin(), so.net.mac.end()));
  EXPECT_EQ(cfg[10] | (cfg[11] << 8), 1500);
  for (std::uint32_t q = 0; q < 2; ++q) {
    EXPECT_EQ(dst.device->stats(q).packets, src.device->stats(q).packets) << q;
    EXPECT_EQ(dst.device->stats(q).bytes, src.device->stats(q).bytes) << q;
    EXPECT_EQ(dst.device->stats(q).dropped, src.device->stats(q).dropped) << q;
  }
  EXPECT_EQ(dst.device->waiting_frames(0), 10u);
  dst.start_rings();
  dst.post_rx(16);
  std::vector<std::vector<std::uint8_t>> later;
  deadline = std::chrono::steady_clock::now() + 10s;
  while (later.size() < 10 && std::chrono::steady_clock::now() < deadline) {
    dst.poll_rx(later);
    std::this_thread::sleep_for(1ms);
  }
  ASSERT_EQ(later.size(), 10u);
  for (std::uint32_t i = 0; i < 10; ++i) {
    auto want = test_frame(200 + 8 + i, 8 + i);
    ASSERT_EQ(later[i].size(), 12 + want.size()) << i;
    EXPECT_EQ(0, std::memcmp(later[i].data() + 12, want.data(), want.size())) << i;
  }
  EXPECT_EQ(dst.device->stats(0).packets, 18u);
  // A reset returns the configured MAC and MTU.
  ASSERT_TRUE(dst.client->set_status(0).has_value());
  EXPECT_EQ(dst.device->mac(), dopt.net.mac);
  EXPECT_EQ(dst.device->mtu(), 9000);
}

TEST(NetDeviceState, WaitingFramesADestinationCannotDeliverCountAsDropped) {
  NetOptions lo;
  lo.mode = NetMode::loopback;
  auto src = std::move(*NetDevice::create(lo));
  // A loopback source with frames waiting is easiest built from a state.
  DeviceStateWriter frames, pair, pairs, queues, w;
  for (std::uint16_t i = 0; i < 3; ++i) frames.bytes(i, test_frame(64, i));
  pair.u64(1, 0);
  pair.group(2, frames);
  pairs.group(0, pair);
  for (std::uint16_t q = 0; q < 2; ++q) {
    DeviceStateWriter c;
    c.u64(1, 10 + q);
    c.u64(2, 1000);
    c.u64(3, 1);
    queues.group(q, c);
  }
  w.bytes(1, std::vector<std::uint8_t>{2, 0, 0, 0, 0, 7});
  w.u64(2, 1500);
  w.u64(3, 0);
  w.u64(4, 1);
  w.group(5, queues);
  w.group(6, pairs);
  auto image = encode_device_state({{"virtio-net", 1}, 2}, w);
  ASSERT_TRUE(image.has_value());
  auto d = decode_device_state(*image);
  ASSERT_TRUE(d.has_value());
  ASSERT_TRUE(src->load_state(d->records, 1).has_value());
  EXPECT_EQ(src->waiting_frames(0), 3u);
  // Round trip through save: the same image.
  DeviceStateWriter again;
  src->save_state(again);
  EXPECT_EQ(*encode_device_state({src->state_format(), 2}, again), *image);
  // A sink has nowhere to put them.
  NetOptions so;
  so.mode = NetMode::sink;
  auto sink = std::move(*NetDevice::create(so));
  ASSERT_TRUE(sink->load_state(d->records, 1).has_value());
  EXPECT_EQ(sink->stats(0).dropped, 1u + 3u);
  EXPECT_EQ(sink->stats(1).dropped, 1u);
  EXPECT_EQ(sink->stats(0).packets, 10u);
}

TEST(NetDeviceState, HostileStatesAreRefusedAndTheDeviceIsUnchanged) {
  NetOptions o;
  o.mode = NetMode::loopback;
  auto dev = std::move(*NetDevice::create(o));
  struct Case {
    const char* what;
    std::vector<std::uint8_t> mac = {2, 0, 0, 0, 0, 9};
    std::uint64_t mtu = 1500, features = bit(kNetFMac), pairs = 1;
    std::size_t frame = 64;
    bool drop_queues = false;
  };
  auto build = [](const Case& c) {
    DeviceStateWriter frames, pair, pairs, queues, w;
    frames.bytes(0, std::vector<std::uint8_t>(c.frame, 1));
    pair.u64(1, 0);
    pair.group(2, frames);
    pairs.group(0, pair);
    for (std::uint16_t q = 0; q < 2; ++q) {
      DeviceStateWriter one;
      one.u64(1, 1);
      one.u64(2, 1);
      one.u64(3, 1);
      queues.group(q, one);
    }
    w.bytes(1, c.mac);
    w.u64(2, c.mtu);
    w.u64(3, c.features);
    w.u64(4, c.pairs);
    if (!c.drop_queues) w.group(5, queues);
    w.group(6, pairs);
    return *encode_device_state({{"virtio-net", 1}, 2}, w);
  };
  const Case good{"good"};
  for (const Case& c :
       {Case{"short MAC", {2, 0, 0}}, Case{"MTU below 68", {2, 0, 0, 0, 0, 9}, 20},
        Case{"MTU above 65535", {2, 0, 0, 0, 0, 9}, 70000},
        Case{"a feature not offered", {2, 0, 0, 0, 0, 9}, 1500, bit(1)},
        Case{"more queue pairs", {2, 0, 0, 0, 0, 9}, 1500, bit(kNetFMac), 2},
        Case{"a frame shorter than an Ethernet header",
             {2, 0, 0, 0, 0, 9},
             1500,
             bit(kNetFMac),
             1,
             5},
        Case{"no counters", {2, 0, 0, 0, 0, 9}, 1500, bit(kNetFMac), 1, 64, true}}) {
    auto image = build(c);
    auto d = decode_device_state(image);
    ASSERT_TRUE(d.has_value()) << c.what;
    auto r = dev->load_state(d->records, 1);
    EXPECT_FALSE(r.has_value()) << c.what;
    EXPECT_EQ(dev->mac(), o.mac) << c.what;
    EXPECT_EQ(dev->waiting_frames(0), 0u) << c.what;
    EXPECT_EQ(dev->stats(0).packets, 0u) << c.what;
  }
  auto image = build(good);
  auto d = decode_device_state(image);
  ASSERT_TRUE(dev->load_state(d->records, 1).has_value());
  EXPECT_EQ(dev->waiting_frames(0), 1u);
}

// Frames read from the tap and waiting for receive buffers when the device is reset are
// dropped, and the slots they occupied take full-size frames again (before, a slot cut to
// a short frame's size stayed cut: the next frame read into it was zeroed past the short
// frame's length).
TEST(NetDeviceState, TapFramesWaitingAtAResetAreDroppedAndTheSlotsReused) {
  if (::access("/dev/net/tun", R_OK | W_OK) != 0 || ::geteuid() != 0)
    GTEST_SKIP() << "needs root and /dev/net/tun";
  NetRigOptions o;
  o.net.mode = NetMode::tap;
  o.net.tap = "vkreset" + std::to_string(::getpid() % 100000);
  NetRig rig(o);
  rig.bring_up();
  UniqueFd ctl(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  // No IPv6 on the interface: the kernel then sends nothing of its own into the tap, and
  // our frames are the ones that land in the slots.
  if (FILE* f = std::fopen(
          ("/proc/sys/net/ipv6/conf/" + rig.device->tap_name() + "/disable_ipv6").c_str(), "w")) {
    std::fputs("1", f);
    std::fclose(f);
  }
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, rig.device->tap_name().c_str(), IFNAMSIZ - 1);
  ASSERT_EQ(::ioctl(ctl.get(), SIOCGIFFLAGS, &ifr), 0);
  ifr.ifr_flags |= IFF_UP;
  ASSERT_EQ(::ioctl(ctl.get(), SIOCSIFFLAGS, &ifr), 0);
  ASSERT_EQ(::ioctl(ctl.get(), SIOCGIFINDEX, &ifr), 0);
  UniqueFd pkt(::socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, htons(0x88b5)));
  ASSERT_TRUE(pkt.valid());
  sockaddr_ll sll{};
  sll.sll_family = AF_PACKET;
  sll.sll_protocol = htons(0x88b5);
  sll.sll_ifindex = ifr.ifr_ifindex;
  ASSERT_EQ(::bind(pkt.get(), reinterpret_cast<sockaddr*>(&sll), sizeof sll), 0);
  auto frame = [](std::size_t len, std::uint32_t n) {
    std::vector<std::uint8_t> f(len, static_cast<std::uint8_t>(n));
    for (int i = 0; i < 6; ++i) f[i] = 0xff;
    f[6] = 0x02;
    f[12] = 0x88;
    f[13] = 0xb5;
    std::memcpy(f.data() + 14, &n, 4);
    return f;
  };
  auto inject = [&](std::size_t len, std::uint32_t n) {
    auto f = frame(len, n);
    ASSERT_EQ(
        ::sendto(pkt.get(), f.data(), f.size(), 0, reinterpret_cast<sockaddr*>(&sll), sizeof sll),
        static_cast<ssize_t>(f.size()));
  };
  // A short frame with no receive buffer: the receive queue reads it from the tap into a
  // slot and keeps it there.
  inject(60, 1);
  std::this_thread::sleep_for(200ms);
  ASSERT_TRUE(rig.client->stop_queue(0).has_value());
  ASSERT_TRUE(rig.client->stop_queue(1).has_value());
  EXPECT_GE(rig.device->waiting_frames(0), 1u);  // ours, and whatever the kernel sent
  ASSERT_TRUE(rig.client->set_status(0).has_value());
  EXPECT_EQ(rig.device->waiting_frames(0), 0u);
  // The driver starts over and receives full-size frames through the same slots.
  ASSERT_TRUE(rig.client->set_features(rig.client->features()).has_value());
  rig.rx_free.clear();
  rig.rx_bufs.clear();
  rig.start_rings();
  rig.post_rx(64);
  for (std::uint32_t n = 100; n < 110; ++n) inject(1514, n);
  std::vector<std::vector<std::uint8_t>> got;
  auto deadline = std::chrono::steady_clock::now() + 5s;
  while (got.size() < 10 && std::chrono::steady_clock::now() < deadline) {
    rig.poll_rx(got);
    std::this_thread::sleep_for(1ms);
  }
  std::vector<std::vector<std::uint8_t>> ours;
  for (auto& p : got)
    if (p.size() >= 12 + 14 && p[12 + 12] == 0x88 && p[12 + 13] == 0xb5)
      ours.emplace_back(p.begin() + 12, p.end());
  // The frame that waited at the reset is gone; the new ones arrive whole.
  ASSERT_EQ(ours.size(), 10u);
  for (std::uint32_t n = 0; n < 10; ++n) EXPECT_EQ(ours[n], frame(1514, 100 + n)) << n;
}

}  // namespace
}  // namespace vhostkit
