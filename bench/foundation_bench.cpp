// Foundation benchmarks: translate hit latency, IOTLB lookup scaling against a
// linear-list baseline (the structure DPDK's lib/vhost uses), memory-table lookup and
// dirty-log marking with and without the write-combining batch.
//
// Guest memory and the dirty log are memfd mappings (MAP_SHARED), as in a real backend.
// Every address sequence is computed before the timed loop, so the random number
// generator is not measured. bench/run.sh runs this binary and turns the medians into
// BENCH lines; docs/benchmarks.md explains each figure.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include <benchmark/benchmark.h>

#include "vhostkit/translate.h"

namespace vhostkit {
namespace {

constexpr std::uint64_t kMiB = 1 << 20;
constexpr std::size_t kSequence = 1 << 20;  // precomputed addresses per benchmark

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "foundation_bench: setup failed: %s\n", what);
  std::abort();
}

UniqueFd memfd(std::uint64_t size) {
  int fd = ::memfd_create("vhostkit-bench", MFD_CLOEXEC);
  if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(size)) != 0) die("memfd");
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

// kSequence indices in [0, n), uniformly random (fixed seed).
std::vector<std::uint64_t> random_indices(std::uint64_t n) {
  std::mt19937_64 rng(42);
  std::vector<std::uint64_t> v(kSequence);
  for (auto& x : v) x = rng() % n;
  return v;
}

// 0, 1, ..., n - 1, 0, 1, ...
std::vector<std::uint64_t> sequential_indices(std::uint64_t n) {
  std::vector<std::uint64_t> v(kSequence);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = i % n;
  return v;
}

// ---- translate hit (per-queue cache) ----

void BM_TranslateCached(benchmark::State& state) {
  bool iommu = state.range(0) != 0;
  AddressSpace space;
  std::vector<RegionSpec> v;
  v.push_back(region(memfd(kMiB), 0, kMiB, 0x100000));
  if (!space.set_mem_table(std::move(v))) die("set_mem_table");
  std::uint64_t base = 0x100000;
  if (iommu) {
    // IOVA != GPA, so a translation that ignored the IOTLB would fault, not pass.
    space.set_iommu(true);
    if (!space.iotlb_update(Iova(0xfe000000), kMiB, Gpa(0x100000), Access::read_write))
      die("iotlb_update");
    base = 0xfe000000;
  }
  Translator tr(space);
  Segment segs[2];
  if (!tr.translate(Iova(base), 64, Access::read, segs)) die("warm-up translate");
  std::uint64_t off = 0;
  for (auto _ : state) {
    auto n = tr.translate(Iova(base + off), 64, Access::read, segs);
    benchmark::DoNotOptimize(n);
    benchmark::DoNotOptimize(segs[0].host);
    off = (off + 64) & 0xfff;  // stay within one cached entry, vary the address
  }
  if (tr.cache_misses() > 1) state.SkipWithError("translation cache missed in the loop");
}
BENCHMARK(BM_TranslateCached)->Arg(1)->Arg(0)->ArgName("iommu");

// ---- IOTLB lookup: vhostkit vs a linear list ----

