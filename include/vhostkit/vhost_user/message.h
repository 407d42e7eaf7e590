// vhostkit/vhost_user/message.h: the vhost-user wire format (QEMU docs/interop/vhost-user.rst),
// the one codec of vhostkit: the back-end server, the front-end client, the migration
// orchestrator, the tools, the fuzz targets and the tests all read and write messages
// through it. Not part of the installed API (docs/api.md).
//
// Concepts
//   Message     one message as it travels on a Unix stream socket: a 12-byte header
//               {request u32, flags u32, size u32} in host byte order, `size` bytes of
//               payload, and up to 8 file descriptors (SCM_RIGHTS) that arrive with the
//               header. A Message owns its fds: dropping it closes them.
//   Channels    the vhost-user socket carries front-end requests and the back-end's
//               replies; the back-end channel (SET_BACKEND_REQ_FD) carries back-end
//               requests and the front-end's replies. Request numbers are per channel
//               (FrontendRequest, BackendRequest).
//   Validation  validate_*() check everything that can be checked without device state:
//               the version, the header flags, a known request number, the exact payload
//               size (or the legal forms, for SET_MEM_TABLE and config space), the exact
//               number of fds. A message that fails is refused whole; the caller drops
//               it and its fds close with it. decode_*() give typed views of validated
//               payloads and also check field values (IOTLB type and permission, config
//               offset, undefined bits of the vring-file word).
//   Negotiated  the features both sides agreed on. They change the layout of memory
//               regions (XEN_MMAP) and what an address field means (GPA_ADDRESSES,
//               VIRTIO_F_ACCESS_PLATFORM): see UserAddress and RingAddress.
//
// Payload structs mirror the C layouts of the specification (natural alignment, no
// packing needed: every field is naturally aligned). Address fields whose meaning is
// fixed use the strong address types; fields whose meaning depends on negotiation stay
// raw and are read through an accessor that takes the Negotiated features.
//
// Socket I/O lives in vhostkit/vhost_user/socket.h.
#pragma once

#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

#include "vhostkit/types.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/virtio_spec.h"

