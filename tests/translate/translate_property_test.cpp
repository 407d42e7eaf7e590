// Property test of the foundation layer: random sequences of memory-table, IOTLB,
// logging and data-path operations run against a real AddressSpace and two real
// Translators (one batching its dirty bits, one logging immediately) over real memfds,
// and against a plain reference model.
//
// The model is byte-granular and deliberately naive:
//   - regions: a list of {memfd, mmap offset, size, gpa, uaddr}; a GPA's backing byte is
//     found by scanning the list, a uaddr's GPA likewise (lowest GPA wins, memory.h);
//   - IOTLB: one slot per IOVA byte of a small window holding {gpa, permission, tag},
//     where the tag names the update (and the region piece of it) that installed the
//     byte. Entries are never merged, so the real entries must be exactly the maximal
//     runs of equal tags;
//   - guest memory: a byte array per memfd; the test also maps each memfd itself;
//   - dirty log: the set of dirty GPA pages.
// After every operation the real code must agree with the model: on success or the
// error code (and the failing address); on the gpa and the host byte of every
// translated byte (a value stored through the test's own mapping must be read back
// through the returned host pointer); on the full content of every memfd (so nothing
// was written anywhere the model does not write); on the dirty log bit for bit (every
// written byte dirty at its GPA and every alias, nothing else); on the memory snapshot
// and on every IOTLB entry. A second DeviceIotlb bound to the same snapshot receives
// every update in the other form (GPA updates as uaddr updates where the uaddr maps back
// to the same GPA, uaddr updates as GPA updates) and must hold identical entries.
#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <optional>
#include <set>
#include <span>
#include <stdexcept>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include "support/memfd.h"
#include "vhostkit/translate.h"

namespace vhostkit {
namespace {

using testing::dup_fd;
using testing::make_memfd;

constexpr std::uint64_t kKiB = 1024;
constexpr std::uint64_t kMiB = 1024 * kKiB;
constexpr std::uint64_t kPage = kPageSize;
constexpr std::size_t kFds = 3;
constexpr std::array<std::uint64_t, kFds> kFdSize = {64 * kKiB, 96 * kKiB, 128 * kKiB};
constexpr std::uint64_t kGpaSpace = 16 * kMiB;              // what the dirty log covers
constexpr std::uint64_t kLogBytes = kGpaSpace / kPage / 8;  // exactly
constexpr std::uint64_t kLogPages = kLogBytes * 8;
// Every region lies below kGpaLimit: a region added past the log's end is legal, but a
// write there must be reported (log_failed), never logged out of bounds.
constexpr std::uint64_t kGpaLimit = kGpaSpace + 512 * kKiB;
constexpr std::uint64_t kLogGuard = 16;  // bytes either side of the log
// IOTLB updates stay inside [kIovaBase, kIovaBase + kIovaWindow). The window lies inside
// the GPA space, so an IOVA logged as if it were a GPA marks a plausible page.
constexpr std::uint64_t kIovaBase = 0x40000;
constexpr std::uint64_t kIovaWindow = 32 * kKiB;
constexpr std::uint64_t kMaxAccess = 3 * kPage + 17;    // longest read, write or translate
constexpr std::uint64_t kOddUaddrs = 0x6000'0000'0000;  // frontend mappings of their own

// A value in [lo, hi), uniform whatever rapidcheck's current size; shrinks towards lo.
template <typename T>
T pick(T lo, T hi) {
  return *rc::gen::resize(100, rc::gen::inRange<T>(lo, hi));
}
std::uint64_t pick(std::uint64_t hi) {
  return pick<std::uint64_t>(0, hi);
}
bool one_in(std::uint64_t n) {
  return pick(n) == 0;
}

std::uint64_t page_round_up(std::uint64_t v) {
  return (v + kPage - 1) & ~(kPage - 1);
}

// Where a guest byte lives: a memfd and an offset in it.
struct Backing {
  std::size_t fd = 0;
  std::uint64_t offset = 0;
};

struct ModelRegion {
  std::size_t fd = 0;
  std::uint64_t offset = 0;  // mmap offset into the memfd
  std::uint64_t size = 0;
  std::uint64_t gpa = 0;
  std::uint64_t uaddr = 0;

  [[nodiscard]] bool has_gpa(std::uint64_t g) const { return g >= gpa && g - gpa < size; }
  [[nodiscard]] bool has_uaddr(std::uint64_t u) const { return u >= uaddr && u - uaddr < size; }
  [[nodiscard]] bool has_offset(std::size_t f, std::uint64_t o) const {
    return f == fd && o >= offset && o - offset < size;
  }
};

std::string describe(const ModelRegion& r) {
  return fmt::format("{{fd{} offset {:#x} size {:#x} gpa {:#x} uaddr {:#x}}}", r.fd, r.offset,
                     r.size, r.gpa, r.uaddr);
}

// "ok" or the error, for the narration rapidcheck prints with a counterexample.
template <typename Res>
std::string outcome(const Res& res) {
  if (res) return "ok";
  return to_string(res.error().code);
}

bool overlap(std::uint64_t a, std::uint64_t an, std::uint64_t b, std::uint64_t bn) {
  return a < b + bn && b < a + an;
}

struct Model {
  struct TlbByte {
    std::uint64_t tag = 0;  // 0: no translation
    std::uint64_t gpa = 0;
    Access perm = Access::none;
  };

  std::vector<ModelRegion> regions;  // in the order they were installed
  std::vector<TlbByte> tlb = std::vector<TlbByte>(kIovaWindow);
  std::uint64_t next_tag = 1;
  std::array<std::vector<std::uint8_t>, kFds> content;
  std::set<std::uint64_t> dirty;  // GPA page numbers
  bool iommu = false;
  bool logging = true;

