// NetDevice: virtio-net over the Virtqueue API, with sink, source, loopback and tap
// packet backends (include/vhostkit/devices/net.h).
#include "vhostkit/devices/net.h"

#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cstring>

#include <fmt/format.h>

#include "vhostkit/log.h"

namespace vhostkit {

namespace {

constexpr std::size_t kBurst = 64;
constexpr std::size_t kHdrRoom = 12;  // every stored frame has room for a 12-byte header
constexpr std::size_t kMaxFrame = 65535;
constexpr unsigned kFVersion1 = 32;

void drain(int fd) {
  std::uint64_t v;
  while (::read(fd, &v, sizeof v) == static_cast<ssize_t>(sizeof v)) {
  }
}

void signal(int fd) {
  std::uint64_t one = 1;
  (void)!::write(fd, &one, sizeof one);
}

void put_le16(std::uint8_t* p, std::uint16_t v) {
  p[0] = static_cast<std::uint8_t>(v);
  p[1] = static_cast<std::uint8_t>(v >> 8);
}

// One 8-byte store on a little-endian host (the source's sequence number, every frame).
void put_le64(std::uint8_t* p, std::uint64_t v) {
  if constexpr (std::endian::native == std::endian::little) {
    std::memcpy(p, &v, sizeof v);
  } else {
    for (int k = 0; k < 8; ++k) p[k] = static_cast<std::uint8_t>(v >> (8 * k));
  }
}

}  // namespace

const char* to_string(NetMode m) {
  switch (m) {
    case NetMode::sink: return "sink";
    case NetMode::source: return "source";
    case NetMode::loopback: return "loopback";
    case NetMode::tap: return "tap";
  }
  return "?";
}

Result<NetMode, std::string> parse_net_mode(std::string_view s) {
  for (NetMode m : {NetMode::sink, NetMode::source, NetMode::loopback, NetMode::tap})
    if (s == to_string(m)) return m;
  return unexpected(fmt::format("unknown mode '{}' (expected sink, source, loopback or tap)", s));
}

Result<std::array<std::uint8_t, 6>, std::string> parse_mac(std::string_view s) {
  std::array<std::uint8_t, 6> mac{};
  auto bad = [&] { return unexpected(fmt::format("bad MAC address '{}'", s)); };
  if (s.size() != 17) return bad();
  for (std::size_t i = 0; i < 6; ++i) {
    if (i > 0 && s[3 * i - 1] != ':') return bad();
    unsigned v = 0;
    for (std::size_t k = 0; k < 2; ++k) {
      char c = s[3 * i + k];
      v <<= 4;
      if (c >= '0' && c <= '9')
        v |= static_cast<unsigned>(c - '0');
      else if (c >= 'a' && c <= 'f')
        v |= static_cast<unsigned>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F')
        v |= static_cast<unsigned>(c - 'A' + 10);
      else
        return bad();
    }
    mac[i] = static_cast<std::uint8_t>(v);
  }
  return mac;
}

// State of one queue pair. The receive worker owns the rx_* and source/tap receive
// fields, the transmit worker the tx_* fields; the loopback ring is single-producer
// (transmit) single-consumer (receive).
struct NetDevice::Pair {
  ChainBatch rx_batch, tx_batch;
  std::vector<Completion> rx_done, tx_done;

  // source
  std::vector<std::uint8_t> source_frame;  // kHdrRoom + packet_size
  std::uint64_t seq = 0;
  bool source_built = false;
  std::uint64_t rate = 0;  // this queue's packets per second, 0 = unlimited
  std::chrono::steady_clock::time_point start{};
  bool started = false;
  std::uint64_t sent = 0;
  UniqueFd timer;  // timerfd: the next packet is due

  // tap
  UniqueFd tap;
  std::vector<std::vector<std::uint8_t>> pending;  // frames read, not yet delivered
  std::size_t pending_head = 0;
  std::size_t pending_count = 0;
  std::vector<std::uint8_t> tx_buf;

