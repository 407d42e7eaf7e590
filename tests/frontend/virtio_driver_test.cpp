// The guest driver model, byte by byte against virtio 1.2 sections 2.7 (split) and 2.8
// (packed): what add() writes, what publish() makes visible, how poll() consumes used
// entries that a hand-written "manual device" puts into the rings, index and wrap
// counter wrap-around, notification suppression in both directions, the IOMMU mappings
// of rings and buffers, and a two-thread run against a minimal device that follows the
// spec with the memory orders a real device uses.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <ostream>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "vhostkit/frontend/guest_memory.h"
#include "vhostkit/frontend/viommu.h"
#include "vhostkit/frontend/virtio_driver.h"
#include "vhostkit/virtio_spec.h"

namespace vhostkit::virtio {
// Found by argument-dependent lookup from gtest's comparisons.
inline bool operator==(const SplitDesc& a, const SplitDesc& b) {
  return a.addr == b.addr && a.len == b.len && a.flags == b.flags && a.next == b.next;
}
inline bool operator==(const PackedDesc& a, const PackedDesc& b) {
  return a.addr == b.addr && a.len == b.len && a.id == b.id && a.flags == b.flags;
}
inline std::ostream& operator<<(std::ostream& o, const SplitDesc& d) {
  return o << std::hex << "{addr " << d.addr << " len " << d.len << " flags " << d.flags << " next "
           << d.next << "}";
}
inline std::ostream& operator<<(std::ostream& o, const PackedDesc& d) {
  return o << std::hex << "{addr " << d.addr << " len " << d.len << " id " << d.id << " flags "
           << d.flags << "}";
}
}  // namespace vhostkit::virtio

namespace vhostkit::frontend {
namespace {

using namespace vhostkit::virtio;

constexpr std::uint64_t kRings = 0x100000;  // region 0: the rings (the allocator's first)
constexpr std::uint64_t kBufs = 0x400000;   // region 1: buffers, chosen by the tests
constexpr std::uint64_t kRegion = 0x100000;

template <typename T>
T get(const std::uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
void put(std::uint8_t* p, T v) {
  std::memcpy(p, &v, sizeof v);
}

DriverBuffer rd(std::uint64_t gpa, std::uint32_t len) {
  return DriverBuffer{Gpa(gpa), len, false};
}
DriverBuffer wr(std::uint64_t gpa, std::uint32_t len) {
  return DriverBuffer{Gpa(gpa), len, true};
}

class DriverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = GuestMemory::create({{Gpa(kRings), kRegion}, {Gpa(kBufs), kRegion}});
    ASSERT_TRUE(m) << m.error();
    mem.emplace(std::move(*m));
    // Dirty the ring region: create() must zero what it allocates.
    std::memset(mem->host(Gpa(kRings), kRegion), 0xa5, kRegion);
  }
  VirtioDriver make(DriverOptions o) {
    mem->reset_allocator();
    auto d = VirtioDriver::create(*mem, o);
    if (!d) {
      ADD_FAILURE() << d.error();
      std::abort();
    }
    return std::move(*d);
  }
  std::optional<GuestMemory> mem;
};

// ------------------------------------------------------------------------------------
// Split virtqueues (2.7)

SplitDesc split_desc(const VirtioDriver& d, std::uint16_t i) {
  return get<SplitDesc>(d.desc_host() + 16 * i);
}
std::uint16_t avail_idx(const VirtioDriver& d) {
  return get<std::uint16_t>(d.driver_host() + split::kAvailIdx);
}
std::uint16_t avail_flags(const VirtioDriver& d) {
  return get<std::uint16_t>(d.driver_host() + split::kAvailFlags);
}
std::uint16_t avail_ring(const VirtioDriver& d, std::uint32_t i) {
  return get<std::uint16_t>(d.driver_host() + split::avail_ring(i));
}
std::uint16_t used_event(const VirtioDriver& d) {
  return get<std::uint16_t>(d.driver_host() + split::used_event(d.options().size));
}

// A device driven by the test: it reads the avail ring and writes used entries exactly as
// 2.7.8 / 2.7.14 describe, in whatever order the test asks for.
struct SplitManualDevice {
  VirtioDriver& d;
  std::uint16_t last_avail = 0;
  std::uint16_t used = 0;

