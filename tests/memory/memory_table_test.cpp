// Memory table: validation errors, lookups, snapshots, aliases, no leaks.
#include <sys/mman.h>

#include <cstring>

#include <gtest/gtest.h>

#include "support/memfd.h"
#include "vhostkit/memory.h"

namespace vhostkit {
namespace {

using testing::dup_fd;
using testing::make_memfd;
using testing::open_fd_count;
using testing::region;

constexpr std::uint64_t kMiB = 1 << 20;

std::vector<RegionSpec> one(RegionSpec s) {
  std::vector<RegionSpec> v;
  v.push_back(std::move(s));
  return v;
}

MemoryErrc replace_error(MemoryTable& t, std::vector<RegionSpec> specs) {
  auto r = t.replace(std::move(specs));
  EXPECT_FALSE(r.has_value());
  return r ? MemoryErrc::not_mapped : r.error().code;
}

TEST(MemoryTable, RejectsZeroSize) {
  MemoryTable t;
  EXPECT_EQ(replace_error(t, one(region(make_memfd(kMiB), 0, 0, 0, 0))), MemoryErrc::zero_size);
}

TEST(MemoryTable, RejectsGpaOverflow) {
  MemoryTable t;
  EXPECT_EQ(replace_error(t, one(region(make_memfd(kMiB), 0, kMiB, ~0ULL - 4095, 0))),
            MemoryErrc::gpa_overflow);
}

TEST(MemoryTable, RejectsUaddrOverflow) {
  MemoryTable t;
  EXPECT_EQ(replace_error(t, one(region(make_memfd(kMiB), 0, kMiB, 0, ~0ULL - 10))),
            MemoryErrc::uaddr_overflow);
}

TEST(MemoryTable, RejectsOffsetOverflow) {
  MemoryTable t;
  EXPECT_EQ(replace_error(t, one(region(make_memfd(kMiB), ~0ULL - 100, kMiB, 0, 0))),
            MemoryErrc::offset_overflow);
}

TEST(MemoryTable, RejectsOverlappingGpaRanges) {
  MemoryTable t;
  std::vector<RegionSpec> v;
  v.push_back(region(make_memfd(kMiB), 0, kMiB, 0, 0x10000000));
  v.push_back(region(make_memfd(kMiB), 0, kMiB, kMiB - 4096, 0x20000000));
  EXPECT_EQ(replace_error(t, std::move(v)), MemoryErrc::gpa_overlap);
}

TEST(MemoryTable, RejectsConflictingUaddrRanges) {
  MemoryTable t;
  std::vector<RegionSpec> v;
  v.push_back(region(make_memfd(kMiB), 0, kMiB, 0, 0x10000000));
  v.push_back(region(make_memfd(kMiB), 0, kMiB, 4 * kMiB, 0x10000000 + 4096));
  EXPECT_EQ(replace_error(t, std::move(v)), MemoryErrc::uaddr_conflict);
}

TEST(MemoryTable, RejectsRegionBeyondFile) {
  MemoryTable t;
  EXPECT_EQ(replace_error(t, one(region(make_memfd(kMiB), 4096, kMiB, 0, 0))),
            MemoryErrc::beyond_file);
}

TEST(MemoryTable, RejectsTooManyRegions) {
  MemoryTable t(MemoryLimits{.max_regions = 2});
  std::vector<RegionSpec> v;
  auto fd = make_memfd(3 * 4096);
  for (int i = 0; i < 3; ++i) v.push_back(region(dup_fd(fd), i * 4096, 4096, i * 4096, i * 4096));
  auto r = t.replace(std::move(v));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, MemoryErrc::too_many_regions);
  EXPECT_EQ(r.error().limit, 2u);
}

TEST(MemoryTable, AddBeyondLimitIsRejected) {
  MemoryTable t(MemoryLimits{.max_regions = 1});
  ASSERT_TRUE(t.add(region(make_memfd(4096), 0, 4096, 0, 0)));
  auto r = t.add(region(make_memfd(4096), 0, 4096, 4096, 4096));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, MemoryErrc::too_many_regions);
}

TEST(MemoryTable, Accepts509RegionsByDefault) {
  MemoryTable t;
  auto fd = make_memfd(509 * 4096);
  std::vector<RegionSpec> v;
  for (std::uint64_t i = 0; i < 509; ++i)
    v.push_back(region(dup_fd(fd), i * 4096, 4096, i * 8192, 0x7f0000000000 + i * 4096));
  ASSERT_TRUE(t.replace(std::move(v)));
  EXPECT_EQ(t.snapshot()->regions().size(), 509u);
}

