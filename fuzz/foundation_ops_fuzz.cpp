// Fuzz target: the input is a sequence of foundation-layer operations with hostile
// operands (sizes, mmap offsets, GPAs, uaddrs, IOVAs, lengths, permissions, log sizes and
// offsets): SET_MEM_TABLE, ADD/REM_MEM_REG, IOTLB updates in both forms, invalidations,
// flushes, the IOMMU and logging switches, log attachment (caller memory or a mapped
// fd), log harvesting, and data-path reads, writes, translations and direct-write
// logging through batched and immediate translators.
//
// Guest memory comes from three small memfds created once; the target maps each of them
// itself and keeps a shadow copy. Beyond the sanitizers it checks, after every step:
//   - every translated segment lies inside regions of the translator's snapshot, at the
//     host address the region maps its GPA to;
//   - a write changes exactly the memfd bytes its translation names (the memfds are
//     compared with the shadow), a failed write exactly its translated prefix, a read
//     returns the shadow's bytes;
//   - after a logged write every in-range page of it (and of its aliases) is dirty, and
//     no byte of the log buffers outside every log ever attached is touched;
//   - IOTLB entries are sorted, disjoint, within the limit, each inside one region at
//     the region's host address; a memory-table change leaves the IOTLB empty;
//   - after each input no fd and no guest memory mapping is left behind.
//
// Input layout: 3 header bytes (region limit, IOTLB entry limit, translator modes), then
// operations: one opcode byte followed by its operands; a short input reads as zeros.
#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "fuzz_input.h"
#include "vhostkit/translate.h"

namespace {

using namespace vhostkit;
using fuzzing::Input;

constexpr std::size_t kFds = 3;
// Small guest memory files; one of a size that is not a multiple of the page size.
constexpr std::array<std::uint64_t, kFds> kFdSize = {8 * 1024, 64 * 1024 + 100, 128 * 1024};
constexpr std::uint64_t kLogFileSize = 8 * 1024;        // the fd behind DirtyLog::map
constexpr std::size_t kLogBuffer = 4096;                // the memory behind DirtyLog::over
constexpr std::size_t kMaxIo = 9000;                    // longest read or write
constexpr std::uint64_t kUaddrBase = 0x7f00'0000'0000;  // frontend address of memfd 0

// The target's own checks are not what the fuzzer should be steered by (and their byte
// loops cost time when instrumented): they are marked no_sanitize("coverage").
void check(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "foundation_ops_fuzz: invariant violated: %s\n", what);
  std::abort();
}

[[clang::no_sanitize("coverage")]] std::size_t count_fds() {
  std::size_t n = 0;
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (::readdir(d) != nullptr) ++n;
    ::closedir(d);
  }
  return n;
}

// Number of mappings of the guest memfds (their names start with "vk-fuzz-guest").
[[clang::no_sanitize("coverage")]] std::size_t count_guest_mappings() {
  std::size_t n = 0;
  if (FILE* f = std::fopen("/proc/self/maps", "r")) {
    char line[512];
    while (std::fgets(line, sizeof line, f) != nullptr)
      if (std::strstr(line, "memfd:vk-fuzz-guest") != nullptr) ++n;
    std::fclose(f);
  }
  return n;
}

// State that lives for the whole process: the memfds and the target's own views of them.
struct Files {
  std::array<int, kFds> fd{};
  std::array<std::uint64_t, kFds> ino{};
  std::array<std::uint8_t*, kFds> view{};
  std::array<std::vector<std::uint8_t>, kFds> initial;  // content at the start of an input
  int log_fd = -1;
  std::uint8_t* log_view = nullptr;
  int dir_fd = -1;  // an open fd that is not a regular file
  // Per-input workspace, allocated once.
  std::array<std::vector<std::uint8_t>, kFds> shadow;  // expected content of the memfds
  bool dirty = true;                                   // memfds changed since their reset
  std::vector<Segment> segs = std::vector<Segment>(kMaxIo + 1);

