// vhostkit-rng: a virtio-rng device served over vhost-user, built on the installed vhostkit
// library (docs/vhostkit-rng.md). Follows QEMU's back-end program conventions
// (docs/interop/vhost-user.rst): exactly one of --socket-path and --fd,
// --print-capabilities, never daemonizes, logs to stderr, exits 0 on SIGTERM or SIGINT.
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "rng_device.h"
#include "vhostkit/log.h"
#include "vhostkit/version.h"
#include "vhostkit/vhost_user/backend_server.h"

namespace {

constexpr const char* kProgram = "vhostkit-rng";
constexpr const char* kVersion = "0.2.0";
constexpr const char* kUsage =
    "Usage: vhostkit-rng (--socket-path PATH | --fd FD) [options]\n"
    "       vhostkit-rng --print-capabilities | --help | --version\n"
    "\n"
    "Serves a virtio-rng device (QEMU: -device vhost-user-rng-pci) whose buffers are\n"
    "filled from an entropy source.\n"
    "\n"
    "  --socket-path PATH     listen on a new Unix socket at PATH\n"
    "  --fd FD                serve the listening Unix socket FD (inherited)\n"
    "  --source FILE          the entropy source (default /dev/urandom)\n"
    "  --log-level L          debug, info (default), warn or error\n"
    "  --print-capabilities   print the back-end's capabilities as JSON and exit\n"
    "  -h, --help             print this help and exit\n"
    "  -V, --version          print the version and exit\n";

vhostkit::BackendServer* g_server = nullptr;

void on_signal(int) {
  if (g_server != nullptr) g_server->stop();
}

[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr, "%s: %s\nTry '%s --help'.\n", kProgram, message.c_str(), kProgram);
  std::exit(2);
}

int fail(const std::string& message) {
  std::fprintf(stderr, "%s: %s\n", kProgram, message.c_str());
  return 1;
}

// The listening socket inherited as --fd: it must be a listening Unix stream socket.
std::string check_listening_socket(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return "--fd " + std::to_string(fd) + " is not an open fd";
  int type = 0;
  int listening = 0;
  socklen_t len = sizeof type;
  if (!S_ISSOCK(st.st_mode) || ::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 ||
      type != SOCK_STREAM)
    return "--fd " + std::to_string(fd) + " is not a stream socket";
  len = sizeof listening;
  if (::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || listening == 0)
    return "--fd " + std::to_string(fd) + " is a socket that is not listening";
  return {};
}

}  // namespace

int main(int argc, char** argv) {
  std::string socket_path;
  int listen_fd = -1;
  std::string source = "/dev/urandom";
  vhostkit::LogLevel level = vhostkit::LogLevel::info;

  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    bool inline_value = false;
    if (auto eq = arg.find('='); arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg.resize(eq);
      inline_value = true;
    }
    auto take_value = [&]() -> std::string {
      if (inline_value) return value;
      if (i + 1 >= argc) usage_error(arg + " needs a value");
      return argv[++i];
    };
    auto no_value = [&] {
      if (inline_value) usage_error(arg + " takes no value");
    };
    if (arg == "--socket-path") {
      socket_path = take_value();
      if (socket_path.empty()) usage_error("--socket-path needs a non-empty path");
    } else if (arg == "--fd") {
      std::string v = take_value();
      auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), listen_fd);
      if (ec != std::errc() || end != v.data() + v.size() || listen_fd < 0)
        usage_error("--fd needs a file descriptor number, not '" + v + "'");
    } else if (arg == "--source") {
      source = take_value();
    } else if (arg == "--log-level") {
      std::string v = take_value();
      if (v == "debug")
        level = vhostkit::LogLevel::debug;
      else if (v == "info")
        level = vhostkit::LogLevel::info;
      else if (v == "warn")
        level = vhostkit::LogLevel::warn;
      else if (v == "error")
        level = vhostkit::LogLevel::error;
      else
        usage_error("--log-level must be debug, info, warn or error, not '" + v + "'");
    } else if (arg == "--print-capabilities") {
      no_value();
      // vhost-user.json: VHostUserBackendCapabilities has no member for "rng".
      std::printf("{\n  \"type\": \"rng\"\n}\n");
      return 0;
    } else if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (arg == "-V" || arg == "--version") {
      std::printf("%s %s (vhostkit headers %s)\n", kProgram, kVersion, VHOSTKIT_VERSION_STRING);
      return 0;
    } else {
      usage_error("unknown argument '" + std::string(argv[i]) + "'");
    }
  }
  if (socket_path.empty() == (listen_fd < 0))
    usage_error("give exactly one of --socket-path and --fd");

  vhostkit::set_log_sink(
      [](vhostkit::LogLevel l, std::string_view line) {
        std::fprintf(stderr, "%s: %s: %.*s\n", kProgram, vhostkit::to_string(l),
                     static_cast<int>(line.size()), line.data());
      },
      level);

  auto device = rng::RngDevice::open("rng0", source);
  if (!device) return fail(device.error());

  vhostkit::UniqueFd listener;
  if (!socket_path.empty()) {
    auto l = vhostkit::BackendServer::listen_unix(socket_path);
    if (!l) return fail(l.error());
    listener = std::move(*l);
  } else {
    if (std::string e = check_listening_socket(listen_fd); !e.empty()) return fail(e);
    ::fcntl(listen_fd, F_SETFD, FD_CLOEXEC);
    listener.reset(listen_fd);
  }

  vhostkit::BackendServer server(**device);
  g_server = &server;
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  ::sigemptyset(&sa.sa_mask);
  ::sigaction(SIGTERM, &sa, nullptr);
  ::sigaction(SIGINT, &sa, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  vhostkit::log(vhostkit::LogLevel::info, "rng0: serving entropy from {} on {}", source,
                socket_path.empty() ? "fd " + std::to_string(listen_fd) : socket_path);
  auto r = server.run(listener.get());
  g_server = nullptr;
  const rng::RngStats& s = (*device)->stats();
  std::fprintf(stderr, "STATS requests=%llu bytes=%llu unwritable=%llu source_errors=%llu\n",
               static_cast<unsigned long long>(s.requests.load()),
               static_cast<unsigned long long>(s.bytes.load()),
               static_cast<unsigned long long>(s.unwritable.load()),
               static_cast<unsigned long long>(s.source_errors.load()));
  if (!socket_path.empty()) ::unlink(socket_path.c_str());
  if (!r) return fail(r.error());
  return 0;
}
