// vhost-user wire format: validation and socket I/O with SCM_RIGHTS.
#include "vhostkit/vhost_user/wire.h"

#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

#include <fmt/format.h>

namespace vhostkit::vhost_user {

namespace {
constexpr std::size_t kMaxPayload = 4096;  // far above any legal payload (268 bytes)
}

const char* to_string(Request r) {
  switch (r) {
    case Request::none: return "NONE";
    case Request::get_features: return "GET_FEATURES";
    case Request::set_features: return "SET_FEATURES";
    case Request::set_owner: return "SET_OWNER";
    case Request::reset_owner: return "RESET_OWNER";
    case Request::set_mem_table: return "SET_MEM_TABLE";
    case Request::set_log_base: return "SET_LOG_BASE";
    case Request::set_log_fd: return "SET_LOG_FD";
    case Request::set_vring_num: return "SET_VRING_NUM";
    case Request::set_vring_addr: return "SET_VRING_ADDR";
    case Request::set_vring_base: return "SET_VRING_BASE";
    case Request::get_vring_base: return "GET_VRING_BASE";
    case Request::set_vring_kick: return "SET_VRING_KICK";
    case Request::set_vring_call: return "SET_VRING_CALL";
    case Request::set_vring_err: return "SET_VRING_ERR";
    case Request::get_protocol_features: return "GET_PROTOCOL_FEATURES";
    case Request::set_protocol_features: return "SET_PROTOCOL_FEATURES";
    case Request::get_queue_num: return "GET_QUEUE_NUM";
    case Request::set_vring_enable: return "SET_VRING_ENABLE";
    case Request::send_rarp: return "SEND_RARP";
    case Request::net_set_mtu: return "NET_SET_MTU";
    case Request::set_backend_req_fd: return "SET_BACKEND_REQ_FD";
    case Request::iotlb_msg: return "IOTLB_MSG";
    case Request::set_vring_endian: return "SET_VRING_ENDIAN";
    case Request::get_config: return "GET_CONFIG";
    case Request::set_config: return "SET_CONFIG";
    case Request::create_crypto_session: return "CREATE_CRYPTO_SESSION";
    case Request::close_crypto_session: return "CLOSE_CRYPTO_SESSION";
    case Request::postcopy_advise: return "POSTCOPY_ADVISE";
    case Request::postcopy_listen: return "POSTCOPY_LISTEN";
    case Request::postcopy_end: return "POSTCOPY_END";
    case Request::get_inflight_fd: return "GET_INFLIGHT_FD";
    case Request::set_inflight_fd: return "SET_INFLIGHT_FD";
    case Request::gpu_set_socket: return "GPU_SET_SOCKET";
    case Request::reset_device: return "RESET_DEVICE";
    case Request::vring_kick: return "VRING_KICK";
    case Request::get_max_mem_slots: return "GET_MAX_MEM_SLOTS";
    case Request::add_mem_reg: return "ADD_MEM_REG";
    case Request::rem_mem_reg: return "REM_MEM_REG";
    case Request::set_status: return "SET_STATUS";
    case Request::get_status: return "GET_STATUS";
  }
  return "UNKNOWN";
}

const char* to_string(CodecErrc e) {
  switch (e) {
    case CodecErrc::closed: return "connection closed";
    case CodecErrc::io_error: return "socket I/O error";
    case CodecErrc::truncated: return "connection closed in the middle of a message";
    case CodecErrc::bad_version: return "bad protocol version";
    case CodecErrc::unexpected_flags: return "unexpected header flags";
    case CodecErrc::unknown_request: return "unknown or unsupported request";
    case CodecErrc::bad_size: return "wrong payload size for the request";
    case CodecErrc::too_large: return "payload too large";
    case CodecErrc::bad_fd_count: return "wrong number of file descriptors for the request";
    case CodecErrc::too_many_fds: return "too many file descriptors";
  }
  return "unknown codec error";
}

std::string CodecError::message() const {
  std::string m = fmt::format("{} ({} [{}], value {})", to_string(code),
                              to_string(static_cast<Request>(request)), request, value);
  if (sys_errno != 0) m += fmt::format(": {}", std::strerror(sys_errno));
  return m;
}

namespace {

CodecError err(CodecErrc c, const Message& m, std::uint64_t v = 0) {
  return CodecError{c, m.request, v, 0};
}

// Exact size and fd count; the common case.
Result<void, CodecError> expect(const Message& m, std::size_t size, std::size_t fds) {
  if (m.payload.size() != size) return unexpected(err(CodecErrc::bad_size, m, m.payload.size()));
  if (m.fds.size() != fds) return unexpected(err(CodecErrc::bad_fd_count, m, m.fds.size()));
  return {};
}

}  // namespace

Result<void, CodecError> validate_request(const Message& m) {
  if ((m.flags & kVersionMask) != kVersion)
    return unexpected(err(CodecErrc::bad_version, m, m.flags & kVersionMask));
  if (m.flags & kFlagReply) return unexpected(err(CodecErrc::unexpected_flags, m, m.flags));
  if (m.payload.size() > kMaxPayload)
    return unexpected(err(CodecErrc::too_large, m, m.payload.size()));
  switch (m.req()) {
    case Request::get_features:
    case Request::set_owner:
    case Request::reset_owner:
    case Request::get_protocol_features:
    case Request::get_queue_num:
    case Request::reset_device:
    case Request::get_max_mem_slots:
    case Request::get_status: return expect(m, 0, 0);
    case Request::set_features:
    case Request::set_protocol_features:
    case Request::set_status:
    case Request::send_rarp:
    case Request::net_set_mtu: return expect(m, 8, 0);
    case Request::set_mem_table: {
      if (m.payload.size() < sizeof(MemTableHeader))
        return unexpected(err(CodecErrc::bad_size, m, m.payload.size()));
      auto h = m.as<MemTableHeader>();
      if (h.nregions == 0 || h.nregions > kMaxFds)
        return unexpected(err(CodecErrc::bad_size, m, h.nregions));
      std::size_t exact = sizeof(MemTableHeader) + h.nregions * sizeof(MemRegion);
      std::size_t padded = sizeof(MemTableHeader) + kMaxFds * sizeof(MemRegion);
      if (m.payload.size() != exact && m.payload.size() != padded)
        return unexpected(err(CodecErrc::bad_size, m, m.payload.size()));
      if (m.fds.size() != h.nregions)
        return unexpected(err(CodecErrc::bad_fd_count, m, m.fds.size()));
      return {};
    }
    case Request::set_log_base: return expect(m, sizeof(LogDesc), 1);
    case Request::set_log_fd:
    case Request::set_backend_req_fd: return expect(m, 0, 1);
    case Request::set_vring_num:
    case Request::set_vring_base:
    case Request::get_vring_base:
    case Request::set_vring_enable:
    case Request::set_vring_endian:
    case Request::vring_kick: return expect(m, sizeof(VringState), 0);
    case Request::set_vring_addr: return expect(m, sizeof(VringAddr), 0);
    case Request::set_vring_kick:
    case Request::set_vring_call:
    case Request::set_vring_err: {
      if (m.payload.size() != 8) return unexpected(err(CodecErrc::bad_size, m, m.payload.size()));
      bool nofd = (m.u64() & kVringNoFd) != 0;
      return expect(m, 8, nofd ? 0 : 1);
    }
    case Request::iotlb_msg: return expect(m, sizeof(IotlbMsg), 0);
    case Request::get_config:
    case Request::set_config: {
      if (m.payload.size() < sizeof(ConfigHeader))
        return unexpected(err(CodecErrc::bad_size, m, m.payload.size()));
      auto h = m.as<ConfigHeader>();
      if (h.size > kMaxConfigSize) return unexpected(err(CodecErrc::bad_size, m, h.size));
      return expect(m, sizeof(ConfigHeader) + h.size, 0);
    }
    case Request::add_mem_reg: return expect(m, sizeof(SingleMemRegion), 1);
    case Request::rem_mem_reg:
      // No fd is needed; some front-ends send the region's fd anyway (it is closed).
      if (m.payload.size() != sizeof(SingleMemRegion))
        return unexpected(err(CodecErrc::bad_size, m, m.payload.size()));
      if (m.fds.size() > 1) return unexpected(err(CodecErrc::bad_fd_count, m, m.fds.size()));
      return {};
    default:
      // Crypto, postcopy, inflight and GPU requests are not supported by vhostkit and
      // never offered; anything else is not in the specification.
      return unexpected(err(CodecErrc::unknown_request, m, m.request));
  }
}

Result<void, CodecError> validate_reply(const Message& m, Request to) {
  if ((m.flags & kVersionMask) != kVersion)
    return unexpected(err(CodecErrc::bad_version, m, m.flags & kVersionMask));
  if (!(m.flags & kFlagReply)) return unexpected(err(CodecErrc::unexpected_flags, m, m.flags));
  if (m.request != static_cast<std::uint32_t>(to))
    return unexpected(err(CodecErrc::unknown_request, m, m.request));
  if (!m.fds.empty()) return unexpected(err(CodecErrc::bad_fd_count, m, m.fds.size()));
  return {};
}

Result<Message, CodecError> read_message(int fd) {
  Message m;
  std::uint8_t header[kHeaderSize];
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * (kMaxFds + 1))];
  iovec iov{header, kHeaderSize};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n;
  do {
    n = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return unexpected(CodecError{CodecErrc::io_error, 0, 0, errno});
  if (n == 0) return unexpected(CodecError{CodecErrc::closed});
  // Take ownership of every fd that arrived before looking at anything else.
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < count; ++i) {
      int received;
      std::memcpy(&received, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      m.fds.emplace_back(received);
    }
  }
  if ((msg.msg_flags & MSG_CTRUNC) || m.fds.size() > kMaxFds)
    return unexpected(CodecError{CodecErrc::too_many_fds, 0, m.fds.size(), 0});
  std::size_t got = static_cast<std::size_t>(n);
  while (got < kHeaderSize) {
    n = ::recv(fd, header + got, kHeaderSize - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return unexpected(CodecError{CodecErrc::io_error, 0, 0, errno});
    if (n == 0) return unexpected(CodecError{CodecErrc::truncated});
    got += static_cast<std::size_t>(n);
  }
  std::uint32_t size;
  std::memcpy(&m.request, header, 4);
  std::memcpy(&m.flags, header + 4, 4);
  std::memcpy(&size, header + 8, 4);
  if (size > kMaxPayload) return unexpected(CodecError{CodecErrc::too_large, m.request, size, 0});
  m.payload.resize(size);
  got = 0;
  while (got < size) {
    n = ::recv(fd, m.payload.data() + got, size - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return unexpected(CodecError{CodecErrc::io_error, m.request, 0, errno});
    if (n == 0) return unexpected(CodecError{CodecErrc::truncated, m.request, got, 0});
    got += static_cast<std::size_t>(n);
  }
  return m;
}

namespace {
Result<void, CodecError> send_whole(int fd, const Message& m, bool dont_wait);
}  // namespace

Result<void, CodecError> write_message(int fd, const Message& m) {
  return send_whole(fd, m, false);
}

Result<void, CodecError> try_write_message(int fd, const Message& m) {
  return send_whole(fd, m, true);
}

namespace {
Result<void, CodecError> send_whole(int fd, const Message& m, bool dont_wait) {
  if (m.fds.size() > kMaxFds)
    return unexpected(CodecError{CodecErrc::too_many_fds, m.request, m.fds.size(), 0});
  std::uint8_t header[kHeaderSize];
  auto size = static_cast<std::uint32_t>(m.payload.size());
  std::memcpy(header, &m.request, 4);
  std::memcpy(header + 4, &m.flags, 4);
  std::memcpy(header + 8, &size, 4);
  iovec iov[2] = {{header, kHeaderSize},
                  {const_cast<std::uint8_t*>(m.payload.data()), m.payload.size()}};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = m.payload.empty() ? 1 : 2;
  if (!m.fds.empty()) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * m.fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * m.fds.size());
    for (std::size_t i = 0; i < m.fds.size(); ++i) {
      int v = m.fds[i].get();
      std::memcpy(CMSG_DATA(c) + i * sizeof(int), &v, sizeof(int));
    }
  }
  std::size_t total = kHeaderSize + m.payload.size();
  std::size_t sent = 0;
  while (sent < total) {
    int flags = MSG_NOSIGNAL | (dont_wait && sent == 0 ? MSG_DONTWAIT : 0);
    ssize_t n = ::sendmsg(fd, &msg, flags);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return unexpected(CodecError{CodecErrc::io_error, m.request, 0, errno});
    sent += static_cast<std::size_t>(n);
    if (sent == total) break;
    // A short write: continue with the rest, without the fds (already sent).
    msg.msg_control = nullptr;
    msg.msg_controllen = 0;
    std::size_t skip = static_cast<std::size_t>(n);
    while (skip > 0 && msg.msg_iovlen > 0) {
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

}  // namespace vhostkit::vhost_user
