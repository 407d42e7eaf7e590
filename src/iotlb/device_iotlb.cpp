// Device IOTLB: a two-level sorted block array keyed by IOVA.
//
// Entries live in blocks of at most 2 * kBlock slots, each sorted by IOVA, the blocks
// themselves in IOVA order, with a flat array of each block's first IOVA on top. A
// lookup is two binary searches over contiguous memory (the top array for 1,048,576
// entries is 16,384 keys), so it stays logarithmic and cache friendly; an insert moves
// at most 2 * kBlock slots. A linear list (DPDK) or a balanced tree of nodes (Linux)
// would be the alternatives; bench/ compares against the linear list.
#include <algorithm>
#include <deque>

#include <fmt/format.h>

#include "vhostkit/detail/sorted_search.h"
#include "vhostkit/iotlb.h"

namespace vhostkit {

const char* to_string(IotlbErrc e) {
  switch (e) {
    case IotlbErrc::zero_size: return "IOTLB range has zero size";
    case IotlbErrc::iova_overflow: return "IOVA range overflows";
    case IotlbErrc::address_overflow: return "target address range overflows";
    case IotlbErrc::bad_permission: return "IOTLB update grants no access";
    case IotlbErrc::not_backed: return "IOTLB range not backed by the memory table";
    case IotlbErrc::over_limit: return "IOTLB update needs more entries than the limit";
  }
  return "unknown IOTLB error";
}

std::string IotlbError::message() const {
  return fmt::format("{} (iova {:#x}, size {:#x}, address {:#x})", to_string(code), iova.value,
                     size, addr);
}

namespace {
constexpr std::size_t kBlock = 64;

struct Slot {
  IotlbEntry e;
  std::uint64_t seq;
};

// Last address of an entry (inclusive), so ranges ending at 2^64 need no special case.
std::uint64_t last_of(const IotlbEntry& e) {
  return e.iova.value + (e.size - 1);
}

IotlbEntry trimmed(const IotlbEntry& e, std::uint64_t lo, std::uint64_t last) {
  IotlbEntry t = e;
  std::uint64_t skip = lo - e.iova.value;
  t.iova = Iova(lo);
  t.gpa = e.gpa + skip;
  t.host = e.host + skip;
  t.size = last - lo + 1;
  return t;
}
}  // namespace

using detail::count_le;

struct DeviceIotlb::Store {
  // A block keeps its IOVAs in a separate dense array: the search touches 8-byte keys
  // only, and one slot at the end.
  struct Block {
    std::vector<std::uint64_t> keys;  // slots[i].e.iova
    std::vector<Slot> slots;
  };
  std::vector<Block> blocks;          // non-empty, sorted, in IOVA order
  std::vector<std::uint64_t> firsts;  // blocks[i].keys.front()
  std::size_t count = 0;
  std::deque<std::pair<std::uint64_t, std::uint64_t>> fifo;  // (seq, iova) oldest first
  std::uint64_t next_seq = 0;

  std::size_t block_for(std::uint64_t key) const {
    std::size_t n = count_le(firsts.data(), firsts.size(), key);
    return n == 0 ? 0 : n - 1;
  }

  const Slot* find(std::uint64_t key) const {
    if (blocks.empty()) return nullptr;
    const Block& b = blocks[block_for(key)];
    std::size_t n = count_le(b.keys.data(), b.keys.size(), key);
    if (n == 0) return nullptr;
    const Slot& s = b.slots[n - 1];
    return key - s.e.iova.value < s.e.size ? &s : nullptr;
  }

  void insert(const IotlbEntry& e) {  // REQUIRES: e overlaps no entry
    Slot s{e, next_seq++};
    std::uint64_t key = e.iova.value;
    fifo.emplace_back(s.seq, key);
    ++count;
    if (blocks.empty()) {
      blocks.push_back(Block{{key}, {s}});
      firsts.push_back(key);
      return;
    }
    std::size_t bi = block_for(key);
    Block& b = blocks[bi];
    std::size_t pos = count_le(b.keys.data(), b.keys.size(), key);
    b.keys.insert(b.keys.begin() + static_cast<std::ptrdiff_t>(pos), key);
    b.slots.insert(b.slots.begin() + static_cast<std::ptrdiff_t>(pos), s);
    firsts[bi] = b.keys.front();
    if (b.keys.size() >= 2 * kBlock) {
      Block upper;
      upper.keys.assign(b.keys.begin() + kBlock, b.keys.end());
      upper.slots.assign(b.slots.begin() + kBlock, b.slots.end());
      b.keys.resize(kBlock);
      b.slots.resize(kBlock);
      firsts.insert(firsts.begin() + static_cast<std::ptrdiff_t>(bi) + 1, upper.keys.front());
      blocks.insert(blocks.begin() + static_cast<std::ptrdiff_t>(bi) + 1, std::move(upper));
    }
  }

