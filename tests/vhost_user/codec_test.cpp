// vhost-user codec: every request of both channels round-trips over a real socketpair
// with real memfds and eventfds; every malformed layout is refused with the right error;
// typed decoders read what GPA_ADDRESSES, ACCESS_PLATFORM and XEN_MMAP say; replies are
// checked against the request they answer; nothing leaks an fd.
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "support/memfd.h"
#include "vhostkit/vhost_user/message.h"
#include "vhostkit/vhost_user/socket.h"

namespace vhostkit::vhost_user {
namespace {

using R = FrontendRequest;
using B = BackendRequest;
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

// The identity of the file behind fd, to show a received fd is the one that was sent.
std::pair<dev_t, ino_t> file_of(int fd) {
  struct stat st {};
  EXPECT_EQ(::fstat(fd, &st), 0);
  return {st.st_dev, st.st_ino};
}

Message with_fds(Message m, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) m.fds.push_back(eventfd());
  return m;
}

Result<Message, CodecError> round_trip(const Message& m, Channel c = Channel::main) {
  Pair p;
  if (auto w = write_message(p.a.get(), m, c); !w) return unexpected(w.error());
  return read_message(p.b.get(), c);
}

constexpr MemRegion kRegionA{Gpa(0x0), 0x100000, 0x7f0000000000, 0};
constexpr MemRegion kRegionB{Gpa(0x100000000), 0x200000, 0x7f0000200000, 0x100000};

// A valid request of each kind, as a conforming front-end would send it.
Message valid_request(R r) {
  switch (r) {
    case R::get_features:
    case R::set_owner:
    case R::reset_owner:
    case R::get_protocol_features:
    case R::get_queue_num:
    case R::postcopy_advise:
    case R::postcopy_listen:
    case R::postcopy_end:
    case R::reset_device:
    case R::get_max_mem_slots:
    case R::get_status:
    case R::check_device_state:
    case R::get_shmem_config: return make_request(r);
    case R::set_features:
    case R::set_protocol_features:
    case R::send_rarp:
    case R::net_set_mtu:
    case R::close_crypto_session:
    case R::set_status: return make_request(r, std::uint64_t{0x1234});
    case R::set_mem_table: {
      std::vector<UniqueFd> fds;
      fds.push_back(make_memfd(0x100000));
      fds.push_back(make_memfd(0x300000));
      const MemRegion regions[] = {kRegionA, kRegionB};
      return std::move(*make_mem_table(regions, std::move(fds)));
    }
    case R::set_log_base: return make_log_base(LogDesc{0x1000, 0}, make_memfd(0x1000));
    case R::set_log_fd:
    case R::set_backend_req_fd:
    case R::gpu_set_socket: return with_fds(make_request(r), 1);
    case R::set_vring_num:
    case R::set_vring_base:
    case R::get_vring_base:
    case R::set_vring_enable:
    case R::set_vring_endian:
    case R::vring_kick: return make_request(r, VringState{1, 256});
    case R::set_vring_addr:
      return make_request(r, VringAddr{1, kVringFlagLog, 0x1000, 0x3000, 0x2000, Gpa(0x3000)});
    case R::set_vring_kick:
    case R::set_vring_call:
    case R::set_vring_err: return make_vring_file(r, 1, eventfd());
    case R::iotlb_msg:
      return make_request(r, IotlbMsg{Iova(0x10000), 0x1000, 0x7f0000001000, 3, 2, {}});
    case R::get_config: {
      const std::uint8_t zeros[24] = {};
      return std::move(*make_config(r, 0, 0, zeros));
    }
    case R::set_config: {
      const std::uint8_t bytes[4] = {1, 2, 3, 4};
      return std::move(*make_config(r, 8, 0, bytes));
    }
    case R::get_inflight_fd: return make_request(r, InflightDesc{0, 0, 2, 256, {}});
    case R::set_inflight_fd: {
      Message m = make_request(r, InflightDesc{0x1000, 0, 2, 256, {}});
      m.fds.push_back(make_memfd(0x1000));
      return m;
    }
    case R::add_mem_reg: return make_mem_reg(r, kRegionB, make_memfd(0x300000));
    case R::rem_mem_reg: return make_mem_reg(r, kRegionB);
    case R::get_shared_object: return make_request(r, SharedObject{{1, 2, 3}});
    case R::set_device_state_fd: {
      int p[2];
      EXPECT_EQ(::pipe2(p, O_CLOEXEC), 0);
      UniqueFd keep(p[0]);
      Message m = make_request(r, DeviceStateTransfer{0, 0});
      m.fds.emplace_back(p[1]);
      return m;
    }
    case R::create_crypto_session:
    case R::none: break;
  }
  ADD_FAILURE() << "no valid example for " << to_string(r);
  return make_request(r);
}

Message valid_backend_request(B r) {
  switch (r) {
    case B::iotlb_msg: return make_backend_request(r, IotlbMsg{Iova(0x10000), 0, 0, 1, 1, {}});
    case B::config_change_msg: return make_backend_request(r);
    case B::vring_host_notifier_msg: {
      Message m = make_backend_request(r, VringArea{1, 4096, 0});
      m.fds.push_back(make_memfd(4096));
      return m;
    }
    case B::vring_call:
    case B::vring_err: return make_backend_request(r, VringState{1, 0});
    case B::shared_object_add:
    case B::shared_object_remove:
    case B::shared_object_lookup: return make_backend_request(r, SharedObject{{9}});
    case B::shmem_map: {
      Message m = make_backend_request(r, ShmemMap{0, {}, 0, 0x1000, 0x1000, 1});
      m.fds.push_back(make_memfd(0x1000));
      return m;
    }
    case B::shmem_unmap: return make_backend_request(r, ShmemMap{0, {}, 0, 0x1000, 0x1000, 0});
    case B::none: break;
  }
  ADD_FAILURE() << "no valid example for " << to_string(r);
  return make_backend_request(r);
}

std::vector<R> all_frontend_requests() {
  std::vector<R> out;
  for (std::uint32_t i = 1; i <= 44; ++i) {
    if (i != static_cast<std::uint32_t>(R::create_crypto_session)) out.push_back(static_cast<R>(i));
  }
  return out;
}

std::vector<B> all_backend_requests() {
  std::vector<B> out;
  for (std::uint32_t i = 1; i <= 10; ++i) out.push_back(static_cast<B>(i));
  return out;
}

CodecErrc frontend_error(const Message& m, const Negotiated& n = {}) {
  auto v = validate_frontend_request(m, n);
  EXPECT_FALSE(v.has_value()) << to_string(m.frontend_request());
  return v ? CodecErrc::closed : v.error().code;
}

CodecErrc backend_error(const Message& m, const Negotiated& n = {}) {
  auto v = validate_backend_request(m, n);
  EXPECT_FALSE(v.has_value()) << to_string(m.backend_request());
  return v ? CodecErrc::closed : v.error().code;
}

TEST(Codec, EveryFrontendRequestRoundTripsWithItsFds) {
  for (R r : all_frontend_requests()) {
    SCOPED_TRACE(to_string(r));
    const Message sent = valid_request(r);
    ASSERT_TRUE(validate_frontend_request(sent, {}).has_value());
    auto got = round_trip(sent);
    ASSERT_TRUE(got.has_value()) << got.error().message();
    auto v = validate_frontend_request(*got, {});
    ASSERT_TRUE(v.has_value()) << v.error().message();
    EXPECT_EQ(got->request, sent.request);
    EXPECT_EQ(got->flags, sent.flags);
    EXPECT_EQ(got->payload, sent.payload);
    ASSERT_EQ(got->fds.size(), sent.fds.size());
    for (std::size_t i = 0; i < sent.fds.size(); ++i) {
      EXPECT_NE(got->fds[i].get(), sent.fds[i].get());
      EXPECT_EQ(file_of(got->fds[i].get()), file_of(sent.fds[i].get()));
    }
  }
}

TEST(Codec, EveryBackendRequestRoundTripsWithItsFds) {
  for (B r : all_backend_requests()) {
    SCOPED_TRACE(to_string(r));
    const Message sent = valid_backend_request(r);
    auto got = round_trip(sent, Channel::backend);
    ASSERT_TRUE(got.has_value()) << got.error().message();
    auto v = validate_backend_request(*got, {});
    ASSERT_TRUE(v.has_value()) << v.error().message();
    EXPECT_EQ(got->payload, sent.payload);
    ASSERT_EQ(got->fds.size(), sent.fds.size());
    for (std::size_t i = 0; i < sent.fds.size(); ++i)
      EXPECT_EQ(file_of(got->fds[i].get()), file_of(sent.fds[i].get()));
  }
}

TEST(Codec, ShortAndOversizedPayloadsAreRefused) {
  for (R r : all_frontend_requests()) {
    SCOPED_TRACE(to_string(r));
    Message longer = valid_request(r);
    longer.payload.push_back(0);
    EXPECT_EQ(frontend_error(longer), CodecErrc::bad_size);
    Message m = valid_request(r);
    if (m.payload.empty()) continue;
    m.payload.pop_back();
    EXPECT_EQ(frontend_error(m), CodecErrc::bad_size);
  }
  for (B r : all_backend_requests()) {
    SCOPED_TRACE(to_string(r));
    Message longer = valid_backend_request(r);
    longer.payload.push_back(0);
    EXPECT_EQ(backend_error(longer), CodecErrc::bad_size);
  }
}

TEST(Codec, FdCountsAreExact) {
  for (R r : all_frontend_requests()) {
    SCOPED_TRACE(to_string(r));
    Message extra = valid_request(r);
    extra.fds.push_back(eventfd());
    if (r == R::rem_mem_reg) extra.fds.push_back(eventfd());    // one stray fd is tolerated
    EXPECT_EQ(frontend_error(extra), CodecErrc::bad_fd_count);  // too many / none allowed
    Message fewer = valid_request(r);
    if (fewer.fds.empty()) continue;
    fewer.fds.pop_back();
    EXPECT_EQ(frontend_error(fewer), CodecErrc::bad_fd_count);  // too few
  }
  for (B r : all_backend_requests()) {
    SCOPED_TRACE(to_string(r));
    Message extra = valid_backend_request(r);
    extra.fds.push_back(eventfd());
    EXPECT_EQ(backend_error(extra), CodecErrc::bad_fd_count);
  }
}

TEST(Codec, RemMemRegAcceptsAndClosesOneStrayFd) {
  Message m = make_mem_reg(R::rem_mem_reg, kRegionB, eventfd());
  ASSERT_TRUE(validate_frontend_request(m, {}).has_value());
  const std::size_t before = open_fd_count();
  auto d = decode_mem_reg(std::move(m), {});
  ASSERT_TRUE(d.has_value()) << d.error().message();
  EXPECT_FALSE(d->fd.valid());
  EXPECT_EQ(open_fd_count(), before - 1);  // the stray fd was closed unused
  EXPECT_EQ(d->region.guest_addr, kRegionB.guest_addr);
}

TEST(Codec, HeaderVersionAndFlagsAreChecked) {
  Message m = valid_request(R::set_vring_num);
  for (std::uint32_t version : {0u, 2u, 3u}) {
    m.flags = version;
    EXPECT_EQ(frontend_error(m), CodecErrc::bad_version) << version;
  }
  m.flags = kVersion | kFlagReply;  // a reply flag on a request
  EXPECT_EQ(frontend_error(m), CodecErrc::bad_flags);
  for (std::uint32_t undefined : {1u << 4, 1u << 16, 1u << 31}) {
    m.flags = kVersion | undefined;
    EXPECT_EQ(frontend_error(m), CodecErrc::bad_flags) << undefined;
  }
  m.flags = kVersion | kFlagNeedReply;
  EXPECT_TRUE(validate_frontend_request(m, {}).has_value());
  Message b = valid_backend_request(B::config_change_msg);
  b.flags = kVersion | kFlagReply;
  EXPECT_EQ(backend_error(b), CodecErrc::bad_flags);
}

TEST(Codec, UnknownAndUncheckableRequestsAreRefused) {
  for (std::uint32_t r : {0u, 45u, 46u, 100u, 1024u, 0xffffffffu})
    EXPECT_EQ(frontend_error(make_request(static_cast<R>(r))), CodecErrc::unknown_request) << r;
  for (std::uint32_t r : {0u, 11u, 0xffffffffu})
    EXPECT_EQ(backend_error(make_backend_request(static_cast<B>(r))), CodecErrc::unknown_request)
        << r;
  // CREATE_CRYPTO_SESSION carries QEMU's internal session struct: not checkable.
  Message crypto = make_request(R::create_crypto_session, std::uint64_t{0});
  EXPECT_EQ(frontend_error(crypto), CodecErrc::unsupported_request);
  EXPECT_STREQ(to_string(static_cast<R>(45)), "UNKNOWN");
}

TEST(Codec, VringFileNoFdBit) {
  auto word = [](std::uint64_t w, std::size_t fds) {
    return with_fds(make_request(R::set_vring_call, w), fds);
  };
  EXPECT_TRUE(validate_frontend_request(word(3, 1), {}).has_value());
  EXPECT_TRUE(validate_frontend_request(word(3 | kVringNoFdMask, 0), {}).has_value());
  EXPECT_TRUE(validate_frontend_request(word(255, 1), {}).has_value());  // range: the server's
  EXPECT_EQ(frontend_error(word(3 | kVringNoFdMask, 1)), CodecErrc::bad_fd_count);
  EXPECT_EQ(frontend_error(word(3, 0)), CodecErrc::bad_fd_count);
  EXPECT_EQ(frontend_error(word(3 | (1u << 9), 1)), CodecErrc::bad_value);
  EXPECT_EQ(frontend_error(word(3ull | (1ull << 63), 1)), CodecErrc::bad_value);

  auto polled = decode_vring_file(word(7 | kVringNoFdMask, 0), {});
  ASSERT_TRUE(polled.has_value());
  EXPECT_EQ(polled->index, 7u);
  EXPECT_FALSE(polled->fd.valid());
  UniqueFd kick = eventfd();
  const auto id = file_of(kick.get());
  auto with_fd = decode_vring_file(make_vring_file(R::set_vring_kick, 2, std::move(kick)), {});
  ASSERT_TRUE(with_fd.has_value());
  EXPECT_EQ(with_fd->index, 2u);
  EXPECT_EQ(file_of(with_fd->fd.get()), id);

  // The back-end channel's host notifier uses the same word in its vring area.
  Message notifier =
      make_backend_request(B::vring_host_notifier_msg, VringArea{1 | kVringNoFdMask, 4096, 0});
  EXPECT_TRUE(validate_backend_request(notifier, {}).has_value());
  notifier.fds.push_back(eventfd());
  EXPECT_EQ(backend_error(notifier), CodecErrc::bad_fd_count);
}

Message table_message(std::uint32_t announced, std::size_t regions_sent, std::size_t fds,
                      std::size_t stride = sizeof(MemRegion)) {
  Message m = make_request(R::set_mem_table);
  m.payload.assign(sizeof(MemTableHeader) + regions_sent * stride, 0);
  const MemTableHeader h{announced, 0};
  std::memcpy(m.payload.data(), &h, sizeof h);
  for (std::size_t i = 0; i < fds; ++i) m.fds.push_back(make_memfd(4096));
  return m;
}

TEST(Codec, MemTableLayouts) {
  EXPECT_TRUE(validate_frontend_request(table_message(2, 2, 2), {}).has_value());
  EXPECT_TRUE(validate_frontend_request(table_message(8, 8, 8), {}).has_value());
  EXPECT_TRUE(validate_frontend_request(table_message(0, 0, 0), {}).has_value());
  // The specification's figure (all 8 slots) is accepted too; unused slots are ignored.
  EXPECT_TRUE(validate_frontend_request(table_message(2, 8, 2), {}).has_value());
  EXPECT_TRUE(validate_frontend_request(table_message(0, 8, 0), {}).has_value());

  EXPECT_EQ(frontend_error(table_message(9, 9, 8)), CodecErrc::bad_region_count);
  EXPECT_EQ(frontend_error(table_message(1000, 2, 2)), CodecErrc::bad_region_count);
  EXPECT_EQ(frontend_error(table_message(0xffffffffu, 0, 0)), CodecErrc::bad_region_count);
  EXPECT_EQ(frontend_error(table_message(2, 3, 2)), CodecErrc::bad_size);  // more than announced
  EXPECT_EQ(frontend_error(table_message(3, 2, 3)), CodecErrc::bad_size);  // fewer
  EXPECT_EQ(frontend_error(table_message(2, 7, 2)), CodecErrc::bad_size);
  EXPECT_EQ(frontend_error(table_message(2, 2, 3)), CodecErrc::bad_fd_count);
  EXPECT_EQ(frontend_error(table_message(2, 2, 1)), CodecErrc::bad_fd_count);
  Message tiny = make_request(R::set_mem_table);
  tiny.payload.assign(4, 0);
  EXPECT_EQ(frontend_error(tiny), CodecErrc::bad_size);

  // XEN_MMAP: 40-byte regions, single region payload 48 bytes.
  Negotiated xen{0, bit(ProtocolFeature::xen_mmap)};
  EXPECT_TRUE(
      validate_frontend_request(table_message(2, 2, 2, sizeof(XenMemRegion)), xen).has_value());
  EXPECT_EQ(frontend_error(table_message(2, 2, 2), xen), CodecErrc::bad_size);
  EXPECT_EQ(frontend_error(table_message(2, 2, 2, sizeof(XenMemRegion))), CodecErrc::bad_size);
  Message add = make_request(R::add_mem_reg);
  add.payload.assign(single_mem_region_size(xen), 0);
  add.fds.push_back(make_memfd(4096));
  EXPECT_TRUE(validate_frontend_request(add, xen).has_value());
  EXPECT_EQ(frontend_error(add), CodecErrc::bad_size);
}

TEST(Codec, MemTableDecodesRegionsWithTheirFds) {
  UniqueFd a = make_memfd(0x100000), b = make_memfd(0x300000);
  const auto ida = file_of(a.get()), idb = file_of(b.get());
  std::vector<UniqueFd> fds;
  fds.push_back(std::move(a));
  fds.push_back(std::move(b));
  const MemRegion regions[] = {kRegionA, kRegionB};
  auto m = make_mem_table(regions, std::move(fds));
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->payload.size(), 8u + 2 * 32u);  // the compact form, as QEMU sends it
  auto got = round_trip(*m);
  ASSERT_TRUE(got.has_value());
  auto table = decode_mem_table(std::move(*got), {});
  ASSERT_TRUE(table.has_value()) << table.error().message();
  ASSERT_EQ(table->size(), 2u);
  EXPECT_EQ((*table)[0].region.guest_addr, kRegionA.guest_addr);
  EXPECT_EQ((*table)[1].region.size, kRegionB.size);
  EXPECT_EQ((*table)[1].region.mmap_offset, kRegionB.mmap_offset);
  EXPECT_FALSE((*table)[0].xen.has_value());
  EXPECT_EQ(file_of((*table)[0].fd.get()), ida);
  EXPECT_EQ(file_of((*table)[1].fd.get()), idb);