  [[nodiscard]] const ModelRegion* region_at(std::uint64_t gpa) const {
    for (const auto& r : regions)
      if (r.has_gpa(gpa)) return &r;
    return nullptr;
  }
  // The region a frontend address resolves to: the lowest GPA that shows it.
  [[nodiscard]] const ModelRegion* region_of_uaddr(std::uint64_t u) const {
    const ModelRegion* best = nullptr;
    for (const auto& r : regions)
      if (r.has_uaddr(u) && (best == nullptr || r.gpa < best->gpa)) best = &r;
    return best;
  }
  [[nodiscard]] Backing backing(std::uint64_t gpa) const {
    const ModelRegion* r = region_at(gpa);
    RC_ASSERT(r != nullptr);
    return Backing{r->fd, r->offset + (gpa - r->gpa)};
  }

  struct Resolved {
    std::uint64_t gpa;
    Backing at;
  };
  // What device address `addr` means for `access`.
  [[nodiscard]] Result<Resolved, TranslateErrc> resolve(std::uint64_t addr, Access access) const {
    std::uint64_t gpa = addr;
    if (iommu) {
      if (addr < kIovaBase || addr - kIovaBase >= kIovaWindow)
        return unexpected(TranslateErrc::iotlb_miss);
      const TlbByte& t = tlb[addr - kIovaBase];
      if (t.tag == 0) return unexpected(TranslateErrc::iotlb_miss);
      if (!permits(t.perm, access)) return unexpected(TranslateErrc::permission_denied);
      gpa = t.gpa;
    }
    const ModelRegion* r = region_at(gpa);
    if (r == nullptr) return unexpected(TranslateErrc::not_mapped);
    return Resolved{gpa, Backing{r->fd, r->offset + (gpa - r->gpa)}};
  }

  // A byte was written (or logged): every GPA showing it is dirty. Returns true if one
  // of them lies beyond the log (the write must then be reported as not logged).
  bool log(Backing b) {
    if (!logging) return false;
    bool beyond = false;
    for (const auto& r : regions) {
      if (!r.has_offset(b.fd, b.offset)) continue;
      std::uint64_t page = (r.gpa + (b.offset - r.offset)) / kPage;
      if (page < kLogPages)
        dirty.insert(page);
      else
        beyond = true;
    }
    return beyond;
  }

  void flush_tlb() { std::fill(tlb.begin(), tlb.end(), TlbByte{}); }

  // Why SET_MEM_TABLE (fresh == all) or ADD_MEM_REG (fresh == the new one) is refused.
  [[nodiscard]] static std::optional<MemoryErrc> refuse(const std::vector<ModelRegion>& all,
                                                        std::span<const ModelRegion> fresh) {
    for (const auto& r : fresh)
      if (r.offset + r.size > kFdSize[r.fd]) return MemoryErrc::beyond_file;
    for (std::size_t i = 0; i < all.size(); ++i)
      for (std::size_t j = i + 1; j < all.size(); ++j)
        if (overlap(all[i].gpa, all[i].size, all[j].gpa, all[j].size))
          return MemoryErrc::gpa_overlap;
    // Overlapping frontend ranges must be the same bytes of the same file.
    for (std::size_t i = 0; i < all.size(); ++i)
      for (std::size_t j = i + 1; j < all.size(); ++j) {
        const ModelRegion& a = all[i];
        const ModelRegion& b = all[j];
        if (overlap(a.uaddr, a.size, b.uaddr, b.size) &&
            (a.fd != b.fd || a.uaddr - a.offset != b.uaddr - b.offset))
          return MemoryErrc::uaddr_conflict;
      }
    return std::nullopt;
  }
};

// The operations, in this order: those up to `flush` can change the IOTLB, those up to
// `toggle_iommu` what an address translates to.
enum class Op {
  set_mem_table,
  add_region,
  remove_region,
  clear_memory,
  update_gpa,
  update_uaddr,
  invalidate,
  flush,
  toggle_iommu,
  toggle_logging,
  take_log,
  write,
  read,
  translate,
  log_write,
};

void showValue(Op op, std::ostream& os) {
  constexpr const char* kNames[] = {
      "set_mem_table", "add_region", "remove_region", "clear_memory", "update_gpa",
      "update_uaddr",  "invalidate", "flush",         "toggle_iommu", "toggle_logging",
      "take_log",      "write",      "read",          "translate",    "log_write"};
  os << kNames[static_cast<int>(op)];
}

class Harness {
 public:
  Harness() {
    for (std::size_t f = 0; f < kFds; ++f) {
      fds_[f] = make_memfd(kFdSize[f]);
      void* p = ::mmap(nullptr, kFdSize[f], PROT_READ | PROT_WRITE, MAP_SHARED, fds_[f].get(), 0);
      if (p == MAP_FAILED) throw std::runtime_error("mmap of a test memfd failed");
      view_[f] = static_cast<std::uint8_t*>(p);
      m_.content[f].resize(kFdSize[f]);
      for (std::uint64_t i = 0; i < kFdSize[f]; ++i)
        view_[f][i] = m_.content[f][i] = static_cast<std::uint8_t>((i * 131) ^ (i >> 9) ^ (f * 77));
      // The frontend's own (arbitrary, unaligned) virtual address of each memfd.
      uaddr_base_[f] = ((f + 1) << 40) + pick<std::uint64_t>(0, 1ULL << 30);
    }
    // The log starts at a random byte offset (a non-zero log mmap offset, maybe not
    // 8-byte aligned) with guard bytes either side that must stay zero.
    std::uint64_t at = kLogGuard + (one_in(2) ? 0 : pick(8));
    log_bits_ = std::span(log_storage_).subspan(at, kLogBytes);
    RC_ASSERT(space_.set_log(DirtyLog::over(log_bits_)).has_value());
    space_.set_logging(m_.logging);
    m_.iommu = one_in(2);
    RC_LOG() << fmt::format("log at byte {} of its buffer; iommu {}\n", at - kLogGuard, m_.iommu);
    space_.set_iommu(m_.iommu);
    mirror_.rebind(space_.memory());
  }
  ~Harness() {
    for (std::size_t f = 0; f < kFds; ++f) ::munmap(view_[f], kFdSize[f]);
  }
  Harness(const Harness&) = delete;
  Harness& operator=(const Harness&) = delete;

