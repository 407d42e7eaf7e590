// Virtqueue device side: one test per malformed-chain rule, deferral on IOTLB misses,
// logging of every ring write, notification decisions, state save/restore.
// Rings are written byte by byte here, as a (possibly hostile) driver would.
#include <cstring>

#include <gtest/gtest.h>

#include "support/memfd.h"
#include "vhostkit/virtqueue.h"

namespace vhostkit {
namespace {

using namespace virtio;
using testing::make_memfd;
using testing::region;

constexpr std::uint64_t kBase = 0x100000;  // guest RAM: GPA [1 MiB, 2 MiB)
constexpr std::uint64_t kRam = 1 << 20;
constexpr std::uint16_t kSize = 8;
constexpr std::uint64_t kDesc = kBase + 0x0000;
constexpr std::uint64_t kAvail = kBase + 0x1000;
constexpr std::uint64_t kUsed = kBase + 0x2000;
constexpr std::uint64_t kBuf = kBase + 0x10000;
constexpr std::uint64_t kIovaBase = 0xfe00000000;  // with the IOMMU: IOVA = kIovaBase + GPA

struct QueueTest : ::testing::Test {
  AddressSpace space;
  std::vector<std::uint8_t> log_bits = std::vector<std::uint8_t>(256, 0);
  std::unique_ptr<Virtqueue> vq;
  ChainBatch batch;

