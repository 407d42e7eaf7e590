// vhostkit/vhost_user/wire.h: the vhost-user wire format (QEMU docs/interop/vhost-user.rst).
//
// Concepts
//   Message   a 12-byte header {request, flags, size}, a payload of `size` bytes and up to
//             8 file descriptors passed with SCM_RIGHTS. Numbers are in host byte order.
//   validate  strict per-request checks of what a front-end may send a back-end: the
//             exact payload size (or the legal range, for SET_MEM_TABLE and config
//             space), the number of fds, the version, the reply flag. A message that
//             fails is rejected whole and its fds are closed.
//   Channel   read_message()/write_message() move whole messages over a Unix stream
//             socket; the fds of a message arrive with its header.
//
// The payload structs mirror the C layouts of the specification (natural alignment; no
// packing is needed because every field is naturally aligned).
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "vhostkit/types.h"
#include "vhostkit/unique_fd.h"

namespace vhostkit::vhost_user {

// Front-end requests.
enum class Request : std::uint32_t {
  none = 0,
  get_features = 1,
  set_features = 2,
  set_owner = 3,
  reset_owner = 4,
  set_mem_table = 5,
  set_log_base = 6,
  set_log_fd = 7,
  set_vring_num = 8,
  set_vring_addr = 9,
  set_vring_base = 10,
  get_vring_base = 11,
  set_vring_kick = 12,
  set_vring_call = 13,
  set_vring_err = 14,
  get_protocol_features = 15,
  set_protocol_features = 16,
  get_queue_num = 17,
  set_vring_enable = 18,
  send_rarp = 19,
  net_set_mtu = 20,
  set_backend_req_fd = 21,
  iotlb_msg = 22,
  set_vring_endian = 23,
  get_config = 24,
  set_config = 25,
  create_crypto_session = 26,
  close_crypto_session = 27,
  postcopy_advise = 28,
  postcopy_listen = 29,
  postcopy_end = 30,
  get_inflight_fd = 31,
  set_inflight_fd = 32,
  gpu_set_socket = 33,
  reset_device = 34,
  vring_kick = 35,
  get_max_mem_slots = 36,
  add_mem_reg = 37,
  rem_mem_reg = 38,
  set_status = 39,
  get_status = 40,
  max_known = 40,
};

// Back-end requests (on the back-end request channel).
enum class BackendRequest : std::uint32_t {
  iotlb_msg = 1,
  config_change_msg = 2,
  vring_host_notifier_msg = 3,
};

[[nodiscard]] const char* to_string(Request r);

// Protocol feature bits (VHOST_USER_PROTOCOL_F_*).
namespace protocol {
inline constexpr unsigned kMq = 0;
inline constexpr unsigned kLogShmfd = 1;
inline constexpr unsigned kRarp = 2;
inline constexpr unsigned kReplyAck = 3;
inline constexpr unsigned kMtu = 4;
inline constexpr unsigned kBackendReq = 5;
inline constexpr unsigned kCrossEndian = 6;
inline constexpr unsigned kCryptoSession = 7;
inline constexpr unsigned kPagefault = 8;
inline constexpr unsigned kConfig = 9;
inline constexpr unsigned kBackendSendFd = 10;
inline constexpr unsigned kHostNotifier = 11;
inline constexpr unsigned kInflightShmfd = 12;
inline constexpr unsigned kResetDevice = 13;
inline constexpr unsigned kInbandNotifications = 14;
inline constexpr unsigned kConfigureMemSlots = 15;
inline constexpr unsigned kStatus = 16;
inline constexpr unsigned kXenMmap = 17;
inline constexpr unsigned kSharedObject = 18;
inline constexpr unsigned kDeviceState = 19;
inline constexpr unsigned kGetVringBaseInflight = 20;
inline constexpr unsigned kGpaAddresses = 21;  // the IOTLB-GPA extension (design.md 4)
inline constexpr unsigned kShmem = 22;
}  // namespace protocol

// VHOST_USER_F_PROTOCOL_FEATURES, a virtio feature bit.
inline constexpr unsigned kFProtocolFeatures = 30;

inline constexpr std::uint32_t kVersion = 0x1;
inline constexpr std::uint32_t kVersionMask = 0x3;
inline constexpr std::uint32_t kFlagReply = 1u << 2;
inline constexpr std::uint32_t kFlagNeedReply = 1u << 3;
inline constexpr std::uint64_t kVringIndexMask = 0xff;
inline constexpr std::uint64_t kVringNoFd = 1u << 8;
inline constexpr std::uint32_t kVringFLog = 1;  // VHOST_VRING_F_LOG in vring addr flags
inline constexpr std::size_t kMaxFds = 8;       // VHOST_MEMORY_BASELINE_NREGIONS
inline constexpr std::size_t kHeaderSize = 12;
inline constexpr std::size_t kMaxConfigSize = 256;

// IOTLB message types and the iotlb payload.
inline constexpr std::uint8_t kIotlbMiss = 1;
inline constexpr std::uint8_t kIotlbUpdate = 2;
inline constexpr std::uint8_t kIotlbInvalidate = 3;
inline constexpr std::uint8_t kIotlbAccessFail = 4;

struct VringState {
  std::uint32_t index;
  std::uint32_t num;
};
struct VringAddr {
  std::uint32_t index;
  std::uint32_t flags;
  std::uint64_t desc;
  std::uint64_t used;
  std::uint64_t avail;
  std::uint64_t log;
};
struct MemRegion {
  std::uint64_t gpa;
  std::uint64_t size;
  std::uint64_t uaddr;
  std::uint64_t mmap_offset;
};
struct MemTableHeader {
  std::uint32_t nregions;
  std::uint32_t padding;
};
struct SingleMemRegion {
  std::uint64_t padding;
  MemRegion region;
};
struct LogDesc {
  std::uint64_t size;
  std::uint64_t offset;
};
struct IotlbMsg {  // struct vhost_iotlb_msg
  std::uint64_t iova;
  std::uint64_t size;
  std::uint64_t uaddr;
  std::uint8_t perm;
  std::uint8_t type;
  std::uint8_t reserved[6];
};
struct ConfigHeader {
  std::uint32_t offset;
  std::uint32_t size;
  std::uint32_t flags;
};
static_assert(sizeof(VringAddr) == 40 && sizeof(MemRegion) == 32 && sizeof(IotlbMsg) == 32);
static_assert(sizeof(SingleMemRegion) == 40 && sizeof(ConfigHeader) == 12);

struct Message {
  std::uint32_t request = 0;
  std::uint32_t flags = kVersion;
  std::vector<std::uint8_t> payload;
  std::vector<UniqueFd> fds;