  void step() {
    Op op = *rc::gen::weightedElement<Op>({
        {4, Op::set_mem_table},
        {3, Op::add_region},
        {3, Op::remove_region},
        {1, Op::clear_memory},
        {10, Op::update_gpa},
        {10, Op::update_uaddr},
        {6, Op::invalidate},
        {2, Op::flush},
        {4, Op::toggle_iommu},
        {2, Op::toggle_logging},
        {2, Op::take_log},
        {16, Op::write},
        {8, Op::read},
        {12, Op::translate},
        {4, Op::log_write},
    });
    switch (op) {
      case Op::set_mem_table: set_mem_table(); break;
      case Op::add_region: add_region(); break;
      case Op::remove_region: remove_region(); break;
      case Op::clear_memory:
        RC_LOG() << "clear_memory\n";
        space_.clear_memory();
        memory_changed({});
        break;
      case Op::update_gpa: update_gpa(); break;
      case Op::update_uaddr: update_uaddr(); break;
      case Op::invalidate: invalidate(); break;
      case Op::flush:
        RC_LOG() << "iotlb_flush\n";
        space_.iotlb_flush();
        mirror_.flush();
        m_.flush_tlb();
        break;
      case Op::toggle_iommu:
        m_.iommu = !m_.iommu;
        RC_LOG() << "set_iommu " << m_.iommu << "\n";
        space_.set_iommu(m_.iommu);
        break;
      case Op::toggle_logging:
        m_.logging = !m_.logging;
        RC_LOG() << "set_logging " << m_.logging << "\n";
        space_.set_logging(m_.logging);
        break;
      case Op::take_log: take_log(); break;
      case Op::write: write(); break;
      case Op::read: read(); break;
      case Op::translate: translate(); break;
      case Op::log_write: log_write(); break;
    }
    // After a change of the mappings, the device comes back to the buffer it used last:
    // no translator may still use what it cached before the change.
    if (op <= Op::toggle_iommu && last_len_ > 0 && !one_in(3)) {
      std::uint64_t addr = last_addr_;
      std::uint64_t len = last_len_;
      RC_LOG() << "the device retries its last access:\n";
      for (Translator* t : {&batched_, &immediate_})
        (void)checked_translate(*t, addr, len, Access::read);
    }
    check_log();
    check_snapshot();
    if (op <= Op::flush) check_iotlb();  // the operations that can change it
  }

  // Most sequences start with some memory (a device set up by its frontend).
  void start() {
    if (!one_in(8)) set_mem_table();
  }

  void finish() {
    check_content();
    check_iotlb();
  }

 private:
  // --- generating regions -------------------------------------------------------------

  // A region (without its GPA), sometimes an alias of part of one of `others`, sometimes
  // with a uaddr of its own or one that conflicts, rarely reaching past its memfd.
  ModelRegion gen_region(const std::vector<ModelRegion>& others) {
    ModelRegion r;
    r.size = pick<std::uint64_t>(4, 17) * kPage;
    if (one_in(8)) r.size -= pick<std::uint64_t>(1, kPage);  // ends inside a page
    if (!others.empty() && one_in(4)) {
      const ModelRegion& o = others[pick(others.size())];
      r.fd = o.fd;
      if (one_in(3)) {
        r.offset = o.offset;
        r.size = o.size;
      } else {
        r.offset = o.offset + pick(o.size);
      }
    } else {
      r.fd = pick(kFds);
      r.offset = pick(kFdSize[r.fd] - r.size + 1);
      if (!one_in(3)) r.offset &= ~(kPage - 1);
    }
    r.offset = std::min(r.offset, kFdSize[r.fd] - r.size);
    if (one_in(40)) r.offset = kFdSize[r.fd] - r.size + pick<std::uint64_t>(1, kPage);
    r.uaddr = uaddr_base_[r.fd] + r.offset;
    if (one_in(10)) {
      r.uaddr = kOddUaddrs + (odd_uaddrs_++) * kMiB + pick(kPage);
    } else if (one_in(25)) {
      std::size_t f = pick(kFds);
      r.uaddr = uaddr_base_[f] + pick(kFdSize[f]);
    }
    return r;
  }

  // 1-4 regions at page-aligned GPAs: from GPA 0 or not, adjacent or with gaps of up to
  // 4 MiB, rarely overlapping, installed in GPA order or not.
  std::vector<ModelRegion> gen_table() {
    std::vector<ModelRegion> t;
    std::size_t n = pick<std::size_t>(1, 5);
    std::uint64_t cursor = one_in(3) ? 0 : pick(64) * kPage;
    if (one_in(5)) cursor = kGpaSpace - pick<std::uint64_t>(1, 64) * kPage;  // up to the log's end
    for (std::size_t i = 0; i < n; ++i) {
      ModelRegion r = gen_region(t);
      r.gpa = cursor;
      if (!t.empty() && one_in(12)) r.gpa = t.back().gpa + (pick(t.back().size) & ~(kPage - 1));
      if (r.gpa + r.size > kGpaLimit) break;
      std::uint64_t gap = 0;
      switch (pick(4)) {
        case 0: gap = pick<std::uint64_t>(1, 9) * kPage; break;
        case 1: gap = pick<std::uint64_t>(1, 1024) * kPage; break;
        default: break;  // adjacent
      }
      cursor = r.gpa + page_round_up(r.size) + gap;
      t.push_back(r);
    }
    // The order the frontend lists them in is also the order they are mapped in, which
    // decides whether GPA-adjacent regions happen to be adjacent in host memory too.
    if (one_in(3))
      std::reverse(t.begin(), t.end());
    else if (one_in(2))
      std::rotate(t.begin(), t.begin() + static_cast<std::ptrdiff_t>(pick(t.size())), t.end());
    return t;
  }

