// The translate path: one code path with and without the IOMMU, logging by GPA.
#include <atomic>
#include <cstring>
#include <thread>

#include <gtest/gtest.h>

#include "support/memfd.h"
#include "vhostkit/translate.h"

namespace vhostkit {
namespace {

using testing::dup_fd;
using testing::make_memfd;
using testing::region;

constexpr std::uint64_t kMiB = 1 << 20;
constexpr std::uint64_t kLogBytes = 4096;  // covers 128 MiB of GPA

// Region A: GPA [0, 1 MiB); region B: GPA [1 MiB, 2 MiB) from another fd, so a range
// crossing GPA 1 MiB is contiguous in GPA but not in host memory.
struct TranslateTest : ::testing::Test {
  AddressSpace space;
  std::vector<std::uint8_t> log_bits = std::vector<std::uint8_t>(kLogBytes, 0);
  void SetUp() override {
    std::vector<RegionSpec> v;
    v.push_back(region(make_memfd(kMiB), 0, kMiB, 0, 0x7000000000));
    v.push_back(region(make_memfd(kMiB), 0, kMiB, kMiB, 0x7100000000));
    ASSERT_TRUE(space.set_mem_table(std::move(v)));
  }
  void enable_log() {
    ASSERT_TRUE(space.set_log(DirtyLog::over(log_bits)));
    space.set_logging(true);
  }
  bool dirty(std::uint64_t gpa) { return (log_bits[gpa / 4096 / 8] >> (gpa / 4096 % 8)) & 1; }
  std::size_t dirty_pages() {
    std::size_t n = 0;
    for (auto b : log_bits) n += static_cast<std::size_t>(__builtin_popcount(b));
    return n;
  }
  HostPtr host(std::uint64_t gpa) { return space.memory()->gpa_to_host(Gpa(gpa))->host; }
};

TEST_F(TranslateTest, IommuOffUsesGpaAndSplitsAtRegionBoundary) {
  Translator t(space);
  Segment segs[4];
  auto n = t.translate(Iova(kMiB - 100), 200, Access::read, segs);
  ASSERT_TRUE(n);
  ASSERT_EQ(*n, 2u);
  EXPECT_EQ(segs[0].gpa, Gpa(kMiB - 100));
  EXPECT_EQ(segs[0].len, 100u);
  EXPECT_EQ(segs[0].host, host(kMiB - 100));
  EXPECT_EQ(segs[1].gpa, Gpa(kMiB));
  EXPECT_EQ(segs[1].len, 100u);
  EXPECT_EQ(segs[1].host, host(kMiB));
}

TEST_F(TranslateTest, TooFewSegmentsIsAnError) {
  Translator t(space);
  Segment seg[1];
  auto n = t.translate(Iova(kMiB - 100), 200, Access::read, seg);
  ASSERT_FALSE(n);
  EXPECT_EQ(n.error().code, TranslateErrc::too_many_segments);
}

TEST_F(TranslateTest, UnmappedAndOverflowingRanges) {
  Translator t(space);
  Segment segs[4];
  EXPECT_EQ(t.translate(Iova(2 * kMiB), 1, Access::read, segs).error().code,
            TranslateErrc::not_mapped);
  EXPECT_EQ(t.translate(Iova(2 * kMiB - 1), 2, Access::read, segs).error().code,
            TranslateErrc::not_mapped);  // last byte of a region, then nothing
  EXPECT_EQ(t.translate(Iova(~0ULL), 2, Access::read, segs).error().code,
            TranslateErrc::range_overflow);
  std::uint8_t b = 0;
  EXPECT_TRUE(t.read(Iova(2 * kMiB - 1), std::span(&b, 1)));
  EXPECT_TRUE(t.read(Iova(0), std::span(&b, 1)));  // GPA 0
}

TEST_F(TranslateTest, IommuOnTranslatesThroughIotlb) {
  space.set_iommu(true);
  ASSERT_TRUE(space.iotlb_update(Iova(0xfee00000), 0x2000, Gpa(kMiB - 0x1000), Access::read_write));
  Translator t(space);
  Segment segs[4];
  auto n = t.translate(Iova(0xfee00800), 0x1000, Access::write, segs);
  ASSERT_TRUE(n);
  ASSERT_EQ(*n, 2u);  // the update was split at the region boundary
  EXPECT_EQ(segs[0].gpa, Gpa(kMiB - 0x800));
  EXPECT_EQ(segs[1].gpa, Gpa(kMiB));
  EXPECT_EQ(segs[1].host, host(kMiB));
}

TEST_F(TranslateTest, IommuMissIsReportedOnceAndResolvedByUpdate) {
  space.set_iommu(true);
  Translator t(space);
  Segment segs[2];
  auto r = t.translate(Iova(0x5000), 16, Access::read, segs);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, TranslateErrc::iotlb_miss);
  EXPECT_EQ(r.error().addr, Iova(0x5000));
  EXPECT_TRUE(r.error().report_miss);
  r = t.translate(Iova(0x5008), 16, Access::read, segs);
  ASSERT_FALSE(r);
  EXPECT_FALSE(r.error().report_miss);
  ASSERT_TRUE(space.iotlb_update(Iova(0x5000), 0x1000, Gpa(0x3000), Access::read));
  r = t.translate(Iova(0x5008), 16, Access::read, segs);
  ASSERT_TRUE(r);
  EXPECT_EQ(segs[0].gpa, Gpa(0x3008));
}

TEST_F(TranslateTest, PermissionIsChecked) {
  space.set_iommu(true);
  ASSERT_TRUE(space.iotlb_update(Iova(0x5000), 0x1000, Gpa(0x3000), Access::read));
  Translator t(space);
  std::uint8_t b[4] = {1, 2, 3, 4};
  auto w = t.write(Iova(0x5000), b);
  ASSERT_FALSE(w);
  EXPECT_EQ(w.error().code, TranslateErrc::permission_denied);
  EXPECT_EQ(host(0x3000)[0], 0);  // nothing written
  EXPECT_TRUE(t.read(Iova(0x5000), b));
}

// Regression (Linux vhost and DPDK both shipped it): a write through an IOVA must be
// logged at the GPA, never at the IOVA.
TEST_F(TranslateTest, LogsGpaNotIova) {
  enable_log();
  space.set_iommu(true);
  ASSERT_TRUE(space.iotlb_update(Iova(0x40000), 0x1000, Gpa(0x9000), Access::read_write));
  Translator t(space);
  std::uint8_t data[8] = {9, 9, 9, 9, 9, 9, 9, 9};
  ASSERT_TRUE(t.write(Iova(0x40010), data));
  ASSERT_TRUE(t.flush_log());
  EXPECT_TRUE(dirty(0x9000));
  EXPECT_FALSE(dirty(0x40000));
  EXPECT_EQ(dirty_pages(), 1u);
  EXPECT_EQ(host(0x9010)[0], 9);
}

TEST_F(TranslateTest, LegacyUaddrUpdateLogsTheComputedGpa) {
  enable_log();
  space.set_iommu(true);
  // uaddr of GPA kMiB + 0x2000 is 0x7100002000.
  ASSERT_TRUE(space.iotlb_update_uaddr(Iova(0x80000), 0x1000, Uaddr(0x7100002000), Access::write));
  Translator t(space, LogMode::immediate);
  std::uint8_t data[4] = {1, 2, 3, 4};
  ASSERT_TRUE(t.write(Iova(0x80ffc), data));
  EXPECT_TRUE(dirty(kMiB + 0x2000));
  EXPECT_EQ(dirty_pages(), 1u);
}

TEST_F(TranslateTest, WriteAcrossRegionsLogsEveryPage) {
  enable_log();
  Translator t(space);
  std::vector<std::uint8_t> data(3 * 4096, 0x5a);
  ASSERT_TRUE(t.write(Iova(kMiB - 4096 - 1), data));
  ASSERT_TRUE(t.end_burst());
  // Pages 254, 255 (region A), 256, 257 (region B).
  for (std::uint64_t p = 254; p <= 257; ++p) EXPECT_TRUE(dirty(p * 4096)) << p;
  EXPECT_EQ(dirty_pages(), 4u);
  EXPECT_EQ(host(kMiB - 4097)[0], 0x5a);
  EXPECT_EQ(host(kMiB)[0], 0x5a);
  EXPECT_EQ(host(kMiB + 2 * 4096 - 2)[0], 0x5a);
}

TEST_F(TranslateTest, LoggingOffLogsNothing) {
  ASSERT_TRUE(space.set_log(DirtyLog::over(log_bits)));
  Translator t(space);
  std::uint8_t data[4] = {1, 2, 3, 4};
  ASSERT_TRUE(t.write(Iova(0), data));
  ASSERT_TRUE(t.end_burst());
  EXPECT_EQ(dirty_pages(), 0u);
  space.set_logging(true);  // switching on takes effect for the next access
  ASSERT_TRUE(t.write(Iova(0), data));
  ASSERT_TRUE(t.end_burst());
  EXPECT_EQ(dirty_pages(), 1u);
}

TEST_F(TranslateTest, LogTooSmallForMemoryIsRejected) {
  std::vector<std::uint8_t> small(63, 0);  // 504 pages < 512 pages of memory
  auto r = space.set_log(DirtyLog::over(small));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, DirtyLogErrc::too_small);
  EXPECT_EQ(space.log(), nullptr);
}

