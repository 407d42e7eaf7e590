// The translate path: AddressSpace (control side) and Translator (data path).
#include <algorithm>
#include <cstring>
#include <thread>

#include <fmt/format.h>

#include "vhostkit/translate.h"

namespace vhostkit {

const char* to_string(TranslateErrc e) {
  switch (e) {
    case TranslateErrc::not_mapped: return "address not in guest memory";
    case TranslateErrc::iotlb_miss: return "IOTLB miss";
    case TranslateErrc::permission_denied: return "IOTLB entry does not permit the access";
    case TranslateErrc::too_many_segments: return "range needs too many segments";
    case TranslateErrc::range_overflow: return "address range overflows";
    case TranslateErrc::log_failed: return "write could not be logged (beyond the dirty log)";
  }
  return "unknown translation error";
}

std::string TranslateError::message() const {
  return fmt::format("{} (addr {:#x}, len {:#x}, {})", to_string(code), addr.value, len,
                     to_string(access));
}

// ---------------------------------------------------------------------------------
// AddressSpace

AddressSpace::AddressSpace(MemoryLimits memory_limits, IotlbLimits iotlb_limits)
    : memory_(memory_limits), iotlb_(iotlb_limits) {
  state_.memory = memory_.snapshot();
  iotlb_.rebind(state_.memory);
}

AddressSpace::~AddressSpace() = default;

void AddressSpace::bump() {
  generation_.fetch_add(1, std::memory_order_seq_cst);
}

void AddressSpace::publish_memory() {
  auto snap = memory_.snapshot();
  {
    // The rebind and the state swap happen under one lock, so a translator that
    // refreshes sees an IOTLB bound to exactly the snapshot it gets.
    std::lock_guard lock(mu_);
    iotlb_.rebind(snap);
    state_.memory = std::move(snap);
  }
  bump();
}

Result<void, MemoryError> AddressSpace::set_mem_table(std::vector<RegionSpec> regions) {
  auto r = memory_.replace(std::move(regions));
  if (r) publish_memory();
  return r;
}

Result<void, MemoryError> AddressSpace::add_region(RegionSpec region) {
  auto r = memory_.add(std::move(region));
  if (r) publish_memory();
  return r;
}

Result<void, MemoryError> AddressSpace::remove_region(Gpa gpa, std::uint64_t size) {
  auto r = memory_.remove(gpa, size);
  if (r) publish_memory();
  return r;
}

void AddressSpace::clear_memory() {
  memory_.clear();
  publish_memory();
}

Result<void, IotlbError> AddressSpace::iotlb_update(Iova iova, std::uint64_t size, Gpa gpa,
                                                    Access perm) {
  auto r = iotlb_.update_gpa(iova, size, gpa, perm);
  if (r) bump();
  return r;
}

Result<void, IotlbError> AddressSpace::iotlb_update_uaddr(Iova iova, std::uint64_t size,
                                                          Uaddr uaddr, Access perm) {
  auto r = iotlb_.update_uaddr(iova, size, uaddr, perm);
  if (r) bump();
  return r;
}

Result<void, IotlbError> AddressSpace::iotlb_invalidate(Iova iova, std::uint64_t size) {
  auto r = iotlb_.invalidate(iova, size);
  if (r) bump();
  return r;
}

void AddressSpace::iotlb_flush() {
  iotlb_.flush();
  bump();
}

void AddressSpace::set_iommu(bool on) {
  {
    std::lock_guard lock(mu_);
    state_.iommu = on;
  }
  bump();
}

Result<void, DirtyLogError> AddressSpace::set_log(std::shared_ptr<DirtyLog> log) {
  {
    std::lock_guard lock(mu_);
    if (log) {
      if (auto ok = log->check_covers(state_.memory->end_gpa()); !ok) return ok;
    }
    state_.log = std::move(log);
  }
  bump();
  return {};
}

void AddressSpace::set_logging(bool on) {
  {
    std::lock_guard lock(mu_);
    state_.logging = on;
  }
  bump();
}

bool AddressSpace::iommu() const {
  std::lock_guard lock(mu_);
  return state_.iommu;
}

bool AddressSpace::logging() const {
  std::lock_guard lock(mu_);
  return state_.logging;
}

std::shared_ptr<DirtyLog> AddressSpace::log() const {
  std::lock_guard lock(mu_);
  return state_.log;
}

AddressSpace::State AddressSpace::state() const {
  std::lock_guard lock(mu_);
  return state_;
}

void AddressSpace::enroll(Translator* t) {
  std::lock_guard lock(translators_mu_);
  translators_.push_back(t);
}

void AddressSpace::withdraw(Translator* t) {
  std::lock_guard lock(translators_mu_);
  std::erase(translators_, t);
}

bool AddressSpace::synchronize(std::chrono::milliseconds timeout) {
  // seq_cst pairs with Translator::begin_burst(): either the translator's store of
  // its active generation is visible here, or its following load of generation_ sees
  // our latest bump.
  std::uint64_t target = generation_.load(std::memory_order_seq_cst);
  auto deadline = std::chrono::steady_clock::now() + timeout;
  std::lock_guard lock(translators_mu_);
  for (Translator* t : translators_) {
    while (true) {
      std::uint64_t a = t->active_.load(std::memory_order_seq_cst);
      if (a == 0 || a >= target) break;
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::yield();
    }
  }
  return true;
}

// ---------------------------------------------------------------------------------
// Translator

Translator::Translator(AddressSpace& space, LogMode mode) : space_(space), mode_(mode) {
  space_.enroll(this);
  refresh();
}

Translator::~Translator() {
  if (state_.log) (void)batch_.flush(*state_.log);
  active_.store(0, std::memory_order_seq_cst);
  space_.withdraw(this);
}

void Translator::refresh() {
  // Bits batched under the old state belong to the old log: write them there first.
  if (state_.log && !batch_.empty()) (void)batch_.flush(*state_.log);
  // Read the generation before the state: if a change lands in between, the next
  // check sees a newer generation and refreshes again.
  std::uint64_t g = space_.generation_.load(std::memory_order_acquire);
  state_ = space_.state();
  generation_ = g;
  fast_log_ = mode_ == LogMode::batched && state_.logging && state_.log &&
              !(state_.memory && state_.memory->has_aliases());
  for (auto& c : cache_) c = Chunk{};
  if (active_.load(std::memory_order_relaxed) != 0) active_.store(g, std::memory_order_seq_cst);
}

void Translator::begin_burst() {
  active_.store(generation_ == 0 ? 1 : generation_, std::memory_order_seq_cst);
  // The only refresh inside a burst: until end_burst() the worker goes on with this
  // state, and synchronize() waits for it.
  if (space_.generation_.load(std::memory_order_seq_cst) != generation_) refresh();
}

Result<void, TranslateError> Translator::end_burst() {
  auto r = flush_log();
  active_.store(0, std::memory_order_release);
  return r;
}

Result<Translator::Chunk, TranslateError> Translator::resolve(std::uint64_t addr, std::uint64_t len,
                                                              Access access) {
  for (std::size_t i = 0; i < kCacheEntries; ++i) {
    const Chunk& c = cache_[i];
    if (addr - c.start < c.len) {
      if (!permits(c.perm, access))
        return unexpected(
            TranslateError{TranslateErrc::permission_denied, Iova(addr), len, access});
      ++hits_;
      mru_ = i;
      return c;
    }
  }
  ++misses_;
  Chunk c;
  if (!state_.iommu) {
    const Region* r = state_.memory->find(Gpa(addr));
    if (r == nullptr)
      return unexpected(TranslateError{TranslateErrc::not_mapped, Iova(addr), len, access});
    c = Chunk{r->gpa.value, r->size, r->gpa, r->host, Access::read_write};
  } else {
    auto found = space_.iotlb_.lookup(Iova(addr), state_.memory->generation());
    if (found.stale && !in_burst()) {
      // The memory table changed after our last refresh: take the new state and retry.
      refresh();
      found = space_.iotlb_.lookup(Iova(addr), state_.memory->generation());
    }
    // Still stale: the table changed during this burst, which keeps its state to the
    // end. The IOTLB was flushed with the change, so the translation must be asked for
    // again anyway: a miss, and the next burst looks it up in the new table.
    if (!found.entry) {
      bool report = space_.iotlb_.note_miss(Iova(addr), access, std::chrono::steady_clock::now());
      return unexpected(TranslateError{TranslateErrc::iotlb_miss, Iova(addr), len, access, report});
    }
    const IotlbEntry& e = *found.entry;
    c = Chunk{e.iova.value, e.size, e.gpa, e.host, e.perm};
    if (!permits(c.perm, access))
      return unexpected(TranslateError{TranslateErrc::permission_denied, Iova(addr), len, access});
  }
  cache_[next_victim_] = c;
  mru_ = next_victim_;
  next_victim_ = (next_victim_ + 1) % kCacheEntries;
  return c;
}

Result<std::size_t, TranslateError> Translator::translate_slow(Iova addr, std::uint64_t len,
                                                               Access access,
                                                               std::span<Segment> out) {
  check_generation();
  if (!addr.checked_end(len))
    return unexpected(TranslateError{TranslateErrc::range_overflow, addr, len, access});
  std::size_t n = 0;
  std::uint64_t cur = addr.value;
  std::uint64_t left = len;
  while (left > 0) {
    auto c = resolve(cur, left, access);
    if (!c) return unexpected(c.error());
    std::uint64_t off = cur - c->start;
    std::uint64_t take = std::min(left, c->len - off);
    Segment s{c->host + off, c->gpa + off, take};
    if (n > 0 && out[n - 1].host + out[n - 1].len == s.host &&
        out[n - 1].gpa + out[n - 1].len == s.gpa) {
      out[n - 1].len += take;
    } else {
      if (n == out.size())
        return unexpected(
            TranslateError{TranslateErrc::too_many_segments, Iova(cur), left, access});
      out[n++] = s;
    }
    cur += take;
    left -= take;
  }
  return n;
}

Result<void, TranslateError> Translator::read(Iova addr, std::span<std::uint8_t> dst) {
  check_generation();
  if (!addr.checked_end(dst.size()))
    return unexpected(
        TranslateError{TranslateErrc::range_overflow, addr, dst.size(), Access::read});
  std::uint64_t done = 0;
  while (done < dst.size()) {
    std::uint64_t cur = addr.value + done;
    auto c = resolve(cur, dst.size() - done, Access::read);
    if (!c) return unexpected(c.error());
    std::uint64_t off = cur - c->start;
    std::uint64_t take = std::min<std::uint64_t>(dst.size() - done, c->len - off);
    std::memcpy(dst.data() + done, c->host + off, take);
    done += take;
  }
  return {};
}

Result<void, TranslateError> Translator::write(Iova addr, std::span<const std::uint8_t> src) {
  check_generation();
  if (!addr.checked_end(src.size()))
    return unexpected(
        TranslateError{TranslateErrc::range_overflow, addr, src.size(), Access::write});
  std::uint64_t done = 0;
  Result<void, TranslateError> logged;
  while (done < src.size()) {
    std::uint64_t cur = addr.value + done;
    auto c = resolve(cur, src.size() - done, Access::write);
    if (!c) return unexpected(c.error());
    std::uint64_t off = cur - c->start;
    std::uint64_t take = std::min<std::uint64_t>(src.size() - done, c->len - off);
    std::memcpy(c->host + off, src.data() + done, take);
    if (fast_log_ && batch_.try_mark(c->gpa + off, take)) {
      // logged in a cached word
    } else if (auto r = log_range(c->gpa + off, take); !r && logged) {
      logged = r;
    }
    done += take;
  }
  return logged;
}

Result<void, TranslateError> Translator::log_range(Gpa gpa, std::uint64_t len) {
  if (!state_.logging || !state_.log || len == 0) return {};
  DirtyLog& log = *state_.log;
  Result<void, TranslateError> result;
  auto mark = [&](Gpa g, std::uint64_t n) {
    auto r = mode_ == LogMode::batched ? batch_.mark(log, g, n) : log.mark(g, n);
    if (!r && result)
      result = unexpected(
          TranslateError{TranslateErrc::log_failed, Iova(r.error().value), n, Access::write});
  };
  mark(gpa, len);
  if (state_.memory->has_aliases()) state_.memory->for_each_alias(gpa, len, mark);
  return result;
}

void Translator::release() {
  if (state_.log && !batch_.empty()) (void)batch_.flush(*state_.log);
  state_ = AddressSpace::State{};
  generation_ = 0;  // the space's generations start at 1: the next call refreshes
  fast_log_ = false;
  for (auto& c : cache_) c = Chunk{};
}

Result<void, TranslateError> Translator::flush_log() {
  if (!state_.log || batch_.empty()) return {};
  if (auto r = batch_.flush(*state_.log); !r)
    return unexpected(
        TranslateError{TranslateErrc::log_failed, Iova(r.error().value), 0, Access::write});
  return {};
}

}  // namespace vhostkit