  RegionSpec spec(const ModelRegion& r) {
    RegionSpec s;
    s.fd = dup_fd(fds_[r.fd]);
    s.mmap_offset = r.offset;
    s.size = r.size;
    s.gpa = Gpa(r.gpa);
    s.uaddr = Uaddr(r.uaddr);
    return s;
  }

  // --- memory table --------------------------------------------------------------------

  template <typename Res>
  void expect_memory(const Res& res, std::optional<MemoryErrc> refused,
                     const std::vector<ModelRegion>& next) {
    RC_LOG() << "  -> " << outcome(res) << "\n";
    RC_ASSERT(res.has_value() == !refused);
    if (refused) {
      RC_ASSERT(res.error().code == *refused);
      return;
    }
    memory_changed(next);
  }

  void memory_changed(std::vector<ModelRegion> next) {
    m_.regions = std::move(next);
    m_.flush_tlb();
    // A memory-table change leaves the IOTLB empty.
    RC_ASSERT(space_.iotlb().size() == 0u);
    RC_ASSERT(space_.iotlb().entries().empty());
    mirror_.rebind(space_.memory());
  }

  void set_mem_table() {
    std::vector<ModelRegion> t = gen_table();
    auto refused = Model::refuse(t, t);
    RC_LOG() << "set_mem_table";
    for (const auto& r : t) RC_LOG() << " " << describe(r);
    RC_LOG() << "\n";
    std::vector<RegionSpec> specs;
    for (const auto& r : t) specs.push_back(spec(r));
    expect_memory(space_.set_mem_table(std::move(specs)), refused, t);
  }

  void add_region() {
    ModelRegion r = gen_region(m_.regions);
    std::uint64_t span = page_round_up(r.size);
    std::uint64_t last_page = (kGpaLimit - span) / kPage;
    if (!m_.regions.empty() && one_in(3)) {  // right after or right before another region
      const ModelRegion& o = m_.regions[pick(m_.regions.size())];
      if (one_in(2) || o.gpa < span)
        r.gpa = page_round_up(o.gpa + o.size);
      else
        r.gpa = o.gpa - span;
      r.gpa = std::min(r.gpa, last_page * kPage);
    } else {
      // Usually somewhere free, sometimes anywhere (then it may overlap).
      bool anywhere = one_in(5);
      for (int tries = 0; tries < 16; ++tries) {
        r.gpa = pick(last_page + 1) * kPage;
        if (one_in(8)) r.gpa = (kGpaSpace - pick(64 * kKiB)) & ~(kPage - 1);  // at the log's end
        if (anywhere || m_.region_at(r.gpa) == nullptr) break;
      }
    }
    std::vector<ModelRegion> next = m_.regions;
    next.push_back(r);
    auto refused = Model::refuse(next, std::span(&next.back(), 1));
    RC_LOG() << "add_region " << describe(r) << "\n";
    expect_memory(space_.add_region(spec(r)), refused, next);
  }

  void remove_region() {
    std::uint64_t gpa = pick(kGpaLimit);
    std::uint64_t size = pick<std::uint64_t>(1, 64 * kKiB);
    if (!m_.regions.empty() && !one_in(4)) {
      const ModelRegion& o = m_.regions[pick(m_.regions.size())];
      gpa = o.gpa;
      size = one_in(4) ? o.size + pick<std::uint64_t>(1, kPage) : o.size;
    }
    std::vector<ModelRegion> next;
    bool found = false;
    for (const auto& r : m_.regions) {
      if (!found && r.gpa == gpa && r.size == size)
        found = true;
      else
        next.push_back(r);
    }
    std::optional<MemoryErrc> refused;
    if (!found) refused = MemoryErrc::no_such_region;
    RC_LOG() << fmt::format("remove_region gpa {:#x} size {:#x}\n", gpa, size);
    expect_memory(space_.remove_region(Gpa(gpa), size), refused, next);
  }

  // --- IOTLB ----------------------------------------------------------------------------

  struct Piece {  // what one IOTLB entry of an update should be
    std::uint64_t iova;
    std::uint64_t len;
    std::uint64_t gpa;
    const ModelRegion* region;
  };

  // An update's IOVA range: inside the window, page aligned or not, short or long.
  std::pair<std::uint64_t, std::uint64_t> pick_iova_range() {
    std::uint64_t iova = kIovaBase + pick(kIovaWindow);
    if (one_in(2)) iova &= ~(kPage - 1);
    std::uint64_t size =
        one_in(3) ? pick<std::uint64_t>(1, 65) : pick<std::uint64_t>(1, 2 * kPage + 1);
    if (one_in(30)) size = 0;
    return {iova, std::min(size, kIovaBase + kIovaWindow - iova)};
  }
  // How many bytes from addr (a GPA, or a uaddr) the memory table backs, at most max;
  // max if none (an update whose first byte is not backed keeps its size).
  std::uint64_t backed_extent(std::uint64_t addr, std::uint64_t max, bool uaddr) {
    std::uint64_t k = 0;
    while (k < max && (uaddr ? m_.region_of_uaddr(addr + k) : m_.region_at(addr + k)) != nullptr)
      ++k;
    return k == 0 ? max : k;
  }
  Access pick_perm() { return one_in(20) ? Access::none : static_cast<Access>(pick(1, 4)); }