// Regression (rust-vmm): a region added after SET_LOG_BASE must be logged too, and a
// write the log cannot record is reported, not dropped silently.
TEST_F(TranslateTest, RegionAddedAfterLogBaseIsLoggedOrReported) {
  enable_log();
  ASSERT_TRUE(space.add_region(region(make_memfd(kMiB), 0, kMiB, 64 * kMiB, 0x7200000000)));
  ASSERT_TRUE(space.add_region(region(make_memfd(kMiB), 0, kMiB, 512 * kMiB, 0x7300000000)));
  Translator t(space, LogMode::immediate);
  std::uint8_t data[4] = {1, 2, 3, 4};
  ASSERT_TRUE(t.write(Iova(64 * kMiB + 0x3000), data));
  EXPECT_TRUE(dirty(64 * kMiB + 0x3000));
  auto r = t.write(Iova(512 * kMiB), data);  // beyond the 128 MiB the log covers
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, TranslateErrc::log_failed);
  EXPECT_EQ(space.log()->out_of_range_count(), 1u);
}

// Regression (DPDK): stale IOTLB entries surviving SET_MEM_TABLE.
TEST_F(TranslateTest, MemoryTableChangeFlushesIotlbAndCaches) {
  space.set_iommu(true);
  ASSERT_TRUE(space.iotlb_update(Iova(0x10000), 0x1000, Gpa(0x1000), Access::read_write));
  Translator t(space);
  Segment s[1];
  ASSERT_TRUE(t.translate(Iova(0x10000), 8, Access::read, s));  // now cached
  std::vector<RegionSpec> v;
  v.push_back(region(make_memfd(kMiB), 0, kMiB, 0, 0x7000000000));
  ASSERT_TRUE(space.set_mem_table(std::move(v)));
  EXPECT_EQ(space.iotlb().size(), 0u);
  auto r = t.translate(Iova(0x10000), 8, Access::read, s);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, TranslateErrc::iotlb_miss);
}