struct IotlbFixture {
  MemoryTable table;
  std::unique_ptr<DeviceIotlb> iotlb;
  explicit IotlbFixture(std::uint64_t n) {
    if (!table.add(region(memfd(4096), 0, 4096, 0))) die("memory table");
    iotlb = std::make_unique<DeviceIotlb>(IotlbLimits{.max_entries = n});
    iotlb->rebind(table.snapshot());
    // n entries of 4 KiB at IOVAs 0, 4096, ..., inserted in a scattered order, as a
    // guest mapping and unmapping would.
    std::mt19937_64 rng(7);
    std::vector<std::uint64_t> order(n);
    for (std::uint64_t i = 0; i < n; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    for (auto k : order)
      if (!iotlb->update_gpa(Iova(k * 4096), 4096, Gpa(0), Access::read)) die("iotlb update");
    if (iotlb->size() != n || iotlb->evictions() != 0) die("iotlb size");
  }
};

void BM_IotlbLookup(benchmark::State& state) {
  std::uint64_t n = static_cast<std::uint64_t>(state.range(0));
  bool sequential = state.range(1) != 0;
  IotlbFixture f(n);
  auto idx = sequential ? sequential_indices(n) : random_indices(n);
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

// The baseline: a list of {iova, size, uaddr, perm} kept sorted by IOVA and scanned
// from the front until the IOVA is passed, which is how DPDK's lib/vhost searches its
// IOTLB cache (a sorted TAILQ). A vector rather than a linked list: the scan is the
// same, and the list's pointer chasing would only make the baseline slower.
class LinearIotlb {
 public:
  struct Entry {
    std::uint64_t iova;
    std::uint64_t size;
    std::uint64_t uaddr;
    std::uint8_t perm;
  };
  void insert(Entry e) {
    auto it = std::lower_bound(entries_.begin(), entries_.end(), e.iova,
                               [](const Entry& x, std::uint64_t v) { return x.iova < v; });
    entries_.insert(it, e);
  }
  [[nodiscard]] const Entry* find(std::uint64_t iova) const {
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
  bool sequential = state.range(1) != 0;
  LinearIotlb list;
  for (std::uint64_t k = 0; k < n; ++k) list.insert({k * 4096, 4096, 0x7f0000000000 + k * 4096, 1});
  auto idx = sequential ? sequential_indices(n) : random_indices(n);
  std::size_t i = 0;
  for (auto _ : state) {
    auto e = list.find(idx[i] * 4096 + 100);
    benchmark::DoNotOptimize(e);
    if (++i == idx.size()) i = 0;
  }
}
// No 1,048,576 entries: one lookup would scan half a million entries (about 0.1 ms).
BENCHMARK(BM_LinearIotlbLookup)
    ->ArgsProduct({{16, 2048, 65536}, {0, 1}})
    ->ArgNames({"entries", "seq"});

// ---- memory table lookup ----

void BM_MemtableLookup(benchmark::State& state) {
  std::uint64_t n = static_cast<std::uint64_t>(state.range(0));
  MemoryTable table;
  auto fd = memfd(n * 4096);
  std::vector<RegionSpec> v;
  // n regions of 4 KiB from one memfd, at GPAs 64 KiB apart (holes between them).
  for (std::uint64_t i = 0; i < n; ++i)
    v.push_back(region(UniqueFd(::dup(fd.get())), i * 4096, 4096, i * 0x10000));
  if (!table.replace(std::move(v))) die("memory table");
  auto snap = table.snapshot();
  if (snap->regions().size() != n) die("region count");
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

constexpr std::size_t kBurst = 32;               // pages marked per burst
constexpr std::uint64_t kLogBytes = 128 * 1024;  // covers 4 GiB of guest memory
constexpr std::uint64_t kLogPages = kLogBytes * 8;

enum class Pattern : std::int64_t { sequential = 0, random = 1, clustered = 2 };

// Page numbers for the dirty-log benchmark, kBurst per burst.
std::vector<std::uint64_t> log_pages(Pattern pattern) {
  switch (pattern) {
    case Pattern::sequential: return sequential_indices(kLogPages);
    case Pattern::random: return random_indices(kLogPages);
    case Pattern::clustered: {
      // Each burst writes kBurst random pages of one random 64-page (256 KiB) window,
      // i.e. of one 64-bit word of the log: what the batch's word cache is for.
      std::mt19937_64 rng(43);
      std::vector<std::uint64_t> v(kSequence);
      for (std::size_t i = 0; i < v.size(); i += kBurst) {
        std::uint64_t window = rng() % (kLogPages / 64);
        for (std::size_t k = 0; k < kBurst; ++k) v[i + k] = window * 64 + rng() % 64;
      }
      return v;
    }
  }
  die("pattern");
}

// One iteration is one burst: kBurst pages marked (one 4 KiB write each), then, when
// batched, the flush a queue does at the end of its burst. run.sh divides by the
// pages_per_iter counter to report ns per page.
void BM_DirtyLog(benchmark::State& state) {
  bool batched = state.range(0) != 0;
  auto pattern = static_cast<Pattern>(state.range(1));
  // The log is a shared memfd mapping, as SET_LOG_BASE provides it; touched once so
  // that no page fault is measured.
  auto mapped = DirtyLog::map(memfd(kLogBytes), kLogBytes, 0);
  if (!mapped) die("dirty log map");
  std::shared_ptr<DirtyLog> log = *mapped;
  std::memset(log->data(), 0, kLogBytes);
  auto pages = log_pages(pattern);
  DirtyLogBatch batch;
  std::size_t i = 0;
  for (auto _ : state) {
    if (i + kBurst > pages.size()) i = 0;
    const std::uint64_t* p = pages.data() + i;
    if (batched) {
      for (std::size_t k = 0; k < kBurst; ++k) (void)batch.mark(*log, Gpa(p[k] * 4096), 4096);
      benchmark::DoNotOptimize(batch.flush(*log));
    } else {
      for (std::size_t k = 0; k < kBurst; ++k)
        benchmark::DoNotOptimize(log->mark(Gpa(p[k] * 4096), 4096));
    }
    i += kBurst;
  }
  state.counters["pages_per_iter"] = kBurst;
  if (log->out_of_range_count() != 0) state.SkipWithError("marks beyond the log");
}
BENCHMARK(BM_DirtyLog)
    ->ArgsProduct({{1, 0}, {0, 1, 2}})  // Pattern: sequential, random, clustered
    ->ArgNames({"batched", "pattern"});

}  // namespace
}  // namespace vhostkit

BENCHMARK_MAIN();
