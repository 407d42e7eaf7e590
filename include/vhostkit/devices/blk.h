// vhostkit/devices/blk.h: the virtio-blk device (virtio 1.2 section 5.2) over a raw image.
//
// Concepts
//   BlkDevice    a vhostkit::Device serving a raw image file or a block device. Requests
//                VIRTIO_BLK_T_IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES; any other
//                type completes with VIRTIO_BLK_S_UNSUPP. Offers SIZE_MAX, SEG_MAX,
//                BLK_SIZE, FLUSH, MQ and, unless read-only, DISCARD and WRITE_ZEROES; RO
//                when read-only (writes then complete with VIRTIO_BLK_S_IOERR).
//   Hostile      a request is validated before any I/O: header length, data length (a
//   requests     multiple of 512 bytes), the sector range against the capacity (overflow
//                checked), the discard/write-zeroes segments (count, range, flags). A bad
//                request completes with IOERR or UNSUPP; one without room for a status byte
//                completes with length 0. Nothing a driver sends crashes the process; a
//                malformed ring breaks the queue (the Virtqueue's business).
//   Memory       every guest buffer comes from the Virtqueue: data moves directly between
//                the file and the popped chain's segments, and every segment the device
//                fills is dirty-logged at its own GPA (Translator::log_write); the header
//                and status go through read_chain / write_chain.
//   I/O engines  io_uring (one ring per queue, every read, write and flush of a process()
//                batch submitted at once, a flush ordered after the requests before it)
//                or synchronous preadv/pwritev. BlkEngine::automatic picks io_uring and falls
//                back to the synchronous engine when io_uring is unavailable; the
//                environment variable VHOSTKIT_BLK_ENGINE=sync|io_uring overrides
//                automatic (tests run both).
//   Threading    process() of queue q runs on q's worker only and touches only q's state;
//                counters are atomics.
//   State        save_state() carries the config space (a load refuses a different one:
//                the same image and options on both sides), the serial, the accepted
//                features, the counters (BlkStats continue on a migration's destination)
//                and, per queue, the completions still waiting for the used ring (pushed
//                first once the queue starts again). reset() drops those completions;
//                the counters keep counting.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "vhostkit/types.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/vhost_user/device.h"