  // The padded form decodes the announced regions only.
  Message padded = table_message(1, 8, 1);
  std::memcpy(padded.payload.data() + 8, &kRegionB, sizeof kRegionB);
  auto one = decode_mem_table(std::move(padded), {});
  ASSERT_TRUE(one.has_value());
  ASSERT_EQ(one->size(), 1u);
  EXPECT_EQ((*one)[0].region.guest_addr, kRegionB.guest_addr);

  // XEN_MMAP regions carry their flags and domain.
  Negotiated xen{0, bit(ProtocolFeature::xen_mmap)};
  Message xm = table_message(1, 1, 1, sizeof(XenMemRegion));
  const XenMemRegion xr{kRegionA, {1, 7}};
  std::memcpy(xm.payload.data() + 8, &xr, sizeof xr);
  auto x = decode_mem_table(std::move(xm), xen);
  ASSERT_TRUE(x.has_value());
  ASSERT_TRUE((*x)[0].xen.has_value());
  EXPECT_EQ((*x)[0].xen->domid, 7u);

  // Builders refuse what a receiver would refuse.
  std::vector<MemRegion> nine(9, kRegionA);
  std::vector<UniqueFd> nine_fds;
  for (int i = 0; i < 9; ++i) nine_fds.push_back(eventfd());
  EXPECT_EQ(make_mem_table(nine, std::move(nine_fds)).error().code, CodecErrc::bad_region_count);
  std::vector<UniqueFd> one_fd;
  one_fd.push_back(eventfd());
  EXPECT_EQ(make_mem_table(regions, std::move(one_fd)).error().code, CodecErrc::bad_fd_count);
}