namespace vhostkit::vhost_user {

// ---------------------------------------------------------------------------------------
// Numbers of the specification

// Requests a front-end sends on the vhost-user socket (VHOST_USER_*).
enum class FrontendRequest : std::uint32_t {
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
  set_backend_req_fd = 21,  // previously SET_SLAVE_REQ_FD
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
  get_shared_object = 41,
  set_device_state_fd = 42,
  check_device_state = 43,
  get_shmem_config = 44,
};

// Requests a back-end sends on the back-end channel (VHOST_USER_BACKEND_*, previously
// VHOST_USER_SLAVE_*).
enum class BackendRequest : std::uint32_t {
  none = 0,
  iotlb_msg = 1,
  config_change_msg = 2,
  vring_host_notifier_msg = 3,
  vring_call = 4,
  vring_err = 5,
  shared_object_add = 6,
  shared_object_remove = 7,
  shared_object_lookup = 8,
  shmem_map = 9,
  shmem_unmap = 10,
};

// Protocol feature bits (VHOST_USER_PROTOCOL_F_*), negotiated with
// GET/SET_PROTOCOL_FEATURES.
enum class ProtocolFeature : unsigned {
  mq = 0,
  log_shmfd = 1,
  rarp = 2,
  reply_ack = 3,
  net_mtu = 4,
  backend_req = 5,  // previously SLAVE_REQ
  cross_endian = 6,
  crypto_session = 7,
  pagefault = 8,
  config = 9,
  backend_send_fd = 10,  // previously SLAVE_SEND_FD
  host_notifier = 11,
  inflight_shmfd = 12,
  reset_device = 13,
  inband_notifications = 14,
  configure_mem_slots = 15,
  status = 16,
  xen_mmap = 17,
  shared_object = 18,
  device_state = 19,
  get_vring_base_inflight = 20,
  gpa_addresses = 21,  // address fields carry guest-physical addresses (design.md 4)
  shmem = 22,          // VIRTIO shared memory regions (SHMEM_MAP in some copies)
};

[[nodiscard]] constexpr std::uint64_t bit(ProtocolFeature f) {
  return 1ULL << static_cast<unsigned>(f);
}

// VHOST_USER_F_PROTOCOL_FEATURES: a virtio feature bit (the unused bit 30) that says the
// back-end understands GET/SET_PROTOCOL_FEATURES.
inline constexpr unsigned kFProtocolFeatures = 30;

// Header.
inline constexpr std::size_t kHeaderSize = 12;
inline constexpr std::uint32_t kVersion = 0x1;
inline constexpr std::uint32_t kVersionMask = 0x3;
inline constexpr std::uint32_t kFlagReply = 1u << 2;
inline constexpr std::uint32_t kFlagNeedReply = 1u << 3;
inline constexpr std::uint32_t kKnownFlags = kVersionMask | kFlagReply | kFlagNeedReply;
// The flags of every reply: exactly these (QEMU refuses anything else).
inline constexpr std::uint32_t kReplyFlags = kVersion | kFlagReply;

// Limits.
inline constexpr std::size_t kMaxFds = 8;              // VHOST_MEMORY_BASELINE_NREGIONS
inline constexpr std::size_t kMaxMemTableRegions = 8;  // regions in one SET_MEM_TABLE
inline constexpr std::size_t kMaxConfigSize = 256;     // VHOST_USER_MAX_CONFIG_SIZE
inline constexpr std::size_t kMaxShmemRegions = 256;   // VIRTIO shared memory regions
// No payload is larger than this; a header claiming more is refused before anything is
// allocated. The largest legal payload is GET_SHMEM_CONFIG's reply (2056 bytes).
inline constexpr std::size_t kMaxPayload = 4096;

// The vring-file word of SET_VRING_KICK / CALL / ERR (and the vring area's u64).
inline constexpr std::uint64_t kVringIndexMask = 0xff;
inline constexpr std::uint64_t kVringNoFdMask = 1u << 8;

// VHOST_VRING_F_LOG: bit 0 of VringAddr::flags, "log writes to the used ring".
inline constexpr std::uint32_t kVringFlagLog = 1u << 0;

// VHOST_USER_SET_DEVICE_STATE_FD reply: bit 8 set means "no fd returned".
inline constexpr std::uint64_t kDeviceStateNoFdMask = 1u << 8;

// ---------------------------------------------------------------------------------------
// Negotiated features and what address fields mean

struct Negotiated {
  std::uint64_t features = 0;           // virtio/vhost features acked with SET_FEATURES
  std::uint64_t protocol_features = 0;  // acked with SET_PROTOCOL_FEATURES

  [[nodiscard]] bool has(ProtocolFeature f) const { return (protocol_features & bit(f)) != 0; }
  // VIRTIO_F_ACCESS_PLATFORM (bit 33, formerly IOMMU_PLATFORM): ring addresses are IOVAs.
  [[nodiscard]] bool iommu_platform() const {
    return (features & virtio::bit(virtio::kFAccessPlatform)) != 0;
  }
};

// A "user address" field (memory regions, IOTLB updates): the front-end's own virtual
// address, or with GPA_ADDRESSES a guest-physical address.
using UserAddress = std::variant<Uaddr, Gpa>;
// A ring address (SET_VRING_ADDR descriptor/used/available): an IOVA with
// VIRTIO_F_ACCESS_PLATFORM, otherwise a GPA with GPA_ADDRESSES, otherwise a user address.
using RingAddress = std::variant<Iova, Gpa, Uaddr>;

[[nodiscard]] UserAddress user_address(std::uint64_t raw, const Negotiated& n);
[[nodiscard]] RingAddress ring_address(std::uint64_t raw, const Negotiated& n);

// ---------------------------------------------------------------------------------------
// Payloads (C layouts of the specification)

// A payload type, copied byte for byte: a u64 or one of the layouts below. (Other
// integers are excluded so that a stray `int` never becomes a 4-byte payload.)
template <typename T>
concept WirePayload =
    (std::same_as<T, std::uint64_t> ||
     std::is_class_v<T>)&&std::is_trivially_copyable_v<T>&& std::is_standard_layout_v<T>;

// Vring state description: SET_VRING_NUM / BASE, GET_VRING_BASE (request and reply),
// SET_VRING_ENABLE, SET_VRING_ENDIAN, VRING_KICK, BACKEND_VRING_CALL / ERR.
struct VringState {
  std::uint32_t index;
  std::uint32_t num;
};

// Vring address description (SET_VRING_ADDR). desc/used/avail are read through
// ring_address(); log is the guest-physical address the used ring is logged at.
struct VringAddr {
  std::uint32_t index;
  std::uint32_t flags;  // kVringFlagLog
  std::uint64_t desc;
  std::uint64_t used;
  std::uint64_t avail;
  Gpa log;