  // Removes every slot overlapping [lo, last] and appends it to removed.
  void erase_overlapping(std::uint64_t lo, std::uint64_t last, std::vector<Slot>& removed) {
    if (blocks.empty()) return;
    bool emptied = false;
    // Entries do not overlap, so ends are sorted like starts, and nothing in an
    // earlier block can reach lo.
    for (std::size_t bi = block_for(lo); bi < blocks.size(); ++bi) {
      Block& b = blocks[bi];
      auto i = std::partition_point(b.slots.begin(), b.slots.end(),
                                    [lo](const Slot& x) { return last_of(x.e) < lo; });
      auto j = std::partition_point(i, b.slots.end(),
                                    [last](const Slot& x) { return x.e.iova.value <= last; });
      bool more = j == b.slots.end();
      auto ki = b.keys.begin() + (i - b.slots.begin());
      auto kj = b.keys.begin() + (j - b.slots.begin());
      removed.insert(removed.end(), i, j);
      count -= static_cast<std::size_t>(j - i);
      b.slots.erase(i, j);
      b.keys.erase(ki, kj);
      if (b.keys.empty())
        emptied = true;
      else
        firsts[bi] = b.keys.front();
      if (!more) break;
    }
    if (emptied) {
      std::size_t w = 0;
      for (std::size_t r = 0; r < blocks.size(); ++r) {
        if (blocks[r].keys.empty()) continue;
        if (w != r) blocks[w] = std::move(blocks[r]);
        firsts[w] = firsts[r];
        ++w;
      }
      blocks.resize(w);
      firsts.resize(w);
    }
  }

  // Drops the oldest live entry. REQUIRES: count > 0.
  void evict_oldest() {
    while (!fifo.empty()) {
      auto [seq, key] = fifo.front();
      fifo.pop_front();
      const Slot* s = find(key);
      if (s == nullptr || s->seq != seq || s->e.iova.value != key) continue;  // stale record
      std::vector<Slot> gone;
      erase_overlapping(key, key, gone);
      return;
    }
  }

  void compact_fifo() {
    if (fifo.size() <= 2 * count + 1024) return;
    std::vector<std::pair<std::uint64_t, std::uint64_t>> live;
    live.reserve(count);
    for (const auto& b : blocks)
      for (const auto& x : b.slots) live.emplace_back(x.seq, x.e.iova.value);
    std::sort(live.begin(), live.end());
    fifo.assign(live.begin(), live.end());
  }