  void install(const std::vector<Piece>& pieces, Access perm) {
    for (const Piece& p : pieces) {
      std::uint64_t tag = m_.next_tag++;
      for (std::uint64_t k = 0; k < p.len; ++k)
        m_.tlb[p.iova - kIovaBase + k] = Model::TlbByte{tag, p.gpa + k, perm};
    }
  }

  template <typename Res>
  void expect_iotlb(const Res& res, std::optional<IotlbErrc> refused, std::uint64_t addr) {
    RC_LOG() << "  -> " << outcome(res) << "\n";
    RC_ASSERT(res.has_value() == !refused);
    if (!refused) return;
    RC_ASSERT(res.error().code == *refused);
    if (*refused == IotlbErrc::not_backed) RC_ASSERT(res.error().addr == addr);
  }

  // IOTLB update with the GPA (the IOTLB-GPA extension).
  void update_gpa() {
    auto [iova, size] = pick_iova_range();
    std::uint64_t gpa = pick(kGpaLimit);
    if (!m_.regions.empty() && !one_in(4)) {
      const ModelRegion& r = m_.regions[pick(m_.regions.size())];
      switch (pick(4)) {
        case 0: gpa = r.gpa; break;
        case 1: gpa = r.gpa + r.size - std::min(r.size, pick<std::uint64_t>(1, kPage + 1)); break;
        default: gpa = r.gpa + pick(r.size); break;
      }
    }
    if (!one_in(3)) size = std::min(size, backed_extent(gpa, size, false));
    Access perm = pick_perm();
    // The model: the range split at region ends; all of it must be backed.
    std::optional<IotlbErrc> refused;
    std::uint64_t bad = 0;
    std::vector<Piece> pieces;
    if (size == 0)
      refused = IotlbErrc::zero_size;
    else if (perm == Access::none)
      refused = IotlbErrc::bad_permission;
    for (std::uint64_t done = 0; !refused && done < size;) {
      const ModelRegion* r = m_.region_at(gpa + done);
      if (r == nullptr) {
        refused = IotlbErrc::not_backed;
        bad = gpa + done;
        break;
      }
      std::uint64_t len = std::min(size - done, r->gpa + r->size - (gpa + done));
      pieces.push_back(Piece{iova + done, len, gpa + done, r});
      done += len;
    }
    RC_LOG() << fmt::format("iotlb_update iova {:#x} size {:#x} gpa {:#x} {}\n", iova, size, gpa,
                            to_string(perm));
    expect_iotlb(space_.iotlb_update(Iova(iova), size, Gpa(gpa), perm), refused, bad);
    if (refused) return;
    install(pieces, perm);
    // The mirror gets the same mapping in the legacy form wherever the piece's uaddr
    // resolves back to the piece's own region.
    for (const Piece& p : pieces) {
      std::uint64_t u = p.region->uaddr + (p.gpa - p.region->gpa);
      if (m_.region_of_uaddr(u) == p.region)
        RC_ASSERT(mirror_.update_uaddr(Iova(p.iova), p.len, Uaddr(u), perm).has_value());
      else
        RC_ASSERT(mirror_.update_gpa(Iova(p.iova), p.len, Gpa(p.gpa), perm).has_value());
    }
  }

  // IOTLB update with the frontend's virtual address (legacy frontends).
  void update_uaddr() {
    auto [iova, size] = pick_iova_range();
    std::uint64_t u = 0;
    if (!m_.regions.empty() && !one_in(4)) {
      const ModelRegion& r = m_.regions[pick(m_.regions.size())];
      u = one_in(4) ? r.uaddr + r.size - std::min(r.size, pick<std::uint64_t>(1, kPage + 1))
                    : r.uaddr + pick(r.size + 64);
    } else if (one_in(2)) {
      std::size_t f = pick(kFds);
      u = uaddr_base_[f] + pick(kFdSize[f]);
    } else {
      u = pick(1ULL << 47);
    }
    if (!one_in(3)) size = std::min(size, backed_extent(u, size, true));
    Access perm = pick_perm();
    // The model: from each uaddr, the region it resolves to up to that region's end.
    std::optional<IotlbErrc> refused;
    std::uint64_t bad = 0;
    std::vector<Piece> pieces;
    if (size == 0)
      refused = IotlbErrc::zero_size;
    else if (perm == Access::none)
      refused = IotlbErrc::bad_permission;
    for (std::uint64_t done = 0; !refused && done < size;) {
      const ModelRegion* r = m_.region_of_uaddr(u + done);
      if (r == nullptr) {
        refused = IotlbErrc::not_backed;
        bad = u + done;
        break;
      }
      std::uint64_t off = u + done - r->uaddr;
      std::uint64_t len = std::min(size - done, r->size - off);
      pieces.push_back(Piece{iova + done, len, r->gpa + off, r});
      done += len;
    }
    RC_LOG() << fmt::format("iotlb_update_uaddr iova {:#x} size {:#x} uaddr {:#x} {}\n", iova, size,
                            u, to_string(perm));
    expect_iotlb(space_.iotlb_update_uaddr(Iova(iova), size, Uaddr(u), perm), refused, bad);
    if (refused) return;
    install(pieces, perm);
    for (const Piece& p : pieces)
      RC_ASSERT(mirror_.update_gpa(Iova(p.iova), p.len, Gpa(p.gpa), perm).has_value());
  }