  [[nodiscard]] bool logging() const { return (flags & kVringFlagLog) != 0; }
  [[nodiscard]] RingAddress desc_address(const Negotiated& n) const {
    return ring_address(desc, n);
  }
  [[nodiscard]] RingAddress used_address(const Negotiated& n) const {
    return ring_address(used, n);
  }
  [[nodiscard]] RingAddress avail_address(const Negotiated& n) const {
    return ring_address(avail, n);
  }
};

// Memory region description. user_addr is read through user_address().
struct MemRegion {
  Gpa guest_addr;
  std::uint64_t size;
  std::uint64_t user_addr;
  std::uint64_t mmap_offset;

  [[nodiscard]] UserAddress user_address(const Negotiated& n) const {
    return vhost_user::user_address(user_addr, n);
  }
};

// The two fields XEN_MMAP appends to every memory region description.
struct XenMmap {
  std::uint32_t flags;  // bit 0 foreign, bit 1 grant, bit 8 no advance map
  std::uint32_t domid;
};

// Memory region description with XEN_MMAP negotiated.
struct XenMemRegion {
  MemRegion region;
  XenMmap xen;
};

// The fixed part of the multiple memory regions description (SET_MEM_TABLE); the
// regions follow it.
struct MemTableHeader {
  std::uint32_t num_regions;
  std::uint32_t padding;
};

// Single memory region description (ADD_MEM_REG / REM_MEM_REG) without XEN_MMAP.
struct SingleMemRegion {
  std::uint64_t padding;
  MemRegion region;
};

// Log description (SET_LOG_BASE with LOG_SHMFD): `size` bytes of log at `offset` in the fd.
struct LogDesc {
  std::uint64_t size;
  std::uint64_t offset;
};

enum class IotlbType : std::uint8_t { miss = 1, update = 2, invalidate = 3, access_fail = 4 };

// struct vhost_iotlb_msg: 26 bytes of fields, 32 with the C struct's tail padding, which
// is what QEMU and DPDK send. uaddr is read through user_address().
struct IotlbMsg {
  Iova iova;
  std::uint64_t size;
  std::uint64_t uaddr;
  std::uint8_t perm;  // Access: 0 none, 1 read, 2 write, 3 read-write
  std::uint8_t type;  // IotlbType
  std::uint8_t padding[6];
};

// The fixed part of the virtio device config space payload (GET/SET_CONFIG); `size`
// bytes of config space follow it.
struct ConfigHeader {
  std::uint32_t offset;
  std::uint32_t size;
  std::uint32_t flags;  // 0: a writable field, 1: live migration
};

// Vring area description (BACKEND_VRING_HOST_NOTIFIER_MSG). index_and_flags: bits 0-7
// the vring index, bit 8 (kVringNoFdMask) "no fd".
struct VringArea {
  std::uint64_t index_and_flags;
  std::uint64_t size;
  std::uint64_t offset;
};

// Inflight description (GET/SET_INFLIGHT_FD): 20 bytes of fields, 24 with the C
// struct's tail padding, which is what QEMU sends.
struct InflightDesc {
  std::uint64_t mmap_size;
  std::uint64_t mmap_offset;
  std::uint16_t num_queues;
  std::uint16_t queue_size;
  std::uint8_t padding[4];
};

// VhostUserShared: a UUID (GET_SHARED_OBJECT, BACKEND_SHARED_OBJECT_*).
struct SharedObject {
  std::uint8_t uuid[16];
};

// Device state transfer parameters (SET_DEVICE_STATE_FD).
struct DeviceStateTransfer {
  std::uint32_t direction;  // 0 save, 1 load
  std::uint32_t phase;      // 0 stopped
};

// MMAP request (BACKEND_SHMEM_MAP / UNMAP).
struct ShmemMap {
  std::uint8_t shmid;
  std::uint8_t padding[7];
  std::uint64_t fd_offset;
  std::uint64_t shm_offset;
  std::uint64_t len;
  std::uint64_t flags;  // 0 read-only, 1 read-write
};

// VIRTIO shared memory region configuration (GET_SHMEM_CONFIG reply).
struct ShmemConfig {
  std::uint32_t num_regions;
  std::uint32_t padding;
  std::uint64_t mem_sizes[kMaxShmemRegions];
};

static_assert(sizeof(VringState) == 8 && sizeof(VringAddr) == 40);
static_assert(sizeof(MemRegion) == 32 && sizeof(XenMemRegion) == 40);
static_assert(sizeof(MemTableHeader) == 8 && sizeof(SingleMemRegion) == 40);
static_assert(sizeof(LogDesc) == 16 && sizeof(IotlbMsg) == 32 && sizeof(ConfigHeader) == 12);
static_assert(sizeof(VringArea) == 24 && sizeof(InflightDesc) == 24);
static_assert(sizeof(SharedObject) == 16 && sizeof(DeviceStateTransfer) == 8);
static_assert(sizeof(ShmemMap) == 40 && sizeof(ShmemConfig) == 2056);
static_assert(WirePayload<VringAddr> && WirePayload<MemRegion> && WirePayload<IotlbMsg>);

// Size of one memory region description under the negotiated features (32, or 40 with
// XEN_MMAP), and of the single memory region payload (40 or 48).
[[nodiscard]] std::size_t mem_region_size(const Negotiated& n);
[[nodiscard]] std::size_t single_mem_region_size(const Negotiated& n);

// ---------------------------------------------------------------------------------------
// Messages

struct Message {
  std::uint32_t request = 0;  // a FrontendRequest or BackendRequest, by channel
  std::uint32_t flags = kVersion;
  std::vector<std::uint8_t> payload;
  std::vector<UniqueFd> fds;

