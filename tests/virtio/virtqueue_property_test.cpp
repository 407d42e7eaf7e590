// Property test: random chains through the guest driver model -> device -> driver model,
// on split and packed rings, direct and indirect, with and without the IOMMU (strict and
// lazy unmapping; misses answered with GPA or legacy uaddr updates), with logging on.
//
// Checked on every run: the device reads exactly what the driver wrote; the driver reads
// exactly what the device wrote, with the right id and length; every page the device
// wrote is dirty in the log and nothing else is; used indices and wrap counters agree
// between the device, the driver and a reference count; nothing breaks.
#include <deque>
#include <map>
#include <set>

#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include "vhostkit/frontend/guest_memory.h"
#include "vhostkit/frontend/viommu.h"
#include "vhostkit/frontend/virtio_driver.h"
#include "vhostkit/virtqueue.h"

namespace vhostkit {
namespace {

using namespace frontend;

// Guest RAM: two GPA-adjacent regions from different memfds (buffers cross between
// them), and a third one at an odd, distant GPA.
constexpr std::uint64_t kA = 0x100000, kASize = 0x40000;
constexpr std::uint64_t kB = kA + kASize, kBSize = 0x40000;
constexpr std::uint64_t kC = 0x7ff00000, kCSize = 0x20000;
constexpr std::uint64_t kLogBytes = (kC + kCSize) / 4096 / 8 + 1;

struct Config {
  bool packed, indirect, event_idx, iommu, lazy, uaddr_updates, batched_log;
  std::uint16_t size;
};

struct Pending {  // a chain the driver added
  std::vector<DriverBuffer> bufs;
  std::vector<std::uint8_t> readable;  // what the driver wrote, concatenated
};

struct InDevice {  // a chain the device popped and has not pushed
  std::uint16_t id, ring_descs;
  std::uint32_t written;
};

void run(const Config& cfg,
         const std::vector<std::tuple<std::uint8_t, std::uint32_t, std::uint32_t>>& ops) {
  auto mem = GuestMemory::create({{Gpa(kA), kASize}, {Gpa(kB), kBSize}, {Gpa(kC), kCSize}});
  RC_ASSERT(mem.has_value());
  AddressSpace space;
  RC_ASSERT(space.set_mem_table(mem->region_specs()).has_value());
  std::vector<std::uint8_t> bits(kLogBytes, 0);
  RC_ASSERT(space.set_log(DirtyLog::over(bits)).has_value());
  space.set_logging(true);

  Viommu viommu(cfg.lazy ? ViommuMode::lazy : ViommuMode::strict, 0xfff000000000ULL, 8);
  if (cfg.iommu) {
    space.set_iommu(true);
    viommu.set_invalidate_listener([&](Iova iova, std::uint64_t len) {
      RC_ASSERT(space.iotlb_invalidate(iova, len).has_value());
    });
  }
  DriverOptions dopt;
  dopt.packed = cfg.packed;
  dopt.size = cfg.size;
  dopt.indirect = cfg.indirect;
  dopt.event_idx = cfg.event_idx;
  dopt.iommu = cfg.iommu ? &viommu : nullptr;
  auto drv = VirtioDriver::create(*mem, dopt);
  RC_ASSERT(drv.has_value());
  Virtqueue vq(space, cfg.batched_log ? LogMode::batched : LogMode::immediate);
  RC_ASSERT(vq.start(drv->queue_config()).has_value());

  // Buffers come from an arena starting in region A and running into region B.
  const std::uint64_t arena = kA + kASize - 0x20000;
  const std::uint64_t arena_len = 0x40000;
  std::map<std::uint16_t, Pending> pending;  // by id
  std::deque<std::uint16_t> pending_order;
  std::deque<InDevice> in_device;
  std::map<std::uint16_t, std::vector<std::uint8_t>> device_wrote;  // by id
  std::set<std::uint64_t> allowed_dirty;  // pages the device may have written
  std::set<std::uint64_t> must_dirty;     // pages it certainly wrote
  std::uint64_t completed = 0, added = 0;
  std::uint32_t counter = 0;
  std::uint64_t rd_cursor = kC;

  auto answer_miss = [&](const TranslateError& m) {
    auto map = viommu.translate(m.addr);
    if (!map) return;  // unmapped by the guest: nothing to answer (a real device would fault)
    if (cfg.uaddr_updates) {
      // A legacy frontend sends one update per piece that is contiguous in its own
      // address space, i.e. cut at region boundaries.
      std::uint64_t off = 0;
      for (const GpaRange& piece : mem->split_by_region(map->gpa, map->len)) {
        auto ua = mem->uaddr_of(piece.gpa);
        RC_ASSERT(ua.has_value());
        RC_ASSERT(space.iotlb_update_uaddr(map->iova + off, piece.len, *ua, map->perm).has_value());
        off += piece.len;
      }
    } else {
      RC_ASSERT(space.iotlb_update(map->iova, map->len, map->gpa, map->perm).has_value());
    }
  };
  auto ring_pages = [&] {  // pages of the ring area the device writes into
    std::uint64_t a = cfg.packed ? drv->gpas().desc.value : drv->gpas().device.value;
    std::uint64_t len = cfg.packed ? 16ULL * cfg.size : 6 + 8ULL * cfg.size;
    for (std::uint64_t p = a / 4096; p <= (a + len - 1) / 4096; ++p) allowed_dirty.insert(p);
    if (cfg.packed)  // the device event suppression area
      allowed_dirty.insert(drv->gpas().device.value / 4096);
  };
  ring_pages();

  auto device_pop = [&](std::size_t max) {
    ChainBatch batch;
    for (int attempt = 0; attempt < 8; ++attempt) {
      vq.begin_burst();
      auto r = vq.pop(batch, max);
      RC_ASSERT(vq.end_burst().has_value());
      RC_ASSERT(r.has_value());
      if (!r->deferred) break;
      std::vector<TranslateError> misses{*r->deferred};
      (void)vq.collect_misses(misses, 64);
      for (const auto& m : misses) answer_miss(m);
    }
    for (std::size_t i = 0; i < batch.size(); ++i) {
      const DescChain& c = batch[i];
      auto it = pending.find(c.id);
      RC_ASSERT(it != pending.end());
      // The device reads what the driver wrote.
      std::vector<std::uint8_t> got(c.readable_len);
      RC_ASSERT(vq.read_chain(batch, c, 0, got) == c.readable_len);
      RC_ASSERT(got == it->second.readable);
      // It writes a recognisable reply into part of the writable buffers.
      std::uint32_t n = c.writable_len == 0 ? 0 : 1 + (counter * 7919u) % c.writable_len;
      std::vector<std::uint8_t> reply(n);
      for (std::uint32_t k = 0; k < n; ++k)
        reply[k] = static_cast<std::uint8_t>(c.id * 31 + k + counter);
      ++counter;
      auto w = vq.write_chain(batch, c, 0, reply);
      RC_ASSERT(w.has_value());
      RC_ASSERT(*w == n);
      device_wrote[c.id] = reply;
      // Which pages that touched, by the driver's own GPAs.
      std::uint64_t left = n;
      for (const DriverBuffer& b : it->second.bufs) {
        if (!b.device_writes || left == 0) continue;
        std::uint64_t take = std::min<std::uint64_t>(left, b.len);
        for (std::uint64_t p = b.gpa.value / 4096; p <= (b.gpa.value + take - 1) / 4096; ++p) {
          allowed_dirty.insert(p);
          must_dirty.insert(p);
        }
        left -= take;
      }
      in_device.push_back(InDevice{c.id, c.ring_descs, n});
    }
  };
  auto device_push = [&](std::size_t k) {
    k = std::min(k, in_device.size());
    if (k == 0) return;
    std::vector<Completion> done;
    for (std::size_t i = 0; i < k; ++i) {
      done.push_back(Completion{in_device.front().id, in_device.front().ring_descs,
                                in_device.front().written});
      in_device.pop_front();
    }
    vq.begin_burst();
    auto r = vq.push(done);
    RC_ASSERT(vq.end_burst().has_value());
    RC_ASSERT(r.has_value());
  };
  auto driver_poll = [&] {
    while (auto u = drv->poll()) {
      auto it = pending.find(u->id);
      RC_ASSERT(it != pending.end());
      const auto& reply = device_wrote[u->id];
      RC_ASSERT(u->len == reply.size());
      // The driver reads what the device wrote.
      std::vector<std::uint8_t> got;
      std::uint64_t left = u->len;
      for (const DriverBuffer& b : it->second.bufs) {
        if (!b.device_writes || left == 0) continue;
        std::uint64_t take = std::min<std::uint64_t>(left, b.len);
        std::vector<std::uint8_t> part(take);
        RC_ASSERT(mem->read(b.gpa, part));
        got.insert(got.end(), part.begin(), part.end());
        left -= take;
      }
      RC_ASSERT(got == reply);
      pending.erase(it);
      ++completed;
    }
  };

  for (const auto& [kind, a, b] : ops) {
    switch (kind % 6) {
      case 0:
      case 1: {  // the driver adds a chain
        std::size_t nbufs = 1 + a % 4;
        std::vector<DriverBuffer> bufs;
        std::size_t n_read = a % (nbufs + 1);
        Pending p;
        for (std::size_t i = 0; i < nbufs; ++i) {
          std::uint32_t len = 1 + (b >> (i * 4)) % 5000;
          std::uint64_t off =
              (static_cast<std::uint64_t>(a) * 2654435761u + i * 40503u * b) % (arena_len - len);
          DriverBuffer db{Gpa(arena + off), len, i >= n_read};
          bufs.push_back(db);
        }
        // Readable buffers live in region C, writable ones in the arena across A and B.
        for (auto& db : bufs) {
          if (db.device_writes) continue;
          if (rd_cursor + db.len + 64 >= kC + kCSize) rd_cursor = kC;
          db.gpa = Gpa(rd_cursor + (a % 64));
          rd_cursor += db.len + 128;
        }
        if (pending.size() + 1 > cfg.size) break;
        // No two outstanding buffers may overlap (nor two of one chain): the checks
        // below compare contents byte for byte.
        bool clash = false;
        auto overlap = [](const DriverBuffer& x, const DriverBuffer& y) {
          return x.gpa < y.gpa + y.len && y.gpa < x.gpa + x.len;
        };
        for (const auto& [id, q] : pending)
          for (const auto& x : q.bufs)
            for (const auto& y : bufs) clash |= overlap(x, y);
        for (std::size_t i = 0; i < bufs.size(); ++i)
          for (std::size_t j = i + 1; j < bufs.size(); ++j) clash |= overlap(bufs[i], bufs[j]);
        if (clash) break;
        for (const auto& db : bufs) {
          if (db.device_writes) continue;
          std::vector<std::uint8_t> content(db.len);
          for (std::uint32_t k = 0; k < db.len; ++k)
            content[k] = static_cast<std::uint8_t>(k * 13 + a);
          RC_ASSERT(mem->write(db.gpa, content));
          p.readable.insert(p.readable.end(), content.begin(), content.end());
        }
        auto id = drv->add(bufs, (b & 1) != 0);
        if (!id) break;  // ring full
        p.bufs = bufs;
        pending[*id] = p;
        ++added;
        if ((b & 1) == 0) drv->publish();
        (void)drv->kick_needed();
        break;
      }
      case 2: device_pop(1 + a % 8); break;
      case 3: device_push(1 + a % 8); break;
      case 4: driver_poll(); break;
      case 5:
        if (cfg.iommu && cfg.lazy) viommu.flush();
        (void)vq.set_kick_enabled(a & 1);
        drv->set_interrupts(b & 1);
        break;
    }
    RC_ASSERT(!vq.broken());
  }
  // Drain everything.
  for (int round = 0; round < 64 && (!pending.empty() || !in_device.empty()); ++round) {
    device_pop(64);
    device_push(64);
    driver_poll();
  }
  RC_ASSERT(pending.empty());
  RC_ASSERT(completed == added);
  RC_TAG(completed == 0 ? "0 chains" : completed < 10 ? "1-9 chains" : "10+ chains");
  RC_ASSERT(drv->device_errors() == 0u);
  // Indices and wrap counters agree.
  RingState s = vq.state();
  RC_ASSERT(s.used_idx == drv->used_idx());
  RC_ASSERT(s.avail_idx == drv->avail_idx());
  if (cfg.packed) {
    RC_ASSERT(s.used_wrap == drv->used_wrap());
    RC_ASSERT(s.avail_wrap == drv->avail_wrap());
  } else {
    RC_ASSERT(s.used_idx == static_cast<std::uint16_t>(added));
  }
  // The log: every page the device wrote is dirty, and nothing else.
  for (std::uint64_t p : must_dirty) RC_ASSERT(((bits[p / 8] >> (p % 8)) & 1u) != 0);
  if (added > 0)
    RC_ASSERT(((bits[(cfg.packed ? drv->gpas().desc : drv->gpas().device).value / 4096 / 8] >>
                (((cfg.packed ? drv->gpas().desc : drv->gpas().device).value / 4096) % 8)) &
               1u) != 0);
  for (std::uint64_t p = 0; p < kLogBytes * 8; ++p)
    if ((bits[p / 8] >> (p % 8)) & 1u) RC_ASSERT(allowed_dirty.count(p) == 1u);
}

using Ops = std::vector<std::tuple<std::uint8_t, std::uint32_t, std::uint32_t>>;

Config config_from(std::uint32_t bitsv) {
  Config c{};
  c.packed = bitsv & 1;
  c.indirect = bitsv & 2;
  c.event_idx = bitsv & 4;
  c.iommu = bitsv & 8;
  c.lazy = bitsv & 16;
  c.uaddr_updates = bitsv & 32;
  c.batched_log = bitsv & 64;
  c.size = static_cast<std::uint16_t>(4u << ((bitsv >> 7) % 5));  // 4 .. 64
  return c;
}

RC_GTEST_PROP(VirtqueueModel, SplitRoundTrips, (std::uint32_t cfg, const Ops& ops)) {
  run(config_from(cfg & ~1u), ops);
}

RC_GTEST_PROP(VirtqueueModel, PackedRoundTrips, (std::uint32_t cfg, const Ops& ops)) {
  run(config_from(cfg | 1u), ops);
}

RC_GTEST_PROP(VirtqueueModel, IommuRoundTrips, (std::uint32_t cfg, const Ops& ops)) {
  run(config_from(cfg | 8u), ops);
}

}  // namespace
}  // namespace vhostkit