TEST_F(TranslateTest, InvalidateDropsCachedTranslation) {
  space.set_iommu(true);
  ASSERT_TRUE(space.iotlb_update(Iova(0x10000), 0x1000, Gpa(0x1000), Access::read_write));
  Translator t(space);
  Segment s[1];
  ASSERT_TRUE(t.translate(Iova(0x10000), 8, Access::read, s));
  ASSERT_TRUE(t.translate(Iova(0x10000), 8, Access::read, s));
  EXPECT_GE(t.cache_hits(), 1u);
  ASSERT_TRUE(space.iotlb_invalidate(Iova(0x10000), 0x1000));
  EXPECT_FALSE(t.translate(Iova(0x10000), 8, Access::read, s));
}

// Regression (REM_MEM_REG invalidating by GPA while IOVA != GPA): removing a region must
// drop every IOTLB entry that points into it, whatever its IOVA.
TEST_F(TranslateTest, RemovingARegionDropsEntriesByTheirTarget) {
  space.set_iommu(true);
  ASSERT_TRUE(space.iotlb_update(Iova(0x0), 0x1000, Gpa(kMiB), Access::read));  // IOVA 0 -> B
  ASSERT_TRUE(space.remove_region(Gpa(kMiB), kMiB));
  Translator t(space);
  Segment s[1];
  EXPECT_EQ(t.translate(Iova(0), 8, Access::read, s).error().code, TranslateErrc::iotlb_miss);
}

TEST(TranslateAlias, WriteMarksEveryAlias) {
  AddressSpace space;
  auto fd = make_memfd(2 * kMiB);
  std::vector<RegionSpec> v;
  v.push_back(region(dup_fd(fd), 0, 2 * kMiB, 0, 0x7000000000));
  v.push_back(region(dup_fd(fd), kMiB, kMiB, 16 * kMiB, 0x7000000000 + kMiB));
  ASSERT_TRUE(space.set_mem_table(std::move(v)));
  std::vector<std::uint8_t> bits(1024, 0);
  ASSERT_TRUE(space.set_log(DirtyLog::over(bits)));
  space.set_logging(true);
  Translator t(space);
  std::uint8_t data[4] = {1, 2, 3, 4};
  ASSERT_TRUE(t.write(Iova(kMiB + 0x5000), data));
  ASSERT_TRUE(t.flush_log());
  auto log = space.log();
  EXPECT_TRUE(log->test((kMiB + 0x5000) / 4096));
  EXPECT_TRUE(log->test((16 * kMiB + 0x5000) / 4096));
  // A write that starts before the aliased part of its region and ends inside it.
  std::fill(bits.begin(), bits.end(), 0);
  std::vector<std::uint8_t> span_data(0x3000, 7);
  ASSERT_TRUE(t.write(Iova(kMiB - 0x2000), span_data));
  ASSERT_TRUE(t.flush_log());
  EXPECT_TRUE(log->test((16 * kMiB) / 4096));
  EXPECT_FALSE(log->test((16 * kMiB - 0x1000) / 4096));
  // And through the other alias.
  ASSERT_TRUE(t.write(Iova(16 * kMiB + 0x9000), data));
  ASSERT_TRUE(t.flush_log());
  EXPECT_TRUE(log->test((kMiB + 0x9000) / 4096));
}