  void SetUp() override {
    std::vector<RegionSpec> v;
    v.push_back(region(make_memfd(kRam), 0, kRam, kBase, 0x7f0000000000));
    ASSERT_TRUE(space.set_mem_table(std::move(v)));
    vq = std::make_unique<Virtqueue>(space, LogMode::immediate);
  }
  std::uint8_t* g(std::uint64_t gpa) { return space.memory()->gpa_to_host(Gpa(gpa))->host; }
  template <typename T>
  void put(std::uint64_t gpa, T v) {
    std::memcpy(g(gpa), &v, sizeof(T));
  }
  template <typename T>
  T get(std::uint64_t gpa) {
    T v;
    std::memcpy(&v, g(gpa), sizeof(T));
    return v;
  }
  void desc(std::uint16_t i, std::uint64_t addr, std::uint32_t len, std::uint16_t flags,
            std::uint16_t next = 0, std::uint64_t table = kDesc) {
    put(table + 16ULL * i, SplitDesc{addr, len, flags, next});
  }
  // Makes head available at avail slot avail_idx and publishes avail_idx + 1.
  void offer(std::uint16_t head, std::uint16_t avail_idx) {
    put<std::uint16_t>(kAvail + split::avail_ring(avail_idx % kSize), head);
    put<std::uint16_t>(kAvail + split::kAvailIdx, static_cast<std::uint16_t>(avail_idx + 1));
  }
  QueueConfig split_config(bool indirect = true, bool event_idx = false, bool iommu = false) {
    QueueConfig c;
    c.format = RingFormat::split;
    c.size = kSize;
    c.indirect = indirect;
    c.event_idx = event_idx;
    std::uint64_t off = iommu ? kIovaBase : 0;
    c.addr = RingAddresses{Iova(kDesc + off), Iova(kAvail + off), Iova(kUsed + off)};
    return c;
  }
  void start_split(bool indirect = true, bool event_idx = false) {
    ASSERT_TRUE(vq->start(split_config(indirect, event_idx)));
  }
  VirtqueueErrc pop_error() {
    auto r = vq->pop(batch, 16);
    EXPECT_FALSE(r.has_value());
    if (r) return VirtqueueErrc::not_started;
    EXPECT_TRUE(vq->broken());
    return r.error().code;
  }
  void enable_log() {
    ASSERT_TRUE(space.set_log(DirtyLog::over(log_bits)));
    space.set_logging(true);
  }
  bool dirty(std::uint64_t gpa) { return space.log()->test(gpa / 4096); }
  void map_all_iova(Access perm = Access::read_write) {
    space.set_iommu(true);
    ASSERT_TRUE(space.iotlb_update(Iova(kIovaBase + kBase), kRam, Gpa(kBase), perm));
  }
};

TEST_F(QueueTest, PopsAndPushesASimpleChain) {
  start_split();
  desc(0, kBuf, 64, kDescFNext, 1);
  desc(1, kBuf + 0x1000, 128, kDescFWrite);
  std::memset(g(kBuf), 0xab, 64);
  offer(0, 0);
  auto r = vq->pop(batch, 16);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->popped, 1u);
  const DescChain& c = batch[0];
  EXPECT_EQ(c.id, 0);
  EXPECT_EQ(c.readable_len, 64u);
  EXPECT_EQ(c.writable_len, 128u);
  ASSERT_EQ(batch.readable(c).size(), 1u);
  EXPECT_EQ(batch.readable(c)[0].gpa, Gpa(kBuf));
  EXPECT_EQ(batch.readable(c)[0].host[0], 0xab);
  std::uint8_t reply[5] = {1, 2, 3, 4, 5};
  ASSERT_EQ(*vq->write_chain(batch, c, 10, reply), 5u);
  EXPECT_EQ(g(kBuf + 0x1000 + 10)[4], 5);
  Completion done{c.id, c.ring_descs, 15};
  auto notify = vq->push(std::span(&done, 1));
  ASSERT_TRUE(notify);
  EXPECT_TRUE(*notify);
  EXPECT_EQ(get<std::uint16_t>(kUsed + split::kUsedIdx), 1);
  EXPECT_EQ(get<UsedElem>(kUsed + split::used_ring(0)).id, 0u);
  EXPECT_EQ(get<UsedElem>(kUsed + split::used_ring(0)).len, 15u);
  EXPECT_EQ(vq->in_flight(), 0u);
  EXPECT_EQ(vq->pop(batch, 16)->popped, 0u);
}

// A chain popped before the queue (re)started (by this device before a stop, or by a
// migration's source): adopted as in flight, its completion can be pushed; without that
// the push is refused as a completion nobody popped. At most a ring's worth is adopted.
TEST_F(QueueTest, ChainsPoppedBeforeTheStartAreAdoptedAsInFlight) {
  Virtqueue idle(space, LogMode::immediate);
  EXPECT_EQ(idle.adopt_in_flight(1).error().code, VirtqueueErrc::not_started);
  start_split();
  EXPECT_EQ(vq->adopt_in_flight(kSize + 1).error().code, VirtqueueErrc::bad_completion);
  ASSERT_TRUE(vq->adopt_in_flight(kSize));
  EXPECT_EQ(vq->adopt_in_flight(1).error().code, VirtqueueErrc::bad_completion);
  EXPECT_EQ(vq->in_flight(), kSize);
  start_split();  // a start forgets what was in flight
  EXPECT_EQ(vq->in_flight(), 0u);
  Completion owed{3, 1, 9};
  EXPECT_FALSE(vq->push(std::span(&owed, 1)).has_value());
  start_split();
  ASSERT_TRUE(vq->adopt_in_flight(1));
  ASSERT_TRUE(vq->push(std::span(&owed, 1)).has_value());
  EXPECT_EQ(get<std::uint16_t>(kUsed + split::kUsedIdx), 1);
  EXPECT_EQ(get<UsedElem>(kUsed + split::used_ring(0)).id, 3u);
  EXPECT_EQ(vq->in_flight(), 0u);
}

TEST_F(QueueTest, RejectsHeadOutOfRange) {
  start_split();
  offer(kSize, 0);
  EXPECT_EQ(pop_error(), VirtqueueErrc::head_out_of_range);
}

TEST_F(QueueTest, RejectsNextOutOfRange) {
  start_split();
  desc(0, kBuf, 8, kDescFNext, kSize);
  offer(0, 0);
  EXPECT_EQ(pop_error(), VirtqueueErrc::next_out_of_range);
}

TEST_F(QueueTest, RejectsLoopingChain) {
  start_split();
  desc(0, kBuf, 8, kDescFNext, 1);
  desc(1, kBuf, 8, kDescFNext, 0);
  offer(0, 0);
  EXPECT_EQ(pop_error(), VirtqueueErrc::chain_too_long);
}

TEST_F(QueueTest, RejectsIndirectChainLongerThanTheQueue) {
  start_split();
  std::uint64_t table = kBase + 0x3000;
  for (std::uint16_t i = 0; i < kSize + 1; ++i)
    desc(i, kBuf, 8, i < kSize ? kDescFNext : 0, static_cast<std::uint16_t>(i + 1), table);
  desc(0, table, 16 * (kSize + 1), kDescFIndirect);
  offer(0, 0);
  EXPECT_EQ(pop_error(), VirtqueueErrc::chain_too_long);
}

TEST_F(QueueTest, RejectsNestedIndirect) {
  start_split();
  std::uint64_t table = kBase + 0x3000;
  desc(0, kBase + 0x4000, 16, kDescFIndirect, 0, table);
  desc(0, table, 16, kDescFIndirect);
  offer(0, 0);
  EXPECT_EQ(pop_error(), VirtqueueErrc::nested_indirect);
}

TEST_F(QueueTest, RejectsIndirectWithoutFeature) {
  start_split(/*indirect=*/false);
  desc(0, kBase + 0x3000, 16, kDescFIndirect);
  offer(0, 0);
  EXPECT_EQ(pop_error(), VirtqueueErrc::indirect_not_negotiated);
}

TEST_F(QueueTest, RejectsIndirectWithNext) {
  start_split();
  desc(0, kBase + 0x3000, 16, kDescFIndirect | kDescFNext, 1);
  offer(0, 0);
  EXPECT_EQ(pop_error(), VirtqueueErrc::indirect_with_next);
}

TEST_F(QueueTest, RejectsBadIndirectSizes) {
  for (std::uint32_t len : {0u, 17u, 8u}) {
    SetUp();
    start_split();
    desc(0, kBase + 0x3000, len, kDescFIndirect);
    offer(0, 0);
    EXPECT_EQ(pop_error(), VirtqueueErrc::bad_indirect_size) << len;
  }
}

TEST_F(QueueTest, RejectsIndirectNextOutsideTheTable) {
  start_split();
  std::uint64_t table = kBase + 0x3000;
  desc(0, kBuf, 8, kDescFNext, 2, table);  // the table has 2 entries: next 2 is past it
  desc(1, kBuf, 8, 0, 0, table);
  desc(0, table, 32, kDescFIndirect);
  offer(0, 0);
  EXPECT_EQ(pop_error(), VirtqueueErrc::next_out_of_range);
}

// Regression (libvhost-user, 2026): an indirect table ending exactly at the end of guest
// memory is read to its end and no further; one claiming to run past it is refused.
TEST_F(QueueTest, IndirectTableAtTheEndOfMemory) {
  start_split();
  std::uint64_t table = kBase + kRam - 32;
  desc(0, kBuf, 8, kDescFNext, 1, table);
  desc(1, kBuf + 8, 8, kDescFWrite, 0, table);
  desc(0, table, 32, kDescFIndirect);
  offer(0, 0);
  auto r = vq->pop(batch, 16);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->popped, 1u);
  EXPECT_EQ(batch[0].readable_len, 8u);
  EXPECT_EQ(batch[0].writable_len, 8u);
  Completion done{batch[0].id, 1, 0};
  ASSERT_TRUE(vq->push(std::span(&done, 1)));
  desc(0, table, 48, kDescFIndirect);  // 16 bytes past the end of guest memory
  offer(0, 1);
  EXPECT_EQ(pop_error(), VirtqueueErrc::bad_buffer);
}