  // loopback
  std::vector<std::vector<std::uint8_t>> ring;  // each: kHdrRoom + frame
  std::atomic<std::uint64_t> head{0};           // next to receive
  std::atomic<std::uint64_t> tail{0};           // next to transmit into
  UniqueFd rx_event;                            // transmit -> receive: frames queued
  UniqueFd tx_event;                            // receive -> transmit: room made
};

NetDevice::NetDevice(NetOptions options)
    : options_(std::move(options)), mac_(options_.mac), mtu_(options_.mtu) {}
NetDevice::~NetDevice() = default;

Result<std::unique_ptr<NetDevice>, std::string> NetDevice::create(NetOptions options) {
  if (options.queue_pairs == 0 || options.queue_pairs > 256)
    return unexpected(fmt::format("queue pairs must be 1..256, not {}", options.queue_pairs));
  if (options.packet_size < 60 || options.packet_size > kMaxFrame)
    return unexpected(
        fmt::format("packet size must be 60..{} bytes, not {}", kMaxFrame, options.packet_size));
  if (options.mtu < 68) return unexpected(fmt::format("MTU {} is below 68", options.mtu));
  if (options.mode == NetMode::tap && options.tap.empty())
    return unexpected(std::string("tap mode needs a tap interface name (--tap)"));
  if (options.mode == NetMode::tap && options.tap.size() >= IFNAMSIZ)
    return unexpected(
        fmt::format("tap name '{}' is longer than {} characters", options.tap, IFNAMSIZ - 1));
  if (options.loopback_depth == 0) options.loopback_depth = 256;
  std::unique_ptr<NetDevice> d(new NetDevice(std::move(options)));
  if (auto r = d->open(); !r) return unexpected(r.error());
  return d;
}

Result<void, std::string> NetDevice::open() {
  const std::uint32_t n = options_.queue_pairs;
  counters_ = std::vector<Counters>(2 * n);
  for (std::uint32_t i = 0; i < n; ++i) {
    auto p = std::make_unique<Pair>();
    switch (options_.mode) {
      case NetMode::source: {
        p->source_frame.assign(kHdrRoom + options_.packet_size, 0);
        if (options_.rate_pps > 0) {
          p->rate = std::max<std::uint64_t>(1, options_.rate_pps / n);
          p->timer.reset(::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
          if (!p->timer.valid())
            return unexpected(fmt::format("timerfd_create: {}", std::strerror(errno)));
        }
        break;
      }
      case NetMode::loopback: {
        p->ring.resize(options_.loopback_depth);
        p->rx_event.reset(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
        p->tx_event.reset(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
        if (!p->rx_event.valid() || !p->tx_event.valid())
          return unexpected(fmt::format("eventfd: {}", std::strerror(errno)));
        break;
      }
      case NetMode::tap: {
        UniqueFd fd(::open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC));
        if (!fd.valid())
          return unexpected(fmt::format("cannot open /dev/net/tun: {}", std::strerror(errno)));
        ifreq ifr{};
        ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
        if (n > 1) ifr.ifr_flags |= IFF_MULTI_QUEUE;
        std::memcpy(ifr.ifr_name, options_.tap.data(), options_.tap.size());
        if (::ioctl(fd.get(), TUNSETIFF, &ifr) != 0)
          return unexpected(fmt::format("cannot attach to tap '{}' (queue pair {}): {}",
                                        options_.tap, i, std::strerror(errno)));
        tap_name_ = ifr.ifr_name;
        p->tap = std::move(fd);
        p->pending.resize(kBurst);
        for (auto& b : p->pending) b.resize(kHdrRoom + kMaxFrame);
        p->tx_buf.resize(kMaxFrame);
        break;
      }
      case NetMode::sink:
        if (options_.sink_read) p->tx_buf.resize(kMaxFrame);
        break;
    }
    pairs_.push_back(std::move(p));
  }
  return {};
}

std::uint64_t NetDevice::device_features() const {
  std::uint64_t f =
      (1ULL << kNetFMac) | (1ULL << kNetFStatus) | (1ULL << kNetFMrgRxbuf) | (1ULL << kNetFMtu);
  if (options_.queue_pairs > 1) f |= 1ULL << kNetFMq;
  return f;
}

std::vector<std::uint8_t> NetDevice::config() const {
  std::vector<std::uint8_t> c(12, 0);
  std::lock_guard lock(identity_mu_);
  std::copy(mac_.begin(), mac_.end(), c.begin());
  put_le16(&c[6], kNetSLinkUp);
  put_le16(&c[8], static_cast<std::uint16_t>(options_.queue_pairs));
  put_le16(&c[10], mtu_);
  return c;
}

void NetDevice::set_features(std::uint64_t features) {
  features_ = features;
  bool mrg = (features >> kNetFMrgRxbuf) & 1;
  bool v1 = (features >> kFVersion1) & 1;
  mrg_rxbuf_.store(mrg);
  hdr_len_.store(mrg || v1 ? 12 : 10);
}

int NetDevice::event_fd(std::uint32_t queue) const {
  const Pair& p = *pairs_[queue / 2];
  bool rx = queue % 2 == 0;
  switch (options_.mode) {
    case NetMode::source: return rx && p.timer.valid() ? p.timer.get() : -1;
    case NetMode::loopback: return rx ? p.rx_event.get() : p.tx_event.get();
    case NetMode::tap: return rx ? p.tap.get() : -1;
    case NetMode::sink: return -1;
  }
  return -1;
}

void NetDevice::clear_waiting(Pair& p) {
  p.head.store(0);
  p.tail.store(0);
  p.pending_head = p.pending_count = 0;
  // A tap slot holding a frame was cut to the frame's size: reads go to full-size slots.
  for (auto& b : p.pending) b.resize(kHdrRoom + kMaxFrame);
}

void NetDevice::reset() {
  for (auto& p : pairs_) {
    clear_waiting(*p);
    p->started = false;
  }
  {
    std::lock_guard lock(identity_mu_);
    mac_ = options_.mac;
    mtu_ = options_.mtu;
  }
  features_ = 0;
}

std::size_t NetDevice::waiting_frames(std::uint32_t pair) const {
  const Pair& p = *pairs_.at(pair);
  switch (options_.mode) {
    case NetMode::loopback: return p.tail.load() - p.head.load();
    case NetMode::tap: return p.pending_count;
    case NetMode::sink:
    case NetMode::source: break;
  }
  return 0;
}

namespace {
// Record tags of the virtio-net state, version 1.
enum NetTag : std::uint16_t {
  kTagMac = 1,         // bytes[6]
  kTagMtu = 2,         // u64
  kTagFeatures = 3,    // u64: the features the driver accepted
  kTagQueuePairs = 4,  // u64
  kTagQueues = 5,      // group: per queue (tag = index) a group of kTagPackets...
  kTagPairs = 6,       // group: per pair (tag = index) a group of kTagSourceSeq, kTagFrames
};
enum NetQueueTag : std::uint16_t { kTagPackets = 1, kTagBytes = 2, kTagDropped = 3 };
enum NetPairTag : std::uint16_t {
  kTagSourceSeq = 1,  // u64: the next source frame's sequence number
  kTagFrames = 2,     // group: the frames waiting for the guest, tags 0, 1, ... in order
};
// Waiting frames saved at most, over all pairs; the rest count as dropped.
constexpr std::size_t kStateFrameBudget = 16u << 20;
}  // namespace

void NetDevice::save_state(DeviceStateWriter& out) const {
  out.bytes(kTagMac, mac());
  out.u64(kTagMtu, mtu());
  out.u64(kTagFeatures, features_);
  out.u64(kTagQueuePairs, options_.queue_pairs);
  // Frames first: the ones that do not fit count as dropped in the saved counters.
  std::vector<std::uint64_t> unsaved(pairs_.size(), 0);
  std::size_t budget = kStateFrameBudget;
  DeviceStateWriter pairs;
  for (std::uint32_t i = 0; i < pairs_.size(); ++i) {
    const Pair& p = *pairs_[i];
    DeviceStateWriter frames;
    std::uint16_t saved = 0;
    const std::size_t n = waiting_frames(i);
    for (std::size_t k = 0; k < n; ++k) {
      const std::vector<std::uint8_t>& f = options_.mode == NetMode::loopback
                                               ? p.ring[(p.head.load() + k) % p.ring.size()]
                                               : p.pending[(p.pending_head + k) % p.pending.size()];
      const std::size_t len = f.size() - kHdrRoom;
      if (len > budget) {
        ++unsaved[i];
        continue;
      }
      budget -= len;
      frames.bytes(saved++, std::span(f).subspan(kHdrRoom));
    }
    DeviceStateWriter pair;
    pair.u64(kTagSourceSeq, p.seq);
    pair.group(kTagFrames, frames);
    pairs.group(static_cast<std::uint16_t>(i), pair);
  }
  DeviceStateWriter queues;
  for (std::uint32_t q = 0; q < counters_.size(); ++q) {
    const Counters& c = counters_[q];
    DeviceStateWriter queue;
    queue.u64(kTagPackets, c.packets.load());
    queue.u64(kTagBytes, c.bytes.load());
    queue.u64(kTagDropped, c.dropped.load() + (q % 2 == 0 ? unsaved[q / 2] : 0));
    queues.group(static_cast<std::uint16_t>(q), queue);
  }
  out.group(kTagQueues, queues);
  out.group(kTagPairs, pairs);
}

Result<void, std::string> NetDevice::load_state(const DeviceStateReader& in,
                                                std::uint32_t /*version*/) {
  auto err = [](const DeviceStateError& e) { return unexpected(e.message()); };
  // Everything is read and checked first; the device changes only once all of it passed.
  auto mac = in.bytes(kTagMac, 6);
  if (!mac) return err(mac.error());
  auto mtu = in.u64(kTagMtu, 65535);
  if (!mtu) return err(mtu.error());
  if (*mtu < 68) return unexpected(fmt::format("MTU {} is below 68", *mtu));
  auto features = in.u64(kTagFeatures);
  if (!features) return err(features.error());
  if (const std::uint64_t extra = unoffered_device_bits(*features); extra != 0)
    return unexpected(
        fmt::format("the driver accepted features {:#x} this device does not offer", extra));
  auto pairs_n = in.u64(kTagQueuePairs);
  if (!pairs_n) return err(pairs_n.error());
  if (*pairs_n != options_.queue_pairs)
    return unexpected(
        fmt::format("state of {} queue pairs, this device has {}", *pairs_n, options_.queue_pairs));
  struct QueueCounts {
    std::uint64_t packets, bytes, dropped;
  };
  std::vector<QueueCounts> counts(counters_.size());
  auto queues = in.group(kTagQueues);
  if (!queues) return err(queues.error());
  if (queues->records().size() != counters_.size())
    return unexpected(fmt::format("counters of {} queues, this device has {}",
                                  queues->records().size(), counters_.size()));
  for (std::uint32_t q = 0; q < counters_.size(); ++q) {
    auto g = queues->group(static_cast<std::uint16_t>(q));
    if (!g) return err(g.error());
    auto packets = g->u64(kTagPackets);
    auto bytes = g->u64(kTagBytes);
    auto dropped = g->u64(kTagDropped);
    if (!packets) return err(packets.error());
    if (!bytes) return err(bytes.error());
    if (!dropped) return err(dropped.error());
    counts[q] = {*packets, *bytes, *dropped};
  }
  struct PairState {
    std::uint64_t seq;
    std::vector<std::span<const std::uint8_t>> frames;
  };
  std::vector<PairState> pair_states(pairs_.size());
  auto pairs = in.group(kTagPairs);
  if (!pairs) return err(pairs.error());
  if (pairs->records().size() != pairs_.size())
    return unexpected(fmt::format("state of {} queue pairs' frames, this device has {} pairs",
                                  pairs->records().size(), pairs_.size()));
  for (std::uint32_t i = 0; i < pairs_.size(); ++i) {
    auto g = pairs->group(static_cast<std::uint16_t>(i));
    if (!g) return err(g.error());
    auto seq = g->u64(kTagSourceSeq);
    if (!seq) return err(seq.error());
    auto frames = g->group(kTagFrames);
    if (!frames) return err(frames.error());
    pair_states[i].seq = *seq;
    for (std::size_t k = 0; k < frames->records().size(); ++k) {
      auto f = frames->bytes(static_cast<std::uint16_t>(k));
      if (!f) return err(f.error());
      if (f->size() < 14 || f->size() > kMaxFrame)
        return unexpected(fmt::format("pair {}: a waiting frame of {} bytes", i, f->size()));
      pair_states[i].frames.push_back(*f);
    }
  }
  {
    std::lock_guard lock(identity_mu_);
    std::copy(mac->begin(), mac->end(), mac_.begin());
    mtu_ = static_cast<std::uint16_t>(*mtu);
  }
  set_features(*features);
  for (std::uint32_t i = 0; i < pairs_.size(); ++i) {
    Pair& p = *pairs_[i];
    p.seq = pair_states[i].seq;
    clear_waiting(p);
    std::uint64_t dropped = 0;
    for (auto f : pair_states[i].frames) {
      std::vector<std::uint8_t>* slot = nullptr;
      if (options_.mode == NetMode::loopback && p.tail.load() < p.ring.size()) {
        slot = &p.ring[p.tail.load()];
        p.tail.store(p.tail.load() + 1);
      } else if (options_.mode == NetMode::tap && p.pending_count < p.pending.size()) {
        slot = &p.pending[p.pending_count++];
      }
      if (slot == nullptr) {
        ++dropped;
        continue;
      }
      slot->resize(kHdrRoom + f.size());
      std::copy(f.begin(), f.end(), slot->begin() + kHdrRoom);
    }
    counts[2 * i].dropped += dropped;
    if (dropped > 0)
      log(LogLevel::warn,
          "{}: pair {}: {} waiting frames of the source dropped (no room in {} mode)", name(), i,
          dropped, to_string(options_.mode));
    if (options_.mode == NetMode::loopback && p.tail.load() > 0) signal(p.rx_event.get());
  }
  for (std::uint32_t q = 0; q < counters_.size(); ++q) {
    counters_[q].packets.store(counts[q].packets);
    counters_[q].bytes.store(counts[q].bytes);
    counters_[q].dropped.store(counts[q].dropped);
  }
  return {};
}

NetQueueStats NetDevice::stats(std::uint32_t queue) const {
  const Counters& c = counters_.at(queue);
  return {c.packets.load(), c.bytes.load(), c.dropped.load(), c.bytes_read.load()};
}

void NetDevice::make_source_frame(std::span<std::uint8_t> f, const std::array<std::uint8_t, 6>& dst,
                                  std::uint32_t queue, std::uint64_t seq) {
  // Ethernet: destination, a locally administered source, ethertype 0x88b5 (IEEE local
  // experimental); payload: marker, queue (le32), sequence (le64), then a pattern.
  std::copy(dst.begin(), dst.end(), f.begin());
  const std::uint8_t src[6] = {0x02, 0x76, 0x68, 0x6b, 0x00, 0x01};
  std::copy(std::begin(src), std::end(src), f.begin() + 6);
  f[12] = 0x88;
  f[13] = 0xb5;
  std::copy(kNetSourceMarker.begin(), kNetSourceMarker.end(), f.begin() + 14);
  for (int k = 0; k < 4; ++k) f[22 + k] = static_cast<std::uint8_t>(queue >> (8 * k));
  put_le64(f.data() + 26, seq);
  for (std::size_t k = 34; k < f.size(); ++k) f[k] = static_cast<std::uint8_t>(k);
}

std::size_t NetDevice::frames_ready(std::uint32_t queue, Pair& p, std::size_t max) {
  switch (options_.mode) {
    case NetMode::sink: return 0;
    case NetMode::source: {
      if (p.rate == 0) return max;
      auto now = std::chrono::steady_clock::now();
      if (!p.started) {
        p.started = true;
        p.start = now;
        p.sent = 0;
      }
      auto ns = static_cast<std::uint64_t>(
          std::chrono::duration_cast<std::chrono::nanoseconds>(now - p.start).count());
      auto allowed =
          static_cast<std::uint64_t>(static_cast<double>(ns) * 1e-9 * static_cast<double>(p.rate));
      // After a long pause (no buffers) send at most 100 ms worth at once.
      std::uint64_t cap = std::max<std::uint64_t>(kBurst, p.rate / 10);
      if (allowed > p.sent + cap) p.sent = allowed - cap;
      if (allowed > p.sent) return std::min<std::uint64_t>(max, allowed - p.sent);
      // Not due yet: arm the timer for the next packet.
      auto due = static_cast<std::uint64_t>(static_cast<double>(p.sent + 1) * 1e9 /
                                            static_cast<double>(p.rate));
      std::uint64_t wait_ns = due > ns ? due - ns : 1000;
      itimerspec ts{};
      ts.it_value.tv_sec = static_cast<time_t>(wait_ns / 1000000000);
      ts.it_value.tv_nsec = static_cast<long>(wait_ns % 1000000000);
      if (ts.it_value.tv_sec == 0 && ts.it_value.tv_nsec == 0) ts.it_value.tv_nsec = 1000;
      (void)::timerfd_settime(p.timer.get(), 0, &ts, nullptr);
      return 0;
    }
    case NetMode::loopback: {
      std::uint64_t head = p.head.load(std::memory_order_relaxed);
      std::uint64_t tail = p.tail.load(std::memory_order_acquire);
      return std::min<std::uint64_t>(max, tail - head);
    }
    case NetMode::tap: {
      // Read frames until the tap is empty or the burst is full.
      while (p.pending_count < std::min(max, p.pending.size())) {
        auto& b = p.pending[(p.pending_head + p.pending_count) % p.pending.size()];
        ssize_t n = ::read(p.tap.get(), b.data() + kHdrRoom, kMaxFrame);
        if (n <= 0) {
          if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            log(LogLevel::warn, "net0 queue {}: tap read: {}", queue, std::strerror(errno));
          break;
        }
        b.resize(kHdrRoom + static_cast<std::size_t>(n));
        ++p.pending_count;
      }
      return std::min(max, p.pending_count);
    }
  }
  return 0;
}

// Frame i of the ready ones, with kHdrRoom bytes before it that the caller may use.
std::span<std::uint8_t> NetDevice::frame(std::uint32_t queue, Pair& p, std::size_t i) {
  switch (options_.mode) {
    case NetMode::source: {
      std::span<std::uint8_t> f(p.source_frame.data() + kHdrRoom, options_.packet_size);
      if (!p.source_built) {
        make_source_frame(f, {0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, queue, p.seq + i);
        p.source_built = true;
      } else {
        put_le64(f.data() + 26, p.seq + i);  // only the sequence number changes
      }
      return p.source_frame;
    }
    case NetMode::loopback: {
      std::uint64_t head = p.head.load(std::memory_order_relaxed);
      return p.ring[(head + i) % p.ring.size()];
    }
    case NetMode::tap: return p.pending[(p.pending_head + i) % p.pending.size()];
    case NetMode::sink: break;
  }
  return {};
}

void NetDevice::frames_done(Pair& p, std::size_t n) {
  if (n == 0) return;
  switch (options_.mode) {
    case NetMode::source:
      p.seq += n;
      p.sent += n;
      break;
    case NetMode::loopback:
      p.head.store(p.head.load(std::memory_order_relaxed) + n, std::memory_order_release);
      signal(p.tx_event.get());
      break;
    case NetMode::tap:
      for (std::size_t k = 0; k < n; ++k)
        p.pending[(p.pending_head + k) % p.pending.size()].resize(kHdrRoom + kMaxFrame);
      p.pending_head = (p.pending_head + n) % p.pending.size();
      p.pending_count -= n;
      break;
    case NetMode::sink: break;
  }
}

QueueWork NetDevice::process(std::uint32_t queue, Virtqueue& vq) {
  Pair& p = *pairs_[queue / 2];
  return queue % 2 == 0 ? receive(queue, vq, p) : transmit(queue, vq, p);
}

QueueWork NetDevice::receive(std::uint32_t queue, Virtqueue& vq, Pair& p) {
  QueueWork w;
  Counters& ctr = counters_[queue];
  int ev = event_fd(queue);
  if (ev >= 0 && options_.mode != NetMode::tap) drain(ev);
  std::size_t ready = frames_ready(queue, p, kBurst);
  if (ready == 0) {
    w.blocked = true;
    return w;
  }
  const std::uint32_t hdr = hdr_len_.load(std::memory_order_relaxed);
  const bool mrg = mrg_rxbuf_.load(std::memory_order_relaxed);
  ChainBatch& b = p.rx_batch;
  b.clear();
  auto popped = vq.pop(b, ready);
  if (!popped) {
    w.error = popped.error();
    return w;
  }
  w.deferred = popped->deferred;
  auto& done = p.rx_done;
  done.clear();
  std::size_t ci = 0;         // next chain of b to fill
  std::size_t delivered = 0;  // frames taken (delivered or dropped)
  std::uint64_t bytes = 0, packets = 0, dropped = 0;
  bool dry = false;
  while (ci < b.size() && delivered < ready && !dry) {
    std::span<std::uint8_t> stored = frame(queue, p, delivered);
    // The header goes in the room before the frame: zeros, num_buffers = 1. (Fixed-size
    // copies: inline stores, not a library call per frame.)
    std::uint8_t* h = stored.data() + kHdrRoom - hdr;
    if (hdr == 12) {
      static constexpr std::uint8_t kHdr12[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0};
      std::memcpy(h, kHdr12, sizeof kHdr12);
    } else {
      std::memset(h, 0, hdr);
    }
    std::span<const std::uint8_t> data(h, hdr + (stored.size() - kHdrRoom));
    if (b[ci].writable_len >= data.size()) {
      // The common case: the whole packet fits in the next chain (num_buffers 1).
      const DescChain& c = b[ci];
      auto wr = vq.write_chain(b, c, 0, data);
      if (!wr) {
        w.error = wr.error();
        break;
      }
      done.push_back(Completion{c.id, c.ring_descs, *wr});
      ++ci;
      ++delivered;
      ++packets;
      bytes += data.size() - hdr;
      continue;
    }
    std::size_t first_done = done.size();
    std::size_t first_chain = ci;
    std::size_t off = 0;
    bool ok = true;
    while (off < data.size()) {
      if (ci == b.size()) {
        // Mergeable buffers: the packet continues in the next chain.
        if (!mrg || b.size() >= 256) {
          ok = false;
          break;
        }
        auto more = vq.pop(b, 1);
        if (!more) {
          w.error = more.error();
          ok = false;
          break;
        }
        if (more->popped == 0) {
          if (more->deferred) w.deferred = more->deferred;
          dry = true;
          ok = false;
          break;
        }
      }
      const DescChain& c = b[ci];
      auto wr = vq.write_chain(b, c, 0, data.subspan(off));
      if (!wr) {
        w.error = wr.error();
        ok = false;
        break;
      }
      done.push_back(Completion{c.id, c.ring_descs, *wr});
      off += *wr;
      ++ci;
      if (!mrg) break;  // one chain per packet
      if (*wr == 0) {
        ok = false;  // a chain without room: drop rather than spin
        break;
      }
    }
    if (off < data.size()) ok = false;
    ++delivered;
    if (!ok) {
      // Return the chains taken for this packet empty: the driver drops them.
      for (std::size_t k = first_done; k < done.size(); ++k) done[k].len = 0;
      ++dropped;
      if (w.error) break;
      continue;
    }
    std::size_t nbufs = ci - first_chain;
    if (nbufs > 1) {
      std::uint8_t nb[2];
      put_le16(nb, static_cast<std::uint16_t>(nbufs));
      if (auto r = vq.write_chain(b, b[first_chain], 10, nb); !r) {
        w.error = r.error();
        break;
      }
    }
    ++packets;
    bytes += data.size() - hdr;
  }
  // Chains popped but not used (an error or a write failure cut the loop short).
  for (; ci < b.size(); ++ci) done.push_back(Completion{b[ci].id, b[ci].ring_descs, 0});
  if (w.error) return w;
  frames_done(p, delivered);
  if (!done.empty()) {
    auto n = vq.push(done);
    if (!n) {
      w.error = n.error();
      return w;
    }
    w.notify = *n;
    w.progress = true;
  }
  ctr.packets.fetch_add(packets, std::memory_order_relaxed);
  ctr.bytes.fetch_add(bytes, std::memory_order_relaxed);
  if (dropped > 0) ctr.dropped.fetch_add(dropped, std::memory_order_relaxed);
  return w;
}

QueueWork NetDevice::transmit(std::uint32_t queue, Virtqueue& vq, Pair& p) {
  QueueWork w;
  Counters& ctr = counters_[queue];
  std::size_t max = kBurst;
  if (options_.mode == NetMode::loopback) {
    drain(p.tx_event.get());
    std::uint64_t used =
        p.tail.load(std::memory_order_relaxed) - p.head.load(std::memory_order_acquire);
    max = std::min<std::uint64_t>(max, p.ring.size() - used);
    if (max == 0) {
      w.blocked = true;  // the receive side wakes us when it takes frames
      return w;
    }
  }
  const std::uint32_t hdr = hdr_len_.load(std::memory_order_relaxed);
  ChainBatch& b = p.tx_batch;
  b.clear();
  auto popped = vq.pop(b, max);
  if (!popped) {
    w.error = popped.error();
    return w;
  }
  w.deferred = popped->deferred;
  if (b.size() == 0) return w;
  auto& done = p.tx_done;
  done.clear();
  std::uint64_t bytes = 0, packets = 0, dropped = 0, read = 0;
  std::uint64_t tail = p.tail.load(std::memory_order_relaxed);
  for (const DescChain& c : b.chains()) {
    done.push_back(Completion{c.id, c.ring_descs, 0});
    if (c.readable_len < hdr + 14 || c.readable_len - hdr > kMaxFrame) {
      ++dropped;  // shorter than a header and an Ethernet header, or oversized
      continue;
    }
    std::uint32_t len = c.readable_len - hdr;
    switch (options_.mode) {
      case NetMode::sink:
        if (options_.sink_read) read += vq.read_chain(b, c, hdr, std::span(p.tx_buf).first(len));
        break;
      case NetMode::source: break;
      case NetMode::loopback: {
        auto& slot = p.ring[tail % p.ring.size()];
        slot.resize(kHdrRoom + len);
        (void)vq.read_chain(b, c, hdr, std::span(slot).subspan(kHdrRoom));
        ++tail;
        break;
      }
      case NetMode::tap: {
        std::uint32_t got = vq.read_chain(b, c, hdr, std::span(p.tx_buf).first(len));
        if (::write(p.tap.get(), p.tx_buf.data(), got) != static_cast<ssize_t>(got)) {
          ++dropped;
          continue;
        }
        break;
      }
    }
    ++packets;
    bytes += len;
  }
  if (options_.mode == NetMode::loopback && tail != p.tail.load(std::memory_order_relaxed)) {
    p.tail.store(tail, std::memory_order_release);
    signal(p.rx_event.get());
  }
  auto n = vq.push(done);
  if (!n) {
    w.error = n.error();
    return w;
  }
  w.notify = *n;
  w.progress = true;
  ctr.packets.fetch_add(packets, std::memory_order_relaxed);
  ctr.bytes.fetch_add(bytes, std::memory_order_relaxed);
  if (dropped > 0) ctr.dropped.fetch_add(dropped, std::memory_order_relaxed);
  if (read > 0) ctr.bytes_read.fetch_add(read, std::memory_order_relaxed);
  return w;
}

}  // namespace vhostkit