TEST(Codec, GpaAddressesChangesWhatUserAddressesMean) {
  const Negotiated legacy{};
  const Negotiated gpa{0, bit(ProtocolFeature::gpa_addresses)};
  const Negotiated iommu{1ULL << 33, 0};
  const Negotiated iommu_gpa{1ULL << 33, bit(ProtocolFeature::gpa_addresses)};

  // Memory regions' user address.
  EXPECT_EQ(std::get<Uaddr>(kRegionA.user_address(legacy)), Uaddr(0x7f0000000000));
  EXPECT_EQ(std::get<Gpa>(kRegionA.user_address(gpa)), Gpa(0x7f0000000000));
  // Ring addresses: IOVA with ACCESS_PLATFORM (whatever else), else GPA, else uaddr.
  const VringAddr a{0, 0, 0x1000, 0x3000, 0x2000, Gpa(0x3000)};
  EXPECT_TRUE(std::holds_alternative<Uaddr>(a.desc_address(legacy)));
  EXPECT_EQ(std::get<Gpa>(a.used_address(gpa)), Gpa(0x3000));
  EXPECT_EQ(std::get<Iova>(a.avail_address(iommu)), Iova(0x2000));
  EXPECT_TRUE(std::holds_alternative<Iova>(a.desc_address(iommu_gpa)));
  EXPECT_FALSE(a.logging());
  EXPECT_EQ(a.log, Gpa(0x3000));  // the log address is always guest-physical

  // IOTLB updates' uaddr.
  Message upd = make_request(R::iotlb_msg, IotlbMsg{Iova(0x10000), 0x2000, 0x5000, 3, 2, {}});
  auto legacy_ev = decode_iotlb(upd, Channel::main, iommu);
  ASSERT_TRUE(legacy_ev.has_value());
  EXPECT_EQ(legacy_ev->type, IotlbType::update);
  EXPECT_EQ(legacy_ev->iova, Iova(0x10000));
  EXPECT_EQ(legacy_ev->size, 0x2000u);
  EXPECT_EQ(legacy_ev->perm, Access::read_write);
  EXPECT_EQ(std::get<Uaddr>(legacy_ev->target), Uaddr(0x5000));
  auto gpa_ev = decode_iotlb(upd, Channel::main, iommu_gpa);
  ASSERT_TRUE(gpa_ev.has_value());
  EXPECT_EQ(std::get<Gpa>(gpa_ev->target), Gpa(0x5000));

  // The wire layout is the same either way.
  EXPECT_TRUE(validate_frontend_request(valid_request(R::set_mem_table), gpa).has_value());
  EXPECT_TRUE(validate_frontend_request(valid_request(R::add_mem_reg), gpa).has_value());
  EXPECT_EQ(bit(ProtocolFeature::gpa_addresses), 1ULL << 21);
  EXPECT_EQ(bit(ProtocolFeature::shmem), 1ULL << 22);
}