TEST_F(QueueTest, RejectsReadableAfterWritable) {
  start_split();
  desc(0, kBuf, 8, kDescFWrite | kDescFNext, 1);
  desc(1, kBuf, 8, 0);
  offer(0, 0);
  EXPECT_EQ(pop_error(), VirtqueueErrc::readable_after_writable);
}

TEST_F(QueueTest, RejectsLengthOverflow) {
  // A sparse 8 GiB memfd so that 4 GiB of buffers are translatable.
  AddressSpace big;
  std::vector<RegionSpec> v;
  v.push_back(region(make_memfd(8ULL << 30), 0, 8ULL << 30, 0, 0x7f0000000000));
  ASSERT_TRUE(big.set_mem_table(std::move(v)));
  Virtqueue q(big);
  auto* m = big.memory()->gpa_to_host(Gpa(0))->host;
  auto put_desc = [&](std::uint16_t i, SplitDesc d) { std::memcpy(m + 16 * i, &d, 16); };
  put_desc(0, SplitDesc{0x100000, 0xfffff000, kDescFWrite | kDescFNext, 1});
  put_desc(1, SplitDesc{0x100000, 0x2000, kDescFWrite, 0});
  std::uint16_t avail[3] = {0, 1, 0};  // flags, idx, ring[0]
  std::memcpy(m + 0x1000, avail, sizeof avail);
  QueueConfig c;
  c.size = kSize;
  c.addr = RingAddresses{Iova(0), Iova(0x1000), Iova(0x2000)};
  ASSERT_TRUE(q.start(c));
  auto r = q.pop(batch, 1);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, VirtqueueErrc::length_overflow);
}

TEST_F(QueueTest, RejectsBufferOutsideGuestMemory) {
  start_split();
  desc(0, kBase + kRam - 4, 8, 0);  // the last 4 bytes of RAM and 4 past it
  offer(0, 0);
  EXPECT_EQ(pop_error(), VirtqueueErrc::bad_buffer);
}

TEST_F(QueueTest, RejectsForbiddenBufferAccess) {
  map_all_iova();
  ASSERT_TRUE(space.iotlb_update(Iova(kIovaBase + kBuf), 0x1000, Gpa(kBuf), Access::read));
  ASSERT_TRUE(vq->start(split_config(true, false, true)));
  desc(0, kIovaBase + kBuf, 8, kDescFWrite);  // device-writable, mapped read-only
  offer(0, 0);
  EXPECT_EQ(pop_error(), VirtqueueErrc::bad_buffer);
}

TEST_F(QueueTest, RejectsAvailIndexJump) {
  start_split();
  put<std::uint16_t>(kAvail + split::kAvailIdx, kSize + 1);
  EXPECT_EQ(pop_error(), VirtqueueErrc::avail_idx_jump);
}

TEST_F(QueueTest, BrokenQueueRefusesWork) {
  start_split();
  offer(kSize, 0);
  EXPECT_EQ(pop_error(), VirtqueueErrc::head_out_of_range);
  auto r = vq->pop(batch, 1);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, VirtqueueErrc::broken);
  EXPECT_EQ(vq->broken_error()->code, VirtqueueErrc::head_out_of_range);
  vq->reset();
  EXPECT_FALSE(vq->broken());
}

TEST_F(QueueTest, RejectsBadConfig) {
  QueueConfig c = split_config();
  c.size = 6;  // split rings need a power of two
  EXPECT_EQ(vq->start(c).error().code, VirtqueueErrc::bad_config);
  c.size = 0;
  EXPECT_EQ(vq->start(c).error().code, VirtqueueErrc::bad_config);
  c = split_config();
  c.addr.desc = Iova(kDesc + 8);  // misaligned
  EXPECT_EQ(vq->start(c).error().code, VirtqueueErrc::bad_config);
}

TEST_F(QueueTest, RingOutsideMemoryBreaksTheQueue) {
  QueueConfig c = split_config();
  c.addr.device = Iova(kBase + kRam - 8);  // the used ring runs off the end of RAM
  ASSERT_FALSE(vq->start(c));
  EXPECT_EQ(vq->broken_error()->code, VirtqueueErrc::ring_unmapped);
}