  std::uint16_t next_head() {
    EXPECT_NE(last_avail, avail_idx(d)) << "nothing available";
    return avail_ring(d, last_avail++ % d.options().size);
  }
  void complete(std::uint32_t id, std::uint32_t len) {
    put(d.device_host() + split::used_ring(used % d.options().size), UsedElem{id, len});
    ++used;
    put(d.device_host() + split::kUsedIdx, used);
  }
};

TEST_F(DriverTest, SplitLayoutIsLinuxsAndZeroed) {
  VirtioDriver d = make({.packed = false, .size = 8});
  const RingGpas g = d.gpas();
  EXPECT_EQ(g.desc, Gpa(kRings));  // page-aligned
  EXPECT_EQ(g.driver, g.desc + 16 * 8);
  EXPECT_EQ(g.device, g.desc + 192);                  // align64(128 + 6 + 2 * 8)
  EXPECT_EQ(d.addresses().desc.value, g.desc.value);  // no IOMMU: numerically GPAs
  EXPECT_EQ(d.addresses().driver.value, g.driver.value);
  EXPECT_EQ(d.addresses().device.value, g.device.value);
  EXPECT_EQ(d.driver_host(), mem->host(g.driver, 1));
  EXPECT_EQ(d.device_host(), mem->host(g.device, 1));
  const std::uint8_t* p = mem->host(g.desc, 4096);
  for (int i = 0; i < 4096; ++i) ASSERT_EQ(p[i], 0) << i;
  QueueConfig c = d.queue_config();
  EXPECT_EQ(c.format, RingFormat::split);
  EXPECT_EQ(c.size, 8);
  EXPECT_EQ(c.addr.device, d.addresses().device);

  VirtioDriver big = make({.packed = false, .size = 256});
  EXPECT_EQ(big.gpas().driver, big.gpas().desc + 4096);
  EXPECT_EQ(big.gpas().device, big.gpas().desc + 4672);  // align64(4096 + 518)
  EXPECT_EQ(big.gpas().device.value % split::kUsedAlign, 0u);
}

TEST_F(DriverTest, SplitAddWritesDescriptorsThenAvailRing) {
  VirtioDriver d = make({.packed = false, .size = 8});
  std::vector<DriverBuffer> chain{rd(kBufs, 64), rd(kBufs + 0x100, 32), wr(kBufs + 0x1000, 128)};
  auto id = d.add(chain);
  ASSERT_TRUE(id);
  EXPECT_EQ(*id, 0);  // head descriptor index
  EXPECT_EQ(split_desc(d, 0), (SplitDesc{kBufs, 64, kDescFNext, 1}));
  EXPECT_EQ(split_desc(d, 1), (SplitDesc{kBufs + 0x100, 32, kDescFNext, 2}));
  EXPECT_EQ(split_desc(d, 2), (SplitDesc{kBufs + 0x1000, 128, kDescFWrite, 0}));
  EXPECT_EQ(avail_ring(d, 0), 0);
  EXPECT_EQ(avail_idx(d), 1);
  EXPECT_EQ(avail_flags(d), 0);
  EXPECT_EQ(d.free_descriptors(), 5);
  EXPECT_EQ(d.outstanding(), 1);

  std::vector<DriverBuffer> one{wr(kBufs + 0x2000, 16)};
  auto id2 = d.add(one);
  ASSERT_TRUE(id2);
  EXPECT_EQ(*id2, 3);
  EXPECT_EQ(split_desc(d, 3), (SplitDesc{kBufs + 0x2000, 16, kDescFWrite, 0}));
  EXPECT_EQ(avail_ring(d, 1), 3);
  EXPECT_EQ(avail_idx(d), 2);
  // The device area is the device's: the driver wrote nothing there.
  for (std::uint32_t i = 0; i < split::used_size(8); ++i) ASSERT_EQ(d.device_host()[i], 0);
}

TEST_F(DriverTest, SplitBatchIsPublishedByOneIndexStore) {
  VirtioDriver d = make({.packed = false, .size = 8});
  std::vector<std::uint16_t> ids;
  for (int i = 0; i < 3; ++i) {
    std::vector<DriverBuffer> b{rd(kBufs + 0x100 * i, 8)};
    auto id = d.add(b, /*publish_now=*/false);
    ASSERT_TRUE(id);
    ids.push_back(*id);
    EXPECT_EQ(avail_ring(d, i), *id);  // entries are written at once...
    EXPECT_EQ(avail_idx(d), 0);        // ...but not published
  }
  EXPECT_EQ(d.avail_idx(), 3);
  d.publish();
  EXPECT_EQ(avail_idx(d), 3);
  EXPECT_TRUE(d.kick_needed());
}

TEST_F(DriverTest, SplitPollReturnsManualCompletionsInUsedOrder) {
  VirtioDriver d = make({.packed = false, .size = 8});
  SplitManualDevice dev{d};
  std::vector<DriverBuffer> three{rd(kBufs, 8), rd(kBufs + 8, 8), wr(kBufs + 16, 8)};
  std::vector<DriverBuffer> one{wr(kBufs + 32, 8)};
  auto a = d.add(three);
  auto b = d.add(one);
  auto c = d.add(one);
  ASSERT_TRUE(a && b && c);
  EXPECT_EQ(d.free_descriptors(), 3);
  EXPECT_EQ(dev.next_head(), *a);
  EXPECT_EQ(dev.next_head(), *b);
  EXPECT_EQ(dev.next_head(), *c);
  EXPECT_FALSE(d.poll());
  EXPECT_FALSE(d.more_used());
  dev.complete(*c, 7);
  dev.complete(*a, 9);
  EXPECT_TRUE(d.more_used());
  auto u1 = d.poll();
  ASSERT_TRUE(u1);
  EXPECT_EQ(u1->id, *c);
  EXPECT_EQ(u1->len, 7u);
  auto u2 = d.poll();
  ASSERT_TRUE(u2);
  EXPECT_EQ(u2->id, *a);
  EXPECT_EQ(u2->len, 9u);
  EXPECT_FALSE(d.poll());
  EXPECT_EQ(d.used_idx(), 2);
  EXPECT_EQ(d.free_descriptors(), 7);  // a's three and c's one are free again
  EXPECT_EQ(d.outstanding(), 1);
  // Freed descriptors are reused; the new chain's links follow the reused indices.
  auto e = d.add(three);
  ASSERT_TRUE(e);
  SplitDesc h = split_desc(d, *e);
  EXPECT_EQ(h.flags, kDescFNext);
  SplitDesc m = split_desc(d, h.next);
  EXPECT_EQ(m.flags, kDescFNext);
  EXPECT_EQ(split_desc(d, m.next).flags, kDescFWrite);
  dev.complete(dev.next_head(), 1);
  dev.complete(*b, 2);
  EXPECT_EQ(d.poll()->id, *e);
  EXPECT_EQ(d.poll()->id, *b);
  EXPECT_EQ(d.free_descriptors(), 8);
  EXPECT_EQ(d.device_errors(), 0u);
}

TEST_F(DriverTest, SplitIndicesWrapAt16Bits) {
  VirtioDriver d = make({.packed = false, .size = 4});
  SplitManualDevice dev{d};
  std::vector<DriverBuffer> one{wr(kBufs, 64)};
  for (std::uint32_t i = 0; i < 65536 + 10; ++i) {
    auto id = d.add(one);
    ASSERT_TRUE(id);
    ASSERT_EQ(avail_idx(d), static_cast<std::uint16_t>(i + 1));
    ASSERT_EQ(avail_ring(d, i % 4), *id);
    dev.complete(dev.next_head(), i);
    auto u = d.poll();
    ASSERT_TRUE(u) << i;
    ASSERT_EQ(u->id, *id);
    ASSERT_EQ(u->len, i);
    ASSERT_EQ(d.used_idx(), static_cast<std::uint16_t>(i + 1));
  }
  EXPECT_EQ(d.avail_idx(), 10);
  EXPECT_EQ(d.free_descriptors(), 4);
}

TEST_F(DriverTest, SplitIndirectTable) {
  VirtioDriver d = make({.packed = false, .size = 8, .indirect = true, .max_indirect = 4});
  std::vector<DriverBuffer> chain{rd(kBufs, 64), rd(kBufs + 0x100, 32), wr(kBufs + 0x1000, 128)};
  auto id = d.add(chain);
  ASSERT_TRUE(id);
  SplitDesc head = split_desc(d, *id);
  EXPECT_EQ(head.flags, kDescFIndirect);
  EXPECT_EQ(head.len, 48u);
  EXPECT_EQ(head.next, 0);
  const std::uint8_t* table = mem->host(Gpa(head.addr), head.len);
  ASSERT_NE(table, nullptr);
  EXPECT_EQ(table, d.indirect_host(*id));
  EXPECT_EQ(head.addr % 16, 0u);
  EXPECT_EQ(get<SplitDesc>(table), (SplitDesc{kBufs, 64, kDescFNext, 1}));
  EXPECT_EQ(get<SplitDesc>(table + 16), (SplitDesc{kBufs + 0x100, 32, kDescFNext, 2}));
  EXPECT_EQ(get<SplitDesc>(table + 32), (SplitDesc{kBufs + 0x1000, 128, kDescFWrite, 3}));
  EXPECT_EQ(d.free_descriptors(), 7);  // one ring descriptor
  // A single buffer needs no table; a chain longer than a table goes direct.
  std::vector<DriverBuffer> one{wr(kBufs, 1)};
  auto s = d.add(one);
  ASSERT_TRUE(s);
  EXPECT_EQ(split_desc(d, *s).flags, kDescFWrite);
  std::vector<DriverBuffer> five(5, rd(kBufs, 4));
  auto f = d.add(five);
  ASSERT_TRUE(f);
  EXPECT_EQ(split_desc(d, *f).flags, kDescFNext);
  EXPECT_EQ(d.free_descriptors(), 1);
}

TEST_F(DriverTest, SplitKickFollowsNoNotifyAndAvailEvent) {
  std::vector<DriverBuffer> one{wr(kBufs, 8)};
  {
    VirtioDriver d = make({.packed = false, .size = 8});
    ASSERT_TRUE(d.add(one));
    EXPECT_TRUE(d.kick_needed());
    put<std::uint16_t>(d.device_host() + split::kUsedFlags, kUsedFNoNotify);
    ASSERT_TRUE(d.add(one));
    EXPECT_FALSE(d.kick_needed());
    put<std::uint16_t>(d.device_host() + split::kUsedFlags, 0);
    ASSERT_TRUE(d.add(one));
    EXPECT_TRUE(d.kick_needed());
  }
  {
    VirtioDriver d = make({.packed = false, .size = 8, .event_idx = true});
    // The device wants a kick once the entry at index 2 is available.
    put<std::uint16_t>(d.device_host() + split::avail_event(8), 2);
    ASSERT_TRUE(d.add(one));  // idx 0 -> 1
    EXPECT_FALSE(d.kick_needed());
    ASSERT_TRUE(d.add(one));  // 1 -> 2
    EXPECT_FALSE(d.kick_needed());
    ASSERT_TRUE(d.add(one));  // 2 -> 3: entry 2 is now available
    EXPECT_TRUE(d.kick_needed());
    EXPECT_FALSE(d.kick_needed());  // nothing new since
    // A batch that jumps over the event index kicks once.
    put<std::uint16_t>(d.device_host() + split::avail_event(8), 4);
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(d.add(one, false));
    d.publish();  // 3 -> 6
    EXPECT_TRUE(d.kick_needed());
    // NO_NOTIFY is ignored with EVENT_IDX.
    put<std::uint16_t>(d.device_host() + split::kUsedFlags, kUsedFNoNotify);
    put<std::uint16_t>(d.device_host() + split::avail_event(8), 6);
    SplitManualDevice dev{d};
    for (int i = 0; i < 6; ++i) dev.complete(dev.next_head(), 0);
    while (d.poll()) {
    }
    ASSERT_TRUE(d.add(one));  // 6 -> 7
    EXPECT_TRUE(d.kick_needed());
  }
}

TEST_F(DriverTest, SplitInterruptSuppression) {
  std::vector<DriverBuffer> one{wr(kBufs, 8)};
  {
    VirtioDriver d = make({.packed = false, .size = 8});
    d.disable_interrupts();
    EXPECT_EQ(avail_flags(d), kAvailFNoInterrupt);
    d.enable_interrupts();
    EXPECT_EQ(avail_flags(d), 0);
    EXPECT_EQ(used_event(d), 0);  // untouched without EVENT_IDX
  }
  {
    VirtioDriver d = make({.packed = false, .size = 8, .event_idx = true});
    SplitManualDevice dev{d};
    ASSERT_TRUE(d.add(one));
    dev.complete(dev.next_head(), 0);
    ASSERT_TRUE(d.poll());
    EXPECT_EQ(used_event(d), 1);  // notify me when the entry at index 1 is used
    d.disable_interrupts();
    EXPECT_EQ(avail_flags(d), 0);  // must stay 0 with EVENT_IDX (2.7.10)
    EXPECT_EQ(used_event(d), 0);   // just behind: reached only after 65536 entries
    ASSERT_TRUE(d.add(one));
    dev.complete(dev.next_head(), 0);
    ASSERT_TRUE(d.poll());
    EXPECT_EQ(used_event(d), 0);  // not moved while disabled
    d.enable_interrupts();
    EXPECT_EQ(used_event(d), 2);
    EXPECT_EQ(avail_flags(d), 0);
  }
}

TEST_F(DriverTest, SplitBadCompletionsBreakTheDriver) {
  std::vector<DriverBuffer> one{wr(kBufs, 8)};
  {
    VirtioDriver d = make({.packed = false, .size = 8});
    SplitManualDevice dev{d};
    ASSERT_TRUE(d.add(one));
    dev.complete(8, 1);  // no such descriptor
    EXPECT_FALSE(d.poll());
    EXPECT_EQ(d.device_errors(), 1u);
    EXPECT_TRUE(d.broken());
    EXPECT_FALSE(d.add(one));
  }
  {
    VirtioDriver d = make({.packed = false, .size = 8});
    SplitManualDevice dev{d};
    ASSERT_TRUE(d.add(one));
    dev.complete(5, 1);  // a descriptor that is not the head of an outstanding chain
    EXPECT_FALSE(d.poll());
    EXPECT_TRUE(d.broken());
  }
  {
    VirtioDriver d = make({.packed = false, .size = 8});
    auto id = d.add(one);
    ASSERT_TRUE(id);
    put(d.device_host() + split::used_ring(0), UsedElem{*id, 0});
    put<std::uint16_t>(d.device_host() + split::kUsedIdx, 2);  // two used, one outstanding
    EXPECT_FALSE(d.poll());
    EXPECT_TRUE(d.broken());
  }
}

TEST_F(DriverTest, RejectsBadQueuesAndChains) {
  mem->reset_allocator();
  EXPECT_FALSE(VirtioDriver::create(*mem, {.packed = false, .size = 6}));
  EXPECT_FALSE(VirtioDriver::create(*mem, {.packed = false, .size = 0}));
  EXPECT_FALSE(VirtioDriver::create(*mem, {.packed = true, .size = 32769}));
  EXPECT_TRUE(VirtioDriver::create(*mem, {.packed = true, .size = 6}));
  VirtioDriver d = make({.packed = false, .size = 4});
  EXPECT_FALSE(d.add(std::vector<DriverBuffer>{}));
  EXPECT_FALSE(d.add(std::vector<DriverBuffer>{wr(kBufs, 1), rd(kBufs, 1)}));
  EXPECT_FALSE(d.add(std::vector<DriverBuffer>(5, rd(kBufs, 1))));
  EXPECT_FALSE(d.add(std::vector<DriverBuffer>{rd(kBufs, 0xffffffff), wr(kBufs, 2)}));
  ASSERT_TRUE(d.add(std::vector<DriverBuffer>(3, rd(kBufs, 1))));
  EXPECT_FALSE(d.add(std::vector<DriverBuffer>(2, rd(kBufs, 1))));  // one free descriptor
  EXPECT_TRUE(d.add(std::vector<DriverBuffer>(1, rd(kBufs, 1))));
  EXPECT_EQ(avail_idx(d), 2);  // the refused chains left no trace
  EXPECT_FALSE(d.broken());
}

TEST_F(DriverTest, SplitWithIommuUsesIovasAndUnmapsOnCompletion) {
  Viommu io(ViommuMode::strict);
  std::vector<std::uint64_t> invalidated;
  io.set_invalidate_listener([&](Iova i, std::uint64_t) { invalidated.push_back(i.value); });
  VirtioDriver d =
      make({.packed = false, .size = 8, .indirect = true, .iommu = &io, .max_indirect = 4});
  // The rings: one read-write mapping, IOVAs that are not the GPAs.
  RingAddresses a = d.addresses();
  RingGpas g = d.gpas();
  EXPECT_NE(a.desc.value, g.desc.value);
  auto ring = io.translate(a.desc);
  ASSERT_TRUE(ring);
  EXPECT_EQ(ring->gpa, g.desc);
  EXPECT_EQ(ring->perm, Access::read_write);
  EXPECT_EQ(a.driver, a.desc + (g.driver - g.desc));
  EXPECT_EQ(a.device, a.desc + (g.device - g.desc));
  EXPECT_EQ(io.mappings(), 1u);

  auto single = d.add(std::vector<DriverBuffer>{rd(kBufs + 0x10, 100)});
  auto chain = d.add(std::vector<DriverBuffer>{rd(kBufs + 0x2000, 8), wr(kBufs + 0x3ff8, 16)});
  ASSERT_TRUE(single && chain);
  SplitDesc s = split_desc(d, *single);
  EXPECT_NE(s.addr, kBufs + 0x10);
  EXPECT_EQ(s.addr & 0xfff, 0x10u);
  auto ts = io.translate(Iova(s.addr));
  ASSERT_TRUE(ts);
  EXPECT_EQ(ts->gpa, Gpa(kBufs));
  EXPECT_EQ(ts->perm, Access::read);
  // Indirect: the table is mapped read-only, its entries carry IOVAs.
  SplitDesc h = split_desc(d, *chain);
  ASSERT_EQ(h.flags, kDescFIndirect);
  auto tt = io.translate(Iova(h.addr));
  ASSERT_TRUE(tt);
  EXPECT_EQ(tt->perm, Access::read);
  const std::uint8_t* table = d.indirect_host(*chain);
  EXPECT_EQ(mem->host(tt->gpa + (h.addr - tt->iova.value), 32), table);
  auto e0 = get<SplitDesc>(table);
  auto e1 = get<SplitDesc>(table + 16);
  EXPECT_EQ(io.translate(Iova(e0.addr))->gpa, Gpa(kBufs + 0x2000));
  EXPECT_EQ(io.translate(Iova(e0.addr))->perm, Access::read);
  auto w = io.translate(Iova(e1.addr));
  EXPECT_EQ(w->gpa, Gpa(kBufs + 0x3000));
  EXPECT_EQ(w->len, 0x2000u);  // 16 bytes across a page boundary: two pages
  EXPECT_EQ(w->perm, Access::write);
  EXPECT_EQ(io.mappings(), 5u);

  SplitManualDevice dev{d};
  dev.complete(dev.next_head(), 0);
  dev.complete(dev.next_head(), 16);
  ASSERT_TRUE(d.poll());
  EXPECT_EQ(invalidated.size(), 1u);
  EXPECT_FALSE(io.translate(Iova(s.addr)));
  ASSERT_TRUE(d.poll());
  EXPECT_EQ(invalidated.size(), 4u);  // two buffers and the table
  EXPECT_EQ(io.mappings(), 1u);       // the ring stays mapped
}

// ------------------------------------------------------------------------------------
// Packed virtqueues (2.8)

PackedDesc packed_desc(const VirtioDriver& d, std::uint16_t slot) {
  return get<PackedDesc>(d.desc_host() + 16 * slot);
}
constexpr std::uint16_t avail_bits(bool wrap) {
  return wrap ? kPackedDescFAvail : kPackedDescFUsed;
}
constexpr std::uint16_t used_bits(bool wrap) {
  return wrap ? static_cast<std::uint16_t>(kPackedDescFAvail | kPackedDescFUsed) : 0;
}

// Writes used descriptors as 2.8.4 / 2.8.6 describe: one per chain, at the device's
// used position, which then skips the chain's descriptors.
struct PackedManualDevice {
  VirtioDriver& d;
  std::uint16_t used = 0;
  bool wrap = true;