TEST_F(TranslateTest, SynchronizeWaitsForBurstsThatSawTheOldState) {
  Translator t(space);
  t.begin_burst();
  space.set_logging(true);
  std::atomic<bool> done{false};
  std::thread control([&] {
    EXPECT_TRUE(space.synchronize());
    done = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(done.load());  // the worker is still in a burst begun before the change
  ASSERT_TRUE(t.end_burst());
  control.join();
  EXPECT_TRUE(done.load());
  t.begin_burst();  // a new burst sees the new state: synchronize does not wait for it
  EXPECT_TRUE(space.synchronize(std::chrono::milliseconds(100)));
  ASSERT_TRUE(t.end_burst());
}

// A burst keeps the state it began with: what a worker translated early in a burst (a
// popped chain, the ring areas) stays valid until it has completed that work, even if
// the memory table changes meanwhile; the next burst sees the change.
TEST_F(TranslateTest, ABurstKeepsItsStateAcrossAMemoryTableChange) {
  space.set_iommu(true);
  ASSERT_TRUE(space.iotlb_update(Iova(0x10000), 0x1000, Gpa(0x1000), Access::read_write));
  ASSERT_TRUE(space.iotlb_update(Iova(0x20000), 0x1000, Gpa(0x2000), Access::read_write));
  Translator t(space);
  Segment s[1];
  t.begin_burst();
  ASSERT_TRUE(t.translate(Iova(0x10000), 8, Access::read, s));
  const HostPtr before = s[0].host;
  const std::uint64_t g = t.sync();
  ASSERT_TRUE(space.remove_region(Gpa(kMiB), kMiB));  // REM_MEM_REG of B: flushes the IOTLB
  EXPECT_EQ(t.sync(), g);
  auto again = t.translate(Iova(0x10000), 8, Access::write, s);
  ASSERT_TRUE(again);
  EXPECT_EQ(s[0].host, before);
  // Not translated in this burst, and the IOTLB now belongs to the new table: a miss,
  // reported, so that the front-end sends the translation again.
  auto other = t.translate(Iova(0x20000), 8, Access::read, s);
  ASSERT_FALSE(other);
  EXPECT_EQ(other.error().code, TranslateErrc::iotlb_miss);
  EXPECT_TRUE(other.error().report_miss);
  ASSERT_TRUE(t.end_burst());
  t.begin_burst();
  EXPECT_NE(t.sync(), g);
  auto flushed = t.translate(Iova(0x10000), 8, Access::read, s);
  ASSERT_FALSE(flushed);
  EXPECT_EQ(flushed.error().code, TranslateErrc::iotlb_miss);
  ASSERT_TRUE(t.end_burst());
}

// Regression: a worker that went on translating after a change counted as having seen
// it, so synchronize() returned (and REM_MEM_REG or an IOTLB invalidation was
// acknowledged) while the worker still used translations from before the change.
TEST_F(TranslateTest, SynchronizeWaitsForABurstThatGoesOnTranslating) {
  space.set_iommu(true);
  ASSERT_TRUE(space.iotlb_update(Iova(0x10000), 0x1000, Gpa(0x1000), Access::read_write));
  enable_log();
  Translator t(space);
  Segment s[1];
  t.begin_burst();
  ASSERT_TRUE(t.translate(Iova(0x10000), 8, Access::read, s));
  std::atomic<bool> changed{false};
  std::atomic<bool> done{false};
  std::thread control([&] {
    EXPECT_TRUE(space.remove_region(Gpa(kMiB), kMiB));
    changed = true;
    EXPECT_TRUE(space.synchronize());
    done = true;
  });
  while (!changed.load()) std::this_thread::yield();
  EXPECT_TRUE(t.translate(Iova(0x10000), 8, Access::write, s));
  EXPECT_TRUE(t.log_write(s[0]));
  (void)t.sync();
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(done.load());
  ASSERT_TRUE(t.end_burst());
  control.join();
  EXPECT_TRUE(done.load());
}

TEST_F(TranslateTest, SynchronizeTimesOut) {
  Translator t(space);
  t.begin_burst();
  space.set_iommu(false);
  EXPECT_FALSE(space.synchronize(std::chrono::milliseconds(20)));
  ASSERT_TRUE(t.end_burst());
}

}  // namespace
}  // namespace vhostkit