  void invalidate() {
    std::uint64_t iova = kIovaBase - kPage + pick(kIovaWindow + 2 * kPage);
    std::uint64_t size = one_in(2) ? pick<std::uint64_t>(1, 65) : pick<std::uint64_t>(1, 3 * kPage);
    if (one_in(2) && last_len_ > 0) {  // what the device just used, or part of it
      iova = last_addr_ + pick(last_len_);
      size = pick<std::uint64_t>(1, last_len_ + 1);
    }
    switch (pick(12)) {
      case 0: size = 0; break;
      case 1: size = ~0ULL - pick(kIovaWindow); break;  // wraps: clamped at 2^64 - 1
      case 2: iova = pick(~0ULL); break;
      default: break;
    }
    RC_LOG() << fmt::format("iotlb_invalidate iova {:#x} size {:#x}\n", iova, size);
    auto res = space_.iotlb_invalidate(Iova(iova), size);
    auto mirrored = mirror_.invalidate(Iova(iova), size);
    RC_ASSERT(res.has_value() == (size != 0));
    RC_ASSERT(mirrored.has_value() == (size != 0));
    if (size == 0) {
      RC_ASSERT(res.error().code == IotlbErrc::zero_size);
      return;
    }
    std::uint64_t end = checked_add(iova, size).value_or(~0ULL);  // exclusive (or 2^64 - 1)
    bool to_top = !checked_add(iova, size);
    for (std::uint64_t k = 0; k < kIovaWindow; ++k) {
      std::uint64_t a = kIovaBase + k;
      if (a >= iova && (a < end || to_top)) m_.tlb[k] = Model::TlbByte{};
    }
  }

  // --- the data path --------------------------------------------------------------------

  Translator& pick_translator() { return one_in(2) ? batched_ : immediate_; }
  const char* name(const Translator& tr) const {
    return &tr == &batched_ ? "batched" : "immediate";
  }

  // Where an access starts: mostly at or near mapped memory, across region or entry edges.
  std::uint64_t pick_addr() {
    if (one_in(4) && last_len_ > 0) return last_addr_ + (one_in(2) ? 0 : pick(last_len_));
    if (m_.iommu) {
      if (!one_in(3)) {
        auto es = space_.iotlb().entries();
        if (!es.empty()) {
          const IotlbEntry& e = es[pick(es.size())];
          return one_in(2) ? e.iova.value : e.iova.value + e.size - pick<std::uint64_t>(1, 65);
        }
      }
      return kIovaBase - 64 + pick(kIovaWindow + 128);
    }
    if (!m_.regions.empty() && !one_in(8)) {
      const ModelRegion& r = m_.regions[pick(m_.regions.size())];
      switch (pick(5)) {
        case 0:
        case 1: return r.gpa + r.size - pick<std::uint64_t>(1, 129);  // to cross into the next
        case 2: return r.gpa - std::min(r.gpa, pick(257));
        default: return r.gpa + pick(r.size);
      }
    }
    return pick(kGpaLimit + kMiB);
  }
  // An access length; half of the time no longer than what the model can access from
  // addr (which may still cross region or entry boundaries), so that most accesses work.
  std::uint64_t pick_len(std::uint64_t addr, Access access) {
    std::uint64_t len =
        one_in(2) ? pick<std::uint64_t>(1, 257) : pick<std::uint64_t>(1, kMaxAccess + 1);
    if (one_in(2)) return len;
    std::uint64_t k = 0;
    while (k < len && m_.resolve(addr + k, access)) ++k;
    return k == 0 ? len : k;
  }

  // The first byte of [addr, addr + len) the model cannot access, with the reason.
  std::optional<std::pair<std::uint64_t, TranslateErrc>> first_failure(std::uint64_t addr,
                                                                       std::uint64_t len,
                                                                       Access access) {
    for (std::uint64_t k = 0; k < len; ++k)
      if (auto r = m_.resolve(addr + k, access); !r) return std::pair(addr + k, r.error());
    last_addr_ = addr;  // a buffer the device may well touch again
    last_len_ = len;
    return std::nullopt;
  }

  template <typename Res>
  void expect_access(const Res& res,
                     const std::optional<std::pair<std::uint64_t, TranslateErrc>>& fails) {
    RC_ASSERT(res.has_value() == !fails);
    if (!fails) return;
    RC_ASSERT(res.error().code == fails->second);
    RC_ASSERT(res.error().addr == Iova(fails->first));
  }

  // host must point at the byte b: values stored through the test's own mapping of the
  // memfd are read back through it.
  void check_same_byte(const std::uint8_t* host, Backing b) {
    std::uint8_t* mine = view_[b.fd] + b.offset;
    const std::uint8_t saved = *mine;
    for (std::uint8_t probe :
         {static_cast<std::uint8_t>(saved ^ 0x5a), static_cast<std::uint8_t>(saved ^ 0xc3)}) {
      *mine = probe;
      RC_ASSERT(*static_cast<const volatile std::uint8_t*>(host) == probe);
    }
    *mine = saved;
  }

  // Guest writes through Translator::write, 1-3 per burst; then the batch is flushed.
  void write() {
    Translator& tr = pick_translator();
    bool batched = &tr == &batched_;
    bool burst = !one_in(3);
    bool unlogged = false;  // the model wrote a byte whose page the log does not cover
    bool reported = false;  // the real code said so (batched: maybe only at the flush)
    RC_LOG() << (burst ? "burst\n" : "writes\n");
    if (burst) tr.begin_burst();
    for (std::uint64_t w = pick<std::uint64_t>(1, 4); w > 0; --w) {
      std::uint64_t addr = pick_addr();
      std::vector<std::uint8_t> data(pick_len(addr, Access::write));
      std::uint32_t x = pick<std::uint32_t>(0, 1u << 31) | 1;
      for (auto& b : data) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        b = static_cast<std::uint8_t>(x);
      }
      auto res = tr.write(Iova(addr), data);
      RC_LOG() << fmt::format("  {} write {:#x} len {:#x} -> {}\n", name(tr), addr, data.size(),
                              outcome(res));
      // The model: every byte up to the first failing one is written and logged.
      auto fails = first_failure(addr, data.size(), Access::write);
      std::uint64_t written = fails ? fails->first - addr : data.size();
      bool beyond = false;
      for (std::uint64_t k = 0; k < written; ++k) {
        Backing b = m_.resolve(addr + k, Access::write)->at;
        m_.content[b.fd][b.offset] = data[k];
        beyond |= m_.log(b);
      }
      unlogged |= beyond;
      if (fails) {
        expect_access(res, fails);  // a translation error takes precedence
      } else if (!batched) {
        RC_ASSERT(res.has_value() == !beyond);
        if (beyond) RC_ASSERT(res.error().code == TranslateErrc::log_failed);
      } else if (!res) {
        RC_ASSERT(res.error().code == TranslateErrc::log_failed);  // a full batch flushed
        reported = true;
      }
    }
    auto flushed = burst ? tr.end_burst() : tr.flush_log();
    RC_LOG() << "  " << (burst ? "end_burst" : "flush_log") << " -> " << outcome(flushed) << "\n";
    if (!batched) {
      RC_ASSERT(flushed.has_value());
    } else {
      if (!flushed) RC_ASSERT(flushed.error().code == TranslateErrc::log_failed);
      reported |= !flushed;
      RC_ASSERT(reported == unlogged);
    }
    check_content();
  }

