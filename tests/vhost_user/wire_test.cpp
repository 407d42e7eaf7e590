// vhost-user wire format: round trips over real socketpairs with real fds, and every
// malformed case the codec must refuse, without leaking an fd.
#include <sys/eventfd.h>
#include <sys/socket.h>

#include <gtest/gtest.h>

#include "support/memfd.h"
#include "vhostkit/vhost_user/wire.h"

namespace vhostkit::vhost_user {
namespace {

using testing::make_memfd;
using testing::open_fd_count;

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

Message with_fds(Message m, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) m.fds.push_back(eventfd());
  return m;
}

// Sends m through a socketpair and validates what arrives as a request.
Result<Message, CodecError> round_trip(const Message& m) {
  Pair p;
  if (auto w = write_message(p.a.get(), m); !w) return unexpected(w.error());
  auto r = read_message(p.b.get());
  if (!r) return r;
  if (auto v = validate_request(*r); !v) return unexpected(v.error());
  return r;
}

CodecErrc error_of(const Message& m) {
  auto r = round_trip(m);
  EXPECT_FALSE(r.has_value()) << to_string(m.req());
  return r ? CodecErrc::closed : r.error().code;
}

TEST(Wire, EveryRequestRoundTrips) {
  std::uint64_t u = 0x1234;
  std::vector<Message> ms;
  for (auto r : {Request::get_features, Request::set_owner, Request::reset_owner,
                 Request::get_protocol_features, Request::get_queue_num, Request::reset_device,
                 Request::get_max_mem_slots, Request::get_status})
    ms.push_back(Message::make_empty(static_cast<std::uint32_t>(r)));
  for (auto r : {Request::set_features, Request::set_protocol_features, Request::set_status,
                 Request::send_rarp, Request::net_set_mtu})
    ms.push_back(Message::make(static_cast<std::uint32_t>(r), u));
  for (auto r : {Request::set_vring_num, Request::set_vring_base, Request::get_vring_base,
                 Request::set_vring_enable, Request::set_vring_endian, Request::vring_kick})
    ms.push_back(Message::make(static_cast<std::uint32_t>(r), VringState{1, 256}));
  ms.push_back(Message::make(9, VringAddr{0, kVringFLog, 0x1000, 0x3000, 0x2000, 0x3000}));
  for (auto r : {Request::set_vring_kick, Request::set_vring_call, Request::set_vring_err}) {
    ms.push_back(with_fds(Message::make(static_cast<std::uint32_t>(r), std::uint64_t{1}), 1));
    ms.push_back(Message::make(static_cast<std::uint32_t>(r), std::uint64_t{1} | kVringNoFd));
  }
  ms.push_back(with_fds(Message::make(6, LogDesc{4096, 0}), 1));
  ms.push_back(with_fds(Message::make_empty(7), 1));
  ms.push_back(with_fds(Message::make_empty(21), 1));
  ms.push_back(Message::make(22, IotlbMsg{0x1000, 0x1000, 0x7f00, 3, kIotlbUpdate, {}}));
  struct Config {
    ConfigHeader h;
    std::uint8_t data[8];
  };
  ms.push_back(Message::make(24, Config{{0, 8, 0}, {1, 2, 3, 4, 5, 6, 7, 8}}));
  ms.push_back(Message::make(25, Config{{0, 8, 0}, {}}));
  ms.push_back(with_fds(Message::make(37, SingleMemRegion{0, {0, 4096, 0x7f00, 0}}), 1));
  ms.push_back(Message::make(38, SingleMemRegion{0, {0, 4096, 0x7f00, 0}}));
  struct Table2 {
    MemTableHeader h;
    MemRegion r[2];
  };
  ms.push_back(
      with_fds(Message::make(5, Table2{{2, 0}, {{0, 4096, 1, 0}, {8192, 4096, 2, 0}}}), 2));
  for (const Message& m : ms) {
    auto r = round_trip(m);
    ASSERT_TRUE(r.has_value()) << to_string(m.req()) << ": " << r.error().message();
    EXPECT_EQ(r->request, m.request);
    EXPECT_EQ(r->payload, m.payload);
    EXPECT_EQ(r->fds.size(), m.fds.size());
    for (const auto& fd : r->fds) EXPECT_TRUE(fd.valid());
  }
}

TEST(Wire, ShortPayloadIsRejected) {
  Message m = Message::make(2, std::uint32_t{1});  // SET_FEATURES with 4 bytes
  EXPECT_EQ(error_of(m), CodecErrc::bad_size);
  Message a = Message::make(9, VringState{0, 0});  // SET_VRING_ADDR with 8 bytes
  EXPECT_EQ(error_of(a), CodecErrc::bad_size);
}

TEST(Wire, OversizedPayloadIsRejected) {
  Message m = Message::make(2, std::uint64_t{1});
  m.payload.resize(16);
  EXPECT_EQ(error_of(m), CodecErrc::bad_size);
  Message big = Message::make_empty(2);
  big.payload.resize(8192);
  EXPECT_EQ(error_of(big), CodecErrc::too_large);
}

TEST(Wire, WrongFdCountsAreRejected) {
  EXPECT_EQ(error_of(Message::make(12, std::uint64_t{0})), CodecErrc::bad_fd_count);  // kick, no fd
  EXPECT_EQ(error_of(with_fds(Message::make(12, std::uint64_t{0} | kVringNoFd), 1)),
            CodecErrc::bad_fd_count);  // NOFD but an fd
  EXPECT_EQ(error_of(with_fds(Message::make_empty(1), 1)),
            CodecErrc::bad_fd_count);  // fd where none
  EXPECT_EQ(error_of(Message::make(6, LogDesc{4096, 0})), CodecErrc::bad_fd_count);  // log, no fd
  struct Table2 {
    MemTableHeader h;
    MemRegion r[2];
  };
  EXPECT_EQ(error_of(with_fds(Message::make(5, Table2{{2, 0}, {}}), 1)), CodecErrc::bad_fd_count);
  EXPECT_EQ(error_of(with_fds(Message::make(5, Table2{{2, 0}, {}}), 3)), CodecErrc::bad_fd_count);
}

TEST(Wire, MemTableSizesAreChecked) {
  struct Table2 {
    MemTableHeader h;
    MemRegion r[2];
  };
  EXPECT_EQ(error_of(with_fds(Message::make(5, Table2{{3, 0}, {}}), 3)), CodecErrc::bad_size);
  EXPECT_EQ(error_of(Message::make(5, Table2{{0, 0}, {}})), CodecErrc::bad_size);
  struct Huge {
    MemTableHeader h;
    MemRegion r[9];
  };
  EXPECT_EQ(error_of(Message::make(5, Huge{{1000, 0}, {}})), CodecErrc::bad_size);
  // QEMU's padded form: 8 region slots, 2 used.
  struct Padded {
    MemTableHeader h;
    MemRegion r[8];
  };
  EXPECT_TRUE(round_trip(with_fds(Message::make(5, Padded{{2, 0}, {}}), 2)).has_value());
}

TEST(Wire, ConfigSizesAreChecked) {
  struct Config {
    ConfigHeader h;
    std::uint8_t data[8];
  };
  EXPECT_EQ(error_of(Message::make(24, Config{{0, 9, 0}, {}})), CodecErrc::bad_size);
  struct Big {
    ConfigHeader h;
    std::uint8_t data[300];
  };
  EXPECT_EQ(error_of(Message::make(24, Big{{0, 300, 0}, {}})), CodecErrc::bad_size);
}

TEST(Wire, UnknownRequestsAreRejected) {
  EXPECT_EQ(error_of(Message::make_empty(0)), CodecErrc::unknown_request);
  EXPECT_EQ(error_of(Message::make_empty(99)), CodecErrc::unknown_request);
  EXPECT_EQ(error_of(Message::make_empty(28)),
            CodecErrc::unknown_request);  // postcopy: unsupported
}

TEST(Wire, HeaderFlagsAreChecked) {
  EXPECT_EQ(error_of(Message::make_empty(1, 2)), CodecErrc::bad_version);
  EXPECT_EQ(error_of(Message::make_empty(1, kVersion | kFlagReply)), CodecErrc::unexpected_flags);
  // need_reply is a legal request flag.
  EXPECT_TRUE(round_trip(Message::make_empty(1, kVersion | kFlagNeedReply)).has_value());
  // A reply must carry the reply flag and answer the right request.
  Message reply = Message::make(1, std::uint64_t{5}, kVersion | kFlagReply);
  EXPECT_TRUE(validate_reply(reply, Request::get_features).has_value());
  EXPECT_FALSE(validate_reply(reply, Request::get_protocol_features).has_value());
  EXPECT_FALSE(
      validate_reply(Message::make(1, std::uint64_t{5}), Request::get_features).has_value());
}

TEST(Wire, EofMidMessageIsTruncated) {
  Pair p;
  std::uint8_t header[12] = {2, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0};  // SET_FEATURES, 8 bytes
  ASSERT_EQ(::send(p.a.get(), header, sizeof header, 0), 12);
  ASSERT_EQ(::send(p.a.get(), header, 3, 0), 3);
  p.a.reset();
  auto r = read_message(p.b.get());
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, CodecErrc::truncated);
  EXPECT_EQ(read_message(p.b.get()).error().code, CodecErrc::closed);
}

