// A vhost-user back-end program for interoperability tests: serves a device with N
// queues that consumes whatever the driver offers on odd queues (a network device's
// transmit queues) and, with --source, fills the buffers of even queues (receive) with
// 60-byte broadcast frames behind a 12-byte virtio-net header; otherwise it leaves them. Follows
// QEMU's back-end program conventions for --socket-path / --fd; exits cleanly on SIGTERM and prints
//   STATS messages=<n> rejected=<n> chains_q<i>=<n> bytes_q<i>=<n>
// on stderr. Every request is logged at debug level (--log-level debug).
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "vhostkit/log.h"
#include "vhostkit/vhost_user/backend_server.h"

namespace {

using namespace vhostkit;

class SinkDevice : public Device {
 public:
  SinkDevice(std::uint32_t queues, bool source)
      : queues_(queues), source_(source), chains_(queues), bytes_(queues), batches_(queues) {
    frame_.assign(12 + 60, 0);  // virtio_net_hdr (12 bytes with VERSION_1), then the frame
    for (int i = 0; i < 6; ++i) frame_[12 + i] = 0xff;  // broadcast destination
    frame_[12 + 6] = 0x02;                              // a locally administered source
    frame_[12 + 12] = 0x88;                             // ethertype 0x88b5 (local experimental)
    frame_[12 + 13] = 0xb5;
  }
  std::string name() const override { return "sink0"; }
  std::uint64_t device_features() const override { return 0; }
  std::uint32_t num_queues() const override { return queues_; }
  QueueWork process(std::uint32_t q, Virtqueue& vq) override {
    QueueWork w;
    if (q % 2 == 0 && !source_) return w;  // receive queues: nothing to deliver
    ChainBatch& b = batches_[q];
    b.clear();
    auto r = vq.pop(b, 32);
    if (!r) {
      w.error = r.error();
      return w;
    }
    w.deferred = r->deferred;
    std::vector<Completion> done;
    for (const DescChain& c : b.chains()) {
      if (q % 2 == 0) {
        auto wr = vq.write_chain(b, c, 0, frame_);
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
  std::vector<std::uint8_t> frame_;
  std::vector<std::atomic<std::uint64_t>> chains_;
  std::vector<std::atomic<std::uint64_t>> bytes_;
  std::vector<ChainBatch> batches_;
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
    else if (a == "--log-level")
      level = value("--log-level") == "debug" ? LogLevel::debug : LogLevel::info;
    else {
      std::fprintf(stderr,
                   "usage: sink_backend (--socket-path PATH | --fd FD) [--queues N] [--source] "
                   "[--log-level debug]\n");
      return 2;
    }
  }
  if (path.empty() == (fd < 0)) {
    std::fprintf(stderr, "sink_backend: give exactly one of --socket-path and --fd\n");
    return 2;
  }
  set_log_sink(
      [](LogLevel l, std::string_view line) {
        std::fprintf(stderr, "%s: %.*s\n", to_string(l), static_cast<int>(line.size()),
                     line.data());
      },
      level);
  SinkDevice device(queues, source);
  BackendServer server(device);
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
