// Frontend models: guest memory, the vIOMMU, and the bytes the driver model writes.
#include <cstring>

#include <gtest/gtest.h>

#include "vhostkit/frontend/guest_memory.h"
#include "vhostkit/frontend/viommu.h"
#include "vhostkit/frontend/virtio_driver.h"

namespace vhostkit::frontend {
namespace {

using namespace vhostkit::virtio;

TEST(GuestMemory, RegionsAliasesAndSplitting) {
  auto m = GuestMemory::create({{Gpa(0x100000), 0x10000},
                                {Gpa(0x110000), 0x10000},
                                {Gpa(0x80000000), 0x4000, 0, 0x2000}});
  ASSERT_TRUE(m);
  std::uint8_t in[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  ASSERT_TRUE(m->write(Gpa(0x10fffc), in));  // crosses from region 0 into region 1
  std::uint8_t out[8] = {};
  ASSERT_TRUE(m->read(Gpa(0x10fffc), out));
  EXPECT_EQ(std::memcmp(in, out, 8), 0);
  EXPECT_FALSE(m->read(Gpa(0x120000), out));
  // The alias shows region 0's bytes from offset 0x2000.
  m->host(Gpa(0x102000), 1)[0] = 0x77;
  EXPECT_EQ(m->host(Gpa(0x80000000), 1)[0], 0x77);
  auto pieces = m->split_by_region(Gpa(0x10f000), 0x2000);
  ASSERT_EQ(pieces.size(), 2u);
  EXPECT_EQ(pieces[0].len, 0x1000u);
  EXPECT_EQ(pieces[1].gpa, Gpa(0x110000));
  auto specs = m->region_specs();
  ASSERT_EQ(specs.size(), 3u);
  EXPECT_EQ(specs[2].mmap_offset, 0x2000u);
  EXPECT_EQ(specs[2].uaddr, *m->uaddr_of(Gpa(0x80000000)));
  EXPECT_EQ(m->alloc(0x100, 0x1000), Gpa(0x100000));
  EXPECT_EQ(m->alloc(0x100, 16), Gpa(0x100100));
}

TEST(Viommu, StrictInvalidatesAtOnce) {
  Viommu io(ViommuMode::strict);
  std::vector<std::pair<std::uint64_t, std::uint64_t>> inval;
  io.set_invalidate_listener([&](Iova i, std::uint64_t l) { inval.emplace_back(i.value, l); });
  Iova a = io.map(Gpa(0x5123), 0x100, Access::read);
  EXPECT_NE(a.value, 0x5123u);
  EXPECT_EQ(a.value & 0xfff, 0x123u);  // in-page offset kept
  auto t = io.translate(a);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->gpa, Gpa(0x5000));
  EXPECT_EQ(t->len, 0x1000u);
  io.unmap(a);
  ASSERT_EQ(inval.size(), 1u);
  EXPECT_EQ(inval[0].first, a.value & ~0xfffULL);
  EXPECT_FALSE(io.translate(a));
}

TEST(Viommu, LazyBatchesInvalidationsAndNeverReusesIovas) {
  Viommu io(ViommuMode::lazy, 0xfff000000000ULL, 3);
  std::size_t calls = 0;
  io.set_invalidate_listener([&](Iova, std::uint64_t) { ++calls; });
  Iova a = io.map(Gpa(0x1000), 0x1000, Access::read);
  Iova b = io.map(Gpa(0x2000), 0x1000, Access::write);
  io.unmap(a);
  io.unmap(b);
  EXPECT_EQ(calls, 0u);
  EXPECT_EQ(io.pending_invalidations(), 2u);
  EXPECT_FALSE(io.translate(a));  // the guest's page table is updated at once
  Iova c = io.map(Gpa(0x1000), 0x1000, Access::read);
  EXPECT_NE(c, a);
  io.flush();
  EXPECT_EQ(calls, 2u);
  io.unmap(c);
  Iova d = io.map(Gpa(0x3000), 0x1000, Access::read);
  Iova e = io.map(Gpa(0x4000), 0x1000, Access::read);
  io.unmap(d);
  io.unmap(e);  // the third queued invalidation fills the batch
  EXPECT_EQ(calls, 5u);
}

TEST(VirtioDriver, SplitRingBytes) {
  auto m = GuestMemory::create({{Gpa(0x100000), 0x40000}});
  ASSERT_TRUE(m);
  auto d = VirtioDriver::create(*m, DriverOptions{.packed = false, .size = 8});
  ASSERT_TRUE(d);
  std::vector<DriverBuffer> bufs{{Gpa(0x130000), 64, false}, {Gpa(0x131000), 128, true}};
  auto id = d->add(bufs);
  ASSERT_TRUE(id);
  SplitDesc d0, d1;
  std::memcpy(&d0, d->desc_host() + 16 * *id, 16);
  EXPECT_EQ(d0.addr, 0x130000u);
  EXPECT_EQ(d0.len, 64u);
  EXPECT_EQ(d0.flags, kDescFNext);
  std::memcpy(&d1, d->desc_host() + 16 * d0.next, 16);
  EXPECT_EQ(d1.addr, 0x131000u);
  EXPECT_EQ(d1.flags, kDescFWrite);
  std::uint16_t avail_idx, ring0;
  std::memcpy(&avail_idx, d->driver_host() + split::kAvailIdx, 2);
  std::memcpy(&ring0, d->driver_host() + split::avail_ring(0), 2);
  EXPECT_EQ(avail_idx, 1);
  EXPECT_EQ(ring0, *id);
  EXPECT_EQ(d->free_descriptors(), 6);
  // A hand-written completion.
  UsedElem e{*id, 100};
  std::memcpy(d->device_host() + split::used_ring(0), &e, 8);
  std::uint16_t used_idx = 1;
  std::memcpy(d->device_host() + split::kUsedIdx, &used_idx, 2);
  auto u = d->poll();
  ASSERT_TRUE(u);
  EXPECT_EQ(u->id, *id);
  EXPECT_EQ(u->len, 100u);
  EXPECT_EQ(d->free_descriptors(), 8);
  // A bogus completion is counted, not trusted.
  e = UsedElem{5, 1};
  std::memcpy(d->device_host() + split::used_ring(1), &e, 8);
  used_idx = 2;
  std::memcpy(d->device_host() + split::kUsedIdx, &used_idx, 2);
  EXPECT_FALSE(d->poll());
  EXPECT_EQ(d->device_errors(), 1u);
}

TEST(VirtioDriver, PackedRingBytesAndWrap) {
  auto m = GuestMemory::create({{Gpa(0x100000), 0x40000}});
  ASSERT_TRUE(m);
  auto d = VirtioDriver::create(*m, DriverOptions{.packed = true, .size = 4});
  ASSERT_TRUE(d);
  for (int round = 0; round < 3; ++round) {
    std::vector<DriverBuffer> bufs{{Gpa(0x130000), 64, false}, {Gpa(0x131000), 64, true}};
    std::uint16_t slot = d->avail_idx();
    bool wrap = d->avail_wrap();
    auto id = d->add(bufs);
    ASSERT_TRUE(id);
    PackedDesc head;
    std::memcpy(&head, d->desc_host() + 16 * slot, 16);
    EXPECT_EQ(head.id, *id);
    EXPECT_EQ((head.flags & kPackedDescFAvail) != 0, wrap);
    EXPECT_EQ((head.flags & kPackedDescFUsed) != 0, !wrap);
    EXPECT_TRUE(head.flags & kDescFNext);
    // Complete it by hand: one used descriptor at the used position.
    bool uw = d->used_wrap();
    PackedDesc used{0, 9, *id,
                    static_cast<std::uint16_t>(uw ? (kPackedDescFAvail | kPackedDescFUsed) : 0)};
    std::memcpy(d->desc_host() + 16 * d->used_idx(), &used, 16);
    auto u = d->poll();
    ASSERT_TRUE(u) << round;
    EXPECT_EQ(u->len, 9u);
    EXPECT_EQ(d->used_idx(), d->avail_idx());
    EXPECT_EQ(d->used_wrap(), d->avail_wrap());
  }
}

}  // namespace
}  // namespace vhostkit::frontend