  Files() {
    for (std::size_t i = 0; i < kFds; ++i) {
      fd[i] = ::memfd_create("vk-fuzz-guest", MFD_CLOEXEC);
      check(fd[i] >= 0 && ::ftruncate(fd[i], static_cast<off_t>(kFdSize[i])) == 0, "memfd");
      struct stat st {};
      check(::fstat(fd[i], &st) == 0, "fstat");
      ino[i] = static_cast<std::uint64_t>(st.st_ino);
      view[i] = map(fd[i], kFdSize[i]);
      initial[i].resize(kFdSize[i]);
      for (std::uint64_t k = 0; k < kFdSize[i]; ++k)
        initial[i][k] = static_cast<std::uint8_t>((k * 131) ^ (k >> 10) ^ (i * 85));
      shadow[i] = initial[i];
    }
    log_fd = ::memfd_create("vk-fuzz-log", MFD_CLOEXEC);
    check(log_fd >= 0 && ::ftruncate(log_fd, kLogFileSize) == 0, "log memfd");
    log_view = map(log_fd, kLogFileSize);
    dir_fd = ::open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    check(dir_fd >= 0, "open /");
  }

  static std::uint8_t* map(int f, std::uint64_t size) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, f, 0);
    check(p != MAP_FAILED, "mmap");
    return static_cast<std::uint8_t*>(p);
  }

  // Puts the initial content back (if anything wrote) so every input starts alike.
  void reset() {
    if (dirty) {
      for (std::size_t i = 0; i < kFds; ++i) {
        std::memcpy(view[i], initial[i].data(), kFdSize[i]);
        std::memcpy(shadow[i].data(), initial[i].data(), kFdSize[i]);
      }
      dirty = false;
    }
    std::memset(log_view, 0, kLogFileSize);
  }

  // Which memfd a region maps.
  [[nodiscard]] std::size_t index_of(const Region& r) const {
    for (std::size_t i = 0; i < kFds; ++i)
      if (r.file_ino == ino[i]) return i;
    check(false, "a region maps a file that is not a guest memfd");
    return 0;
  }
};

// FOUNDATION_OPS_TRACE=1 in the environment prints each operation and its outcome.
bool tracing() {
  static const bool on = std::getenv("FOUNDATION_OPS_TRACE") != nullptr;
  return on;
}
template <typename... Args>
void trace(fmt::format_string<Args...> f, Args&&... args) {
  if (tracing()) fmt::print(stderr, f, std::forward<Args>(args)...);
}
template <typename Res>
const char* outcome(const Res& r) {
  return r ? "ok" : to_string(r.error().code);
}
std::string describe(const RegionSpec& r) {
  return fmt::format("{{fd {} offset {:#x} size {:#x} gpa {:#x} uaddr {:#x}}}", r.fd.get(),
                     r.mmap_offset, r.size, r.gpa.value, r.uaddr.value);
}

Files& files() {
  static Files f;
  return f;
}

// Calls fn(region, offset in region, length, offset in segment) for each region piece of
// a translated segment, checking that every piece is where the snapshot maps its GPA.
template <typename Fn>
[[clang::no_sanitize("coverage")]] void for_each_piece(const MemorySnapshot& mem, const Segment& s,
                                                       Fn&& fn) {
  check(s.len > 0, "empty segment");
  for (std::uint64_t done = 0; done < s.len;) {
    const Region* r = mem.find(s.gpa + done);
    check(r != nullptr, "segment outside every region");
    std::uint64_t off = (s.gpa + done) - r->gpa;
    check(s.host + done == r->host + off, "segment host is not the region's host");
    std::uint64_t take = std::min(s.len - done, r->size - off);
    fn(*r, off, take, done);
    done += take;
  }
}

class Run {
 public:
  explicit Run(Input in)
      : in_(in),
        limits_{.max_regions = 1 + static_cast<std::size_t>(in_.take<std::uint8_t>() % 8)},
        iotlb_limits_{.max_entries = 1 + static_cast<std::size_t>(in_.take<std::uint8_t>() % 64)},
        space_(limits_, iotlb_limits_) {
    files().reset();
    auto modes = in_.take<std::uint8_t>();
    for (std::size_t i = 0; i < 2; ++i)
      tr_[i] = std::make_unique<Translator>(space_, mode(modes >> i));
  }

