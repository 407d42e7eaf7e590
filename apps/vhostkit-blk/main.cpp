// vhostkit-blk: a vhost-user virtio-blk back-end daemon over a raw image file or block
// device. Follows QEMU's "Backend program conventions" (docs/interop/vhost-user.rst):
// --socket-path or --fd, --print-capabilities, never daemonizes, logs to stderr. See
// docs/vhostkit-blk.md for the options and an example QEMU command line.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "listen_socket.h"
#include "vhostkit/devices/blk.h"
#include "vhostkit/log.h"
#include "vhostkit/vhost_user/backend_server.h"

#ifndef VHOSTKIT_VERSION
#define VHOSTKIT_VERSION "0.0.0"
#endif

namespace {

using namespace vhostkit;

// Tests only (tests/devices/blk/qemu_blk_restart_test.py): VHOSTKIT_TEST_CRASH=<p>:<n>
// kills the process with SIGKILL the n-th time a ring reaches CrashPoint number p (see
// vhostkit/virtqueue.h), so that a test can end a back-end in the middle of a request.
int g_crash_point = -1;
std::atomic<long> g_crash_countdown{0};
void crash_hook(CrashPoint p) {
  if (static_cast<int>(p) == g_crash_point && g_crash_countdown.fetch_sub(1) == 1) ::raise(SIGKILL);
}
void install_test_crash_hook() {
  const char* v = std::getenv("VHOSTKIT_TEST_CRASH");
  int point = -1;
  long count = 0;
  if (v == nullptr || std::sscanf(v, "%d:%ld", &point, &count) != 2 || point < 0 || count < 1)
    return;
  g_crash_point = point;
  g_crash_countdown = count;
  set_crash_hook(&crash_hook);
}

constexpr const char* kUsage =
    "Usage: vhostkit-blk (--socket-path PATH | --fd FD) --blk-file FILE [options]\n"
    "       vhostkit-blk --print-capabilities | --help | --version\n"
    "\n"
    "Serves a raw image file or block device as a vhost-user virtio-blk device.\n"
    "\n"
    "  --socket-path PATH     listen on a new Unix socket at PATH\n"
    "  --fd FD                serve the listening Unix socket FD (inherited)\n"
    "  --blk-file FILE        the raw image file or block device to serve\n"
    "  --read-only            open FILE read-only and offer VIRTIO_BLK_F_RO\n"
    "  --num-queues N         number of request queues (1-64, default: one per CPU)\n"
    "  --workers N            worker threads serving them (default: min(queues, CPUs))\n"
    "  --direct on|off        open FILE with O_DIRECT (default off)\n"
    "  --cache MODE           writeback (default) or writethrough\n"
    "  --logical-block-size B   512 (default), 1024, 2048 or 4096 bytes\n"
    "  --physical-block-size B  a power of two, logical block size (default) .. 1 MiB\n"
    "  --serial ID            the GET_ID string (at most 20 bytes; default: file name)\n"
    "  --engine E             I/O engine: auto (default), io_uring or sync\n"
    "  --poll                 busy-poll the queues instead of waiting for kicks\n"
    "  --log-level L          debug, info (default), warn or error\n"
    "  --print-capabilities   print the back-end's capabilities as JSON and exit\n"
    "  -h, --help             print this help and exit\n"
    "  -V, --version          print the version and exit\n";

BackendServer* g_server = nullptr;
void on_signal(int) {
  if (g_server != nullptr) g_server->stop();
}

[[noreturn]] void fail_usage(const std::string& msg) {
  std::fprintf(stderr, "vhostkit-blk: %s (see --help)\n", msg.c_str());
  std::exit(2);
}

std::uint32_t parse_uint(std::string_view opt, const std::string& v, std::uint32_t lo,
                         std::uint32_t hi) {
  std::uint32_t n = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  if (ec != std::errc() || p != v.data() + v.size() || n < lo || n > hi)
    fail_usage(std::string(opt) + " needs a number from " + std::to_string(lo) + " to " +
               std::to_string(hi) + ", not '" + v + "'");
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  std::string socket_path;
  int listen_fd = -1;
  bool have_fd = false;
  bool poll = false;
  LogLevel level = LogLevel::info;
  BlkOptions blk;
  blk.name = "vhostkit-blk";

  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    std::string inline_value;
    bool has_inline = false;
    if (a.rfind("--", 0) == 0) {
      if (auto eq = a.find('='); eq != std::string::npos) {
        inline_value = a.substr(eq + 1);
        a = a.substr(0, eq);
        has_inline = true;
      }
    }
    auto value = [&]() -> std::string {
      if (has_inline) return inline_value;
      if (i + 1 >= argc) fail_usage(a + " needs a value");
      return argv[++i];
    };
    auto flag = [&] {
      if (has_inline) fail_usage(a + " takes no value");
    };
    if (a == "--socket-path") {
      socket_path = value();
      if (socket_path.empty()) fail_usage("--socket-path needs a non-empty path");
    } else if (a == "--fd") {
      listen_fd = static_cast<int>(parse_uint(a, value(), 0, 1u << 30));
      have_fd = true;
    } else if (a == "--blk-file") {
      blk.path = value();
    } else if (a == "--read-only") {
      flag();
      blk.read_only = true;
    } else if (a == "--num-queues") {
      blk.queues = parse_uint(a, value(), 1, 64);
    } else if (a == "--workers") {
      blk.workers = parse_uint(a, value(), 1, 64);
    } else if (a == "--direct") {
      std::string v = value();
      if (v != "on" && v != "off") fail_usage("--direct must be on or off, not '" + v + "'");
      blk.direct = v == "on";
    } else if (a == "--cache") {
      std::string v = value();
      if (v == "writeback")
        blk.cache = BlkCache::writeback;
      else if (v == "writethrough")
        blk.cache = BlkCache::writethrough;
      else
        fail_usage("--cache must be writeback or writethrough, not '" + v + "'");
    } else if (a == "--logical-block-size") {
      blk.logical_block_size = parse_uint(a, value(), 512, 4096);
      if ((blk.logical_block_size & (blk.logical_block_size - 1)) != 0)
        fail_usage("--logical-block-size must be a power of two");
    } else if (a == "--physical-block-size") {
      blk.physical_block_size = parse_uint(a, value(), 512, 1u << 20);
      if ((blk.physical_block_size & (blk.physical_block_size - 1)) != 0)
        fail_usage("--physical-block-size must be a power of two");
    } else if (a == "--serial") {
      blk.serial = value();
      if (blk.serial.size() > blk::kIdBytes) fail_usage("--serial is longer than 20 bytes");
    } else if (a == "--engine") {
      std::string e = value();
      if (e == "auto")
        blk.engine = BlkEngine::automatic;
      else if (e == "io_uring")
        blk.engine = BlkEngine::io_uring;
      else if (e == "sync")
        blk.engine = BlkEngine::sync;
      else
        fail_usage("--engine must be auto, io_uring or sync, not '" + e + "'");
    } else if (a == "--poll") {
      flag();
      poll = true;
    } else if (a == "--log-level") {
      std::string l = value();
      if (l == "debug")
        level = LogLevel::debug;
      else if (l == "info")
        level = LogLevel::info;
      else if (l == "warn" || l == "warning")
        level = LogLevel::warn;
      else if (l == "error")
        level = LogLevel::error;
      else
        fail_usage("--log-level must be debug, info, warn or error, not '" + l + "'");
    } else if (a == "--print-capabilities") {
      flag();
      std::printf(
          "{\n  \"type\": \"block\",\n  \"features\": [\n    \"read-only\",\n"
          "    \"blk-file\"\n  ]\n}\n");
      return 0;
    } else if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (a == "-V" || a == "--version") {
      std::printf("vhostkit-blk %s\n", VHOSTKIT_VERSION);
      return 0;
    } else {
      fail_usage("unknown argument '" + std::string(argv[i]) + "'");
    }
  }
  if (socket_path.empty() == !have_fd) fail_usage("give exactly one of --socket-path and --fd");
  if (blk.path.empty()) fail_usage("--blk-file is required");
  if (blk.queues != 0 && blk.workers > blk.queues)
    fail_usage("--workers must not exceed --num-queues");
  if (blk.physical_block_size != 0 && blk.physical_block_size < blk.logical_block_size)
    fail_usage("--physical-block-size must not be below --logical-block-size");