  void complete(std::uint16_t id, std::uint32_t len, std::uint16_t descs) {
    put(d.desc_host() + 16 * used, PackedDesc{0, len, id, used_bits(wrap)});
    used = static_cast<std::uint16_t>(used + descs);
    if (used >= d.options().size) {
      used = static_cast<std::uint16_t>(used - d.options().size);
      wrap = !wrap;
    }
  }
};

EventSuppress driver_event(const VirtioDriver& d) {
  return get<EventSuppress>(d.driver_host());
}
void set_device_event(VirtioDriver& d, std::uint16_t off, bool wrap, std::uint16_t flags) {
  put(d.device_host(),
      EventSuppress{static_cast<std::uint16_t>(off | (wrap ? packed::kWrapBit : 0)), flags});
}

TEST_F(DriverTest, PackedLayoutAndZeroing) {
  VirtioDriver d = make({.packed = true, .size = 6});
  RingGpas g = d.gpas();
  EXPECT_EQ(g.desc, Gpa(kRings));
  for (Gpa x : {g.desc, g.driver, g.device}) EXPECT_EQ(x.value % 4096, 0u);
  EXPECT_NE(g.driver, g.device);
  EXPECT_NE(g.driver.page(), g.desc.page());
  for (int i = 0; i < 16 * 6; ++i) ASSERT_EQ(d.desc_host()[i], 0);
  EXPECT_EQ(driver_event(d).flags, kEventFlagsEnable);
  EXPECT_EQ(driver_event(d).off_wrap, 0);
  EXPECT_EQ(get<std::uint32_t>(d.device_host()), 0u);
  EXPECT_EQ(d.queue_config().format, RingFormat::packed);
  EXPECT_TRUE(d.avail_wrap());
  EXPECT_TRUE(d.used_wrap());
}

TEST_F(DriverTest, PackedAddWritesEveryDescriptorWithWrapBits) {
  VirtioDriver d = make({.packed = true, .size = 4});
  PackedManualDevice dev{d};
  auto a = d.add(std::vector<DriverBuffer>{rd(kBufs, 64), wr(kBufs + 0x1000, 128)});
  ASSERT_TRUE(a);
  EXPECT_EQ(*a, 0);  // buffer id
  EXPECT_EQ(packed_desc(d, 0), (PackedDesc{kBufs, 64, 0, kDescFNext | kPackedDescFAvail}));
  EXPECT_EQ(packed_desc(d, 1),
            (PackedDesc{kBufs + 0x1000, 128, 0, kDescFWrite | kPackedDescFAvail}));
  EXPECT_EQ(d.avail_idx(), 2);
  EXPECT_TRUE(d.avail_wrap());
  EXPECT_EQ(d.free_descriptors(), 2);
  dev.complete(*a, 5, 2);
  auto u = d.poll();
  ASSERT_TRUE(u);
  EXPECT_EQ(u->id, *a);
  EXPECT_EQ(u->len, 5u);
  EXPECT_EQ(d.used_idx(), 2);

  // Three descriptors from slot 2: slots 2 and 3 in this lap, slot 0 in the next, whose
  // wrap counter is 0: AVAIL clear, USED set (2.8.1).
  auto b = d.add(std::vector<DriverBuffer>{rd(kBufs, 1), rd(kBufs + 1, 2), wr(kBufs + 2, 3)});
  ASSERT_TRUE(b);
  EXPECT_EQ(packed_desc(d, 2), (PackedDesc{kBufs, 1, *b, kDescFNext | avail_bits(true)}));
  EXPECT_EQ(packed_desc(d, 3), (PackedDesc{kBufs + 1, 2, *b, kDescFNext | avail_bits(true)}));
  EXPECT_EQ(packed_desc(d, 0), (PackedDesc{kBufs + 2, 3, *b, kDescFWrite | avail_bits(false)}));
  EXPECT_EQ(packed_desc(d, 0).flags, kDescFWrite | kPackedDescFUsed);
  EXPECT_EQ(d.avail_idx(), 1);
  EXPECT_FALSE(d.avail_wrap());
  dev.complete(*b, 6, 3);
  u = d.poll();
  ASSERT_TRUE(u);
  EXPECT_EQ(u->id, *b);
  EXPECT_EQ(d.used_idx(), 1);
  EXPECT_FALSE(d.used_wrap());

  // In the second lap a used descriptor has AVAIL = USED = 0.
  auto c = d.add(std::vector<DriverBuffer>{wr(kBufs, 9)});
  ASSERT_TRUE(c);
  EXPECT_EQ(packed_desc(d, 1), (PackedDesc{kBufs, 9, *c, kDescFWrite | kPackedDescFUsed}));
  EXPECT_FALSE(d.poll());  // an available descriptor is not a used one
  dev.complete(*c, 4, 1);
  EXPECT_EQ(packed_desc(d, 1).flags, 0);
  u = d.poll();
  ASSERT_TRUE(u);
  EXPECT_EQ(u->len, 4u);
  EXPECT_EQ(d.free_descriptors(), 4);
}

TEST_F(DriverTest, PackedBatchMakesFirstHeadAvailableLast) {
  VirtioDriver d = make({.packed = true, .size = 8});
  auto a = d.add(std::vector<DriverBuffer>{rd(kBufs, 8), wr(kBufs + 8, 8)}, false);
  auto b = d.add(std::vector<DriverBuffer>{wr(kBufs + 16, 8)}, false);
  ASSERT_TRUE(a && b);
  // Heads not yet available (their flags still zero); the rest of a chain is written.
  EXPECT_EQ(packed_desc(d, 0).flags, 0);
  EXPECT_EQ(packed_desc(d, 0).id, *a);
  EXPECT_EQ(packed_desc(d, 0).addr, kBufs);
  EXPECT_EQ(packed_desc(d, 1).flags, kDescFWrite | kPackedDescFAvail);
  EXPECT_EQ(packed_desc(d, 2).flags, 0);
  d.publish();
  EXPECT_EQ(packed_desc(d, 0).flags, kDescFNext | kPackedDescFAvail);
  EXPECT_EQ(packed_desc(d, 2).flags, kDescFWrite | kPackedDescFAvail);
  EXPECT_EQ(packed_desc(d, 2).id, *b);
}

TEST_F(DriverTest, PackedOutOfOrderCompletionSkipsByChainLength) {
  VirtioDriver d = make({.packed = true, .size = 8});
  PackedManualDevice dev{d};
  auto a = d.add(std::vector<DriverBuffer>{wr(kBufs, 8)});
  auto b = d.add(std::vector<DriverBuffer>{rd(kBufs, 8), rd(kBufs, 8), wr(kBufs + 8, 8)});
  auto c = d.add(std::vector<DriverBuffer>{rd(kBufs, 8), wr(kBufs + 8, 8)});
  ASSERT_TRUE(a && b && c);
  EXPECT_EQ(std::vector<std::uint16_t>({*a, *b, *c}), std::vector<std::uint16_t>({0, 1, 2}));
  dev.complete(*b, 30, 3);  // at slot 0
  dev.complete(*a, 10, 1);  // at slot 3
  auto u = d.poll();
  ASSERT_TRUE(u);
  EXPECT_EQ(u->id, *b);
  EXPECT_EQ(d.used_idx(), 3);
  u = d.poll();
  ASSERT_TRUE(u);
  EXPECT_EQ(u->id, *a);
  EXPECT_EQ(d.used_idx(), 4);
  EXPECT_FALSE(d.poll());
  dev.complete(*c, 20, 2);  // at slot 4
  EXPECT_EQ(d.poll()->id, *c);
  EXPECT_EQ(d.used_idx(), 6);
  EXPECT_EQ(d.free_descriptors(), 8);
}

TEST_F(DriverTest, PackedWrapsManyLapsWithMixedChainLengths) {
  // 5 slots, chains of 1, 2 and 3 descriptors: chains straddle the end in every phase.
  VirtioDriver d = make({.packed = true, .size = 5});
  PackedManualDevice dev{d};
  std::uint16_t slot = 0;
  bool wrap = true;
  for (int i = 0; i < 3000; ++i) {
    const std::size_t k = 1 + i % 3;
    std::vector<DriverBuffer> bufs;
    for (std::size_t j = 0; j + 1 < k; ++j) bufs.push_back(rd(kBufs + 64 * j, 8));
    bufs.push_back(wr(kBufs + 0x1000, 8));
    auto id = d.add(bufs);
    ASSERT_TRUE(id) << i;
    for (std::size_t j = 0; j < k; ++j) {
      PackedDesc pd = packed_desc(d, slot);
      ASSERT_EQ(pd.id, *id);
      ASSERT_EQ(pd.flags & (kPackedDescFAvail | kPackedDescFUsed), avail_bits(wrap))
          << "chain " << i << " descriptor " << j;
      ASSERT_EQ((pd.flags & kDescFNext) != 0, j + 1 < k);
      if (++slot == 5) {
        slot = 0;
        wrap = !wrap;
      }
    }
    ASSERT_EQ(d.avail_idx(), slot);
    ASSERT_EQ(d.avail_wrap(), wrap);
    dev.complete(*id, static_cast<std::uint32_t>(i), static_cast<std::uint16_t>(k));
    auto u = d.poll();
    ASSERT_TRUE(u) << i;
    ASSERT_EQ(u->id, *id);
    ASSERT_EQ(u->len, static_cast<std::uint32_t>(i));
    ASSERT_EQ(d.used_idx(), dev.used);
    ASSERT_EQ(d.used_wrap(), dev.wrap);
  }
  EXPECT_EQ(d.free_descriptors(), 5);
}

TEST_F(DriverTest, PackedIndirect) {
  VirtioDriver d = make({.packed = true, .size = 4, .indirect = true, .max_indirect = 8});
  auto id = d.add(std::vector<DriverBuffer>{rd(kBufs, 64), rd(kBufs + 64, 8), wr(kBufs + 128, 32)});
  ASSERT_TRUE(id);
  PackedDesc h = packed_desc(d, 0);
  EXPECT_EQ(h.flags, kDescFIndirect | kPackedDescFAvail);
  EXPECT_EQ(h.len, 48u);
  EXPECT_EQ(h.id, *id);
  const std::uint8_t* table = mem->host(Gpa(h.addr), 48);
  ASSERT_EQ(table, d.indirect_host(*id));
  // Table entries: no NEXT (they are consecutive), WRITE where the device writes.
  EXPECT_EQ(get<PackedDesc>(table), (PackedDesc{kBufs, 64, 0, 0}));
  EXPECT_EQ(get<PackedDesc>(table + 16), (PackedDesc{kBufs + 64, 8, 0, 0}));
  EXPECT_EQ(get<PackedDesc>(table + 32), (PackedDesc{kBufs + 128, 32, 0, kDescFWrite}));
  EXPECT_EQ(d.free_descriptors(), 3);
  PackedManualDevice dev{d};
  dev.complete(*id, 32, 1);
  EXPECT_EQ(d.poll()->id, *id);
  EXPECT_EQ(d.used_idx(), 1);
}

TEST_F(DriverTest, PackedKickFollowsDeviceEventSuppression) {
  std::vector<DriverBuffer> one{wr(kBufs, 8)};
  VirtioDriver d = make({.packed = true, .size = 4, .event_idx = true});
  PackedManualDevice dev{d};
  ASSERT_TRUE(d.add(one));
  EXPECT_TRUE(d.kick_needed());  // ENABLE
  set_device_event(d, 0, false, kEventFlagsDisable);
  ASSERT_TRUE(d.add(one));
  EXPECT_FALSE(d.kick_needed());
  // DESC: kick when the descriptor at offset 3 of the first lap becomes available.
  set_device_event(d, 3, true, kEventFlagsDesc);
  ASSERT_TRUE(d.add(one));  // slot 2
  EXPECT_FALSE(d.kick_needed());
  for (std::uint16_t id = 0; id < 3; ++id) dev.complete(id, 0, 1);
  while (d.poll()) {
  }
  ASSERT_TRUE(d.add(one));  // slot 3
  EXPECT_TRUE(d.kick_needed());
  // Next lap (wrap counter 0): the event at offset 1.
  set_device_event(d, 1, false, kEventFlagsDesc);
  ASSERT_TRUE(d.add(one));  // slot 0 of lap 2
  EXPECT_FALSE(d.kick_needed());
  ASSERT_TRUE(d.add(one));  // slot 1 of lap 2
  EXPECT_TRUE(d.kick_needed());
  EXPECT_FALSE(d.kick_needed());  // nothing new
}

TEST_F(DriverTest, PackedInterruptSuppression) {
  std::vector<DriverBuffer> one{wr(kBufs, 8)};
  {
    VirtioDriver d = make({.packed = true, .size = 4});
    d.disable_interrupts();
    EXPECT_EQ(driver_event(d).flags, kEventFlagsDisable);
    d.enable_interrupts();
    EXPECT_EQ(driver_event(d).flags, kEventFlagsEnable);
  }
  {
    VirtioDriver d = make({.packed = true, .size = 4, .event_idx = true});
    PackedManualDevice dev{d};
    for (int i = 0; i < 3; ++i) {
      auto id = d.add(one);
      ASSERT_TRUE(id);
      dev.complete(*id, 0, 1);
      ASSERT_TRUE(d.poll());
    }
    EXPECT_EQ(driver_event(d).off_wrap, 0);  // ENABLE mode: off_wrap not maintained
    d.enable_interrupts();
    EXPECT_EQ(driver_event(d).flags, kEventFlagsDesc);
    EXPECT_EQ(driver_event(d).off_wrap, 3 | packed::kWrapBit);
    auto id = d.add(one);  // slot 3
    ASSERT_TRUE(id);
    dev.complete(*id, 0, 1);
    ASSERT_TRUE(d.poll());
    // Next used descriptor expected at slot 0 of the second lap.
    EXPECT_EQ(driver_event(d).off_wrap, 0);
    EXPECT_FALSE(d.used_wrap());
    d.disable_interrupts();
    EXPECT_EQ(driver_event(d).flags, kEventFlagsDisable);
  }
}

TEST_F(DriverTest, PackedBadIdBreaksTheDriver) {
  VirtioDriver d = make({.packed = true, .size = 4});
  ASSERT_TRUE(d.add(std::vector<DriverBuffer>{wr(kBufs, 8)}));
  PackedManualDevice dev{d};
  dev.complete(3, 0, 1);  // id 3 is not outstanding
  EXPECT_FALSE(d.poll());
  EXPECT_TRUE(d.broken());
  EXPECT_EQ(d.device_errors(), 1u);
}

TEST_F(DriverTest, PackedWithIommuMapsThreeAreas) {
  Viommu io(ViommuMode::lazy, Viommu::kDefaultIovaBase, 100);
  VirtioDriver d = make({.packed = true, .size = 4, .iommu = &io});
  RingAddresses a = d.addresses();
  RingGpas g = d.gpas();
  EXPECT_EQ(io.translate(a.desc)->gpa, g.desc);
  EXPECT_EQ(io.translate(a.driver)->gpa, g.driver);
  EXPECT_EQ(io.translate(a.device)->gpa, g.device);
  EXPECT_EQ(io.translate(a.device)->perm, Access::read_write);
  auto id = d.add(std::vector<DriverBuffer>{rd(kBufs, 8), wr(kBufs + 0x5000, 8)});
  ASSERT_TRUE(id);
  EXPECT_EQ(io.translate(Iova(packed_desc(d, 0).addr))->gpa, Gpa(kBufs));
  EXPECT_EQ(io.translate(Iova(packed_desc(d, 1).addr))->perm, Access::write);
  PackedManualDevice dev{d};
  dev.complete(*id, 8, 2);
  ASSERT_TRUE(d.poll());
  EXPECT_EQ(io.mappings(), 3u);
  EXPECT_EQ(io.pending_invalidations(), 2u);  // lazy: sent at the next flush
}

// ------------------------------------------------------------------------------------
// Two threads: the driver model against a minimal spec-following device that reads the
// rings with acquire loads and publishes used entries with release stores, completing
// each batch in reverse order. Checks data written before publish() reaches the device
// and the device's writes are visible after poll().

template <typename T>
T aload(const std::uint8_t* p, std::memory_order o = std::memory_order_relaxed) {
  return std::atomic_ref<T>(*reinterpret_cast<T*>(const_cast<std::uint8_t*>(p))).load(o);
}
template <typename T>
void astore(std::uint8_t* p, T v, std::memory_order o = std::memory_order_relaxed) {
  std::atomic_ref<T>(*reinterpret_cast<T*>(p)).store(v, o);
}

struct Popped {
  std::uint16_t id;
  std::uint16_t ring_descs;
  std::vector<PackedDesc> bufs;  // addr, len, flags (WRITE) of each buffer
};

class ThreadedDevice {
 public:
  ThreadedDevice(GuestMemory& m, const VirtioDriver& d)
      : mem_(m),
        packed_(d.options().packed),
        n_(d.options().size),
        desc_(d.desc_host()),
        driver_(d.driver_host()),
        device_(d.device_host()) {}