  void run() {
    while (!in_.empty()) step();
    check_guards();
  }

 private:
  static LogMode mode(unsigned bit) { return (bit & 1) ? LogMode::batched : LogMode::immediate; }

  // --- hostile operands -------------------------------------------------------------

  // A 64-bit value: small, page-sized, near 2^64, a power of two +- a little, or raw.
  std::uint64_t number() {
    auto sel = in_.take<std::uint8_t>();
    if (sel < 100) return static_cast<std::uint64_t>(in_.take<std::uint16_t>()) * 16;
    if (sel < 160) return static_cast<std::uint64_t>(in_.take<std::uint8_t>()) * 4096;
    if (sel < 190) return ~0ULL - in_.take<std::uint16_t>();
    if (sel < 230) {
      auto b = in_.take<std::uint8_t>();
      auto d = static_cast<std::int8_t>(in_.take<std::uint8_t>());
      return (1ULL << (b % 64)) + static_cast<std::uint64_t>(static_cast<std::int64_t>(d));
    }
    return in_.take<std::uint64_t>();
  }
  std::int64_t delta() { return static_cast<std::int16_t>(in_.take<std::uint16_t>()); }

  // A GPA: hostile, or near a region of the current table.
  std::uint64_t gpa() {
    auto sel = in_.take<std::uint8_t>();
    auto mem = space_.memory();
    if (sel < 160 && !mem->empty()) {  // bit 0: start or end; the rest: which region
      const Region& r = mem->regions()[(sel >> 1) % mem->regions().size()];
      return (sel & 1 ? r.gpa_end().value : r.gpa.value) + static_cast<std::uint64_t>(delta());
    }
    return number();
  }
  // A frontend address: hostile, or near a region's.
  std::uint64_t uaddr() {
    auto sel = in_.take<std::uint8_t>();
    auto mem = space_.memory();
    if (sel < 160 && !mem->empty()) {
      const Region& r = mem->regions()[sel % mem->regions().size()];
      return r.uaddr.value + static_cast<std::uint64_t>(delta());
    }
    return number();
  }
  // A device address: hostile, or near an IOTLB entry (IOMMU on) or a region (off).
  std::uint64_t device_addr() {
    auto sel = in_.take<std::uint8_t>();
    if (sel < 128 && space_.iommu()) {
      auto es = space_.iotlb().entries();
      if (!es.empty()) {
        const IotlbEntry& e = es[(sel >> 1) % es.size()];
        return (sel & 1 ? e.iova.value + e.size : e.iova.value) +
               static_cast<std::uint64_t>(delta());
      }
    }
    if (sel < 160) return gpa();
    return number();
  }
  Access perm() {
    auto v = in_.take<std::uint8_t>();
    return static_cast<Access>(v < 240 ? v % 4 : v);  // rarely not a valid access value
  }

  RegionSpec region() {
    Files& f = files();
    RegionSpec s;
    auto which = in_.take<std::uint8_t>();
    std::size_t i = which % kFds;
    if (which < 240)
      s.fd = UniqueFd(::dup(f.fd[i]));
    else if (which < 248)
      s.fd = UniqueFd(-1);
    else
      s.fd = UniqueFd(::dup(f.dir_fd));
    auto sel = in_.take<std::uint8_t>();
    // Mostly a sane region of the file, otherwise any numbers.
    s.mmap_offset = sel < 200 ? (number() % kFdSize[i]) & (sel < 150 ? ~4095ULL : ~0ULL) : number();
    s.size = sel < 200 ? 1 + number() % kFdSize[i] : number();
    s.gpa = Gpa(sel < 200 ? number() & ~4095ULL : number());
    s.uaddr = Uaddr((sel & 3) != 0 ? kUaddrBase + i * 0x1'0000'0000 + s.mmap_offset : number());
    return s;
  }

  // --- operations ---------------------------------------------------------------------

