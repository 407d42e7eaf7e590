// vhostkit-net: the virtio-net vhost-user back-end program (docs/vhostkit-net.md).
// Follows QEMU's back-end program conventions (docs/interop/vhost-user.rst): exactly one
// of --socket-path and --fd, --print-capabilities, never daemonizes, logs to stderr,
// exits 0 on SIGTERM/SIGINT after printing its counters.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>

#include <CLI/CLI.hpp>

#include "listen_socket.h"
#include "vhostkit/devices/net.h"
#include "vhostkit/log.h"
#include "vhostkit/version.h"
#include "vhostkit/vhost_user/backend_server.h"

namespace {

using namespace vhostkit;

constexpr const char* kProgram = "vhostkit-net";
constexpr const char* kVersion = VHOSTKIT_VERSION_STRING;

BackendServer* g_server = nullptr;
std::atomic<bool> g_stopping{false};

void on_signal(int) {
  g_stopping.store(true);
  if (g_server != nullptr) g_server->stop();
}

int fail(const std::string& message) {
  std::fprintf(stderr, "%s: %s\n", kProgram, message.c_str());
  return 1;
}

void print_stats(const NetDevice& d, const BackendServer& s, const char* tag) {
  std::string line =
      fmt::format("{} messages={} rejected={}", tag, s.messages_handled(), s.messages_rejected());
  for (std::uint32_t q = 0; q < d.num_queues(); ++q) {
    NetQueueStats st = d.stats(q);
    const char* dir = q % 2 == 0 ? "rx" : "tx";
    line += fmt::format(" {}{}_packets={} {}{}_bytes={} {}{}_dropped={}", dir, q / 2, st.packets,
                        dir, q / 2, st.bytes, dir, q / 2, st.dropped);
  }
  std::fprintf(stderr, "%s\n", line.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"vhostkit-net: a virtio-net device served over vhost-user", kProgram};
  std::string socket_path;
  int fd = -1;
  bool print_caps = false;
  bool version = false;
  std::string mode_s = "loopback";
  std::string mac_s = "52:54:00:12:34:56";
  std::string level_s = "info";
  NetOptions opt;
  bool poll = false;
  unsigned poll_idle_us = 1000;
  double stats_interval = 0;
  bool no_iommu = false;
  bool no_packed = false;
  bool no_lookahead = false;
  std::size_t iotlb_entries = IotlbLimits{}.max_entries;

  app.add_option("--socket-path", socket_path, "Unix socket to listen on for the front-end");
  app.add_option("--fd", fd, "an already listening Unix socket fd, inherited")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--print-capabilities", print_caps, "print the JSON capabilities and exit");
  app.add_flag("-V,--version", version, "print the version and exit");
  app.add_option("--mode", mode_s, "packet backend: sink, source, loopback or tap")
      ->capture_default_str();
  app.add_option("--tap", opt.tap, "tap mode: the TAP interface to attach to (or create)");
  app.add_option("--queues", opt.queue_pairs, "number of queue pairs (1..256)")
      ->capture_default_str();
  app.add_option("--mac", mac_s, "MAC address in the config space")->capture_default_str();
  app.add_option("--mtu", opt.mtu, "MTU in the config space")->capture_default_str();
  app.add_option("--packet-size", opt.packet_size,
                 "source mode: Ethernet frame size in bytes (60..65535)")
      ->capture_default_str();
  app.add_option("--rate", opt.rate_pps, "source mode: packets per second in all (0: max)")
      ->capture_default_str();
  app.add_flag("--sink-read", opt.sink_read,
               "sink mode: copy every frame out of the guest before dropping it");
  app.add_flag("--poll", poll, "busy-poll the rings instead of sleeping on kicks");
  app.add_option("--poll-idle-us", poll_idle_us,
                 "with --poll: sleep after this many microseconds without work (0: never)")
      ->capture_default_str();
  app.add_option("--log-level", level_s, "debug, info, warn or error")->capture_default_str();
  app.add_option("--stats-interval", stats_interval,
                 "print the counters every this many seconds (0: only at exit)");
  app.add_flag("--no-iommu", no_iommu, "do not offer VIRTIO_F_ACCESS_PLATFORM");
  app.add_flag("--no-packed", no_packed, "do not offer VIRTIO_F_RING_PACKED");
  app.add_flag("--no-miss-lookahead", no_lookahead,
               "request one missing IOTLB page at a time instead of all a kick reveals");
  app.add_option("--iotlb-entries", iotlb_entries,
                 "IOTLB capacity in translations; the oldest are dropped beyond it (1..4194304)")
      ->check(CLI::Range(std::size_t{1}, std::size_t{1} << 22))
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) {
      std::fputs(app.help().c_str(), stdout);
      return 0;
    }
    std::fprintf(stderr, "%s: %s\nTry '%s --help'.\n", kProgram, e.what(), kProgram);
    return 2;
  }
  if (print_caps) {
    // vhost-user.rst, "Backend program conventions": type, and no net features.
    std::printf("{\n  \"type\": \"net\",\n  \"features\": []\n}\n");
    return 0;
  }
  if (version) {
    std::printf("%s %s\n", kProgram, kVersion);
    return 0;
  }
  auto usage = [](const std::string& m) {
    std::fprintf(stderr, "%s: %s\nTry '%s --help'.\n", kProgram, m.c_str(), kProgram);
    return 2;
  };
  if (socket_path.empty() == (fd < 0)) return usage("give exactly one of --socket-path and --fd");
  auto mode = parse_net_mode(mode_s);
  if (!mode) return usage(mode.error());
  opt.mode = *mode;
  auto mac = parse_mac(mac_s);
  if (!mac) return usage(mac.error());
  opt.mac = *mac;
  if (opt.mode != NetMode::tap && !opt.tap.empty()) return usage("--tap needs --mode tap");
  if (opt.mode != NetMode::sink && opt.sink_read) return usage("--sink-read needs --mode sink");
  LogLevel level = LogLevel::info;
  if (level_s == "debug")
    level = LogLevel::debug;
  else if (level_s == "info")
    level = LogLevel::info;
  else if (level_s == "warn")
    level = LogLevel::warn;
  else if (level_s == "error")
    level = LogLevel::error;
  else
    return usage("--log-level must be debug, info, warn or error");
  set_log_sink(
      [](LogLevel l, std::string_view line) {
        std::fprintf(stderr, "%s: %s: %.*s\n", kProgram, to_string(l),
                     static_cast<int>(line.size()), line.data());
      },
      level);

  auto device = NetDevice::create(opt);
  if (!device) return fail(device.error());
  BackendOptions bo;
  bo.runner.poll = poll;
  bo.runner.poll_idle = std::chrono::microseconds(poll_idle_us);
  bo.offer_iommu = !no_iommu;
  bo.offer_packed = !no_packed;
  bo.runner.miss_lookahead = !no_lookahead;
  bo.iotlb.max_entries = iotlb_entries;
  BackendServer server(**device, bo);

  UniqueFd listener;
  if (!socket_path.empty()) {
    auto l = BackendServer::listen_unix(socket_path);
    if (!l) return fail(l.error());
    listener = std::move(*l);
  } else {
    auto l = daemon::adopt_listen_fd(fd);
    if (!l) return fail(l.error());
    listener = std::move(*l);
  }

  g_server = &server;
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  ::sigemptyset(&sa.sa_mask);
  ::sigaction(SIGTERM, &sa, nullptr);
  ::sigaction(SIGINT, &sa, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  log(LogLevel::info, "serving {} mode, {} queue pair(s){}{} on {}", to_string(opt.mode),
      opt.queue_pairs, opt.mode == NetMode::tap ? ", tap " : "", (*device)->tap_name(),
      socket_path.empty() ? fmt::format("fd {}", fd) : socket_path);

  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::thread stats_thread;
  if (stats_interval > 0) {
    stats_thread = std::thread([&] {
      std::unique_lock lock(mu);
      auto period = std::chrono::duration<double>(stats_interval);
      while (!cv.wait_for(lock, period, [&] { return done; }))
        print_stats(**device, server, "PROGRESS");
    });
  }
  auto r = server.run(listener.get());
  {
    std::lock_guard lock(mu);
    done = true;
  }
  cv.notify_all();
  if (stats_thread.joinable()) stats_thread.join();
  print_stats(**device, server, "STATS");
  if (!socket_path.empty()) ::unlink(socket_path.c_str());
  if (!r) return fail(r.error());
  return 0;
}
