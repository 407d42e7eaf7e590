// Property test: many randomized live migrations under echo traffic, each of which must
// end with zero differing pages, matching rings, and every echo intact on the
// destination. Randomized: split/packed rings, queue count and size, indirect and
// EVENT_IDX, vIOMMU off/strict/lazy, GPA or legacy uaddr IOTLB updates, guest memory
// layouts (2-4 regions at odd GPAs, some above 4 GiB, separate or shared memfds, an alias
// region), ADD_MEM_REG / REM_MEM_REG during the migration (also between a worker's pop and
// its push), the number of rounds, the traffic mix (chains in flight, payload sizes).
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include "migration/migration_rig.h"

namespace vhostkit::testing {
namespace {

using frontend::GuestRegionLayout;

RigConfig generate() {
  RigConfig c;
  c.packed = *rc::gen::arbitrary<bool>();
  c.iommu = *rc::gen::arbitrary<bool>();
  c.lazy = c.iommu && *rc::gen::arbitrary<bool>();
  c.gpa_form = *rc::gen::arbitrary<bool>();
  c.indirect = *rc::gen::arbitrary<bool>();
  c.event_idx = *rc::gen::arbitrary<bool>();
  c.queues = *rc::gen::inRange<std::uint32_t>(1, 3);
  c.queue_size = c.packed ? *rc::gen::element<std::uint16_t>(16, 50, 64, 256)
                          : *rc::gen::element<std::uint16_t>(16, 64, 256);
  const int n = *rc::gen::inRange(2, 5);
  std::uint64_t gpa = *rc::gen::element<std::uint64_t>(0x0, 0x1000, 0x40000, 0x7ff000);
  bool far = false;
  for (int i = 0; i < n; ++i) {
    const std::uint64_t size = *rc::gen::element<std::uint64_t>(0x100000, 0x140000, 0x200000);
    c.layout.push_back({Gpa(gpa), size, i == 0 || *rc::gen::arbitrary<bool>()});
    std::uint64_t gap = *rc::gen::element<std::uint64_t>(0, 0x1000, 0x23000, 0x100000000);
    if (gap == 0x100000000) {
      if (far) gap = 0x5000;  // one jump above 4 GiB is enough
      far = true;
    }
    gpa += size + gap;
  }
  c.traffic.assign(n, true);
  c.plugged.assign(n, true);
  auto append = [&](GuestRegionLayout r, bool plugged, bool traffic) {
    r.gpa = Gpa(gpa);
    gpa += r.size + 0x3000;
    c.layout.push_back(r);
    c.plugged.push_back(plugged);
    c.traffic.push_back(traffic);
    return c.layout.size() - 1;
  };
  if (*rc::gen::arbitrary<bool>())  // an alias of region 1's second half, no buffers in it
    append({Gpa(0), 0x80000, true, 1, 0x80000}, true, false);
  const int change = *rc::gen::inRange(0, 4);  // none, add, remove, both
  c.rounds = *rc::gen::inRange(1u, 5u);
  if (change & 1) {
    c.add = append({Gpa(0), 0x100000, *rc::gen::arbitrary<bool>()}, false, true);
    c.add_at = *rc::gen::inRange(0u, c.rounds);
  }
  if (change & 2) {
    c.remove = append({Gpa(0), 0x80000}, true, false);
    c.remove_at = *rc::gen::inRange(0u, c.rounds);
  }
  // Each change wherever the worker happens to be, or between a pop and its push.
  c.change_mid_burst = change != 0 && *rc::gen::arbitrary<bool>();
  c.inflight = *rc::gen::inRange(1u, 33u);
  c.max_payload = *rc::gen::element<std::uint32_t>(64, 1500, 4096);
  c.warmup = *rc::gen::inRange<std::uint64_t>(1, 64);
  c.after = 32;
  RC_TAG(c.packed ? "packed" : "split",
         !c.iommu ? "no iommu"
         : c.lazy ? "lazy"
                  : "strict",
         c.gpa_form ? "gpa" : "uaddr", change, c.change_mid_burst ? "mid-burst" : "");
  return c;
}

RC_GTEST_PROP(MigrationProperty, NoPageIsLostAndTrafficContinues, ()) {
  const RigConfig c = generate();
  const RigOutcome o = run_migration(c);
  RC_ASSERT(o.error.empty());
  RC_ASSERT(o.result.has_value());
  const auto& r = *o.result;
  if (!r.differing_pages.empty())
    RC_FAIL(fmt::format("{} differing pages, first at {:#x}", r.differing_pages.size(),
                        r.differing_pages.front().value));
  RC_ASSERT(r.rings_match);
  RC_ASSERT(r.pages_compared > 0u);
  RC_ASSERT(o.mismatches == 0u);
  RC_ASSERT(o.device_errors == 0u);
  if (!o.drained || !o.destination_bases_ok) RC_FAIL("destination stalled: " + o.state);
}

}  // namespace
}  // namespace vhostkit::testing