  void step() {
    switch (in_.take<std::uint8_t>() % 20) {
      case 0: {
        std::vector<RegionSpec> specs;
        for (unsigned n = in_.take<std::uint8_t>() % 5; n > 0; --n) specs.push_back(region());
        trace("set_mem_table");
        for (const auto& r : specs) trace(" {}", describe(r));
        memory_result(space_.set_mem_table(std::move(specs)));
        break;
      }
      case 1: {
        RegionSpec r = region();
        trace("add_region {}", describe(r));
        memory_result(space_.add_region(std::move(r)));
        break;
      }
      case 2: {
        auto mem = space_.memory();
        auto sel = in_.take<std::uint8_t>();
        Gpa g;
        std::uint64_t size = 0;
        if (sel < 128 && !mem->empty()) {
          const Region& r = mem->regions()[sel % mem->regions().size()];
          g = r.gpa;
          size = r.size;
        } else {
          g = Gpa(gpa());
          size = number();
        }
        trace("remove_region gpa {:#x} size {:#x}", g.value, size);
        memory_result(space_.remove_region(g, size));
        break;
      }
      case 3:
        trace("clear_memory");
        space_.clear_memory();
        memory_result(Result<void, MemoryError>{});
        break;
      case 4: {
        auto iova = Iova(device_addr());
        auto size = number();
        auto target = Gpa(gpa());  // operands are read in order, one statement each
        auto p = perm();
        auto before = space_.iotlb().entries();
        auto evictions = space_.iotlb().evictions();
        auto r = space_.iotlb_update(iova, size, target, p);
        trace("iotlb_update iova {:#x} size {:#x} gpa {:#x} perm {} -> {}\n", iova.value, size,
              target.value, static_cast<int>(p), outcome(r));
        check_iotlb(false);
        check_update(before, evictions, r.has_value(), iova, size, p, target);
        break;
      }
      case 5: {
        auto iova = Iova(device_addr());
        auto size = number();
        auto target = Uaddr(uaddr());
        auto p = perm();
        auto before = space_.iotlb().entries();
        auto evictions = space_.iotlb().evictions();
        auto r = space_.iotlb_update_uaddr(iova, size, target, p);
        trace("iotlb_update_uaddr iova {:#x} size {:#x} uaddr {:#x} perm {} -> {}\n", iova.value,
              size, target.value, static_cast<int>(p), outcome(r));
        check_iotlb(false);
        check_update(before, evictions, r.has_value(), iova, size, p, std::nullopt);
        break;
      }
      case 6: {
        auto iova = Iova(device_addr());
        auto size = number();
        auto before = space_.iotlb().entries();
        auto evictions = space_.iotlb().evictions();
        auto r = space_.iotlb_invalidate(iova, size);
        trace("iotlb_invalidate iova {:#x} size {:#x} -> {}\n", iova.value, size, outcome(r));
        check_iotlb(false);
        if (!r) {
          check(same_entries(before, space_.iotlb().entries()),
                "a refused invalidation changed entries");
        } else {
          std::uint64_t last = iova.checked_end(size - 1) ? iova.value + (size - 1) : ~0ULL;
          // Splitting an entry may push the IOTLB over its limit: then the oldest go.
          if (space_.iotlb().evictions() == evictions)
            check(outside_kept(before, iova.value, last),
                  "invalidation lost entries outside its range");
          for (const IotlbEntry& e : space_.iotlb().entries())
            check(e.iova.value + (e.size - 1) < iova.value || e.iova.value > last,
                  "an entry survived its invalidation");
        }
        break;
      }
      case 7:
        trace("iotlb_flush\n");
        space_.iotlb_flush();
        check_iotlb(true);
        break;
      case 8: {
        bool on = in_.take<std::uint8_t>() & 1;
        trace("set_iommu {}\n", on);
        space_.set_iommu(on);
        break;
      }
      case 9: set_log(); break;
      case 10: {
        bool on = in_.take<std::uint8_t>() & 1;
        trace("set_logging {}\n", on);
        space_.set_logging(on);
        break;
      }
      case 11:
      case 12: write(); break;
      case 13: read(); break;
      case 14: translate(); break;
      case 15: log_write(); break;
      case 16: take_log(); break;
      case 17: {  // a queue stops and another starts (its batch is flushed on the way)
        std::size_t i = in_.take<std::uint8_t>() & 1;
        LogMode m = mode(in_.take<std::uint8_t>());
        trace("new translator {} ({})\n", i, m == LogMode::batched ? "batched" : "immediate");
        tr_[i].reset();
        tr_[i] = std::make_unique<Translator>(space_, m);
        break;
      }
      case 18:
        trace("synchronize\n");
        check(space_.synchronize(std::chrono::milliseconds(0)), "synchronize");
        break;
      default: {  // a translator touches something twice, which may hit its cache
        Translator& t = translator();
        auto addr = Iova(device_addr());
        auto len = 1 + in_.take<std::uint8_t>();
        for (int k = 0; k < 2; ++k) {
          auto n = t.translate(addr, len, Access::read, segs_);
          trace("translate {:#x} len {:#x} read -> {}\n", addr.value, len, outcome(n));
          if (n) check_segments(t, std::span(segs_.data(), *n), len);
        }
        break;
      }
    }
  }

