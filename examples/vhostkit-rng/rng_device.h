// rng_device.h: a virtio entropy device (virtio 1.2 section 5.4, device id 4) on vhostkit.
//
// Concepts
//   RngDevice  one virtqueue (requestq). The driver posts device-writable buffers; the
//              device fills each with bytes read from an entropy source (/dev/urandom)
//              and completes it with the number of bytes written. Everything it touches
//              in guest memory goes through the Virtqueue (translation, IOMMU, dirty log).
//   Limits     a request is filled with at most kMaxRequestBytes (the specification lets
//              the device use less than the whole buffer), so a hostile 4 GiB buffer
//              costs no more than a normal one. A chain with no device-writable byte
//              is completed with length 0 and counted.
//   Threads    process() runs on the queue's worker thread; the counters may be read
//              from any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "vhostkit/types.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/vhost_user/device.h"
#include "vhostkit/virtqueue.h"

namespace rng {

inline constexpr std::uint32_t kVirtioIdRng = 4;
inline constexpr std::uint32_t kMaxRequestBytes = 64 * 1024;
inline constexpr std::size_t kBurst = 32;  // chains popped per process() call

struct RngStats {
  std::atomic<std::uint64_t> requests{0};       // chains completed
  std::atomic<std::uint64_t> bytes{0};          // random bytes written to the guest
  std::atomic<std::uint64_t> unwritable{0};     // chains without a writable byte
  std::atomic<std::uint64_t> source_errors{0};  // failed reads of the entropy source
};

class RngDevice : public vhostkit::Device {
 public:
  // Opens the entropy source (a character device or a file) for reading.
  [[nodiscard]] static vhostkit::Result<std::unique_ptr<RngDevice>, std::string> open(
      std::string name, const std::string& source);

  std::string name() const override { return name_; }
  std::uint64_t device_features() const override { return 0; }  // virtio-rng has none
  std::uint32_t num_queues() const override { return 1; }
  vhostkit::QueueWork process(std::uint32_t queue, vhostkit::Virtqueue& vq) override;
  void reset() override;

  [[nodiscard]] const RngStats& stats() const { return stats_; }

 private:
  RngDevice(std::string name, std::string source, vhostkit::UniqueFd fd);
  // Fills buf with bytes from the source; false (logged) if it fails.
  bool fill(std::uint8_t* buf, std::size_t len);

  std::string name_;
  std::string source_;
  vhostkit::UniqueFd fd_;
  RngStats stats_;
  std::uint64_t bytes_at_reset_ = 0;
  std::uint64_t requests_at_reset_ = 0;
  bool warned_unwritable_ = false;  // worker thread only
  // Worker thread only: reused between calls.
  vhostkit::ChainBatch batch_;
  std::vector<vhostkit::Completion> done_;
  std::vector<std::uint8_t> buf_;
};

}  // namespace rng
