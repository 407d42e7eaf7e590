// BackendServer: the vhost-user back-end state machine.
#include "vhostkit/vhost_user/backend_server.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <variant>
#include <vector>

#include <fmt/format.h>

#include "vhost_user/internal/state_stream.h"
#include "vhostkit/log.h"
#include "vhostkit/vhost_user/device_state.h"
#include "vhostkit/vhost_user/message.h"
#include "vhostkit/vhost_user/queue_runner.h"
#include "vhostkit/vhost_user/socket.h"
#include "vhostkit/virtio_spec.h"

namespace vhostkit {

using namespace vhost_user;
using virtio::bit;

namespace {

// Requests that change what the data path sees; a front-end must own the session first.
bool needs_owner(FrontendRequest r) {
  using R = FrontendRequest;
  switch (r) {
    case R::set_mem_table:
    case R::add_mem_reg:
    case R::rem_mem_reg:
    case R::set_log_base:
    case R::set_vring_num:
    case R::set_vring_addr:
    case R::set_vring_base:
    case R::get_vring_base:
    case R::set_vring_kick:
    case R::set_vring_call:
    case R::set_vring_err:
    case R::set_vring_enable:
    case R::iotlb_msg:
    case R::set_device_state_fd:
    case R::check_device_state: return true;
    default: return false;
  }
}

// The payload of a validated request as T.
template <WirePayload T>
Result<T, std::string> body(const Message& m) {
  auto v = decode_payload<T>(m);
  if (!v) return unexpected(v.error().message());
  return *v;
}

// The answer a request with a reply of its own gets when it failed, so that the
// conversation stays in step: the neutral value of its reply.
Message neutral_reply(const Message& m) {
  switch (m.frontend_request()) {
    case FrontendRequest::get_config: return make_empty_reply(m);
    case FrontendRequest::get_vring_base: {
      VringState s{};
      if (m.payload.size() >= sizeof s) std::memcpy(&s, m.payload.data(), sizeof s);
      return make_reply(m, VringState{s.index, 0});
    }
    case FrontendRequest::set_log_base: return make_empty_reply(m);
    // An error in bits 0-7, and no fd (bit 8).
    case FrontendRequest::set_device_state_fd: return make_u64_reply(m, 1 | kDeviceStateNoFdMask);
    case FrontendRequest::check_device_state: return make_u64_reply(m, 1);
    case FrontendRequest::get_inflight_fd: return make_reply(m, InflightDesc{});  // no area
    default: return make_u64_reply(m, 0);
  }
}

// GET_VRING_BASE's number for a stopped ring: split, the avail index; packed, the avail
// index and wrap counter in bits 0-15, the used ones in bits 16-31.
std::uint32_t vring_base(const RingState& st, bool packed) {
  if (!packed) return st.avail_idx;
  return (static_cast<std::uint32_t>(st.avail_idx) | (st.avail_wrap ? 0x8000u : 0u)) |
         ((static_cast<std::uint32_t>(st.used_idx) | (st.used_wrap ? 0x8000u : 0u)) << 16);
}

}  // namespace

// The server's state. Control thread only, except where a member says otherwise.
class VHOSTKIT_LOCAL BackendServer::Impl {
 public:
  Impl(Device& device, BackendOptions options);
  ~Impl();

  std::uint64_t offered_features() const;
  std::uint64_t offered_protocol_features() const;
  Result<void, std::string> run(int listen_fd);
  void serve(UniqueFd conn);
  void stop();

  AddressSpace& space() { return *space_; }
  std::atomic<std::uint64_t> handled{0};
  std::atomic<std::uint64_t> rejected{0};

 private:
  struct Queue {
    std::unique_ptr<QueueRunner> runner;
    std::uint32_t num = 0;
    std::optional<VringAddr> addr;
    std::uint32_t base = 0;  // SET_VRING_BASE num
    UniqueFd err;
    bool enabled = true;
    bool enable_set = false;  // SET_VRING_ENABLE received since the connection began
    // Where a reset stopped the running ring, for a GET_VRING_BASE that follows it (QEMU
    // 7.2 sends SET_STATUS(0) before GET_VRING_BASE); cleared once read or when the ring
    // is set up again.
    std::optional<std::uint32_t> stopped_at;
    // The ring started in this connection: its inflight records are this back-end's
    // own from then on, not a predecessor's to recover.
    bool started = false;
  };
  // The inflight region SET_INFLIGHT_FD mapped (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD).
  struct InflightMap {
    void* base = nullptr;
    std::size_t len = 0;
    ~InflightMap() {
      if (base != nullptr) ::munmap(base, len);
    }
  };
  using Reply = Result<std::optional<Message>, std::string>;
  struct Transfer;

