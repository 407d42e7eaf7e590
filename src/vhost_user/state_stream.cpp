// Device state images through a transfer fd (src/vhost_user/internal/state_stream.h).
#include "vhost_user/internal/state_stream.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

namespace vhostkit::vhost_user {

namespace {

// Blocks SIGPIPE on the calling thread while it lives, and discards one raised meanwhile
// (a write to a pipe without a reader raises it on the writing thread; blocked, the write
// fails with EPIPE instead of ending the process).
class SigpipeBlock {
 public:
  SigpipeBlock() {
    sigemptyset(&set_);
    sigaddset(&set_, SIGPIPE);
    (void)pthread_sigmask(SIG_BLOCK, &set_, &old_);
  }
  ~SigpipeBlock() {
    const timespec zero{};
    while (::sigtimedwait(&set_, nullptr, &zero) == SIGPIPE) {
    }
    (void)pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  SigpipeBlock(const SigpipeBlock&) = delete;
  SigpipeBlock& operator=(const SigpipeBlock&) = delete;

 private:
  sigset_t set_{};
  sigset_t old_{};
};

// Waits until fd is ready for `events`: an empty string, or why not.
std::string wait_ready(int fd, short events, int cancel_fd, std::chrono::milliseconds timeout) {
  while (true) {
    pollfd fds[2] = {{fd, events, 0}, {cancel_fd, POLLIN, 0}};
    const int r = ::poll(fds, cancel_fd >= 0 ? 2 : 1, static_cast<int>(timeout.count()));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return fmt::format("poll: {}", std::strerror(errno));
    if (r == 0) return fmt::format("no progress for {} ms", timeout.count());
    if (cancel_fd >= 0 && (fds[1].revents & POLLIN) != 0) return "cancelled";
    return {};
  }
}

bool set_nonblocking(int fd) {
  const int flags = ::fcntl(fd, F_GETFL);
  return flags >= 0 && ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0;
}

}  // namespace

Result<void, std::string> write_state(int fd, std::span<const std::uint8_t> data, int cancel_fd,
                                      std::chrono::milliseconds timeout) {
  if (!set_nonblocking(fd)) return unexpected(fmt::format("fcntl: {}", std::strerror(errno)));
  SigpipeBlock no_sigpipe;
  std::size_t off = 0;
  while (off < data.size()) {
    if (auto w = wait_ready(fd, POLLOUT, cancel_fd, timeout); !w.empty())
      return unexpected(fmt::format("at byte {} of {}: {}", off, data.size(), w));
    const ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n < 0)
      return unexpected(
          fmt::format("at byte {} of {}: {}", off, data.size(), std::strerror(errno)));
    off += static_cast<std::size_t>(n);
  }
  return {};
}

Result<std::vector<std::uint8_t>, std::string> read_state(int fd, std::size_t limit, int cancel_fd,
                                                          std::chrono::milliseconds timeout) {
  if (!set_nonblocking(fd)) return unexpected(fmt::format("fcntl: {}", std::strerror(errno)));
  std::vector<std::uint8_t> out;
  std::vector<std::uint8_t> chunk(64 * 1024);
  while (true) {
    if (auto w = wait_ready(fd, POLLIN, cancel_fd, timeout); !w.empty())
      return unexpected(fmt::format("after {} bytes: {}", out.size(), w));
    const ssize_t n = ::read(fd, chunk.data(), chunk.size());
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n < 0)
      return unexpected(fmt::format("after {} bytes: {}", out.size(), std::strerror(errno)));
    if (n == 0) return out;
    if (out.size() + static_cast<std::size_t>(n) > limit)
      return unexpected(fmt::format("more than {} bytes", limit));
    out.insert(out.end(), chunk.begin(), chunk.begin() + n);
  }
}

}  // namespace vhostkit::vhost_user