namespace vhostkit {

namespace blk {
// Feature bits (virtio 1.2 section 5.2.3).
inline constexpr unsigned kFSizeMax = 1;
inline constexpr unsigned kFSegMax = 2;
inline constexpr unsigned kFGeometry = 4;
inline constexpr unsigned kFRo = 5;
inline constexpr unsigned kFBlkSize = 6;
inline constexpr unsigned kFFlush = 9;
inline constexpr unsigned kFTopology = 10;
inline constexpr unsigned kFConfigWce = 11;
inline constexpr unsigned kFMq = 12;
inline constexpr unsigned kFDiscard = 13;
inline constexpr unsigned kFWriteZeroes = 14;

// Request types and status values (section 5.2.6).
inline constexpr std::uint32_t kTIn = 0;
inline constexpr std::uint32_t kTOut = 1;
inline constexpr std::uint32_t kTFlush = 4;
inline constexpr std::uint32_t kTGetId = 8;
inline constexpr std::uint32_t kTGetLifetime = 10;
inline constexpr std::uint32_t kTDiscard = 11;
inline constexpr std::uint32_t kTWriteZeroes = 13;
inline constexpr std::uint32_t kTSecureErase = 14;
inline constexpr std::uint8_t kSOk = 0;
inline constexpr std::uint8_t kSIoErr = 1;
inline constexpr std::uint8_t kSUnsupp = 2;

inline constexpr std::uint64_t kSectorSize = 512;
inline constexpr std::uint32_t kIdBytes = 20;  // VIRTIO_BLK_ID_BYTES
inline constexpr std::uint32_t kWriteZeroesFlagUnmap = 1;

// Offsets in struct virtio_blk_config.
inline constexpr std::uint32_t kCfgCapacity = 0;    // le64, 512-byte sectors
inline constexpr std::uint32_t kCfgSizeMax = 8;     // le32
inline constexpr std::uint32_t kCfgSegMax = 12;     // le32
inline constexpr std::uint32_t kCfgBlkSize = 20;    // le32
inline constexpr std::uint32_t kCfgNumQueues = 34;  // le16
inline constexpr std::uint32_t kCfgMaxDiscardSectors = 36;
inline constexpr std::uint32_t kCfgMaxDiscardSeg = 40;
inline constexpr std::uint32_t kCfgDiscardAlign = 44;
inline constexpr std::uint32_t kCfgMaxWriteZeroesSectors = 48;
inline constexpr std::uint32_t kCfgMaxWriteZeroesSeg = 52;
inline constexpr std::uint32_t kCfgWriteZeroesMayUnmap = 56;
// Bytes GET_CONFIG serves: the 1.2 layout through the zoned fields (zeros past 60), so
// a front-end built against any header version can read the size it knows.
inline constexpr std::uint32_t kConfigSize = 96;
}  // namespace blk

enum class BlkEngine : std::uint8_t { automatic, io_uring, sync };

[[nodiscard]] const char* to_string(BlkEngine e);

struct BlkOptions {
  std::string path;           // raw image file or block device
  bool read_only = false;     // open O_RDONLY, offer VIRTIO_BLK_F_RO
  std::uint32_t queues = 1;   // 1 .. 64
  std::string name = "blk0";  // for log lines
  std::string serial;         // GET_ID (at most 20 bytes); default: the file name
  BlkEngine engine = BlkEngine::automatic;
  std::uint32_t queue_depth = 128;    // io_uring entries per queue
  std::uint32_t seg_max = 126;        // config seg_max
  std::uint32_t size_max = 1u << 20;  // config size_max
  std::uint32_t max_discard_sectors = 1u << 22;
  std::uint32_t max_discard_seg = 16;
  std::uint32_t max_write_zeroes_sectors = 1u << 22;
  std::uint32_t max_write_zeroes_seg = 16;
};

// Per-device counters (any thread may read them).
struct BlkStats {
  std::atomic<std::uint64_t> reads{0};
  std::atomic<std::uint64_t> writes{0};
  std::atomic<std::uint64_t> flushes{0};
  std::atomic<std::uint64_t> bytes_read{0};
  std::atomic<std::uint64_t> bytes_written{0};
  std::atomic<std::uint64_t> errors{0};          // requests completed with IOERR
  std::atomic<std::uint64_t> unsupported{0};     // requests completed with UNSUPP
  std::atomic<std::uint64_t> no_status{0};       // requests without room for a status byte
  std::atomic<std::uint64_t> push_deferrals{0};  // pushes that waited for a ring translation
};

class BlkDevice : public Device {
 public:
  // Opens the image and sets up the I/O engine of every queue. Error: a one-line reason.
  [[nodiscard]] static Result<std::unique_ptr<BlkDevice>, std::string> open(BlkOptions options);
  ~BlkDevice() override;
  BlkDevice(const BlkDevice&) = delete;
  BlkDevice& operator=(const BlkDevice&) = delete;

  [[nodiscard]] std::string name() const override { return options_.name; }
  [[nodiscard]] std::uint64_t device_features() const override;
  [[nodiscard]] std::uint32_t num_queues() const override { return options_.queues; }
  [[nodiscard]] std::vector<std::uint8_t> config() const override;
  void set_features(std::uint64_t features) override;
  QueueWork process(std::uint32_t queue, Virtqueue& vq) override;
  void queue_started(std::uint32_t queue) override;
  void reset() override;
  [[nodiscard]] DeviceStateFormat state_format() const override { return {"virtio-blk", 1}; }
  void save_state(DeviceStateWriter& out) const override;
  [[nodiscard]] Result<void, std::string> load_state(const DeviceStateReader& in,
                                                     std::uint32_t version) override;

  // Capacity in 512-byte sectors.
  [[nodiscard]] std::uint64_t capacity() const { return capacity_; }
  // The engine in use (never automatic).
  [[nodiscard]] BlkEngine engine() const { return engine_; }
  [[nodiscard]] const BlkStats& stats() const { return stats_; }
  // Completions of queue q that wait for its used ring (control thread, queue stopped).
  [[nodiscard]] std::size_t pending_completions(std::uint32_t queue) const;

 private:
  struct QueueState;
  explicit BlkDevice(BlkOptions options);

  BlkOptions options_;
  UniqueFd fd_;
  bool block_device_ = false;
  std::uint64_t capacity_ = 0;
  BlkEngine engine_ = BlkEngine::sync;
  std::atomic<std::uint64_t> features_{0};
  std::vector<std::unique_ptr<QueueState>> queues_;
  BlkStats stats_;
};

}  // namespace vhostkit