  void run(const std::atomic<bool>& stop) {
    std::vector<Popped> batch;
    while (!stop.load(std::memory_order_relaxed)) {
      batch.clear();
      while (auto c = packed_ ? pop_packed() : pop_split()) batch.push_back(std::move(*c));
      for (auto it = batch.rbegin(); it != batch.rend(); ++it) {
        std::uint32_t len = serve(*it);
        packed_ ? push_packed(*it, len) : push_split(*it, len);
      }
      if (batch.empty()) std::this_thread::yield();
    }
  }
  std::uint64_t errors = 0;

 private:
  void add_table(Popped& p, std::uint64_t addr, std::uint32_t len) {
    const std::uint8_t* t = mem_.host(Gpa(addr), len);
    for (std::uint32_t i = 0; t != nullptr && i < len / 16; ++i) {
      std::uint64_t a = get<std::uint64_t>(t + 16 * i);
      std::uint32_t l = get<std::uint32_t>(t + 16 * i + 8);
      // split: flags at 12; packed: flags at 14
      std::uint16_t f = get<std::uint16_t>(t + 16 * i + (packed_ ? 14 : 12));
      p.bufs.push_back(PackedDesc{a, l, 0, static_cast<std::uint16_t>(f & kDescFWrite)});
    }
  }
  std::optional<Popped> pop_split() {
    auto idx = aload<std::uint16_t>(driver_ + split::kAvailIdx, std::memory_order_acquire);
    if (idx == last_avail_) return std::nullopt;
    auto head = aload<std::uint16_t>(driver_ + split::avail_ring(last_avail_++ % n_));
    Popped p{head, 0, {}};
    std::uint16_t i = head;
    for (std::uint32_t hops = 0; hops < n_; ++hops) {
      const std::uint8_t* dp = desc_ + 16 * i;
      auto addr = aload<std::uint64_t>(dp);
      auto len = aload<std::uint32_t>(dp + 8);
      auto flags = aload<std::uint16_t>(dp + 12);
      ++p.ring_descs;
      if (flags & kDescFIndirect)
        add_table(p, addr, len);
      else
        p.bufs.push_back(PackedDesc{addr, len, 0, static_cast<std::uint16_t>(flags & kDescFWrite)});
      if (!(flags & kDescFNext)) break;
      i = aload<std::uint16_t>(dp + 14);
    }
    return p;
  }
  void push_split(const Popped& p, std::uint32_t len) {
    std::uint8_t* e = device_ + split::used_ring(used_ % n_);
    astore<std::uint32_t>(e, p.id);
    astore<std::uint32_t>(e + 4, len);
    ++used_;
    astore<std::uint16_t>(device_ + split::kUsedIdx, used_, std::memory_order_release);
  }
  std::optional<Popped> pop_packed() {
    auto flags = aload<std::uint16_t>(desc_ + 16 * next_avail_ + 14, std::memory_order_acquire);
    bool avail = flags & kPackedDescFAvail, used = flags & kPackedDescFUsed;
    if (avail != avail_wrap_ || used == avail_wrap_) return std::nullopt;
    Popped p{0, 0, {}};
    while (true) {
      const std::uint8_t* dp = desc_ + 16 * next_avail_;
      auto addr = aload<std::uint64_t>(dp);
      auto len = aload<std::uint32_t>(dp + 8);
      p.id = aload<std::uint16_t>(dp + 12);  // the last descriptor's id counts
      auto f = aload<std::uint16_t>(dp + 14);
      ++p.ring_descs;
      if (++next_avail_ == n_) {
        next_avail_ = 0;
        avail_wrap_ = !avail_wrap_;
      }
      if (f & kDescFIndirect)
        add_table(p, addr, len);
      else
        p.bufs.push_back(PackedDesc{addr, len, 0, static_cast<std::uint16_t>(f & kDescFWrite)});
      if (!(f & kDescFNext) || p.ring_descs == n_) break;
    }
    return p;
  }
  void push_packed(const Popped& p, std::uint32_t len) {
    std::uint8_t* dp = desc_ + 16 * next_used_;
    astore<std::uint32_t>(dp + 8, len);
    astore<std::uint16_t>(dp + 12, p.id);
    astore<std::uint16_t>(dp + 14, used_bits(used_wrap_), std::memory_order_release);
    next_used_ = static_cast<std::uint16_t>(next_used_ + p.ring_descs);
    if (next_used_ >= n_) {
      next_used_ = static_cast<std::uint16_t>(next_used_ - n_);
      used_wrap_ = !used_wrap_;
    }
  }
  // The "device function": the first readable buffer holds a sequence number; write
  // three times it into the first writable buffer.
  std::uint32_t serve(const Popped& p) {
    const std::uint8_t* in = nullptr;
    for (const PackedDesc& b : p.bufs) {
      if (!(b.flags & kDescFWrite)) {
        if (in == nullptr) in = mem_.host(Gpa(b.addr), 4);
        continue;
      }
      std::uint8_t* out = mem_.host(Gpa(b.addr), 4);
      if (in == nullptr || out == nullptr) break;
      put<std::uint32_t>(out, get<std::uint32_t>(in) * 3);
      return 4;
    }
    ++errors;
    return 0;
  }