TEST_F(QueueTest, MissIsDeferredThenProcessedExactlyOnce) {
  space.set_iommu(true);
  // Rings mapped, the buffer not yet.
  ASSERT_TRUE(space.iotlb_update(Iova(kIovaBase + kBase), 0x3000, Gpa(kBase), Access::read_write));
  ASSERT_TRUE(vq->start(split_config(true, false, true)));
  desc(0, kIovaBase + kBuf, 64, 0);
  offer(0, 0);
  auto r = vq->pop(batch, 16);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->popped, 0u);
  ASSERT_TRUE(r->deferred);
  EXPECT_EQ(r->deferred->addr, Iova(kIovaBase + kBuf));
  EXPECT_TRUE(r->deferred->report_miss);
  r = vq->pop(batch, 16);  // still missing: not reported again
  ASSERT_TRUE(r);
  ASSERT_TRUE(r->deferred);
  EXPECT_FALSE(r->deferred->report_miss);
  EXPECT_EQ(batch.size(), 0u);
  ASSERT_TRUE(space.iotlb_update(Iova(kIovaBase + kBuf), 0x1000, Gpa(kBuf), Access::read));
  r = vq->pop(batch, 16);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->popped, 1u);
  EXPECT_FALSE(r->deferred);
  EXPECT_EQ(batch[0].readable_len, 64u);
  EXPECT_EQ(vq->pop(batch, 16)->popped, 0u);
}

TEST_F(QueueTest, LookAheadCollectsEveryMissingPageAtOnce) {
  space.set_iommu(true);
  ASSERT_TRUE(space.iotlb_update(Iova(kIovaBase + kBase), 0x3000, Gpa(kBase), Access::read_write));
  ASSERT_TRUE(vq->start(split_config(true, false, true)));
  // Three chains; the first needs two pages, the others one each, none mapped.
  desc(0, kIovaBase + kBuf + 0x800, 0x1000, kDescFWrite);
  desc(1, kIovaBase + kBuf + 0x4000, 16, 0);
  desc(2, kIovaBase + kBuf + 0x4008, 16, 0);  // same page as chain 1: requested once
  desc(3, kIovaBase + kBuf + 0x9000, 16, 0);
  for (std::uint16_t k = 0; k < 4; ++k) offer(k, k);
  std::vector<TranslateError> misses;
  EXPECT_EQ(vq->collect_misses(misses, 16), 4u);
  std::vector<std::uint64_t> pages;
  for (auto& m : misses) pages.push_back(m.addr.value & ~0xfffULL);
  EXPECT_EQ(pages,
            (std::vector<std::uint64_t>{kIovaBase + kBuf, kIovaBase + kBuf + 0x1000,
                                        kIovaBase + kBuf + 0x4000, kIovaBase + kBuf + 0x9000}));
  EXPECT_EQ(vq->state().avail_idx, 0);  // nothing consumed
  EXPECT_EQ(vq->in_flight(), 0u);
  auto r = vq->pop(batch, 16);  // still deferred, and already reported
  ASSERT_TRUE(r->deferred);
  EXPECT_FALSE(r->deferred->report_miss);
  ASSERT_TRUE(space.iotlb_update(Iova(kIovaBase + kBuf), 0x10000, Gpa(kBuf), Access::read_write));
  EXPECT_EQ(vq->pop(batch, 16)->popped, 4u);
}

TEST_F(QueueTest, UnmappedRingUnderIommuIsDeferred) {
  space.set_iommu(true);
  ASSERT_TRUE(vq->start(split_config(true, false, true)));
  auto r = vq->pop(batch, 16);
  ASSERT_TRUE(r);
  ASSERT_TRUE(r->deferred);
  EXPECT_EQ(r->deferred->addr, Iova(kIovaBase + kDesc));
  // start() met the miss first; the first pop must still ask for it.
  EXPECT_TRUE(r->deferred->report_miss);
  map_all_iova();
  desc(0, kIovaBase + kBuf, 64, 0);
  offer(0, 0);
  EXPECT_EQ(vq->pop(batch, 16)->popped, 1u);
}

// A ring miss met first outside pop() (the runner's set_kick_enabled() or
// has_available() between bursts, a push()) must still be reported by the next pop():
// the miss was recorded then, and without the report the worker would wait for the miss
// timeout (1 s) before asking the front-end.
TEST_F(QueueTest, RingMissMetOutsidePopIsReportedByTheNextPop) {
  map_all_iova();
  ASSERT_TRUE(vq->start(split_config(true, false, true)));
  ASSERT_TRUE(vq->set_kick_enabled(true));
  space.iotlb_flush();  // as a memory-table change or a global invalidation does
  auto kick = vq->set_kick_enabled(true);
  ASSERT_FALSE(kick);
  EXPECT_EQ(kick.error().code, VirtqueueErrc::ring_unmapped);
  EXPECT_FALSE(vq->broken());
  auto r = vq->pop(batch, 16);
  ASSERT_TRUE(r);
  ASSERT_TRUE(r->deferred);
  EXPECT_EQ(r->deferred->addr, Iova(kIovaBase + kDesc));
  EXPECT_TRUE(r->deferred->report_miss);
  r = vq->pop(batch, 16);  // reported once
  ASSERT_TRUE(r);
  ASSERT_TRUE(r->deferred);
  EXPECT_FALSE(r->deferred->report_miss);
}

