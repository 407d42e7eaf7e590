// BackendServer: the vhost-user back-end state machine.
#include "vhostkit/vhost_user/backend_server.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>

#include <fmt/format.h>

#include "vhostkit/log.h"
#include "vhostkit/virtio_spec.h"

namespace vhostkit {

using namespace vhost_user;
using virtio::bit;

namespace {

Message reply_u64(const Message& to, std::uint64_t v) {
  return Message::make(to.request, v, kVersion | kFlagReply);
}

template <typename T>
Message reply_of(const Message& to, const T& body) {
  return Message::make(to.request, body, kVersion | kFlagReply);
}

// Requests whose reply is defined by the specification (REPLY_ACK adds nothing to them).
bool has_natural_reply(Request r) {
  switch (r) {
    case Request::get_features:
    case Request::get_protocol_features:
    case Request::get_vring_base:
    case Request::get_queue_num:
    case Request::get_max_mem_slots:
    case Request::get_config:
    case Request::get_status:
    case Request::set_log_base: return true;
    default: return false;
  }
}

// Requests that change what the data path sees; a front-end must own the session first.
bool needs_owner(Request r) {
  switch (r) {
    case Request::set_mem_table:
    case Request::add_mem_reg:
    case Request::rem_mem_reg:
    case Request::set_log_base:
    case Request::set_vring_num:
    case Request::set_vring_addr:
    case Request::set_vring_base:
    case Request::get_vring_base:
    case Request::set_vring_kick:
    case Request::set_vring_call:
    case Request::set_vring_err:
    case Request::set_vring_enable:
    case Request::iotlb_msg: return true;
    default: return false;
  }
}

}  // namespace

BackendServer::BackendServer(Device& device, BackendOptions options)
    : device_(device),
      options_(options),
      space_(std::make_unique<AddressSpace>(MemoryLimits{options.max_mem_slots}, options.iotlb)),
      stop_fd_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
  queues_.resize(device_.num_queues());
  // One worker thread per worker_of() number: the runners share it (and keep it alive).
  std::map<std::uint32_t, std::shared_ptr<QueueWorker>> workers;
  for (std::uint32_t i = 0; i < queues_.size(); ++i) {
    auto& worker = workers[device_.worker_of(i)];
    if (!worker) worker = std::make_shared<QueueWorker>();
    queues_[i].runner = std::make_unique<QueueRunner>(
        i, *space_, device_, options_.runner,
        [this](std::uint32_t q, const TranslateError& miss) { send_miss(q, miss); },
        [this](std::uint32_t q, const VirtqueueError& e) {
          log(LogLevel::error, "{}: queue {} broken: {}", device_.name(), q, e.message());
          // Tell the front-end through the queue's error eventfd, if it gave one.
          if (queues_[q].err.valid()) {
            std::uint64_t one = 1;
            (void)!::write(queues_[q].err.get(), &one, sizeof one);
          }
        },
        worker);
  }
}

BackendServer::~BackendServer() {
  stop_all_rings();
}

std::uint64_t BackendServer::offered_features() const {
  std::uint64_t f = device_.device_features() | bit(virtio::kFVersion1) | bit(kFProtocolFeatures) |
                    bit(virtio::kFRingIndirectDesc) | bit(virtio::kFRingEventIdx) |
                    bit(virtio::kVhostFLogAll);
  if (options_.offer_packed) f |= bit(virtio::kFRingPacked);
  if (options_.offer_iommu) f |= bit(virtio::kFAccessPlatform);
  return f;
}

std::uint64_t BackendServer::offered_protocol_features() const {
  std::uint64_t f = bit(protocol::kMq) | bit(protocol::kLogShmfd) | bit(protocol::kReplyAck) |
                    bit(protocol::kBackendReq) | bit(protocol::kStatus) |
                    bit(protocol::kConfigureMemSlots) | bit(protocol::kResetDevice);
  if (!device_.config().empty()) f |= bit(protocol::kConfig);
  if (options_.offer_gpa_addresses) f |= bit(protocol::kGpaAddresses);
  return f;
}