  [[nodiscard]] std::uint32_t version() const { return flags & kVersionMask; }
  [[nodiscard]] bool is_reply() const { return (flags & kFlagReply) != 0; }
  [[nodiscard]] bool need_reply() const { return (flags & kFlagNeedReply) != 0; }
  [[nodiscard]] FrontendRequest frontend_request() const {
    return static_cast<FrontendRequest>(request);
  }
  [[nodiscard]] BackendRequest backend_request() const {
    return static_cast<BackendRequest>(request);
  }
};

enum class Channel : std::uint8_t {
  main,     // the vhost-user socket: front-end requests, back-end replies
  backend,  // the back-end channel: back-end requests, front-end replies
};

[[nodiscard]] const char* to_string(FrontendRequest r);
[[nodiscard]] const char* to_string(BackendRequest r);
[[nodiscard]] const char* to_string(ProtocolFeature f);
[[nodiscard]] const char* to_string(Channel c);
// The request's name on its channel ("UNKNOWN" for numbers not in the specification).
[[nodiscard]] const char* request_name(Channel c, std::uint32_t request);

// ---------------------------------------------------------------------------------------
// Errors

enum class CodecErrc {
  closed,               // the peer closed the connection at a message boundary
  truncated,            // the connection ended inside a message
  io_error,             // recvmsg/sendmsg failed (sys_errno)
  too_large,            // payload size beyond kMaxPayload (refused before allocating)
  too_many_fds,         // more than kMaxFds fds (the kernel truncated the control data)
  misplaced_fds,        // fds arrived with payload bytes instead of with the header
  bad_version,          // header version is not 1
  bad_flags,            // reply flag on a request, missing on a reply, or undefined bits
  unknown_request,      // request number not in the specification
  unsupported_request,  // in the specification, but its payload has no checkable layout
  bad_size,             // payload size wrong for the request
  bad_fd_count,         // wrong number of fds for the request
  bad_region_count,     // SET_MEM_TABLE announcing more regions than 8
  bad_value,            // a field outside what the specification defines
  wrong_reply,          // a reply to another request than the one outstanding
};

[[nodiscard]] const char* to_string(CodecErrc e);

struct CodecError {
  CodecErrc code;
  Channel channel = Channel::main;
  std::uint32_t request = 0;   // the message's request number (0 before the header)
  std::uint32_t flags = 0;     // the message's header flags (e.g. to honour NEED_REPLY)
  std::uint64_t actual = 0;    // the size, count or value that was wrong (too_many_fds:
                               // the fds that arrived, plus one if the kernel dropped more)
  std::uint64_t expected = 0;  // what was required (the limit, for at_most)
  bool at_most = false;        // expected is an upper bound rather than an exact value
  int sys_errno = 0;           // io_error only

