// vhost-user messages on real Unix stream sockets: framing across split reads, EOF at
// and inside messages, oversized headers refused before allocation, fd passing limits
// (more than 8 fds, fds sent with payload bytes), EINTR and short writes under a signal
// storm, SIGPIPE-free writes to a closed peer; and no fd leaks on any of these paths.
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "support/memfd.h"
#include "vhostkit/vhost_user/socket.h"

namespace vhostkit::vhost_user {
namespace {

using namespace std::chrono_literals;
using R = FrontendRequest;
using vhostkit::testing::make_memfd;
using vhostkit::testing::open_fd_count;

struct Pair {
  UniqueFd a, b;
  Pair() {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    a.reset(sv[0]);
    b.reset(sv[1]);
  }
};

UniqueFd eventfd() {
  return UniqueFd(::eventfd(0, EFD_CLOEXEC));
}

ino_t inode_of(int fd) {
  struct stat st {};
  EXPECT_EQ(::fstat(fd, &st), 0);
  return st.st_ino;
}

// Sends raw bytes with the given fds attached (SCM_RIGHTS), bypassing the codec, so a
// test can build what a hostile or broken peer would send.
void send_raw(int sock, const std::uint8_t* data, std::size_t len,
              const std::vector<int>& fds = {}) {
  iovec iov{const_cast<std::uint8_t*>(data), len};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<unsigned char> control(CMSG_SPACE(sizeof(int) * fds.size()) + sizeof(cmsghdr));
  if (!fds.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    ASSERT_NE(c, nullptr);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  ASSERT_EQ(::sendmsg(sock, &msg, MSG_NOSIGNAL), static_cast<ssize_t>(len));
}

std::vector<std::uint8_t> header_bytes(std::uint32_t request, std::uint32_t flags,
                                       std::uint32_t size) {
  std::vector<std::uint8_t> h(kHeaderSize);
  std::memcpy(h.data(), &request, 4);
  std::memcpy(h.data() + 4, &flags, 4);
  std::memcpy(h.data() + 8, &size, 4);
  return h;
}

Message kick(std::uint32_t index) {
  return make_vring_file(R::set_vring_kick, index, eventfd());
}

TEST(Socket, MessagesArriveWholeWithTheirFds) {
  Pair p;
  UniqueFd mem = make_memfd(0x2000);
  const ino_t ino = inode_of(mem.get());
  ASSERT_TRUE(write_message(p.a.get(), make_log_base(LogDesc{0x2000, 0x40}, std::move(mem))));
  ASSERT_TRUE(write_message(p.a.get(), make_request(R::get_features)));
  auto first = read_message(p.b.get());
  ASSERT_TRUE(first.has_value()) << first.error().message();
  ASSERT_EQ(first->fds.size(), 1u);
  EXPECT_EQ(inode_of(first->fds[0].get()), ino);
  EXPECT_EQ(fcntl(first->fds[0].get(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
  auto log = decode_log_base(std::move(*first), {});
  ASSERT_TRUE(log.has_value());
  EXPECT_EQ(log->log.size, 0x2000u);
  EXPECT_EQ(log->log.offset, 0x40u);
  auto second = read_message(p.b.get());
  ASSERT_TRUE(second.has_value());
  EXPECT_EQ(second->frontend_request(), R::get_features);
  EXPECT_TRUE(second->payload.empty());
  EXPECT_TRUE(second->fds.empty());
}

TEST(Socket, HeaderAndPayloadMayArriveInPieces) {
  Pair p;
  const Message m = make_request(R::set_vring_addr,
                                 VringAddr{2, kVringFlagLog, 0x1000, 0x2000, 0x3000, Gpa(0x2000)});
  const auto bytes = encode(m);
  UniqueFd fd = eventfd();
  std::thread writer([&] {
    // The fd rides on the first byte of the header, as the specification asks.
    send_raw(p.a.get(), bytes.data(), 1, {fd.get()});
    for (std::size_t i = 1; i < bytes.size(); i += 5) {
      std::this_thread::sleep_for(1ms);
      send_raw(p.a.get(), bytes.data() + i, std::min<std::size_t>(5, bytes.size() - i));
    }
  });
  auto got = read_message(p.b.get());
  writer.join();
  ASSERT_TRUE(got.has_value()) << got.error().message();
  EXPECT_EQ(got->payload, m.payload);
  EXPECT_EQ(got->fds.size(), 1u);
}

TEST(Socket, EndOfStream) {
  {
    Pair p;
    p.a.reset();
    auto r = read_message(p.b.get());
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code, CodecErrc::closed);
    EXPECT_FALSE(r.error().recoverable());
  }
  {
    Pair p;  // EOF inside the header
    const auto h = header_bytes(8, kVersion, 8);
    send_raw(p.a.get(), h.data(), 5);
    p.a.reset();
    auto r = read_message(p.b.get());
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code, CodecErrc::truncated);
  }
  {
    Pair p;  // EOF inside the payload
    auto bytes = encode(make_request(R::set_vring_addr, VringAddr{}));
    send_raw(p.a.get(), bytes.data(), kHeaderSize + 17);
    p.a.reset();
    auto r = read_message(p.b.get());
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code, CodecErrc::truncated);
    EXPECT_EQ(r.error().request, static_cast<std::uint32_t>(R::set_vring_addr));
    EXPECT_EQ(r.error().actual, kHeaderSize + 17);
    EXPECT_EQ(r.error().expected, kHeaderSize + sizeof(VringAddr));
  }
  {
    Pair p;  // EOF inside a message whose fds already arrived: they are closed
    const std::size_t before = open_fd_count();
    auto bytes = encode(make_request(R::set_mem_table, MemTableHeader{2, 0}));
    UniqueFd m1 = make_memfd(4096), m2 = make_memfd(4096);
    send_raw(p.a.get(), bytes.data(), 7, {m1.get(), m2.get()});
    p.a.reset();
    m1.reset();
    m2.reset();
    auto r = read_message(p.b.get());
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code, CodecErrc::truncated);
    EXPECT_EQ(open_fd_count(), before - 1);  // only the socket `a` went away
  }
}

TEST(Socket, OversizedPayloadIsRefusedBeforeAllocation) {
  for (std::uint32_t size : {std::uint32_t{kMaxPayload + 1}, 0x10000000u, 0xffffffffu}) {
    Pair p;
    const auto h = header_bytes(5, kVersion, size);
    send_raw(p.a.get(), h.data(), h.size());
    // Nothing follows the header: a reader that trusted `size` would block here.
    auto r = read_message(p.b.get());
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code, CodecErrc::too_large);
    EXPECT_EQ(r.error().actual, size);
    EXPECT_FALSE(r.error().recoverable());
  }
  // The largest legal payload passes.
  Pair p;
  Message big = make_request(R::set_config);
  big.payload.assign(kMaxPayload, 0xab);
  ASSERT_TRUE(write_message(p.a.get(), big));
  auto r = read_message(p.b.get());
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->payload.size(), kMaxPayload);
}