TEST(Codec, IotlbFieldValues) {
  auto msg = [](std::uint8_t perm, std::uint8_t type) {
    return make_request(R::iotlb_msg, IotlbMsg{Iova(0x1000), 0x1000, 0, perm, type, {}});
  };
  EXPECT_TRUE(decode_iotlb(msg(0, 3), Channel::main, {}).has_value());  // invalidate
  // QEMU 7.2 sends invalidations with an uninitialised perm and uaddr: both are ignored.
  Message garbage = make_request(R::iotlb_msg, IotlbMsg{Iova(0x1000), 0x1000, ~0ULL, 0xb2, 3, {}});
  auto inv = decode_iotlb(garbage, Channel::main, {});
  ASSERT_TRUE(inv.has_value());
  EXPECT_EQ(inv->type, IotlbType::invalidate);
  EXPECT_EQ(inv->perm, Access::none);
  EXPECT_EQ(inv->size, 0x1000u);
  EXPECT_EQ(decode_iotlb(msg(4, 2), Channel::main, {}).error().code, CodecErrc::bad_value);
  EXPECT_EQ(decode_iotlb(msg(0xff, 2), Channel::main, {}).error().code, CodecErrc::bad_value);
  for (std::uint8_t type : {0, 1, 4, 5, 6, 0xff}) {  // misses come from the back-end only
    EXPECT_EQ(decode_iotlb(msg(1, type), Channel::main, {}).error().code, CodecErrc::bad_value)
        << int(type);
  }
  auto miss = make_backend_request(B::iotlb_msg, IotlbMsg{Iova(0x7000), 0, 0, 2, 1, {}});
  auto ev = decode_iotlb(miss, Channel::backend, {});
  ASSERT_TRUE(ev.has_value());
  EXPECT_EQ(ev->type, IotlbType::miss);
  EXPECT_EQ(ev->perm, Access::write);
  auto upd = make_backend_request(B::iotlb_msg, IotlbMsg{Iova(0x7000), 0, 0, 2, 2, {}});
  EXPECT_EQ(decode_iotlb(upd, Channel::backend, {}).error().code, CodecErrc::bad_value);
  // A decoder handed another request refuses it.
  EXPECT_EQ(decode_iotlb(make_request(R::set_vring_num, VringState{0, 1}), Channel::main, {})
                .error()
                .code,
            CodecErrc::unknown_request);
}