TEST(MemoryTable, RejectsBadFds) {
  MemoryTable t;
  EXPECT_EQ(replace_error(t, one(region(UniqueFd(), 0, 4096, 0, 0))), MemoryErrc::bad_fd);
  EXPECT_EQ(replace_error(t, one(region(UniqueFd(9999), 0, 4096, 0, 0))), MemoryErrc::bad_fd);
  int p[2];
  ASSERT_EQ(::pipe(p), 0);
  ::close(p[1]);
  EXPECT_EQ(replace_error(t, one(region(UniqueFd(p[0]), 0, 4096, 0, 0))), MemoryErrc::bad_fd);
}

TEST(MemoryTable, FailedReplaceKeepsPreviousTable) {
  MemoryTable t;
  ASSERT_TRUE(t.replace(one(region(make_memfd(kMiB), 0, kMiB, 0, 0))));
  auto gen = t.generation();
  EXPECT_EQ(replace_error(t, one(region(make_memfd(kMiB), 0, 0, 0, 0))), MemoryErrc::zero_size);
  EXPECT_EQ(t.generation(), gen);
  ASSERT_EQ(t.snapshot()->regions().size(), 1u);
}

TEST(MemoryTable, GpaLookupReturnsContiguousLength) {
  MemoryTable t;
  std::vector<RegionSpec> v;
  v.push_back(region(make_memfd(kMiB), 0, kMiB, 0, 0x10000000));
  v.push_back(region(make_memfd(2 * kMiB), kMiB, kMiB, 3 * kMiB, 0x20000000));
  ASSERT_TRUE(t.replace(std::move(v)));
  auto s = t.snapshot();
  auto h = s->gpa_to_host(Gpa(0));  // GPA 0 is a valid address
  ASSERT_TRUE(h);
  EXPECT_EQ(h->len, kMiB);
  auto last = s->gpa_to_host(Gpa(kMiB - 1));  // last byte of a region
  ASSERT_TRUE(last);
  EXPECT_EQ(last->len, 1u);
  EXPECT_EQ(last->host, h->host + kMiB - 1);
  EXPECT_FALSE(s->gpa_to_host(Gpa(kMiB)));  // hole
  auto mid = s->gpa_to_host(Gpa(3 * kMiB + 100));
  ASSERT_TRUE(mid);
  EXPECT_EQ(mid->len, kMiB - 100);
  EXPECT_EQ(s->gpa_to_host(Gpa(4 * kMiB)).error().code, MemoryErrc::not_mapped);
  EXPECT_EQ(s->end_gpa(), Gpa(4 * kMiB));
}