// Every write the device makes is logged by GPA: buffer data, used element, used index.
TEST_F(QueueTest, LogsEveryDeviceWriteAtItsGpa) {
  enable_log();
  map_all_iova();
  ASSERT_TRUE(vq->start(split_config(true, false, true)));
  desc(0, kIovaBase + kBuf + 0x5000, 4096 * 2, kDescFWrite);
  offer(0, 0);
  ASSERT_EQ(vq->pop(batch, 16)->popped, 1u);
  std::vector<std::uint8_t> data(4097, 1);
  ASSERT_EQ(*vq->write_chain(batch, batch[0], 0, data), 4097u);
  Completion done{0, 1, 4097};
  ASSERT_TRUE(vq->push(std::span(&done, 1)));
  EXPECT_TRUE(dirty(kBuf + 0x5000));
  EXPECT_TRUE(dirty(kBuf + 0x6000));
  EXPECT_FALSE(dirty(kBuf + 0x7000));
  EXPECT_TRUE(dirty(kUsed));   // used element and index
  EXPECT_FALSE(dirty(kDesc));  // the device never writes the split descriptor table
  EXPECT_FALSE(dirty(kAvail));
  EXPECT_FALSE(dirty(kIovaBase + kUsed));
}

// Regression: writes to used->flags and avail_event were not logged.
TEST_F(QueueTest, LogsUsedFlagsAndAvailEvent) {
  enable_log();
  start_split(true, false);
  ASSERT_TRUE(vq->set_kick_enabled(false));
  EXPECT_TRUE(dirty(kUsed));
  EXPECT_EQ(get<std::uint16_t>(kUsed + split::kUsedFlags), kUsedFNoNotify);
  std::fill(log_bits.begin(), log_bits.end(), 0);
  vq->reset();
  start_split(true, true);
  // Put avail_event on its own page: a queue whose used ring ends at a page boundary.
  ASSERT_TRUE(vq->set_kick_enabled(true));
  EXPECT_TRUE(dirty(kUsed + split::avail_event(kSize)));
}

TEST_F(QueueTest, UsedRingLoggedAcrossItsLastPage) {
  // A 2048-entry used ring spans 5 pages; completions near its end dirty the last page.
  enable_log();
  QueueConfig c = split_config();
  c.size = 2048;
  c.addr = RingAddresses{Iova(kBase + 0x20000), Iova(kBase + 0x28000), Iova(kBase + 0x30000)};
  ASSERT_TRUE(vq->start(c, RingState{2040, true, 2040, true}, /*used_from_ring=*/false));
  std::uint64_t desc_table = kBase + 0x20000;
  for (std::uint16_t k = 0; k < 4; ++k) {
    put(desc_table + 16ULL * k, SplitDesc{kBuf, 8, 0, 0});
    put<std::uint16_t>(kBase + 0x28000 + split::avail_ring(2040 + k), k);
  }
  put<std::uint16_t>(kBase + 0x28000 + split::kAvailIdx, 2044);
  ASSERT_EQ(vq->pop(batch, 16)->popped, 4u);
  std::vector<Completion> done;
  for (auto& ch : batch.chains()) done.push_back(Completion{ch.id, 1, 0});
  ASSERT_TRUE(vq->push(done));
  EXPECT_TRUE(dirty(kBase + 0x30000 + split::used_ring(2040)));  // page 4 of the ring
  EXPECT_TRUE(dirty(kBase + 0x30000));                           // the index
}

TEST_F(QueueTest, LogGuestAddrMismatchIsCounted) {
  QueueConfig c = split_config();
  c.log_guest_addr = Gpa(kUsed);
  ASSERT_TRUE(vq->start(c));
  EXPECT_EQ(vq->log_addr_mismatches(), 0u);
  vq->reset();
  c.log_guest_addr = Gpa(kUsed + kIovaBase);  // an IOVA where a GPA belongs
  ASSERT_TRUE(vq->start(c));
  EXPECT_EQ(vq->log_addr_mismatches(), 1u);
}

TEST_F(QueueTest, NotificationSuppressionWithoutEventIdx) {
  start_split();
  desc(0, kBuf, 8, 0);
  offer(0, 0);
  ASSERT_EQ(vq->pop(batch, 1)->popped, 1u);
  put<std::uint16_t>(kAvail + split::kAvailFlags, kAvailFNoInterrupt);
  Completion done{0, 1, 0};
  EXPECT_FALSE(*vq->push(std::span(&done, 1)));
}

TEST_F(QueueTest, NotificationWithEventIdx) {
  start_split(true, true);
  for (std::uint16_t k = 0; k < 3; ++k) {
    desc(k, kBuf, 8, 0);
    offer(k, k);
  }
  ASSERT_EQ(vq->pop(batch, 3)->popped, 3u);
  put<std::uint16_t>(kAvail + split::used_event(kSize), 1);  // notify when used passes 1
  Completion c0{0, 1, 0};
  EXPECT_FALSE(*vq->push(std::span(&c0, 1)));  // used 0 -> 1: event 1 not crossed
  Completion c1{1, 1, 0};
  EXPECT_TRUE(*vq->push(std::span(&c1, 1)));  // used 1 -> 2 crosses 1
  Completion c2{2, 1, 0};
  EXPECT_FALSE(*vq->push(std::span(&c2, 1)));
}

