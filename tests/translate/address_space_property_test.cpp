// Property test: random sequences of memory-table, IOTLB and logging operations and
// guest writes through the translate path, checked against a plain reference model.
//
// The model keeps, byte by byte: which backing byte (memfd, file offset) each GPA
// shows, which GPA and permission each IOVA maps to, the expected content of every
// backing byte and the expected dirty log. After every operation the real code must
// agree with it on success or failure (and the error), on every translated byte, on
// the content of every backing byte (so nothing was written outside what the model
// allows), and on the dirty log bit for bit.
#include <sys/mman.h>

#include <array>
#include <cstring>
#include <map>
#include <optional>
#include <vector>

#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include "support/memfd.h"
#include "vhostkit/translate.h"

namespace vhostkit {
namespace {

using testing::dup_fd;
using testing::make_memfd;

constexpr std::uint64_t kPage = 4096;
constexpr std::uint64_t kBackingPages = 16;
constexpr std::uint64_t kBackings = 2;
constexpr std::uint64_t kGpaPages = 64;   // GPA space [0, 256 KiB)
constexpr std::uint64_t kIovaPages = 64;  // IOVA space [kIovaBase, kIovaBase + 256 KiB)
constexpr std::uint64_t kIovaBase = 0x80000000;
constexpr std::uint64_t kUaddrBase = 0x7f0000000000;

std::uint64_t uaddr_of(std::uint64_t backing, std::uint64_t off) {
  return kUaddrBase + backing * 0x100000 + off;
}

struct ModelRegion {
  std::uint64_t backing, off, size, gpa;
};

struct Model {
  std::vector<ModelRegion> regions;
  struct Tlb {
    std::int64_t gpa = -1;  // -1: no entry
    Access perm = Access::none;
  };
  std::vector<Tlb> tlb = std::vector<Tlb>(kIovaPages * kPage);
  std::array<std::vector<std::uint8_t>, kBackings> content;
  std::vector<std::uint8_t> dirty = std::vector<std::uint8_t>(kGpaPages, 0);
  bool iommu = false;
  bool logging = true;

  // The backing byte GPA g shows, or nullopt.
  std::optional<std::pair<std::uint64_t, std::uint64_t>> at(std::uint64_t g) const {
    for (const auto& r : regions)
      if (g >= r.gpa && g < r.gpa + r.size) return std::pair(r.backing, r.off + (g - r.gpa));
    return std::nullopt;
  }
  // The lowest GPA whose region contains frontend address u.
  std::optional<std::uint64_t> gpa_of_uaddr(std::uint64_t u) const {
    std::optional<std::uint64_t> best;
    for (const auto& r : regions) {
      std::uint64_t base = uaddr_of(r.backing, r.off);
      if (u >= base && u < base + r.size) {
        std::uint64_t g = r.gpa + (u - base);
        if (!best || g < *best) best = g;
      }
    }
    return best;
  }
  void mark(std::uint64_t backing, std::uint64_t off) {  // every GPA showing the byte
    for (const auto& r : regions)
      if (r.backing == backing && off >= r.off && off < r.off + r.size)
        dirty[(r.gpa + off - r.off) / kPage] = 1;
  }
  bool overlaps(const ModelRegion& a) const {
    for (const auto& r : regions)
      if (a.gpa < r.gpa + r.size && r.gpa < a.gpa + a.size) return true;
    return false;
  }
  void flush() { std::fill(tlb.begin(), tlb.end(), Tlb{}); }
  // Resolves device address a for access: the backing byte and the GPA, or the error.
  Result<std::pair<std::uint64_t, std::pair<std::uint64_t, std::uint64_t>>, TranslateErrc> resolve(
      std::uint64_t a, Access access) const {
    std::uint64_t g = a;
    if (iommu) {
      if (a < kIovaBase || a - kIovaBase >= tlb.size())
        return unexpected(TranslateErrc::iotlb_miss);
      const Tlb& t = tlb[a - kIovaBase];
      if (t.gpa < 0) return unexpected(TranslateErrc::iotlb_miss);
      if (!permits(t.perm, access)) return unexpected(TranslateErrc::permission_denied);
      g = static_cast<std::uint64_t>(t.gpa);
    }
    auto b = at(g);
    if (!b) return unexpected(TranslateErrc::not_mapped);
    return std::pair(g, *b);
  }
};

struct Harness {
  std::array<UniqueFd, kBackings> fds;
  std::array<std::uint8_t*, kBackings> view{};  // the test's own mapping of each backing
  std::vector<std::uint8_t> log_bits = std::vector<std::uint8_t>(kGpaPages / 8, 0);
  AddressSpace space{MemoryLimits{}, IotlbLimits{.max_entries = 1 << 16}};
  Model model;