  void memory_result(const Result<void, MemoryError>& r) {
    trace(" -> {}\n", outcome(r));
    check_iotlb(r.has_value());  // a memory-table change leaves the IOTLB empty
  }

  void set_log() {
    auto sel = in_.take<std::uint8_t>();
    if (sel < 100) {  // caller memory at some offset
      std::size_t off = in_.take<std::uint8_t>() % 64;
      std::size_t size = 1 + in_.take<std::uint16_t>() % (kLogBuffer - 1);
      std::memset(buffer_used_.data() + off, 1, size);
      auto r = space_.set_log(DirtyLog::over(std::span(log_buffer_).subspan(off, size)));
      trace("set_log memory at {} size {:#x} -> {}\n", off, size, outcome(r));
    } else if (sel < 200) {  // SET_LOG_BASE: an fd, a size and an offset
      auto size = number();
      auto offset = number();
      auto log = DirtyLog::map(UniqueFd(::dup(files().log_fd)), size, offset);
      trace("map log size {:#x} offset {:#x} -> {}\n", size, offset, outcome(log));
      if (!log) return;
      if (offset < kLogFileSize)
        std::memset(file_used_.data() + offset, 1, std::min(size, kLogFileSize - offset));
      auto r = space_.set_log(std::move(*log));
      trace("set_log -> {}\n", outcome(r));
    } else {
      trace("set_log none\n");
      (void)space_.set_log(nullptr);
    }
  }

  Translator& translator() { return *tr_[in_.take<std::uint8_t>() & 1]; }

  // Checks segments against the translator's snapshot; returns the bytes they cover.
  [[clang::no_sanitize("coverage")]] std::uint64_t check_segments(Translator& t,
                                                                  std::span<const Segment> segs,
                                                                  std::uint64_t len) {
    std::uint64_t total = 0;
    for (const Segment& s : segs) {
      for_each_piece(*t.memory(), s,
                     [](const Region&, std::uint64_t, std::uint64_t, std::uint64_t) {});
      total += s.len;
    }
    check(total == len, "segments do not add up to the length");
    return total;
  }

  // The segments an access of [addr, addr + len) reaches before it fails, as translate()
  // sees them, and the error it fails with.
  std::pair<std::span<const Segment>, std::optional<TranslateError>> predict(Translator& t,
                                                                             Iova addr,
                                                                             std::uint64_t len,
                                                                             Access access) {
    if (len == 0) return {{}, std::nullopt};
    auto r = t.translate(addr, len, access, segs_);
    if (r) return {std::span(segs_.data(), *r), std::nullopt};
    TranslateError e = r.error();
    check(e.code != TranslateErrc::too_many_segments, "more segments than bytes");
    if (e.code == TranslateErrc::range_overflow || e.addr == addr) return {{}, e};
    auto prefix = t.translate(addr, e.addr - addr, access, segs_);
    check(prefix.has_value(), "the prefix before a failure does not translate");
    return {std::span(segs_.data(), *prefix), e};
  }