  // Answers a message that could not be handled (malformed, or refused by a handler):
  // a REPLY_ACK failure when one was asked for, the neutral reply when the request has a
  // reply of its own. False if the connection must close.
  bool refuse(int conn, const Message& m, const std::string& why);
  Reply handle(Message m);
  Reply set_protocol_features(const Message& m);
  Reply set_features(const Message& m);
  Reply set_mem_table(Message m);
  Reply add_mem_reg(Message m);
  Reply rem_mem_reg(Message m);
  Reply set_log_base(Message m);
  Reply set_vring_num(const Message& m);
  Reply set_vring_addr(const Message& m);
  Reply set_vring_base(const Message& m);
  Reply set_vring_file(Message m);
  Reply set_vring_enable(const Message& m);
  Reply set_backend_req_fd(Message m);
  Reply get_config(const Message& m);
  Reply set_config(const Message& m);
  Reply get_vring_base(const Message& m);
  Reply iotlb_msg(const Message& m);
  Reply set_status(const Message& m);
  Reply set_device_state_fd(Message m);
  Reply check_device_state(const Message& m);
  Reply get_inflight_fd(const Message& m);
  Reply set_inflight_fd(Message m);
  // Detaches every ring from the inflight region and unmaps it. Rings stopped.
  void drop_inflight();
  // Ends the transfer: waits for it (at most options_.state_transfer_grace) or, with
  // cancel, stops it; for a load, loads the state into the device. Keeps the outcome for
  // CHECK_DEVICE_STATE.
  Result<void, std::string> finish_transfer(bool cancel);
  Result<void, std::string> load_state(std::span<const std::uint8_t> image);
  // The first running ring, if any (a state transfer needs a suspended device).
  std::optional<std::uint32_t> running_ring() const;
  // RESET_DEVICE, SET_STATUS(0): see reset_device_state().
  Reply reset_device();
  // driver_reset: the driver reset the device (its inflight records go too); false for
  // a disconnect, after which a new connection may recover them.
  void reset_device_state(bool driver_reset);
  Result<Queue*, std::string> queue(std::uint32_t index);
  Result<Iova, std::string> ring_iova(const RingAddress& a) const;
  Result<void, std::string> start_ring(std::uint32_t index, UniqueFd kick);
  void send_miss(std::uint32_t queue, const TranslateError& miss);
  void broken(std::uint32_t queue, const VirtqueueError& e);
  void reset_connection();
  void stop_all_rings();
  bool has(unsigned feature) const { return (negotiated_.features >> feature) & 1; }
  bool has(ProtocolFeature f) const { return negotiated_.has(f); }

  Device& device_;
  BackendOptions options_;
  std::unique_ptr<AddressSpace> space_;
  std::vector<Queue> queues_;
  UniqueFd stop_fd_;  // eventfd
  std::atomic<bool> stopping_{false};

  // Connection state.
  bool owner_ = false;
  Negotiated negotiated_;
  std::uint8_t status_ = 0;
  std::mutex backend_mu_;  // guards backend_fd_ (workers send IOTLB misses on it)
  UniqueFd backend_fd_;
  // Device state: the transfer under way or finished but not yet checked, and the
  // outcome of the last one finished, which CHECK_DEVICE_STATE reports.
  std::unique_ptr<Transfer> transfer_;
  std::optional<Result<void, std::string>> transfer_outcome_;
  std::unique_ptr<InflightMap> inflight_;
};

// One device state transfer (SET_DEVICE_STATE_FD): a thread of its own moves the image
// through the front-end's fd, so that the control thread can reply first (the front-end
// reads or writes only after the reply) and a state larger than a pipe's buffer never
// blocks it.
struct BackendServer::Impl::Transfer {
  bool load = false;
  UniqueFd fd;
  UniqueFd cancel;                  // eventfd: makes the thread give up
  std::vector<std::uint8_t> image;  // save: what to write; load: what was read
  std::mutex mu;                    // guards the fields below
  std::condition_variable cv;
  bool done = false;
  std::string error;  // why the transfer failed; empty if it did not
  std::thread thread;

  void run();
  void finish(std::string why);
};

void BackendServer::Impl::Transfer::finish(std::string why) {
  fd.reset();  // the reading end sees EOF (save); nothing more is read (load)
  std::lock_guard lock(mu);
  error = std::move(why);
  done = true;
  cv.notify_all();
}

void BackendServer::Impl::Transfer::run() {
  constexpr std::chrono::milliseconds kNoTimeout{-1};  // cancel ends a stalled transfer
  if (load) {
    auto r = read_state(fd.get(), kMaxDeviceStateBytes, cancel.get(), kNoTimeout);
    if (r) image = std::move(*r);
    return finish(r ? std::string() : "reading the state: " + r.error());
  }
  auto w = write_state(fd.get(), image, cancel.get(), kNoTimeout);
  finish(w ? std::string() : "writing the state: " + w.error());
}

BackendServer::BackendServer(Device& device, BackendOptions options)
    : impl_(std::make_unique<Impl>(device, options)) {}
BackendServer::~BackendServer() = default;
std::uint64_t BackendServer::offered_features() const {
  return impl_->offered_features();
}
std::uint64_t BackendServer::offered_protocol_features() const {
  return impl_->offered_protocol_features();
}
Result<void, std::string> BackendServer::run(int listen_fd) {
  return impl_->run(listen_fd);
}
void BackendServer::serve(UniqueFd conn) {
  impl_->serve(std::move(conn));
}
void BackendServer::stop() {
  impl_->stop();
}
AddressSpace& BackendServer::space() {
  return impl_->space();
}
std::uint64_t BackendServer::messages_handled() const {
  return impl_->handled.load();
}
std::uint64_t BackendServer::messages_rejected() const {
  return impl_->rejected.load();
}

BackendServer::Impl::Impl(Device& device, BackendOptions options)
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
        [this](std::uint32_t q, const VirtqueueError& e) { broken(q, e); }, worker);
  }
}

BackendServer::Impl::~Impl() {
  if (transfer_) (void)finish_transfer(true);
  stop_all_rings();
}

std::uint64_t BackendServer::Impl::offered_features() const {
  std::uint64_t f = device_.device_features() | bit(virtio::kFVersion1) | bit(kFProtocolFeatures) |
                    bit(virtio::kFRingIndirectDesc) | bit(virtio::kFRingEventIdx) |
                    bit(virtio::kVhostFLogAll);
  if (options_.offer_packed) f |= bit(virtio::kFRingPacked);
  if (options_.offer_iommu) f |= bit(virtio::kFAccessPlatform);
  return f;
}

