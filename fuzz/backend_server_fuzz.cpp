// Fuzz target: arbitrary vhost-user message streams, with real fds attached (memfds,
// eventfds), fed to the back-end server state machine over a real socket. Checks, beyond
// the sanitizers: the server never crashes or hangs, and after the connection ends every
// fd it received or opened is closed again.
#include <dirent.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "fuzz_input.h"
#include "support/echo_device.h"
#include "vhostkit/log.h"
#include "vhostkit/vhost_user/backend_server.h"
#include "vhostkit/vhost_user/message.h"
#include "vhostkit/vhost_user/socket.h"

namespace {

using namespace vhostkit;
using namespace vhostkit::vhost_user;

using fuzzing::Input;

std::size_t fd_count() {
  std::size_t c = 0;
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (::readdir(d) != nullptr) ++c;
    ::closedir(d);
  }
  return c;
}

UniqueFd some_fd(std::uint8_t kind) {
  switch (kind % 3) {
    case 0: {
      int fd = ::memfd_create("fuzz-mem", MFD_CLOEXEC);
      if (fd >= 0 && ::ftruncate(fd, 0x40000) != 0) std::abort();
      return UniqueFd(fd);
    }
    case 1: return UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    default: return UniqueFd(::dup(STDIN_FILENO));
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // The server logs every refused message: keep the fuzzer's output readable.
  set_log_sink([](LogLevel, std::string_view) {}, LogLevel::error);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::size_t fds_before = fd_count();
  {
    Input in{data, size};
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) std::abort();
    UniqueFd ours(sv[0]);
    vhostkit::testing::EchoDevice device(2);
    BackendOptions opt;
    opt.runner.miss_retry = std::chrono::milliseconds(1);
    // A device state transfer on an eventfd never ends: CHECK_DEVICE_STATE gives it up.
    opt.state_transfer_grace = std::chrono::milliseconds(5);
    BackendServer server(device, opt);
    // Write every message first, then let the server read them all and hit EOF.
    int messages = 0;
    while (!in.empty() && messages < 64) {
      ++messages;
      auto mode = in.take<std::uint8_t>();
      Message m;
      // Mostly known requests with their flags; sometimes anything at all.
      m.request = (mode & 0x80) ? in.take<std::uint32_t>() : 1u + in.take<std::uint8_t>() % 44u;
      m.flags =
          (mode & 0x40) ? in.take<std::uint32_t>() : kVersion | ((mode & 1) ? kFlagNeedReply : 0);
      std::size_t len = in.take<std::uint8_t>();
      if (mode & 0x20) len = std::min<std::size_t>(len * 4, 300);
      len = std::min(len, in.n);
      m.payload.assign(in.p, in.p + len);
      in.p += len;
      in.n -= len;
      std::size_t nfds = (mode >> 2) & 7;
      for (std::size_t i = 0; i < nfds; ++i) m.fds.push_back(some_fd(in.take<std::uint8_t>()));
      if (!write_message(ours.get(), m)) break;
    }
    ::shutdown(ours.get(), SHUT_WR);
    server.serve(UniqueFd(sv[1]));
  }
  if (fd_count() != fds_before) std::abort();  // a received or opened fd leaked
  return 0;
}