TEST_F(QueueTest, KickEnableReportsRacingBuffers) {
  start_split(true, true);
  desc(0, kBuf, 8, 0);
  offer(0, 0);
  auto more = vq->set_kick_enabled(true);
  ASSERT_TRUE(more);
  EXPECT_TRUE(*more);  // a buffer is already waiting: do not go to sleep
  EXPECT_EQ(get<std::uint16_t>(kUsed + split::avail_event(kSize)), 0);
}

TEST_F(QueueTest, StopAndResumeFromRingState) {
  start_split();
  for (std::uint16_t k = 0; k < 3; ++k) {
    desc(k, kBuf, 8, 0);
    offer(k, k);
  }
  ASSERT_EQ(vq->pop(batch, 16)->popped, 3u);
  std::vector<Completion> done;
  for (auto& ch : batch.chains()) done.push_back(Completion{ch.id, 1, 0});
  ASSERT_TRUE(vq->push(done));
  RingState s = vq->stop();
  EXPECT_EQ(s.avail_idx, 3);
  EXPECT_EQ(s.used_idx, 3);
  Virtqueue other(space);
  ASSERT_TRUE(other.start(split_config(), RingState{s.avail_idx}, /*used_from_ring=*/true));
  EXPECT_EQ(other.state().used_idx, 3);  // read from the used ring
  desc(3, kBuf, 8, 0);
  offer(3, 3);
  batch.clear();
  ASSERT_EQ(other.pop(batch, 16)->popped, 1u);
  EXPECT_EQ(batch[0].id, 3);
}

// A stopped (or reset) queue lets go of the memory table and the dirty log it worked
// with: once the front-end replaces the table and detaches the log, their mappings and
// bitmap go away. (Before, the queue's translator kept both until the queue started
// again or was destroyed: every memory table a daemon ever saw stayed mapped.) The queue
// works again after a restart.
TEST_F(QueueTest, StoppedQueueLetsGoOfMemoryTableAndLog) {
  for (bool by_reset : {false, true}) {
    SCOPED_TRACE(by_reset ? "reset" : "stop");
    std::vector<std::uint8_t> bits(256, 0);
    ASSERT_TRUE(space.set_log(DirtyLog::over(bits)));
    space.set_logging(true);
    std::weak_ptr<const MemorySnapshot> old_memory = space.memory();
    std::weak_ptr<DirtyLog> old_log = space.log();
    start_split();
    std::uint16_t avail = vq->state().avail_idx;
    desc(0, kBuf, 8, kDescFWrite);
    offer(0, avail);
    batch.clear();
    ASSERT_EQ(vq->pop(batch, 16)->popped, 1u);
    Completion done{0, 1, 8};
    ASSERT_TRUE(vq->push(std::span(&done, 1)));
    batch.clear();
    if (by_reset) {
      vq->reset();
    } else {
      (void)vq->stop();
    }
    EXPECT_TRUE(bits[kUsed / 4096 / 8] != 0);  // the used ring write was flushed first
    space.set_logging(false);
    ASSERT_TRUE(space.set_log(nullptr));
    std::vector<RegionSpec> v;
    v.push_back(region(make_memfd(kRam), 0, kRam, kBase, 0x7f0000000000));
    ASSERT_TRUE(space.set_mem_table(std::move(v)));
    EXPECT_TRUE(old_memory.expired());
    EXPECT_TRUE(old_log.expired());
    // The fresh memory is zeroed: the restarted queue begins at avail 0.
    start_split();
    desc(1, kBuf, 8, 0);
    offer(1, 0);
    ASSERT_EQ(vq->pop(batch, 16)->popped, 1u);
    Completion again{1, 1, 0};
    ASSERT_TRUE(vq->push(std::span(&again, 1)));
    EXPECT_EQ(get<std::uint16_t>(kUsed + split::kUsedIdx), 1);
    (void)vq->stop();
  }
}

TEST_F(QueueTest, MemoryTableChangeRemapsRings) {
  start_split();
  desc(0, kBuf, 8, 0);
  offer(0, 0);
  ASSERT_EQ(vq->pop(batch, 16)->popped, 1u);
  // New table: the same GPAs, a fresh (zeroed) memfd. The ring must be re-read from it.
  std::vector<RegionSpec> v;
  v.push_back(region(make_memfd(kRam), 0, kRam, kBase, 0x7f0000000000));
  ASSERT_TRUE(space.set_mem_table(std::move(v)));
  Completion done{0, 1, 0};
  ASSERT_TRUE(vq->push(std::span(&done, 1)));
  EXPECT_EQ(get<std::uint16_t>(kUsed + split::kUsedIdx), 1);  // written to the new memory
}