  // Calls fn(memfd, file offset, length, offset in the access) for every piece.
  template <typename Fn>
  void for_each_file_piece(Translator& t, std::span<const Segment> segs, Fn&& fn) {
    std::uint64_t at = 0;
    for (const Segment& s : segs) {
      for_each_piece(*t.memory(), s,
                     [&](const Region& r, std::uint64_t off, std::uint64_t n, std::uint64_t done) {
                       fn(files().index_of(r), r.mmap_offset + off, n, at + done);
                     });
      at += s.len;
    }
  }

  void expect_same_failure(const std::optional<TranslateError>& predicted,
                           const TranslateError* actual) {
    if (!predicted) {
      check(actual == nullptr || actual->code == TranslateErrc::log_failed,
            "access failed although it translates");
      return;
    }
    check(actual != nullptr, "access succeeded although it does not translate");
    check(actual->code == predicted->code && actual->addr == predicted->addr,
          "access and translation fail differently");
  }

  void write() {
    Translator& t = translator();
    auto addr = Iova(device_addr());
    io_.resize(in_.take<std::uint16_t>() % (kMaxIo + 1));
    auto seed = in_.take<std::uint8_t>();
    for (std::size_t k = 0; k < io_.size(); ++k) io_[k] = static_cast<std::uint8_t>(seed + k * 7);
    bool burst = in_.take<std::uint8_t>() & 1;
    if (burst) t.begin_burst();
    auto [segs, failure] = predict(t, addr, io_.size(), Access::write);
    files().dirty = true;
    for_each_file_piece(t, segs,
                        [&](std::size_t f, std::uint64_t off, std::uint64_t n, std::uint64_t at) {
                          std::memcpy(shadow_[f].data() + off, io_.data() + at, n);
                        });
    auto w = t.write(addr, io_);
    auto flushed = burst ? t.end_burst() : t.flush_log();
    trace("write {:#x} len {:#x} -> {}, flush -> {}\n", addr.value, io_.size(), outcome(w),
          outcome(flushed));
    check(flushed || flushed.error().code == TranslateErrc::log_failed, "flush failed oddly");
    expect_same_failure(failure, w ? nullptr : &w.error());
    check_memory();
    check_dirty(t, segs);
  }

  void read() {
    Translator& t = translator();
    auto addr = Iova(device_addr());
    io_.assign(in_.take<std::uint16_t>() % (kMaxIo + 1), 0);
    auto [segs, failure] = predict(t, addr, io_.size(), Access::read);
    auto r = t.read(addr, io_);
    trace("read {:#x} len {:#x} -> {}\n", addr.value, io_.size(), outcome(r));
    expect_same_failure(failure, r ? nullptr : &r.error());
    if (!r) return;
    for_each_file_piece(
        t, segs, [&](std::size_t f, std::uint64_t off, std::uint64_t n, std::uint64_t at) {
          check(std::memcmp(shadow_[f].data() + off, io_.data() + at, n) == 0, "read wrong bytes");
        });
  }

  void translate() {
    Translator& t = translator();
    auto addr = Iova(device_addr());
    auto len = std::max<std::uint64_t>(number(), 1);
    auto access = static_cast<Access>(1 + in_.take<std::uint8_t>() % 3);
    auto room = in_.take<std::uint8_t>() % 20;
    auto out = std::span(segs_).first(room == 0 ? segs_.size() : room - 1);
    auto n = t.translate(addr, len, access, out);
    trace("translate {:#x} len {:#x} access {} room {} -> {}\n", addr.value, len,
          static_cast<int>(access), out.size(), outcome(n));
    if (n) {
      check(*n <= out.size(), "more segments than room");
      check_segments(t, out.first(*n), len);
    }
  }