TEST(Socket, MoreThanEightFdsAreRefusedAndClosed) {
  Pair p;
  const std::size_t before = open_fd_count();
  {
    std::vector<UniqueFd> owned;
    std::vector<int> raw;
    for (int i = 0; i < 12; ++i) {
      owned.push_back(eventfd());
      raw.push_back(owned.back().get());
    }
    const auto bytes = encode(make_request(R::set_vring_num, VringState{0, 64}));
    send_raw(p.a.get(), bytes.data(), bytes.size(), raw);
  }
  ASSERT_TRUE(write_message(p.a.get(), kick(3)));  // the stream goes on afterwards
  auto r = read_message(p.b.get());
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, CodecErrc::too_many_fds);
  EXPECT_EQ(r.error().request, static_cast<std::uint32_t>(R::set_vring_num));
  EXPECT_TRUE(r.error().recoverable());
  auto next = read_message(p.b.get());
  ASSERT_TRUE(next.has_value()) << next.error().message();
  EXPECT_TRUE(validate_frontend_request(*next, {}).has_value());
  next = unexpected(CodecError{CodecErrc::closed});  // drop it and its fd
  EXPECT_EQ(open_fd_count(), before);

  // Exactly eight is fine.
  std::vector<UniqueFd> eight;
  for (int i = 0; i < 8; ++i) eight.push_back(make_memfd(4096));
  std::vector<MemRegion> regions(8, MemRegion{Gpa(0), 4096, 0, 0});
  for (std::size_t i = 0; i < 8; ++i) regions[i].guest_addr = Gpa(i * 4096);
  auto table = make_mem_table(regions, std::move(eight));
  ASSERT_TRUE(table.has_value());
  ASSERT_TRUE(write_message(p.a.get(), *table));
  auto got = read_message(p.b.get());
  ASSERT_TRUE(got.has_value()) << got.error().message();
  EXPECT_EQ(got->fds.size(), 8u);
  EXPECT_TRUE(validate_frontend_request(*got, {}).has_value());
}

TEST(Socket, FdsSentWithThePayloadAreRefusedAndClosed) {
  Pair p;
  const std::size_t before = open_fd_count();
  {
    const auto bytes = encode(make_request(R::set_vring_call, std::uint64_t{1}));
    UniqueFd stray = eventfd();
    send_raw(p.a.get(), bytes.data(), kHeaderSize);
    send_raw(p.a.get(), bytes.data() + kHeaderSize, bytes.size() - kHeaderSize, {stray.get()});
  }
  ASSERT_TRUE(write_message(p.a.get(), make_request(R::get_status)));
  auto r = read_message(p.b.get());
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, CodecErrc::misplaced_fds);
  EXPECT_TRUE(r.error().recoverable());
  auto next = read_message(p.b.get());
  ASSERT_TRUE(next.has_value());
  EXPECT_EQ(next->frontend_request(), R::get_status);
  EXPECT_EQ(open_fd_count(), before);
}

