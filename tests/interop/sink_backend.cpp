// A vhost-user back-end program for interoperability tests: serves a device with N
// queues that consumes whatever the driver offers on odd queues (a network device's
// transmit queues) and, with --source, fills the buffers of even queues (receive) with
// 60-byte broadcast frames behind a 12-byte virtio-net header; otherwise it leaves them. With
// --marker the payload of each frame starts with the 16 bytes "VHOSTKIT-MIGRATE" and a 64-bit
// little-endian sequence number (1, 2, ...), so a page of guest memory holding a frame the
// back-end wrote can be recognized (tests/migration/qemu_migration_test.py). With
// --mergeable it offers VIRTIO_NET_F_MRG_RXBUF and sets num_buffers to 1 in each header:
// Linux then copies a small frame out of the receive buffer and never writes the buffer's
// page itself, so only the back-end dirties it (without it the driver builds its skb
// around the buffer and its own writes to the page hide the back-end's). With --big it
// offers VIRTIO_NET_F_GUEST_CSUM and GUEST_TSO4 instead: Linux then posts "big" receive
// buffers (a chain of pages, the frame lands in the first), copies a small frame out and
// never writes those pages either; every frame lands in a page of its own. With
// --interval-us N the source writes one frame every N microseconds instead of as fast as
// buffers arrive (it sleeps in process(), at most N microseconds). --no-miss-lookahead
// sends one IOTLB miss at a time instead of every missing page of the waiting chains
// (RunnerOptions::miss_lookahead). Follows
// QEMU's back-end program conventions for --socket-path / --fd; exits cleanly on SIGTERM and prints
//   STATS messages=<n> rejected=<n> chains_q<i>=<n> bytes_q<i>=<n>
// on stderr. Every request is logged at debug level (--log-level debug).
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "tool_support.h"
#include "vhostkit/log.h"
#include "vhostkit/vhost_user/backend_server.h"

namespace {

using namespace vhostkit;

class SinkDevice : public Device {
 public:
  SinkDevice(std::uint32_t queues, bool source, bool marker, bool mergeable, bool big)
      : queues_(queues),
        source_(source),
        marker_(marker),
        mergeable_(mergeable),
        big_(big),
        chains_(queues),
        bytes_(queues),
        batches_(queues) {
    frame_.assign(12 + 60, 0);  // virtio_net_hdr (12 bytes with VERSION_1), then the frame
    for (int i = 0; i < 6; ++i) frame_[12 + i] = 0xff;  // broadcast destination
    frame_[12 + 6] = 0x02;                              // a locally administered source
    frame_[12 + 12] = 0x88;                             // ethertype 0x88b5 (local experimental)
    frame_[12 + 13] = 0xb5;
    if (marker_) std::memcpy(&frame_[12 + 14], kMarker, sizeof(kMarker) - 1);
    if (mergeable_) frame_[10] = 1;  // num_buffers (little endian): one buffer per frame
  }
  static constexpr char kMarker[] = "VHOSTKIT-MIGRATE";
  std::string name() const override { return "sink0"; }
  std::uint64_t device_features() const override {
    return (mergeable_ ? kNetFMrgRxbuf : 0) | (big_ ? kNetFGuestCsum | kNetFGuestTso4 : 0);
  }
  static constexpr std::uint64_t kNetFMrgRxbuf = 1ULL << 15;  // VIRTIO_NET_F_MRG_RXBUF
  static constexpr std::uint64_t kNetFGuestCsum = 1ULL << 1;  // VIRTIO_NET_F_GUEST_CSUM
  static constexpr std::uint64_t kNetFGuestTso4 = 1ULL << 7;  // VIRTIO_NET_F_GUEST_TSO4
  std::uint32_t num_queues() const override { return queues_; }
  DeviceStateFormat state_format() const override { return {"sink", 1}; }
  void save_state(DeviceStateWriter& out) const override {
    out.u64(1, sequence_.load());
    DeviceStateWriter queues;
    for (std::uint32_t q = 0; q < queues_; ++q) {
      DeviceStateWriter one;
      one.u64(1, chains_[q].load());
      one.u64(2, bytes_[q].load());
      queues.group(static_cast<std::uint16_t>(q), one);
    }
    out.group(2, queues);
  }
  Result<void, std::string> load_state(const DeviceStateReader& in, std::uint32_t) override {
    auto fail = [](const DeviceStateError& e) { return tl::unexpected(e.message()); };
    auto seq = in.u64(1);
    if (!seq) return fail(seq.error());
    auto queues = in.group(2);
    if (!queues) return fail(queues.error());
    std::vector<std::pair<std::uint64_t, std::uint64_t>> counts;
    for (std::uint32_t q = 0; q < queues_; ++q) {
      auto one = queues->group(static_cast<std::uint16_t>(q));
      if (!one) return fail(one.error());
      auto c = one->u64(1);
      auto b = one->u64(2);
      if (!c) return fail(c.error());
      if (!b) return fail(b.error());
      counts.emplace_back(*c, *b);
    }
    sequence_.store(*seq);
    for (std::uint32_t q = 0; q < queues_; ++q) {
      chains_[q].store(counts[q].first);
      bytes_[q].store(counts[q].second);
    }
    return {};
  }
  QueueWork process(std::uint32_t q, Virtqueue& vq) override {
    QueueWork w;
    if (q % 2 == 0 && !source_) return w;  // receive queues: nothing to deliver
    ChainBatch& b = batches_[q];
    b.clear();
    if (q % 2 == 0 && interval_.count() > 0) {
      // Paced source: one frame per interval. A late start does not catch up in a burst.
      auto now = std::chrono::steady_clock::now();
      auto& next = next_[q];
      if (next > now)
        std::this_thread::sleep_until(next);
      else
        next = now;
      next += interval_;
    }
    auto r = vq.pop(b, q % 2 == 0 && interval_.count() > 0 ? 1 : 32);
    if (!r) {
      w.error = r.error();
      return w;
    }
    w.deferred = r->deferred;
    std::vector<Completion> done;
    for (const DescChain& c : b.chains()) {
      if (q % 2 == 0) {
        std::vector<std::uint8_t> marked;
        std::span<const std::uint8_t> frame = frame_;
        if (marker_) {
          marked = frame_;
          std::uint64_t seq = sequence_.fetch_add(1, std::memory_order_relaxed) + 1;
          for (int i = 0; i < 8; ++i)
            marked[12 + 14 + 16 + i] = static_cast<std::uint8_t>(seq >> (8 * i));
          frame = marked;
        }
        auto wr = vq.write_chain(b, c, 0, frame);
        if (!wr) {
          w.error = wr.error();
          return w;
        }
        bytes_[q] += *wr;
        done.push_back(Completion{c.id, c.ring_descs, *wr});
      } else {
        bytes_[q] += c.readable_len;
        done.push_back(Completion{c.id, c.ring_descs, 0});
      }
    }
    if (!done.empty()) {
      auto n = vq.push(done);
      if (!n) {
        w.error = n.error();
        return w;
      }
      w.notify = *n;
      w.progress = true;
      chains_[q] += done.size();
    }
    return w;
  }
  std::uint32_t queues_;
  bool source_;
  bool marker_;
  bool mergeable_;
  bool big_;
  std::chrono::microseconds interval_{0};
  std::atomic<std::uint64_t> sequence_{0};
  std::vector<std::uint8_t> frame_;
  std::vector<std::atomic<std::uint64_t>> chains_;
  std::vector<std::atomic<std::uint64_t>> bytes_;
  std::vector<ChainBatch> batches_;
  std::vector<std::chrono::steady_clock::time_point> next_ =
      std::vector<std::chrono::steady_clock::time_point>(queues_);  // paced: next frame per queue
};

BackendServer* g_server = nullptr;
void on_signal(int) {
  if (g_server != nullptr) g_server->stop();
}

}  // namespace