TEST(Codec, ConfigSpace) {
  const std::uint8_t bytes[6] = {1, 2, 3, 4, 5, 6};
  auto set = make_config(R::set_config, 4, 1, bytes);
  ASSERT_TRUE(set.has_value());
  EXPECT_EQ(set->payload.size(), 12u + 6u);
  auto c = decode_config(*set);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->offset, 4u);
  EXPECT_EQ(c->flags, 1u);
  ASSERT_EQ(c->bytes().size(), 6u);
  EXPECT_EQ(c->bytes()[5], 6);

  std::vector<std::uint8_t> big(257, 0);
  EXPECT_EQ(make_config(R::set_config, 0, 0, big).error().code, CodecErrc::bad_size);
  big.resize(256);
  EXPECT_TRUE(validate_frontend_request(*make_config(R::set_config, 0, 0, big), {}).has_value());

  Message lying = *make_config(R::set_config, 0, 0, bytes);
  ConfigHeader h{0, 300, 0};  // claims more than 256 bytes
  std::memcpy(lying.payload.data(), &h, sizeof h);
  EXPECT_EQ(frontend_error(lying), CodecErrc::bad_size);
  h = ConfigHeader{0, 7, 0};  // claims more than it carries
  std::memcpy(lying.payload.data(), &h, sizeof h);
  EXPECT_EQ(frontend_error(lying), CodecErrc::bad_size);
  Message bad_flags = *make_config(R::set_config, 0, 2, bytes);
  EXPECT_TRUE(validate_frontend_request(bad_flags, {}).has_value());
  EXPECT_EQ(decode_config(bad_flags).error().code, CodecErrc::bad_value);
  Message stub = make_request(R::get_config);
  stub.payload.assign(8, 0);
  EXPECT_EQ(frontend_error(stub), CodecErrc::bad_size);
}

