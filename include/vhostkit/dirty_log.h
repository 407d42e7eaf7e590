// vhostkit/dirty_log.h: the vhost-user dirty page log.
//
// Concepts
//   DirtyLog       the bitmap the frontend shares with SET_LOG_BASE: bit N (bit N % 8 of
//                  byte N / 8) is set when guest page N (GPA / 4096) was written. It is
//                  a MAP_SHARED mapping of [offset, offset + size) of the log fd.
//                  mark() sets bits with an atomic OR on each byte after a release
//                  fence, so the guest data written before mark() is visible to anyone
//                  who sees the bit. A GPA beyond the log is never written: mark()
//                  returns out_of_range and the log counts it.
//   DirtyLogBatch  a per-queue write-combining cache: marks are ORed into a few cached
//                  64-bit words and written to the shared log by flush() (at the end of
//                  a burst, or when its list of evicted words is full). Between mark()
//                  and flush() the bits are not yet visible: flush before completing the
//                  burst. flush() issues one full fence and then skips every word whose
//                  bits are all set already (no locked write for a page that is still
//                  dirty since the front-end's last fetch).
//   fetch_and_clear  the frontend's side: atomically take and zero a range of the log.
//
// Thread safety: mark() may be called from any number of threads concurrently. A
// DirtyLogBatch belongs to one thread.
//
// Fault injection (tests only): the proof of migration (docs/migration.md) must be able
// to fail. set_fault_drop_one_in(N) makes every N-th write to any log (one mark() call,
// or one word mark_word_fenced() would have changed) do nothing. It is off (0) by default; a
// process also turns it on when the environment variable VHOSTKIT_FAULT_DROP_LOG_ONE_IN=N is set at
// the first DirtyLog::map(), with a warning on stderr. Nothing in the vhost-user protocol can turn
// it on.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "vhostkit/export.h"
#include "vhostkit/types.h"
#include "vhostkit/unique_fd.h"

namespace vhostkit {

enum class DirtyLogErrc {
  bad_fd,           // the fd cannot be mapped (fstat failed or wrong type)
  zero_size,        // a log of 0 bytes
  offset_overflow,  // offset + size overflows
  beyond_file,      // offset + size past the end of the file
  mmap_failed,      // the kernel refused the mapping
  too_small,        // the log does not cover the memory table's highest GPA
  out_of_range,     // a write to a GPA the log does not cover
};

[[nodiscard]] VHOSTKIT_API const char* to_string(DirtyLogErrc e);

struct VHOSTKIT_API DirtyLogError {
  DirtyLogErrc code;
  std::uint64_t value = 0;  // offending GPA, or the needed size for too_small
  std::uint64_t limit = 0;  // the log's size in bytes / coverage in GPA
  int sys_errno = 0;

  [[nodiscard]] std::string message() const;
};

// Drops every n-th dirty-log write in this process (0: off). For mutation tests.
VHOSTKIT_API void set_fault_drop_one_in(std::uint64_t n);
[[nodiscard]] VHOSTKIT_API std::uint64_t fault_dropped_writes();

class VHOSTKIT_API DirtyLog {
 public:
  // Maps [offset, offset + size) of fd as the log. The DirtyLog owns the mapping; the
  // fd is closed once mapped.
  [[nodiscard]] static Result<std::shared_ptr<DirtyLog>, DirtyLogError> map(UniqueFd fd,
                                                                            std::uint64_t size,
                                                                            std::uint64_t offset);
  // Uses memory the caller owns and keeps alive (tests, the frontend's own view).
  [[nodiscard]] static std::shared_ptr<DirtyLog> over(std::span<std::uint8_t> bitmap);

  ~DirtyLog();
  DirtyLog(const DirtyLog&) = delete;
  DirtyLog& operator=(const DirtyLog&) = delete;

  [[nodiscard]] std::uint64_t size_bytes() const { return size_; }
  // One past the highest GPA the log covers.
  [[nodiscard]] Gpa covered_end() const;
  // Error too_small unless [0, end) is covered.
  [[nodiscard]] Result<void, DirtyLogError> check_covers(Gpa end) const;