Result<UniqueFd, std::string> BackendServer::listen_unix(const std::string& path) {
  sockaddr_un addr{};
  if (path.empty() || path.size() >= sizeof addr.sun_path)
    return unexpected(fmt::format("socket path '{}' is empty or too long", path));
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  // A live server answers a connect; a stale socket file does not.
  UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (probe.valid() && ::connect(probe.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0)
    return unexpected(fmt::format("another back-end is already listening on {}", path));
  if (::access(path.c_str(), F_OK) == 0 && ::unlink(path.c_str()) != 0)
    return unexpected(fmt::format("cannot remove stale socket {}: {}", path, std::strerror(errno)));
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return unexpected(fmt::format("socket: {}", std::strerror(errno)));
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
    return unexpected(fmt::format("bind {}: {}", path, std::strerror(errno)));
  if (::listen(fd.get(), 1) != 0)
    return unexpected(fmt::format("listen {}: {}", path, std::strerror(errno)));
  return fd;
}

void BackendServer::stop() {
  stopping_.store(true);
  std::uint64_t one = 1;
  (void)!::write(stop_fd_.get(), &one, sizeof one);
}

Result<void, std::string> BackendServer::run(int listen_fd) {
  while (!stopping_.load()) {
    pollfd fds[2] = {{listen_fd, POLLIN, 0}, {stop_fd_.get(), POLLIN, 0}};
    int r = ::poll(fds, 2, -1);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return unexpected(fmt::format("poll: {}", std::strerror(errno)));
    if (fds[1].revents & POLLIN) break;
    if (!(fds[0].revents & POLLIN)) continue;
    UniqueFd conn(::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn.valid()) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return unexpected(fmt::format("accept: {}", std::strerror(errno)));
    }
    log(LogLevel::info, "{}: front-end connected", device_.name());
    serve(std::move(conn));
    log(LogLevel::info, "{}: front-end disconnected; device reset", device_.name());
  }
  return {};
}

void BackendServer::serve(UniqueFd conn) {
  while (!stopping_.load()) {
    pollfd fds[2] = {{conn.get(), POLLIN, 0}, {stop_fd_.get(), POLLIN, 0}};
    int pr = ::poll(fds, 2, -1);
    if (pr < 0 && errno == EINTR) continue;
    if (pr < 0 || (fds[1].revents & POLLIN)) break;
    if (!(fds[0].revents & (POLLIN | POLLHUP | POLLERR))) continue;
    auto m = read_message(conn.get());
    if (!m) {
      if (m.error().code != CodecErrc::closed)
        log(LogLevel::error, "{}: {}; closing the connection", device_.name(), m.error().message());
      break;
    }
    if (auto v = validate_request(*m); !v) {
      // The stream is still in step (the whole message was read): refuse this one.
      ++rejected_;
      log(LogLevel::error, "{}: rejected {}", device_.name(), v.error().message());
      if (m->need_reply() && !has_natural_reply(m->req())) {
        if (!write_message(conn.get(), reply_u64(*m, 1))) break;
      } else if (has_natural_reply(m->req())) {
        break;  // the front-end waits for a reply we cannot give: resynchronise by closing
      }
      continue;
    }
    Request req = m->req();
    log(LogLevel::debug, "{}: {} (flags {:#x}, {} bytes, {} fds)", device_.name(), to_string(req),
        m->flags, m->payload.size(), m->fds.size());
    Reply r = (needs_owner(req) && !owner_)
                  ? Reply(unexpected(std::string("front-end has not sent SET_OWNER")))
                  : handle(*m);
    ++handled_;
    if (!r) {
      ++rejected_;
      log(LogLevel::error, "{}: {} failed: {}", device_.name(), to_string(req), r.error());
    }
    std::optional<Message> out;
    if (r && r->has_value()) {
      out = std::move(**r);
    } else if (m->need_reply() && !has_natural_reply(req)) {
      out = reply_u64(*m, r ? 0 : 1);
    } else if (!r && has_natural_reply(req)) {
      // Keep the conversation in step: answer with the neutral value.
      out = req == Request::get_config ? reply_of(*m, ConfigHeader{0, 0, 0})
            : req == Request::get_vring_base
                ? reply_of(*m, VringState{m->as<VringState>().index, 0})
            : req == Request::set_log_base ? Message::make_empty(m->request, kVersion | kFlagReply)
                                           : reply_u64(*m, 0);
    }
    if (out) {
      if (auto w = write_message(conn.get(), *out); !w) {
        log(LogLevel::error, "{}: reply to {}: {}", device_.name(), to_string(req),
            w.error().message());
        break;
      }
    }
  }
  reset_connection();
}

void BackendServer::stop_all_rings() {
  for (auto& q : queues_)
    if (q.runner) (void)q.runner->stop();
}