  void clear() {
    blocks.clear();
    firsts.clear();
    fifo.clear();
    count = 0;
  }
};

DeviceIotlb::DeviceIotlb(IotlbLimits limits)
    : limits_(limits),
      store_(std::make_unique<Store>()),
      snapshot_(std::make_shared<const MemorySnapshot>()) {
  if (limits_.max_entries == 0) limits_.max_entries = 1;
}

DeviceIotlb::~DeviceIotlb() = default;

void DeviceIotlb::bump() {
  generation_.fetch_add(1, std::memory_order_release);
}

void DeviceIotlb::rebind(std::shared_ptr<const MemorySnapshot> snapshot) {
  std::unique_lock lock(mu_);
  store_->clear();
  snapshot_ = std::move(snapshot);
  bump();
}

void DeviceIotlb::flush() {
  std::unique_lock lock(mu_);
  store_->clear();
  bump();
}

Result<void, IotlbError> DeviceIotlb::install(Iova iova, std::uint64_t size,
                                              const std::vector<IotlbEntry>& parts) {
  // Called with mu_ held exclusively.
  if (parts.size() > limits_.max_entries)
    return unexpected(IotlbError{IotlbErrc::over_limit, iova, size, 0});
  std::vector<Slot> removed;
  std::uint64_t last = iova.value + (size - 1);
  store_->erase_overlapping(iova.value, last, removed);
  for (const Slot& s : removed) {
    if (s.e.iova.value < iova.value) store_->insert(trimmed(s.e, s.e.iova.value, iova.value - 1));
    if (last_of(s.e) > last) store_->insert(trimmed(s.e, last + 1, last_of(s.e)));
  }
  while (store_->count + parts.size() > limits_.max_entries && store_->count > 0) {
    store_->evict_oldest();
    evictions_.fetch_add(1, std::memory_order_relaxed);
  }
  for (const auto& p : parts) store_->insert(p);
  store_->compact_fifo();
  bump();
  return {};
}

Result<void, IotlbError> DeviceIotlb::update_gpa(Iova iova, std::uint64_t size, Gpa gpa,
                                                 Access perm) {
  if (size == 0) return unexpected(IotlbError{IotlbErrc::zero_size, iova, size, gpa.value});
  if (!iova.checked_end(size - 1))
    return unexpected(IotlbError{IotlbErrc::iova_overflow, iova, size, gpa.value});
  if (!gpa.checked_end(size))
    return unexpected(IotlbError{IotlbErrc::address_overflow, iova, size, gpa.value});
  if (perm == Access::none)
    return unexpected(IotlbError{IotlbErrc::bad_permission, iova, size, gpa.value});
  std::unique_lock lock(mu_);
  std::vector<IotlbEntry> parts;
  std::uint64_t done = 0;
  while (done < size) {
    Gpa cur = gpa + done;
    auto host = snapshot_->gpa_to_host(cur);
    if (!host) return unexpected(IotlbError{IotlbErrc::not_backed, iova, size, cur.value});
    std::uint64_t take = std::min(size - done, host->len);
    parts.push_back(IotlbEntry{iova + done, take, cur, host->host, perm});
    done += take;
  }
  if (auto ok = install(iova, size, parts); !ok) return ok;
  lock.unlock();
  answer_misses(iova, size);
  return {};
}

Result<void, IotlbError> DeviceIotlb::update_uaddr(Iova iova, std::uint64_t size, Uaddr uaddr,
                                                   Access perm) {
  if (size == 0) return unexpected(IotlbError{IotlbErrc::zero_size, iova, size, uaddr.value});
  if (!iova.checked_end(size - 1))
    return unexpected(IotlbError{IotlbErrc::iova_overflow, iova, size, uaddr.value});
  if (!uaddr.checked_end(size))
    return unexpected(IotlbError{IotlbErrc::address_overflow, iova, size, uaddr.value});
  if (perm == Access::none)
    return unexpected(IotlbError{IotlbErrc::bad_permission, iova, size, uaddr.value});
  std::unique_lock lock(mu_);
  std::vector<IotlbEntry> parts;
  std::uint64_t done = 0;
  while (done < size) {
    Uaddr cur = uaddr + done;
    auto g = snapshot_->uaddr_to_gpa(cur);
    if (!g) return unexpected(IotlbError{IotlbErrc::not_backed, iova, size, cur.value});
    auto host = snapshot_->gpa_to_host(g->gpa);  // same region: always succeeds
    if (!host) return unexpected(IotlbError{IotlbErrc::not_backed, iova, size, cur.value});
    std::uint64_t take = std::min({size - done, g->len, host->len});
    parts.push_back(IotlbEntry{iova + done, take, g->gpa, host->host, perm});
    done += take;
  }
  if (auto ok = install(iova, size, parts); !ok) return ok;
  lock.unlock();
  answer_misses(iova, size);
  return {};
}

Result<void, IotlbError> DeviceIotlb::invalidate(Iova iova, std::uint64_t size) {
  if (size == 0) return unexpected(IotlbError{IotlbErrc::zero_size, iova, size, 0});
  std::uint64_t last = iova.checked_end(size - 1) ? iova.value + (size - 1) : ~0ULL;
  std::unique_lock lock(mu_);
  std::vector<Slot> removed;
  store_->erase_overlapping(iova.value, last, removed);
  for (const Slot& s : removed) {
    if (s.e.iova.value < iova.value) store_->insert(trimmed(s.e, s.e.iova.value, iova.value - 1));
    if (last_of(s.e) > last) store_->insert(trimmed(s.e, last + 1, last_of(s.e)));
  }
  // Punching a hole into an entry splits it in two: evict as an update would, or a
  // frontend could grow the IOTLB without bound by invalidating every other byte.
  while (store_->count > limits_.max_entries) {
    store_->evict_oldest();
    evictions_.fetch_add(1, std::memory_order_relaxed);
  }
  store_->compact_fifo();
  bump();
  return {};
}

DeviceIotlb::LookupResult DeviceIotlb::lookup(Iova iova, std::uint64_t mem_generation) const {
  std::shared_lock lock(mu_);
  if (snapshot_->generation() != mem_generation) return {std::nullopt, true};
  const Slot* s = store_->find(iova.value);
  if (s == nullptr) return {};
  return {s->e, false};
}

std::optional<IotlbEntry> DeviceIotlb::lookup(Iova iova) const {
  std::shared_lock lock(mu_);
  const Slot* s = store_->find(iova.value);
  if (s == nullptr) return std::nullopt;
  return s->e;
}

bool DeviceIotlb::note_miss(Iova iova, Access access, std::chrono::steady_clock::time_point now) {
  std::uint64_t key = (iova.page() << 2) | static_cast<std::uint64_t>(access);
  std::lock_guard lock(miss_mu_);
  auto [it, fresh] = misses_.try_emplace(key, now);
  if (fresh) return true;
  if (now - it->second >= limits_.miss_timeout) {
    it->second = now;
    return true;
  }
  return false;
}

void DeviceIotlb::answer_misses(Iova iova, std::uint64_t size) {
  std::uint64_t first = iova.page();
  std::uint64_t last = (iova.value + (size - 1)) >> 12;
  std::lock_guard lock(miss_mu_);
  std::erase_if(misses_, [&](const auto& kv) {
    std::uint64_t page = kv.first >> 2;
    return page >= first && page <= last;
  });
}

std::size_t DeviceIotlb::pending_misses() const {
  std::lock_guard lock(miss_mu_);
  return misses_.size();
}

std::size_t DeviceIotlb::size() const {
  std::shared_lock lock(mu_);
  return store_->count;
}

std::vector<IotlbEntry> DeviceIotlb::entries() const {
  std::shared_lock lock(mu_);
  std::vector<IotlbEntry> out;
  out.reserve(store_->count);
  for (const auto& b : store_->blocks)
    for (const auto& x : b.slots) out.push_back(x.e);
  return out;
}

}  // namespace vhostkit
