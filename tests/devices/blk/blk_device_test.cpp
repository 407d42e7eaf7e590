// The virtio-blk device driven end to end: our FrontendClient + VirtioDriver over a real
// socketpair, a BackendServer serving BlkDevice over a temporary image file. Every
// request type, every malformed request, read-only, both I/O engines, several queues,
// the IOMMU on, dirty logging of data the device writes.
#include <fcntl.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <numeric>
#include <random>
#include <thread>

#include <gtest/gtest.h>

#include "devices/blk/blk_frontend.h"
#include "devices/blk/io_engine.h"
#include "vhostkit/vhost_user/backend_server.h"

namespace vhostkit {
namespace {

using namespace blk;
using frontend::DriverBuffer;
using testing::BlkFrontend;
using testing::BlkFrontendOptions;
using testing::BlkOutcome;

constexpr std::uint64_t kImageBytes = 8ull << 20;  // 16384 sectors
constexpr std::uint64_t kSectors = kImageBytes / kSectorSize;

std::vector<std::uint8_t> pattern(std::size_t n, std::uint32_t seed) {
  std::vector<std::uint8_t> v(n);
  std::mt19937 g(seed);
  for (auto& b : v) b = static_cast<std::uint8_t>(g());
  return v;
}

struct Image {
  std::string path;
  explicit Image(std::uint64_t bytes = kImageBytes) {
    char tmpl[] = "/tmp/vhostkit-blk-test.XXXXXX";
    int fd = ::mkstemp(tmpl);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(::ftruncate(fd, static_cast<off_t>(bytes)), 0);
    ::close(fd);
    path = tmpl;
  }
  ~Image() { ::unlink(path.c_str()); }
  std::vector<std::uint8_t> read(std::uint64_t off, std::size_t len) const {
    std::vector<std::uint8_t> v(len);
    int fd = ::open(path.c_str(), O_RDONLY);
    EXPECT_EQ(::pread(fd, v.data(), len, static_cast<off_t>(off)), static_cast<ssize_t>(len));
    ::close(fd);
    return v;
  }
  void write(std::uint64_t off, std::span<const std::uint8_t> d) const {
    int fd = ::open(path.c_str(), O_WRONLY);
    EXPECT_EQ(::pwrite(fd, d.data(), d.size(), static_cast<off_t>(off)),
              static_cast<ssize_t>(d.size()));
    ::close(fd);
  }
};

// A loop block device over an image, with the given logical sector size (needs root and
// /dev/loop-control; valid() is false without them).
struct LoopDevice {
  std::string path;
  UniqueFd fd;
  LoopDevice(const std::string& image, std::uint32_t sector_size) {
    UniqueFd ctl(::open("/dev/loop-control", O_RDWR | O_CLOEXEC));
    UniqueFd backing(::open(image.c_str(), O_RDWR | O_CLOEXEC));
    if (!ctl.valid() || !backing.valid()) return;
    // Another test (another worktree) may take the free device first: try again.
    for (int attempt = 0; attempt < 5 && path.empty(); ++attempt) {
      int n = ::ioctl(ctl.get(), LOOP_CTL_GET_FREE);
      if (n < 0) return;
      std::string p = "/dev/loop" + std::to_string(n);
      UniqueFd dev(::open(p.c_str(), O_RDWR | O_CLOEXEC));
      if (!dev.valid()) continue;
      loop_config c{};
      c.fd = static_cast<std::uint32_t>(backing.get());
      c.block_size = sector_size;
      c.info.lo_flags = LO_FLAGS_AUTOCLEAR;
      if (::ioctl(dev.get(), LOOP_CONFIGURE, &c) != 0) continue;
      path = p;
      fd = std::move(dev);  // held open: AUTOCLEAR detaches the device when the last closes
    }
  }
  [[nodiscard]] bool valid() const { return !path.empty(); }
};

struct RigConfig {
  BlkEngine engine = BlkEngine::io_uring;
  bool read_only = false;
  std::uint32_t queues = 1;
  bool iommu = false;
  bool packed = false;
  bool direct = false;
  BlkCache cache = BlkCache::writeback;
  std::uint32_t logical_block_size = 512;
  std::uint32_t physical_block_size = 0;
  std::string path = {};  // serve this instead of the rig's image (a block device)
  std::uint64_t blk_features = BlkFrontendOptions{}.blk_features;
};

struct Rig {
  Image image;
  std::unique_ptr<BlkDevice> device;
  std::unique_ptr<BackendServer> server;
  std::thread server_thread;
  std::unique_ptr<BlkFrontend> fe;

