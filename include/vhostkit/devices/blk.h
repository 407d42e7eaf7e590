// vhostkit/devices/blk.h: the virtio-blk device (virtio 1.2 section 5.2) over a raw image.
//
// Concepts
//   BlkDevice    a vhostkit::Device serving a raw image file or a block device. Requests
//                VIRTIO_BLK_T_IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES; any other
//                type completes with VIRTIO_BLK_S_UNSUPP. Offers SIZE_MAX, SEG_MAX,
//                BLK_SIZE, TOPOLOGY, FLUSH, CONFIG_WCE, MQ and, unless read-only, DISCARD
//                and WRITE_ZEROES; RO when read-only (writes then complete with
//                VIRTIO_BLK_S_IOERR).
//   Queues       num_queues request queues (default: one per online CPU); queue q is
//                served by worker q % workers (Device::worker_of), each queue with its
//                own I/O engine. A front-end starts only the queues its guest uses.
//   Block sizes  the logical block size (config blk_size) is the unit of every request:
//                a sector or length that is not a multiple of it completes with IOERR.
//                The physical block size is reported through the topology fields.
//   Cache        writeback (default): a write completes once the kernel has it (page
//                cache, or the disk's cache with O_DIRECT); FLUSH makes it durable.
//                writethrough: every write, discard and write-zeroes of a batch is made
//                durable (one fdatasync after them) before any of them completes. With
//                CONFIG_WCE the driver switches between the two by writing the config
//                field writeback; without FLUSH negotiated the device writes through.
//   Direct I/O   direct: the image is opened O_DIRECT. A request whose guest buffers are
//                not aligned as the file needs goes through an aligned bounce buffer; one
//                whose offset or length is not aligned goes through a second, buffered
//                descriptor of the same file (the kernel keeps the two coherent). The
//                driver never sees an error for alignment.
//   Hostile      a request is validated before any I/O: header length, data length (a
//   requests     multiple of the logical block size), the sector range against the
//                capacity (overflow checked), the discard/write-zeroes segments (count,
//                range, alignment, flags). A bad request completes with IOERR or UNSUPP;
//                one without room for a status byte completes with length 0. A config
//                write other than the writeback byte (0 or 1) is refused. Nothing a
//                driver sends crashes the process; a malformed ring breaks the queue (the
//                Virtqueue's business).
//   Memory       every guest buffer comes from the Virtqueue: data moves directly between
//                the file and the popped chain's segments, and every segment the device
//                fills is dirty-logged at its own GPA (Translator::log_write); the header,
//                status and bounced data go through read_chain / write_chain.
//   I/O engines  io_uring (one ring per queue, every read, write and flush of a process()
//                batch submitted at once, a flush ordered after the requests before it;
//                buffered writes, which io_uring would hand to a single kernel worker per
//                file, are written on the queue's worker instead) or synchronous
//                preadv/pwritev. BlkEngine::automatic picks io_uring and falls back to the
//                synchronous engine when io_uring is unavailable; the environment variable
//                VHOSTKIT_BLK_ENGINE=sync|io_uring overrides automatic (tests run both).
//   Threading    process() of queue q runs on q's worker only and touches only q's state;
//                counters and the cache mode are atomics.
//   Restart      inflight I/O tracking is on (Device::inflight_tracking): a vhostkit-blk
//                started after a crash carries out the requests its predecessor popped
//                and never completed, in their original order, before new ones.
//   State        save_state() carries the config space (a load refuses a different one,
//                but for the cache mode the driver chose, which moves with it: the same
//                image and options on both sides), the serial, the accepted
//                features, the counters (BlkStats continue on a migration's destination)
//                and, per queue, the completions still waiting for the used ring (pushed
//                first once the queue starts again). reset() drops those completions;
//                the counters keep counting.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
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
inline constexpr std::uint32_t kCfgCapacity = 0;           // le64, 512-byte sectors
inline constexpr std::uint32_t kCfgSizeMax = 8;            // le32
inline constexpr std::uint32_t kCfgSegMax = 12;            // le32
inline constexpr std::uint32_t kCfgBlkSize = 20;           // le32
inline constexpr std::uint32_t kCfgPhysicalBlockExp = 24;  // u8: log2(physical / logical)
inline constexpr std::uint32_t kCfgAlignmentOffset = 25;   // u8
inline constexpr std::uint32_t kCfgMinIoSize = 26;         // le16, logical blocks
inline constexpr std::uint32_t kCfgOptIoSize = 28;         // le32, logical blocks
inline constexpr std::uint32_t kCfgWriteback = 32;         // u8: 1 writeback, 0 writethrough
inline constexpr std::uint32_t kCfgNumQueues = 34;         // le16
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
enum class BlkCache : std::uint8_t { writeback, writethrough };

