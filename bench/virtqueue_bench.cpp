// Virtqueue throughput: the device side (Virtqueue pop + write + push) against the guest
// driver model, on two threads, both busy-polling, no notifications.
//
// Each scenario runs `--seconds` per repetition and counts chains the device completed;
// the median over `--repetitions` is printed as BENCH lines. Scenarios:
//   1 descriptor, 64-byte device-writable buffer; 4 descriptors of 375 bytes (1500-byte
//   chains); split and packed; logging off and on; IOMMU off and on (buffers mapped at
//   IOVAs != GPAs, translations warm in the per-queue cache). The logging-off run is the
//   baseline of the logging-on run, in the same process, one after the other.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "vhostkit/frontend/guest_memory.h"
#include "vhostkit/frontend/virtio_driver.h"
#include "vhostkit/virtqueue.h"

namespace {

using namespace vhostkit;
using namespace vhostkit::frontend;

struct Scenario {
  std::string name;
  bool packed = false;
  bool logging = false;
  bool iommu = false;
  int descs = 1;
  std::uint32_t bytes = 64;  // total per chain
  bool device_only = false;  // one thread; only the device's time is counted
};

constexpr std::uint64_t kRamGpa = 0x100000;
constexpr std::uint64_t kRam = 64ULL << 20;
constexpr std::uint64_t kIovaOffset = 0x7000000000;  // buffer IOVA = GPA + offset
constexpr std::uint16_t kQueue = 256;
constexpr std::size_t kBatch = 32;

double run_once(const Scenario& s, double seconds) {
  auto mem = GuestMemory::create({{Gpa(kRamGpa), kRam}});
  if (!mem) std::abort();
  AddressSpace space(MemoryLimits{}, IotlbLimits{.max_entries = 1 << 16});
  if (!space.set_mem_table(mem->region_specs())) std::abort();
  std::vector<std::uint8_t> bits((kRamGpa + kRam) / 4096 / 8 + 1, 0);
  if (!space.set_log(DirtyLog::over(bits))) std::abort();
  space.set_logging(s.logging);

  DriverOptions opt;
  opt.packed = s.packed;
  opt.size = kQueue;
  auto drv = VirtioDriver::create(*mem, opt);
  if (!drv) std::abort();
  // Buffers: one set per descriptor slot, reused.
  std::uint32_t per = s.bytes / static_cast<std::uint32_t>(s.descs);
  auto pool = mem->alloc(static_cast<std::uint64_t>(kQueue) * s.descs * 4096, 4096);
  if (!pool) std::abort();
  if (s.iommu) {
    // Rings at IOVA == GPA, buffers at IOVA = GPA + offset: the warm-cache case.
    space.set_iommu(true);
    if (!space.iotlb_update(Iova(kRamGpa), 0x100000, Gpa(kRamGpa), Access::read_write))
      std::abort();
    if (!space.iotlb_update(Iova(pool->value + kIovaOffset),
                            static_cast<std::uint64_t>(kQueue) * s.descs * 4096, *pool,
                            Access::read_write))
      std::abort();
  }
  std::uint64_t buf_base = pool->value + (s.iommu ? kIovaOffset : 0);

  Virtqueue vq(space, LogMode::batched);
  if (!vq.start(drv->queue_config())) std::abort();

  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> done{0};
  ChainBatch batch;
  std::vector<Completion> completions;
  std::uint8_t payload[1500];
  std::memset(payload, 0x5a, sizeof payload);
  std::uint64_t empty_pops = 0, pops = 0;
  // One device burst: pop up to kBatch chains, write each one's payload, push them all.
  auto device_burst = [&]() -> std::size_t {
    batch.clear();
    completions.clear();
    vq.begin_burst();
    auto r = vq.pop(batch, kBatch);
    if (!r) std::abort();
    ++pops;
    if (batch.size() == 0) ++empty_pops;
    for (const DescChain& c : batch.chains()) {
      auto w = vq.write_chain(batch, c, 0, std::span(payload, c.writable_len));
      if (!w) std::abort();
      completions.push_back(Completion{c.id, c.ring_descs, *w});
    }
    if (!completions.empty() && !vq.push(completions)) std::abort();
    (void)vq.end_burst();
    return completions.size();
  };
  std::thread device;
  if (!s.device_only) {
    device = std::thread([&] {
      std::uint64_t n = 0;
      while (!stop.load(std::memory_order_relaxed)) n += device_burst();
      done.store(n);
    });
  }

  // The driver: keep the ring full, recycle completions.
  std::vector<DriverBuffer> bufs(static_cast<std::size_t>(s.descs));
  std::uint64_t slot = 0;
  auto fill = [&] {
    bool added = false;
    while (drv->free_descriptors() >= s.descs) {
      for (int d = 0; d < s.descs; ++d)
        bufs[static_cast<std::size_t>(d)] = DriverBuffer{
            Gpa(buf_base + ((slot * s.descs + d) % (kQueue * s.descs)) * 4096), per, true};
      if (!drv->add(bufs, false)) break;
      ++slot;
      added = true;
    }
    if (added) drv->publish();
  };
  auto start = std::chrono::steady_clock::now();
  auto end = start + std::chrono::duration<double>(seconds);
  double device_seconds = 0;
  std::uint64_t device_chains = 0;
  while (std::chrono::steady_clock::now() < end) {
    for (int i = 0; i < 64; ++i) {
      fill();
      if (s.device_only) {
        auto t0 = std::chrono::steady_clock::now();
        for (int k = 0; k < static_cast<int>(kQueue / kBatch); ++k) device_chains += device_burst();
        device_seconds +=
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      }
      while (drv->poll()) {
      }
    }
  }
  stop = true;
  if (device.joinable()) device.join();
  double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (vq.broken() || drv->device_errors() != 0) std::abort();
  if (std::getenv("VHOSTKIT_BENCH_DEBUG"))
    std::fprintf(stderr, "%s: %.1f%% of pops found nothing\n", s.name.c_str(),
                 100.0 * static_cast<double>(empty_pops) / static_cast<double>(pops ? pops : 1));
  if (s.device_only) return static_cast<double>(device_chains) / device_seconds / 1e6;
  return static_cast<double>(done.load()) / elapsed / 1e6;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 7;
  double seconds = 0.3;
  std::string only;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::string(argv[i]) == "--repetitions") reps = std::atoi(argv[i + 1]);
    if (std::string(argv[i]) == "--seconds") seconds = std::atof(argv[i + 1]);
    if (std::string(argv[i]) == "--only") only = argv[i + 1];
  }
  std::vector<Scenario> scenarios = {
      {"vq_split_mchains_per_s_64b", false, false, false, 1, 64},
      {"vq_split_device_mchains_per_s_64b", false, false, false, 1, 64, true},
      {"vq_split_device_mchains_per_s_64b_logging", false, true, false, 1, 64, true},
      {"vq_packed_device_mchains_per_s_64b", true, false, false, 1, 64, true},
      {"vq_split_device_mchains_per_s_64b_iommu", false, false, true, 1, 64, true},
      {"vq_split_mchains_per_s_64b_logging", false, true, false, 1, 64},
      {"vq_split_mchains_per_s_64b_iommu", false, false, true, 1, 64},
      {"vq_split_mchains_per_s_64b_iommu_logging", false, true, true, 1, 64},
      {"vq_packed_mchains_per_s_64b", true, false, false, 1, 64},
      {"vq_packed_mchains_per_s_64b_logging", true, true, false, 1, 64},
      {"vq_packed_mchains_per_s_64b_iommu", true, false, true, 1, 64},
      {"vq_split_mchains_per_s_1500b_4desc", false, false, false, 4, 1500},
      {"vq_split_mchains_per_s_1500b_4desc_logging", false, true, false, 4, 1500},
      {"vq_packed_mchains_per_s_1500b_4desc", true, false, false, 4, 1500},
      {"vq_packed_mchains_per_s_1500b_4desc_logging", true, true, false, 4, 1500},
  };
  // Repetitions are interleaved across scenarios (A B C ... A B C ...), so a noisy
  // moment on this shared machine hits every scenario alike; medians are reported.
  std::vector<std::vector<double>> samples(scenarios.size());
  for (int r = 0; r < reps; ++r)
    for (std::size_t i = 0; i < scenarios.size(); ++i)
      if (only.empty() || scenarios[i].name == only)
        samples[i].push_back(run_once(scenarios[i], seconds));
  std::vector<double> results;
  for (std::size_t i = 0; i < scenarios.size(); ++i) {
    results.push_back(samples[i].empty() ? 0 : median(samples[i]));
    if (!samples[i].empty())
      std::printf("BENCH name=%s value=%.2f unit=Mchains/s\n", scenarios[i].name.c_str(),
                  results[i]);
  }
  auto ratio = [&](const char* name, std::size_t on, std::size_t off) {
    if (results[on] == 0 || results[off] == 0) return;
    std::printf("BENCH name=%s value=%.3f unit=ratio\n", name, results[on] / results[off]);
  };
  auto at = [&](const char* name) {
    for (std::size_t i = 0; i < scenarios.size(); ++i)
      if (scenarios[i].name == name) return i;
    std::abort();
  };
  ratio("vq_split_64b_logging_over_off", at("vq_split_mchains_per_s_64b_logging"),
        at("vq_split_mchains_per_s_64b"));
  ratio("vq_packed_64b_logging_over_off", at("vq_packed_mchains_per_s_64b_logging"),
        at("vq_packed_mchains_per_s_64b"));
  ratio("vq_split_1500b_logging_over_off", at("vq_split_mchains_per_s_1500b_4desc_logging"),
        at("vq_split_mchains_per_s_1500b_4desc"));
  ratio("vq_split_64b_iommu_over_off", at("vq_split_mchains_per_s_64b_iommu"),
        at("vq_split_mchains_per_s_64b"));
  ratio("vq_split_device_64b_logging_over_off", at("vq_split_device_mchains_per_s_64b_logging"),
        at("vq_split_device_mchains_per_s_64b"));
  ratio("vq_split_device_64b_iommu_over_off", at("vq_split_device_mchains_per_s_64b_iommu"),
        at("vq_split_device_mchains_per_s_64b"));
  return 0;
}