  explicit Rig(RigConfig c) {
    BlkOptions o;
    o.path = c.path.empty() ? image.path : c.path;
    o.read_only = c.read_only;
    o.queues = c.queues;
    o.engine = c.engine;
    o.direct = c.direct;
    o.cache = c.cache;
    o.logical_block_size = c.logical_block_size;
    o.physical_block_size = c.physical_block_size;
    o.serial = "vhostkit-serial-0001";
    auto d = BlkDevice::open(o);
    if (!d) {
      ADD_FAILURE() << d.error();
      return;
    }
    device = std::move(*d);
    server = std::make_unique<BackendServer>(*device);
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    server_thread = std::thread([this, fd = sv[0]] { server->serve(UniqueFd(fd)); });
    BlkFrontendOptions fo;
    fo.queues = c.queues;
    fo.iommu = c.iommu;
    fo.packed = c.packed;
    fo.blk_features = c.blk_features;
    fe = std::make_unique<BlkFrontend>(frontend::FrontendClient::adopt(UniqueFd(sv[1])), fo);
    auto s = fe->start();
    EXPECT_TRUE(s.has_value()) << s.error();
  }
  ~Rig() {
    fe.reset();
    if (server) server->stop();
    if (server_thread.joinable()) server_thread.join();
  }
  BlkOutcome req(std::uint32_t type, std::uint64_t sector, std::span<const std::uint8_t> out = {},
                 std::uint32_t in_len = 0, std::uint32_t q = 0) {
    auto r = fe->request(q, type, sector, out, in_len);
    EXPECT_TRUE(r.has_value()) << (r ? "" : r.error());
    return r ? *r : BlkOutcome{};
  }
  // A request whose chain the caller lays out: header bytes, then the given buffers.
  frontend::UsedBuffer raw(std::vector<DriverBuffer> bufs, std::uint32_t q = 0) {
    auto id = fe->add(q, bufs);
    EXPECT_TRUE(id.has_value()) << (id ? "" : id.error());
    auto u = fe->wait(q);
    EXPECT_TRUE(u.has_value());
    return u ? *u : frontend::UsedBuffer{};
  }
  Gpa header(std::uint32_t type, std::uint64_t sector, std::uint32_t len = 16) {
    Gpa g = fe->alloc(len);
    std::uint8_t h[16] = {};
    std::memcpy(h, &type, 4);
    std::memcpy(h + 8, &sector, 8);
    std::memcpy(fe->host(g, len), h, std::min<std::uint32_t>(len, 16));
    return g;
  }
  Gpa status_byte() {
    Gpa g = fe->alloc(1);
    *fe->host(g, 1) = 0xff;
    return g;
  }
};

std::vector<std::uint8_t> range(std::uint64_t sector, std::uint32_t count, std::uint32_t flags) {
  std::vector<std::uint8_t> v(16);
  std::memcpy(v.data(), &sector, 8);
  std::memcpy(v.data() + 8, &count, 4);
  std::memcpy(v.data() + 12, &flags, 4);
  return v;
}

class BlkEngines : public ::testing::TestWithParam<BlkEngine> {};

TEST_P(BlkEngines, ConfigSpaceAndFeatures) {
  Rig rig({.engine = GetParam(), .queues = 2});
  ASSERT_TRUE(rig.device);
  EXPECT_EQ(rig.device->engine(), GetParam());
  auto cfg = rig.device->config();
  ASSERT_EQ(cfg.size(), kConfigSize);
  std::uint64_t cap;
  std::memcpy(&cap, &cfg[kCfgCapacity], 8);
  EXPECT_EQ(cap, kSectors);
  std::uint32_t blk_size, seg_max, size_max;
  std::memcpy(&blk_size, &cfg[kCfgBlkSize], 4);
  std::memcpy(&seg_max, &cfg[kCfgSegMax], 4);
  std::memcpy(&size_max, &cfg[kCfgSizeMax], 4);
  EXPECT_EQ(blk_size, 512u);
  EXPECT_EQ(seg_max, 126u);
  EXPECT_EQ(size_max, 1u << 20);
  std::uint16_t nq;
  std::memcpy(&nq, &cfg[kCfgNumQueues], 2);
  EXPECT_EQ(nq, 2);
  std::uint32_t max_discard;
  std::memcpy(&max_discard, &cfg[kCfgMaxDiscardSectors], 4);
  EXPECT_GT(max_discard, 0u);
  std::uint64_t f = rig.fe->features();
  for (unsigned b : {kFFlush, kFMq, kFBlkSize, kFSegMax, kFSizeMax, kFDiscard, kFWriteZeroes})
    EXPECT_TRUE(f & virtio::bit(b)) << b;
  EXPECT_FALSE(f & virtio::bit(kFRo));
  // GET_CONFIG over the socket returns the same bytes.
  auto m = vhost_user::make_config(vhost_user::FrontendRequest::get_config, 0, 0,
                                   std::vector<std::uint8_t>(60));
  ASSERT_TRUE(m.has_value());
  auto r = rig.fe->client().request_reply(std::move(*m));
  ASSERT_TRUE(r.has_value()) << r.error();
  ASSERT_EQ(r->payload.size(), 72u);
  EXPECT_EQ(std::memcmp(r->payload.data() + 12, cfg.data(), 60), 0);
}

TEST_P(BlkEngines, WriteThenReadBackAndOnDisk) {
  Rig rig({.engine = GetParam()});
  auto data = pattern(64 * 1024, 1);
  auto w = rig.req(kTOut, 100, data);
  EXPECT_EQ(w.status, kSOk);
  EXPECT_EQ(w.used_len, 1u);
  EXPECT_EQ(rig.image.read(100 * 512, data.size()), data);
  auto r = rig.req(kTIn, 100, {}, static_cast<std::uint32_t>(data.size()));
  EXPECT_EQ(r.status, kSOk);
  EXPECT_EQ(r.used_len, data.size() + 1);
  EXPECT_EQ(r.in, data);
  // The last sector of the disk is readable and writable; a zero-length read is fine.
  auto last = pattern(512, 2);
  EXPECT_EQ(rig.req(kTOut, kSectors - 1, last).status, kSOk);
  EXPECT_EQ(rig.req(kTIn, kSectors - 1, {}, 512).in, last);
  EXPECT_EQ(rig.req(kTIn, kSectors, {}, 0).status, kSOk);
  EXPECT_EQ(rig.device->stats().reads.load(), 2u);
}

TEST_P(BlkEngines, ScatteredBuffersAcrossManyDescriptors) {
  Rig rig({.engine = GetParam()});
  // A read into 8 buffers of 512 bytes, the status in its own descriptor; then a write
  // whose header and data share one descriptor.
  auto data = pattern(4096, 3);
  rig.image.write(4096, data);
  std::vector<DriverBuffer> b{{rig.header(kTIn, 8), 16, false}};
  std::vector<Gpa> parts;
  for (int i = 0; i < 8; ++i) {
    parts.push_back(rig.fe->alloc(512));
    b.push_back({parts.back(), 512, true});
  }
  Gpa st = rig.status_byte();
  b.push_back({st, 1, true});
  auto u = rig.raw(b);
  EXPECT_EQ(u.len, 4097u);
  EXPECT_EQ(*rig.fe->host(st, 1), kSOk);
  for (int i = 0; i < 8; ++i)
    EXPECT_EQ(std::memcmp(rig.fe->host(parts[i], 512), data.data() + i * 512, 512), 0);

  Gpa both = rig.fe->alloc(16 + 1024);
  std::uint32_t t = kTOut;
  std::uint64_t sector = 40;
  std::memcpy(rig.fe->host(both, 16), &t, 4);
  std::memset(rig.fe->host(both, 16) + 4, 0, 4);
  std::memcpy(rig.fe->host(both, 16) + 8, &sector, 8);
  auto wd = pattern(1024, 4);
  std::memcpy(rig.fe->host(both, 1040) + 16, wd.data(), 1024);
  Gpa st2 = rig.status_byte();
  rig.raw({{both, 1040, false}, {st2, 1, true}});
  EXPECT_EQ(*rig.fe->host(st2, 1), kSOk);
  EXPECT_EQ(rig.image.read(40 * 512, 1024), wd);
}

TEST_P(BlkEngines, ManyRequestsInFlightWithFlushes) {
  Rig rig({.engine = GetParam()});
  // 48 writes and a flush published at once, then 48 reads at once.
  constexpr int kN = 48;
  std::vector<std::vector<std::uint8_t>> datas;
  std::vector<Gpa> sts;
  auto& fe = *rig.fe;
  for (int i = 0; i < kN + 1; ++i) {
    bool flush = i == kN;
    datas.push_back(flush ? std::vector<std::uint8_t>{} : pattern(4096, 100 + i));
    Gpa d = fe.alloc(4096);
    if (!flush) std::memcpy(fe.host(d, 4096), datas.back().data(), 4096);
    sts.push_back(rig.status_byte());
    std::vector<DriverBuffer> b{{rig.header(flush ? kTFlush : kTOut, i * 8ull), 16, false}};
    if (!flush) b.push_back({d, 4096, false});
    b.push_back({sts.back(), 1, true});
    ASSERT_TRUE(fe.add(0, b, false).has_value());
  }
  fe.publish(0);
  for (int i = 0; i < kN + 1; ++i) ASSERT_TRUE(fe.wait(0).has_value()) << i;
  for (int i = 0; i < kN + 1; ++i) EXPECT_EQ(*fe.host(sts[i], 1), kSOk);
  for (int i = 0; i < kN; ++i) EXPECT_EQ(rig.image.read(i * 4096ull, 4096), datas[i]);
  EXPECT_GE(rig.device->stats().flushes.load(), 1u);
  std::vector<Gpa> ins;
  for (int i = 0; i < kN; ++i) {
    ins.push_back(fe.alloc(4096));
    sts[i] = rig.status_byte();
    std::vector<DriverBuffer> b{
        {rig.header(kTIn, i * 8ull), 16, false}, {ins.back(), 4096, true}, {sts[i], 1, true}};
    ASSERT_TRUE(fe.add(0, b, false).has_value());
  }
  fe.publish(0);
  for (int i = 0; i < kN; ++i) ASSERT_TRUE(fe.wait(0).has_value()) << i;
  for (int i = 0; i < kN; ++i) {
    EXPECT_EQ(*fe.host(sts[i], 1), kSOk);
    EXPECT_EQ(std::memcmp(fe.host(ins[i], 4096), datas[i].data(), 4096), 0) << i;
  }
}

TEST_P(BlkEngines, FlushAndGetId) {
  Rig rig({.engine = GetParam()});
  auto f = rig.req(kTFlush, 0);
  EXPECT_EQ(f.status, kSOk);
  EXPECT_EQ(f.used_len, 1u);
  auto id = rig.req(kTGetId, 0, {}, kIdBytes);
  EXPECT_EQ(id.status, kSOk);
  EXPECT_EQ(id.used_len, kIdBytes + 1);
  EXPECT_EQ(std::string(id.in.begin(), id.in.end()), "vhostkit-serial-0001");
  // A shorter buffer gets what fits.
  auto shortid = rig.req(kTGetId, 0, {}, 8);
  EXPECT_EQ(shortid.status, kSOk);
  EXPECT_EQ(std::string(shortid.in.begin(), shortid.in.end()), "vhostkit");
}

TEST_P(BlkEngines, DiscardAndWriteZeroes) {
  Rig rig({.engine = GetParam()});
  auto data = pattern(64 * 1024, 5);
  rig.image.write(0, data);
  std::vector<std::uint8_t> zeros(8192, 0);
  // Discard 8 KiB at 16 KiB: the file reads back zeros there (a punched hole).
  EXPECT_EQ(rig.req(kTDiscard, 0, range(32, 16, 0)).status, kSOk);
  EXPECT_EQ(rig.image.read(16384, 8192), zeros);
  // Write zeroes, with and without unmap, two ranges in one request.
  auto two = range(0, 16, 0);
  auto second = range(96, 16, kWriteZeroesFlagUnmap);
  two.insert(two.end(), second.begin(), second.end());
  EXPECT_EQ(rig.req(kTWriteZeroes, 0, two).status, kSOk);
  EXPECT_EQ(rig.image.read(0, 8192), zeros);
  EXPECT_EQ(rig.image.read(96 * 512, 8192), zeros);
  // Untouched data survives.
  EXPECT_EQ(rig.image.read(8192, 8192),
            std::vector<std::uint8_t>(data.begin() + 8192, data.begin() + 16384));
}

TEST_P(BlkEngines, UnsupportedRequestTypes) {
  Rig rig({.engine = GetParam()});
  for (std::uint32_t t : {kTGetLifetime, kTSecureErase, 2u, 3u, 0xdeadbeefu}) {
    auto o = rig.req(t, 0, {}, 16);
    EXPECT_EQ(o.status, kSUnsupp) << t;
  }
  EXPECT_EQ(rig.device->stats().unsupported.load(), 5u);
}

TEST_P(BlkEngines, MalformedRequestsFailCleanly) {
  Rig rig({.engine = GetParam()});
  auto data = pattern(4096, 6);
  // Beyond the capacity, straddling the end, overflowing sector arithmetic.
  EXPECT_EQ(rig.req(kTIn, kSectors, {}, 512).status, kSIoErr);
  EXPECT_EQ(rig.req(kTOut, kSectors - 4, data).status, kSIoErr);
  EXPECT_EQ(rig.req(kTIn, ~0ull - 3, {}, 4096).status, kSIoErr);
  EXPECT_EQ(rig.req(kTOut, 1ull << 63, data).status, kSIoErr);
  // Data not a multiple of 512 bytes.
  EXPECT_EQ(rig.req(kTIn, 0, {}, 100).status, kSIoErr);
  EXPECT_EQ(rig.req(kTOut, 0, std::span(data.data(), 700)).status, kSIoErr);
  // A header shorter than 16 bytes.
  Gpa st = rig.status_byte();
  auto u =
      rig.raw({{rig.header(kTIn, 0, 8), 8, false}, {rig.fe->alloc(512), 512, true}, {st, 1, true}});
  EXPECT_EQ(*rig.fe->host(st, 1), kSIoErr);
  EXPECT_EQ(u.len, 1u);
  // No writable byte at all: completed with length 0, nothing written.
  u = rig.raw({{rig.header(kTIn, 0), 16, false}});
  EXPECT_EQ(u.len, 0u);
  EXPECT_EQ(rig.device->stats().no_status.load(), 1u);
  // Discard / write zeroes: bad payload sizes, flags, ranges, counts.
  EXPECT_EQ(rig.req(kTDiscard, 0, {}).status, kSUnsupp);  // no range
  EXPECT_EQ(rig.req(kTDiscard, 0, std::span(range(0, 8, 0).data(), 12)).status, kSUnsupp);
  EXPECT_EQ(rig.req(kTDiscard, 0, range(0, 8, kWriteZeroesFlagUnmap)).status, kSUnsupp);
  EXPECT_EQ(rig.req(kTWriteZeroes, 0, range(0, 8, 2)).status, kSUnsupp);
  EXPECT_EQ(rig.req(kTDiscard, 0, range(kSectors - 4, 8, 0)).status, kSIoErr);
  EXPECT_EQ(rig.req(kTWriteZeroes, 0, range(~0ull - 1, 8, 0)).status, kSIoErr);
  EXPECT_EQ(rig.req(kTWriteZeroes, 0, range(0, (1u << 22) + 1, 0)).status, kSIoErr);
  std::vector<std::uint8_t> many;
  for (int i = 0; i < 17; ++i) {
    auto r = range(static_cast<std::uint64_t>(i) * 8, 8, 0);
    many.insert(many.end(), r.begin(), r.end());
  }
  EXPECT_EQ(rig.req(kTDiscard, 0, many).status, kSUnsupp);
  // After all that the device still works and the image is untouched.
  EXPECT_EQ(rig.image.read(0, 4096), std::vector<std::uint8_t>(4096, 0));
  EXPECT_EQ(rig.req(kTOut, 0, data).status, kSOk);
  EXPECT_EQ(rig.req(kTIn, 0, {}, 4096).in, data);
}

TEST_P(BlkEngines, ReadOnly) {
  Image image;
  auto data = pattern(4096, 7);
  image.write(0, data);
  Rig rig({.engine = GetParam(), .read_only = true});
  rig.image.write(0, data);
  std::uint64_t f = rig.fe->features();
  EXPECT_TRUE(f & virtio::bit(kFRo));
  EXPECT_FALSE(f & virtio::bit(kFDiscard));
  EXPECT_FALSE(f & virtio::bit(kFWriteZeroes));
  EXPECT_EQ(rig.req(kTIn, 0, {}, 4096).in, data);
  EXPECT_EQ(rig.req(kTOut, 0, pattern(4096, 8)).status, kSIoErr);
  EXPECT_EQ(rig.req(kTDiscard, 0, range(0, 8, 0)).status, kSUnsupp);
  EXPECT_EQ(rig.req(kTWriteZeroes, 0, range(0, 8, 0)).status, kSUnsupp);
  EXPECT_EQ(rig.req(kTFlush, 0).status, kSOk);
  EXPECT_EQ(rig.image.read(0, 4096), data);
}

TEST_P(BlkEngines, MultipleQueuesConcurrently) {
  constexpr std::uint32_t kQueues = 4;
  Rig rig({.engine = GetParam(), .queues = kQueues});
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (std::uint32_t q = 0; q < kQueues; ++q)
    threads.emplace_back([&, q] {
      for (int i = 0; i < 32; ++i) {
        std::uint64_t sector = (q * 64 + static_cast<std::uint64_t>(i)) * 8;
        auto d = pattern(4096, q * 1000 + static_cast<std::uint32_t>(i));
        auto w = rig.fe->request(q, kTOut, sector, d, 0);
        auto r = rig.fe->request(q, kTIn, sector, {}, 4096);
        if (!w || !r || w->status != kSOk || r->status != kSOk || r->in != d) ++failures;
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  for (std::uint32_t q = 0; q < kQueues; ++q)
    EXPECT_EQ(rig.image.read((q * 64 + 31) * 4096ull, 4096), pattern(4096, q * 1000 + 31));
}

TEST_P(BlkEngines, IommuOn) {
  Rig rig({.engine = GetParam(), .queues = 2, .iommu = true});
  auto data = pattern(32 * 1024, 9);
  for (std::uint32_t q = 0; q < 2; ++q) {
    EXPECT_EQ(rig.req(kTOut, 64 * q, data, 0, q).status, kSOk);
    auto r = rig.req(kTIn, 64 * q, {}, static_cast<std::uint32_t>(data.size()), q);
    EXPECT_EQ(r.status, kSOk);
    EXPECT_EQ(r.in, data);
    EXPECT_EQ(rig.req(kTGetId, 0, {}, 20, q).status, kSOk);
  }
  EXPECT_GT(rig.fe->client().misses_answered(), 0u);
}

TEST_P(BlkEngines, RingTranslationsInvalidatedWhileRequestsRun) {
  // The guest's IOMMU driver may invalidate everything (a global device-IOTLB flush),
  // rings included, while requests are in flight: the queue must ask for the rings
  // again (pop, and push of a finished batch) and carry on, never break.
  Rig rig({.engine = GetParam(), .iommu = true});
  auto ring = rig.fe->driver(0).addresses();
  std::atomic<bool> done{false};
  std::thread invalidator([&] {
    while (!done.load()) {
      (void)rig.fe->client().iotlb_invalidate(ring.desc, 4096);
      (void)rig.fe->client().iotlb_invalidate(ring.device, 4096);
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });
  int bad = 0;
  for (int i = 0; i < 100 && bad == 0; ++i) {
    auto d = pattern(4096, 500 + static_cast<std::uint32_t>(i));
    auto w = rig.fe->request(0, kTOut, static_cast<std::uint64_t>(i) * 8, d, 0);
    auto r = rig.fe->request(0, kTIn, static_cast<std::uint64_t>(i) * 8, {}, 4096);
    if (!w || !r || w->status != kSOk || r->status != kSOk || r->in != d) ++bad;
  }
  done = true;
  invalidator.join();
  EXPECT_EQ(bad, 0);
  EXPECT_EQ(rig.device->stats().errors.load(), 0u);
  std::printf("pushes that waited for a ring translation: %llu\n",
              static_cast<unsigned long long>(rig.device->stats().push_deferrals.load()));
}

TEST_P(BlkEngines, PackedRing) {
  Rig rig({.engine = GetParam(), .packed = true});
  for (int i = 0; i < 300; ++i) {  // wraps the 128-entry ring
    auto d = pattern(1024, 50 + static_cast<std::uint32_t>(i));
    ASSERT_EQ(rig.req(kTOut, static_cast<std::uint64_t>(i) * 2, d).status, kSOk);
    ASSERT_EQ(rig.req(kTIn, static_cast<std::uint64_t>(i) * 2, {}, 1024).in, d);
  }
}

TEST_P(BlkEngines, ReadsIntoGuestMemoryAreDirtyLogged) {
  Rig rig({.engine = GetParam()});
  std::uint64_t log_bytes = (0x100000 + (64ull << 20)) / 4096 / 8;
  ASSERT_TRUE(rig.fe->client().enable_logging(log_bytes).has_value());
  rig.image.write(0, pattern(16384, 10));
  Gpa buf = rig.fe->alloc(16384 + 4096);
  Gpa aligned((buf.value + 4095) & ~4095ull);
  Gpa st = rig.status_byte();
  rig.raw({{rig.header(kTIn, 0), 16, false}, {aligned, 16384, true}, {st, 1, true}});
  EXPECT_EQ(*rig.fe->host(st, 1), kSOk);
  DirtyLog* log = rig.fe->client().log();
  ASSERT_NE(log, nullptr);
  for (std::uint64_t p = 0; p < 4; ++p) EXPECT_TRUE(log->test(aligned.value / 4096 + p)) << p;
}

// SET_CONFIG over the socket (REPLY_ACK): true if the back-end accepted it.
bool set_config(Rig& rig, std::uint32_t offset, std::vector<std::uint8_t> bytes) {
  auto m = vhost_user::make_config(vhost_user::FrontendRequest::set_config, offset, 0, bytes);
  return m.has_value() && rig.fe->client().request_ack(std::move(*m)).has_value();
}

TEST_P(BlkEngines, BlockSizesAndTopology) {
  // 4 KiB logical blocks on 16 KiB physical ones: the config says so, the capacity is
  // whole logical blocks, and a request not on logical blocks fails.
  Image odd(kImageBytes + 3 * 512);  // three sectors past the last whole 4 KiB block
  Rig rig({.engine = GetParam(),
           .logical_block_size = 4096,
           .physical_block_size = 16384,
           .path = odd.path});
  ASSERT_TRUE(rig.device);
  EXPECT_TRUE(rig.fe->features() & virtio::bit(kFTopology));
  auto cfg = rig.device->config();
  std::uint64_t cap;
  std::uint32_t blk_size, discard_align;
  std::uint16_t min_io;
  std::memcpy(&cap, &cfg[kCfgCapacity], 8);
  std::memcpy(&blk_size, &cfg[kCfgBlkSize], 4);
  std::memcpy(&min_io, &cfg[kCfgMinIoSize], 2);
  std::memcpy(&discard_align, &cfg[kCfgDiscardAlign], 4);
  EXPECT_EQ(cap, kSectors);
  EXPECT_EQ(blk_size, 4096u);
  EXPECT_EQ(cfg[kCfgPhysicalBlockExp], 2);  // 16 KiB = 4 KiB << 2
  EXPECT_EQ(cfg[kCfgAlignmentOffset], 0);
  EXPECT_EQ(min_io, 4);           // one physical block, in logical blocks
  EXPECT_EQ(discard_align, 32u);  // 16 KiB in sectors
  auto data = pattern(8192, 21);
  EXPECT_EQ(rig.req(kTOut, 8, data).status, kSOk);
  EXPECT_EQ(rig.req(kTIn, 8, {}, 8192).in, data);
  EXPECT_EQ(rig.req(kTOut, 9, data).status, kSIoErr);               // not on a 4 KiB block
  EXPECT_EQ(rig.req(kTOut, 16, pattern(512, 22)).status, kSIoErr);  // a partial block
  EXPECT_EQ(rig.req(kTIn, 1, {}, 4096).status, kSIoErr);
  EXPECT_EQ(rig.req(kTIn, kSectors - 8, {}, 4096).status, kSOk);  // the last whole block
  EXPECT_EQ(rig.req(kTIn, kSectors, {}, 4096).status, kSIoErr);   // the partial one
  EXPECT_EQ(rig.req(kTDiscard, 0, range(4, 8, 0)).status, kSIoErr);
  EXPECT_EQ(rig.req(kTWriteZeroes, 0, range(8, 4, 0)).status, kSIoErr);
  EXPECT_EQ(rig.req(kTWriteZeroes, 0, range(8, 8, 0)).status, kSOk);
  EXPECT_EQ(odd.read(8 * 512, 4096), std::vector<std::uint8_t>(4096, 0));
}

TEST_P(BlkEngines, CacheModeThroughConfigSpace) {
  Rig rig({.engine = GetParam()});
  ASSERT_TRUE(rig.device);
  EXPECT_TRUE(rig.fe->features() & virtio::bit(kFConfigWce));
  EXPECT_EQ(rig.device->config()[kCfgWriteback], 1);
  EXPECT_FALSE(rig.device->writethrough());
  auto data = pattern(4096, 23);
  EXPECT_EQ(rig.req(kTOut, 0, data).status, kSOk);
  EXPECT_EQ(rig.device->stats().durable_syncs.load(), 0u);
  // The driver switches to writethrough: every batch with a write ends in an fdatasync
  // before it completes.
  EXPECT_TRUE(set_config(rig, kCfgWriteback, {0}));
  EXPECT_TRUE(rig.device->writethrough());
  EXPECT_EQ(rig.device->config()[kCfgWriteback], 0);
  EXPECT_EQ(rig.req(kTOut, 8, data).status, kSOk);
  EXPECT_EQ(rig.device->stats().durable_syncs.load(), 1u);
  EXPECT_EQ(rig.req(kTWriteZeroes, 0, range(16, 8, 0)).status, kSOk);
  EXPECT_EQ(rig.device->stats().durable_syncs.load(), 2u);
  EXPECT_EQ(rig.req(kTIn, 8, {}, 4096).in, data);  // a read needs none
  EXPECT_EQ(rig.device->stats().durable_syncs.load(), 2u);
  // Hostile config writes: another field, two bytes, a value other than 0 or 1.
  EXPECT_FALSE(set_config(rig, kCfgCapacity, {1}));
  EXPECT_FALSE(set_config(rig, kCfgWriteback, {1, 0}));
  EXPECT_FALSE(set_config(rig, kCfgWriteback, {2}));
  EXPECT_FALSE(set_config(rig, kConfigSize + 100, {1}));
  EXPECT_TRUE(rig.device->writethrough());
  EXPECT_TRUE(set_config(rig, kCfgWriteback, {1}));
  EXPECT_FALSE(rig.device->writethrough());
  EXPECT_EQ(rig.req(kTOut, 8, data).status, kSOk);
  EXPECT_EQ(rig.device->stats().durable_syncs.load(), 2u);
}

TEST_P(BlkEngines, WritethroughOptionAndDriversWithoutFlush) {
  {
    Rig rig({.engine = GetParam(), .cache = BlkCache::writethrough});
    EXPECT_EQ(rig.device->config()[kCfgWriteback], 0);
    EXPECT_EQ(rig.req(kTOut, 0, pattern(4096, 24)).status, kSOk);
    EXPECT_EQ(rig.device->stats().durable_syncs.load(), 1u);
  }
  {
    // A driver that did not take FLUSH (nor CONFIG_WCE) cannot flush: the device writes
    // through, and the driver cannot switch the cache.
    auto f = BlkFrontendOptions{}.blk_features & ~virtio::bit(kFFlush) & ~virtio::bit(kFConfigWce);
    Rig rig({.engine = GetParam(), .blk_features = f});
    EXPECT_TRUE(rig.device->writethrough());
    EXPECT_EQ(rig.req(kTOut, 0, pattern(4096, 25)).status, kSOk);
    EXPECT_EQ(rig.device->stats().durable_syncs.load(), 1u);
    EXPECT_FALSE(set_config(rig, kCfgWriteback, {1}));
  }
}

TEST_P(BlkEngines, DirectIoWithAlignedAndMisalignedBuffers) {
  Rig rig({.engine = GetParam(), .direct = true});
  ASSERT_TRUE(rig.device);
  ASSERT_LE(rig.device->dio_mem_align(), 4096u);
  const std::uint32_t len = 8192;
  auto page = [&](std::uint64_t bytes) {
    Gpa g = rig.fe->alloc(bytes + 8192);
    return Gpa((g.value + 4095) & ~4095ull);
  };
  // Page-aligned guest buffers: straight to the file.
  Gpa out_buf = page(len), in_buf = page(len);
  auto d1 = pattern(len, 26);
  std::memcpy(rig.fe->host(out_buf, len), d1.data(), len);
  Gpa st = rig.status_byte();
  rig.raw({{rig.header(kTOut, 64), 16, false}, {out_buf, len, false}, {st, 1, true}});
  EXPECT_EQ(*rig.fe->host(st, 1), kSOk);
  EXPECT_EQ(rig.image.read(64 * 512, len), d1);
  st = rig.status_byte();
  rig.raw({{rig.header(kTIn, 64), 16, false}, {in_buf, len, true}, {st, 1, true}});
  EXPECT_EQ(*rig.fe->host(st, 1), kSOk);
  EXPECT_EQ(std::vector<std::uint8_t>(rig.fe->host(in_buf, len), rig.fe->host(in_buf, len) + len),
            d1);
  EXPECT_EQ(rig.device->stats().bounced.load(), 0u);
  // Guest buffers one byte off any alignment O_DIRECT takes: bounced, never an error.
  Gpa out_odd(page(len).value + 1), in_odd(page(len).value + 1);
  auto d2 = pattern(len, 27);
  std::memcpy(rig.fe->host(out_odd, len), d2.data(), len);
  st = rig.status_byte();
  rig.raw({{rig.header(kTOut, 256), 16, false}, {out_odd, len, false}, {st, 1, true}});
  EXPECT_EQ(*rig.fe->host(st, 1), kSOk);
  EXPECT_EQ(rig.image.read(256 * 512, len), d2);
  st = rig.status_byte();
  auto u = rig.raw({{rig.header(kTIn, 256), 16, false}, {in_odd, len, true}, {st, 1, true}});
  EXPECT_EQ(*rig.fe->host(st, 1), kSOk);
  EXPECT_EQ(u.len, len + 1);
  EXPECT_EQ(std::vector<std::uint8_t>(rig.fe->host(in_odd, len), rig.fe->host(in_odd, len) + len),
            d2);
  EXPECT_EQ(rig.device->stats().bounced.load(), 2u);
  EXPECT_EQ(rig.device->stats().errors.load(), 0u);
}

TEST_P(BlkEngines, BlockDeviceWithDirectIo) {
  // A loop device with 4 KiB sectors over an image: the capacity comes from
  // BLKGETSIZE64, O_DIRECT needs 4 KiB alignment (a 512-byte request goes through the
  // buffered descriptor instead, never an error), discard and write-zeroes use
  // BLKDISCARD and BLKZEROOUT (the backing file gets a hole and zeros).
  Image backing;
  auto data = pattern(kImageBytes, 28);
  backing.write(0, data);
  LoopDevice loop(backing.path, 4096);
  if (!loop.valid()) GTEST_SKIP() << "no loop device (needs root and /dev/loop-control)";
  Rig rig({.engine = GetParam(), .direct = true, .path = loop.path});
  ASSERT_TRUE(rig.device);
  EXPECT_EQ(rig.device->capacity(), kSectors);
  EXPECT_EQ(rig.device->dio_offset_align(), 4096u);
  EXPECT_EQ(rig.req(kTIn, 8, {}, 4096).in,
            std::vector<std::uint8_t>(data.begin() + 4096, data.begin() + 8192));
  EXPECT_EQ(rig.device->stats().unaligned.load(), 0u);
  auto d1 = pattern(512, 29);
  EXPECT_EQ(rig.req(kTOut, 17, d1).status, kSOk);  // 512 bytes at 8.5 KiB
  EXPECT_EQ(rig.req(kTIn, 16, {}, 4096).in.size(), 4096u);
  auto back = rig.req(kTIn, 17, {}, 512);
  EXPECT_EQ(back.status, kSOk);
  EXPECT_EQ(back.in, d1);
  EXPECT_EQ(rig.device->stats().unaligned.load(), 2u);
  EXPECT_EQ(rig.req(kTFlush, 0).status, kSOk);
  EXPECT_EQ(backing.read(17 * 512, 512), d1);
  EXPECT_EQ(rig.req(kTDiscard, 0, range(64, 64, 0)).status, kSOk);
  EXPECT_EQ(rig.req(kTWriteZeroes, 0, range(256, 16, 0)).status, kSOk);
  EXPECT_EQ(rig.req(kTFlush, 0).status, kSOk);
  EXPECT_EQ(backing.read(256 * 512, 8192), std::vector<std::uint8_t>(8192, 0));
  EXPECT_EQ(rig.req(kTIn, 64, {}, 32768).in, std::vector<std::uint8_t>(32768, 0));
  EXPECT_EQ(rig.device->stats().errors.load(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Engines, BlkEngines,
                         ::testing::Values(BlkEngine::io_uring, BlkEngine::sync),
                         [](const auto& param_info) {
                           return std::string(to_string(param_info.param));
                         });

TEST(BlkDevice, OpenErrors) {
  BlkOptions o;
  o.path = "/nonexistent/image";
  auto d = BlkDevice::open(o);
  ASSERT_FALSE(d.has_value());
  EXPECT_NE(d.error().find("/nonexistent/image"), std::string::npos);
  o.path = "/dev/null";
  EXPECT_FALSE(BlkDevice::open(o).has_value());  // a character device
  Image img;
  o.path = img.path;
  o.queues = 65;
  EXPECT_FALSE(BlkDevice::open(o).has_value());
  o.queues = 2;
  o.workers = 3;  // more workers than queues
  EXPECT_FALSE(BlkDevice::open(o).has_value());
  o.workers = 0;
  for (std::uint32_t bad : {0u, 256u, 768u, 8192u}) {
    o.logical_block_size = bad;
    EXPECT_FALSE(BlkDevice::open(o).has_value()) << bad;
  }
  o.logical_block_size = 4096;
  o.physical_block_size = 2048;  // below the logical block size
  EXPECT_FALSE(BlkDevice::open(o).has_value());
  o.physical_block_size = 12288;  // not a power of two
  EXPECT_FALSE(BlkDevice::open(o).has_value());
  o.physical_block_size = 2u << 20;  // above 1 MiB
  EXPECT_FALSE(BlkDevice::open(o).has_value());
  o.physical_block_size = 0;
  EXPECT_TRUE(BlkDevice::open(o).has_value());
}

TEST(BlkDevice, QueuesDefaultToOnePerCpuAndShareWorkers) {
  Image img;
  BlkOptions o;
  o.path = img.path;
  auto d = BlkDevice::open(o);
  ASSERT_TRUE(d.has_value()) << d.error();
  EXPECT_EQ((*d)->num_queues(), std::min<std::uint32_t>(online_cpus(), 64));
  EXPECT_EQ((*d)->options().workers, (*d)->num_queues());
  for (std::uint32_t q = 0; q < (*d)->num_queues(); ++q) EXPECT_EQ((*d)->worker_of(q), q);
  // Six queues on two workers: queue q on worker q % 2.
  o.queues = 6;
  o.workers = 2;
  auto g = BlkDevice::open(o);
  ASSERT_TRUE(g.has_value()) << g.error();
  for (std::uint32_t q = 0; q < 6; ++q) EXPECT_EQ((*g)->worker_of(q), q % 2);
  std::uint16_t nq;
  auto cfg = (*g)->config();
  std::memcpy(&nq, &cfg[kCfgNumQueues], 2);
  EXPECT_EQ(nq, 6);
}

TEST(BlkDevice, EngineFromEnvironment) {
  Image img;
  BlkOptions o;
  o.path = img.path;
  ::setenv("VHOSTKIT_BLK_ENGINE", "sync", 1);
  auto d = BlkDevice::open(o);
  ::unsetenv("VHOSTKIT_BLK_ENGINE");
  ASSERT_TRUE(d.has_value());
  EXPECT_EQ((*d)->engine(), BlkEngine::sync);
  auto a = BlkDevice::open(o);
  ASSERT_TRUE(a.has_value());
  EXPECT_NE((*a)->engine(), BlkEngine::automatic);
}

TEST(BlkIoEngine, ShortTransfersAreCompleted) {
  // A read at the end of a file that ends mid-buffer reports an error, not a success.
  Image img(4096);
  for (bool uring : {false, true}) {
    int fd = ::open(img.path.c_str(), O_RDWR);
    std::unique_ptr<IoEngine> e;
    if (uring) {
      auto r = make_uring_engine(8);
      ASSERT_TRUE(r.has_value()) << r.error();
      e = std::move(*r);
    } else {
      e = make_sync_engine();
    }
    std::vector<std::uint8_t> buf(8192);
    iovec v[2] = {{buf.data(), 4096}, {buf.data() + 4096, 4096}};
    IoRequest r{IoOp::read, fd, 2, v, 0, 8192, true, 0};
    e->run(std::span(&r, 1));
    EXPECT_EQ(r.result, -EIO) << e->name();
    ::close(fd);
  }
}

}  // namespace
}  // namespace vhostkit
