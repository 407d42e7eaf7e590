// Foundation benchmarks: translate hit latency, IOTLB lookup scaling against a
// linear-list baseline (the structure DPDK's lib/vhost uses), memory-table lookup and
// dirty-log marking with and without the write-combining batch.
#include <sys/mman.h>
#include <unistd.h>

#include <random>
#include <vector>

#include <benchmark/benchmark.h>

#include "vhostkit/translate.h"

namespace vhostkit {
namespace {

constexpr std::uint64_t kMiB = 1 << 20;

UniqueFd memfd(std::uint64_t size) {
  int fd = ::memfd_create("bench", MFD_CLOEXEC);
  if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(size)) != 0) std::abort();
  return UniqueFd(fd);
}

RegionSpec region(UniqueFd fd, std::uint64_t off, std::uint64_t size, std::uint64_t gpa) {
  RegionSpec s;
  s.fd = std::move(fd);
  s.mmap_offset = off;
  s.size = size;
  s.gpa = Gpa(gpa);
  s.uaddr = Uaddr(0x7f0000000000 + gpa);
  return s;
}

std::vector<std::uint64_t> random_indices(std::uint64_t n, std::size_t count = 1 << 20) {
  std::mt19937_64 rng(42);
  std::vector<std::uint64_t> v(count);
  for (auto& x : v) x = rng() % n;
  return v;
}

// ---- translate hit (per-queue cache) ----

void BM_TranslateCached(benchmark::State& state) {
  bool iommu = state.range(0) != 0;
  AddressSpace space;
  std::vector<RegionSpec> v;
  v.push_back(region(memfd(kMiB), 0, kMiB, 0x100000));
  if (!space.set_mem_table(std::move(v))) std::abort();
  std::uint64_t base = 0x100000;
  if (iommu) {
    space.set_iommu(true);
    if (!space.iotlb_update(Iova(0xfe000000), kMiB, Gpa(0x100000), Access::read_write)) std::abort();
    base = 0xfe000000;
  }
  Translator tr(space);
  Segment segs[2];
  std::uint64_t off = 0;
  for (auto _ : state) {
    auto n = tr.translate(Iova(base + off), 64, Access::read, segs);
    benchmark::DoNotOptimize(n);
    benchmark::DoNotOptimize(segs[0].host);
    off = (off + 64) & 0xfff;  // stay within one cached entry, vary the address
  }
}
BENCHMARK(BM_TranslateCached)->Arg(1)->Arg(0)->ArgName("iommu");

// ---- IOTLB lookup: vhostkit vs a linear list ----

struct IotlbFixture {
  MemoryTable table;
  std::unique_ptr<DeviceIotlb> iotlb;
  explicit IotlbFixture(std::uint64_t n) {
    if (!table.add(region(memfd(4096), 0, 4096, 0))) std::abort();
    iotlb = std::make_unique<DeviceIotlb>(IotlbLimits{.max_entries = n});
    iotlb->rebind(table.snapshot());
    // Insert in a scattered order, as a guest mapping and unmapping would.
    std::mt19937_64 rng(7);
    std::vector<std::uint64_t> order(n);
    for (std::uint64_t i = 0; i < n; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    for (auto k : order)
      if (!iotlb->update_gpa(Iova(k * 4096), 4096, Gpa(0), Access::read)) std::abort();
  }
};

void BM_IotlbLookup(benchmark::State& state) {
  std::uint64_t n = static_cast<std::uint64_t>(state.range(0));
  bool sequential = state.range(1) != 0;
  IotlbFixture f(n);
  auto idx = random_indices(n);
  if (sequential)
    for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = i % n;
  std::size_t i = 0;
  for (auto _ : state) {
    auto e = f.iotlb->lookup(Iova(idx[i] * 4096 + 100));
    benchmark::DoNotOptimize(e);
    if (++i == idx.size()) i = 0;
  }
}
BENCHMARK(BM_IotlbLookup)
    ->ArgsProduct({{16, 2048, 65536, 1048576}, {0, 1}})
    ->ArgNames({"entries", "seq"});

// The baseline: a list sorted by IOVA, scanned from the front until the IOVA is passed,
// which is how DPDK's lib/vhost searches its IOTLB cache.
class LinearIotlb {
 public:
  struct Entry {
    std::uint64_t iova, size, uaddr;
    std::uint8_t perm;
  };
  void insert(Entry e) {
    auto it = std::lower_bound(entries_.begin(), entries_.end(), e.iova,
                               [](const Entry& x, std::uint64_t v) { return x.iova < v; });
    entries_.insert(it, e);
  }
  const Entry* find(std::uint64_t iova) const {
    for (const Entry& e : entries_) {
      if (iova < e.iova) break;
      if (iova < e.iova + e.size) return &e;
    }
    return nullptr;
  }