  // One line naming the request, the fault and the figures.
  [[nodiscard]] std::string message() const;
  // True when the stream is still at a message boundary, so the connection can go on
  // (the message was read whole and refused); false after a framing failure.
  [[nodiscard]] bool recoverable() const;
};

// ---------------------------------------------------------------------------------------
// Validation

// A request a front-end sent on the vhost-user socket (what a back-end reads).
[[nodiscard]] Result<void, CodecError> validate_frontend_request(const Message& m,
                                                                 const Negotiated& n);
// A request a back-end sent on the back-end channel (what a front-end reads there).
[[nodiscard]] Result<void, CodecError> validate_backend_request(const Message& m,
                                                                const Negotiated& n);

// Whether `request` (as sent on the vhost-user socket) has a reply of its own, whatever
// its flags say: GET_*, SET_LOG_BASE with LOG_SHMFD, GET_INFLIGHT_FD, ... Not IOTLB_MSG:
// the specification asks for an acknowledgement of every update, but QEMU always sets
// NEED_REPLY on it and DPDK answers only when NEED_REPLY is set, so vhostkit follows the
// flag there (a front-end that sets it gets the ack).
[[nodiscard]] bool has_own_reply(const Message& request, const Negotiated& n);
// Whether `request` is answered: has_own_reply(), or NEED_REPLY on any other request
// (REPLY_ACK).
[[nodiscard]] bool expects_reply(const Message& request, const Negotiated& n);
// Likewise for a back-end request (SHARED_OBJECT_LOOKUP, or NEED_REPLY).
[[nodiscard]] bool expects_backend_reply(const Message& request);

// The reply a back-end sent to `request` on the vhost-user socket: flags exactly
// kReplyFlags, the same request number, the payload and fds that request's reply has
// (a u64 for a REPLY_ACK). REQUIRES: expects_reply(request, n).
[[nodiscard]] Result<void, CodecError> validate_reply(const Message& reply, const Message& request,
                                                      const Negotiated& n);
// The reply a front-end sent to a back-end request on the back-end channel.
[[nodiscard]] Result<void, CodecError> validate_backend_reply(const Message& reply,
                                                              const Message& request);

// ---------------------------------------------------------------------------------------
// Encoding

// The 12 header bytes of m (size = m.payload.size()).
[[nodiscard]] std::array<std::uint8_t, kHeaderSize> encode_header(const Message& m);
// Header and payload as they go on the wire (fds travel beside, not in, the bytes).
[[nodiscard]] std::vector<std::uint8_t> encode(const Message& m);

struct Header {
  std::uint32_t request;
  std::uint32_t flags;
  std::uint32_t size;
};
[[nodiscard]] Header decode_header(std::span<const std::uint8_t, kHeaderSize> bytes);

namespace detail {
template <WirePayload T>
std::vector<std::uint8_t> bytes_of(const T& v) {
  std::vector<std::uint8_t> out(sizeof(T));
  std::memcpy(out.data(), &v, sizeof(T));
  return out;
}
}  // namespace detail

// A front-end request without payload.
[[nodiscard]] inline Message make_request(FrontendRequest r, std::uint32_t flags = kVersion) {
  return Message{static_cast<std::uint32_t>(r), flags, {}, {}};
}
// A front-end request whose payload is `body` (a u64, VringState, VringAddr, IotlbMsg, ...).
template <WirePayload T>
[[nodiscard]] Message make_request(FrontendRequest r, const T& body,
                                   std::uint32_t flags = kVersion) {
  return Message{static_cast<std::uint32_t>(r), flags, detail::bytes_of(body), {}};
}
// SET_MEM_TABLE in the compact form QEMU sends (8 + 32 n bytes), one fd per region.
// Error bad_region_count for more than 8 regions, bad_fd_count if the fds do not match.
[[nodiscard]] Result<Message, CodecError> make_mem_table(std::span<const MemRegion> regions,
                                                         std::vector<UniqueFd> fds,
                                                         std::uint32_t flags = kVersion);
// ADD_MEM_REG (with the region's fd) or REM_MEM_REG (fd must be empty).
[[nodiscard]] Message make_mem_reg(FrontendRequest r, const MemRegion& region, UniqueFd fd = {},
                                   std::uint32_t flags = kVersion);
// SET_LOG_BASE with LOG_SHMFD: the log description and the log's fd.
[[nodiscard]] Message make_log_base(const LogDesc& log, UniqueFd fd,
                                    std::uint32_t flags = kVersion);
// SET_VRING_KICK / CALL / ERR for vring `index`; an invalid fd sends the no-fd flag.
[[nodiscard]] Message make_vring_file(FrontendRequest r, std::uint32_t index, UniqueFd fd,
                                      std::uint32_t flags = kVersion);
// GET_CONFIG / SET_CONFIG: header and `bytes` of config space. Error bad_size for more
// than 256 bytes.
[[nodiscard]] Result<Message, CodecError> make_config(FrontendRequest r, std::uint32_t offset,
                                                      std::uint32_t config_flags,
                                                      std::span<const std::uint8_t> bytes,
                                                      std::uint32_t flags = kVersion);

// A back-end request without payload, or with `body`.
[[nodiscard]] inline Message make_backend_request(BackendRequest r,
                                                  std::uint32_t flags = kVersion) {
  return Message{static_cast<std::uint32_t>(r), flags, {}, {}};
}
template <WirePayload T>
[[nodiscard]] Message make_backend_request(BackendRequest r, const T& body,
                                           std::uint32_t flags = kVersion) {
  return Message{static_cast<std::uint32_t>(r), flags, detail::bytes_of(body), {}};
}

// The reply to `request` carrying `body` (flags kReplyFlags, same request number).
template <WirePayload T>
[[nodiscard]] Message make_reply(const Message& request, const T& body) {
  return Message{request.request, kReplyFlags, detail::bytes_of(body), {}};
}
// The reply to `request` carrying a u64 (GET_FEATURES, GET_QUEUE_NUM, ...).
[[nodiscard]] Message make_u64_reply(const Message& request, std::uint64_t value);
// The REPLY_ACK answer to `request`: u64 0 on success, 1 on failure.
[[nodiscard]] Message make_ack(const Message& request, bool success);
// A reply with no payload (SET_LOG_BASE, as DPDK answers it; GET_CONFIG's error reply).
[[nodiscard]] Message make_empty_reply(const Message& request);
// GET_CONFIG's reply: the config header of `request` and `bytes` (which must be as long
// as the request asked for). Error bad_size otherwise.
[[nodiscard]] Result<Message, CodecError> make_config_reply(const Message& request,
                                                            std::span<const std::uint8_t> bytes);

// ---------------------------------------------------------------------------------------
// Decoding (typed views of validated messages; each re-checks the layout it reads).
// Decoders of fd-carrying requests take the message by value: whatever fds they do not
// hand back (all of them, on error) are closed when they return.

// The payload as T. Error bad_size unless the payload is exactly sizeof(T) bytes.
template <WirePayload T>
[[nodiscard]] Result<T, CodecError> decode_payload(const Message& m, Channel c = Channel::main) {
  if (m.payload.size() != sizeof(T)) {
    return unexpected(
        CodecError{CodecErrc::bad_size, c, m.request, m.flags, m.payload.size(), sizeof(T)});
  }
  T v;
  std::memcpy(&v, m.payload.data(), sizeof(T));
  return v;
}
[[nodiscard]] inline Result<std::uint64_t, CodecError> decode_u64(const Message& m,
                                                                  Channel c = Channel::main) {
  return decode_payload<std::uint64_t>(m, c);
}

// One region of a memory table, with its fd.
struct RegionWithFd {
  MemRegion region;
  std::optional<XenMmap> xen;  // with XEN_MMAP only
  UniqueFd fd;                 // invalid for REM_MEM_REG (a stray fd there is closed)
};

// SET_MEM_TABLE: the announced regions in order, each with its fd.
[[nodiscard]] Result<std::vector<RegionWithFd>, CodecError> decode_mem_table(Message m,
                                                                             const Negotiated& n);
// ADD_MEM_REG / REM_MEM_REG.
[[nodiscard]] Result<RegionWithFd, CodecError> decode_mem_reg(Message m, const Negotiated& n);

struct LogBase {
  LogDesc log;
  UniqueFd fd;
};
// SET_LOG_BASE (LOG_SHMFD form).
[[nodiscard]] Result<LogBase, CodecError> decode_log_base(Message m, const Negotiated& n);

struct VringFile {
  std::uint32_t index;
  UniqueFd fd;  // invalid when the no-fd flag was set (poll instead)
};
// SET_VRING_KICK / CALL / ERR.
[[nodiscard]] Result<VringFile, CodecError> decode_vring_file(Message m, const Negotiated& n);

// An IOTLB message with its fields typed. target is meaningful for updates, perm for
// updates, misses and access failures.
struct IotlbEvent {
  IotlbType type;
  Iova iova;
  std::uint64_t size;
  UserAddress target;
  Access perm;
};
// IOTLB_MSG on the vhost-user socket (update or invalidate) or BACKEND_IOTLB_MSG on the
// back-end channel (miss or access failure). Error bad_value for another type or a
// permission above read-write.
[[nodiscard]] Result<IotlbEvent, CodecError> decode_iotlb(const Message& m, Channel c,
                                                          const Negotiated& n);

struct ConfigSpace {
  std::uint32_t offset = 0;
  std::uint32_t size = 0;
  std::uint32_t flags = 0;
  std::array<std::uint8_t, kMaxConfigSize> data{};

  [[nodiscard]] std::span<const std::uint8_t> bytes() const { return {data.data(), size}; }
};
// GET_CONFIG / SET_CONFIG request, or GET_CONFIG's (non-empty) reply. Error bad_value for
// flags other than 0 and 1. The offset is the device's to check against its config size.
[[nodiscard]] Result<ConfigSpace, CodecError> decode_config(const Message& m);

}  // namespace vhostkit::vhost_user