TEST(MemoryTable, MmapOffsetIsHonoured) {
  auto fd = make_memfd(2 * kMiB);
  // Write a marker at file offset kMiB + 5 through a separate mapping.
  void* p = ::mmap(nullptr, 2 * kMiB, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  ASSERT_NE(p, MAP_FAILED);
  static_cast<std::uint8_t*>(p)[kMiB + 5] = 0xab;
  static_cast<std::uint8_t*>(p)[kMiB + 4096 + 7] = 0xcd;
  MemoryTable t;
  std::vector<RegionSpec> v;
  v.push_back(region(dup_fd(fd), kMiB, kMiB, 0x100000000, 0));  // page-aligned offset
  v.push_back(region(dup_fd(fd), kMiB + 4096 + 7, 4096, 0x200000000, 1 << 30));  // unaligned
  ASSERT_TRUE(t.replace(std::move(v)));
  EXPECT_EQ(*t.snapshot()->gpa_to_host(Gpa(0x100000005))->host, 0xab);
  EXPECT_EQ(*t.snapshot()->gpa_to_host(Gpa(0x200000000))->host, 0xcd);
  ::munmap(p, 2 * kMiB);
}

TEST(MemoryTable, UaddrLookup) {
  MemoryTable t;
  std::vector<RegionSpec> v;
  v.push_back(region(make_memfd(kMiB), 0, kMiB, 0x40000, 0x7f0000000000));
  v.push_back(region(make_memfd(kMiB), 0, kMiB, 0x10000000, 0x7f0000100000));  // uaddr-adjacent
  ASSERT_TRUE(t.replace(std::move(v)));
  auto s = t.snapshot();
  auto g = s->uaddr_to_gpa(Uaddr(0x7f0000000010));
  ASSERT_TRUE(g);
  EXPECT_EQ(g->gpa, Gpa(0x40010));
  EXPECT_EQ(g->len, kMiB - 0x10);
  auto g2 = s->uaddr_to_gpa(Uaddr(0x7f0000100000));
  ASSERT_TRUE(g2);
  EXPECT_EQ(g2->gpa, Gpa(0x10000000));
  EXPECT_FALSE(s->uaddr_to_gpa(Uaddr(0x7f0000200000)));
  EXPECT_FALSE(s->uaddr_to_gpa(Uaddr(0)));
}

TEST(MemoryTable, AddAndRemove) {
  MemoryTable t;
  ASSERT_TRUE(t.add(region(make_memfd(kMiB), 0, kMiB, 0, 0)));
  ASSERT_TRUE(t.add(region(make_memfd(kMiB), 0, kMiB, 8 * kMiB, 8 * kMiB)));
  EXPECT_EQ(t.add(region(make_memfd(kMiB), 0, kMiB, 8 * kMiB + 4096, 32 * kMiB)).error().code,
            MemoryErrc::gpa_overlap);
  EXPECT_EQ(t.snapshot()->regions().size(), 2u);
  EXPECT_EQ(t.remove(Gpa(8 * kMiB), kMiB / 2).error().code, MemoryErrc::no_such_region);
  ASSERT_TRUE(t.remove(Gpa(8 * kMiB), kMiB));
  EXPECT_EQ(t.snapshot()->regions().size(), 1u);
  EXPECT_FALSE(t.snapshot()->gpa_to_host(Gpa(8 * kMiB)));
}

TEST(MemoryTable, OldSnapshotStaysMappedAfterReplace) {
  MemoryTable t;
  ASSERT_TRUE(t.replace(one(region(make_memfd(kMiB), 0, kMiB, 0, 0))));
  auto old = t.snapshot();
  HostPtr p = old->gpa_to_host(Gpa(100))->host;
  auto gen = t.generation();
  ASSERT_TRUE(t.replace(one(region(make_memfd(kMiB), 0, kMiB, 0, 0))));
  EXPECT_GT(t.generation(), gen);
  EXPECT_NE(t.snapshot()->gpa_to_host(Gpa(100))->host, p);
  p[0] = 42;  // still mapped: the old snapshot keeps its mapping alive (ASan would flag)
  EXPECT_EQ(old->gpa_to_host(Gpa(100))->host[0], 42);
}

TEST(MemoryTable, DetectsAliasedRegions) {
  auto fd = make_memfd(2 * kMiB);
  MemoryTable t;
  std::vector<RegionSpec> v;
  // The same file bytes [kMiB, 2 MiB) appear at GPA 0x100000 and at GPA 0x80000000.
  v.push_back(region(dup_fd(fd), 0, 2 * kMiB, 0, 0x10000000));
  v.push_back(region(dup_fd(fd), kMiB, kMiB, 0x80000000, 0x10000000 + kMiB));
  ASSERT_TRUE(t.replace(std::move(v)));
  auto s = t.snapshot();
  ASSERT_TRUE(s->has_aliases());
  std::vector<std::pair<std::uint64_t, std::uint64_t>> seen;
  s->for_each_alias(Gpa(kMiB + 4096), 8192,
                    [&](Gpa g, std::uint64_t n) { seen.emplace_back(g.value, n); });
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].first, 0x80000000u + 4096);
  EXPECT_EQ(seen[0].second, 8192u);
  seen.clear();
  s->for_each_alias(Gpa(0x80000000), 16,
                    [&](Gpa g, std::uint64_t n) { seen.emplace_back(g.value, n); });
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].first, kMiB);
  seen.clear();
  s->for_each_alias(Gpa(4096), 16, [&](Gpa g, std::uint64_t n) { seen.emplace_back(g.value, n); });
  EXPECT_TRUE(seen.empty());
  // Same host byte through both GPAs.
  EXPECT_EQ(s->gpa_to_host(Gpa(kMiB))->host[0], 0);
  s->gpa_to_host(Gpa(kMiB))->host[0] = 7;
  EXPECT_EQ(s->gpa_to_host(Gpa(0x80000000))->host[0], 7);
  // uaddr -> GPA picks the lowest GPA for shared frontend addresses.
  EXPECT_EQ(s->uaddr_to_gpa(Uaddr(0x10000000 + kMiB))->gpa, Gpa(kMiB));
}

TEST(MemoryTable, NoFdOrMappingLeaks) {
  std::size_t before = open_fd_count();
  {
    MemoryTable t;
    for (int i = 0; i < 50; ++i) {
      ASSERT_TRUE(t.replace(one(region(make_memfd(kMiB), 0, kMiB, 0, 0))));
      (void)t.replace(one(region(make_memfd(kMiB), 4096, kMiB, 0, 0)));  // beyond_file
      (void)t.add(region(make_memfd(kMiB), 0, kMiB, 0, 0));              // overlap
    }
  }
  EXPECT_EQ(open_fd_count(), before);
}

}  // namespace
}  // namespace vhostkit
