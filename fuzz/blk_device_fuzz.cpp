// Fuzz target: hostile virtio-blk requests served by BlkDevice::process().
//
// Input layout: 2 option bytes (logical block size, read-only, cache mode, engine,
// negotiated features), then a stream of operations: lay out a request in guest memory
// (header of any length, type, sector, up to three data descriptors of any length,
// direction and place, discard/write-zeroes segments, a status byte or none) and offer
// it on a split ring; overwrite any guest byte (rings and descriptors included); let
// the device serve the queue; write the config space; reset the device. Guest memory is
// one 256 KiB memfd region; the image is a 1 MiB memfd.
// Invariants beyond the sanitizers: while no byte was overwritten behind the driver's
// back, every used entry names a chain that was offered and reports at most that
// chain's writable length, and every status byte is OK, IOERR or UNSUPP; the image
// never changes size; the config space stays 96 bytes whatever was written to it.
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "fuzz_input.h"
#include "vhostkit/devices/blk.h"
#include "vhostkit/log.h"
#include "vhostkit/virtqueue.h"

namespace {

using namespace vhostkit;
using namespace vhostkit::blk;
using fuzzing::Input;

constexpr std::uint64_t kGpa = 0x10000;
constexpr std::uint64_t kRam = 0x40000;
constexpr std::uint16_t kRingSize = 16;
constexpr std::uint64_t kDesc = kGpa;           // 16 descriptors of 16 bytes
constexpr std::uint64_t kAvail = kGpa + 0x400;  // flags, idx, ring[16]
constexpr std::uint64_t kUsed = kGpa + 0x800;   // flags, idx, ring[16] of {id, len}
constexpr std::uint64_t kData = kGpa + 0x1000;  // headers, data, status bytes
constexpr std::uint64_t kImageBytes = 1 << 20;

int memfd(const char* name, std::uint64_t size) {
  int f = ::memfd_create(name, MFD_CLOEXEC);
  if (f < 0 || ::ftruncate(f, static_cast<off_t>(size)) != 0) std::abort();
  return f;
}

struct Offered {
  std::uint16_t head = 0;
  std::uint64_t writable = 0;  // bytes the device may write
  std::uint64_t status = 0;    // GPA of the status byte, 0 if none
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const int ram_fd = memfd("blk-fuzz-ram", kRam);
  static const int image_fd = memfd("blk-fuzz-image", kImageBytes);
  static const bool quiet = [] {
    set_log_sink([](LogLevel, std::string_view) {}, LogLevel::error);
    return true;
  }();
  (void)quiet;
  Input in{data, size};
  const auto opt = in.take<std::uint16_t>();

  BlkOptions o;
  o.path = "/proc/self/fd/" + std::to_string(image_fd);
  o.logical_block_size = 512u << (opt & 3);
  o.read_only = (opt >> 2) & 1;
  o.cache = (opt >> 3) & 1 ? BlkCache::writethrough : BlkCache::writeback;
  o.engine = (opt >> 4) & 1 ? BlkEngine::io_uring : BlkEngine::sync;
  o.queues = 1;
  o.name = "fuzz";
  o.max_discard_seg = 4;
  o.max_write_zeroes_seg = 4;
  auto dev = BlkDevice::open(o);
  if (!dev) return 0;  // io_uring refused by the sandbox, say
  BlkDevice& d = **dev;
  const std::uint64_t features = d.device_features() & ((opt >> 5) | ~std::uint64_t{0x7ff});
  d.set_features(features);

  AddressSpace space;
  std::vector<RegionSpec> regions;
  RegionSpec r;
  r.fd = UniqueFd(::dup(ram_fd));
  r.size = kRam;
  r.gpa = Gpa(kGpa);
  r.uaddr = Uaddr(0x7f0000000000);
  regions.push_back(std::move(r));
  if (!space.set_mem_table(std::move(regions))) std::abort();
  std::uint8_t* ram = space.memory()->gpa_to_host(Gpa(kGpa))->host;
  std::memset(ram, 0, kRam);
  auto at = [&](std::uint64_t gpa) { return ram + (gpa - kGpa); };

  QueueConfig qc;
  qc.format = RingFormat::split;
  qc.size = kRingSize;
  qc.indirect = (opt >> 12) & 1;
  qc.event_idx = false;
  qc.addr = RingAddresses{Iova(kDesc), Iova(kAvail), Iova(kUsed)};
  Virtqueue vq(space);
  if (!vq.start(qc, RingState{}, false)) return 0;

  std::uint16_t avail_idx = 0, used_seen = 0, next_desc = 0;
  std::uint64_t next_data = kData;
  std::vector<Offered> offered;
  bool clean = true;  // no guest byte changed behind the driver's back

  auto put_desc = [&](std::uint16_t i, std::uint64_t addr, std::uint32_t len, std::uint16_t flags,
                      std::uint16_t next) {
    std::uint8_t* p = at(kDesc + 16u * i);
    std::memcpy(p, &addr, 8);
    std::memcpy(p + 8, &len, 4);
    std::memcpy(p + 12, &flags, 2);
    std::memcpy(p + 14, &next, 2);
  };
  auto data_alloc = [&](std::uint64_t len) -> std::uint64_t {
    if (next_data + len > kGpa + kRam) next_data = kData;
    std::uint64_t g = next_data;
    next_data += (len + 7) & ~std::uint64_t{7};
    return g;
  };