  void read() {
    Translator& tr = pick_translator();
    std::uint64_t addr = pick_addr();
    std::vector<std::uint8_t> out(pick_len(addr, Access::read));
    auto res = tr.read(Iova(addr), out);
    RC_LOG() << fmt::format("{} read {:#x} len {:#x} -> {}\n", name(tr), addr, out.size(),
                            outcome(res));
    auto fails = first_failure(addr, out.size(), Access::read);
    expect_access(res, fails);
    if (fails) return;
    for (std::uint64_t k = 0; k < out.size(); ++k) {
      Backing b = m_.resolve(addr + k, Access::read)->at;
      RC_ASSERT(out[k] == m_.content[b.fd][b.offset]);
    }
  }

  // The number of segments a successful translation may use: at least one per run of
  // contiguous GPAs, at most one more per region change (pieces contiguous in host and
  // guest memory may be merged even across regions).
  std::pair<std::size_t, std::size_t> segment_bounds(std::uint64_t addr, std::uint64_t len,
                                                     Access access) {
    std::size_t lo = 1;
    std::size_t hi = 1;
    auto prev = m_.resolve(addr, access);
    for (std::uint64_t k = 1; k < len; ++k) {
      auto cur = m_.resolve(addr + k, access);
      bool gpa_break = cur->gpa != prev->gpa + 1;
      lo += gpa_break ? 1 : 0;
      hi += (gpa_break || m_.region_at(cur->gpa) != m_.region_at(prev->gpa)) ? 1 : 0;
      prev = cur;
    }
    return {lo, hi};
  }

  // Translates and checks every byte of the result; returns the segments on success.
  std::optional<std::span<const Segment>> checked_translate(Translator& tr, std::uint64_t addr,
                                                            std::uint64_t len, Access access) {
    auto fails = first_failure(addr, len, access);
    std::span<Segment> out(segs_);
    std::pair<std::size_t, std::size_t> bounds{0, 0};
    if (!fails) {
      bounds = segment_bounds(addr, len, access);
      if (one_in(4)) out = out.first(pick<std::size_t>(0, bounds.second + 1));
    }
    auto res = tr.translate(Iova(addr), len, access, out);
    RC_LOG() << fmt::format("{} translate {:#x} len {:#x} {} ({} segments) -> {}\n", name(tr), addr,
                            len, to_string(access), out.size(), outcome(res));
    if (!fails && out.size() < bounds.second) {
      // Too few segments given: an error unless enough pieces were merged.
      RC_ASSERT(res.has_value() || res.error().code == TranslateErrc::too_many_segments);
      if (out.size() < bounds.first) RC_ASSERT(!res.has_value());
      if (!res.has_value()) return std::nullopt;
    }
    expect_access(res, fails);
    if (fails) return std::nullopt;
    RC_ASSERT(*res >= bounds.first && *res <= bounds.second);
    std::uint64_t k = 0;
    for (const Segment& s : out.first(*res)) {
      RC_ASSERT(s.len > 0u);
      for (std::uint64_t j = 0; j < s.len; ++j, ++k) {
        RC_ASSERT(k < len);
        auto r = m_.resolve(addr + k, access);
        RC_ASSERT(s.gpa + j == Gpa(r->gpa));
        check_same_byte(s.host + j, r->at);
      }
    }
    RC_ASSERT(k == len);
    return out.first(*res);
  }

  void translate() {
    Access access = static_cast<Access>(pick(1, 4));
    std::uint64_t addr = pick_addr();
    (void)checked_translate(pick_translator(), addr, pick_len(addr, access), access);
  }

  // A device writes through translated segments itself and logs them with log_write().
  void log_write() {
    Translator& tr = pick_translator();
    std::uint64_t addr = pick_addr();
    std::uint64_t len = pick_len(addr, Access::write);
    RC_LOG() << "log_write:\n";
    auto segs = checked_translate(tr, addr, len, Access::write);
    if (!segs) return;
    bool reported = false;
    for (const Segment& s : *segs) {
      auto r = tr.log_write(s);
      if (!r) RC_ASSERT(r.error().code == TranslateErrc::log_failed);
      reported |= !r;
    }
    auto flushed = tr.flush_log();
    if (!flushed) RC_ASSERT(flushed.error().code == TranslateErrc::log_failed);
    reported |= !flushed;
    bool unlogged = false;
    for (std::uint64_t k = 0; k < len; ++k)
      unlogged |= m_.log(m_.resolve(addr + k, Access::write)->at);
    RC_ASSERT(reported == unlogged);
  }

