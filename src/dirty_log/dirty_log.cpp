// Dirty log: mapping, atomic marking, write-combining batch.
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include <fmt/format.h>

#include "vhostkit/dirty_log.h"

namespace vhostkit {

namespace {

std::atomic<std::uint64_t> g_drop_one_in{0};
std::atomic<std::uint64_t> g_writes{0};
std::atomic<std::uint64_t> g_dropped{0};

void fault_from_environment() {
  static std::once_flag once;
  std::call_once(once, [] {
    const char* v = std::getenv("VHOSTKIT_FAULT_DROP_LOG_ONE_IN");
    if (v == nullptr || *v == '\0') return;
    std::uint64_t n = std::strtoull(v, nullptr, 10);
    if (n == 0) return;
    std::fprintf(stderr,
                 "vhostkit: FAULT INJECTION ON: dropping one dirty-log write in %llu "
                 "(VHOSTKIT_FAULT_DROP_LOG_ONE_IN); migration will lose data\n",
                 static_cast<unsigned long long>(n));
    set_fault_drop_one_in(n);
  });
}

// True if this write is to be dropped. One relaxed load when fault injection is off.
inline bool drop_this_write() {
  std::uint64_t n = g_drop_one_in.load(std::memory_order_relaxed);
  if (n == 0) [[likely]]
    return false;
  if (g_writes.fetch_add(1, std::memory_order_relaxed) % n != n - 1) return false;
  g_dropped.fetch_add(1, std::memory_order_relaxed);
  return true;
}

}  // namespace

void set_fault_drop_one_in(std::uint64_t n) {
  g_writes.store(0, std::memory_order_relaxed);
  g_drop_one_in.store(n, std::memory_order_relaxed);
}

std::uint64_t fault_dropped_writes() {
  return g_dropped.load(std::memory_order_relaxed);
}

const char* to_string(DirtyLogErrc e) {
  switch (e) {
    case DirtyLogErrc::bad_fd: return "bad dirty log fd";
    case DirtyLogErrc::zero_size: return "dirty log has zero size";
    case DirtyLogErrc::offset_overflow: return "dirty log offset + size overflows";
    case DirtyLogErrc::beyond_file: return "dirty log extends beyond the end of its file";
    case DirtyLogErrc::mmap_failed: return "mmap of dirty log failed";
    case DirtyLogErrc::too_small: return "dirty log too small for guest memory";
    case DirtyLogErrc::out_of_range: return "write to a guest page beyond the dirty log";
  }
  return "unknown dirty log error";
}

std::string DirtyLogError::message() const {
  std::string m = fmt::format("{} (value {:#x}, limit {:#x})", to_string(code), value, limit);
  if (sys_errno != 0) m += fmt::format(": {}", std::strerror(sys_errno));
  return m;
}

DirtyLog::DirtyLog(std::uint8_t* bits, std::uint64_t size, void* map_base, std::size_t map_len)
    : bits_(bits), size_(size), map_base_(map_base), map_len_(map_len) {}

DirtyLog::~DirtyLog() {
  if (map_base_ != nullptr) ::munmap(map_base_, map_len_);
}

Result<std::shared_ptr<DirtyLog>, DirtyLogError> DirtyLog::map(UniqueFd fd, std::uint64_t size,
                                                               std::uint64_t offset) {
  fault_from_environment();
  if (size == 0) return unexpected(DirtyLogError{DirtyLogErrc::zero_size});
  auto end = checked_add(offset, size);
  if (!end || *end > static_cast<std::uint64_t>(INT64_MAX))
    return unexpected(DirtyLogError{DirtyLogErrc::offset_overflow, offset, size});
  struct stat st {};
  if (!fd.valid() || ::fstat(fd.get(), &st) != 0)
    return unexpected(DirtyLogError{DirtyLogErrc::bad_fd, 0, 0, fd.valid() ? errno : EBADF});
  if (!S_ISREG(st.st_mode)) return unexpected(DirtyLogError{DirtyLogErrc::bad_fd, 0, 0, EINVAL});
  if (*end > static_cast<std::uint64_t>(st.st_size))
    return unexpected(
        DirtyLogError{DirtyLogErrc::beyond_file, *end, static_cast<std::uint64_t>(st.st_size)});
  // The mapping starts at the page containing `offset`; the bitmap starts `offset`
  // bytes into the file, i.e. (offset - map_off) bytes into the mapping. The offset is
  // applied exactly once.
  auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  std::uint64_t map_off = offset & ~(page - 1);
  std::uint64_t lead = offset - map_off;
  std::size_t map_len = lead + size;
  void* p = ::mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(),
                   static_cast<off_t>(map_off));
  if (p == MAP_FAILED) return unexpected(DirtyLogError{DirtyLogErrc::mmap_failed, 0, 0, errno});
  auto* bits = static_cast<std::uint8_t*>(p) + lead;
  return std::shared_ptr<DirtyLog>(new DirtyLog(bits, size, p, map_len));
}