std::uint64_t BackendServer::Impl::offered_protocol_features() const {
  using F = ProtocolFeature;
  std::uint64_t f = vhost_user::bit(F::mq) | vhost_user::bit(F::log_shmfd) |
                    vhost_user::bit(F::reply_ack) | vhost_user::bit(F::backend_req) |
                    vhost_user::bit(F::status) | vhost_user::bit(F::configure_mem_slots) |
                    vhost_user::bit(F::reset_device) | vhost_user::bit(F::device_state);
  if (!device_.config().empty()) f |= vhost_user::bit(F::config);
  if (device_.inflight_tracking()) f |= vhost_user::bit(F::inflight_shmfd);
  if (options_.offer_gpa_addresses) f |= vhost_user::bit(F::gpa_addresses);
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

void BackendServer::Impl::stop() {
  stopping_.store(true);
  std::uint64_t one = 1;
  (void)!::write(stop_fd_.get(), &one, sizeof one);
}

Result<void, std::string> BackendServer::Impl::run(int listen_fd) {
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

bool BackendServer::Impl::refuse(int conn, const Message& m, const std::string& why) {
  ++rejected;
  log(LogLevel::error, "{}: {} refused: {}", device_.name(), request_name(Channel::main, m.request),
      why);
  std::optional<Message> out;
  if (has_own_reply(m, negotiated_)) {
    out = neutral_reply(m);
  } else if (m.need_reply()) {
    out = make_ack(m, false);
  }
  if (!out) return true;
  if (auto w = write_message(conn, *out); !w) {
    log(LogLevel::error, "{}: reply to {}: {}", device_.name(),
        request_name(Channel::main, m.request), w.error().message());
    return false;
  }
  return true;
}

void BackendServer::Impl::serve(UniqueFd conn) {
  while (!stopping_.load()) {
    pollfd fds[2] = {{conn.get(), POLLIN, 0}, {stop_fd_.get(), POLLIN, 0}};
    int pr = ::poll(fds, 2, -1);
    if (pr < 0 && errno == EINTR) continue;
    if (pr < 0 || (fds[1].revents & POLLIN)) break;
    if (!(fds[0].revents & (POLLIN | POLLHUP | POLLERR))) continue;
    auto m = read_message(conn.get());
    if (!m) {
      const CodecError& e = m.error();
      if (!e.recoverable()) {
        if (e.code != CodecErrc::closed)
          log(LogLevel::error, "{}: {}; closing the connection", device_.name(), e.message());
        break;
      }
      // Read whole but refused (too many or misplaced fds; they are closed already):
      // answer from its header.
      if (!refuse(conn.get(), Message{e.request, e.flags, {}, {}}, e.message())) break;
      continue;
    }
    if (auto v = validate_frontend_request(*m, negotiated_); !v) {
      // The stream is still in step (the whole message was read): refuse this one.
      if (!refuse(conn.get(), *m, v.error().message())) break;
      continue;
    }
    const FrontendRequest req = m->frontend_request();
    log(LogLevel::debug, "{}: {} (flags {:#x}, {} bytes, {} fds)", device_.name(), to_string(req),
        m->flags, m->payload.size(), m->fds.size());
    // What a refusal needs of the request once handle() has taken its fds.
    const Message request{m->request, m->flags, m->payload, {}};
    Reply r = (needs_owner(req) && !owner_)
                  ? Reply(unexpected(std::string("front-end has not sent SET_OWNER")))
                  : handle(std::move(*m));
    ++handled;
    if (!r) {
      if (!refuse(conn.get(), request, r.error())) break;
      continue;
    }
    std::optional<Message> out;
    if (r->has_value()) {
      out = std::move(**r);
    } else if (request.need_reply() && !has_own_reply(request, negotiated_)) {
      out = make_ack(request, true);
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

void BackendServer::Impl::stop_all_rings() {
  for (auto& q : queues_)
    if (q.runner) (void)q.runner->stop();
}

void BackendServer::Impl::reset_connection() {
  reset_device_state(false);
  for (auto& q : queues_) {
    q.stopped_at.reset();
    q.err.reset();
    q.started = false;
  }
  drop_inflight();
  (void)space_->set_log(nullptr);
  space_->clear_memory();
  (void)space_->synchronize();
  owner_ = false;
  negotiated_ = Negotiated{};
  {
    std::lock_guard lock(backend_mu_);
    backend_fd_.reset();
  }
}

Result<BackendServer::Impl::Queue*, std::string> BackendServer::Impl::queue(std::uint32_t index) {
  if (index >= queues_.size())
    return unexpected(
        fmt::format("queue index {} out of range (device has {})", index, queues_.size()));
  return &queues_[index];
}

BackendServer::Impl::Reply BackendServer::Impl::handle(Message m) {
  using R = FrontendRequest;
  switch (m.frontend_request()) {
    case R::get_features: return make_u64_reply(m, offered_features());
    case R::set_features: return set_features(m);
    case R::set_owner: owner_ = true; return std::nullopt;
    case R::reset_owner:  // deprecated: disable every ring
      stop_all_rings();
      return std::nullopt;
    case R::get_protocol_features: return make_u64_reply(m, offered_protocol_features());
    case R::set_protocol_features: return set_protocol_features(m);
    case R::get_queue_num: return make_u64_reply(m, queues_.size());
    case R::get_max_mem_slots: return make_u64_reply(m, options_.max_mem_slots);
    case R::set_mem_table: return set_mem_table(std::move(m));
    case R::add_mem_reg: return add_mem_reg(std::move(m));
    case R::rem_mem_reg: return rem_mem_reg(std::move(m));
    case R::set_log_base: return set_log_base(std::move(m));
    case R::set_log_fd:  // the log eventfd is optional and unused: it closes with m
      return std::nullopt;
    case R::set_vring_num: return set_vring_num(m);
    case R::set_vring_addr: return set_vring_addr(m);
    case R::set_vring_base: return set_vring_base(m);
    case R::get_vring_base: return get_vring_base(m);
    case R::set_vring_kick:
    case R::set_vring_call:
    case R::set_vring_err: return set_vring_file(std::move(m));
    case R::set_vring_enable: return set_vring_enable(m);
    case R::set_backend_req_fd: return set_backend_req_fd(std::move(m));
    case R::iotlb_msg: return iotlb_msg(m);
    case R::get_config: return get_config(m);
    case R::set_config: return set_config(m);
    case R::set_status: return set_status(m);
    case R::get_status: return make_u64_reply(m, status_);
    case R::reset_device: return reset_device();
    case R::set_device_state_fd: return set_device_state_fd(std::move(m));
    case R::check_device_state: return check_device_state(m);
    case R::get_inflight_fd: return get_inflight_fd(m);
    case R::set_inflight_fd: return set_inflight_fd(std::move(m));
    default: return unexpected(fmt::format("{} is not supported", to_string(m.frontend_request())));
  }
}

BackendServer::Impl::Reply BackendServer::Impl::set_protocol_features(const Message& m) {
  auto f = body<std::uint64_t>(m);
  if (!f) return unexpected(f.error());
  if (*f & ~offered_protocol_features())
    return unexpected(
        fmt::format("protocol features {:#x} not offered", *f & ~offered_protocol_features()));
  negotiated_.protocol_features = *f;
  return std::nullopt;
}

BackendServer::Impl::Reply BackendServer::Impl::set_features(const Message& m) {
  auto fv = body<std::uint64_t>(m);
  if (!fv) return unexpected(fv.error());
  const std::uint64_t f = *fv;
  std::uint64_t extra = f & ~offered_features();
  if (extra != 0) return unexpected(fmt::format("features {:#x} were not offered", extra));
  bool iommu = (f >> virtio::kFAccessPlatform) & 1;
  bool log_all = (f >> virtio::kVhostFLogAll) & 1;
  bool was_logging = has(virtio::kVhostFLogAll);
  negotiated_.features = f;
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
// A memory region as the memory table takes it. With GPA_ADDRESSES the region carries no
// front-end address: the table's user address is then the GPA itself, which no lookup
// uses (every address the front-end sends is a GPA or an IOVA).
RegionSpec spec_of(RegionWithFd r, const Negotiated& n) {
  RegionSpec s;
  s.fd = std::move(r.fd);
  s.mmap_offset = r.region.mmap_offset;
  s.size = r.region.size;
  s.gpa = r.region.guest_addr;
  const UserAddress ua = r.region.user_address(n);
  s.uaddr =
      std::holds_alternative<Uaddr>(ua) ? std::get<Uaddr>(ua) : Uaddr(std::get<Gpa>(ua).value);
  return s;
}
}  // namespace

BackendServer::Impl::Reply BackendServer::Impl::set_mem_table(Message m) {
  auto regions = decode_mem_table(std::move(m), negotiated_);
  if (!regions) return unexpected(regions.error().message());
  if (regions->empty()) return unexpected(std::string("a memory table without regions"));
  std::vector<RegionSpec> specs;
  for (auto& r : *regions) specs.push_back(spec_of(std::move(r), negotiated_));
  if (auto r = space_->set_mem_table(std::move(specs)); !r) return unexpected(r.error().message());
  if (!space_->synchronize()) return unexpected(std::string("workers did not quiesce"));
  return std::nullopt;
}

BackendServer::Impl::Reply BackendServer::Impl::add_mem_reg(Message m) {
  auto r = decode_mem_reg(std::move(m), negotiated_);
  if (!r) return unexpected(r.error().message());
  if (auto ok = space_->add_region(spec_of(std::move(*r), negotiated_)); !ok)
    return unexpected(ok.error().message());
  if (!space_->synchronize()) return unexpected(std::string("workers did not quiesce"));
  return std::nullopt;
}

BackendServer::Impl::Reply BackendServer::Impl::rem_mem_reg(Message m) {
  auto r = decode_mem_reg(std::move(m), negotiated_);
  if (!r) return unexpected(r.error().message());
  if (auto ok = space_->remove_region(r->region.guest_addr, r->region.size); !ok)
    return unexpected(ok.error().message());
  // After the ack the front-end may unmap the region: no worker may still use it.
  if (!space_->synchronize()) return unexpected(std::string("workers did not quiesce"));
  return std::nullopt;
}

BackendServer::Impl::Reply BackendServer::Impl::set_log_base(Message m) {
  const Message request{m.request, m.flags, {}, {}};
  auto d = decode_log_base(std::move(m), negotiated_);
  if (!d) return unexpected(d.error().message());
  auto log_map = DirtyLog::map(std::move(d->fd), d->log.size, d->log.offset);
  if (!log_map) return unexpected(log_map.error().message());
  if (auto r = space_->set_log(*log_map); !r) return unexpected(r.error().message());
  if (!space_->synchronize()) return unexpected(std::string("workers did not quiesce"));
  log(LogLevel::info, "{}: dirty log of {} bytes (covers {:#x})", device_.name(), d->log.size,
      (*log_map)->covered_end().value);
  // The reply to SET_LOG_BASE (LOG_SHMFD) carries no payload.
  return make_empty_reply(request);
}

BackendServer::Impl::Reply BackendServer::Impl::set_vring_num(const Message& m) {
  auto s = body<VringState>(m);
  if (!s) return unexpected(s.error());
  auto q = queue(s->index);
  if (!q) return unexpected(q.error());
  if ((*q)->runner->running()) return unexpected(std::string("SET_VRING_NUM on a running ring"));
  if (s->num == 0 || s->num > virtio::kMaxQueueSize)
    return unexpected(fmt::format("queue size {} out of range", s->num));
  (*q)->num = s->num;
  return std::nullopt;
}

BackendServer::Impl::Reply BackendServer::Impl::set_vring_addr(const Message& m) {
  auto a = body<VringAddr>(m);
  if (!a) return unexpected(a.error());
  auto q = queue(a->index);
  if (!q) return unexpected(q.error());
  if ((*q)->runner->running()) {
    const auto& old = *(*q)->addr;
    if (old.desc != a->desc || old.used != a->used || old.avail != a->avail)
      return unexpected(std::string("ring addresses changed while the ring runs"));
    // Only the logging flag may change while running; logging is done at our own
    // translation either way (docs/architecture.md, "Virtqueues").
  }
  (*q)->addr = *a;
  return std::nullopt;
}

BackendServer::Impl::Reply BackendServer::Impl::set_vring_base(const Message& m) {
  auto s = body<VringState>(m);
  if (!s) return unexpected(s.error());
  auto q = queue(s->index);
  if (!q) return unexpected(q.error());
  if ((*q)->runner->running()) return unexpected(std::string("SET_VRING_BASE on a running ring"));
  (*q)->base = s->num;
  (*q)->stopped_at.reset();
  return std::nullopt;
}

BackendServer::Impl::Reply BackendServer::Impl::set_vring_file(Message m) {
  const FrontendRequest req = m.frontend_request();
  auto f = decode_vring_file(std::move(m), negotiated_);
  if (!f) return unexpected(f.error().message());
  auto q = queue(f->index);
  if (!q) return unexpected(q.error());
  switch (req) {
    case FrontendRequest::set_vring_kick: {
      if ((*q)->runner->running()) (void)(*q)->runner->stop();
      if (auto r = start_ring(f->index, std::move(f->fd)); !r) return unexpected(r.error());
      return std::nullopt;
    }
    case FrontendRequest::set_vring_call: (*q)->runner->set_call(std::move(f->fd)); break;
    default: (*q)->err = std::move(f->fd); break;
  }
  return std::nullopt;
}

BackendServer::Impl::Reply BackendServer::Impl::set_vring_enable(const Message& m) {
  auto s = body<VringState>(m);
  if (!s) return unexpected(s.error());
  auto q = queue(s->index);
  if (!q) return unexpected(q.error());
  if (s->num > 1) return unexpected(fmt::format("SET_VRING_ENABLE value {}", s->num));
  (*q)->enabled = s->num == 1;
  (*q)->enable_set = true;
  (*q)->runner->set_enabled(s->num == 1);
  return std::nullopt;
}

BackendServer::Impl::Reply BackendServer::Impl::set_backend_req_fd(Message m) {
  std::lock_guard lock(backend_mu_);
  backend_fd_ = std::move(m.fds[0]);
  // Room for a look-ahead burst of IOTLB misses (each small message costs about 1 KiB of
  // socket memory).
  int bytes = 4 << 20;
  (void)::setsockopt(backend_fd_.get(), SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
  return std::nullopt;
}

BackendServer::Impl::Reply BackendServer::Impl::get_config(const Message& m) {
  auto c = decode_config(m);
  if (!c) return unexpected(c.error().message());
  auto cfg = device_.config();
  if (static_cast<std::uint64_t>(c->offset) + c->size > cfg.size())
    return unexpected(
        fmt::format("config read [{}, +{}) beyond {} bytes", c->offset, c->size, cfg.size()));
  auto r = make_config_reply(m, std::span(cfg).subspan(c->offset, c->size));
  if (!r) return unexpected(r.error().message());
  return std::move(*r);
}

BackendServer::Impl::Reply BackendServer::Impl::set_config(const Message& m) {
  auto c = decode_config(m);
  if (!c) return unexpected(c.error().message());
  if (!device_.set_config(c->offset, c->bytes()))
    return unexpected(fmt::format("config write at {} of {} bytes refused", c->offset, c->size));
  return std::nullopt;
}

BackendServer::Impl::Reply BackendServer::Impl::reset_device() {
  reset_device_state(true);
  log(LogLevel::info, "{}: device reset", device_.name());
  return std::nullopt;
}

BackendServer::Impl::Reply BackendServer::Impl::set_status(const Message& m) {
  auto v = body<std::uint64_t>(m);
  if (!v) return unexpected(v.error());
  if (*v > 0xff) return unexpected(fmt::format("device status {:#x} has more than 8 bits", *v));
  if (*v == 0) return reset_device();  // virtio: writing 0 resets the device
  status_ = static_cast<std::uint8_t>(*v);
  return std::nullopt;
}

// The device as a driver finds it after a reset: every ring stopped and its setup
// forgotten (size, addresses, base, call fd, enable state), no features (so neither the
// IOMMU nor dirty logging), an empty IOTLB, no state transfer, the device's own reset.
// What belongs to the connection stays: ownership, protocol features, the back-end
// channel, the memory table, the dirty log's mapping, each ring's error fd (QEMU sends
// SET_VRING_ERR once per connection).
void BackendServer::Impl::reset_device_state(bool driver_reset) {
  if (transfer_) (void)finish_transfer(true);
  transfer_outcome_.reset();
  const bool packed = has(virtio::kFRingPacked);
  for (auto& q : queues_) {
    // Stopped while logging is still on: every write the ring made is in the log.
    if (q.runner->running()) q.stopped_at = vring_base(q.runner->stop(), packed);
    q.num = 0;
    q.addr.reset();
    q.base = 0;
    q.enabled = true;
    q.enable_set = false;
    q.runner->set_call(UniqueFd());
    q.runner->queue().reset();
    if (driver_reset) q.runner->queue().clear_inflight();
  }
  negotiated_.features = 0;
  space_->set_logging(false);
  space_->set_iommu(false);
  space_->iotlb_flush();
  (void)space_->synchronize();
  // A driver reset clears the inflight records above: they belong to the driver that was
  // reset. A disconnect keeps them for the back-end the front-end connects next.
  device_.reset();
  status_ = 0;
}

std::optional<std::uint32_t> BackendServer::Impl::running_ring() const {
  for (std::uint32_t i = 0; i < queues_.size(); ++i)
    if (queues_[i].runner->running()) return i;
  return std::nullopt;
}

BackendServer::Impl::Reply BackendServer::Impl::set_device_state_fd(Message m) {
  if (!has(ProtocolFeature::device_state))
    return unexpected(std::string("VHOST_USER_PROTOCOL_F_DEVICE_STATE was not negotiated"));
  auto t = body<DeviceStateTransfer>(m);
  if (!t) return unexpected(t.error());
  if (t->direction > 1)
    return unexpected(fmt::format("transfer direction {} (0 save, 1 load)", t->direction));
  if (t->phase != 0)
    return unexpected(fmt::format("transfer phase {} (only 0, stopped, is supported)", t->phase));
  if (transfer_) {
    bool running;
    {
      std::lock_guard lock(transfer_->mu);
      running = !transfer_->done;
    }
    if (running) return unexpected(std::string("a device state transfer is still running"));
  }
  if (auto q = running_ring())
    return unexpected(
        fmt::format("queue {} runs: state moves only while every ring is stopped", *q));
  // A finished transfer nobody checked is superseded.
  if (transfer_) (void)finish_transfer(true);
  transfer_outcome_.reset();
  auto x = std::make_unique<Transfer>();
  x->load = t->direction == 1;
  x->fd = std::move(m.fds[0]);
  x->cancel.reset(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!x->cancel.valid()) return unexpected(fmt::format("eventfd: {}", std::strerror(errno)));
  if (!x->load) {
    // The state is taken now, with every ring stopped; the thread only writes it out.
    DeviceStateWriter w;
    device_.save_state(w);
    auto image = encode_device_state(
        DeviceStateHeader{device_.state_format(), static_cast<std::uint32_t>(queues_.size())}, w);
    if (!image) return unexpected(image.error().message());
    x->image = std::move(*image);
    log(LogLevel::info, "{}: saving the device state ({} bytes)", device_.name(), x->image.size());
  } else {
    log(LogLevel::info, "{}: loading a device state", device_.name());
  }
  Transfer* raw = x.get();
  x->thread = std::thread([raw] { raw->run(); });
  transfer_ = std::move(x);
  // Success, and no fd of our own: the front-end's channel is used.
  return make_u64_reply(m, kDeviceStateNoFdMask);
}

Result<void, std::string> BackendServer::Impl::finish_transfer(bool cancel) {
  Transfer& t = *transfer_;
  if (!cancel) {
    std::unique_lock lock(t.mu);
    if (!t.cv.wait_for(lock, options_.state_transfer_grace, [&] { return t.done; })) {
      log(LogLevel::error,
          "{}: the device state transfer did not end {} ms after the front-end "
          "said it had",
          device_.name(), options_.state_transfer_grace.count());
      cancel = true;
    }
  }
  if (cancel) {
    std::uint64_t one = 1;
    (void)!::write(t.cancel.get(), &one, sizeof one);
  }
  t.thread.join();
  Result<void, std::string> outcome;
  if (!t.error.empty())
    outcome = unexpected(fmt::format("device state {}: {}", t.load ? "load" : "save", t.error));
  else if (t.load)
    outcome = load_state(t.image);
  transfer_.reset();
  transfer_outcome_ = outcome;
  return outcome;
}

Result<void, std::string> BackendServer::Impl::load_state(std::span<const std::uint8_t> image) {
  auto d = decode_device_state(image);
  if (!d) return unexpected(d.error().message());
  const DeviceStateFormat mine = device_.state_format();
  const DeviceStateHeader& h = d->header;
  if (h.format.kind != mine.kind)
    return unexpected(fmt::format("the state is of a '{}' device, this device is '{}'",
                                  h.format.kind, mine.kind));
  if (h.format.version > mine.version)
    return unexpected(fmt::format("state version {} is newer than this device's {}",
                                  h.format.version, mine.version));
  if (h.queues != queues_.size())
    return unexpected(
        fmt::format("the state is of {} queues, this device has {}", h.queues, queues_.size()));
  if (auto q = running_ring())
    return unexpected(fmt::format("queue {} started before the state was loaded", *q));
  if (auto r = device_.load_state(d->records, h.format.version); !r)
    return unexpected("the device refused its state: " + r.error());
  log(LogLevel::info, "{}: device state loaded ({} bytes, {} version {})", device_.name(),
      image.size(), h.format.kind, h.format.version);
  return {};
}

BackendServer::Impl::Reply BackendServer::Impl::check_device_state(const Message& m) {
  if (!has(ProtocolFeature::device_state))
    return unexpected(std::string("VHOST_USER_PROTOCOL_F_DEVICE_STATE was not negotiated"));
  if (transfer_) (void)finish_transfer(false);
  if (!transfer_outcome_) return unexpected(std::string("no device state transfer to check"));
  Result<void, std::string> outcome = std::move(*transfer_outcome_);
  transfer_outcome_.reset();
  if (!outcome) return unexpected(outcome.error());
  return make_u64_reply(m, 0);
}

Result<Iova, std::string> BackendServer::Impl::ring_iova(const RingAddress& a) const {
  // IOVAs with the IOMMU; GPAs (IOVA == GPA without it) with GPA_ADDRESSES; otherwise the
  // front-end's own virtual addresses, which we turn into GPAs through our memory table.
  if (const auto* iova = std::get_if<Iova>(&a)) return *iova;
  if (const auto* gpa = std::get_if<Gpa>(&a)) return Iova(gpa->value);
  const Uaddr ua = std::get<Uaddr>(a);
  auto g = space_->memory()->uaddr_to_gpa(ua);
  if (!g) return unexpected(fmt::format("ring address {:#x} is not in guest memory", ua.value));
  return Iova(g->gpa.value);
}

Result<void, std::string> BackendServer::Impl::start_ring(std::uint32_t index, UniqueFd kick) {
  Queue& q = queues_[index];
  // A state being loaded belongs to the device before any ring runs.
  if (transfer_ && transfer_->load) {
    if (auto r = finish_transfer(false); !r)
      return unexpected(fmt::format("queue {} not started: {}", index, r.error()));
  }
  q.stopped_at.reset();
  if (q.num == 0 || !q.addr)
    return unexpected(fmt::format("queue {} started before SET_VRING_NUM/ADDR", index));
  QueueConfig c;
  c.format = has(virtio::kFRingPacked) ? RingFormat::packed : RingFormat::split;
  if (q.num == virtio::kMaxQueueSize)
    return unexpected(std::string("queue size 32768 is not supported"));
  c.size = static_cast<std::uint16_t>(q.num);
  c.indirect = has(virtio::kFRingIndirectDesc);
  c.event_idx = has(virtio::kFRingEventIdx);
  auto desc = ring_iova(q.addr->desc_address(negotiated_));
  auto avail = ring_iova(q.addr->avail_address(negotiated_));
  auto used = ring_iova(q.addr->used_address(negotiated_));
  if (!desc) return unexpected(desc.error());
  if (!avail) return unexpected(avail.error());
  if (!used) return unexpected(used.error());
  c.addr = RingAddresses{*desc, *avail, *used};
  if (q.addr->logging()) c.log_guest_addr = q.addr->log;
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
  q.started = true;  // its inflight records are ours from now on
  return {};
}

BackendServer::Impl::Reply BackendServer::Impl::get_inflight_fd(const Message& m) {
  if (!has(ProtocolFeature::inflight_shmfd))
    return unexpected(std::string("VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD was not negotiated"));
  auto d = body<InflightDesc>(m);
  if (!d) return unexpected(d.error());
  if (d->num_queues == 0 || d->num_queues > queues_.size())
    return unexpected(
        fmt::format("inflight area for {} queues (device has {})", d->num_queues, queues_.size()));
  if (d->queue_size == 0 || d->queue_size >= virtio::kMaxQueueSize)
    return unexpected(fmt::format("inflight area for queues of {} descriptors", d->queue_size));
  const std::uint64_t size = d->num_queues * inflight::queue_region_size(d->queue_size);
  UniqueFd fd(::memfd_create("vhostkit-inflight", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd.valid()) return unexpected(fmt::format("memfd_create: {}", std::strerror(errno)));
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0)
    return unexpected(fmt::format("ftruncate inflight area: {}", std::strerror(errno)));
  // A region of zeros: each ring initialises its part when it first starts.
  (void)::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK);
  Message reply = make_reply(m, InflightDesc{size, 0, d->num_queues, d->queue_size, {}});
  reply.fds.push_back(std::move(fd));
  log(LogLevel::info, "{}: inflight area of {} bytes for {} queues of {}", device_.name(), size,
      d->num_queues, d->queue_size);
  return reply;
}

BackendServer::Impl::Reply BackendServer::Impl::set_inflight_fd(Message m) {
  if (!has(ProtocolFeature::inflight_shmfd))
    return unexpected(std::string("VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD was not negotiated"));
  auto d = body<InflightDesc>(m);
  if (!d) return unexpected(d.error());
  if (auto q = running_ring())
    return unexpected(
        fmt::format("queue {} runs: the inflight area changes only while every "
                    "ring is stopped",
                    *q));
  if (d->num_queues == 0 || d->num_queues > queues_.size())
    return unexpected(
        fmt::format("inflight area for {} queues (device has {})", d->num_queues, queues_.size()));
  if (d->queue_size == 0 || d->queue_size >= virtio::kMaxQueueSize)
    return unexpected(fmt::format("inflight area for queues of {} descriptors", d->queue_size));
  const std::uint64_t per_queue = inflight::queue_region_size(d->queue_size);
  const std::uint64_t need = d->num_queues * per_queue;
  if (d->mmap_size < need || d->mmap_size > need + per_queue)
    return unexpected(fmt::format("inflight area of {} bytes for {} queues of {} (needs {})",
                                  d->mmap_size, d->num_queues, d->queue_size, need));
  const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  if (d->mmap_offset % page != 0)
    return unexpected(
        fmt::format("inflight area offset {:#x} is not page aligned", d->mmap_offset));
  struct stat st {};
  if (::fstat(m.fds[0].get(), &st) != 0)
    return unexpected(fmt::format("inflight fd: {}", std::strerror(errno)));
  const auto file = static_cast<std::uint64_t>(st.st_size);
  if (d->mmap_offset > file || d->mmap_size > file - d->mmap_offset)
    return unexpected(fmt::format("inflight area [{:#x}, +{:#x}) beyond its file ({} bytes)",
                                  d->mmap_offset, d->mmap_size, file));
  void* base = ::mmap(nullptr, d->mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, m.fds[0].get(),
                      static_cast<off_t>(d->mmap_offset));
  if (base == MAP_FAILED)
    return unexpected(fmt::format("mmap inflight area: {}", std::strerror(errno)));
  drop_inflight();
  inflight_ = std::make_unique<InflightMap>();
  inflight_->base = base;
  inflight_->len = d->mmap_size;
  auto* bytes = static_cast<std::uint8_t*>(base);
  for (std::uint32_t i = 0; i < queues_.size(); ++i) {
    std::span<std::uint8_t> region;
    if (i < d->num_queues) region = {bytes + i * per_queue, per_queue};
    // A ring that has not run in this connection recovers a predecessor's records.
    queues_[i].runner->queue().set_inflight(region, !queues_[i].started);
  }
  log(LogLevel::info, "{}: inflight area of {} bytes for {} queues of {} mapped", device_.name(),
      d->mmap_size, d->num_queues, d->queue_size);
  return std::nullopt;
}

void BackendServer::Impl::drop_inflight() {
  for (auto& q : queues_) q.runner->queue().set_inflight({}, false);
  inflight_.reset();
}

BackendServer::Impl::Reply BackendServer::Impl::get_vring_base(const Message& m) {
  auto s = body<VringState>(m);
  if (!s) return unexpected(s.error());
  auto q = queue(s->index);
  if (!q) return unexpected(q.error());
  std::uint32_t num;
  if (!(*q)->runner->running() && (*q)->stopped_at) {
    num = *(*q)->stopped_at;  // a reset stopped it (and cleared the features)
    (*q)->stopped_at.reset();
  } else {
    num = vring_base((*q)->runner->stop(), has(virtio::kFRingPacked));
  }
  (*q)->base = num;
  return make_reply(m, VringState{s->index, num});
}

BackendServer::Impl::Reply BackendServer::Impl::iotlb_msg(const Message& m) {
  auto ev = decode_iotlb(m, Channel::main, negotiated_);
  if (!ev) return unexpected(ev.error().message());
  log(LogLevel::debug, "{}: IOTLB type {} iova {:#x} size {:#x} perm {}", device_.name(),
      static_cast<unsigned>(ev->type), ev->iova.value, ev->size, to_string(ev->perm));
  if (!has(virtio::kFAccessPlatform))
    return unexpected(std::string("IOTLB message without VIRTIO_F_ACCESS_PLATFORM"));
  if (ev->type == IotlbType::update) {
    if (ev->perm == Access::none)
      return unexpected(std::string("IOTLB update without any permission"));
    auto r =
        std::holds_alternative<Gpa>(ev->target)
            ? space_->iotlb_update(ev->iova, ev->size, std::get<Gpa>(ev->target), ev->perm)
            : space_->iotlb_update_uaddr(ev->iova, ev->size, std::get<Uaddr>(ev->target), ev->perm);
    if (!r) return unexpected(r.error().message());
    for (auto& q : queues_) q.runner->wake();  // deferred chains can go on
    return std::nullopt;
  }
  // An invalidation (decode_iotlb accepts nothing else from a front-end).
  if (auto r = space_->iotlb_invalidate(ev->iova, ev->size); !r)
    return unexpected(r.error().message());
  // After the ack the guest may reuse the memory: no worker may still translate through
  // the removed entry.
  if (!space_->synchronize()) return unexpected(std::string("workers did not quiesce"));
  return std::nullopt;
}

void BackendServer::Impl::broken(std::uint32_t q, const VirtqueueError& e) {
  log(LogLevel::error, "{}: queue {} broken: {}", device_.name(), q, e.message());
  // Tell the front-end through the queue's error eventfd, if it gave one.
  if (queues_[q].err.valid()) {
    std::uint64_t one = 1;
    (void)!::write(queues_[q].err.get(), &one, sizeof one);
  }
}

void BackendServer::Impl::send_miss(std::uint32_t queue, const TranslateError& miss) {
  std::lock_guard lock(backend_mu_);
  if (!backend_fd_.valid()) {
    log(LogLevel::warn, "{}: queue {} misses IOVA {:#x} but there is no back-end channel",
        device_.name(), queue, miss.addr.value);
    return;
  }
  log(LogLevel::debug, "{}: queue {} IOTLB miss at {:#x} ({})", device_.name(), queue,
      miss.addr.value, to_string(miss.access));
  const IotlbMsg t{miss.addr,
                   0,
                   0,
                   static_cast<std::uint8_t>(miss.access),
                   static_cast<std::uint8_t>(IotlbType::miss),
                   {}};
  const Message msg = make_backend_request(BackendRequest::iotlb_msg, t);
  // Never block a worker on a full channel: the front-end may be waiting for this very
  // worker (GET_VRING_BASE under QEMU's lock) and not reading the channel, which would
  // deadlock both. A miss not sent now is sent again after the IOTLB's miss timeout.
  if (auto w = try_write_message(backend_fd_.get(), msg, Channel::backend); !w) {
    if (w.error().sys_errno == EAGAIN || w.error().sys_errno == EWOULDBLOCK)
      log(LogLevel::debug, "{}: queue {} IOTLB miss at {:#x}: channel full, sent again later",
          device_.name(), queue, miss.addr.value);
    else
      log(LogLevel::warn, "{}: sending IOTLB miss: {}", device_.name(), w.error().message());
  }
}

}  // namespace vhostkit