  set_log_sink(
      [](LogLevel l, std::string_view line) {
        std::fprintf(stderr, "vhostkit-blk: %s: %.*s\n", to_string(l),
                     static_cast<int>(line.size()), line.data());
      },
      level);

  // Claim the socket first, so a second daemon on the same path is refused before it
  // touches the image or says anything else.
  UniqueFd listener;
  if (!socket_path.empty()) {
    auto l = BackendServer::listen_unix(socket_path);
    if (!l) {
      std::fprintf(stderr, "vhostkit-blk: %s\n", l.error().c_str());
      return 1;
    }
    listener = std::move(*l);
  } else {
    auto l = daemon::adopt_listen_fd(listen_fd);
    if (!l) {
      std::fprintf(stderr, "vhostkit-blk: %s\n", l.error().c_str());
      return 1;
    }
    listener = std::move(*l);
  }
  auto device = BlkDevice::open(blk);
  if (!device) {
    std::fprintf(stderr, "vhostkit-blk: %s\n", device.error().c_str());
    if (!socket_path.empty()) ::unlink(socket_path.c_str());
    return 1;
  }
  if (!socket_path.empty())
    log(LogLevel::info, "{}: listening on {}", blk.name, socket_path);
  else
    log(LogLevel::info, "{}: serving listening socket fd {}", blk.name, listen_fd);
  BackendOptions bo;
  bo.runner.poll = poll;
  install_test_crash_hook();
  BackendServer server(**device, bo);
  g_server = &server;
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGTERM, &sa, nullptr);
  ::sigaction(SIGINT, &sa, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  auto r = server.run(listener.get());
  g_server = nullptr;
  const BlkStats& s = (*device)->stats();
  log(LogLevel::info,
      "{}: exiting: reads={} writes={} flushes={} errors={} unsupported={} durable_syncs={} "
      "bounced={} unaligned={}",
      blk.name, s.reads.load(), s.writes.load(), s.flushes.load(), s.errors.load(),
      s.unsupported.load(), s.durable_syncs.load(), s.bounced.load(), s.unaligned.load());
  if (!socket_path.empty()) ::unlink(socket_path.c_str());
  if (!r) {
    std::fprintf(stderr, "vhostkit-blk: %s\n", r.error().c_str());
    return 1;
  }
  return 0;
}