TEST(Wire, EofBetweenMessagesIsClosed) {
  Pair p;
  p.a.reset();
  EXPECT_EQ(read_message(p.b.get()).error().code, CodecErrc::closed);
}

TEST(Wire, TooManyFdsAreRefusedAndClosed) {
  std::size_t before = open_fd_count();
  {
    Pair p;
    // Hand-build a message with 10 fds (the codec's writer refuses more than 8).
    std::uint8_t header[12] = {1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0};
    std::vector<UniqueFd> fds;
    for (int i = 0; i < 10; ++i) fds.push_back(eventfd());
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 10)];
    iovec iov{header, 12};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * 10);
    for (int i = 0; i < 10; ++i) {
      int v = fds[static_cast<std::size_t>(i)].get();
      std::memcpy(CMSG_DATA(c) + i * sizeof(int), &v, sizeof(int));
    }
    ASSERT_EQ(::sendmsg(p.a.get(), &msg, 0), 12);
    auto r = read_message(p.b.get());
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, CodecErrc::too_many_fds);
  }
  EXPECT_EQ(open_fd_count(), before);
}

TEST(Wire, MalformedMessagesLeakNoFds) {
  std::size_t before = open_fd_count();
  for (int i = 0; i < 20; ++i) {
    (void)error_of(with_fds(Message::make_empty(1), 2));
    (void)error_of(with_fds(Message::make(5, MemTableHeader{7, 0}), 7));
    (void)error_of(with_fds(Message::make_empty(99), 3));
  }
  EXPECT_EQ(open_fd_count(), before);
}