  GuestMemory& mem_;
  bool packed_;
  std::uint32_t n_;
  std::uint8_t* desc_;
  const std::uint8_t* driver_;
  std::uint8_t* device_;
  std::uint16_t last_avail_ = 0, used_ = 0;       // split
  std::uint16_t next_avail_ = 0, next_used_ = 0;  // packed
  bool avail_wrap_ = true, used_wrap_ = true;     // packed
};

struct ThreadedCase {
  bool packed;
  bool indirect;
};

class DriverDeviceThreads : public DriverTest,
                            public ::testing::WithParamInterface<ThreadedCase> {};

TEST_P(DriverDeviceThreads, EveryChainCompletesWithTheDevicesData) {
  const ThreadedCase tc = GetParam();
  VirtioDriver d =
      make({.packed = tc.packed, .size = 64, .indirect = tc.indirect, .max_indirect = 4});
  ThreadedDevice device(*mem, d);
  std::atomic<bool> stop{false};
  std::thread t([&] { device.run(stop); });
  struct Joiner {  // stops the device even when an assertion returns early
    std::atomic<bool>& stop;
    std::thread& t;
    ~Joiner() {
      stop = true;
      if (t.joinable()) t.join();
    }
  } joiner{stop, t};

  // Each chain's data lives in a slot chosen by its sequence number; the window is much
  // larger than the queue, so no slot is reused while its chain is in flight.
  constexpr std::uint32_t kChains = 20000;
  constexpr std::uint32_t kWindow = 1024;
  auto slot = [](std::uint32_t seq) { return kBufs + 0x10000 + 32ULL * (seq % kWindow); };
  std::map<std::uint16_t, std::uint32_t> seq_of;  // outstanding id -> sequence number
  std::uint32_t sent = 0, done = 0;
  while (done < kChains) {
    bool added = false;
    while (sent < kChains && d.free_descriptors() >= 3) {
      const std::uint64_t base = slot(sent);
      put<std::uint32_t>(mem->host(Gpa(base), 4), sent);  // before publish(): plain store
      std::vector<DriverBuffer> bufs{rd(base, 4)};
      if (sent % 2) bufs.push_back(rd(base + 8, 8));  // three-buffer chains too
      bufs.push_back(wr(base + 16, 4));
      auto id = d.add(bufs, /*publish_now=*/false);
      ASSERT_TRUE(id) << id.error();
      ASSERT_FALSE(seq_of.count(*id)) << "id handed out twice";
      seq_of[*id] = sent++;
      added = true;
    }
    if (added) {
      d.publish();
      (void)d.kick_needed();
    }
    while (auto u = d.poll()) {
      auto it = seq_of.find(u->id);
      ASSERT_NE(it, seq_of.end());
      const std::uint32_t seq = it->second;
      ASSERT_EQ(u->len, 4u);
      ASSERT_EQ(get<std::uint32_t>(mem->host(Gpa(slot(seq) + 16), 4)), seq * 3) << seq;
      seq_of.erase(it);
      ++done;
    }
    ASSERT_FALSE(d.broken());
    std::this_thread::yield();
  }
  stop = true;
  t.join();
  EXPECT_EQ(device.errors, 0u);
  EXPECT_EQ(d.device_errors(), 0u);
  EXPECT_EQ(d.free_descriptors(), 64);
  EXPECT_EQ(d.outstanding(), 0);
}

INSTANTIATE_TEST_SUITE_P(Rings, DriverDeviceThreads,
                         ::testing::Values(ThreadedCase{false, false}, ThreadedCase{false, true},
                                           ThreadedCase{true, false}, ThreadedCase{true, true}),
                         [](const auto& param_info) {
                           return std::string(param_info.param.packed ? "packed" : "split") +
                                  (param_info.param.indirect ? "_indirect" : "_direct");
                         });

TEST_F(DriverTest, PremappedBuffersAreTheCallersToMapAndUnmap) {
  Viommu io(ViommuMode::strict);
  int invalidations = 0;
  io.set_invalidate_listener([&](Iova, std::uint64_t) { ++invalidations; });
  for (bool packed : {false, true}) {
    VirtioDriver d = make({.packed = packed, .size = 8, .iommu = &io});
    const std::size_t ring_maps = io.mappings();
    // One mapping used by many chains, as a page pool's driver does.
    const Iova pool = io.map(Gpa(kBufs), 4096, Access::read);
    DriverBuffer b = rd(kBufs + 0x40, 64);
    SplitManualDevice sdev{d};
    PackedManualDevice pdev{d};
    b.premapped = pool + 0x40;
    for (int round = 0; round < 3; ++round) {
      auto id = d.add(std::span(&b, 1));
      ASSERT_TRUE(id);
      EXPECT_EQ(
          packed ? packed_desc(d, static_cast<std::uint16_t>(round)).addr : split_desc(d, *id).addr,
          (pool + 0x40).value);
      EXPECT_EQ(io.mappings(), ring_maps + 1);  // nothing mapped per chain
      if (packed)
        pdev.complete(*id, 0, 1);
      else
        sdev.complete(*id, 0);
      ASSERT_TRUE(d.poll());
      EXPECT_EQ(invalidations, 0);  // nor unmapped on completion
      EXPECT_TRUE(io.translate(pool));
    }
    EXPECT_TRUE(io.unmap(pool, 4096));
    invalidations = 0;
  }
}

}  // namespace
}  // namespace vhostkit::frontend
