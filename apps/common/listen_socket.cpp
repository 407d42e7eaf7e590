#include "listen_socket.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string_view>

#include <fmt/format.h>

namespace vhostkit::daemon {
namespace {

// A whole decimal number, or nullopt.
std::optional<long> parse_number(const char* s) {
  if (s == nullptr) return std::nullopt;
  std::string_view v(s);
  long n = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  if (ec != std::errc() || p != v.data() + v.size() || v.empty()) return std::nullopt;
  return n;
}

const char* describe(mode_t mode) {
  if (S_ISREG(mode)) return "a regular file";
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISFIFO(mode)) return "a pipe";
  return "not a socket";
}

int socket_option(int fd, int option) {
  int value = -1;
  socklen_t len = sizeof value;
  if (::getsockopt(fd, SOL_SOCKET, option, &value, &len) != 0) return -1;
  return value;
}

}  // namespace

Result<UniqueFd, std::string> adopt_listen_fd(int fd, int first_activated_fd) {
  // Read, then always remove, the activation variables (sd_listen_fds(1) does the same).
  const char* pid_s = std::getenv("LISTEN_PID");
  const char* fds_s = std::getenv("LISTEN_FDS");
  std::optional<long> pid = parse_number(pid_s);
  std::optional<long> count = parse_number(fds_s);
  ::unsetenv("LISTEN_PID");
  ::unsetenv("LISTEN_FDS");
  ::unsetenv("LISTEN_FDNAMES");

  if (pid && *pid == static_cast<long>(::getpid())) {
    if (!count || *count < 1)
      return make_unexpected(
          fmt::format("--fd {}: LISTEN_FDS is '{}', not a number of sockets (socket activation)",
                      fd, fds_s == nullptr ? "" : fds_s));
    if (*count != 1)
      return make_unexpected(fmt::format(
          "--fd {}: the service manager passed {} sockets (LISTEN_FDS); one is served, so give "
          "the socket unit a single ListenStream=",
          fd, *count));
    if (fd != first_activated_fd)
      return make_unexpected(fmt::format(
          "--fd {}: the service manager passed its socket as fd {} (LISTEN_FDS=1); use --fd {}", fd,
          first_activated_fd, first_activated_fd));
  } else if (pid_s != nullptr && !pid) {
    return make_unexpected(fmt::format("--fd {}: LISTEN_PID is '{}', not a process id", fd,
                                       pid_s == nullptr ? "" : pid_s));
  }
  // Otherwise the variables, if any, were meant for another process: only fd counts.

  if (fd < 0) return make_unexpected(fmt::format("--fd {}: not a file descriptor", fd));
  struct stat st {};
  if (::fstat(fd, &st) != 0)
    return make_unexpected(
        fmt::format("--fd {}: not an open file descriptor ({})", fd, std::strerror(errno)));
  if (!S_ISSOCK(st.st_mode))
    return make_unexpected(
        fmt::format("--fd {}: {}, not a listening Unix socket", fd, describe(st.st_mode)));
  if (socket_option(fd, SO_DOMAIN) != AF_UNIX)
    return make_unexpected(fmt::format("--fd {}: not a Unix (AF_UNIX) socket", fd));
  if (socket_option(fd, SO_TYPE) != SOCK_STREAM)
    return make_unexpected(fmt::format("--fd {}: not a stream (SOCK_STREAM) socket", fd));
  if (socket_option(fd, SO_ACCEPTCONN) != 1)
    return make_unexpected(
        fmt::format("--fd {}: a Unix socket that is not listening (pass a listening socket, not a "
                    "connection)",
                    fd));
  int flags = ::fcntl(fd, F_GETFD);
  if (flags < 0 || ::fcntl(fd, F_SETFD, flags | FD_CLOEXEC) != 0)
    return make_unexpected(
        fmt::format("--fd {}: cannot set close-on-exec ({})", fd, std::strerror(errno)));
  return UniqueFd(fd);
}

}  // namespace vhostkit::daemon