int main(int argc, char** argv) {
  std::string path;
  int fd = -1;
  std::uint32_t queues = 2;
  LogLevel level = LogLevel::info;
  bool source = false;
  bool marker = false;
  bool mergeable = false;
  bool big = false;
  std::chrono::microseconds interval{0};
  BackendOptions options;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const char* name) -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "sink_backend: %s needs a value\n", name);
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--socket-path")
      path = value("--socket-path");
    else if (a == "--fd")
      fd = std::stoi(value("--fd"));
    else if (a == "--queues")
      queues = static_cast<std::uint32_t>(std::stoul(value("--queues")));
    else if (a == "--source")
      source = true;
    else if (a == "--marker")
      marker = true;
    else if (a == "--mergeable")
      mergeable = true;
    else if (a == "--big")
      big = true;
    else if (a == "--no-miss-lookahead")
      options.runner.miss_lookahead = false;
    else if (a == "--interval-us")
      interval = std::chrono::microseconds(std::stoul(value("--interval-us")));
    else if (a == "--log-level")
      level = value("--log-level") == "debug" ? LogLevel::debug : LogLevel::info;
    else {
      std::fprintf(stderr,
                   "usage: sink_backend (--socket-path PATH | --fd FD) [--queues N] [--source] "
                   "[--marker] [--mergeable] [--big] [--interval-us N] "
                   "[--no-miss-lookahead] [--log-level debug]\n");
      return 2;
    }
  }
  if (path.empty() == (fd < 0)) {
    std::fprintf(stderr, "sink_backend: give exactly one of --socket-path and --fd\n");
    return 2;
  }
  tools::log_to_stderr(level);
  SinkDevice device(queues, source, marker, mergeable, big);
  device.interval_ = interval;
  BackendServer server(device, options);
  g_server = &server;
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  ::sigaction(SIGTERM, &sa, nullptr);
  ::sigaction(SIGINT, &sa, nullptr);
  UniqueFd listener;
  if (!path.empty()) {
    auto l = BackendServer::listen_unix(path);
    if (!l) {
      std::fprintf(stderr, "sink_backend: %s\n", l.error().c_str());
      return 1;
    }
    listener = std::move(*l);
  } else {
    listener.reset(fd);
  }
  std::fprintf(stderr, "sink_backend: listening\n");
  auto r = server.run(listener.get());
  std::fprintf(stderr, "STATS messages=%llu rejected=%llu",
               static_cast<unsigned long long>(server.messages_handled()),
               static_cast<unsigned long long>(server.messages_rejected()));
  for (std::uint32_t q = 0; q < queues; ++q)
    std::fprintf(stderr, " chains_q%u=%llu bytes_q%u=%llu", q,
                 static_cast<unsigned long long>(device.chains_[q].load()), q,
                 static_cast<unsigned long long>(device.bytes_[q].load()));
  std::fprintf(stderr, "\n");
  if (!path.empty()) ::unlink(path.c_str());
  if (!r) {
    std::fprintf(stderr, "sink_backend: %s\n", r.error().c_str());
    return 1;
  }
  return 0;
}