TEST(Codec, RepliesMatchTheirRequest) {
  const Negotiated n{0, bit(ProtocolFeature::reply_ack) | bit(ProtocolFeature::log_shmfd)};
  const Message get = make_request(R::get_features);
  ASSERT_TRUE(expects_reply(get, n));
  EXPECT_TRUE(validate_reply(make_u64_reply(get, 1ULL << 32), get, n).has_value());
  Message wrong = make_u64_reply(get, 0);
  wrong.request = static_cast<std::uint32_t>(R::get_protocol_features);
  EXPECT_EQ(validate_reply(wrong, get, n).error().code, CodecErrc::wrong_reply);
  Message flags = make_u64_reply(get, 0);
  flags.flags |= kFlagNeedReply;
  EXPECT_EQ(validate_reply(flags, get, n).error().code, CodecErrc::bad_flags);
  flags.flags = kVersion;  // no reply flag
  EXPECT_EQ(validate_reply(flags, get, n).error().code, CodecErrc::bad_flags);
  flags.flags = kFlagReply;  // version 0
  EXPECT_EQ(validate_reply(flags, get, n).error().code, CodecErrc::bad_version);
  Message small = make_u64_reply(get, 0);
  small.payload.resize(4);
  EXPECT_EQ(validate_reply(small, get, n).error().code, CodecErrc::bad_size);

  const Message base = make_request(R::get_vring_base, VringState{0, 0});
  EXPECT_TRUE(validate_reply(make_reply(base, VringState{0, 42}), base, n).has_value());
  EXPECT_EQ(validate_reply(make_u64_reply(base, 0), base, n).has_value(), true);  // same 8 bytes
  EXPECT_EQ(validate_reply(make_reply(base, LogDesc{}), base, n).error().code, CodecErrc::bad_size);

  // SET_LOG_BASE (LOG_SHMFD): an empty reply (DPDK) or a u64 (libvhost-user).
  const Message log = valid_request(R::set_log_base);
  ASSERT_TRUE(expects_reply(log, n));
  EXPECT_TRUE(validate_reply(make_empty_reply(log), log, n).has_value());
  EXPECT_TRUE(validate_reply(make_u64_reply(log, 0), log, n).has_value());
  Message four = make_u64_reply(log, 0);
  four.payload.resize(4);
  EXPECT_EQ(validate_reply(four, log, n).error().code, CodecErrc::bad_size);
  EXPECT_FALSE(expects_reply(log, Negotiated{}));

  // REPLY_ACK on a request without a reply of its own.
  Message num = make_request(R::set_vring_num, VringState{0, 256});
  EXPECT_FALSE(expects_reply(num, n));
  EXPECT_EQ(validate_reply(make_ack(num, true), num, n).error().code, CodecErrc::wrong_reply);
  num.flags |= kFlagNeedReply;
  ASSERT_TRUE(expects_reply(num, n));
  Message ack = make_ack(num, false);
  EXPECT_TRUE(validate_reply(ack, num, n).has_value());
  EXPECT_EQ(*decode_u64(ack), 1u);
  EXPECT_EQ(*decode_u64(make_ack(num, true)), 0u);
  ack.fds.push_back(eventfd());
  EXPECT_EQ(validate_reply(ack, num, n).error().code, CodecErrc::bad_fd_count);

  // IOTLB_MSG follows its NEED_REPLY flag: QEMU always sets it, DPDK answers only then.
  Message upd = make_request(R::iotlb_msg, IotlbMsg{Iova(0x1000), 0x1000, 0x5000, 3, 2, {}});
  EXPECT_FALSE(has_own_reply(upd, n));
  EXPECT_FALSE(expects_reply(upd, n));
  upd.flags |= kFlagNeedReply;
  ASSERT_TRUE(expects_reply(upd, n));
  EXPECT_TRUE(validate_reply(make_ack(upd, true), upd, n).has_value());

  // GET_CONFIG: as long as the request, or empty for an error.
  const Message cfg = valid_request(R::get_config);
  std::vector<std::uint8_t> content(24, 7);
  auto reply = make_config_reply(cfg, content);
  ASSERT_TRUE(reply.has_value());
  EXPECT_TRUE(validate_reply(*reply, cfg, n).has_value());
  EXPECT_EQ(decode_config(*reply)->bytes()[23], 7);
  EXPECT_TRUE(validate_reply(make_empty_reply(cfg), cfg, n).has_value());
  content.resize(20);
  EXPECT_EQ(make_config_reply(cfg, content).error().code, CodecErrc::bad_size);
  Message shorter = std::move(*reply);
  shorter.payload.resize(20);
  EXPECT_EQ(validate_reply(shorter, cfg, n).error().code, CodecErrc::bad_size);

  // SET_DEVICE_STATE_FD: success with or without an fd, never an error with one.
  const Message state = valid_request(R::set_device_state_fd);
  Message with_fd = make_u64_reply(state, 0);
  with_fd.fds.push_back(eventfd());
  EXPECT_TRUE(validate_reply(with_fd, state, n).has_value());
  EXPECT_TRUE(validate_reply(make_u64_reply(state, kDeviceStateNoFdMask), state, n).has_value());
  EXPECT_EQ(validate_reply(make_u64_reply(state, 0), state, n).error().code,
            CodecErrc::bad_fd_count);
  Message err_fd = make_u64_reply(state, 5);
  err_fd.fds.push_back(eventfd());
  EXPECT_EQ(validate_reply(err_fd, state, n).error().code, CodecErrc::bad_value);

  // GET_INFLIGHT_FD: an fd exactly when there is an area.
  const Message inflight = valid_request(R::get_inflight_fd);
  EXPECT_TRUE(validate_reply(make_reply(inflight, InflightDesc{0, 0, 2, 256, {}}), inflight, n)
                  .has_value());
  Message area = make_reply(inflight, InflightDesc{4096, 0, 2, 256, {}});
  EXPECT_EQ(validate_reply(area, inflight, n).error().code, CodecErrc::bad_fd_count);
  area.fds.push_back(make_memfd(4096));
  EXPECT_TRUE(validate_reply(area, inflight, n).has_value());

  // POSTCOPY_ADVISE answers with the userfaultfd and no payload; GET_SHMEM_CONFIG 2056 bytes.
  const Message advise = valid_request(R::postcopy_advise);
  EXPECT_TRUE(validate_reply(with_fds(make_empty_reply(advise), 1), advise, n).has_value());
  EXPECT_EQ(validate_reply(make_empty_reply(advise), advise, n).error().code,
            CodecErrc::bad_fd_count);
  const Message shmem = valid_request(R::get_shmem_config);
  EXPECT_TRUE(validate_reply(make_reply(shmem, ShmemConfig{}), shmem, n).has_value());
}

