// apps/common/listen_socket: the --fd socket of the daemons, and systemd's socket
// activation variables (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES).
#include "listen_socket.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <string>

#include <gtest/gtest.h>

namespace vhostkit::daemon {
namespace {

// A socket of the given domain and type; listening if listen is true (Unix sockets are
// bound to an abstract name first).
UniqueFd make_socket(int domain, int type, bool listen) {
  UniqueFd fd(::socket(domain, type | SOCK_CLOEXEC, 0));
  EXPECT_TRUE(fd.valid());
  if (domain == AF_UNIX && listen) {
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::string name =
        "vhostkit-listen-test-" + std::to_string(::getpid()) + "-" + std::to_string(fd.get());
    std::memcpy(a.sun_path + 1, name.data(), name.size());
    EXPECT_EQ(::bind(fd.get(), reinterpret_cast<sockaddr*>(&a),
                     static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size())),
              0);
  }
  if (listen) {
    EXPECT_EQ(::listen(fd.get(), 1), 0);
  }
  return fd;
}

void set_activation(const std::string& pid, const std::string& fds) {
  ::setenv("LISTEN_PID", pid.c_str(), 1);
  ::setenv("LISTEN_FDS", fds.c_str(), 1);
  ::setenv("LISTEN_FDNAMES", "connection", 1);
}

bool activation_cleared() {
  return std::getenv("LISTEN_PID") == nullptr && std::getenv("LISTEN_FDS") == nullptr &&
         std::getenv("LISTEN_FDNAMES") == nullptr;
}

std::string self() {
  return std::to_string(::getpid());
}

TEST(ListenSocket, TakesAListeningUnixSocketAndMarksItCloseOnExec) {
  UniqueFd s = make_socket(AF_UNIX, SOCK_STREAM, true);
  ASSERT_EQ(::fcntl(s.get(), F_SETFD, 0), 0);
  int fd = s.release();
  auto r = adopt_listen_fd(fd);
  ASSERT_TRUE(r) << r.error();
  EXPECT_EQ(r->get(), fd);
  EXPECT_EQ(::fcntl(fd, F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
}

TEST(ListenSocket, SocketActivationForThisProcessIsAcceptedAndCleared) {
  UniqueFd s = make_socket(AF_UNIX, SOCK_STREAM, true);
  int fd = s.release();
  set_activation(self(), "1");
  auto r = adopt_listen_fd(fd, /*first_activated_fd=*/fd);
  ASSERT_TRUE(r) << r.error();
  EXPECT_TRUE(activation_cleared());
}

TEST(ListenSocket, SocketActivationWithTwoSocketsIsRefused) {
  UniqueFd s = make_socket(AF_UNIX, SOCK_STREAM, true);
  set_activation(self(), "2");
  auto r = adopt_listen_fd(s.get(), s.get());
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().find("passed 2 sockets"), std::string::npos) << r.error();
  EXPECT_TRUE(activation_cleared());
}

TEST(ListenSocket, SocketActivationWithAnotherFdThanThePassedOneIsRefused) {
  UniqueFd s = make_socket(AF_UNIX, SOCK_STREAM, true);
  set_activation(self(), "1");
  auto r = adopt_listen_fd(s.get(), s.get() + 1);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().find("use --fd " + std::to_string(s.get() + 1)), std::string::npos)
      << r.error();
  EXPECT_TRUE(activation_cleared());
}

TEST(ListenSocket, ZeroOrMalformedSocketCountIsRefused) {
  UniqueFd s = make_socket(AF_UNIX, SOCK_STREAM, true);
  for (const char* n : {"0", "-1", "one", ""}) {
    set_activation(self(), n);
    auto r = adopt_listen_fd(s.get(), s.get());
    ASSERT_FALSE(r) << n;
    EXPECT_NE(r.error().find("LISTEN_FDS"), std::string::npos) << r.error();
    EXPECT_TRUE(activation_cleared());
  }
}

TEST(ListenSocket, VariablesForAnotherProcessAreIgnoredAndCleared) {
  UniqueFd s = make_socket(AF_UNIX, SOCK_STREAM, true);
  int fd = s.release();
  set_activation(std::to_string(::getpid() + 1), "2");
  auto r = adopt_listen_fd(fd, fd + 7);
  ASSERT_TRUE(r) << r.error();
  EXPECT_TRUE(activation_cleared());
}

TEST(ListenSocket, MalformedPidIsRefused) {
  UniqueFd s = make_socket(AF_UNIX, SOCK_STREAM, true);
  set_activation("12abc", "1");
  auto r = adopt_listen_fd(s.get(), s.get());
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().find("LISTEN_PID"), std::string::npos) << r.error();
  EXPECT_TRUE(activation_cleared());
}

TEST(ListenSocket, AnythingButAListeningUnixStreamSocketIsRefusedWithWhatItIs) {
  UniqueFd file(::open("/proc/self/stat", O_RDONLY | O_CLOEXEC));
  auto r = adopt_listen_fd(file.get());
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().find("a regular file"), std::string::npos) << r.error();

  UniqueFd dgram = make_socket(AF_UNIX, SOCK_DGRAM, false);
  r = adopt_listen_fd(dgram.get());
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().find("SOCK_STREAM"), std::string::npos) << r.error();

  UniqueFd tcp = make_socket(AF_INET, SOCK_STREAM, false);
  r = adopt_listen_fd(tcp.get());
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().find("AF_UNIX"), std::string::npos) << r.error();

  UniqueFd idle = make_socket(AF_UNIX, SOCK_STREAM, false);
  r = adopt_listen_fd(idle.get());
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().find("not listening"), std::string::npos) << r.error();

  int pipefd[2];
  ASSERT_EQ(::pipe2(pipefd, O_CLOEXEC), 0);
  UniqueFd rd(pipefd[0]), wr(pipefd[1]);
  r = adopt_listen_fd(rd.get());
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().find("a pipe"), std::string::npos) << r.error();

  int closed = ::dup(rd.get());
  ::close(closed);
  r = adopt_listen_fd(closed);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().find("not an open file descriptor"), std::string::npos) << r.error();
  r = adopt_listen_fd(-1);
  ASSERT_FALSE(r);
}

}  // namespace
}  // namespace vhostkit::daemon