  // Marks every page of [gpa, gpa + len) dirty. REQUIRES: len > 0. Pages beyond the log
  // are not written: they are counted and the first is returned as out_of_range.
  [[nodiscard]] Result<void, DirtyLogError> mark(Gpa gpa, std::uint64_t len);

  // Sets the bits of mask in the log's 64-bit word `word` (pages word*64 .. word*64+63)
  // unless all of them are set already, in which case nothing is written. Pages outside
  // the log are counted, not written. REQUIRES: the caller ran
  // std::atomic_thread_fence(std::memory_order_seq_cst) after the guest-data writes it
  // logs (DirtyLogBatch::flush() explains why that makes skipping a set bit safe).
  [[nodiscard]] Result<void, DirtyLogError> mark_word_fenced(std::uint64_t word,
                                                             std::uint64_t mask);

  [[nodiscard]] bool test(std::uint64_t page) const;

  // Atomically reads and clears the bits of pages [first_page, first_page + count)
  // and calls fn(page) for each that was set. Returns how many were set.
  template <typename Fn>
  std::uint64_t fetch_and_clear(std::uint64_t first_page, std::uint64_t count, Fn&& fn);

  // Number of writes beyond the log since creation.
  [[nodiscard]] std::uint64_t out_of_range_count() const {
    return out_of_range_.load(std::memory_order_relaxed);
  }

  [[nodiscard]] std::uint8_t* data() const { return bits_; }

 private:
  DirtyLog(std::uint8_t* bits, std::uint64_t size, void* map_base, std::size_t map_len);
  DirtyLogError out_of_range(std::uint64_t gpa);

  std::uint8_t* bits_;
  std::uint64_t size_;
  void* map_base_;  // nullptr when not owned
  std::size_t map_len_;
  std::atomic<std::uint64_t> out_of_range_{0};
};

namespace detail {
// kLogBit[i] = bit i; kLogThrough[i] = 2 << i (0 for i = 63), so bits lo..hi of a log
// word are kLogThrough[hi] - kLogBit[lo]: two loads instead of two variable shifts.
struct LogMaskTable {
  std::uint64_t v[64];
};
constexpr LogMaskTable make_log_mask_table(unsigned shift) {
  LogMaskTable t{};
  for (unsigned i = 0; i < 64; ++i) t.v[i] = i + shift < 64 ? 1ULL << (i + shift) : 0;
  return t;
}
inline constexpr LogMaskTable kLogBit = make_log_mask_table(0);
inline constexpr LogMaskTable kLogThrough = make_log_mask_table(1);
}  // namespace detail

// Per-queue write-combining cache in front of a DirtyLog: a direct-mapped cache of
// kWords log words (word w lives in slot w % kWords), so a mark costs one compare
// whether it hits or not. A mark that needs a slot held by another word with bits moves
// that word to a list of kPending evicted words, which flush() writes to the log along
// with the cache (or mark() when the list is full). So the atomic ORs on the shared log
// come in one run at the end of a burst, after its data copies, instead of one between
// every two copies: each locked OR waits for the stores before it to drain, and a copy
// into a page that is not in the cache is slow to drain.
class VHOSTKIT_API DirtyLogBatch {
 public:
  static constexpr std::size_t kWords = 16;  // a power of two
  // Room for the words of a whole burst of 64 frames in buffers one per page (one or
  // two words each), so the fence and the shared-log writes happen once per burst.
  static constexpr std::size_t kPending = 256;
  static_assert((kWords & (kWords - 1)) == 0);

  // Records [gpa, gpa + len) as dirty; writes an evicted word to the log first.
  // REQUIRES: len > 0 (a zero length marks nothing).
  [[nodiscard]] Result<void, DirtyLogError> mark(DirtyLog& log, Gpa gpa, std::uint64_t len) {
    if (try_mark(gpa, len)) return {};
    return mark_slow(log, gpa, len);
  }