  while (!in.empty()) {
    auto op = in.take<std::uint8_t>();
    switch (op % 6) {
      case 0:
      case 1: {  // offer a request
        static constexpr std::uint32_t kTypes[] = {kTIn,      kTOut,         kTFlush,      kTGetId,
                                                   kTDiscard, kTWriteZeroes, kTGetLifetime};
        auto shape = in.take<std::uint16_t>();
        std::uint32_t type = (shape & 0x8000) ? in.take<std::uint32_t>() : kTypes[shape % 7];
        std::uint64_t sector = 0;
        switch ((shape >> 3) & 3) {
          case 0: sector = in.take<std::uint8_t>(); break;
          case 1: sector = d.capacity() - (in.take<std::uint8_t>() % 16); break;
          case 2: sector = in.take<std::uint64_t>(); break;
          default: sector = in.take<std::uint16_t>(); break;
        }
        const unsigned ndata = (shape >> 5) % 4;
        const bool status = !((shape >> 7) & 1) || (shape & 0x4000);
        const unsigned ndesc = 1 + ndata + (status ? 1 : 0);
        if (next_desc + ndesc > kRingSize) break;  // the table is full until served
        const std::uint32_t hdr_len = (shape >> 8) & 1 ? in.take<std::uint8_t>() % 24 : 16;
        std::uint64_t hdr = data_alloc(hdr_len + 16);
        std::memcpy(at(hdr), &type, 4);
        std::memset(at(hdr) + 4, 0, 4);
        std::memcpy(at(hdr) + 8, &sector, 8);
        Offered req;
        req.head = next_desc;
        std::uint16_t i = next_desc;
        put_desc(i, hdr, hdr_len, ndesc > 1 ? 1 : 0, static_cast<std::uint16_t>(i + 1));
        for (unsigned k = 0; k < ndata; ++k) {
          ++i;
          auto seg = in.take<std::uint16_t>();
          std::uint32_t len = seg % 9000;
          if (seg & 0x8000) len = (len / 512 + 1) * 512;  // whole sectors, mostly
          const bool writable = (seg >> 14) & 1;
          std::uint64_t g = data_alloc(len);
          if (!writable && (type == kTDiscard || type == kTWriteZeroes)) {
            // Segments {sector, count, flags}, biased towards the capacity.
            for (std::uint32_t s = 0; s + 16 <= len; s += 16) {
              std::uint64_t ss = in.take<std::uint8_t>() & 1 ? in.take<std::uint64_t>()
                                                             : in.take<std::uint16_t>() % 4096;
              std::uint32_t count = in.take<std::uint16_t>();
              std::uint32_t flags = in.take<std::uint8_t>() % 3;
              std::memcpy(at(g + s), &ss, 8);
              std::memcpy(at(g + s + 8), &count, 4);
              std::memcpy(at(g + s + 12), &flags, 4);
            }
          } else if (!writable && len > 0) {
            std::memset(at(g), static_cast<int>(seg & 0xff), len);
          }
          if (writable) req.writable += len;
          const bool more = k + 1 < ndata || status;
          put_desc(i, g, len, static_cast<std::uint16_t>((more ? 1 : 0) | (writable ? 2 : 0)),
                   static_cast<std::uint16_t>(i + 1));
        }
        if (status) {
          ++i;
          req.status = data_alloc(1);
          *at(req.status) = 0xff;
          req.writable += 1;
          put_desc(i, req.status, 1, 2, 0);
        }
        next_desc = static_cast<std::uint16_t>(i + 1);
        std::uint16_t slot = avail_idx % kRingSize;
        std::memcpy(at(kAvail + 4 + 2u * slot), &req.head, 2);
        ++avail_idx;
        std::memcpy(at(kAvail + 2), &avail_idx, 2);
        offered.push_back(req);
        break;
      }
      case 2: {  // overwrite 8 guest bytes anywhere (rings and descriptors included)
        auto where = in.take<std::uint32_t>() % (kRam - 8);
        auto v = in.take<std::uint64_t>();
        std::memcpy(ram + where, &v, 8);
        clean = false;
        break;
      }
      case 3: {  // the queue's worker serves it
        vq.begin_burst();
        (void)d.process(0, vq);
        (void)vq.end_burst();
        std::uint16_t used_idx;
        std::memcpy(&used_idx, at(kUsed + 2), 2);
        for (; used_seen != used_idx; ++used_seen) {
          std::uint32_t id, len;
          std::memcpy(&id, at(kUsed + 4 + 8u * (used_seen % kRingSize)), 4);
          std::memcpy(&len, at(kUsed + 8 + 8u * (used_seen % kRingSize)), 4);
          if (!clean) continue;
          const Offered* o2 = nullptr;
          for (const Offered& x : offered)
            if (x.head == id) o2 = &x;
          if (o2 == nullptr || len > o2->writable) std::abort();
          if (o2->status != 0 && len > 0 && *at(o2->status) > kSUnsupp) std::abort();
        }
        if (!vq.broken() && used_seen == avail_idx) {
          offered.clear();
          next_desc = 0;
        }
        break;
      }
      case 4: {  // config space write
        auto off = in.take<std::uint8_t>() % 100;
        std::vector<std::uint8_t> bytes(in.take<std::uint8_t>() % 4);
        for (auto& b : bytes) b = in.take<std::uint8_t>();
        (void)d.set_config(off, bytes);
        if (d.config().size() != kConfigSize) std::abort();
        break;
      }
      case 5:  // reset, negotiate again
        d.reset();
        d.set_features(features);
        break;
    }
  }
  struct stat st {};
  if (::fstat(image_fd, &st) != 0 || static_cast<std::uint64_t>(st.st_size) != kImageBytes)
    std::abort();
  return 0;
}