// Regression (the migration rig, about once in 150 migrations): with the IOMMU, a
// memory-table change (ADD_MEM_REG) applied between a pop and its push, inside the
// worker's burst, flushed the IOTLB; the push then met an untranslated used ring and the
// queue broke ("ring not in guest memory") with the popped chain never completed. The
// burst keeps its ring translations; the next burst asks for them again.
TEST_F(QueueTest, MemoryTableChangeBetweenPopAndPushUnderIommu) {
  map_all_iova();
  ASSERT_TRUE(vq->start(split_config(true, false, true)));
  desc(0, kIovaBase + kBuf, 64, kDescFNext, 1);
  desc(1, kIovaBase + kBuf + 0x1000, 64, kDescFWrite);
  offer(0, 0);
  vq->begin_burst();
  ASSERT_EQ(vq->pop(batch, 16)->popped, 1u);
  ASSERT_TRUE(space.add_region(region(make_memfd(kRam), 0, kRam, 4 * kBase, 0x7f1000000000)));
  std::uint8_t reply[4] = {1, 2, 3, 4};
  ASSERT_EQ(*vq->write_chain(batch, batch[0], 0, reply), 4u);
  Completion done{batch[0].id, batch[0].ring_descs, 4};
  auto pushed = vq->push(std::span(&done, 1));
  ASSERT_TRUE(pushed) << pushed.error().message();
  ASSERT_TRUE(vq->end_burst());
  EXPECT_FALSE(vq->broken());
  EXPECT_EQ(vq->in_flight(), 0u);
  EXPECT_EQ(get<std::uint16_t>(kUsed + split::kUsedIdx), 1);
  EXPECT_EQ(g(kBuf + 0x1000)[3], 4);
  // The next burst finds the rings untranslated: deferred, and the miss is reported.
  desc(2, kIovaBase + kBuf + 0x2000, 64, 0);
  offer(2, 1);
  vq->begin_burst();
  auto r = vq->pop(batch, 16);
  ASSERT_TRUE(vq->end_burst());
  ASSERT_TRUE(r);
  ASSERT_TRUE(r->deferred);
  EXPECT_EQ(r->deferred->addr, Iova(kIovaBase + kDesc));
  EXPECT_TRUE(r->deferred->report_miss);
  map_all_iova();
  batch.clear();
  vq->begin_burst();
  EXPECT_EQ(vq->pop(batch, 16)->popped, 1u);
  ASSERT_TRUE(vq->end_burst());
}

// ----- packed -----

struct PackedTest : QueueTest {
  std::uint16_t drv_idx = 0;
  bool drv_wrap = true;
  QueueConfig packed_config(bool event_idx = false) {
    QueueConfig c;
    c.format = RingFormat::packed;
    c.size = kSize;
    c.indirect = true;
    c.event_idx = event_idx;
    c.addr = RingAddresses{Iova(kDesc), Iova(kAvail), Iova(kUsed)};
    return c;
  }
  std::uint16_t avail_flags(bool wrap) { return wrap ? kPackedDescFAvail : kPackedDescFUsed; }
  // Adds a chain of descriptors {addr, len, write} at the driver position.
  void add_chain(std::vector<std::tuple<std::uint64_t, std::uint32_t, std::uint16_t>> bufs,
                 std::uint16_t id) {
    std::uint16_t head = drv_idx;
    std::uint16_t head_flags = 0;
    for (std::size_t k = 0; k < bufs.size(); ++k) {
      auto [addr, len, f] = bufs[k];
      std::uint16_t flags = static_cast<std::uint16_t>(f | avail_flags(drv_wrap));
      if (k + 1 < bufs.size()) flags |= kDescFNext;
      PackedDesc d{addr, len, id, k == 0 ? std::uint16_t(0) : flags};
      put(kDesc + 16ULL * drv_idx, d);
      if (k == 0) head_flags = flags;
      if (++drv_idx == kSize) {
        drv_idx = 0;
        drv_wrap = !drv_wrap;
      }
    }
    put<std::uint16_t>(kDesc + 16ULL * head + 14, head_flags);  // head last
  }
};

TEST_F(PackedTest, PopPushWithWrapAround) {
  ASSERT_TRUE(vq->start(packed_config()));
  bool used_wrap = true;
  std::uint16_t used_pos = 0;
  for (int round = 0; round < 5; ++round) {
    // Chains of 3 descriptors: the ring (8) wraps every few rounds, mid-chain too.
    add_chain({{kBuf, 16, 0}, {kBuf + 16, 16, 0}, {kBuf + 64, 32, kDescFWrite}},
              static_cast<std::uint16_t>(100 + round));
    batch.clear();
    auto r = vq->pop(batch, 16);
    ASSERT_TRUE(r);
    ASSERT_EQ(r->popped, 1u) << round;
    EXPECT_EQ(batch[0].id, 100 + round);
    EXPECT_EQ(batch[0].ring_descs, 3);
    EXPECT_EQ(batch[0].readable_len, 32u);
    EXPECT_EQ(batch[0].writable_len, 32u);
    Completion done{batch[0].id, batch[0].ring_descs, 7};
    ASSERT_TRUE(vq->push(std::span(&done, 1)));
    auto used = get<PackedDesc>(kDesc + 16ULL * used_pos);
    EXPECT_EQ(used.id, 100 + round);
    EXPECT_EQ(used.len, 7u);
    bool avail_bit = (used.flags & kPackedDescFAvail) != 0;
    bool used_bit = (used.flags & kPackedDescFUsed) != 0;
    EXPECT_EQ(avail_bit, used_wrap);
    EXPECT_EQ(used_bit, used_wrap);
    used_pos = static_cast<std::uint16_t>(used_pos + 3);
    if (used_pos >= kSize) {
      used_pos -= kSize;
      used_wrap = !used_wrap;
    }
    EXPECT_EQ(vq->state().used_idx, used_pos);
    EXPECT_EQ(vq->state().used_wrap, used_wrap);
    EXPECT_EQ(vq->state().avail_idx, drv_idx);
    EXPECT_EQ(vq->state().avail_wrap, drv_wrap);
  }
}