  // The inline fast path of mark(): true (and marked) when [gpa, gpa + len) lies in one
  // log word (256 KiB of guest memory) that holds its cache slot; false when mark()
  // must take the slow path (nothing marked then). A few instructions, no variable
  // shift: first and last byte, their word, one compare against the slot.
  [[nodiscard]] bool try_mark(Gpa gpa, std::uint64_t len) {
    const std::uint64_t first = gpa.value;
    const std::uint64_t last = first + (len - 1);  // < first when len is 0 or it wraps
    const std::uint64_t word = first >> kWordShift;
    const std::size_t i = word & (kWords - 1);
    if ((((first ^ last) >> kWordShift) == 0) & (last >= first) & (words_[i] == word)) {
      masks_[i] |= detail::kLogThrough.v[(last >> 12) & 63] - detail::kLogBit.v[(first >> 12) & 63];
      return true;
    }
    return false;
  }

  // Writes every cached word to the log and empties the cache. Returns the first
  // out-of-range error, if any (all in-range words are written regardless).
  [[nodiscard]] Result<void, DirtyLogError> flush(DirtyLog& log);

  // True when no dirty bit is waiting for flush().
  [[nodiscard]] bool empty() const {
    std::uint64_t any = np_;
    for (std::uint64_t m : masks_) any |= m;
    return any == 0;
  }

 private:
  static constexpr std::uint64_t kWordSpan = 64 * kPageSize;  // guest bytes per log word
  static constexpr unsigned kWordShift = 18;                  // log2(kWordSpan)
  static_assert(kWordSpan == 1ULL << kWordShift);

  Result<void, DirtyLogError> mark_slow(DirtyLog& log, Gpa gpa, std::uint64_t len);
  // Writes the evicted words to the log; false (and *error set) on the first failure.
  bool write_pending(DirtyLog& log, DirtyLogError* error);

  // Slot i holds log word words_[i] (always == i mod kWords; initially i itself) and its
  // pending bits masks_[i]. flush() clears the bits but keeps the words, so the next
  // burst's marks in the same words take the fast path at once.
  static constexpr std::array<std::uint64_t, kWords> initial_words() {
    std::array<std::uint64_t, kWords> w{};
    for (std::size_t i = 0; i < kWords; ++i) w[i] = i;
    return w;
  }
  std::array<std::uint64_t, kWords> words_ = initial_words();
  std::uint64_t masks_[kWords] = {};
  // Evicted words and their bits, waiting for flush(): pend_words_[0, np_).
  std::uint64_t pend_words_[kPending] = {};
  std::uint64_t pend_masks_[kPending] = {};
  std::size_t np_ = 0;
};

template <typename Fn>
std::uint64_t DirtyLog::fetch_and_clear(std::uint64_t first_page, std::uint64_t count, Fn&& fn) {
  std::uint64_t found = 0;
  std::uint64_t end = std::min(first_page + count, size_ * 8);
  for (std::uint64_t p = first_page; p < end;) {
    std::uint64_t byte = p / 8;
    if ((p % 8) == 0 && p + 8 <= end) {
      // seq_cst: the exchange must see the guest data published before the bit, must not
      // be reordered with the caller's later copy, and is the front-end's half of the
      // full-barrier pairing that lets a back-end skip a bit already set
      // (DirtyLogBatch::flush()). QEMU takes its log with a seq_cst exchange as well.
      std::uint8_t v =
          std::atomic_ref<std::uint8_t>(bits_[byte]).exchange(0, std::memory_order_seq_cst);
      for (unsigned b = 0; v != 0 && b < 8; ++b)
        if (v & (1u << b)) {
          ++found;
          fn(p + b);
        }
      p += 8;
    } else {
      std::uint8_t bit = static_cast<std::uint8_t>(1u << (p % 8));
      std::uint8_t v = std::atomic_ref<std::uint8_t>(bits_[byte])
                           .fetch_and(static_cast<std::uint8_t>(~bit), std::memory_order_seq_cst);
      if (v & bit) {
        ++found;
        fn(p);
      }
      ++p;
    }
  }
  return found;
}

}  // namespace vhostkit