  // A device writes through translated segments itself, then logs them.
  void log_write() {
    Translator& t = translator();
    auto addr = Iova(device_addr());
    auto len = std::max<std::uint64_t>(number(), 1);
    auto n = t.translate(addr, len, Access::write, segs_);
    trace("log_write: translate {:#x} len {:#x} -> {}\n", addr.value, len, outcome(n));
    if (!n) return;
    auto segs = std::span<const Segment>(segs_.data(), *n);
    check_segments(t, segs, len);
    for (const Segment& s : segs) (void)t.log_write(s);
    (void)t.flush_log();
    check_dirty(t, segs);
  }

  void take_log() {
    auto log = space_.log();
    if (!log) return;
    auto first = number();
    auto count = number();
    std::uint64_t seen = 0;
    std::uint64_t n = log->fetch_and_clear(first, count, [&](std::uint64_t) { ++seen; });
    trace("take_log first {:#x} count {:#x}: {} dirty\n", first, count, n);
    check(n == seen, "fetch_and_clear miscounted");
  }

  // --- invariants ---------------------------------------------------------------------

  [[clang::no_sanitize("coverage")]] void check_memory() {
    for (std::size_t i = 0; i < kFds; ++i)
      check(std::memcmp(files().view[i], shadow_[i].data(), kFdSize[i]) == 0,
            "guest memory differs from the shadow: a write landed where it should not");
  }

  // Every page written through segs (and every alias of it) that the log covers is dirty.
  [[clang::no_sanitize("coverage")]] void check_dirty(Translator& t,
                                                      std::span<const Segment> segs) {
    auto log = space_.log();
    if (!t.logging() || !log) return;
    const MemorySnapshot& mem = *t.memory();
    auto dirty = [&](Gpa g, std::uint64_t n) {
      for (std::uint64_t p = g.page(); p <= (g.value + (n - 1)) >> 12; ++p)
        check(p >= log->size_bytes() * 8 || log->test(p), "a written page is not dirty");
    };
    for (const Segment& s : segs) {
      for_each_piece(mem, s,
                     [&](const Region& r, std::uint64_t off, std::uint64_t n, std::uint64_t) {
                       // The same file bytes at every GPA of every region that maps them.
                       std::uint64_t lo = r.mmap_offset + off;
                       std::uint64_t hi = lo + n;
                       for (const Region& a : mem.regions()) {
                         if (a.file_ino != r.file_ino || a.file_dev != r.file_dev) continue;
                         std::uint64_t from = std::max(lo, a.mmap_offset);
                         std::uint64_t to = std::min(hi, a.mmap_offset + a.size);
                         if (from < to) dirty(a.gpa + (from - a.mmap_offset), to - from);
                       }
                     });
    }
  }

  static bool same(const IotlbEntry& a, const IotlbEntry& b) {
    return a.iova == b.iova && a.size == b.size && a.gpa == b.gpa && a.host == b.host &&
           a.perm == b.perm;
  }
  [[clang::no_sanitize("coverage")]] static bool same_entries(const std::vector<IotlbEntry>& a,
                                                              const std::vector<IotlbEntry>& b) {
    return std::equal(a.begin(), a.end(), b.begin(), b.end(), same);
  }

  // Whatever the entries in `before` had outside [lo, last] is still there: the same
  // translation, trimmed at the range but otherwise untouched (entries never merge).
  [[clang::no_sanitize("coverage")]] bool outside_kept(const std::vector<IotlbEntry>& before,
                                                       std::uint64_t lo, std::uint64_t last) {
    auto after = space_.iotlb().entries();
    auto kept = [&](const IotlbEntry& e, std::uint64_t a, std::uint64_t b) {
      IotlbEntry want = e;
      want.iova = Iova(a);
      want.gpa = e.gpa + (a - e.iova.value);
      want.host = e.host + (a - e.iova.value);
      want.size = b - a + 1;
      return std::any_of(after.begin(), after.end(),
                         [&](const IotlbEntry& x) { return same(x, want); });
    };
    for (const IotlbEntry& e : before) {
      std::uint64_t e_last = e.iova.value + (e.size - 1);
      if (e.iova.value < lo && !kept(e, e.iova.value, std::min(e_last, lo - 1))) return false;
      if (e_last > last && !kept(e, std::max(e.iova.value, last + 1), e_last)) return false;
    }
    return true;
  }