  [[nodiscard]] Request req() const { return static_cast<Request>(request); }
  [[nodiscard]] bool need_reply() const { return (flags & kFlagNeedReply) != 0; }
  // The payload as T. REQUIRES: payload.size() >= sizeof(T) (validate() checked it).
  template <typename T>
  [[nodiscard]] T as(std::size_t offset = 0) const {
    static_assert(std::is_trivially_copyable_v<T>);
    T v{};
    if (offset + sizeof(T) <= payload.size()) std::memcpy(&v, payload.data() + offset, sizeof(T));
    return v;
  }
  [[nodiscard]] std::uint64_t u64() const { return as<std::uint64_t>(); }

  template <typename T>
  static Message make(std::uint32_t request, const T& body, std::uint32_t flags = kVersion) {
    static_assert(std::is_trivially_copyable_v<T>);
    Message m;
    m.request = request;
    m.flags = flags;
    m.payload.resize(sizeof(T));
    std::memcpy(m.payload.data(), &body, sizeof(T));
    return m;
  }
  static Message make_empty(std::uint32_t request, std::uint32_t flags = kVersion) {
    Message m;
    m.request = request;
    m.flags = flags;
    return m;
  }
};

enum class CodecErrc {
  closed,            // the peer closed the connection (EOF at a message boundary)
  io_error,          // read/write failed (errno in the error)
  truncated,         // EOF in the middle of a message
  bad_version,       // header version is not 1
  unexpected_flags,  // a request carrying the reply flag, or a reply without it
  unknown_request,   // request number not in the specification
  bad_size,          // payload size wrong for the request
  too_large,         // payload size beyond any legal message
  bad_fd_count,      // wrong number of fds for the request
  too_many_fds,      // more fds than a message may carry (the kernel truncated them)
};

[[nodiscard]] const char* to_string(CodecErrc e);

struct CodecError {
  CodecErrc code;
  std::uint32_t request = 0;
  std::uint64_t value = 0;  // the size or count that was wrong
  int sys_errno = 0;
  [[nodiscard]] std::string message() const;
};

// Checks a message a front-end sent to a back-end. On error the caller drops the
// message (its fds close with it).
[[nodiscard]] Result<void, CodecError> validate_request(const Message& m);
// Checks a reply a back-end sent for request `to`.
[[nodiscard]] Result<void, CodecError> validate_reply(const Message& m, Request to);

// Reads one whole message. Blocks. Error closed on EOF before the first header byte.
[[nodiscard]] Result<Message, CodecError> read_message(int fd);
// Writes one whole message with its fds (the fds stay owned by the message).
[[nodiscard]] Result<void, CodecError> write_message(int fd, const Message& m);
// As write_message, but if the socket cannot take the message's first byte now, returns
// io_error with EAGAIN and writes nothing. Once a first part is sent, the rest is sent
// blocking, so the stream never holds half a message.
[[nodiscard]] Result<void, CodecError> try_write_message(int fd, const Message& m);

}  // namespace vhostkit::vhost_user
