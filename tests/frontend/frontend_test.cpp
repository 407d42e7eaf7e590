// Frontend models: guest memory (memfds, carved regions, aliases, allocator) and the
// vIOMMU (IOVA choice, page granularity, strict and lazy invalidation, reuse, ordering of
// miss answers against invalidations).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include <gtest/gtest.h>

#include "support/memfd.h"
#include "vhostkit/frontend/guest_memory.h"
#include "vhostkit/frontend/viommu.h"
#include "vhostkit/memory.h"

namespace vhostkit::frontend {
namespace {

constexpr std::uint64_t kKiB = 1024;

ino_t inode(int fd) {
  struct stat st {};
  EXPECT_EQ(::fstat(fd, &st), 0);
  return st.st_ino;
}

// ------------------------------------------------------------------------------------
// GuestMemory

TEST(GuestMemory, ReadWriteAcrossRegions) {
  auto m = GuestMemory::create({{Gpa(0x100000), 64 * kKiB}, {Gpa(0x110000), 64 * kKiB}});
  ASSERT_TRUE(m) << m.error();
  std::uint8_t in[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  ASSERT_TRUE(m->write(Gpa(0x10fffc), in));  // crosses from region 0 into region 1
  std::uint8_t out[8] = {};
  ASSERT_TRUE(m->read(Gpa(0x10fffc), out));
  EXPECT_EQ(std::memcmp(in, out, 8), 0);
  EXPECT_EQ(m->host(Gpa(0x10fffc), 4)[3], 4);
  EXPECT_EQ(m->host(Gpa(0x110000), 1)[0], 5);
  EXPECT_EQ(m->host(Gpa(0x10fffc), 5), nullptr);  // not inside one region
  EXPECT_EQ(m->host(Gpa(0x120000), 1), nullptr);
  EXPECT_FALSE(m->read(Gpa(0x11fffc), out));  // runs past the end of RAM
  EXPECT_FALSE(m->write(Gpa(0xfffffffffffffffc), in));
  EXPECT_EQ(m->end_gpa(), Gpa(0x120000));
  // The uaddr of a GPA is this process's address of it.
  EXPECT_EQ(m->uaddr_of(Gpa(0x110010))->value,
            reinterpret_cast<std::uint64_t>(m->host(Gpa(0x110010), 1)));
  EXPECT_FALSE(m->uaddr_of(Gpa(0x120000)));
  auto pieces = m->split_by_region(Gpa(0x10f000), 0x2000);
  ASSERT_EQ(pieces.size(), 2u);
  EXPECT_EQ(pieces[0].gpa, Gpa(0x10f000));
  EXPECT_EQ(pieces[0].len, 0x1000u);
  EXPECT_EQ(pieces[1].gpa, Gpa(0x110000));
  EXPECT_EQ(pieces[1].len, 0x1000u);
  EXPECT_TRUE(m->split_by_region(Gpa(0x11f000), 0x2000).empty());
}

TEST(GuestMemory, SeparateFdsHaveOffsetZero) {
  auto m = GuestMemory::create({{Gpa(0), 16 * kKiB}, {Gpa(0x100000), 16 * kKiB}});
  ASSERT_TRUE(m);
  auto specs = m->region_specs();
  ASSERT_EQ(specs.size(), 2u);
  EXPECT_EQ(specs[0].mmap_offset, 0u);
  EXPECT_EQ(specs[1].mmap_offset, 0u);
  EXPECT_NE(inode(specs[0].fd.get()), inode(specs[1].fd.get()));
  EXPECT_EQ(specs[1].gpa, Gpa(0x100000));
  EXPECT_EQ(specs[1].size, 16 * kKiB);
  EXPECT_EQ(specs[1].uaddr, *m->uaddr_of(Gpa(0x100000)));
  // The specs hold duplicates: closing them leaves the memory's own fds open.
  specs.clear();
  EXPECT_GE(::fcntl(m->regions()[0].fd, F_GETFD), 0);
}

TEST(GuestMemory, CarvedRegionsShareOneMemfdAtNonZeroOffsets) {
  auto m = GuestMemory::create({{.gpa = Gpa(0x200000), .size = 32 * kKiB, .separate_fd = false},
                                {.gpa = Gpa(0x0), .size = 16 * kKiB, .separate_fd = false},
                                {.gpa = Gpa(0x400000), .size = 8 * kKiB}});
  ASSERT_TRUE(m) << m.error();
  auto specs = m->region_specs();
  ASSERT_EQ(specs.size(), 3u);
  EXPECT_EQ(inode(specs[0].fd.get()), inode(specs[1].fd.get()));
  EXPECT_NE(inode(specs[0].fd.get()), inode(specs[2].fd.get()));
  EXPECT_NE(specs[0].mmap_offset, 0u);
  EXPECT_NE(specs[1].mmap_offset, 0u);
  EXPECT_EQ(specs[0].mmap_offset % 4096, 0u);
  // Disjoint file ranges, not adjacent to each other.
  EXPECT_GT(specs[1].mmap_offset, specs[0].mmap_offset + specs[0].size);
  EXPECT_EQ(specs[2].mmap_offset, 0u);
  // The bytes of a GPA are at its region's file offset in the memfd.
  std::uint8_t v = 0x5a;
  ASSERT_TRUE(m->write(Gpa(0x10), std::span(&v, 1)));
  std::uint8_t got = 0;
  ASSERT_EQ(::pread(specs[1].fd.get(), &got, 1, static_cast<off_t>(specs[1].mmap_offset + 0x10)),
            1);
  EXPECT_EQ(got, 0x5a);
}

TEST(GuestMemory, AliasSharesBytesFdAndMappingLikeQemu) {
  auto m = GuestMemory::create(
      {{.gpa = Gpa(0x100000), .size = 64 * kKiB},
       {.gpa = Gpa(0x80000000), .size = 16 * kKiB, .alias_of = 0, .alias_offset = 0x2000}});
  ASSERT_TRUE(m) << m.error();
  m->host(Gpa(0x102000), 1)[0] = 0x77;
  EXPECT_EQ(m->host(Gpa(0x80000000), 1)[0], 0x77);  // the same bytes
  m->host(Gpa(0x80003fff), 1)[0] = 0x66;
  EXPECT_EQ(m->host(Gpa(0x105fff), 1)[0], 0x66);
  auto specs = m->region_specs();
  ASSERT_EQ(specs.size(), 2u);
  EXPECT_EQ(inode(specs[0].fd.get()), inode(specs[1].fd.get()));
  EXPECT_EQ(specs[1].mmap_offset, specs[0].mmap_offset + 0x2000);
  // Same mapping address + offset: uaddr - mmap_offset agrees for both regions.
  EXPECT_EQ(specs[1].uaddr, specs[0].uaddr + 0x2000);
  EXPECT_TRUE(m->regions()[1].alias);
  EXPECT_FALSE(m->regions()[0].alias);
  // Legacy IOTLB pieces may lie in the alias too.
  ASSERT_EQ(m->split_by_region(Gpa(0x80001000), 0x1000).size(), 1u);
}

TEST(GuestMemory, RegionSpecsFeedTheBackEndMemoryTable) {
  auto m = GuestMemory::create(
      {{.gpa = Gpa(0x0), .size = 64 * kKiB, .separate_fd = false},
       {.gpa = Gpa(0x100000), .size = 64 * kKiB, .separate_fd = false},
       {.gpa = Gpa(0x40000000), .size = 16 * kKiB, .alias_of = 1, .alias_offset = 0x4000}});
  ASSERT_TRUE(m) << m.error();
  MemoryTable table;
  ASSERT_TRUE(table.replace(m->region_specs())) << "the back-end rejects our regions";
  auto snap = table.snapshot();
  EXPECT_TRUE(snap->has_aliases());
  const char msg[] = "through the back-end's own mapping";
  ASSERT_TRUE(
      m->write(Gpa(0x104000), std::span(reinterpret_cast<const std::uint8_t*>(msg), sizeof msg)));
  for (Gpa g : {Gpa(0x104000), Gpa(0x40000000)}) {
    auto h = snap->gpa_to_host(g);
    ASSERT_TRUE(h);
    EXPECT_EQ(std::memcmp(h->host, msg, sizeof msg), 0) << std::hex << g.value;
  }
  // A uaddr we send maps back to the GPA we mean.
  auto ua = m->uaddr_of(Gpa(0xf010));
  ASSERT_TRUE(ua);
  auto back = snap->uaddr_to_gpa(*ua);
  ASSERT_TRUE(back);
  EXPECT_EQ(back->gpa, Gpa(0xf010));
}

TEST(GuestMemory, RejectsBadLayouts) {
  EXPECT_FALSE(GuestMemory::create({{Gpa(0), 100}}));  // not whole pages
  EXPECT_FALSE(GuestMemory::create({{Gpa(0), 0}}));
  EXPECT_FALSE(GuestMemory::create({{Gpa(0), 0x2000}, {Gpa(0x1000), 0x2000}}));  // overlap
  EXPECT_FALSE(GuestMemory::create({{Gpa(0xfffffffffffff000), 0x2000}}));        // wraps
  EXPECT_FALSE(GuestMemory::create({{.gpa = Gpa(0), .size = 0x1000, .alias_of = 0}}));
  EXPECT_FALSE(GuestMemory::create(
      {{Gpa(0), 0x2000},
       {.gpa = Gpa(0x10000), .size = 0x2000, .alias_of = 0, .alias_offset = 0x1000}}));
  EXPECT_FALSE(GuestMemory::create(
      {{Gpa(0), 0x4000},
       {.gpa = Gpa(0x10000), .size = 0x1000, .alias_of = 0, .alias_offset = 0x800}}));
}

TEST(GuestMemory, NoFdOrMappingLeaks) {
  const std::size_t before = vhostkit::testing::open_fd_count();
  for (int i = 0; i < 20; ++i) {
    auto m = GuestMemory::create({{Gpa(0), 64 * kKiB},
                                  {.gpa = Gpa(0x100000), .size = 8 * kKiB, .separate_fd = false},
                                  {.gpa = Gpa(0x200000), .size = 4 * kKiB, .alias_of = 0}});
    ASSERT_TRUE(m);
    GuestMemory moved = std::move(*m);  // the moved-from object releases nothing twice
    (void)moved.region_specs();         // dup'd fds are closed with the specs
  }
  EXPECT_EQ(vhostkit::testing::open_fd_count(), before);
}

TEST(GuestMemory, BumpAllocator) {
  auto m = GuestMemory::create({{Gpa(0x100000), 0x2000},
                                {.gpa = Gpa(0x300000), .size = 0x1000, .alias_of = 0},
                                {Gpa(0x200000), 0x3000}});
  ASSERT_TRUE(m);
  EXPECT_EQ(m->alloc(0x100, 0x1000), Gpa(0x100000));
  EXPECT_EQ(m->alloc(0x10, 16), Gpa(0x100100));
  EXPECT_EQ(m->alloc(1, 1), Gpa(0x100110));
  EXPECT_EQ(m->alloc(0x1000, 0x1000), Gpa(0x101000));
  // Region 0 is full: the next region that is not an alias.
  EXPECT_EQ(m->alloc(0x10, 8), Gpa(0x200000));
  EXPECT_EQ(m->alloc(0x2000, 0x1000), Gpa(0x201000));
  EXPECT_FALSE(m->alloc(0x1000, 0x1000));  // out of memory
  EXPECT_FALSE(m->alloc(0x10, 3));         // not a power of two
  m->reset_allocator();
  EXPECT_EQ(m->alloc(0x10, 8), Gpa(0x100000));
}

// ------------------------------------------------------------------------------------
// Viommu

TEST(Viommu, PicksPageGranularIovasFarFromGpas) {
  Viommu io;
  Iova a = io.map(Gpa(0x5123), 0x100, Access::read);
  EXPECT_NE(a.value, 0x5123u);
  EXPECT_GE(a.value, Viommu::kDefaultIovaBase);
  EXPECT_EQ(a.value & 0xfff, 0x123u);  // in-page offset kept
  auto t = io.translate(a);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->iova.value, a.value & ~0xfffULL);
  EXPECT_EQ(t->gpa, Gpa(0x5000));
  EXPECT_EQ(t->len, 0x1000u);  // the whole page
  EXPECT_EQ(t->perm, Access::read);
  EXPECT_TRUE(io.translate(Iova((a.value & ~0xfffULL) + 0xfff)));
  EXPECT_FALSE(io.translate(Iova((a.value & ~0xfffULL) + 0x1000)));  // guard page

  // A buffer straddling pages maps every page it touches.
  Iova b = io.map(Gpa(0x10ff0), 0x20, Access::write);
  EXPECT_EQ(b.value & 0xfff, 0xff0u);
  auto tb = io.translate(b);
  ASSERT_TRUE(tb);
  EXPECT_EQ(tb->gpa, Gpa(0x10000));
  EXPECT_EQ(tb->len, 0x2000u);
  // A miss in the second page is answered from that page to the end of the mapping.
  auto second = io.translate(b + 0x10);
  ASSERT_TRUE(second);
  EXPECT_EQ(second->iova, tb->iova + 0x1000);
  EXPECT_EQ(second->gpa, Gpa(0x11000));
  EXPECT_EQ(second->len, 0x1000u);
  EXPECT_EQ(second->perm, Access::write);
  EXPECT_NE(tb->iova, io.translate(a)->iova);
  EXPECT_EQ(io.mappings(), 2u);
  EXPECT_EQ(io.all().size(), 2u);
}

TEST(Viommu, StrictInvalidatesBeforeUnmapReturns) {
  Viommu io(ViommuMode::strict);
  std::vector<std::pair<std::uint64_t, std::uint64_t>> inval;
  io.set_invalidate_listener([&](Iova i, std::uint64_t l) { inval.emplace_back(i.value, l); });
  Iova a = io.map(Gpa(0x5123), 0x1000, Access::read_write);
  EXPECT_FALSE(io.unmap(a + 0x2000, 1));  // not mapped: nothing happens
  EXPECT_FALSE(io.unmap(a, 0x2000));      // longer than the mapping
  EXPECT_TRUE(inval.empty());
  ASSERT_TRUE(io.unmap(a, 0x1000));
  ASSERT_EQ(inval.size(), 1u);
  EXPECT_EQ(inval[0].first, a.value & ~0xfffULL);
  EXPECT_EQ(inval[0].second, 0x2000u);
  EXPECT_FALSE(io.translate(a));
  EXPECT_EQ(io.pending_invalidations(), 0u);
  // Invalidated: the IOVA range may (and, like Linux's IOVA cache, will) come back.
  Iova again = io.map(Gpa(0x9123), 0x1000, Access::read);
  EXPECT_EQ(again, a);
  EXPECT_EQ(io.translate(again)->gpa, Gpa(0x9000));
}

TEST(Viommu, LazyBatchesInvalidationsAndReusesIovasOnlyAfterFlush) {
  Viommu io(ViommuMode::lazy, Viommu::kDefaultIovaBase, 3);
  std::vector<std::uint64_t> inval;
  io.set_invalidate_listener([&](Iova i, std::uint64_t) { inval.push_back(i.value); });
  Iova a = io.map(Gpa(0x1000), 0x1000, Access::read);
  Iova b = io.map(Gpa(0x2000), 0x1000, Access::write);
  ASSERT_TRUE(io.unmap(a, 0x1000));
  ASSERT_TRUE(io.unmap(b, 0x1000));
  EXPECT_TRUE(inval.empty());
  EXPECT_EQ(io.pending_invalidations(), 2u);
  EXPECT_FALSE(io.translate(a));  // the guest's page table changes at once
  // Not yet invalidated in the device: the IOVAs are not handed out again.
  Iova c = io.map(Gpa(0x1000), 0x1000, Access::read);
  EXPECT_NE(c, a);
  EXPECT_NE(c, b);
  io.flush();
  EXPECT_EQ(inval, (std::vector<std::uint64_t>{a.value, b.value}));
  EXPECT_EQ(io.pending_invalidations(), 0u);
  // Now they may be.
  Iova d = io.map(Gpa(0x3000), 0x1000, Access::read);
  EXPECT_TRUE(d == a || d == b);
  // The third queued unmap fills the queue and sends the batch.
  Iova e = io.map(Gpa(0x4000), 0x1000, Access::read);
  ASSERT_TRUE(io.unmap(c, 1));
  ASSERT_TRUE(io.unmap(d, 1));
  EXPECT_EQ(inval.size(), 2u);
  ASSERT_TRUE(io.unmap(e, 1));
  EXPECT_EQ(inval.size(), 5u);
  EXPECT_EQ(io.pending_invalidations(), 0u);
  EXPECT_EQ(io.mappings(), 0u);
}

TEST(Viommu, FlushInStrictModeIsANoOp) {
  Viommu io(ViommuMode::strict);
  int calls = 0;
  io.set_invalidate_listener([&](Iova, std::uint64_t) { ++calls; });
  io.flush();
  EXPECT_EQ(calls, 0);
}

TEST(Viommu, MissAnswersAreOrderedAgainstInvalidations) {
  Viommu io(ViommuMode::strict);
  Iova other = io.map(Gpa(0x8000), 0x1000, Access::read);
  Iova victim = io.map(Gpa(0x9000), 0x1000, Access::read);
  std::atomic<bool> in_listener{false}, listener_done{false};
  io.set_invalidate_listener([&](Iova, std::uint64_t) {
    in_listener = true;
    // The device is slow to acknowledge; a miss answer must wait for it.
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    listener_done = true;
  });
  std::thread unmapper([&] { ASSERT_TRUE(io.unmap(victim, 0x1000)); });
  while (!in_listener) std::this_thread::yield();
  bool sent_after = false;
  EXPECT_TRUE(io.answer_miss(other, [&](const ViommuMapping& m) {
    sent_after = listener_done.load();
    EXPECT_EQ(m.gpa, Gpa(0x8000));
  }));
  unmapper.join();
  EXPECT_TRUE(sent_after);
  EXPECT_FALSE(io.answer_miss(victim, [](const ViommuMapping&) { FAIL(); }));
}

}  // namespace
}  // namespace vhostkit::frontend