TEST(Socket, WritesRefuseWhatNoReaderMayAccept) {
  Pair p;
  Message nine = make_request(R::get_features);
  for (int i = 0; i < 9; ++i) nine.fds.push_back(eventfd());
  EXPECT_EQ(write_message(p.a.get(), nine).error().code, CodecErrc::too_many_fds);
  Message huge = make_request(R::set_config);
  huge.payload.assign(kMaxPayload + 1, 0);
  EXPECT_EQ(write_message(p.a.get(), huge).error().code, CodecErrc::too_large);
  Message invalid = make_request(R::set_log_fd);
  invalid.fds.emplace_back();
  auto w = write_message(p.a.get(), invalid);
  ASSERT_FALSE(w.has_value());
  EXPECT_EQ(w.error().code, CodecErrc::io_error);
  EXPECT_EQ(w.error().sys_errno, EBADF);
  // Nothing of these reached the socket.
  ASSERT_TRUE(write_message(p.a.get(), make_request(R::get_queue_num)));
  auto r = read_message(p.b.get());
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->frontend_request(), R::get_queue_num);
}

TEST(Socket, WritingToAClosedPeerIsAnErrorNotSigpipe) {
  Pair p;
  p.b.reset();
  auto w = write_message(p.a.get(), kick(0));
  ASSERT_FALSE(w.has_value());
  EXPECT_EQ(w.error().code, CodecErrc::io_error);
  EXPECT_EQ(w.error().sys_errno, EPIPE);
  EXPECT_FALSE(w.error().recoverable());
}

std::atomic<int> g_signals{0};
void count_signal(int) {
  g_signals.fetch_add(1, std::memory_order_relaxed);
}

// A handler without SA_RESTART, so blocked recvmsg/sendmsg calls return EINTR or a short
// count while it runs.
struct InterruptingSignal {
  struct sigaction old {};
  InterruptingSignal() {
    struct sigaction sa {};
    sa.sa_handler = count_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    EXPECT_EQ(::sigaction(SIGUSR1, &sa, &old), 0);
  }
  ~InterruptingSignal() { ::sigaction(SIGUSR1, &old, nullptr); }
};

TEST(Socket, EintrWhileBlockedInReadIsRetried) {
  InterruptingSignal handler;
  Pair p;
  g_signals = 0;
  Result<Message, CodecError> got = unexpected(CodecError{CodecErrc::closed});
  std::atomic<bool> started{false};
  std::thread reader([&] {
    started = true;
    got = read_message(p.b.get());
  });
  while (!started) std::this_thread::yield();
  for (int i = 0; i < 5; ++i) {
    std::this_thread::sleep_for(5ms);
    ::pthread_kill(reader.native_handle(), SIGUSR1);
  }
  std::this_thread::sleep_for(5ms);
  ASSERT_TRUE(write_message(p.a.get(), kick(9)));
  reader.join();
  EXPECT_GE(g_signals.load(), 1);
  ASSERT_TRUE(got.has_value()) << got.error().message();
  auto file = decode_vring_file(std::move(*got), {});
  ASSERT_TRUE(file.has_value());
  EXPECT_EQ(file->index, 9u);
  EXPECT_TRUE(file->fd.valid());
}

TEST(Socket, ShortWritesAndReadsUnderASignalStormKeepMessagesWhole) {
  InterruptingSignal handler;
  Pair p;
  const int small = 4096;
  ASSERT_EQ(::setsockopt(p.a.get(), SOL_SOCKET, SO_SNDBUF, &small, sizeof small), 0);
  ASSERT_EQ(::setsockopt(p.b.get(), SOL_SOCKET, SO_RCVBUF, &small, sizeof small), 0);
  constexpr int kMessages = 400;
  std::atomic<bool> done{false};
  std::atomic<int> write_failures{0};
  std::thread writer([&] {
    for (int i = 0; i < kMessages; ++i) {
      Message m = make_request(R::set_config);
      m.payload.assign(kMaxPayload - static_cast<std::size_t>(i % 7), static_cast<std::uint8_t>(i));
      if (i % 3 == 0) m.fds.push_back(eventfd());
      if (!write_message(p.a.get(), m)) write_failures.fetch_add(1);
    }
    done = true;
  });
  std::thread storm([&] {
    while (!done) {
      ::pthread_kill(writer.native_handle(), SIGUSR1);
      std::this_thread::sleep_for(50us);
    }
  });
  for (int i = 0; i < kMessages; ++i) {
    // A slow reader, so the writer blocks on a full socket and is interrupted there.
    if (i % 8 == 0) std::this_thread::sleep_for(200us);
    auto m = read_message(p.b.get());
    ASSERT_TRUE(m.has_value()) << i << ": " << m.error().message();
    ASSERT_EQ(m->payload.size(), kMaxPayload - static_cast<std::size_t>(i % 7)) << i;
    EXPECT_EQ(m->payload.front(), static_cast<std::uint8_t>(i));
    EXPECT_EQ(m->payload.back(), static_cast<std::uint8_t>(i));
    EXPECT_EQ(m->fds.size(), i % 3 == 0 ? 1u : 0u) << i;
  }
  writer.join();
  storm.join();
  EXPECT_EQ(write_failures.load(), 0);
}