std::shared_ptr<DirtyLog> DirtyLog::over(std::span<std::uint8_t> bitmap) {
  return std::shared_ptr<DirtyLog>(new DirtyLog(bitmap.data(), bitmap.size(), nullptr, 0));
}

Gpa DirtyLog::covered_end() const {
  // size_ bytes cover size_ * 8 pages; saturate rather than wrap for absurd sizes.
  if (size_ > (~0ULL >> 15)) return Gpa(~0ULL);
  return Gpa(size_ * 8 * kPageSize);
}

Result<void, DirtyLogError> DirtyLog::check_covers(Gpa end) const {
  if (end > covered_end()) {
    std::uint64_t pages = (end.value + kPageSize - 1) / kPageSize;
    return unexpected(DirtyLogError{DirtyLogErrc::too_small, (pages + 7) / 8, size_});
  }
  return {};
}

DirtyLogError DirtyLog::out_of_range(std::uint64_t gpa) {
  out_of_range_.fetch_add(1, std::memory_order_relaxed);
  return DirtyLogError{DirtyLogErrc::out_of_range, gpa, size_ * 8 * kPageSize};
}

Result<void, DirtyLogError> DirtyLog::mark(Gpa gpa, std::uint64_t len) {
  std::uint64_t last_byte = gpa.checked_end(len) ? gpa.value + (len - 1) : ~0ULL;
  std::uint64_t p = gpa.page();
  std::uint64_t last = last_byte >> 12;
  std::uint64_t pages = size_ * 8;
  if (drop_this_write()) return {};
  // Release: the guest data written before this call is visible to whoever observes
  // the bits set below (the frontend copying dirty pages).
  std::atomic_thread_fence(std::memory_order_release);
  while (p <= last && p < pages) {
    std::uint64_t byte = p / 8;
    std::uint64_t upto = std::min({last, byte * 8 + 7, pages - 1});
    auto lo = static_cast<unsigned>(p % 8);
    auto hi = static_cast<unsigned>(upto % 8);
    auto mask = static_cast<std::uint8_t>((0xFFu >> (7 - hi)) & (0xFFu << lo));
    std::atomic_ref<std::uint8_t>(bits_[byte]).fetch_or(mask, std::memory_order_relaxed);
    p = upto + 1;
  }
  if (last >= pages) return unexpected(out_of_range(std::max(p, pages) * kPageSize));
  return {};
}

Result<void, DirtyLogError> DirtyLog::mark_word_fenced(std::uint64_t word, std::uint64_t mask) {
  const std::uint64_t first_byte = word * 8;
  auto* addr = bits_ + first_byte;
  if (word < size_ / 8 && (reinterpret_cast<std::uintptr_t>(addr) % 8) == 0) {
    // Little endian: bit N of this word is bit N % 8 of byte N / 8, as in the log.
    std::atomic_ref<std::uint64_t> w(*reinterpret_cast<std::uint64_t*>(addr));
    // Relaxed: the caller's seq_cst fence orders the guest data before this load and the
    // OR below (DirtyLogBatch::flush()).
    if ((w.load(std::memory_order_relaxed) & mask) == mask) return {};
    if (drop_this_write()) return {};
    w.fetch_or(mask, std::memory_order_relaxed);
    return {};
  }
  // Unaligned log (non-multiple-of-8 mmap offset) or the log's last partial word.
  Result<void, DirtyLogError> result;
  bool dropped = false;
  for (unsigned k = 0; k < 8; ++k) {
    auto m = static_cast<std::uint8_t>(mask >> (8 * k));
    if (m == 0) continue;
    if (first_byte + k >= size_) {
      if (result) result = unexpected(out_of_range((first_byte + k) * 8 * kPageSize));
      continue;
    }
    std::atomic_ref<std::uint8_t> b(bits_[first_byte + k]);
    if ((b.load(std::memory_order_relaxed) & m) == m) continue;
    if (!dropped && drop_this_write()) return result;
    dropped = true;  // one fault decision per word, as in the aligned case
    b.fetch_or(m, std::memory_order_relaxed);
  }
  return result;
}