TEST(Codec, BackendChannelReplies) {
  Message miss = valid_backend_request(B::iotlb_msg);
  EXPECT_FALSE(expects_backend_reply(miss));
  miss.flags |= kFlagNeedReply;
  ASSERT_TRUE(expects_backend_reply(miss));
  EXPECT_TRUE(validate_backend_reply(make_ack(miss, true), miss).has_value());
  EXPECT_EQ(validate_backend_reply(make_reply(miss, VringState{}), miss).has_value(), true);
  EXPECT_EQ(validate_backend_reply(make_empty_reply(miss), miss).error().code, CodecErrc::bad_size);
  const Message lookup = valid_backend_request(B::shared_object_lookup);
  ASSERT_TRUE(expects_backend_reply(lookup));
  EXPECT_TRUE(validate_backend_reply(with_fds(make_u64_reply(lookup, 0), 1), lookup).has_value());
  EXPECT_TRUE(validate_backend_reply(make_u64_reply(lookup, 1), lookup).has_value());
  EXPECT_EQ(validate_backend_reply(with_fds(make_u64_reply(lookup, 0), 2), lookup).error().code,
            CodecErrc::bad_fd_count);
  const Message change = valid_backend_request(B::config_change_msg);
  EXPECT_EQ(validate_backend_reply(make_ack(change, true), change).error().code,
            CodecErrc::wrong_reply);
}

