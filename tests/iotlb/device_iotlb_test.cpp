// Device IOTLB: both update forms, splitting, invalidation, limits, misses.
#include <gtest/gtest.h>

#include "support/memfd.h"
#include "vhostkit/iotlb.h"

namespace vhostkit {
namespace {

using testing::make_memfd;
using testing::region;
using namespace std::chrono_literals;

constexpr std::uint64_t kMiB = 1 << 20;

// Two regions: GPA [0x100000, 0x200000) at uaddr 0x7000_0000 and GPA [0x400000, 0x500000)
// at uaddr 0x7010_0000, i.e. adjacent in uaddr space but not in GPA space.
std::shared_ptr<const MemorySnapshot> two_regions(MemoryTable& t) {
  std::vector<RegionSpec> v;
  v.push_back(region(make_memfd(kMiB), 0, kMiB, 0x100000, 0x70000000));
  v.push_back(region(make_memfd(kMiB), 0, kMiB, 0x400000, 0x70100000));
  EXPECT_TRUE(t.replace(std::move(v)));
  return t.snapshot();
}

struct IotlbTest : ::testing::Test {
  MemoryTable table;
  DeviceIotlb iotlb;
  void SetUp() override { iotlb.rebind(two_regions(table)); }
  HostPtr host(std::uint64_t gpa) { return table.snapshot()->gpa_to_host(Gpa(gpa))->host; }
};

TEST_F(IotlbTest, UpdateByGpaTranslates) {
  ASSERT_TRUE(iotlb.update_gpa(Iova(0xa000), 0x2000, Gpa(0x101000), Access::read));
  auto e = iotlb.lookup(Iova(0xa800));
  ASSERT_TRUE(e);
  EXPECT_EQ(e->iova, Iova(0xa000));
  EXPECT_EQ(e->gpa, Gpa(0x101000));
  EXPECT_EQ(e->host, host(0x101000));
  EXPECT_EQ(e->perm, Access::read);
  EXPECT_FALSE(iotlb.lookup(Iova(0xc000)));
  EXPECT_FALSE(iotlb.lookup(Iova(0x9fff)));
}

TEST_F(IotlbTest, UpdateByUaddrComputesGpaAndSplitsAtRegionBoundary) {
  // uaddr range crosses from region 1 into region 2: two entries, GPAs not contiguous.
  ASSERT_TRUE(iotlb.update_uaddr(Iova(0x1000000), 0x2000, Uaddr(0x700ff000), Access::read_write));
  auto entries = iotlb.entries();
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_EQ(entries[0].iova, Iova(0x1000000));
  EXPECT_EQ(entries[0].gpa, Gpa(0x1ff000));
  EXPECT_EQ(entries[0].size, 0x1000u);
  EXPECT_EQ(entries[1].iova, Iova(0x1001000));
  EXPECT_EQ(entries[1].gpa, Gpa(0x400000));
  EXPECT_EQ(entries[1].host, host(0x400000));
}

TEST_F(IotlbTest, GpaAndUaddrFormsGiveIdenticalEntries) {
  DeviceIotlb other;
  other.rebind(table.snapshot());
  ASSERT_TRUE(iotlb.update_uaddr(Iova(0x5000), 0x3000, Uaddr(0x70000000 + 0x123), Access::write));
  ASSERT_TRUE(other.update_gpa(Iova(0x5000), 0x3000, Gpa(0x100123), Access::write));
  auto a = iotlb.entries();
  auto b = other.entries();
  ASSERT_EQ(a.size(), b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].iova, b[i].iova);
    EXPECT_EQ(a[i].gpa, b[i].gpa);
    EXPECT_EQ(a[i].host, b[i].host);
    EXPECT_EQ(a[i].size, b[i].size);
  }
}

TEST_F(IotlbTest, RejectsUnbackedRanges) {
  // Runs off the end of region 1 into the GPA hole.
  auto r = iotlb.update_gpa(Iova(0), 0x2000, Gpa(0x1ff000), Access::read);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, IotlbErrc::not_backed);
  EXPECT_EQ(r.error().addr, 0x200000u);
  // uaddr past region 2.
  EXPECT_EQ(iotlb.update_uaddr(Iova(0), 0x2000, Uaddr(0x701ff000), Access::read).error().code,
            IotlbErrc::not_backed);
  EXPECT_EQ(iotlb.update_uaddr(Iova(0), 0x1000, Uaddr(0x1000), Access::read).error().code,
            IotlbErrc::not_backed);
  EXPECT_EQ(iotlb.size(), 0u);  // nothing installed
}