  // After an IOTLB update: refused, it changed nothing; installed, [iova, iova + size)
  // is covered exactly by new entries with its permission (starting at the GPA given),
  // and everything outside is as before unless entries had to be evicted.
  [[clang::no_sanitize("coverage")]] void check_update(const std::vector<IotlbEntry>& before,
                                                       std::uint64_t evictions, bool installed,
                                                       Iova iova, std::uint64_t size, Access p,
                                                       std::optional<Gpa> gpa) {
    auto after = space_.iotlb().entries();
    if (!installed) {
      check(same_entries(before, after), "a refused update changed entries");
      return;
    }
    std::uint64_t last = iova.value + (size - 1);
    std::uint64_t covered = 0;
    for (const IotlbEntry& e : after) {
      if (e.iova.value + (e.size - 1) < iova.value || e.iova.value > last) continue;
      check(e.iova.value >= iova.value && e.iova.value + (e.size - 1) <= last,
            "an entry straddles the updated range");
      check(e.perm == p, "an updated entry has another permission");
      if (gpa) check(e.gpa == *gpa + (e.iova - iova), "an updated entry has another GPA");
      covered += e.size;
    }
    check(covered == size, "the updated range is not covered exactly");
    if (space_.iotlb().evictions() == evictions)
      check(outside_kept(before, iova.value, last), "an update lost entries outside its range");
  }

  [[clang::no_sanitize("coverage")]] void check_iotlb(bool expect_empty) {
    auto es = space_.iotlb().entries();
    check(!expect_empty || es.empty(), "IOTLB entries survived a memory-table change");
    check(es.size() <= iotlb_limits_.max_entries, "IOTLB over its limit");
    auto mem = space_.memory();
    for (std::size_t i = 0; i < es.size(); ++i) {
      const IotlbEntry& e = es[i];
      check(e.size > 0 && e.perm != Access::none, "empty IOTLB entry");
      if (i > 0)
        check(es[i - 1].iova.value + (es[i - 1].size - 1) < e.iova.value,
              "IOTLB entries out of order or overlapping");
      const Region* r = mem->find(e.gpa);
      check(r != nullptr, "IOTLB entry outside guest memory");
      std::uint64_t off = e.gpa - r->gpa;
      check(e.size <= r->size - off, "IOTLB entry crosses a region end");
      check(e.host == r->host + off, "IOTLB entry host is not the region's");
    }
  }

  [[clang::no_sanitize("coverage")]] void check_guards() {
    for (std::size_t k = 0; k < log_buffer_.size(); ++k)
      check(buffer_used_[k] || log_buffer_[k] == 0, "write outside every attached log");
    for (std::size_t k = 0; k < kLogFileSize; ++k)
      check(file_used_[k] || files().log_view[k] == 0, "write outside every mapped log");
  }

  Input in_;
  MemoryLimits limits_;
  IotlbLimits iotlb_limits_;
  // Declared before the address space and the translators, which may hold logs over it.
  std::vector<std::uint8_t> log_buffer_ = std::vector<std::uint8_t>(kLogBuffer + 64, 0);
  std::vector<std::uint8_t> buffer_used_ = std::vector<std::uint8_t>(kLogBuffer + 64, 0);
  std::vector<std::uint8_t> file_used_ = std::vector<std::uint8_t>(kLogFileSize, 0);
  std::array<std::vector<std::uint8_t>, kFds>& shadow_ = files().shadow;
  std::vector<Segment>& segs_ = files().segs;
  std::vector<std::uint8_t> io_;
  AddressSpace space_;
  std::array<std::unique_ptr<Translator>, 2> tr_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  (void)files();
  const std::size_t fds = count_fds();
  { Run(Input{data, size}).run(); }
  check(count_fds() == fds, "an fd leaked");
  // Only the target's own views of the guest memfds remain mapped.
  check(count_guest_mappings() == kFds, "a guest memory mapping leaked");
  return 0;
}