  // The frontend takes (a range of) the log, as in a migration round.
  void take_log() {
    std::uint64_t first = 0;
    std::uint64_t count = kLogBytes * 8;
    if (one_in(2)) {
      first = pick(kLogBytes * 8);
      count = pick<std::uint64_t>(1, kLogBytes * 8 - first + 1);
    }
    RC_LOG() << fmt::format("take_log pages {:#x} count {:#x}\n", first, count);
    std::set<std::uint64_t> taken;
    auto dirty_log = space_.log();
    RC_ASSERT(dirty_log != nullptr);
    std::uint64_t n = dirty_log->fetch_and_clear(
        first, count, [&](std::uint64_t p) { RC_ASSERT(taken.insert(p).second); });
    RC_ASSERT(n == taken.size());
    std::set<std::uint64_t> expected(m_.dirty.lower_bound(first),
                                     m_.dirty.lower_bound(first + count));
    RC_ASSERT(taken == expected);
    for (std::uint64_t p : expected) m_.dirty.erase(p);
  }

  // --- whole-state checks ---------------------------------------------------------------

  void check_content() {
    for (std::size_t f = 0; f < kFds; ++f)
      RC_ASSERT(std::memcmp(view_[f], m_.content[f].data(), kFdSize[f]) == 0);
  }

  void check_log() {
    std::vector<std::uint64_t> set;
    for (std::uint64_t i = 0; i < kLogBytes; ++i)
      for (unsigned b = 0; log_bits_[i] != 0 && b < 8; ++b)
        if ((log_bits_[i] >> b) & 1u) set.push_back(i * 8 + b);
    RC_ASSERT(set == std::vector<std::uint64_t>(m_.dirty.begin(), m_.dirty.end()));
    for (std::uint64_t i = 0; i < log_storage_.size(); ++i) {
      auto at = static_cast<std::uint64_t>(log_bits_.data() - log_storage_.data());
      if (i < at || i >= at + kLogBytes) RC_ASSERT(log_storage_[i] == 0);
    }
  }

  void check_snapshot() {
    auto snap = space_.memory();
    std::vector<ModelRegion> want = m_.regions;
    std::sort(want.begin(), want.end(),
              [](const ModelRegion& a, const ModelRegion& b) { return a.gpa < b.gpa; });
    RC_ASSERT(snap->regions().size() == want.size());
    for (std::size_t i = 0; i < want.size(); ++i) {
      const Region& r = snap->regions()[i];
      RC_ASSERT(r.gpa == Gpa(want[i].gpa));
      RC_ASSERT(r.size == want[i].size);
      RC_ASSERT(r.uaddr == Uaddr(want[i].uaddr));
      RC_ASSERT(r.mmap_offset == want[i].offset);
      check_same_byte(r.host, m_.backing(want[i].gpa));
      check_same_byte(r.host + r.size - 1, m_.backing(want[i].gpa + want[i].size - 1));
    }
  }

  static bool same(const IotlbEntry& a, const IotlbEntry& b) {
    return a.iova == b.iova && a.size == b.size && a.gpa == b.gpa && a.host == b.host &&
           a.perm == b.perm;
  }

  void check_iotlb() {
    RC_ASSERT(space_.iotlb().evictions() == 0u);  // the model has no limit: none may apply
    auto entries = space_.iotlb().entries();
    // The GPA and the uaddr forms of the same mappings give identical entries.
    auto mirrored = mirror_.entries();
    RC_ASSERT(entries.size() == mirrored.size());
    for (std::size_t i = 0; i < entries.size(); ++i) RC_ASSERT(same(entries[i], mirrored[i]));
    // The entries are the maximal runs of equal tags in the model, in IOVA order.
    std::size_t i = 0;
    for (std::uint64_t x = 0; x < kIovaWindow;) {
      std::uint64_t tag = m_.tlb[x].tag;
      std::uint64_t y = x + 1;
      while (y < kIovaWindow && m_.tlb[y].tag == tag) ++y;
      if (tag != 0) {
        RC_ASSERT(i < entries.size());
        const IotlbEntry& e = entries[i++];
        RC_ASSERT(e.iova == Iova(kIovaBase + x));
        RC_ASSERT(e.size == y - x);
        RC_ASSERT(e.gpa == Gpa(m_.tlb[x].gpa));
        RC_ASSERT(e.perm == m_.tlb[x].perm);
        // The host pointer: inside the one region of the GPA range, at its bytes.
        const ModelRegion* r = m_.region_at(e.gpa.value);
        RC_ASSERT(r != nullptr);
        RC_ASSERT(r->has_gpa(e.gpa.value + e.size - 1));
        check_same_byte(e.host, m_.backing(e.gpa.value));
        check_same_byte(e.host + e.size - 1, m_.backing(e.gpa.value + e.size - 1));
      }
      x = y;
    }
    RC_ASSERT(i == entries.size());
  }

  std::array<UniqueFd, kFds> fds_;
  std::array<std::uint8_t*, kFds> view_{};
  std::array<std::uint64_t, kFds> uaddr_base_{};
  std::uint64_t odd_uaddrs_ = 0;
  std::uint64_t last_addr_ = 0;  // the last access
  std::uint64_t last_len_ = 0;
  std::vector<std::uint8_t> log_storage_ = std::vector<std::uint8_t>(kLogBytes + 2 * kLogGuard, 0);
  std::span<std::uint8_t> log_bits_;
  Model m_;
  std::vector<Segment> segs_ = std::vector<Segment>(kMaxAccess);
  DeviceIotlb mirror_{IotlbLimits{.max_entries = 1 << 17}};
  AddressSpace space_{MemoryLimits{}, IotlbLimits{.max_entries = 1 << 17}};
  Translator batched_{space_, LogMode::batched};
  Translator immediate_{space_, LogMode::immediate};
};

RC_GTEST_PROP(TranslateModel, AgreesWithReferenceModel, ()) {
  Harness h;
  h.start();
  const auto steps = pick(1, 61);
  for (int i = 0; i < steps; ++i) h.step();
  h.finish();
}

}  // namespace
}  // namespace vhostkit
