// Fuzz target: the fuzzer writes raw ring and descriptor memory and drives the device
// side of a virtqueue (split or packed, direct and indirect, IOMMU on or off).
//
// Input layout: 8 config bytes, then a stream of operations. Guest memory is one
// 64 KiB memfd region at GPA 0x10000; the config places the rings in it, and the
// operations overwrite any guest byte, offer buffers, pop, push, change IOTLB entries
// and toggle notifications. Invariants checked beyond the sanitizers: every segment a
// popped chain yields lies inside guest memory, and nothing is popped from a broken
// queue.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "fuzz_input.h"
#include "vhostkit/virtqueue.h"

namespace {

using namespace vhostkit;

constexpr std::uint64_t kGpa = 0x10000;
constexpr std::uint64_t kRam = 0x10000;
constexpr std::uint64_t kIovaOffset = 0x40000000;

using fuzzing::Input;

int memfd() {
  static int fd = [] {
    int f = ::memfd_create("vq-fuzz", MFD_CLOEXEC);
    if (f < 0 || ::ftruncate(f, kRam) != 0) std::abort();
    return f;
  }();
  return fd;
}

bool inside(const Segment& s, const std::uint8_t* base) {
  return s.host >= base && s.host + s.len <= base + kRam && s.gpa.value >= kGpa &&
         s.gpa.value + s.len <= kGpa + kRam;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Input in{data, size};
  auto cfg = in.take<std::uint64_t>();

  AddressSpace space;
  std::vector<RegionSpec> regions;
  RegionSpec r;
  r.fd = UniqueFd(::dup(memfd()));
  r.size = kRam;
  r.gpa = Gpa(kGpa);
  r.uaddr = Uaddr(0x7f0000000000);
  regions.push_back(std::move(r));
  if (!space.set_mem_table(std::move(regions))) std::abort();
  std::uint8_t* ram = space.memory()->gpa_to_host(Gpa(kGpa))->host;
  std::memset(ram, 0, kRam);
  std::vector<std::uint8_t> log_bits(64, 0);
  (void)space.set_log(DirtyLog::over(log_bits));
  space.set_logging((cfg >> 40) & 1);

  bool iommu = (cfg >> 2) & 1;
  std::uint64_t off = iommu ? kIovaOffset : 0;
  if (iommu) {
    space.set_iommu(true);
    (void)space.iotlb_update(Iova(kGpa + off), kRam, Gpa(kGpa), Access::read_write);
  }
  QueueConfig qc;
  qc.format = (cfg & 1) ? RingFormat::packed : RingFormat::split;
  qc.size = static_cast<std::uint16_t>(1u << ((cfg >> 8) % 9));  // 1 .. 256
  if ((cfg >> 41) & 1 && qc.format == RingFormat::packed)
    qc.size = static_cast<std::uint16_t>(1 + (cfg >> 48) % 256);  // packed: any size
  qc.indirect = (cfg >> 1) & 1;
  qc.event_idx = (cfg >> 3) & 1;
  // Ring placement: 16-byte aligned anywhere in the region (maybe overlapping).
  qc.addr.desc = Iova(kGpa + ((cfg >> 16) & 0xff) * 16 + off);
  qc.addr.driver = Iova(kGpa + 0x4000 + ((cfg >> 24) & 0xff) * 16 + off);
  qc.addr.device = Iova(kGpa + 0x8000 + ((cfg >> 32) & 0xff) * 16 + off);

  Virtqueue vq(space, (cfg >> 4) & 1 ? LogMode::batched : LogMode::immediate);
  RingState rs;
  rs.avail_idx = static_cast<std::uint16_t>(in.take<std::uint16_t>() % qc.size);
  rs.used_idx = rs.avail_idx;
  if (!vq.start(qc, rs, (cfg >> 5) & 1)) return 0;

  ChainBatch batch;
  std::vector<Completion> pending;
  while (!in.empty()) {
    auto op = in.take<std::uint8_t>();
    switch (op % 8) {
      case 0: {  // write 8 guest bytes anywhere
        auto at = in.take<std::uint16_t>() % (kRam - 8);
        auto v = in.take<std::uint64_t>();
        std::memcpy(ram + at, &v, 8);
        break;
      }
      case 1:
      case 2: {  // pop
        std::size_t before = batch.size();
        bool was_broken = vq.broken();
        auto p = vq.pop(batch, 1 + in.take<std::uint8_t>() % 32);
        if (was_broken && batch.size() != before) std::abort();
        for (std::size_t i = before; i < batch.size(); ++i) {
          const DescChain& c = batch[i];
          for (const Segment& s : batch.readable(c))
            if (!inside(s, ram)) std::abort();
          for (const Segment& s : batch.writable(c))
            if (!inside(s, ram)) std::abort();
          pending.push_back(Completion{c.id, c.ring_descs, 0});
        }
        (void)p;
        break;
      }
      case 3: {  // write into and complete some popped chains
        std::size_t k = std::min<std::size_t>(pending.size(), in.take<std::uint8_t>() % 8);
        std::uint8_t payload[64];
        std::memset(payload, 0x5a, sizeof payload);
        for (std::size_t i = 0; i < batch.size() && i < k; ++i) {
          auto w = vq.write_chain(batch, batch[i], in.take<std::uint8_t>(), payload);
          if (w && i < pending.size()) pending[i].len = *w;
        }
        if (k > 0) {
          (void)vq.push(std::span(pending.data(), k));
          pending.erase(pending.begin(), pending.begin() + static_cast<std::ptrdiff_t>(k));
        }
        if (pending.empty()) batch.clear();
        break;
      }
      case 4: {  // push a made-up completion (a buggy device or stale id)
        Completion c{in.take<std::uint16_t>(), in.take<std::uint16_t>(), in.take<std::uint32_t>()};
        (void)vq.push(std::span(&c, 1));
        break;
      }
      case 5:
        (void)vq.set_kick_enabled(in.take<std::uint8_t>() & 1);
        (void)vq.has_available();
        break;
      case 6: {  // IOTLB change
        auto iova = kGpa + off + (in.take<std::uint16_t>() & 0xfff0);
        auto len = 1 + in.take<std::uint16_t>();
        auto gpa = kGpa + (in.take<std::uint16_t>() % kRam);
        auto perm = static_cast<Access>(in.take<std::uint8_t>() % 4);
        if (in.take<std::uint8_t>() & 1)
          (void)space.iotlb_update(Iova(iova), len, Gpa(gpa), perm);
        else
          (void)space.iotlb_invalidate(Iova(iova), len);
        break;
      }
      case 7: {  // stop and resume at the returned state
        if (!pending.empty()) break;
        RingState s = vq.stop();
        batch.clear();
        if (!vq.start(qc, s, in.take<std::uint8_t>() & 1)) return 0;
        break;
      }
    }
  }
  (void)vq.end_burst();
  return 0;
}