[[nodiscard]] const char* to_string(BlkEngine e);
[[nodiscard]] const char* to_string(BlkCache c);

// The number of CPUs this process may run on (at least 1): the default queue count.
[[nodiscard]] std::uint32_t online_cpus();

struct BlkOptions {
  std::string path;           // raw image file or block device
  bool read_only = false;     // open O_RDONLY, offer VIRTIO_BLK_F_RO
  std::uint32_t queues = 0;   // 1 .. 64; 0: one per online CPU (at most 64)
  std::uint32_t workers = 0;  // worker threads, 1 .. queues; 0: min(queues, online CPUs)
  bool direct = false;        // O_DIRECT
  BlkCache cache = BlkCache::writeback;
  std::uint32_t logical_block_size = 512;  // 512 .. 4096, a power of two
  std::uint32_t physical_block_size = 0;   // logical .. 1 MiB, a power of two; 0: logical
  std::string name = "blk0";               // for log lines
  std::string serial;                      // GET_ID (at most 20 bytes); default: the file name
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
  std::atomic<std::uint64_t> bounced{0};         // requests copied through a bounce buffer
  std::atomic<std::uint64_t> unaligned{0};       // direct-mode requests served buffered
  std::atomic<std::uint64_t> durable_syncs{0};   // writethrough fdatasyncs
};

class BlkDevice : public Device {
 public:
  // Opens the image and sets up the I/O engine of every queue. Error: a one-line reason.
  [[nodiscard]] static Result<std::unique_ptr<BlkDevice>, std::string> open(BlkOptions options);
  ~BlkDevice() override;
  BlkDevice(const BlkDevice&) = delete;
  BlkDevice& operator=(const BlkDevice&) = delete;

  [[nodiscard]] std::string name() const override { return options_.name; }
  // Inflight I/O tracking: on. A request a crashed back-end left in flight is carried
  // out again by its successor (a write written twice, a read read again).
  [[nodiscard]] bool inflight_tracking() const override { return true; }
  [[nodiscard]] std::uint64_t device_features() const override;
  [[nodiscard]] std::uint32_t num_queues() const override { return options_.queues; }
  [[nodiscard]] std::vector<std::uint8_t> config() const override;
  // Accepts only the writeback byte (0 or 1) with CONFIG_WCE negotiated.
  [[nodiscard]] bool set_config(std::uint32_t offset, std::span<const std::uint8_t> data) override;
  void set_features(std::uint64_t features) override;
  [[nodiscard]] std::uint32_t worker_of(std::uint32_t queue) const override {
    return queue % options_.workers;
  }
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
  // The options in force (defaults resolved: queues, workers, physical block size).
  [[nodiscard]] const BlkOptions& options() const { return options_; }
  // Whether writes complete only once durable (the cache mode the driver sees).
  [[nodiscard]] bool writethrough() const;
  // O_DIRECT alignment of memory and of file offsets (1 without --direct).
  [[nodiscard]] std::uint32_t dio_mem_align() const { return dio_mem_align_; }
  [[nodiscard]] std::uint32_t dio_offset_align() const { return dio_offset_align_; }
  [[nodiscard]] const BlkStats& stats() const { return stats_; }
  // Completions of queue q that wait for its used ring (control thread, queue stopped).
  [[nodiscard]] std::size_t pending_completions(std::uint32_t queue) const;

 private:
  struct QueueState;
  explicit BlkDevice(BlkOptions options);

  BlkOptions options_;
  UniqueFd fd_;
  UniqueFd buffered_fd_;  // --direct: the same file without O_DIRECT, for unaligned requests
  std::uint32_t dio_mem_align_ = 1;
  std::uint32_t dio_offset_align_ = 1;
  bool block_device_ = false;
  std::uint64_t capacity_ = 0;
  BlkEngine engine_ = BlkEngine::sync;
  std::atomic<std::uint64_t> features_{0};
  std::atomic<bool> features_set_{false};
  std::atomic<bool> writeback_{true};  // the config field; the driver may change it
  std::vector<std::unique_ptr<QueueState>> queues_;
  BlkStats stats_;
};

}  // namespace vhostkit