TEST_F(PackedTest, NothingAvailableIsNotAnError) {
  ASSERT_TRUE(vq->start(packed_config()));
  auto r = vq->pop(batch, 16);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->popped, 0u);
}

TEST_F(PackedTest, RejectsEndlessChain) {
  ASSERT_TRUE(vq->start(packed_config()));
  // Every descriptor says NEXT, with availability flags of the current lap.
  for (std::uint16_t i = 0; i < kSize; ++i)
    put(kDesc + 16ULL * i,
        PackedDesc{kBuf, 8, 0, static_cast<std::uint16_t>(kDescFNext | kPackedDescFAvail)});
  EXPECT_EQ(pop_error(), VirtqueueErrc::chain_too_long);
}

TEST_F(PackedTest, RejectsIndirectWithNextAndNested) {
  ASSERT_TRUE(vq->start(packed_config()));
  add_chain({{kBase + 0x3000, 16, kDescFIndirect}, {kBuf, 8, 0}}, 1);
  EXPECT_EQ(pop_error(), VirtqueueErrc::indirect_with_next);
  SetUp();
  drv_idx = 0;
  drv_wrap = true;
  ASSERT_TRUE(vq->start(packed_config()));
  put(kBase + 0x3000, PackedDesc{kBase + 0x4000, 16, 0, kDescFIndirect});
  add_chain({{kBase + 0x3000, 16, kDescFIndirect}}, 1);
  EXPECT_EQ(pop_error(), VirtqueueErrc::nested_indirect);
}

TEST_F(PackedTest, IndirectTable) {
  ASSERT_TRUE(vq->start(packed_config()));
  put(kBase + 0x3000, PackedDesc{kBuf, 100, 0, 0});
  put(kBase + 0x3010, PackedDesc{kBuf + 0x1000, 200, 0, kDescFWrite});
  add_chain({{kBase + 0x3000, 32, kDescFIndirect}}, 9);
  auto r = vq->pop(batch, 16);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->popped, 1u);
  EXPECT_EQ(batch[0].id, 9);
  EXPECT_EQ(batch[0].ring_descs, 1);
  EXPECT_EQ(batch[0].readable_len, 100u);
  EXPECT_EQ(batch[0].writable_len, 200u);
}

TEST_F(PackedTest, BatchPushPublishesHeadLastAndLogs) {
  enable_log();
  ASSERT_TRUE(vq->start(packed_config()));
  add_chain({{kBuf, 8, 0}}, 1);
  add_chain({{kBuf, 8, 0}}, 2);
  ASSERT_EQ(vq->pop(batch, 16)->popped, 2u);
  std::vector<Completion> done{{1, 1, 0}, {2, 1, 0}};
  ASSERT_TRUE(vq->push(done));
  EXPECT_EQ(get<PackedDesc>(kDesc).id, 1);
  EXPECT_EQ(get<PackedDesc>(kDesc + 16).id, 2);
  EXPECT_TRUE(dirty(kDesc));  // the packed descriptor ring is written by the device
}

TEST_F(PackedTest, EventSuppression) {
  ASSERT_TRUE(vq->start(packed_config(true)));
  add_chain({{kBuf, 8, 0}}, 1);
  add_chain({{kBuf, 8, 0}}, 2);
  ASSERT_EQ(vq->pop(batch, 16)->popped, 2u);
  put<std::uint16_t>(kAvail + 2, kEventFlagsDisable);
  Completion c1{1, 1, 0};
  EXPECT_FALSE(*vq->push(std::span(&c1, 1)));
  // DESC mode: notify when the used index passes 1 (wrap counter 1).
  put<std::uint16_t>(kAvail, static_cast<std::uint16_t>(1 | packed::kWrapBit));
  put<std::uint16_t>(kAvail + 2, kEventFlagsDesc);
  Completion c2{2, 1, 0};
  EXPECT_TRUE(*vq->push(std::span(&c2, 1)));
  put<std::uint16_t>(kAvail + 2, kEventFlagsEnable);
  add_chain({{kBuf, 8, 0}}, 3);
  batch.clear();
  ASSERT_EQ(vq->pop(batch, 16)->popped, 1u);
  Completion c3{3, 1, 0};
  EXPECT_TRUE(*vq->push(std::span(&c3, 1)));
}

TEST_F(PackedTest, KickSuppressionIsWrittenAndLogged) {
  enable_log();
  ASSERT_TRUE(vq->start(packed_config()));
  ASSERT_TRUE(vq->set_kick_enabled(false));
  EXPECT_EQ(get<std::uint16_t>(kUsed + 2), kEventFlagsDisable);
  EXPECT_TRUE(dirty(kUsed));
}

}  // namespace
}  // namespace vhostkit