TEST_F(IotlbTest, RejectsMalformedUpdates) {
  EXPECT_EQ(iotlb.update_gpa(Iova(0), 0, Gpa(0x100000), Access::read).error().code,
            IotlbErrc::zero_size);
  EXPECT_EQ(iotlb.update_gpa(Iova(~0ULL - 10), 0x1000, Gpa(0x100000), Access::read).error().code,
            IotlbErrc::iova_overflow);
  EXPECT_EQ(iotlb.update_gpa(Iova(0), 0x1000, Gpa(~0ULL - 10), Access::read).error().code,
            IotlbErrc::address_overflow);
  EXPECT_EQ(iotlb.update_uaddr(Iova(0), 0x1000, Uaddr(~0ULL - 10), Access::read).error().code,
            IotlbErrc::address_overflow);
  EXPECT_EQ(iotlb.update_gpa(Iova(0), 0x1000, Gpa(0x100000), Access::none).error().code,
            IotlbErrc::bad_permission);
  EXPECT_EQ(iotlb.invalidate(Iova(0), 0).error().code, IotlbErrc::zero_size);
}

TEST_F(IotlbTest, EntryEndingAtTopOfIovaSpace) {
  ASSERT_TRUE(iotlb.update_gpa(Iova(~0ULL - 0xfff), 0x1000, Gpa(0x100000), Access::read));
  auto e = iotlb.lookup(Iova(~0ULL));
  ASSERT_TRUE(e);
  EXPECT_EQ(e->host, host(0x100fff) - 0xfff);
  ASSERT_TRUE(iotlb.invalidate(Iova(~0ULL - 0x7ff), 0x1000));  // wraps: clamped
  auto after = iotlb.entries();
  ASSERT_EQ(after.size(), 1u);
  EXPECT_EQ(after[0].size, 0x800u);
}

TEST_F(IotlbTest, InvalidateSplitsAndTrims) {
  ASSERT_TRUE(iotlb.update_gpa(Iova(0x10000), 0x4000, Gpa(0x100000), Access::read_write));
  ASSERT_TRUE(iotlb.invalidate(Iova(0x11000), 0x1000));  // punch a hole in the middle
  auto e = iotlb.entries();
  ASSERT_EQ(e.size(), 2u);
  EXPECT_EQ(e[0].iova, Iova(0x10000));
  EXPECT_EQ(e[0].size, 0x1000u);
  EXPECT_EQ(e[1].iova, Iova(0x12000));
  EXPECT_EQ(e[1].size, 0x2000u);
  EXPECT_EQ(e[1].gpa, Gpa(0x102000));
  EXPECT_EQ(e[1].host, host(0x102000));
  EXPECT_FALSE(iotlb.lookup(Iova(0x11800)));
  ASSERT_TRUE(iotlb.invalidate(Iova(0x13800), 0x10000));  // trims the tail
  e = iotlb.entries();
  ASSERT_EQ(e.size(), 2u);
  EXPECT_EQ(e[1].size, 0x1800u);
  ASSERT_TRUE(iotlb.invalidate(Iova(0), 0x10800));  // trims the head
  e = iotlb.entries();
  EXPECT_EQ(e[0].iova, Iova(0x10800));
  EXPECT_EQ(e[0].gpa, Gpa(0x100800));
}

TEST_F(IotlbTest, UpdateReplacesOverlappedTranslations) {
  ASSERT_TRUE(iotlb.update_gpa(Iova(0x10000), 0x3000, Gpa(0x100000), Access::read));
  ASSERT_TRUE(iotlb.update_gpa(Iova(0x11000), 0x1000, Gpa(0x400000), Access::write));
  EXPECT_EQ(iotlb.lookup(Iova(0x10000))->gpa, Gpa(0x100000));
  EXPECT_EQ(iotlb.lookup(Iova(0x11000))->gpa, Gpa(0x400000));
  EXPECT_EQ(iotlb.lookup(Iova(0x11000))->perm, Access::write);
  EXPECT_EQ(iotlb.lookup(Iova(0x12000))->gpa, Gpa(0x102000));
  EXPECT_EQ(iotlb.size(), 3u);
}

TEST_F(IotlbTest, AdjacentEntriesAreNeverMerged) {
  // IOVA-adjacent, but the second maps to a different region (host not adjacent).
  ASSERT_TRUE(iotlb.update_gpa(Iova(0x1000), 0x1000, Gpa(0x1ff000), Access::read));
  ASSERT_TRUE(iotlb.update_gpa(Iova(0x2000), 0x1000, Gpa(0x400000), Access::read));
  EXPECT_EQ(iotlb.lookup(Iova(0x1fff))->host, host(0x1ff000));  // entry start
  EXPECT_EQ(iotlb.lookup(Iova(0x2000))->host, host(0x400000));
  EXPECT_EQ(iotlb.size(), 2u);
}

TEST_F(IotlbTest, RebindFlushes) {
  ASSERT_TRUE(iotlb.update_gpa(Iova(0x1000), 0x1000, Gpa(0x100000), Access::read));
  auto gen = iotlb.generation();
  iotlb.rebind(table.snapshot());
  EXPECT_EQ(iotlb.size(), 0u);
  EXPECT_GT(iotlb.generation(), gen);
  ASSERT_TRUE(iotlb.update_gpa(Iova(0x1000), 0x1000, Gpa(0x100000), Access::read));
  iotlb.flush();
  EXPECT_FALSE(iotlb.lookup(Iova(0x1000)));
}