TEST(Socket, FramingFailuresLeakNoFds) {
  const std::size_t before = open_fd_count();
  for (int round = 0; round < 20; ++round) {
    std::vector<UniqueFd> owned;
    std::vector<int> raw;
    for (int i = 0; i < 10; ++i) {
      owned.push_back(i % 2 ? make_memfd(4096) : eventfd());
      raw.push_back(owned.back().get());
    }
    {  // too many fds
      Pair p;
      const auto bytes = encode(make_request(R::get_features));
      send_raw(p.a.get(), bytes.data(), bytes.size(), raw);
      EXPECT_EQ(read_message(p.b.get()).error().code, CodecErrc::too_many_fds);
    }
    {  // oversized, with fds attached to the header
      Pair p;
      const auto h = header_bytes(5, kVersion, 1u << 20);
      send_raw(p.a.get(), h.data(), h.size(), {raw[0], raw[1], raw[2]});
      EXPECT_EQ(read_message(p.b.get()).error().code, CodecErrc::too_large);
    }
    {  // truncated, with fds
      Pair p;
      const auto bytes = encode(make_request(R::set_log_base, LogDesc{4096, 0}));
      send_raw(p.a.get(), bytes.data(), bytes.size() - 3, {raw[3]});
      p.a.reset();
      EXPECT_EQ(read_message(p.b.get()).error().code, CodecErrc::truncated);
    }
    {  // fds on the payload
      Pair p;
      const auto bytes = encode(make_request(R::set_log_base, LogDesc{4096, 0}));
      send_raw(p.a.get(), bytes.data(), kHeaderSize);
      send_raw(p.a.get(), bytes.data() + kHeaderSize, bytes.size() - kHeaderSize, {raw[4], raw[5]});
      EXPECT_EQ(read_message(p.b.get()).error().code, CodecErrc::misplaced_fds);
    }
    {  // well framed, refused by validation
      Pair p;
      const auto bytes = encode(make_request(R::set_mem_table, MemTableHeader{9, 0}));
      send_raw(p.a.get(), bytes.data(), bytes.size(), {raw[6], raw[7], raw[8], raw[9]});
      auto m = read_message(p.b.get());
      ASSERT_TRUE(m.has_value());
      EXPECT_EQ(validate_frontend_request(*m, {}).error().code, CodecErrc::bad_region_count);
    }
  }
  EXPECT_EQ(open_fd_count(), before);
}

// A worker must never block on a full back-end channel (the front-end may be waiting for
// that worker): try_write_message refuses at once, and never leaves half a message.
TEST(Socket, TryWriteRefusesWhenFullAndNeverSplitsAMessage) {
  Pair p;
  int small = 4096;
  ASSERT_EQ(::setsockopt(p.a.get(), SOL_SOCKET, SO_SNDBUF, &small, sizeof small), 0);
  IotlbMsg t{};
  t.type = static_cast<std::uint8_t>(IotlbType::miss);
  t.perm = 1;
  int sent = 0;
  for (; sent < 100000; ++sent) {
    t.iova = Iova(static_cast<std::uint64_t>(sent) << 12);
    auto w = try_write_message(p.a.get(), make_backend_request(BackendRequest::iotlb_msg, t),
                               Channel::backend);
    if (!w) {
      EXPECT_EQ(w.error().sys_errno, EAGAIN);
      break;
    }
  }
  ASSERT_GT(sent, 0);
  ASSERT_LT(sent, 100000) << "the channel never filled";
  // Everything written reads back whole and in order.
  for (int i = 0; i < sent; ++i) {
    auto m = read_message(p.b.get(), Channel::backend);
    ASSERT_TRUE(m.has_value()) << i;
    auto ev = decode_iotlb(*m, Channel::backend, {});
    ASSERT_TRUE(ev.has_value()) << i;
    EXPECT_EQ(ev->iova, Iova(static_cast<std::uint64_t>(i) << 12));
  }
}

}  // namespace
}  // namespace vhostkit::vhost_user