 private:
  std::vector<Entry> entries_;
};

void BM_LinearIotlbLookup(benchmark::State& state) {
  std::uint64_t n = static_cast<std::uint64_t>(state.range(0));
  LinearIotlb list;
  for (std::uint64_t k = 0; k < n; ++k) list.insert({k * 4096, 4096, 0x7f0000000000 + k * 4096, 1});
  auto idx = random_indices(n);
  std::size_t i = 0;
  for (auto _ : state) {
    auto e = list.find(idx[i] * 4096 + 100);
    benchmark::DoNotOptimize(e);
    if (++i == idx.size()) i = 0;
  }
}
BENCHMARK(BM_LinearIotlbLookup)->Arg(16)->Arg(2048)->Arg(65536)->ArgName("entries");

// ---- memory table lookup ----

void BM_MemtableLookup(benchmark::State& state) {
  std::uint64_t n = static_cast<std::uint64_t>(state.range(0));
  MemoryTable table;
  auto fd = memfd(n * 4096);
  std::vector<RegionSpec> v;
  for (std::uint64_t i = 0; i < n; ++i)
    v.push_back(region(UniqueFd(::dup(fd.get())), i * 4096, 4096, i * 0x10000));
  if (!table.replace(std::move(v))) std::abort();
  auto snap = table.snapshot();
  auto idx = random_indices(n);
  std::size_t i = 0;
  for (auto _ : state) {
    auto h = snap->gpa_to_host(Gpa(idx[i] * 0x10000 + 8));
    benchmark::DoNotOptimize(h);
    if (++i == idx.size()) i = 0;
  }
}
BENCHMARK(BM_MemtableLookup)->Arg(8)->Arg(509)->ArgName("regions");

// ---- dirty log: cost per 4 KiB page ----

constexpr std::size_t kBurst = 32;  // pages marked per burst before the batch is flushed

// One iteration is one burst: kBurst pages marked (one 4 KiB write each), then, when
// batched, the flush a queue does at the end of its burst. run.sh divides by the
// pages_per_iter counter to report ns per page.
void BM_DirtyLog(benchmark::State& state) {
  bool batched = state.range(0) != 0;
  bool random = state.range(1) != 0;
  std::vector<std::uint8_t> bits(128 * 1024, 0);  // covers 4 GiB
  auto log = DirtyLog::over(bits);
  std::uint64_t pages = bits.size() * 8;
  auto idx = random_indices(pages);
  if (!random)
    for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = i % pages;
  DirtyLogBatch batch;
  std::size_t i = 0;
  for (auto _ : state) {
    if (i + kBurst > idx.size()) i = 0;
    const std::uint64_t* p = idx.data() + i;
    if (batched) {
      for (std::size_t k = 0; k < kBurst; ++k) (void)batch.mark(*log, Gpa(p[k] * 4096), 4096);
      benchmark::DoNotOptimize(batch.flush(*log));
    } else {
      for (std::size_t k = 0; k < kBurst; ++k) benchmark::DoNotOptimize(log->mark(Gpa(p[k] * 4096), 4096));
    }
    i += kBurst;
  }
  state.counters["pages_per_iter"] = kBurst;
}
BENCHMARK(BM_DirtyLog)->ArgsProduct({{1, 0}, {0, 1}})->ArgNames({"batched", "random"});

}  // namespace
}  // namespace vhostkit

BENCHMARK_MAIN();