void BackendServer::reset_connection() {
  stop_all_rings();
  for (auto& q : queues_) {
    q.num = 0;
    q.addr.reset();
    q.base = 0;
    q.err.reset();
    q.enabled = true;
    q.enable_set = false;
    q.runner->set_call(UniqueFd());
    q.runner->queue().reset();
  }
  space_->set_logging(false);
  (void)space_->set_log(nullptr);
  space_->set_iommu(false);
  space_->iotlb_flush();
  space_->clear_memory();
  (void)space_->synchronize();
  owner_ = false;
  features_ = 0;
  features_set_ = false;
  protocol_features_ = 0;
  status_ = 0;
  {
    std::lock_guard lock(backend_mu_);
    backend_fd_.reset();
  }
  device_.reset();
}

Result<BackendServer::Queue*, std::string> BackendServer::queue(std::uint32_t index) {
  if (index >= queues_.size())
    return unexpected(
        fmt::format("queue index {} out of range (device has {})", index, queues_.size()));
  return &queues_[index];
}

BackendServer::Reply BackendServer::handle(Message& m) {
  switch (m.req()) {
    case Request::get_features: return reply_u64(m, offered_features());
    case Request::set_features: return set_features(m.u64());
    case Request::set_owner: owner_ = true; return std::nullopt;
    case Request::reset_owner:  // deprecated: disable every ring
      stop_all_rings();
      return std::nullopt;
    case Request::get_protocol_features: return reply_u64(m, offered_protocol_features());
    case Request::set_protocol_features: {
      std::uint64_t f = m.u64();
      if (f & ~offered_protocol_features())
        return unexpected(
            fmt::format("protocol features {:#x} not offered", f & ~offered_protocol_features()));
      protocol_features_ = f;
      return std::nullopt;
    }
    case Request::get_queue_num: return reply_u64(m, queues_.size());
    case Request::get_max_mem_slots: return reply_u64(m, options_.max_mem_slots);
    case Request::set_mem_table: return set_mem_table(m);
    case Request::add_mem_reg: return add_mem_reg(m);
    case Request::rem_mem_reg: return rem_mem_reg(m);
    case Request::set_log_base: return set_log_base(m);
    case Request::set_log_fd:  // the log eventfd is optional and unused: close it
      return std::nullopt;
    case Request::set_vring_num: {
      auto s = m.as<VringState>();
      auto q = queue(s.index);
      if (!q) return unexpected(q.error());
      if ((*q)->runner->running())
        return unexpected(std::string("SET_VRING_NUM on a running ring"));
      if (s.num == 0 || s.num > virtio::kMaxQueueSize)
        return unexpected(fmt::format("queue size {} out of range", s.num));
      (*q)->num = s.num;
      return std::nullopt;
    }
    case Request::set_vring_addr: {
      auto a = m.as<VringAddr>();
      auto q = queue(a.index);
      if (!q) return unexpected(q.error());
      if ((*q)->runner->running()) {
        const auto& old = *(*q)->addr;
        if (old.desc != a.desc || old.used != a.used || old.avail != a.avail)
          return unexpected(std::string("ring addresses changed while the ring runs"));
        // Only the logging flag may change while running; logging is done at our own
        // translation either way (docs/architecture.md, "Virtqueues").
      }
      (*q)->addr = a;
      return std::nullopt;
    }
    case Request::set_vring_base: {
      auto s = m.as<VringState>();
      auto q = queue(s.index);
      if (!q) return unexpected(q.error());
      if ((*q)->runner->running())
        return unexpected(std::string("SET_VRING_BASE on a running ring"));
      (*q)->base = s.num;
      return std::nullopt;
    }
    case Request::get_vring_base: return get_vring_base(m);
    case Request::set_vring_kick: return set_vring_kick(m);
    case Request::set_vring_call: {
      auto q = queue(static_cast<std::uint32_t>(m.u64() & kVringIndexMask));
      if (!q) return unexpected(q.error());
      (*q)->runner->set_call(m.fds.empty() ? UniqueFd() : std::move(m.fds[0]));
      return std::nullopt;
    }
    case Request::set_vring_err: {
      auto q = queue(static_cast<std::uint32_t>(m.u64() & kVringIndexMask));
      if (!q) return unexpected(q.error());
      (*q)->err = m.fds.empty() ? UniqueFd() : std::move(m.fds[0]);
      return std::nullopt;
    }
    case Request::set_vring_enable: {
      auto s = m.as<VringState>();
      auto q = queue(s.index);
      if (!q) return unexpected(q.error());
      if (s.num > 1) return unexpected(fmt::format("SET_VRING_ENABLE value {}", s.num));
      (*q)->enabled = s.num == 1;
      (*q)->enable_set = true;
      (*q)->runner->set_enabled(s.num == 1);
      return std::nullopt;
    }
    case Request::set_backend_req_fd: {
      std::lock_guard lock(backend_mu_);
      backend_fd_ = std::move(m.fds[0]);
      {
        // Room for a look-ahead burst of IOTLB misses (each small message costs about
        // 1 KiB of socket memory).
        int bytes = 4 << 20;
        (void)::setsockopt(backend_fd_.get(), SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
      }
      return std::nullopt;
    }
    case Request::iotlb_msg: return iotlb_msg(m);
    case Request::get_config: {
      auto h = m.as<ConfigHeader>();
      auto cfg = device_.config();
      if (static_cast<std::uint64_t>(h.offset) + h.size > cfg.size())
        return unexpected(
            fmt::format("config read [{}, +{}) beyond {} bytes", h.offset, h.size, cfg.size()));
      Message r = Message::make_empty(m.request, kVersion | kFlagReply);
      r.payload.resize(sizeof(ConfigHeader) + h.size);
      std::memcpy(r.payload.data(), &h, sizeof h);
      std::memcpy(r.payload.data() + sizeof h, cfg.data() + h.offset, h.size);
      return r;
    }
    case Request::set_config: {
      auto h = m.as<ConfigHeader>();
      if (!device_.set_config(h.offset, std::span(m.payload).subspan(sizeof(ConfigHeader), h.size)))
        return unexpected(fmt::format("config write at {} of {} bytes refused", h.offset, h.size));
      return std::nullopt;
    }
    case Request::set_status: status_ = static_cast<std::uint8_t>(m.u64()); return std::nullopt;
    case Request::get_status: return reply_u64(m, status_);
    case Request::reset_device:
      stop_all_rings();
      device_.reset();
      for (auto& q : queues_) q.runner->queue().reset();
      features_set_ = false;
      status_ = 0;
      return std::nullopt;
    default: return unexpected(fmt::format("{} is not supported", to_string(m.req())));
  }
}

BackendServer::Reply BackendServer::set_features(std::uint64_t f) {
  std::uint64_t extra = f & ~offered_features();
  if (extra != 0) return unexpected(fmt::format("features {:#x} were not offered", extra));
  bool iommu = (f >> virtio::kFAccessPlatform) & 1;
  bool log_all = (f >> virtio::kVhostFLogAll) & 1;
  bool was_logging = has(virtio::kVhostFLogAll);
  features_ = f;
  features_set_ = true;
  if (space_->iommu() != iommu) space_->set_iommu(iommu);
  device_.set_features(f);
  if (log_all != was_logging) {
    space_->set_logging(log_all);
    // Acknowledge only once no worker can still write without logging.
    if (!space_->synchronize())
      return unexpected(std::string("a queue worker did not reach a quiescent point"));
    log(LogLevel::info, "{}: dirty logging {}", device_.name(), log_all ? "on" : "off");
  }
  return std::nullopt;
}

namespace {
RegionSpec spec_of(const MemRegion& r, UniqueFd fd) {
  RegionSpec s;
  s.fd = std::move(fd);
  s.mmap_offset = r.mmap_offset;
  s.size = r.size;
  s.gpa = Gpa(r.gpa);
  s.uaddr = Uaddr(r.uaddr);
  return s;
}
}  // namespace

BackendServer::Reply BackendServer::set_mem_table(Message& m) {
  auto h = m.as<MemTableHeader>();
  std::vector<RegionSpec> specs;
  for (std::uint32_t i = 0; i < h.nregions; ++i)
    specs.push_back(spec_of(m.as<MemRegion>(sizeof(MemTableHeader) + i * sizeof(MemRegion)),
                            std::move(m.fds[i])));
  if (auto r = space_->set_mem_table(std::move(specs)); !r) return unexpected(r.error().message());
  if (!space_->synchronize()) return unexpected(std::string("workers did not quiesce"));
  return std::nullopt;
}

BackendServer::Reply BackendServer::add_mem_reg(Message& m) {
  auto r = m.as<SingleMemRegion>().region;
  if (auto ok = space_->add_region(spec_of(r, std::move(m.fds[0]))); !ok)
    return unexpected(ok.error().message());
  if (!space_->synchronize()) return unexpected(std::string("workers did not quiesce"));
  return std::nullopt;
}

BackendServer::Reply BackendServer::rem_mem_reg(const Message& m) {
  auto r = m.as<SingleMemRegion>().region;
  if (auto ok = space_->remove_region(Gpa(r.gpa), r.size); !ok)
    return unexpected(ok.error().message());
  // After the ack the front-end may unmap the region: no worker may still use it.
  if (!space_->synchronize()) return unexpected(std::string("workers did not quiesce"));
  return std::nullopt;
}

BackendServer::Reply BackendServer::set_log_base(Message& m) {
  auto d = m.as<LogDesc>();
  auto log_map = DirtyLog::map(std::move(m.fds[0]), d.size, d.offset);
  if (!log_map) return unexpected(log_map.error().message());
  if (auto r = space_->set_log(*log_map); !r) return unexpected(r.error().message());
  if (!space_->synchronize()) return unexpected(std::string("workers did not quiesce"));
  log(LogLevel::info, "{}: dirty log of {} bytes (covers {:#x})", device_.name(), d.size,
      (*log_map)->covered_end().value);
  // The reply to SET_LOG_BASE (LOG_SHMFD) carries no payload.
  return Message::make_empty(m.request, kVersion | kFlagReply);
}

Result<void, std::string> BackendServer::start_ring(std::uint32_t index, UniqueFd kick) {
  Queue& q = queues_[index];
  if (q.num == 0 || !q.addr)
    return unexpected(fmt::format("queue {} started before SET_VRING_NUM/ADDR", index));
  QueueConfig c;
  c.format = has(virtio::kFRingPacked) ? RingFormat::packed : RingFormat::split;
  c.size = static_cast<std::uint16_t>(q.num == virtio::kMaxQueueSize ? 0 : q.num);
  if (q.num == virtio::kMaxQueueSize)
    return unexpected(std::string("queue size 32768 is not supported"));
  c.indirect = has(virtio::kFRingIndirectDesc);
  c.event_idx = has(virtio::kFRingEventIdx);
  // Ring addresses: IOVAs with the IOMMU, GPAs with GPA_ADDRESSES, else frontend
  // virtual addresses that we turn into GPAs through our own memory table.
  auto convert = [&](std::uint64_t a) -> Result<Iova, std::string> {
    if (has(virtio::kFAccessPlatform) || has_protocol(protocol::kGpaAddresses)) return Iova(a);
    auto g = space_->memory()->uaddr_to_gpa(Uaddr(a));
    if (!g) return unexpected(fmt::format("ring address {:#x} is not in guest memory", a));
    return Iova(g->gpa.value);
  };
  auto desc = convert(q.addr->desc);
  auto avail = convert(q.addr->avail);
  auto used = convert(q.addr->used);
  if (!desc) return unexpected(desc.error());
  if (!avail) return unexpected(avail.error());
  if (!used) return unexpected(used.error());
  c.addr = RingAddresses{*desc, *avail, *used};
  if (q.addr->flags & kVringFLog) c.log_guest_addr = Gpa(q.addr->log);
  RingState s;
  bool used_from_ring = c.format == RingFormat::split;
  if (c.format == RingFormat::split) {
    s.avail_idx = static_cast<std::uint16_t>(q.base);
  } else {
    // Packed: bits 0-14 last avail index, bit 15 its wrap counter; QEMU also sends the
    // used index and wrap counter in bits 16-31 (0 there means: same as avail).
    s.avail_idx = static_cast<std::uint16_t>(q.base & 0x7fff);
    s.avail_wrap = (q.base >> 15) & 1;
    std::uint32_t used_part = q.base >> 16;
    s.used_idx = used_part != 0 ? static_cast<std::uint16_t>(used_part & 0x7fff) : s.avail_idx;
    s.used_wrap = used_part != 0 ? ((used_part >> 15) & 1) != 0 : s.avail_wrap;
  }
  // With VHOST_USER_F_PROTOCOL_FEATURES a ring starts disabled until SET_VRING_ENABLE.
  bool enabled = q.enable_set ? q.enabled : !has(kFProtocolFeatures);
  q.runner->set_enabled(enabled);
  if (auto r = q.runner->start(c, s, used_from_ring, std::move(kick)); !r)
    return unexpected(r.error().message());
  return {};
}

BackendServer::Reply BackendServer::set_vring_kick(Message& m) {
  auto index = static_cast<std::uint32_t>(m.u64() & kVringIndexMask);
  auto q = queue(index);
  if (!q) return unexpected(q.error());
  if ((*q)->runner->running()) (void)(*q)->runner->stop();
  UniqueFd kick = m.fds.empty() ? UniqueFd() : std::move(m.fds[0]);
  if (auto r = start_ring(index, std::move(kick)); !r) return unexpected(r.error());
  return std::nullopt;
}

BackendServer::Reply BackendServer::get_vring_base(const Message& m) {
  auto s = m.as<VringState>();
  auto q = queue(s.index);
  if (!q) return unexpected(q.error());
  RingState st = (*q)->runner->stop();
  std::uint32_t num;
  if (has(virtio::kFRingPacked)) {
    num = (static_cast<std::uint32_t>(st.avail_idx) | (st.avail_wrap ? 0x8000u : 0u)) |
          ((static_cast<std::uint32_t>(st.used_idx) | (st.used_wrap ? 0x8000u : 0u)) << 16);
  } else {
    num = st.avail_idx;
  }
  (*q)->base = num;
  return reply_of(m, VringState{s.index, num});
}

BackendServer::Reply BackendServer::iotlb_msg(const Message& m) {
  auto t = m.as<IotlbMsg>();
  log(LogLevel::debug, "{}: IOTLB type {} iova {:#x} size {:#x} addr {:#x} perm {}", device_.name(),
      t.type, t.iova, t.size, t.uaddr, t.perm);
  if (!has(virtio::kFAccessPlatform))
    return unexpected(std::string("IOTLB message without VIRTIO_F_ACCESS_PLATFORM"));
  if (t.type == kIotlbUpdate) {
    if (t.perm == 0 || t.perm > 3)
      return unexpected(fmt::format("IOTLB update with permission {}", t.perm));
    auto perm = static_cast<Access>(t.perm);
    auto r = has_protocol(protocol::kGpaAddresses)
                 ? space_->iotlb_update(Iova(t.iova), t.size, Gpa(t.uaddr), perm)
                 : space_->iotlb_update_uaddr(Iova(t.iova), t.size, Uaddr(t.uaddr), perm);
    if (!r) return unexpected(r.error().message());
    for (auto& q : queues_) q.runner->wake();  // deferred chains can go on
    return std::nullopt;
  }
  if (t.type == kIotlbInvalidate) {
    if (auto r = space_->iotlb_invalidate(Iova(t.iova), t.size); !r)
      return unexpected(r.error().message());
    // After the ack the guest may reuse the memory: no worker may still translate
    // through the removed entry.
    if (!space_->synchronize()) return unexpected(std::string("workers did not quiesce"));
    return std::nullopt;
  }
  return unexpected(fmt::format("IOTLB message type {} not accepted from a front-end", t.type));
}

void BackendServer::send_miss(std::uint32_t queue, const TranslateError& miss) {
  std::lock_guard lock(backend_mu_);
  if (!backend_fd_.valid()) {
    log(LogLevel::warn, "{}: queue {} misses IOVA {:#x} but there is no back-end channel",
        device_.name(), queue, miss.addr.value);
    return;
  }
  log(LogLevel::debug, "{}: queue {} IOTLB miss at {:#x} ({})", device_.name(), queue,
      miss.addr.value, to_string(miss.access));
  IotlbMsg t{};
  t.iova = miss.addr.value;
  t.perm = static_cast<std::uint8_t>(miss.access);
  t.type = kIotlbMiss;
  Message msg = Message::make(static_cast<std::uint32_t>(BackendRequest::iotlb_msg), t);
  // Never block a worker on a full channel: the front-end may be waiting for this very
  // worker (GET_VRING_BASE under QEMU's lock) and not reading the channel, which would
  // deadlock both. A miss not sent now is sent again after the IOTLB's miss timeout.
  if (auto w = try_write_message(backend_fd_.get(), msg); !w) {
    if (w.error().sys_errno == EAGAIN || w.error().sys_errno == EWOULDBLOCK)
      log(LogLevel::debug, "{}: queue {} IOTLB miss at {:#x}: channel full, sent again later",
          device_.name(), queue, miss.addr.value);
    else
      log(LogLevel::warn, "{}: sending IOTLB miss: {}", device_.name(), w.error().message());
  }
}

}  // namespace vhostkit
