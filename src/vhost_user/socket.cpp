// vhost-user messages on a Unix stream socket, with fds passed as SCM_RIGHTS.
#include "vhostkit/vhost_user/socket.h"

#include <sys/socket.h>
#include <sys/types.h>

#include <cerrno>
#include <cstring>

namespace vhostkit::vhost_user {

namespace {

// Room for exactly kMaxFds descriptors: a peer sending more makes the kernel set
// MSG_CTRUNC (it closes what does not fit; what fits arrives and is closed by us).
constexpr std::size_t kControlSize = CMSG_SPACE(sizeof(int) * kMaxFds);

union ControlBuffer {
  cmsghdr align;
  unsigned char bytes[kControlSize];
};

struct Received {
  ssize_t n = 0;        // bytes, 0 at EOF, -1 on error (errno set)
  bool ctrunc = false;  // the kernel dropped fds that did not fit
};

// One recvmsg into [buf, buf + len); every fd that arrives is appended to `fds` at once.
Received receive(int fd, std::uint8_t* buf, std::size_t len, std::vector<UniqueFd>& fds) {
  ControlBuffer control;
  iovec iov{buf, len};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.bytes;
  msg.msg_controllen = sizeof control.bytes;
  Received r;
  do {
    r.n = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
  } while (r.n < 0 && errno == EINTR);
  if (r.n < 0) return r;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    if (c->cmsg_len < CMSG_LEN(0)) continue;
    const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < count; ++i) {
      int received = -1;
      std::memcpy(&received, CMSG_DATA(c) + i * sizeof(int), sizeof received);
      fds.emplace_back(received);
    }
  }
  r.ctrunc = (msg.msg_flags & MSG_CTRUNC) != 0;
  return r;
}

CodecError error(CodecErrc code, Channel c, std::uint32_t request = 0, std::uint32_t flags = 0,
                 std::uint64_t actual = 0, std::uint64_t expected = 0, bool at_most = false,
                 int sys_errno = 0) {
  return CodecError{code, c, request, flags, actual, expected, at_most, sys_errno};
}

}  // namespace

Result<Message, CodecError> read_message(int fd, Channel c) {
  Message m;
  std::array<std::uint8_t, kHeaderSize> header{};
  bool ctrunc = false;
  std::size_t got = 0;
  while (got < kHeaderSize) {
    // Fds are taken with any header byte (a conforming peer attaches them to the first).
    const Received r = receive(fd, header.data() + got, kHeaderSize - got, m.fds);
    ctrunc = ctrunc || r.ctrunc;
    if (r.n < 0) return unexpected(error(CodecErrc::io_error, c, 0, 0, 0, 0, false, errno));
    if (r.n == 0) {
      if (got == 0 && m.fds.empty()) return unexpected(error(CodecErrc::closed, c));
      return unexpected(error(CodecErrc::truncated, c, 0, 0, got, kHeaderSize));
    }
    got += static_cast<std::size_t>(r.n);
  }
  const Header h = decode_header(header);
  m.request = h.request;
  m.flags = h.flags;
  if (h.size > kMaxPayload) {
    return unexpected(
        error(CodecErrc::too_large, c, h.request, h.flags, h.size, kMaxPayload, true));
  }
  m.payload.resize(h.size);
  std::vector<UniqueFd> stray;  // fds that came with payload bytes
  got = 0;
  while (got < h.size) {
    const Received r = receive(fd, m.payload.data() + got, h.size - got, stray);
    ctrunc = ctrunc || r.ctrunc;
    if (r.n < 0) {
      return unexpected(error(CodecErrc::io_error, c, h.request, h.flags, 0, 0, false, errno));
    }
    if (r.n == 0) {
      return unexpected(error(CodecErrc::truncated, c, h.request, h.flags, kHeaderSize + got,
                              kHeaderSize + h.size));
    }
    got += static_cast<std::size_t>(r.n);
  }
  // The message was read whole, so the stream is still in step: these two are
  // recoverable, and every fd that arrived closes with `m` and `stray`.
  if (ctrunc || m.fds.size() + stray.size() > kMaxFds) {
    return unexpected(error(CodecErrc::too_many_fds, c, h.request, h.flags,
                            m.fds.size() + stray.size() + (ctrunc ? 1 : 0), kMaxFds, true));
  }
  if (!stray.empty()) {
    return unexpected(error(CodecErrc::misplaced_fds, c, h.request, h.flags, stray.size(), 0));
  }
  return m;
}

namespace {

Result<void, CodecError> send_message(int fd, const Message& m, Channel c, bool dont_wait) {
  if (m.fds.size() > kMaxFds) {
    return unexpected(
        error(CodecErrc::too_many_fds, c, m.request, m.flags, m.fds.size(), kMaxFds, true));
  }
  if (m.payload.size() > kMaxPayload) {
    return unexpected(
        error(CodecErrc::too_large, c, m.request, m.flags, m.payload.size(), kMaxPayload, true));
  }
  for (const UniqueFd& f : m.fds) {
    if (!f.valid()) {
      return unexpected(error(CodecErrc::io_error, c, m.request, m.flags, 0, 0, false, EBADF));
    }
  }
  auto header = encode_header(m);
  iovec iov[2] = {{header.data(), header.size()},
                  {const_cast<std::uint8_t*>(m.payload.data()), m.payload.size()}};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = m.payload.empty() ? 1 : 2;
  ControlBuffer control;
  if (!m.fds.empty()) {
    const std::size_t len = sizeof(int) * m.fds.size();
    std::memset(control.bytes, 0, sizeof control.bytes);
    msg.msg_control = control.bytes;
    msg.msg_controllen = CMSG_SPACE(len);
    cmsghdr* cm = &control.align;  // what CMSG_FIRSTHDR(&msg) returns, never null
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(len);
    for (std::size_t i = 0; i < m.fds.size(); ++i) {
      const int v = m.fds[i].get();
      std::memcpy(CMSG_DATA(cm) + i * sizeof(int), &v, sizeof v);
    }
  }
  std::size_t left = kHeaderSize + m.payload.size();
  while (left > 0) {
    const bool first = left == kHeaderSize + m.payload.size();
    const ssize_t n = ::sendmsg(fd, &msg, MSG_NOSIGNAL | (dont_wait && first ? MSG_DONTWAIT : 0));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      return unexpected(error(CodecErrc::io_error, c, m.request, m.flags, 0, 0, false, errno));
    }
    left -= static_cast<std::size_t>(n);
    if (left == 0) break;
    // A short write: the fds went with the first byte; send the rest without them.
    msg.msg_control = nullptr;
    msg.msg_controllen = 0;
    auto skip = static_cast<std::size_t>(n);
    while (skip > 0) {
      if (skip >= msg.msg_iov[0].iov_len) {
        skip -= msg.msg_iov[0].iov_len;
        ++msg.msg_iov;
        --msg.msg_iovlen;
      } else {
        msg.msg_iov[0].iov_base = static_cast<std::uint8_t*>(msg.msg_iov[0].iov_base) + skip;
        msg.msg_iov[0].iov_len -= skip;
        skip = 0;
      }
    }
  }
  return {};
}

}  // namespace

Result<void, CodecError> write_message(int fd, const Message& m, Channel c) {
  return send_message(fd, m, c, false);
}

Result<void, CodecError> try_write_message(int fd, const Message& m, Channel c) {
  return send_message(fd, m, c, true);
}

}  // namespace vhostkit::vhost_user
