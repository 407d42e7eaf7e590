// The virtio-blk device: request parsing and validation, data movement through the
// queue's I/O engine, completion.
#include "vhostkit/devices/blk.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <limits>

#include <fmt/format.h>

#include "devices/blk/io_engine.h"
#include "vhostkit/log.h"

namespace vhostkit {

using namespace blk;

const char* to_string(BlkCache c) {
  return c == BlkCache::writeback ? "writeback" : "writethrough";
}

std::uint32_t online_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0)
    return static_cast<std::uint32_t>(CPU_COUNT(&set));
  long n = ::sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<std::uint32_t>(n) : 1;
}

const char* to_string(BlkEngine e) {
  switch (e) {
    case BlkEngine::automatic: return "auto";
    case BlkEngine::io_uring: return "io_uring";
    case BlkEngine::sync: return "sync";
  }
  return "?";
}

namespace {

constexpr std::size_t kBatch = 64;                 // chains per process() call
constexpr std::uint64_t kBounceChunk = 1u << 20;   // bounce-buffer copy unit
constexpr std::uint32_t kMaxDioAlign = 64 * 1024;  // larger O_DIRECT alignments are refused
constexpr std::uint32_t kHeaderBytes = 16;         // struct virtio_blk_outhdr
constexpr std::uint32_t kRangeBytes = 16;          // struct virtio_blk_discard_write_zeroes

std::uint32_t le32(const std::uint8_t* p) {
  std::uint32_t v;
  std::memcpy(&v, p, 4);
  return v;  // x86-64 and every target vhostkit builds for are little-endian
}
std::uint64_t le64(const std::uint8_t* p) {
  std::uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
template <typename T>
void put(std::vector<std::uint8_t>& cfg, std::uint32_t off, T v) {
  std::memcpy(cfg.data() + off, &v, sizeof v);
}

// A request on its way through process().
struct Pending {
  std::uint32_t chain = 0;  // index in the batch
  std::uint32_t type = 0;
  std::uint8_t status = kSOk;
  bool has_status = true;       // the chain has a writable byte for the status
  std::uint32_t written = 0;    // data bytes written into the chain (before the status)
  std::int32_t io = -1;         // index in QueueState::ios, if I/O was submitted
  std::uint32_t first_iov = 0;  // its vector in QueueState::iovs
  std::uint64_t data_len = 0;
  bool durable = false;  // writethrough: fails if the batch's closing fdatasync fails
};

bool is_pow2(std::uint32_t v) {
  return v != 0 && (v & (v - 1)) == 0;
}

struct FreeDeleter {
  void operator()(std::uint8_t* p) const { std::free(p); }
};

}  // namespace

struct BlkDevice::QueueState {
  ChainBatch batch;
  std::unique_ptr<IoEngine> engine;
  std::vector<Pending> pending;
  std::vector<IoRequest> ios;
  std::vector<iovec> iovs;
  std::vector<Completion> done;
  std::vector<std::uint8_t> scratch;  // zeroes for a write-zeroes the file system refuses
  // The bounce buffer (kBounceChunk bytes, aligned to a page or more, so O_DIRECT takes it).
  std::unique_ptr<std::uint8_t, FreeDeleter> bounce;
  // Completions whose push met an IOTLB miss on a used-ring area (the ring's
  // translation was invalidated while the batch ran): pushed first on the next call.
  std::vector<Completion> unpushed;
  // The queue (re)started with unpushed completions its new Virtqueue did not pop: they
  // are adopted as in flight before the first push (control thread sets, worker clears).
  bool adopt_unpushed = false;
  bool warned_no_status = false;
};

BlkDevice::BlkDevice(BlkOptions options) : options_(std::move(options)) {}
BlkDevice::~BlkDevice() = default;

Result<std::unique_ptr<BlkDevice>, std::string> BlkDevice::open(BlkOptions options) {
  using tl::unexpected;
  if (options.queues == 0) options.queues = std::min<std::uint32_t>(online_cpus(), 64);
  if (options.queues < 1 || options.queues > 64)
    return unexpected(
        fmt::format("{}: queues must be 1 .. 64, not {}", options.name, options.queues));
  if (options.workers == 0) options.workers = std::min(options.queues, online_cpus());
  if (options.workers > options.queues)
    return unexpected(fmt::format("{}: {} workers for {} queues (at most one per queue)",
                                  options.name, options.workers, options.queues));
  if (!is_pow2(options.logical_block_size) || options.logical_block_size < kSectorSize ||
      options.logical_block_size > 4096)
    return unexpected(fmt::format("{}: logical block size must be 512, 1024, 2048 or 4096, not {}",
                                  options.name, options.logical_block_size));
  if (options.physical_block_size == 0) options.physical_block_size = options.logical_block_size;
  if (!is_pow2(options.physical_block_size) ||
      options.physical_block_size < options.logical_block_size ||
      options.physical_block_size > (1u << 20))
    return unexpected(fmt::format(
        "{}: physical block size must be a power of two from the logical block size ({}) to "
        "1 MiB, not {}",
        options.name, options.logical_block_size, options.physical_block_size));
  if (options.path.empty()) return unexpected(fmt::format("{}: no image path", options.name));
  if (options.queue_depth < 1 || options.queue_depth > 4096)
    return unexpected(fmt::format("{}: queue depth must be 1 .. 4096", options.name));
  if (options.engine == BlkEngine::automatic) {
    if (const char* env = std::getenv("VHOSTKIT_BLK_ENGINE"); env != nullptr) {
      std::string e = env;
      if (e == "sync")
        options.engine = BlkEngine::sync;
      else if (e == "io_uring")
        options.engine = BlkEngine::io_uring;
      else if (!e.empty() && e != "auto")
        return unexpected(fmt::format("VHOSTKIT_BLK_ENGINE={} is not sync, io_uring or auto", e));
    }
  }
  std::unique_ptr<BlkDevice> d(new BlkDevice(std::move(options)));
  BlkOptions& o = d->options_;
  const int access = (o.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  int fd = ::open(o.path.c_str(), access | (o.direct ? O_DIRECT : 0));
  if (fd < 0 && o.direct && errno == EINVAL)
    return unexpected(fmt::format("{}: the file system does not support O_DIRECT", o.path));
  if (fd < 0) return unexpected(fmt::format("cannot open {}: {}", o.path, std::strerror(errno)));
  d->fd_.reset(fd);
  struct stat st {};
  if (::fstat(fd, &st) != 0)
    return unexpected(fmt::format("cannot stat {}: {}", o.path, std::strerror(errno)));
  std::uint64_t bytes = 0;
  if (S_ISBLK(st.st_mode)) {
    d->block_device_ = true;
    if (::ioctl(fd, BLKGETSIZE64, &bytes) != 0)
      return unexpected(fmt::format("cannot size {}: {}", o.path, std::strerror(errno)));
  } else if (S_ISREG(st.st_mode)) {
    bytes = static_cast<std::uint64_t>(st.st_size);
  } else {
    return unexpected(fmt::format("{} is neither a regular file nor a block device", o.path));
  }
  if (o.direct) {
    // What O_DIRECT needs: the kernel says (statx, Linux 6.1), else the device's logical
    // sector size, else the page size.
    std::uint32_t mem = 0, off = 0;
    struct statx sx {};
    if (::statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 &&
        (sx.stx_mask & STATX_DIOALIGN) != 0) {
      if (sx.stx_dio_offset_align == 0)
        return unexpected(fmt::format("{}: the file system does not support O_DIRECT", o.path));
      mem = sx.stx_dio_mem_align;
      off = sx.stx_dio_offset_align;
    } else if (int ss = 0; d->block_device_ && ::ioctl(fd, BLKSSZGET, &ss) == 0 && ss > 0) {
      mem = off = static_cast<std::uint32_t>(ss);
    } else {
      mem = off = 4096;
    }
    if (!is_pow2(mem) || !is_pow2(off) || mem > kMaxDioAlign || off > kMaxDioAlign)
      return unexpected(
          fmt::format("{}: unusable O_DIRECT alignment (memory {}, offset {})", o.path, mem, off));
    d->dio_mem_align_ = mem;
    d->dio_offset_align_ = off;
    int plain = ::open(o.path.c_str(), access);
    if (plain < 0)
      return unexpected(fmt::format("cannot open {}: {}", o.path, std::strerror(errno)));
    d->buffered_fd_.reset(plain);
  }
  // Whole logical blocks only.
  d->capacity_ = bytes / o.logical_block_size * (o.logical_block_size / kSectorSize);
  if (o.serial.empty()) {
    auto slash = o.path.find_last_of('/');
    o.serial = slash == std::string::npos ? o.path : o.path.substr(slash + 1);
  }
  if (o.serial.size() > kIdBytes) o.serial.resize(kIdBytes);
  d->writeback_.store(o.cache == BlkCache::writeback, std::memory_order_relaxed);

  BlkEngine want = o.engine;
  d->engine_ = want == BlkEngine::sync ? BlkEngine::sync : BlkEngine::io_uring;
  for (std::uint32_t q = 0; q < o.queues; ++q) {
    auto s = std::make_unique<QueueState>();
    if (d->engine_ == BlkEngine::io_uring) {
      auto e = make_uring_engine(o.queue_depth);
      if (e) {
        s->engine = std::move(*e);
      } else if (want == BlkEngine::io_uring) {
        return unexpected(fmt::format("{}: io_uring unavailable: {}", o.name, e.error()));
      } else {
        log(LogLevel::warn, "{}: io_uring unavailable ({}), using synchronous I/O", o.name,
            e.error());
        d->engine_ = BlkEngine::sync;
        for (auto& prev : d->queues_) prev->engine = make_sync_engine();
      }
    }
    if (!s->engine) s->engine = make_sync_engine();
    d->queues_.push_back(std::move(s));
  }
  log(LogLevel::info,
      "{}: {} ({} sectors{}), {} queue(s) on {} worker(s), {} engine, {}{}, blocks {}/{}", o.name,
      o.path, d->capacity_, o.read_only ? ", read-only" : "", o.queues, o.workers,
      to_string(d->engine_), to_string(o.cache), o.direct ? ", O_DIRECT" : "", o.logical_block_size,
      o.physical_block_size);
  return d;
}

std::uint64_t BlkDevice::device_features() const {
  std::uint64_t f = virtio::bit(kFSizeMax) | virtio::bit(kFSegMax) | virtio::bit(kFBlkSize) |
                    virtio::bit(kFTopology) | virtio::bit(kFFlush) | virtio::bit(kFConfigWce) |
                    virtio::bit(kFMq);
  if (options_.read_only)
    f |= virtio::bit(kFRo);
  else
    f |= virtio::bit(kFDiscard) | virtio::bit(kFWriteZeroes);
  return f;
}

bool BlkDevice::writethrough() const {
  // Without FLUSH the driver has no way to make a write durable: write through
  // (virtio 1.2 section 5.2.5).
  if (features_set_.load(std::memory_order_relaxed) &&
      !(features_.load(std::memory_order_relaxed) & virtio::bit(kFFlush)))
    return true;
  return !writeback_.load(std::memory_order_relaxed);
}

std::vector<std::uint8_t> BlkDevice::config() const {
  std::vector<std::uint8_t> cfg(kConfigSize, 0);
  const std::uint32_t lbs = options_.logical_block_size;
  const std::uint32_t pbs = options_.physical_block_size;
  put<std::uint64_t>(cfg, kCfgCapacity, capacity_);
  put<std::uint32_t>(cfg, kCfgSizeMax, options_.size_max);
  put<std::uint32_t>(cfg, kCfgSegMax, options_.seg_max);
  put<std::uint32_t>(cfg, kCfgBlkSize, lbs);
  cfg[kCfgPhysicalBlockExp] = static_cast<std::uint8_t>(__builtin_ctz(pbs / lbs));
  cfg[kCfgAlignmentOffset] = 0;
  put<std::uint16_t>(cfg, kCfgMinIoSize, static_cast<std::uint16_t>(std::min(pbs / lbs, 0xffffu)));
  put<std::uint32_t>(cfg, kCfgOptIoSize, 0);
  cfg[kCfgWriteback] = writethrough() ? 0 : 1;
  put<std::uint16_t>(cfg, kCfgNumQueues, static_cast<std::uint16_t>(options_.queues));
  if (!options_.read_only) {
    // Limits and alignment in 512-byte sectors (the unit of the discard fields).
    put<std::uint32_t>(cfg, kCfgMaxDiscardSectors, options_.max_discard_sectors);
    put<std::uint32_t>(cfg, kCfgMaxDiscardSeg, options_.max_discard_seg);
    put<std::uint32_t>(cfg, kCfgDiscardAlign,
                       std::max<std::uint32_t>(8, pbs / kSectorSize));  // the host punches pages
    put<std::uint32_t>(cfg, kCfgMaxWriteZeroesSectors, options_.max_write_zeroes_sectors);
    put<std::uint32_t>(cfg, kCfgMaxWriteZeroesSeg, options_.max_write_zeroes_seg);
    cfg[kCfgWriteZeroesMayUnmap] = 1;
  }
  return cfg;
}

bool BlkDevice::set_config(std::uint32_t offset, std::span<const std::uint8_t> data) {
  // The only writable field is writeback (virtio 1.2 section 5.2.4), and only with
  // CONFIG_WCE; QEMU writes exactly that byte.
  const bool wce = features_set_.load(std::memory_order_relaxed) &&
                   (features_.load(std::memory_order_relaxed) & virtio::bit(kFConfigWce)) != 0;
  if (!wce || offset != kCfgWriteback || data.size() != 1 || data[0] > 1) {
    log(LogLevel::warn, "{}: config write of {} bytes at {} refused{}", options_.name, data.size(),
        offset, wce ? "" : " (CONFIG_WCE not negotiated)");
    return false;
  }
  writeback_.store(data[0] == 1, std::memory_order_relaxed);
  log(LogLevel::info, "{}: the driver set the cache to {}", options_.name,
      data[0] == 1 ? "writeback" : "writethrough");
  return true;
}

void BlkDevice::set_features(std::uint64_t features) {
  features_.store(features, std::memory_order_relaxed);
  features_set_.store(true, std::memory_order_relaxed);
}

void BlkDevice::reset() {
  features_.store(0, std::memory_order_relaxed);
  features_set_.store(false, std::memory_order_relaxed);
  writeback_.store(options_.cache == BlkCache::writeback, std::memory_order_relaxed);
  // Completions of the reset driver's requests never reach its successor's rings.
  for (auto& q : queues_) {
    q->unpushed.clear();
    q->adopt_unpushed = false;
  }
}

void BlkDevice::queue_started(std::uint32_t queue) {
  if (queue < queues_.size()) queues_[queue]->adopt_unpushed = !queues_[queue]->unpushed.empty();
}

std::size_t BlkDevice::pending_completions(std::uint32_t queue) const {
  return queue < queues_.size() ? queues_[queue]->unpushed.size() : 0;
}

namespace {
// Record tags of the virtio-blk state, version 1.
enum BlkTag : std::uint16_t {
  kTagConfig = 1,    // bytes: the config space GET_CONFIG serves
  kTagSerial = 2,    // text: GET_ID
  kTagFeatures = 3,  // u64: the features the driver accepted
  kTagStats = 4,     // group: BlkStats, tags below
  kTagQueues = 5,    // group: per queue (tag = index) a group with kTagCompletions
};
enum BlkQueueTag : std::uint16_t {
  kTagCompletions = 1,  // bytes: {id u16, ring_descs u16, len u32} little-endian each
};
constexpr std::size_t kCompletionBytes = 8;
// BlkStats in record order, tags 1...
constexpr std::atomic<std::uint64_t> BlkStats::*kStatFields[] = {
    &BlkStats::reads,       &BlkStats::writes,        &BlkStats::flushes,
    &BlkStats::bytes_read,  &BlkStats::bytes_written, &BlkStats::errors,
    &BlkStats::unsupported, &BlkStats::no_status,     &BlkStats::push_deferrals};
}  // namespace

void BlkDevice::save_state(DeviceStateWriter& out) const {
  out.bytes(kTagConfig, config());
  out.text(kTagSerial, options_.serial);
  out.u64(kTagFeatures, features_.load(std::memory_order_relaxed));
  DeviceStateWriter stats;
  for (std::uint16_t i = 0; i < std::size(kStatFields); ++i)
    stats.u64(static_cast<std::uint16_t>(i + 1), (stats_.*kStatFields[i]).load());
  out.group(kTagStats, stats);
  DeviceStateWriter queues;
  for (std::uint32_t q = 0; q < queues_.size(); ++q) {
    std::vector<std::uint8_t> done;
    for (const Completion& c : queues_[q]->unpushed) {
      std::uint8_t b[kCompletionBytes];
      std::memcpy(b, &c.id, 2);
      std::memcpy(b + 2, &c.ring_descs, 2);
      std::memcpy(b + 4, &c.len, 4);
      done.insert(done.end(), b, b + kCompletionBytes);
    }
    DeviceStateWriter queue;
    queue.bytes(kTagCompletions, done);
    queues.group(static_cast<std::uint16_t>(q), queue);
  }
  out.group(kTagQueues, queues);
}

Result<void, std::string> BlkDevice::load_state(const DeviceStateReader& in,
                                                std::uint32_t /*version*/) {
  using tl::unexpected;
  auto err = [](const DeviceStateError& e) { return unexpected(e.message()); };
  // Everything is read and checked first; the device changes only once all of it passed.
  auto cfg = in.bytes(kTagConfig);
  if (!cfg) return err(cfg.error());
  const std::vector<std::uint8_t> mine = config();
  if (cfg->size() != mine.size())
    return unexpected(
        fmt::format("config space of {} bytes, this device's has {}", cfg->size(), mine.size()));
  std::uint64_t their_capacity = le64(cfg->data() + kCfgCapacity);
  if (their_capacity != capacity_)
    return unexpected(
        fmt::format("the source's disk has {} sectors, this one {}: not the same image",
                    their_capacity, capacity_));
  // Every field must match but the cache mode, which the source's driver may have
  // switched (CONFIG_WCE): it moves with the state.
  for (std::size_t i = 0; i < mine.size(); ++i)
    if (i != kCfgWriteback && (*cfg)[i] != mine[i])
      return unexpected(fmt::format(
          "config space byte {} is {:#x} in the state, {:#x} here: start the destination with "
          "the source's options",
          i, (*cfg)[i], mine[i]));
  if ((*cfg)[kCfgWriteback] > 1)
    return unexpected(fmt::format("config writeback byte {:#x}", (*cfg)[kCfgWriteback]));
  auto serial = in.text(kTagSerial);
  if (!serial) return err(serial.error());
  if (serial->size() > kIdBytes)
    return unexpected(fmt::format("serial of {} bytes (at most {})", serial->size(), kIdBytes));
  auto features = in.u64(kTagFeatures);
  if (!features) return err(features.error());
  if (const std::uint64_t extra = unoffered_device_bits(*features); extra != 0)
    return unexpected(
        fmt::format("the driver accepted features {:#x} this device does not offer", extra));
  auto stats = in.group(kTagStats);
  if (!stats) return err(stats.error());
  std::uint64_t counts[std::size(kStatFields)];
  for (std::uint16_t i = 0; i < std::size(kStatFields); ++i) {
    auto v = stats->u64(static_cast<std::uint16_t>(i + 1));
    if (!v) return err(v.error());
    counts[i] = *v;
  }
  auto queues = in.group(kTagQueues);
  if (!queues) return err(queues.error());
  if (queues->records().size() != queues_.size())
    return unexpected(fmt::format("state of {} queues, this device has {}",
                                  queues->records().size(), queues_.size()));
  std::vector<std::vector<Completion>> pending(queues_.size());
  for (std::uint32_t q = 0; q < queues_.size(); ++q) {
    auto queue = queues->group(static_cast<std::uint16_t>(q));
    if (!queue) return err(queue.error());
    auto done = queue->bytes(kTagCompletions);
    if (!done) return err(done.error());
    if (done->size() % kCompletionBytes != 0 ||
        done->size() / kCompletionBytes > virtio::kMaxQueueSize)
      return unexpected(fmt::format("queue {}: {} bytes of completions", q, done->size()));
    for (std::size_t off = 0; off < done->size(); off += kCompletionBytes) {
      Completion c;
      std::memcpy(&c.id, done->data() + off, 2);
      std::memcpy(&c.ring_descs, done->data() + off + 2, 2);
      std::memcpy(&c.len, done->data() + off + 4, 4);
      if (c.ring_descs == 0)
        return unexpected(fmt::format("queue {}: a completion of 0 descriptors", q));
      pending[q].push_back(c);
    }
  }
  options_.serial = std::string(*serial);
  features_.store(*features, std::memory_order_relaxed);
  features_set_.store(*features != 0, std::memory_order_relaxed);
  writeback_.store((*cfg)[kCfgWriteback] == 1, std::memory_order_relaxed);
  for (std::uint16_t i = 0; i < std::size(kStatFields); ++i)
    (stats_.*kStatFields[i]).store(counts[i]);
  for (std::uint32_t q = 0; q < queues_.size(); ++q) {
    queues_[q]->unpushed = std::move(pending[q]);
    queues_[q]->adopt_unpushed = false;
  }
  return {};
}

namespace {

// Checks [sector, sector + bytes / 512) against the capacity, overflow-safe, and that
// both ends fall on logical blocks (lbs bytes).
bool in_range(std::uint64_t sector, std::uint64_t bytes, std::uint64_t capacity,
              std::uint32_t lbs) {
  if (bytes % lbs != 0 || sector % (lbs / kSectorSize) != 0) return false;
  return sector <= capacity && bytes / kSectorSize <= capacity - sector;
}

bool iovs_aligned(std::span<const iovec> v, std::uint32_t align) {
  for (const iovec& i : v)
    if ((reinterpret_cast<std::uintptr_t>(i.iov_base) | i.iov_len) & (align - 1)) return false;
  return true;
}

// Appends the [skip, skip + len) part of segs as iovecs; returns how many, or -1 if the
// range is not covered.
long add_iovs(std::span<const Segment> segs, std::uint64_t skip, std::uint64_t len,
              std::vector<iovec>& out) {
  long n = 0;
  for (const Segment& s : segs) {
    if (len == 0) break;
    if (skip >= s.len) {
      skip -= s.len;
      continue;
    }
    std::uint64_t take = std::min(s.len - skip, len);
    out.push_back(iovec{s.host + skip, take});
    ++n;
    len -= take;
    skip = 0;
  }
  return len == 0 ? n : -1;
}

// A push that failed without breaking the queue met an IOTLB miss on a ring area:
// the error carries the missing IOVA. Reported to the runner as a deferral, so it asks
// the front-end for the translation and calls again once it arrives.
TranslateError ring_miss(const VirtqueueError& e) {
  TranslateError m{TranslateErrc::iotlb_miss, Iova(e.addr), 1, Access::read_write, true};
  return m;
}

int zero_fill(int fd, std::uint64_t off, std::uint64_t len, std::vector<std::uint8_t>& buf) {
  buf.assign(std::min<std::uint64_t>(len, kBounceChunk), 0);
  while (len > 0) {
    std::uint64_t n = std::min<std::uint64_t>(len, buf.size());
    ssize_t w = ::pwrite(fd, buf.data(), n, static_cast<off_t>(off));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return w < 0 ? -errno : -EIO;
    off += static_cast<std::uint64_t>(w);
    len -= static_cast<std::uint64_t>(w);
  }
  return 0;
}

}  // namespace

QueueWork BlkDevice::process(std::uint32_t q, Virtqueue& vq) {
  QueueWork w;
  if (q >= queues_.size()) return w;
  QueueState& s = *queues_[q];
  if (s.adopt_unpushed) {
    s.adopt_unpushed = false;
    if (auto a = vq.adopt_in_flight(static_cast<std::uint32_t>(s.unpushed.size())); !a) {
      w.error = a.error();
      return w;
    }
  }
  if (!s.unpushed.empty()) {
    auto n = vq.push(s.unpushed);
    if (!n) {
      if (vq.broken() || n.error().code != VirtqueueErrc::ring_unmapped)
        w.error = n.error();
      else
        w.deferred = ring_miss(n.error());
      return w;
    }
    s.unpushed.clear();
    w.notify = *n;
    w.progress = true;
    return w;
  }
  ChainBatch& b = s.batch;
  b.clear();
  auto popped = vq.pop(b, kBatch);
  if (!popped) {
    w.error = popped.error();
    return w;
  }
  w.deferred = popped->deferred;
  if (b.size() == 0) return w;

  const std::uint64_t feats = features_.load(std::memory_order_relaxed);
  const int fd = fd_.get();
  // Without O_DIRECT, the one descriptor; with it, the buffered one (unaligned requests,
  // zeroes written by hand).
  const int plain_fd = options_.direct ? buffered_fd_.get() : fd;
  const std::uint32_t lbs = options_.logical_block_size;
  const bool writethrough_now = writethrough();
  bool needs_sync = false;  // writethrough: something in this batch must be made durable
  s.pending.clear();
  s.ios.clear();
  s.iovs.clear();
  s.done.clear();

  for (std::uint32_t i = 0; i < b.size(); ++i) {
    const DescChain& c = b[i];
    Pending p;
    p.chain = i;
    if (c.writable_len == 0) {
      // Nowhere to put the status: complete without one (the driver gets length 0).
      p.has_status = false;
      stats_.no_status.fetch_add(1, std::memory_order_relaxed);
      if (!s.warned_no_status) {
        log(LogLevel::warn, "{} queue {}: request without a status byte (reported once)",
            options_.name, q);
        s.warned_no_status = true;
      }
      s.pending.push_back(p);
      continue;
    }
    std::uint8_t hdr[kHeaderBytes];
    if (c.readable_len < kHeaderBytes ||
        vq.read_chain(b, c, 0, std::span(hdr, kHeaderBytes)) != kHeaderBytes) {
      p.status = kSIoErr;
      s.pending.push_back(p);
      continue;
    }
    p.type = le32(hdr);
    const std::uint64_t sector = le64(hdr + 8);
    if (log_enabled(LogLevel::debug))
      log(LogLevel::debug, "{} queue {}: request {} type {} sector {} readable {} writable {}",
          options_.name, q, c.id, p.type, sector, c.readable_len, c.writable_len);
    const std::uint64_t status_off = c.writable_len - 1;
    switch (p.type) {
      case kTIn:
      case kTOut: {
        bool in = p.type == kTIn;
        if (!in && options_.read_only) {
          p.status = kSIoErr;
          break;
        }
        p.data_len = in ? status_off : c.readable_len - kHeaderBytes;
        if (!in_range(sector, p.data_len, capacity_, lbs)) {
          p.status = kSIoErr;
          break;
        }
        if (p.data_len == 0) break;
        p.durable = !in && writethrough_now;
        needs_sync |= p.durable;
        const std::uint64_t off = sector * kSectorSize;
        // O_DIRECT needs the offset and length aligned; an unaligned request (a logical
        // block size below the file's alignment) goes through the page cache instead.
        bool buffered =
            !options_.direct || off % dio_offset_align_ != 0 || p.data_len % dio_offset_align_ != 0;
        if (options_.direct && buffered) stats_.unaligned.fetch_add(1, std::memory_order_relaxed);
        const int io_fd = buffered ? plain_fd : fd;
        p.first_iov = static_cast<std::uint32_t>(s.iovs.size());
        long n = in ? add_iovs(b.writable(c), 0, p.data_len, s.iovs)
                    : add_iovs(b.readable(c), kHeaderBytes, p.data_len, s.iovs);
        if (n < 0) {
          s.iovs.resize(p.first_iov);
          p.status = kSIoErr;
          break;
        }
        const bool misaligned =
            !buffered && !iovs_aligned(std::span(s.iovs).subspan(p.first_iov), dio_mem_align_);
        if (n > IOV_MAX || misaligned) {
          // Too many pieces for one vectored call, or guest buffers O_DIRECT cannot take:
          // copy through the (page-aligned) bounce buffer, a chunk at a time.
          s.iovs.resize(p.first_iov);
          stats_.bounced.fetch_add(1, std::memory_order_relaxed);
          if (!s.bounce) {
            const std::size_t align = std::max<std::size_t>(4096, dio_mem_align_);
            s.bounce.reset(static_cast<std::uint8_t*>(std::aligned_alloc(align, kBounceChunk)));
            if (!s.bounce) {
              p.status = kSIoErr;
              break;
            }
          }
          std::uint64_t done = 0;
          std::int64_t rc = 0;
          while (done < p.data_len && rc == 0) {
            std::uint64_t len = std::min<std::uint64_t>(p.data_len - done, kBounceChunk);
            auto chunk = std::span(s.bounce.get(), len);
            iovec v{chunk.data(), len};
            IoRequest r{in ? IoOp::read : IoOp::write, io_fd, 1, &v, off + done, len, buffered, 0};
            if (!in)
              (void)vq.read_chain(b, c, static_cast<std::uint32_t>(kHeaderBytes + done), chunk);
            std::int64_t got = finish_sync(r, 0);
            if (got != static_cast<std::int64_t>(len)) {
              rc = got < 0 ? got : -EIO;
              break;
            }
            if (in) {
              auto wr = vq.write_chain(b, c, static_cast<std::uint32_t>(done), chunk);
              if (!wr) {
                w.error = wr.error();
                return w;
              }
            }
            done += len;
          }
          p.status = rc == 0 ? kSOk : kSIoErr;
          if (in && rc == 0) p.written = static_cast<std::uint32_t>(p.data_len);
          if (rc == 0) {
            if (in) {
              stats_.reads.fetch_add(1, std::memory_order_relaxed);
              stats_.bytes_read.fetch_add(p.data_len, std::memory_order_relaxed);
            } else {
              stats_.writes.fetch_add(1, std::memory_order_relaxed);
              stats_.bytes_written.fetch_add(p.data_len, std::memory_order_relaxed);
            }
          }
          break;
        }
        p.io = static_cast<std::int32_t>(s.ios.size());
        s.ios.push_back(IoRequest{in ? IoOp::read : IoOp::write, io_fd, static_cast<int>(n),
                                  nullptr, off, p.data_len, buffered, 0});
        break;
      }
      case kTFlush:
        p.io = static_cast<std::int32_t>(s.ios.size());
        s.ios.push_back(IoRequest{IoOp::flush, fd, 0, nullptr, 0, 0, true, 0});
        break;
      case kTGetId: {
        std::uint8_t id[kIdBytes] = {};
        std::memcpy(id, options_.serial.data(),
                    std::min<std::size_t>(options_.serial.size(), kIdBytes));
        auto n = static_cast<std::uint32_t>(std::min<std::uint64_t>(status_off, kIdBytes));
        auto wr = vq.write_chain(b, c, 0, std::span<const std::uint8_t>(id, n));
        if (!wr) {
          w.error = wr.error();
          return w;
        }
        p.written = *wr;
        break;
      }
      case kTDiscard:
      case kTWriteZeroes: {
        bool discard = p.type == kTDiscard;
        if (!(feats & virtio::bit(discard ? kFDiscard : kFWriteZeroes))) {
          p.status = kSUnsupp;
          break;
        }
        if (options_.read_only) {
          p.status = kSIoErr;
          break;
        }
        std::uint64_t payload = c.readable_len - kHeaderBytes;
        std::uint64_t max_seg = discard ? options_.max_discard_seg : options_.max_write_zeroes_seg;
        std::uint64_t max_sectors =
            discard ? options_.max_discard_sectors : options_.max_write_zeroes_sectors;
        if (payload == 0 || payload % kRangeBytes != 0 || payload / kRangeBytes > max_seg) {
          p.status = kSUnsupp;
          break;
        }
        std::vector<std::uint8_t> ranges(payload);
        if (vq.read_chain(b, c, kHeaderBytes, ranges) != payload) {
          p.status = kSIoErr;
          break;
        }
        // Validate every range before touching the image.
        for (std::uint64_t r = 0; r < payload && p.status == kSOk; r += kRangeBytes) {
          std::uint64_t rs = le64(&ranges[r]);
          std::uint32_t count = le32(&ranges[r + 8]);
          std::uint32_t flags = le32(&ranges[r + 12]);
          if ((discard && flags != 0) || (!discard && (flags & ~kWriteZeroesFlagUnmap) != 0))
            p.status = kSUnsupp;
          else if (count > max_sectors ||
                   !in_range(rs, std::uint64_t{count} * kSectorSize, capacity_, lbs))
            p.status = kSIoErr;
        }
        p.durable = writethrough_now && p.status == kSOk;
        needs_sync |= p.durable;
        for (std::uint64_t r = 0; r < payload && p.status == kSOk; r += kRangeBytes) {
          std::uint64_t off = le64(&ranges[r]) * kSectorSize;
          std::uint64_t len = std::uint64_t{le32(&ranges[r + 8])} * kSectorSize;
          bool unmap = (le32(&ranges[r + 12]) & kWriteZeroesFlagUnmap) != 0;
          if (len == 0) continue;
          int rc = 0;
          if (block_device_) {
            std::uint64_t range[2] = {off, len};
            rc = ::ioctl(fd, discard ? BLKDISCARD : BLKZEROOUT, range) == 0 ? 0 : -errno;
          } else {
            int mode = discard || unmap ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                                        : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
            rc = ::fallocate(fd, mode, static_cast<off_t>(off), static_cast<off_t>(len)) == 0
                     ? 0
                     : -errno;
          }
          if (rc != 0 && discard) rc = 0;  // discard is a hint: the data may stay
          if (rc == -EOPNOTSUPP || rc == -ENOTTY || rc == -EINVAL)
            rc = zero_fill(plain_fd, off, len, s.scratch);
          if (rc != 0) p.status = kSIoErr;
        }
        break;
      }
      default: p.status = kSUnsupp; break;
    }
    s.pending.push_back(p);
  }

  // Point the I/O requests at their vectors (s.iovs is complete now) and run them.
  for (Pending& p : s.pending)
    if (p.io >= 0 && s.ios[static_cast<std::size_t>(p.io)].op != IoOp::flush)
      s.ios[static_cast<std::size_t>(p.io)].iov = s.iovs.data() + p.first_iov;
  // Writethrough: one fdatasync after everything the batch wrote, before any of it
  // completes (it runs after them: the last request, and a flush follows what precedes).
  std::int32_t durable_sync = -1;
  if (needs_sync) {
    durable_sync = static_cast<std::int32_t>(s.ios.size());
    s.ios.push_back(IoRequest{IoOp::flush, fd, 0, nullptr, 0, 0, true, 0});
    stats_.durable_syncs.fetch_add(1, std::memory_order_relaxed);
  }
  if (!s.ios.empty()) s.engine->run(s.ios);
  const bool durable_failed =
      durable_sync >= 0 && s.ios[static_cast<std::size_t>(durable_sync)].result != 0;
  if (durable_failed)
    log(LogLevel::warn, "{} queue {}: fdatasync after the batch's writes failed: {}", options_.name,
        q, std::strerror(static_cast<int>(-s.ios[static_cast<std::size_t>(durable_sync)].result)));

  for (Pending& p : s.pending) {
    const DescChain& c = b[p.chain];
    if (p.io >= 0) {
      const IoRequest& r = s.ios[static_cast<std::size_t>(p.io)];
      bool ok = r.op == IoOp::flush ? r.result == 0 : r.result == static_cast<std::int64_t>(r.len);
      if (r.op == IoOp::read) {
        // The guest buffers were written by the kernel: log them (all of them, also
        // after a failure part way, when some bytes may have landed).
        std::uint64_t left = p.data_len;
        for (const Segment& seg : b.writable(c)) {
          if (left == 0) break;
          Segment part{seg.host, seg.gpa, std::min(seg.len, left)};
          left -= part.len;
          if (auto lw = vq.translator().log_write(part); !lw) {
            w.error = VirtqueueError{VirtqueueErrc::log_failed, c.id, lw.error().addr.value};
            return w;
          }
        }
        if (ok) p.written = static_cast<std::uint32_t>(p.data_len);
      }
      if (ok) {
        switch (r.op) {
          case IoOp::read:
            stats_.reads.fetch_add(1, std::memory_order_relaxed);
            stats_.bytes_read.fetch_add(r.len, std::memory_order_relaxed);
            break;
          case IoOp::write:
            stats_.writes.fetch_add(1, std::memory_order_relaxed);
            stats_.bytes_written.fetch_add(r.len, std::memory_order_relaxed);
            break;
          case IoOp::flush: stats_.flushes.fetch_add(1, std::memory_order_relaxed); break;
        }
      } else {
        p.status = kSIoErr;
        log(LogLevel::debug, "{} queue {}: I/O at {} failed: {}", options_.name, q, r.offset,
            r.result < 0 ? std::strerror(static_cast<int>(-r.result)) : "short transfer");
      }
    }
    if (p.durable && durable_failed) p.status = kSIoErr;
    std::uint32_t len = 0;
    if (p.has_status) {
      if (p.status == kSIoErr) stats_.errors.fetch_add(1, std::memory_order_relaxed);
      if (p.status == kSUnsupp) stats_.unsupported.fetch_add(1, std::memory_order_relaxed);
      auto wr = vq.write_chain(b, c, c.writable_len - 1, std::span(&p.status, 1));
      if (!wr) {
        w.error = wr.error();
        return w;
      }
      len = p.written + 1;
    }
    s.done.push_back(Completion{c.id, c.ring_descs, len});
  }
  auto notify = vq.push(s.done);
  if (!notify) {
    if (vq.broken() || notify.error().code != VirtqueueErrc::ring_unmapped) {
      w.error = notify.error();
    } else {
      s.unpushed = s.done;
      stats_.push_deferrals.fetch_add(1, std::memory_order_relaxed);
      w.deferred = ring_miss(notify.error());
      log(LogLevel::debug,
          "{} queue {}: used ring at {:#x} lost its translation; {} completions wait",
          options_.name, q, notify.error().addr, s.done.size());
      w.progress = true;
    }
    return w;
  }
  w.notify = *notify;
  w.progress = true;
  return w;
}

}  // namespace vhostkit