TEST_F(IotlbTest, LookupReportsStaleMemoryGeneration) {
  ASSERT_TRUE(iotlb.update_gpa(Iova(0x1000), 0x1000, Gpa(0x100000), Access::read));
  auto gen = table.snapshot()->generation();
  EXPECT_TRUE(iotlb.lookup(Iova(0x1000), gen).entry);
  EXPECT_TRUE(iotlb.lookup(Iova(0x1000), gen + 1).stale);
}

TEST(IotlbLimit, EvictsOldestFirst) {
  MemoryTable table;
  ASSERT_TRUE(table.add(region(make_memfd(kMiB), 0, kMiB, 0, 0)));
  DeviceIotlb iotlb(IotlbLimits{.max_entries = 4});
  iotlb.rebind(table.snapshot());
  for (std::uint64_t i = 0; i < 6; ++i)
    ASSERT_TRUE(iotlb.update_gpa(Iova(i * 0x1000), 0x1000, Gpa(i * 0x1000), Access::read));
  EXPECT_EQ(iotlb.size(), 4u);
  EXPECT_EQ(iotlb.evictions(), 2u);
  EXPECT_FALSE(iotlb.lookup(Iova(0)));
  EXPECT_FALSE(iotlb.lookup(Iova(0x1000)));
  for (std::uint64_t i = 2; i < 6; ++i) EXPECT_TRUE(iotlb.lookup(Iova(i * 0x1000)));
}

TEST(IotlbLimit, UpdateNeedingMoreEntriesThanTheLimitIsRejected) {
  MemoryTable table;
  ASSERT_TRUE(table.add(region(make_memfd(kMiB), 0, kMiB / 2, 0, 0x70000000)));
  ASSERT_TRUE(table.add(region(make_memfd(kMiB), 0, kMiB / 2, 0x1000000, 0x70000000 + kMiB / 2)));
  DeviceIotlb iotlb(IotlbLimits{.max_entries = 1});
  iotlb.rebind(table.snapshot());
  auto r = iotlb.update_uaddr(Iova(0), kMiB, Uaddr(0x70000000), Access::read);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, IotlbErrc::over_limit);
}

TEST(IotlbLimit, MillionEntries) {
  MemoryTable table;
  ASSERT_TRUE(table.add(region(make_memfd(4096), 0, 4096, 0, 0)));
  constexpr std::uint64_t kN = 1 << 20;
  DeviceIotlb iotlb(IotlbLimits{.max_entries = kN});
  iotlb.rebind(table.snapshot());
  // Insert in a scattered order so blocks split everywhere.
  for (std::uint64_t i = 0; i < kN; ++i) {
    std::uint64_t k = (i * 0x9E3779B1ULL) % kN;
    ASSERT_TRUE(iotlb.update_gpa(Iova(k * 0x1000), 0x1000, Gpa(0), Access::read));
  }
  EXPECT_EQ(iotlb.size(), kN);
  EXPECT_EQ(iotlb.evictions(), 0u);
  for (std::uint64_t k = 0; k < kN; k += 4099) EXPECT_TRUE(iotlb.lookup(Iova(k * 0x1000 + 5)));
  // One more evicts exactly one (the oldest).
  ASSERT_TRUE(iotlb.update_gpa(Iova(kN * 0x1000), 0x1000, Gpa(0), Access::read));
  EXPECT_EQ(iotlb.size(), kN);
  EXPECT_FALSE(iotlb.lookup(Iova(0)));
  // A large invalidation removes everything in range at once.
  ASSERT_TRUE(iotlb.invalidate(Iova(0), (kN / 2) * 0x1000));
  EXPECT_EQ(iotlb.size(), kN / 2 + 1);
}

TEST_F(IotlbTest, MissesAreReportedOncePerPageUntilAnswered) {
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(iotlb.note_miss(Iova(0x5000), Access::read, t0));
  EXPECT_FALSE(iotlb.note_miss(Iova(0x5fff), Access::read, t0 + 1ms));
  EXPECT_TRUE(iotlb.note_miss(Iova(0x5000), Access::write, t0));  // other access
  EXPECT_TRUE(iotlb.note_miss(Iova(0x6000), Access::read, t0));   // other page
  EXPECT_EQ(iotlb.pending_misses(), 3u);
  ASSERT_TRUE(iotlb.update_gpa(Iova(0x5000), 0x1000, Gpa(0x100000), Access::read_write));
  EXPECT_EQ(iotlb.pending_misses(), 1u);
  EXPECT_TRUE(iotlb.note_miss(Iova(0x5000), Access::read, t0 + 2ms));  // answered: new miss
}

TEST_F(IotlbTest, MissIsReportedAgainAfterTimeout) {
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(iotlb.note_miss(Iova(0x5000), Access::read, t0));
  EXPECT_FALSE(iotlb.note_miss(Iova(0x5000), Access::read, t0 + 999ms));
  EXPECT_TRUE(iotlb.note_miss(Iova(0x5000), Access::read, t0 + 1s));
}

}  // namespace
}  // namespace vhostkit