bool DirtyLog::test(std::uint64_t page) const {
  if (page / 8 >= size_) return false;
  return (std::atomic_ref<std::uint8_t>(bits_[page / 8]).load(std::memory_order_acquire) >>
          (page % 8)) &
         1u;
}

Result<void, DirtyLogError> DirtyLogBatch::mark_slow(DirtyLog& log, Gpa gpa, std::uint64_t len) {
  if (len == 0) return {};
  std::uint64_t last_byte = gpa.checked_end(len) ? gpa.value + (len - 1) : ~0ULL;
  std::uint64_t p = gpa.page();
  std::uint64_t last = last_byte >> 12;
  // The first eviction error, built only when there is one: this runs for most marks of
  // a burst that scatters over guest memory.
  bool failed = false;
  DirtyLogError first{};
  while (true) {
    std::uint64_t word = p / 64;
    std::uint64_t upto = std::min(last, word * 64 + 63);
    auto lo = static_cast<unsigned>(p % 64);
    auto hi = static_cast<unsigned>(upto % 64);
    std::uint64_t mask = (~0ULL >> (63 - hi)) & (~0ULL << lo);
    std::size_t i = word % kWords;
    if (words_[i] != word) {
      if (masks_[i] != 0) {
        if (np_ == kPending && !write_pending(log, failed ? nullptr : &first)) failed = true;
        pend_words_[np_] = words_[i];
        pend_masks_[np_] = masks_[i];
        ++np_;
      }
      words_[i] = word;
      masks_[i] = 0;
    }
    masks_[i] |= mask;
    if (upto == last) break;
    p = upto + 1;
  }
  if (failed) return unexpected(first);
  return {};
}

// Why a set bit may be skipped. The front-end (QEMU, DPDK, our own) takes the log with an
// atomic exchange or fetch-and (a full barrier: a locked instruction on x86, seq_cst in
// C++) and then copies the dirty pages; we write guest data, then fence (seq_cst), then
// load the log word, and skip the OR when our bits are all set. Suppose we skip: our load
// read a value with the bit set. Either the front-end's clear X of that bit comes after
// our load in the word's modification order, or it does not exist yet. If X came before
// our fence in the total order of seq_cst operations, our load (sequenced after the
// fence) would have had to see X or a later value: so X follows the fence, the classic
// store-buffering pattern with a full barrier on both sides, and the front-end's copy
// after X sees our data. If there is no such clear before the device stops, the bit is
// still set at the last fetch (after GET_VRING_BASE, which synchronises with us) and the
// page is copied then. Either way no write is lost. Without the fence, the load could be
// satisfied before our data stores are visible (x86 lets a load pass earlier stores), and
// the front-end could clear and copy in between: the write would be lost.
// tests/dirty_log/dirty_log_test.cpp (ConcurrentClearingLosesNoWrite) drives exactly that.

bool DirtyLogBatch::write_pending(DirtyLog& log, DirtyLogError* error) {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  bool ok = true;
  for (std::size_t k = 0; k < np_; ++k) {
    if (auto r = log.mark_word_fenced(pend_words_[k], pend_masks_[k]); !r && ok) {
      ok = false;
      if (error != nullptr) *error = r.error();
    }
  }
  np_ = 0;
  return ok;
}

Result<void, DirtyLogError> DirtyLogBatch::flush(DirtyLog& log) {
  Result<void, DirtyLogError> result;
  if (np_ != 0) {
    // write_pending() fences once for the whole flush (see the argument above).
    if (DirtyLogError e{}; !write_pending(log, &e)) result = unexpected(e);
  } else if (empty()) {
    return result;
  } else {
    std::atomic_thread_fence(std::memory_order_seq_cst);
  }
  for (std::size_t i = 0; i < kWords; ++i) {
    if (masks_[i] == 0) continue;
    if (auto r = log.mark_word_fenced(words_[i], masks_[i]); !r && result) result = r;
    masks_[i] = 0;
  }
  return result;
}

}  // namespace vhostkit
