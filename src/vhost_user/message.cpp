// vhost-user wire format: per-request layouts, validation, typed encoders and decoders.
#include "vhostkit/vhost_user/message.h"

#include <cstring>
#include <string>

#include <fmt/format.h>

namespace vhostkit::vhost_user {

UserAddress user_address(std::uint64_t raw, const Negotiated& n) {
  if (n.has(ProtocolFeature::gpa_addresses)) return Gpa(raw);
  return Uaddr(raw);
}

RingAddress ring_address(std::uint64_t raw, const Negotiated& n) {
  if (n.iommu_platform()) return Iova(raw);
  if (n.has(ProtocolFeature::gpa_addresses)) return Gpa(raw);
  return Uaddr(raw);
}

std::size_t mem_region_size(const Negotiated& n) {
  return n.has(ProtocolFeature::xen_mmap) ? sizeof(XenMemRegion) : sizeof(MemRegion);
}

std::size_t single_mem_region_size(const Negotiated& n) {
  return sizeof(std::uint64_t) + mem_region_size(n);
}

const char* to_string(FrontendRequest r) {
  switch (r) {
    case FrontendRequest::none: return "NONE";
    case FrontendRequest::get_features: return "GET_FEATURES";
    case FrontendRequest::set_features: return "SET_FEATURES";
    case FrontendRequest::set_owner: return "SET_OWNER";
    case FrontendRequest::reset_owner: return "RESET_OWNER";
    case FrontendRequest::set_mem_table: return "SET_MEM_TABLE";
    case FrontendRequest::set_log_base: return "SET_LOG_BASE";
    case FrontendRequest::set_log_fd: return "SET_LOG_FD";
    case FrontendRequest::set_vring_num: return "SET_VRING_NUM";
    case FrontendRequest::set_vring_addr: return "SET_VRING_ADDR";
    case FrontendRequest::set_vring_base: return "SET_VRING_BASE";
    case FrontendRequest::get_vring_base: return "GET_VRING_BASE";
    case FrontendRequest::set_vring_kick: return "SET_VRING_KICK";
    case FrontendRequest::set_vring_call: return "SET_VRING_CALL";
    case FrontendRequest::set_vring_err: return "SET_VRING_ERR";
    case FrontendRequest::get_protocol_features: return "GET_PROTOCOL_FEATURES";
    case FrontendRequest::set_protocol_features: return "SET_PROTOCOL_FEATURES";
    case FrontendRequest::get_queue_num: return "GET_QUEUE_NUM";
    case FrontendRequest::set_vring_enable: return "SET_VRING_ENABLE";
    case FrontendRequest::send_rarp: return "SEND_RARP";
    case FrontendRequest::net_set_mtu: return "NET_SET_MTU";
    case FrontendRequest::set_backend_req_fd: return "SET_BACKEND_REQ_FD";
    case FrontendRequest::iotlb_msg: return "IOTLB_MSG";
    case FrontendRequest::set_vring_endian: return "SET_VRING_ENDIAN";
    case FrontendRequest::get_config: return "GET_CONFIG";
    case FrontendRequest::set_config: return "SET_CONFIG";
    case FrontendRequest::create_crypto_session: return "CREATE_CRYPTO_SESSION";
    case FrontendRequest::close_crypto_session: return "CLOSE_CRYPTO_SESSION";
    case FrontendRequest::postcopy_advise: return "POSTCOPY_ADVISE";
    case FrontendRequest::postcopy_listen: return "POSTCOPY_LISTEN";
    case FrontendRequest::postcopy_end: return "POSTCOPY_END";
    case FrontendRequest::get_inflight_fd: return "GET_INFLIGHT_FD";
    case FrontendRequest::set_inflight_fd: return "SET_INFLIGHT_FD";
    case FrontendRequest::gpu_set_socket: return "GPU_SET_SOCKET";
    case FrontendRequest::reset_device: return "RESET_DEVICE";
    case FrontendRequest::vring_kick: return "VRING_KICK";
    case FrontendRequest::get_max_mem_slots: return "GET_MAX_MEM_SLOTS";
    case FrontendRequest::add_mem_reg: return "ADD_MEM_REG";
    case FrontendRequest::rem_mem_reg: return "REM_MEM_REG";
    case FrontendRequest::set_status: return "SET_STATUS";
    case FrontendRequest::get_status: return "GET_STATUS";
    case FrontendRequest::get_shared_object: return "GET_SHARED_OBJECT";
    case FrontendRequest::set_device_state_fd: return "SET_DEVICE_STATE_FD";
    case FrontendRequest::check_device_state: return "CHECK_DEVICE_STATE";
    case FrontendRequest::get_shmem_config: return "GET_SHMEM_CONFIG";
  }
  return "UNKNOWN";
}

const char* to_string(BackendRequest r) {
  switch (r) {
    case BackendRequest::none: return "BACKEND_NONE";
    case BackendRequest::iotlb_msg: return "BACKEND_IOTLB_MSG";
    case BackendRequest::config_change_msg: return "BACKEND_CONFIG_CHANGE_MSG";
    case BackendRequest::vring_host_notifier_msg: return "BACKEND_VRING_HOST_NOTIFIER_MSG";
    case BackendRequest::vring_call: return "BACKEND_VRING_CALL";
    case BackendRequest::vring_err: return "BACKEND_VRING_ERR";
    case BackendRequest::shared_object_add: return "BACKEND_SHARED_OBJECT_ADD";
    case BackendRequest::shared_object_remove: return "BACKEND_SHARED_OBJECT_REMOVE";
    case BackendRequest::shared_object_lookup: return "BACKEND_SHARED_OBJECT_LOOKUP";
    case BackendRequest::shmem_map: return "BACKEND_SHMEM_MAP";
    case BackendRequest::shmem_unmap: return "BACKEND_SHMEM_UNMAP";
  }
  return "UNKNOWN";
}

const char* to_string(ProtocolFeature f) {
  switch (f) {
    case ProtocolFeature::mq: return "MQ";
    case ProtocolFeature::log_shmfd: return "LOG_SHMFD";
    case ProtocolFeature::rarp: return "RARP";
    case ProtocolFeature::reply_ack: return "REPLY_ACK";
    case ProtocolFeature::net_mtu: return "NET_MTU";
    case ProtocolFeature::backend_req: return "BACKEND_REQ";
    case ProtocolFeature::cross_endian: return "CROSS_ENDIAN";
    case ProtocolFeature::crypto_session: return "CRYPTO_SESSION";
    case ProtocolFeature::pagefault: return "PAGEFAULT";
    case ProtocolFeature::config: return "CONFIG";
    case ProtocolFeature::backend_send_fd: return "BACKEND_SEND_FD";
    case ProtocolFeature::host_notifier: return "HOST_NOTIFIER";
    case ProtocolFeature::inflight_shmfd: return "INFLIGHT_SHMFD";
    case ProtocolFeature::reset_device: return "RESET_DEVICE";
    case ProtocolFeature::inband_notifications: return "INBAND_NOTIFICATIONS";
    case ProtocolFeature::configure_mem_slots: return "CONFIGURE_MEM_SLOTS";
    case ProtocolFeature::status: return "STATUS";
    case ProtocolFeature::xen_mmap: return "XEN_MMAP";
    case ProtocolFeature::shared_object: return "SHARED_OBJECT";
    case ProtocolFeature::device_state: return "DEVICE_STATE";
    case ProtocolFeature::get_vring_base_inflight: return "GET_VRING_BASE_INFLIGHT";
    case ProtocolFeature::gpa_addresses: return "GPA_ADDRESSES";
    case ProtocolFeature::shmem: return "SHMEM";
  }
  return "UNKNOWN";
}

const char* to_string(Channel c) {
  return c == Channel::backend ? "back-end channel" : "vhost-user socket";
}

const char* request_name(Channel c, std::uint32_t request) {
  return c == Channel::backend ? to_string(static_cast<BackendRequest>(request))
                               : to_string(static_cast<FrontendRequest>(request));
}

const char* to_string(CodecErrc e) {
  switch (e) {
    case CodecErrc::closed: return "connection closed";
    case CodecErrc::truncated: return "connection closed inside a message";
    case CodecErrc::io_error: return "socket error";
    case CodecErrc::too_large: return "payload too large";
    case CodecErrc::too_many_fds: return "too many file descriptors";
    case CodecErrc::misplaced_fds: return "file descriptors sent with the payload";
    case CodecErrc::bad_version: return "bad protocol version";
    case CodecErrc::bad_flags: return "bad header flags";
    case CodecErrc::unknown_request: return "unknown or unexpected request";
    case CodecErrc::unsupported_request: return "request without a checkable layout";
    case CodecErrc::bad_size: return "wrong payload size";
    case CodecErrc::bad_fd_count: return "wrong number of file descriptors";
    case CodecErrc::bad_region_count: return "too many memory regions";
    case CodecErrc::bad_value: return "field value outside the specification";
    case CodecErrc::wrong_reply: return "reply does not answer the request";
  }
  return "unknown codec error";
}

std::string CodecError::message() const {
  std::string m = fmt::format("{} [{}] on the {}: {}", request_name(channel, request), request,
                              to_string(channel), to_string(code));
  switch (code) {
    case CodecErrc::closed: break;
    case CodecErrc::io_error: m += fmt::format(": {}", std::strerror(sys_errno)); break;
    case CodecErrc::truncated: m += fmt::format(" (had {} of {} bytes)", actual, expected); break;
    case CodecErrc::bad_flags:
    case CodecErrc::bad_value: m += fmt::format(" ({:#x})", actual); break;
    case CodecErrc::unknown_request:
    case CodecErrc::unsupported_request: break;
    case CodecErrc::wrong_reply:
      if (expected == 0) {
        m += " (the request asked for no reply)";
      } else {
        m += fmt::format(" (reply to {}, expected {})", actual, expected);
      }
      break;
    default:
      m += fmt::format(" (got {}, expected {}{})", actual, at_most ? "at most " : "", expected);
      break;
  }
  return m;
}

bool CodecError::recoverable() const {
  switch (code) {
    case CodecErrc::closed:
    case CodecErrc::truncated:
    case CodecErrc::io_error:
    case CodecErrc::too_large: return false;
    default: return true;
  }
}

namespace {

using Check = Result<void, CodecError>;

CodecError fail(Channel c, const Message& m, CodecErrc code, std::uint64_t actual = 0,
                std::uint64_t expected = 0, bool at_most = false) {
  return CodecError{code, c, m.request, m.flags, actual, expected, at_most, 0};
}

Check size_is(Channel c, const Message& m, std::size_t size) {
  if (m.payload.size() != size)
    return unexpected(fail(c, m, CodecErrc::bad_size, m.payload.size(), size));
  return {};
}

Check fds_are(Channel c, const Message& m, std::size_t count) {
  if (m.fds.size() != count)
    return unexpected(fail(c, m, CodecErrc::bad_fd_count, m.fds.size(), count));
  return {};
}

Check fds_at_most(Channel c, const Message& m, std::size_t count) {
  if (m.fds.size() > count)
    return unexpected(fail(c, m, CodecErrc::bad_fd_count, m.fds.size(), count, true));
  return {};
}

Check exactly(Channel c, const Message& m, std::size_t size, std::size_t fds) {
  if (auto r = size_is(c, m, size); !r) return r;
  return fds_are(c, m, fds);
}

std::uint64_t u64_at(const Message& m, std::size_t offset = 0) {
  std::uint64_t v = 0;
  std::memcpy(&v, m.payload.data() + offset, sizeof v);
  return v;
}

// Version 1, no reply flag, no undefined flag bits, sizes within the framing limits.
Check request_header(Channel c, const Message& m) {
  if (m.version() != kVersion)
    return unexpected(fail(c, m, CodecErrc::bad_version, m.version(), kVersion));
  if ((m.flags & kFlagReply) != 0 || (m.flags & ~kKnownFlags) != 0)
    return unexpected(fail(c, m, CodecErrc::bad_flags, m.flags));
  if (m.payload.size() > kMaxPayload)
    return unexpected(fail(c, m, CodecErrc::too_large, m.payload.size(), kMaxPayload, true));
  if (m.fds.size() > kMaxFds)
    return unexpected(fail(c, m, CodecErrc::too_many_fds, m.fds.size(), kMaxFds, true));
  return {};
}

// Exactly kReplyFlags, and the number of the request it answers.
Check reply_header(Channel c, const Message& reply, const Message& request) {
  if (reply.version() != kVersion)
    return unexpected(fail(c, reply, CodecErrc::bad_version, reply.version(), kVersion));
  if (reply.flags != kReplyFlags)
    return unexpected(fail(c, reply, CodecErrc::bad_flags, reply.flags));
  if (reply.request != request.request)
    return unexpected(fail(c, reply, CodecErrc::wrong_reply, reply.request, request.request));
  if (reply.payload.size() > kMaxPayload)
    return unexpected(
        fail(c, reply, CodecErrc::too_large, reply.payload.size(), kMaxPayload, true));
  if (reply.fds.size() > kMaxFds)
    return unexpected(fail(c, reply, CodecErrc::too_many_fds, reply.fds.size(), kMaxFds, true));
  return {};
}

// SET_MEM_TABLE: 8 + n * region bytes (QEMU's compact form) or 8 + 8 * region bytes (the
// specification's figure: the whole 8-region array, unused slots ignored); n <= 8 fds.
Check mem_table(const Message& m, const Negotiated& n) {
  constexpr Channel c = Channel::main;
  if (m.payload.size() < sizeof(MemTableHeader))
    return unexpected(fail(c, m, CodecErrc::bad_size, m.payload.size(), sizeof(MemTableHeader)));
  MemTableHeader h;
  std::memcpy(&h, m.payload.data(), sizeof h);
  if (h.num_regions > kMaxMemTableRegions)
    return unexpected(
        fail(c, m, CodecErrc::bad_region_count, h.num_regions, kMaxMemTableRegions, true));
  const std::size_t stride = mem_region_size(n);
  const std::size_t compact = sizeof(MemTableHeader) + h.num_regions * stride;
  const std::size_t padded = sizeof(MemTableHeader) + kMaxMemTableRegions * stride;
  if (m.payload.size() != compact && m.payload.size() != padded)
    return unexpected(fail(c, m, CodecErrc::bad_size, m.payload.size(), compact));
  return fds_are(c, m, h.num_regions);
}

// The vring-file word: bits 0-7 the index, bit 8 "no fd", nothing else. One fd unless
// the no-fd bit is set.
Check vring_file(const Message& m) {
  constexpr Channel c = Channel::main;
  if (auto r = size_is(c, m, sizeof(std::uint64_t)); !r) return r;
  const std::uint64_t word = u64_at(m);
  if ((word & ~(kVringIndexMask | kVringNoFdMask)) != 0)
    return unexpected(fail(c, m, CodecErrc::bad_value, word));
  return fds_are(c, m, (word & kVringNoFdMask) != 0 ? 0 : 1);
}

// Config space: the 12-byte header and exactly `size` bytes, size <= 256.
Check config_space(Channel c, const Message& m) {
  if (m.payload.size() < sizeof(ConfigHeader))
    return unexpected(fail(c, m, CodecErrc::bad_size, m.payload.size(), sizeof(ConfigHeader)));
  ConfigHeader h;
  std::memcpy(&h, m.payload.data(), sizeof h);
  if (h.size > kMaxConfigSize)
    return unexpected(fail(c, m, CodecErrc::bad_size, h.size, kMaxConfigSize, true));
  return size_is(c, m, sizeof(ConfigHeader) + h.size);
}

Check frontend_layout(const Message& m, const Negotiated& n) {
  constexpr Channel c = Channel::main;
  using R = FrontendRequest;
  switch (m.frontend_request()) {
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
    case R::get_shmem_config: return exactly(c, m, 0, 0);
    case R::set_features:
    case R::set_protocol_features:
    case R::send_rarp:
    case R::net_set_mtu:
    case R::close_crypto_session:
    case R::set_status: return exactly(c, m, sizeof(std::uint64_t), 0);
    case R::set_mem_table: return mem_table(m, n);
    case R::set_log_base: return exactly(c, m, sizeof(LogDesc), 1);
    case R::set_log_fd:
    case R::set_backend_req_fd:
    case R::gpu_set_socket: return exactly(c, m, 0, 1);
    case R::set_vring_num:
    case R::set_vring_base:
    case R::get_vring_base:
    case R::set_vring_enable:
    case R::set_vring_endian:
    case R::vring_kick: return exactly(c, m, sizeof(VringState), 0);
    case R::set_vring_addr: return exactly(c, m, sizeof(VringAddr), 0);
    case R::set_vring_kick:
    case R::set_vring_call:
    case R::set_vring_err: return vring_file(m);
    case R::iotlb_msg: return exactly(c, m, sizeof(IotlbMsg), 0);
    case R::get_config:
    case R::set_config: {
      if (auto r = config_space(c, m); !r) return r;
      return fds_are(c, m, 0);
    }
    case R::get_inflight_fd: return exactly(c, m, sizeof(InflightDesc), 0);
    case R::set_inflight_fd: return exactly(c, m, sizeof(InflightDesc), 1);
    case R::add_mem_reg: return exactly(c, m, single_mem_region_size(n), 1);
    case R::rem_mem_reg: {
      // No fd SHOULD be sent; the specification lets a back-end accept (and close) one
      // for the sake of front-ends that sent the region's fd.
      if (auto r = size_is(c, m, single_mem_region_size(n)); !r) return r;
      return fds_at_most(c, m, 1);
    }
    case R::get_shared_object: return exactly(c, m, sizeof(SharedObject), 0);
    case R::set_device_state_fd: return exactly(c, m, sizeof(DeviceStateTransfer), 1);
    case R::create_crypto_session:
      // The payload is QEMU's internal session structure, which the specification does
      // not lay out; nothing here can check it.
      return unexpected(fail(c, m, CodecErrc::unsupported_request));
    case R::none: break;
  }
  return unexpected(fail(c, m, CodecErrc::unknown_request, m.request));
}

Check backend_layout(const Message& m) {
  constexpr Channel c = Channel::backend;
  using R = BackendRequest;
  switch (m.backend_request()) {
    case R::iotlb_msg: return exactly(c, m, sizeof(IotlbMsg), 0);
    case R::config_change_msg: return exactly(c, m, 0, 0);
    case R::vring_host_notifier_msg: {
      if (auto r = size_is(c, m, sizeof(VringArea)); !r) return r;
      const std::uint64_t word = u64_at(m);
      if ((word & ~(kVringIndexMask | kVringNoFdMask)) != 0)
        return unexpected(fail(c, m, CodecErrc::bad_value, word));
      return fds_are(c, m, (word & kVringNoFdMask) != 0 ? 0 : 1);
    }
    case R::vring_call:
    case R::vring_err: return exactly(c, m, sizeof(VringState), 0);
    case R::shared_object_add:
    case R::shared_object_remove:
    case R::shared_object_lookup: return exactly(c, m, sizeof(SharedObject), 0);
    case R::shmem_map: return exactly(c, m, sizeof(ShmemMap), 1);
    case R::shmem_unmap: return exactly(c, m, sizeof(ShmemMap), 0);
    case R::none: break;
  }
  return unexpected(fail(c, m, CodecErrc::unknown_request, m.request));
}

}  // namespace

bool has_own_reply(const Message& request, const Negotiated& n) {
  using R = FrontendRequest;
  switch (request.frontend_request()) {
    case R::get_features:
    case R::get_protocol_features:
    case R::get_vring_base:
    case R::get_queue_num:
    case R::get_config:
    case R::postcopy_advise:
    case R::postcopy_end:
    case R::get_inflight_fd:
    case R::get_max_mem_slots:
    case R::get_status:
    case R::get_shared_object:
    case R::set_device_state_fd:
    case R::check_device_state:
    case R::get_shmem_config: return true;
    case R::set_log_base: return n.has(ProtocolFeature::log_shmfd);
    default: return false;
  }
}

namespace {

Check reply_layout(const Message& reply, const Message& request, const Negotiated& n) {
  constexpr Channel c = Channel::main;
  using R = FrontendRequest;
  if (!has_own_reply(request, n)) {
    if (!request.need_reply())
      return unexpected(fail(c, reply, CodecErrc::wrong_reply, reply.request, 0));
    return exactly(c, reply, sizeof(std::uint64_t), 0);  // REPLY_ACK
  }
  switch (request.frontend_request()) {
    case R::get_vring_base: return exactly(c, reply, sizeof(VringState), 0);
    case R::get_config: {
      // Same size as the request, or empty to report an error.
      if (auto r = fds_are(c, reply, 0); !r) return r;
      if (reply.payload.empty()) return {};
      return size_is(c, reply, request.payload.size());
    }
    case R::set_log_base: {
      // QEMU reads a reply without looking at it; DPDK sends none, libvhost-user a u64.
      if (auto r = fds_are(c, reply, 0); !r) return r;
      if (reply.payload.empty()) return {};
      return size_is(c, reply, sizeof(std::uint64_t));
    }
    case R::postcopy_advise: return exactly(c, reply, 0, 1);  // the userfaultfd
    case R::get_inflight_fd: {
      if (auto r = size_is(c, reply, sizeof(InflightDesc)); !r) return r;
      return fds_are(c, reply, u64_at(reply) == 0 ? 0 : 1);  // no area, no fd
    }
    case R::get_shared_object: {
      // libvhost-user echoes the UUID, others answer a u64; the dma-buf fd if found.
      const bool u64 = reply.payload.size() == sizeof(std::uint64_t);
      if (!u64) {
        if (auto r = size_is(c, reply, sizeof(SharedObject)); !r) return r;
      }
      return fds_at_most(c, reply, 1);
    }
    case R::set_device_state_fd: {
      if (auto r = size_is(c, reply, sizeof(std::uint64_t)); !r) return r;
      const std::uint64_t v = u64_at(reply);
      const bool fd = (v & kDeviceStateNoFdMask) == 0;
      // An error (bits 0-7) must not come with an fd.
      if (fd && (v & 0xff) != 0) return unexpected(fail(c, reply, CodecErrc::bad_value, v));
      return fds_are(c, reply, fd ? 1 : 0);
    }
    case R::get_shmem_config: return exactly(c, reply, sizeof(ShmemConfig), 0);
    default: return exactly(c, reply, sizeof(std::uint64_t), 0);
  }
}

}  // namespace

Result<void, CodecError> validate_frontend_request(const Message& m, const Negotiated& n) {
  if (auto r = request_header(Channel::main, m); !r) return r;
  return frontend_layout(m, n);
}

Result<void, CodecError> validate_backend_request(const Message& m, const Negotiated&) {
  if (auto r = request_header(Channel::backend, m); !r) return r;
  return backend_layout(m);
}

bool expects_reply(const Message& request, const Negotiated& n) {
  return has_own_reply(request, n) || request.need_reply();
}

bool expects_backend_reply(const Message& request) {
  return request.backend_request() == BackendRequest::shared_object_lookup || request.need_reply();
}

Result<void, CodecError> validate_reply(const Message& reply, const Message& request,
                                        const Negotiated& n) {
  if (auto r = reply_header(Channel::main, reply, request); !r) return r;
  return reply_layout(reply, request, n);
}

Result<void, CodecError> validate_backend_reply(const Message& reply, const Message& request) {
  constexpr Channel c = Channel::backend;
  if (auto r = reply_header(c, reply, request); !r) return r;
  if (request.backend_request() == BackendRequest::shared_object_lookup) {
    if (auto r = size_is(c, reply, sizeof(std::uint64_t)); !r) return r;
    return fds_at_most(c, reply, 1);  // the dma-buf fd, when found
  }
  if (!request.need_reply())
    return unexpected(fail(c, reply, CodecErrc::wrong_reply, reply.request, 0));
  return exactly(c, reply, sizeof(std::uint64_t), 0);
}

std::array<std::uint8_t, kHeaderSize> encode_header(const Message& m) {
  std::array<std::uint8_t, kHeaderSize> h{};
  const auto size = static_cast<std::uint32_t>(m.payload.size());
  std::memcpy(h.data(), &m.request, 4);
  std::memcpy(h.data() + 4, &m.flags, 4);
  std::memcpy(h.data() + 8, &size, 4);
  return h;
}

std::vector<std::uint8_t> encode(const Message& m) {
  const auto h = encode_header(m);
  // Built from the header, then grown: g++ 12's -Wnull-dereference at -O1 under
  // ThreadSanitizer saw a memcpy into a vector sized in its constructor as a possible
  // null write (the tsan build has warnings as errors too).
  std::vector<std::uint8_t> out(h.begin(), h.end());
  out.resize(kHeaderSize + m.payload.size());
  if (!m.payload.empty()) std::memcpy(&out[kHeaderSize], m.payload.data(), m.payload.size());
  return out;
}

Header decode_header(std::span<const std::uint8_t, kHeaderSize> bytes) {
  Header h{};
  std::memcpy(&h.request, bytes.data(), 4);
  std::memcpy(&h.flags, bytes.data() + 4, 4);
  std::memcpy(&h.size, bytes.data() + 8, 4);
  return h;
}

Result<Message, CodecError> make_mem_table(std::span<const MemRegion> regions,
                                           std::vector<UniqueFd> fds, std::uint32_t flags) {
  Message m = make_request(FrontendRequest::set_mem_table, flags);
  if (regions.size() > kMaxMemTableRegions)
    return unexpected(fail(Channel::main, m, CodecErrc::bad_region_count, regions.size(),
                           kMaxMemTableRegions, true));
  if (fds.size() != regions.size())
    return unexpected(fail(Channel::main, m, CodecErrc::bad_fd_count, fds.size(), regions.size()));
  const MemTableHeader h{static_cast<std::uint32_t>(regions.size()), 0};
  m.payload.resize(sizeof h + regions.size_bytes());
  std::memcpy(m.payload.data(), &h, sizeof h);
  if (!regions.empty())
    std::memcpy(m.payload.data() + sizeof h, regions.data(), regions.size_bytes());
  m.fds = std::move(fds);
  return m;
}

Message make_mem_reg(FrontendRequest r, const MemRegion& region, UniqueFd fd, std::uint32_t flags) {
  Message m = make_request(r, SingleMemRegion{0, region}, flags);
  if (fd) m.fds.push_back(std::move(fd));
  return m;
}

Message make_log_base(const LogDesc& log, UniqueFd fd, std::uint32_t flags) {
  Message m = make_request(FrontendRequest::set_log_base, log, flags);
  m.fds.push_back(std::move(fd));
  return m;
}

Message make_vring_file(FrontendRequest r, std::uint32_t index, UniqueFd fd, std::uint32_t flags) {
  std::uint64_t word = index & kVringIndexMask;
  if (!fd) word |= kVringNoFdMask;
  Message m = make_request(r, word, flags);
  if (fd) m.fds.push_back(std::move(fd));
  return m;
}

Result<Message, CodecError> make_config(FrontendRequest r, std::uint32_t offset,
                                        std::uint32_t config_flags,
                                        std::span<const std::uint8_t> bytes, std::uint32_t flags) {
  Message m = make_request(r, flags);
  if (bytes.size() > kMaxConfigSize)
    return unexpected(
        fail(Channel::main, m, CodecErrc::bad_size, bytes.size(), kMaxConfigSize, true));
  const ConfigHeader h{offset, static_cast<std::uint32_t>(bytes.size()), config_flags};
  m.payload.resize(sizeof h + bytes.size());
  std::memcpy(m.payload.data(), &h, sizeof h);
  if (!bytes.empty()) std::memcpy(m.payload.data() + sizeof h, bytes.data(), bytes.size());
  return m;
}

Message make_u64_reply(const Message& request, std::uint64_t value) {
  return make_reply(request, value);
}

Message make_ack(const Message& request, bool success) {
  return make_reply(request, std::uint64_t{success ? 0u : 1u});
}

Message make_empty_reply(const Message& request) {
  return Message{request.request, kReplyFlags, {}, {}};
}

Result<Message, CodecError> make_config_reply(const Message& request,
                                              std::span<const std::uint8_t> bytes) {
  if (auto r = config_space(Channel::main, request); !r) return unexpected(r.error());
  ConfigHeader h;
  std::memcpy(&h, request.payload.data(), sizeof h);
  if (bytes.size() != h.size)
    return unexpected(fail(Channel::main, request, CodecErrc::bad_size, bytes.size(), h.size));
  Message m = make_empty_reply(request);
  m.payload.resize(sizeof h + bytes.size());
  std::memcpy(m.payload.data(), &h, sizeof h);
  if (!bytes.empty()) std::memcpy(m.payload.data() + sizeof h, bytes.data(), bytes.size());
  return m;
}

namespace {

// A decoder was handed another request than the one it reads.
Check is_request(Channel c, const Message& m, std::uint32_t want) {
  if (m.request != want) return unexpected(fail(c, m, CodecErrc::unknown_request, m.request, want));
  return {};
}

Check is_frontend(const Message& m, const Negotiated& n, FrontendRequest want) {
  if (auto r = is_request(Channel::main, m, static_cast<std::uint32_t>(want)); !r) return r;
  return validate_frontend_request(m, n);
}

RegionWithFd region_at(const Message& m, std::size_t offset, const Negotiated& n) {
  RegionWithFd out;
  std::memcpy(&out.region, m.payload.data() + offset, sizeof(MemRegion));
  if (n.has(ProtocolFeature::xen_mmap)) {
    XenMmap x;
    std::memcpy(&x, m.payload.data() + offset + sizeof(MemRegion), sizeof x);
    out.xen = x;
  }
  return out;
}

}  // namespace

Result<std::vector<RegionWithFd>, CodecError> decode_mem_table(Message m, const Negotiated& n) {
  if (auto r = is_frontend(m, n, FrontendRequest::set_mem_table); !r) return unexpected(r.error());
  MemTableHeader h;
  std::memcpy(&h, m.payload.data(), sizeof h);
  const std::size_t stride = mem_region_size(n);
  std::vector<RegionWithFd> out;
  out.reserve(h.num_regions);
  for (std::size_t i = 0; i < h.num_regions; ++i) {
    out.push_back(region_at(m, sizeof h + i * stride, n));
    out.back().fd = std::move(m.fds[i]);
  }
  m.fds.clear();
  return out;
}

Result<RegionWithFd, CodecError> decode_mem_reg(Message m, const Negotiated& n) {
  const auto r = m.frontend_request();
  if (r != FrontendRequest::add_mem_reg && r != FrontendRequest::rem_mem_reg)
    return unexpected(fail(Channel::main, m, CodecErrc::unknown_request, m.request));
  if (auto v = validate_frontend_request(m, n); !v) return unexpected(v.error());
  RegionWithFd out = region_at(m, sizeof(std::uint64_t), n);
  // REM_MEM_REG: a stray fd is closed unused, as the specification requires.
  if (r == FrontendRequest::add_mem_reg) out.fd = std::move(m.fds[0]);
  m.fds.clear();
  return out;
}

Result<LogBase, CodecError> decode_log_base(Message m, const Negotiated& n) {
  if (auto r = is_frontend(m, n, FrontendRequest::set_log_base); !r) return unexpected(r.error());
  LogBase out;
  std::memcpy(&out.log, m.payload.data(), sizeof out.log);
  out.fd = std::move(m.fds[0]);
  m.fds.clear();
  return out;
}

Result<VringFile, CodecError> decode_vring_file(Message m, const Negotiated& n) {
  const auto r = m.frontend_request();
  if (r != FrontendRequest::set_vring_kick && r != FrontendRequest::set_vring_call &&
      r != FrontendRequest::set_vring_err)
    return unexpected(fail(Channel::main, m, CodecErrc::unknown_request, m.request));
  if (auto v = validate_frontend_request(m, n); !v) return unexpected(v.error());
  const std::uint64_t word = u64_at(m);
  VringFile out{static_cast<std::uint32_t>(word & kVringIndexMask), {}};
  if (!m.fds.empty()) out.fd = std::move(m.fds[0]);
  m.fds.clear();
  return out;
}

Result<IotlbEvent, CodecError> decode_iotlb(const Message& m, Channel c, const Negotiated& n) {
  if (c == Channel::main) {
    if (auto r = is_frontend(m, n, FrontendRequest::iotlb_msg); !r) return unexpected(r.error());
  } else {
    if (auto r = is_request(c, m, static_cast<std::uint32_t>(BackendRequest::iotlb_msg)); !r)
      return unexpected(r.error());
    if (auto r = validate_backend_request(m, n); !r) return unexpected(r.error());
  }
  IotlbMsg msg;
  std::memcpy(&msg, m.payload.data(), sizeof msg);
  const auto type = static_cast<IotlbType>(msg.type);
  // Updates and invalidations flow from the front-end, misses and access failures from
  // the back-end; the kernel's batch markers (5, 6) are not part of vhost-user.
  const bool ok = c == Channel::main ? (type == IotlbType::update || type == IotlbType::invalidate)
                                     : (type == IotlbType::miss || type == IotlbType::access_fail);
  if (!ok) return unexpected(fail(c, m, CodecErrc::bad_value, msg.type));
  if (type == IotlbType::invalidate) {
    // Only iova and size mean anything here: QEMU 7.2 leaves perm and uaddr of an
    // invalidation uninitialised (seen: perm 0xb2), so they are ignored, not checked.
    return IotlbEvent{type, msg.iova, msg.size, user_address(0, n), Access::none};
  }
  if (msg.perm > static_cast<std::uint8_t>(Access::read_write))
    return unexpected(fail(c, m, CodecErrc::bad_value, msg.perm));
  return IotlbEvent{type, msg.iova, msg.size, user_address(msg.uaddr, n),
                    static_cast<Access>(msg.perm)};
}

Result<ConfigSpace, CodecError> decode_config(const Message& m) {
  constexpr Channel c = Channel::main;
  const auto r = m.frontend_request();
  if (r != FrontendRequest::get_config && r != FrontendRequest::set_config)
    return unexpected(fail(c, m, CodecErrc::unknown_request, m.request));
  if (auto v = config_space(c, m); !v) return unexpected(v.error());
  ConfigSpace out;
  ConfigHeader h;
  std::memcpy(&h, m.payload.data(), sizeof h);
  if (h.flags > 1) return unexpected(fail(c, m, CodecErrc::bad_value, h.flags));
  out.offset = h.offset;
  out.size = h.size;
  out.flags = h.flags;
  if (h.size > 0) std::memcpy(out.data.data(), m.payload.data() + sizeof h, h.size);
  return out;
}

}  // namespace vhostkit::vhost_user