TEST(Codec, EncodingIsTheWireImage) {
  const Message m =
      make_request(R::set_vring_base, VringState{3, 0x10001}, kVersion | kFlagNeedReply);
  const auto bytes = encode(m);
  ASSERT_EQ(bytes.size(), 12u + 8u);
  const std::uint8_t expect_header[12] = {10, 0, 0, 0, 9, 0, 0, 0, 8, 0, 0, 0};
  EXPECT_EQ(std::memcmp(bytes.data(), expect_header, 12), 0);
  const Header h = decode_header(std::span<const std::uint8_t, kHeaderSize>(bytes.data(), 12));
  EXPECT_EQ(h.request, 10u);
  EXPECT_EQ(h.flags, kVersion | kFlagNeedReply);
  EXPECT_EQ(h.size, 8u);
  auto state = decode_payload<VringState>(m);
  ASSERT_TRUE(state.has_value());
  EXPECT_EQ(state->index, 3u);
  EXPECT_EQ(state->num, 0x10001u);
  EXPECT_EQ(decode_payload<VringAddr>(m).error().code, CodecErrc::bad_size);
  // Replies: version 1 and the reply flag, nothing else.
  EXPECT_EQ(make_ack(m, true).flags, kVersion | kFlagReply);
  EXPECT_EQ(make_ack(m, true).request, m.request);
}

TEST(Codec, ErrorsNameTheRequestAndTheFigures) {
  auto v = validate_frontend_request(table_message(2, 3, 2), {});
  ASSERT_FALSE(v.has_value());
  const CodecError& e = v.error();
  EXPECT_EQ(e.request, 5u);
  EXPECT_EQ(e.actual, 8u + 3 * 32u);
  EXPECT_EQ(e.expected, 8u + 2 * 32u);
  EXPECT_TRUE(e.recoverable());
  const std::string text = e.message();
  EXPECT_NE(text.find("SET_MEM_TABLE"), std::string::npos) << text;
  EXPECT_NE(text.find("104"), std::string::npos) << text;
  EXPECT_NE(text.find("72"), std::string::npos) << text;
  auto b = validate_backend_request(make_backend_request(B::shmem_map, ShmemMap{}), {});
  ASSERT_FALSE(b.has_value());
  EXPECT_NE(b.error().message().find("BACKEND_SHMEM_MAP"), std::string::npos);
  EXPECT_FALSE((CodecError{CodecErrc::truncated}).recoverable());
  EXPECT_FALSE((CodecError{CodecErrc::too_large}).recoverable());
  EXPECT_TRUE((CodecError{CodecErrc::too_many_fds}).recoverable());
}

TEST(Codec, MalformedMessagesLeakNoFds) {
  const std::size_t before = open_fd_count();
  {
    Pair p;
    for (int round = 0; round < 3; ++round) {
      for (R r : all_frontend_requests()) {
        // Each malformed variant, sent over a real socket and refused after reading.
        Message extra = valid_request(r);
        extra.fds.push_back(make_memfd(4096));
        extra.fds.push_back(eventfd());
        Message shorter = valid_request(r);
        shorter.payload.push_back(1);
        Message reply_flag = valid_request(r);
        reply_flag.flags |= kFlagReply;
        for (Message* m : {&extra, &shorter, &reply_flag}) {
          ASSERT_TRUE(write_message(p.a.get(), *m).has_value());
          auto got = read_message(p.b.get());
          ASSERT_TRUE(got.has_value());
          EXPECT_FALSE(validate_frontend_request(*got, {}).has_value());
        }
        // Decoders refuse malformed input and close what they were given.
        Message table = table_message(3, 3, 2);
        EXPECT_FALSE(decode_mem_table(std::move(table), {}).has_value());
        Message bad_kick = with_fds(make_request(R::set_vring_kick, std::uint64_t{1 << 9}), 1);
        EXPECT_FALSE(decode_vring_file(std::move(bad_kick), {}).has_value());
      }
    }
  }
  EXPECT_EQ(open_fd_count(), before);
}

}  // namespace
}  // namespace vhostkit::vhost_user
