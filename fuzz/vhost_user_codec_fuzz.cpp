// Fuzz target: arbitrary bytes as a vhost-user message stream on a real Unix socket,
// with real fds (memfds, eventfds, pipe ends) attached by SCM_RIGHTS to chunks the input
// chooses, read back with read_message() and run through every validator and decoder.
// Beyond the sanitizers it checks: reading never hangs or crashes, a message is either
// returned whole or refused, and once the input is done no fd the codec received is
// still open (the process's fd count is what it was before the input).
//
// Input layout (every byte string is valid; missing bytes read as zero):
//   byte 0       bits 0-3: number of fds to attach (0..15, so the 8-fd limit is crossed)
//                bits 4-5: which chunk carries them (0 = the first, as a peer should)
//                bit 6:    read as the back-end channel instead of the vhost-user socket
//   byte 1       number of chunks the stream is written in (1..8)
//   bytes 2-9    negotiated protocol features (u64, little-endian)
//   byte 10      bit 0: VIRTIO_F_ACCESS_PLATFORM negotiated
//   then one byte per fd choosing its kind, then the stream itself.
#include <dirent.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "vhostkit/vhost_user/message.h"
#include "vhostkit/vhost_user/socket.h"

namespace {

using namespace vhostkit;
using namespace vhostkit::vhost_user;

constexpr std::size_t kMaxStream = 64 * 1024;  // below the socket buffer: the writer never blocks

struct Reader {
  const std::uint8_t* p;
  std::size_t n;
  template <typename T>
  T take() {
    T v{};
    const std::size_t k = std::min(sizeof(T), n);
    std::memcpy(&v, p, k);
    p += k;
    n -= k;
    return v;
  }
};

std::size_t fd_count() {
  std::size_t c = 0;
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (::readdir(d) != nullptr) ++c;
    ::closedir(d);
  }
  return c;
}

UniqueFd some_fd(std::uint8_t kind) {
  switch (kind % 4) {
    case 0: {
      const int fd = ::memfd_create("codec-fuzz", MFD_CLOEXEC);
      if (fd >= 0 && ::ftruncate(fd, 4096) != 0) std::abort();
      return UniqueFd(fd);
    }
    case 1: return UniqueFd(::eventfd(0, EFD_CLOEXEC));
    case 2: {
      int p[2];
      if (::pipe2(p, O_CLOEXEC) != 0) std::abort();
      ::close(p[0]);
      return UniqueFd(p[1]);
    }
    default: return UniqueFd(::dup(STDERR_FILENO));
  }
}

void send_chunk(int sock, const std::uint8_t* data, std::size_t len,
                const std::vector<UniqueFd>& fds) {
  iovec iov{const_cast<std::uint8_t*>(data), len};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<unsigned char> control(CMSG_SPACE(sizeof(int) * fds.size()));
  if (!fds.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    if (c == nullptr) std::abort();
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    for (std::size_t i = 0; i < fds.size(); ++i) {
      const int v = fds[i].get();
      std::memcpy(CMSG_DATA(c) + i * sizeof(int), &v, sizeof v);
    }
  }
  if (::sendmsg(sock, &msg, MSG_NOSIGNAL) != static_cast<ssize_t>(len)) std::abort();
}

// Everything a receiver would do with one message; none of it may crash.
void exercise(Message m, Channel channel, const Negotiated& n) {
  if (channel == Channel::backend) {
    if (validate_backend_request(m, n)) {
      if (m.backend_request() == BackendRequest::iotlb_msg) (void)decode_iotlb(m, channel, n);
      Message request = make_backend_request(m.backend_request(), m.flags);
      if (expects_backend_reply(request)) (void)validate_backend_reply(m, request);
    }
    return;
  }
  // The same bytes as a reply to a request of that number, and as a request.
  Message request = make_request(m.frontend_request(), kVersion | kFlagNeedReply);
  if (m.frontend_request() == FrontendRequest::get_config) request.payload = m.payload;
  (void)validate_reply(m, request, n);
  (void)decode_config(m);
  auto v = validate_frontend_request(m, n);
  if (!v) {
    (void)v.error().message();
    return;
  }
  switch (m.frontend_request()) {
    case FrontendRequest::set_mem_table: {
      auto t = decode_mem_table(std::move(m), n);
      if (!t) std::abort();  // validated, so it must decode
      for (const auto& r : *t) {
        (void)r.region.user_address(n);
        if (!r.fd.valid()) std::abort();
      }
      break;
    }
    case FrontendRequest::add_mem_reg:
    case FrontendRequest::rem_mem_reg: {
      if (!decode_mem_reg(std::move(m), n)) std::abort();
      break;
    }
    case FrontendRequest::set_log_base: {
      if (!decode_log_base(std::move(m), n)) std::abort();
      break;
    }
    case FrontendRequest::set_vring_kick:
    case FrontendRequest::set_vring_call:
    case FrontendRequest::set_vring_err: {
      if (!decode_vring_file(std::move(m), n)) std::abort();
      break;
    }
    case FrontendRequest::set_vring_addr: {
      auto a = decode_payload<VringAddr>(m);
      if (!a) std::abort();
      (void)a->desc_address(n);
      break;
    }
    case FrontendRequest::iotlb_msg: (void)decode_iotlb(m, channel, n); break;
    default: break;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::size_t fds_before = fd_count();
  {
    Reader in{data, size};
    const auto mode = in.take<std::uint8_t>();
    const std::size_t nfds = mode & 0x0f;
    const std::size_t fd_chunk = (mode >> 4) & 0x03;
    const Channel channel = (mode & 0x40) != 0 ? Channel::backend : Channel::main;
    const std::size_t chunks = 1 + in.take<std::uint8_t>() % 8;
    Negotiated n;
    n.protocol_features = in.take<std::uint64_t>();
    if (in.take<std::uint8_t>() & 1) n.features |= 1ULL << 33;
    std::vector<UniqueFd> fds;
    for (std::size_t i = 0; i < nfds; ++i) fds.push_back(some_fd(in.take<std::uint8_t>()));
    const std::size_t len = std::min(in.n, kMaxStream);

    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) std::abort();
    UniqueFd writer(sv[0]), reader(sv[1]);
    // The stream in `chunks` roughly equal pieces; the fds ride on one of them.
    const std::size_t piece = std::max<std::size_t>(1, len / chunks);
    std::size_t off = 0;
    for (std::size_t c = 0; off < len; ++c) {
      const std::size_t k = c + 1 == chunks ? len - off : std::min(piece, len - off);
      static const std::vector<UniqueFd> kNone;
      send_chunk(writer.get(), in.p + off, k, c == fd_chunk ? fds : kNone);
      off += k;
    }
    if (len == 0 && !fds.empty()) {
      const std::uint8_t zero = 0;  // fds need at least one byte to travel
      send_chunk(writer.get(), &zero, 1, fds);
    }
    fds.clear();  // our copies; the ones in flight are the reader's business now
    ::shutdown(writer.get(), SHUT_WR);

    for (int messages = 0; messages < 1024; ++messages) {
      auto m = read_message(reader.get(), channel);
      if (!m) {
        (void)m.error().message();
        if (!m.error().recoverable()) break;
        continue;
      }
      if (m->payload.size() > kMaxPayload || m->fds.size() > kMaxFds) std::abort();
      exercise(std::move(*m), channel, n);
    }
  }
  if (fd_count() != fds_before) std::abort();  // a received fd leaked
  return 0;
}