  Harness() {
    for (std::uint64_t b = 0; b < kBackings; ++b) {
      fds[b] = make_memfd(kBackingPages * kPage);
      void* p = ::mmap(nullptr, kBackingPages * kPage, PROT_READ | PROT_WRITE, MAP_SHARED,
                       fds[b].get(), 0);
      view[b] = static_cast<std::uint8_t*>(p);
      model.content[b].resize(kBackingPages * kPage);
      for (std::uint64_t i = 0; i < kBackingPages * kPage; ++i)
        view[b][i] = model.content[b][i] = static_cast<std::uint8_t>(i * 7 + b * 131 + (i >> 12));
    }
    RC_ASSERT(space.set_log(DirtyLog::over(log_bits)).has_value());
    space.set_logging(true);
  }
  ~Harness() {
    for (auto* v : view) ::munmap(v, kBackingPages * kPage);
  }

  RegionSpec spec(const ModelRegion& r) {
    RegionSpec s;
    s.fd = dup_fd(fds[r.backing]);
    s.mmap_offset = r.off;
    s.size = r.size;
    s.gpa = Gpa(r.gpa);
    s.uaddr = Uaddr(uaddr_of(r.backing, r.off));
    return s;
  }

  void check_content() {
    for (std::uint64_t b = 0; b < kBackings; ++b)
      RC_ASSERT(std::memcmp(view[b], model.content[b].data(), kBackingPages * kPage) == 0);
  }
  void check_log() {
    for (std::uint64_t p = 0; p < kGpaPages; ++p)
      RC_ASSERT(((log_bits[p / 8] >> (p % 8)) & 1u) == model.dirty[p]);
  }
};

ModelRegion region_from(std::uint32_t a, std::uint32_t b) {
  ModelRegion r;
  r.backing = a & 1;
  std::uint64_t pages = 1 + ((a >> 1) % 4);
  r.off = ((a >> 3) % (kBackingPages - pages + 1)) * kPage;
  r.size = pages * kPage;
  if ((a >> 8) & 1) {  // sometimes a region not made of whole pages at either end
    r.off += 512;
    r.size -= 1024;
  }
  r.gpa = (b % (kGpaPages - pages + 1)) * kPage + (r.off % kPage);
  return r;
}

using Op = std::tuple<std::uint8_t, std::uint32_t, std::uint32_t, std::uint32_t, std::uint32_t>;

void run(const std::vector<Op>& ops, LogMode mode) {
  Harness h;
  Translator tr(h.space, mode);
  Model& m = h.model;
  for (const auto& [kind, a, b, c, d] : ops) {
    switch (kind % 12) {
      case 0: {  // SET_MEM_TABLE with 1-3 regions
        std::vector<ModelRegion> rs;
        std::uint32_t seed = a;
        for (std::uint32_t i = 0; i <= b % 3; ++i)
          rs.push_back(region_from(seed * (i + 1) + c * i, d + 17 * i * c));
        bool overlap = false;
        for (std::size_t i = 0; i < rs.size(); ++i)
          for (std::size_t j = i + 1; j < rs.size(); ++j)
            if (rs[i].gpa < rs[j].gpa + rs[j].size && rs[j].gpa < rs[i].gpa + rs[i].size)
              overlap = true;
        std::vector<RegionSpec> specs;
        for (const auto& r : rs) specs.push_back(h.spec(r));
        auto res = h.space.set_mem_table(std::move(specs));
        RC_ASSERT(res.has_value() == !overlap);
        if (!overlap) {
          m.regions = rs;
          m.flush();
        }
        break;
      }
      case 1: {  // ADD_MEM_REG
        ModelRegion r = region_from(a, b);
        auto res = h.space.add_region(h.spec(r));
        bool ok = !m.overlaps(r);
        RC_ASSERT(res.has_value() == ok);
        if (ok) {
          m.regions.push_back(r);
          m.flush();
        }
        break;
      }
      case 2: {  // REM_MEM_REG (an existing region, or a made-up one)
        if (!m.regions.empty() && (a & 1)) {
          std::size_t i = b % m.regions.size();
          RC_ASSERT(h.space.remove_region(Gpa(m.regions[i].gpa), m.regions[i].size).has_value());
          m.regions.erase(m.regions.begin() + static_cast<std::ptrdiff_t>(i));
          m.flush();
        } else {
          ModelRegion r = region_from(a, b);
          bool exists = false;
          for (const auto& x : m.regions) exists |= x.gpa == r.gpa && x.size == r.size;
          if (!exists) RC_ASSERT(!h.space.remove_region(Gpa(r.gpa), r.size).has_value());
        }
        break;
      }
      case 3:
      case 4: {  // IOTLB update by GPA (3) or by uaddr (4)
        std::uint64_t iova = kIovaBase + a % (kIovaPages * kPage);
        std::uint64_t size = 1 + b % (4 * kPage);
        if (iova + size > kIovaBase + kIovaPages * kPage)
          size = kIovaBase + kIovaPages * kPage - iova;
        auto perm = static_cast<Access>(1 + d % 3);
        std::vector<std::int64_t> gpas(size, -1);
        bool backed = true;
        std::uint64_t target;
        if (kind % 12 == 3) {
          target = c % (kGpaPages * kPage);
          for (std::uint64_t k = 0; k < size && backed; ++k) {
            if (!m.at(target + k)) backed = false;
            gpas[k] = static_cast<std::int64_t>(target + k);
          }
        } else {
          // A frontend address inside some backing (maybe not in any region).
          target = uaddr_of(c & 1, (c >> 1) % (kBackingPages * kPage));
          for (std::uint64_t k = 0; k < size && backed; ++k) {
            auto g = m.gpa_of_uaddr(target + k);
            if (!g)
              backed = false;
            else
              gpas[k] = static_cast<std::int64_t>(*g);
          }
        }
        auto res = kind % 12 == 3
                       ? h.space.iotlb_update(Iova(iova), size, Gpa(target), perm)
                       : h.space.iotlb_update_uaddr(Iova(iova), size, Uaddr(target), perm);
        RC_ASSERT(res.has_value() == backed);
        if (!backed) RC_ASSERT(res.error().code == IotlbErrc::not_backed);
        if (backed)
          for (std::uint64_t k = 0; k < size; ++k)
            m.tlb[iova - kIovaBase + k] = Model::Tlb{gpas[k], perm};
        break;
      }
      case 5: {  // invalidate
        std::uint64_t iova = kIovaBase + a % (kIovaPages * kPage);
        std::uint64_t size = 1 + b % (8 * kPage);
        RC_ASSERT(h.space.iotlb_invalidate(Iova(iova), size).has_value());
        for (std::uint64_t k = 0; k < size && iova - kIovaBase + k < m.tlb.size(); ++k)
          m.tlb[iova - kIovaBase + k] = Model::Tlb{};
        break;
      }
      case 6:
        if ((a % 4) == 0) {
          h.space.iotlb_flush();
          m.flush();
        } else {
          m.iommu = !m.iommu;
          h.space.set_iommu(m.iommu);
        }
        break;
      case 7:
      case 8: {  // guest write through the translate path
        std::uint64_t len = 1 + b % (2 * kPage);
        std::uint64_t addr =
            (m.iommu ? kIovaBase : 0) + a % ((m.iommu ? kIovaPages : kGpaPages) * kPage);
        std::vector<std::uint8_t> data(len);
        for (std::uint64_t k = 0; k < len; ++k) data[k] = static_cast<std::uint8_t>(c + k * d);
        tr.begin_burst();
        auto res = tr.write(Iova(addr), data);
        RC_ASSERT(tr.end_burst().has_value());
        std::optional<TranslateErrc> expect;
        for (std::uint64_t k = 0; k < len; ++k) {
          auto r = m.resolve(addr + k, Access::write);
          if (!r) {
            expect = r.error();
            break;
          }
          auto [bk, off] = r->second;
          m.content[bk][off] = data[k];
          if (m.logging) m.mark(bk, off);
        }
        RC_ASSERT(res.has_value() == !expect);
        if (expect) RC_ASSERT(res.error().code == *expect);
        break;
      }
      case 9: {  // read and translate
        std::uint64_t len = 1 + b % (2 * kPage);
        std::uint64_t addr =
            (m.iommu ? kIovaBase : 0) + a % ((m.iommu ? kIovaPages : kGpaPages) * kPage);
        Access access = (c & 1) ? Access::read : Access::write;
        std::vector<Segment> segs(64);
        auto res = tr.translate(Iova(addr), len, access, segs);
        std::optional<TranslateErrc> expect;
        for (std::uint64_t k = 0; k < len && !expect; ++k)
          if (auto r = m.resolve(addr + k, access); !r) expect = r.error();
        RC_ASSERT(res.has_value() == !expect);
        if (expect) {
          RC_ASSERT(res.error().code == *expect);
          break;
        }
        std::uint64_t k = 0;
        for (std::size_t i = 0; i < *res; ++i) {
          for (std::uint64_t j = 0; j < segs[i].len; ++j, ++k) {
            auto r = m.resolve(addr + k, access);
            RC_ASSERT(segs[i].gpa.value + j == r->first);
            auto [bk, off] = r->second;
            RC_ASSERT(segs[i].host[j] == m.content[bk][off]);
          }
        }
        RC_ASSERT(k == len);
        if (access == Access::read) {
          std::vector<std::uint8_t> out(len);
          RC_ASSERT(tr.read(Iova(addr), out).has_value());
          for (std::uint64_t q = 0; q < len; ++q) {
            auto [bk, off] = m.resolve(addr + q, access)->second;
            RC_ASSERT(out[q] == m.content[bk][off]);
          }
        }
        break;
      }
      case 10:
        m.logging = !m.logging;
        h.space.set_logging(m.logging);
        break;
      case 11: {  // the frontend takes the log (migration round): clear both
        std::fill(h.log_bits.begin(), h.log_bits.end(), 0);
        std::fill(m.dirty.begin(), m.dirty.end(), 0);
        break;
      }
    }
    h.check_content();
    h.check_log();
  }
}

RC_GTEST_PROP(AddressSpaceModel, AgreesWithModelBatchedLog, (const std::vector<Op>& ops)) {
  run(ops, LogMode::batched);
}

RC_GTEST_PROP(AddressSpaceModel, AgreesWithModelImmediateLog, (const std::vector<Op>& ops)) {
  run(ops, LogMode::immediate);
}

// The GPA and the legacy uaddr update forms of the same mapping install the same entries.
RC_GTEST_PROP(AddressSpaceModel, GpaAndUaddrUpdatesAgree,
              (std::uint32_t a, std::uint32_t b, std::uint32_t c, std::uint32_t d,
               std::uint32_t e)) {
  Harness h;
  std::vector<ModelRegion> rs{region_from(a, b), region_from(c, d)};
  if (rs[0].gpa < rs[1].gpa + rs[1].size && rs[1].gpa < rs[0].gpa + rs[0].size) rs.pop_back();
  std::vector<RegionSpec> specs;
  for (const auto& r : rs) specs.push_back(h.spec(r));
  RC_ASSERT(h.space.set_mem_table(std::move(specs)).has_value());
  const ModelRegion& r = rs[e % rs.size()];
  std::uint64_t off = (e >> 3) % r.size;
  std::uint64_t size = 1 + (e >> 12) % (r.size - off);
  DeviceIotlb by_gpa;
  DeviceIotlb by_uaddr;
  by_gpa.rebind(h.space.memory());
  by_uaddr.rebind(h.space.memory());
  RC_ASSERT(by_gpa.update_gpa(Iova(kIovaBase), size, Gpa(r.gpa + off), Access::read).has_value());
  // The uaddr of that GPA, as a legacy frontend would send it.
  std::uint64_t ua = uaddr_of(r.backing, r.off + off);
  auto res = by_uaddr.update_uaddr(Iova(kIovaBase), size, Uaddr(ua), Access::read);
  RC_ASSERT(res.has_value());
  // With aliases the uaddr form resolves to the lowest GPA showing the same bytes: the
  // host memory must be the same byte either way, and the GPA the same without aliases.
  bool aliased = h.space.memory()->has_aliases();
  for (std::uint64_t k : {std::uint64_t{0}, size / 2, size - 1}) {
    auto x = by_gpa.lookup(Iova(kIovaBase + k));
    auto y = by_uaddr.lookup(Iova(kIovaBase + k));
    RC_ASSERT(x.has_value() && y.has_value());
    HostPtr hx = x->host + (kIovaBase + k - x->iova.value);
    HostPtr hy = y->host + (kIovaBase + k - y->iova.value);
    // Aliased regions are separate mappings of the same file bytes: the pointers may
    // differ, the memory may not.
    std::uint8_t before = *hx;
    *hx = static_cast<std::uint8_t>(before + 1);
    RC_ASSERT(*hy == static_cast<std::uint8_t>(before + 1));
    *hx = before;
    if (!aliased) {
      RC_ASSERT(hx == hy);
      RC_ASSERT(x->gpa == y->gpa);
      RC_ASSERT(x->iova == y->iova);
      RC_ASSERT(x->size == y->size);
    }
  }
  if (!aliased) RC_ASSERT(by_gpa.entries().size() == by_uaddr.entries().size());
}

}  // namespace
}  // namespace vhostkit