TEST(Wire, MemfdSurvivesTheTrip) {
  auto fd = make_memfd(4096);
  ASSERT_EQ(::pwrite(fd.get(), "vhostkit", 8, 100), 8);
  Message m = Message::make(37, SingleMemRegion{0, {0, 4096, 0x7f00, 0}});
  m.fds.push_back(std::move(fd));
  auto r = round_trip(m);
  ASSERT_TRUE(r);
  char buf[8];
  ASSERT_EQ(::pread(r->fds[0].get(), buf, 8, 100), 8);
  EXPECT_EQ(std::string(buf, 8), "vhostkit");
}

// A worker must never block on a full back-end channel (the front-end may be waiting
// for that worker): try_write_message refuses at once, and never leaves half a message.
TEST(Wire, TryWriteRefusesWhenFullAndNeverSplitsAMessage) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  int small = 4096;
  ASSERT_EQ(::setsockopt(a.get(), SOL_SOCKET, SO_SNDBUF, &small, sizeof small), 0);
  IotlbMsg t{};
  t.type = kIotlbMiss;
  t.perm = 1;
  int sent = 0;
  for (; sent < 100000; ++sent) {
    t.iova = static_cast<std::uint64_t>(sent) << 12;
    Message m = Message::make(static_cast<std::uint32_t>(BackendRequest::iotlb_msg), t);
    auto w = try_write_message(a.get(), m);
    if (!w) {
      EXPECT_EQ(w.error().sys_errno, EAGAIN);
      break;
    }
  }
  ASSERT_GT(sent, 0);
  ASSERT_LT(sent, 100000) << "the channel never filled";
  // Everything written reads back whole and in order.
  for (int i = 0; i < sent; ++i) {
    auto m = read_message(b.get());
    ASSERT_TRUE(m.has_value()) << i;
    EXPECT_EQ(m->as<IotlbMsg>().iova, static_cast<std::uint64_t>(i) << 12);
  }
}

}  // namespace
}  // namespace vhostkit::vhost_user
