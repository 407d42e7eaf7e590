// FrontendClient: the VMM side of vhost-user, for tests, tools and benchmarks.
#include "vhostkit/frontend/frontend_client.h"

#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <fcntl.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>

#include <fmt/format.h>

#include "vhost_user/internal/state_stream.h"
#include "vhostkit/log.h"
#include "vhostkit/vhost_user/device_state.h"
#include "vhostkit/vhost_user/socket.h"
#include "vhostkit/virtio_spec.h"

namespace vhostkit::frontend {

using namespace vhost_user;
using virtio::bit;

FrontendClient::FrontendClient(UniqueFd socket) : sock_(std::move(socket)) {}

FrontendClient::~FrontendClient() {
  close();
  if (log_map_ != nullptr) ::munmap(log_map_, log_map_len_);
  drop_inflight();
}

Result<std::unique_ptr<FrontendClient>, std::string> FrontendClient::connect(
    const std::string& path) {
  sockaddr_un addr{};
  if (path.size() >= sizeof addr.sun_path) return unexpected(std::string("socket path too long"));
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid() || ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
    return unexpected(fmt::format("connect {}: {}", path, std::strerror(errno)));
  return adopt(std::move(fd));
}

std::unique_ptr<FrontendClient> FrontendClient::adopt(UniqueFd socket) {
  return std::unique_ptr<FrontendClient>(new FrontendClient(std::move(socket)));
}

void FrontendClient::close() {
  closing_.store(true);
  if (backend_sock_.valid()) ::shutdown(backend_sock_.get(), SHUT_RDWR);
  if (backend_thread_.joinable()) backend_thread_.join();
  std::lock_guard lock(mu_);
  sock_.reset();
}

bool FrontendClient::gpa_addresses() const {
  return negotiated().has(ProtocolFeature::gpa_addresses);
}
bool FrontendClient::iommu() const {
  return (features() >> virtio::kFAccessPlatform) & 1;
}

Result<void, std::string> FrontendClient::send(const Message& m) {
  std::lock_guard lock(mu_);
  if (auto w = write_message(sock_.get(), m); !w) return unexpected(w.error().message());
  return {};
}

Result<Message, std::string> FrontendClient::request_reply(Message m) {
  std::lock_guard lock(mu_);
  return exchange_locked(std::move(m));
}

Result<Message, std::string> FrontendClient::exchange_locked(Message m) {
  const FrontendRequest to = m.frontend_request();
  if (auto w = write_message(sock_.get(), m); !w) return unexpected(w.error().message());
  auto r = read_message(sock_.get());
  if (!r) return unexpected(fmt::format("reply to {}: {}", to_string(to), r.error().message()));
  if (auto v = validate_reply(*r, m, negotiated()); !v) return unexpected(v.error().message());
  return std::move(*r);
}

Result<void, std::string> FrontendClient::request_ack_locked(Message m) {
  // IOTLB_MSG is always acknowledged, as QEMU asks for it; anything else when REPLY_ACK
  // was negotiated.
  const bool ack = negotiated().has(ProtocolFeature::reply_ack) ||
                   m.frontend_request() == FrontendRequest::iotlb_msg;
  const FrontendRequest to = m.frontend_request();
  if (!ack) {
    if (auto w = write_message(sock_.get(), m); !w) return unexpected(w.error().message());
    return {};
  }
  m.flags |= kFlagNeedReply;
  auto r = exchange_locked(std::move(m));
  if (!r) return unexpected(r.error());
  auto v = decode_u64(*r);
  if (!v) return unexpected(fmt::format("reply to {}: {}", to_string(to), v.error().message()));
  if (*v != 0) return unexpected(fmt::format("back-end refused {}", to_string(to)));
  return {};
}

Result<void, std::string> FrontendClient::request_ack(Message m) {
  std::lock_guard lock(mu_);
  return request_ack_locked(std::move(m));
}

Result<void, std::string> FrontendClient::negotiate(const ClientOptions& options) {
  auto f = request_reply(make_request(FrontendRequest::get_features));
  if (!f) return unexpected(f.error());
  const std::uint64_t offered = *decode_u64(*f);  // validate_reply checked the size
  if (!((offered >> kFProtocolFeatures) & 1))
    return unexpected(std::string("back-end does not offer VHOST_USER_F_PROTOCOL_FEATURES"));
  auto pf = request_reply(make_request(FrontendRequest::get_protocol_features));
  if (!pf) return unexpected(pf.error());
  using F = ProtocolFeature;
  std::uint64_t want_pf = vhost_user::bit(F::mq) | vhost_user::bit(F::log_shmfd) |
                          vhost_user::bit(F::reply_ack) | vhost_user::bit(F::backend_req) |
                          vhost_user::bit(F::config) | vhost_user::bit(F::status) |
                          vhost_user::bit(F::configure_mem_slots) |
                          vhost_user::bit(F::reset_device) | vhost_user::bit(F::device_state);
  if (options.want_gpa_addresses) want_pf |= vhost_user::bit(F::gpa_addresses);
  if (options.want_inflight) want_pf |= vhost_user::bit(F::inflight_shmfd);
  const std::uint64_t chosen_pf = *decode_u64(*pf) & want_pf;
  if (auto w = send(make_request(FrontendRequest::set_protocol_features, chosen_pf)); !w) return w;
  protocol_features_.store(chosen_pf, std::memory_order_relaxed);
  if (auto r = request_ack(make_request(FrontendRequest::set_owner)); !r) return r;
  if (negotiated().has(F::backend_req)) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
      return unexpected(fmt::format("socketpair: {}", std::strerror(errno)));
    backend_sock_.reset(sv[0]);
    Message m = make_request(FrontendRequest::set_backend_req_fd);
    m.fds.emplace_back(sv[1]);
    if (auto r = request_ack(std::move(m)); !r) return r;
    backend_thread_ = std::thread([this] { backend_channel_loop(); });
  }
  const std::uint64_t accepted =
      offered & (options.want_features | bit(virtio::kFVersion1) | bit(kFProtocolFeatures));
  features_.store(accepted, std::memory_order_relaxed);
  return request_ack(make_request(FrontendRequest::set_features, accepted));
}

Result<void, std::string> FrontendClient::set_mem_table(const GuestMemory& memory) {
  return set_mem_table_regions(memory, {});
}

Result<void, std::string> FrontendClient::set_mem_table_regions(const GuestMemory& memory,
                                                                const std::vector<bool>& plugged) {
  auto specs = memory.region_specs();
  std::vector<MemRegion> regions;
  std::vector<UniqueFd> fds;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    if (!plugged.empty() && (i >= plugged.size() || !plugged[i])) continue;
    regions.push_back(region_of(specs[i]));
    fds.push_back(std::move(specs[i].fd));
  }
  if (regions.empty()) return unexpected(std::string("a memory table needs at least one region"));
  auto m = make_mem_table(regions, std::move(fds));
  if (!m) return unexpected(m.error().message());
  return request_ack(std::move(*m));
}

MemRegion FrontendClient::region_of(const RegionSpec& s) const {
  return MemRegion{s.gpa, s.size, gpa_addresses() ? s.gpa.value : s.uaddr.value, s.mmap_offset};
}

Result<void, std::string> FrontendClient::add_mem_reg(const GuestMemory& memory,
                                                      std::size_t region) {
  RegionSpec s = memory.region_spec(region);
  const MemRegion r = region_of(s);
  return request_ack(make_mem_reg(FrontendRequest::add_mem_reg, r, std::move(s.fd)));
}

Result<void, std::string> FrontendClient::rem_mem_reg(const GuestMemory& memory,
                                                      std::size_t region) {
  const GuestRegion& r = memory.regions()[region];
  const MemRegion desc{r.gpa, r.size, gpa_addresses() ? r.gpa.value : r.uaddr().value,
                       r.file_offset};
  return request_ack(make_mem_reg(FrontendRequest::rem_mem_reg, desc));
}

std::uint64_t FrontendClient::ring_address(const GuestMemory& memory, Iova device_addr,
                                           Gpa gpa) const {
  if (iommu()) return device_addr.value;
  if (gpa_addresses()) return gpa.value;
  auto ua = memory.uaddr_of(gpa);
  return ua ? ua->value : 0;
}

Result<RingNotifiers, std::string> FrontendClient::start_queue(
    std::uint32_t index, const GuestMemory& memory, const VirtioDriver& driver,
    std::optional<std::uint32_t> base_opt, bool log_ring) {
  std::uint32_t base;
  if (base_opt) {
    base = *base_opt;
  } else if (driver.options().packed) {
    base = (static_cast<std::uint32_t>(driver.avail_idx()) | (driver.avail_wrap() ? 0x8000u : 0u)) |
           ((static_cast<std::uint32_t>(driver.used_idx()) | (driver.used_wrap() ? 0x8000u : 0u))
            << 16);
  } else {
    base = driver.avail_idx();
  }
  if (auto r = request_ack(
          make_request(FrontendRequest::set_vring_num, VringState{index, driver.options().size}));
      !r)
    return unexpected(r.error());
  if (auto r = request_ack(make_request(FrontendRequest::set_vring_base, VringState{index, base}));
      !r)
    return unexpected(r.error());
  RingAddresses a = driver.addresses();
  RingGpas g = driver.gpas();
  VringAddr va{index,
               log_ring ? kVringFlagLog : 0u,
               ring_address(memory, a.desc, g.desc),
               ring_address(memory, a.device, g.device),
               ring_address(memory, a.driver, g.driver),
               g.device};
  if (auto r = request_ack(make_request(FrontendRequest::set_vring_addr, va)); !r)
    return unexpected(r.error());
  RingNotifiers n{UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)),
                  UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK))};
  if (auto r = request_ack(
          make_vring_file(FrontendRequest::set_vring_call, index, UniqueFd(::dup(n.call.get()))));
      !r)
    return unexpected(r.error());
  if (auto r = request_ack(
          make_vring_file(FrontendRequest::set_vring_kick, index, UniqueFd(::dup(n.kick.get()))));
      !r)
    return unexpected(r.error());
  if (auto r = request_ack(make_request(FrontendRequest::set_vring_enable, VringState{index, 1}));
      !r)
    return unexpected(r.error());
  return n;
}

Result<void, std::string> FrontendClient::driver_ok() {
  if (!negotiated().has(ProtocolFeature::status)) return {};
  constexpr std::uint64_t kStatusDriverOk = 1 | 2 | 8 | 4;  // ACK, DRIVER, FEATURES_OK, DRIVER_OK
  return request_ack(make_request(FrontendRequest::set_status, kStatusDriverOk));
}

Result<std::uint32_t, std::string> FrontendClient::stop_queue(std::uint32_t index) {
  auto r = request_reply(make_request(FrontendRequest::get_vring_base, VringState{index, 0}));
  if (!r) return unexpected(r.error());
  auto s = decode_payload<VringState>(*r);
  if (!s) return unexpected(s.error().message());
  return s->num;
}

bool FrontendClient::inflight() const {
  return negotiated().has(ProtocolFeature::inflight_shmfd);
}

Result<void, std::string> FrontendClient::setup_inflight(std::uint16_t num_queues,
                                                         std::uint16_t queue_size) {
  if (!inflight())
    return unexpected(std::string("VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD was not negotiated"));
  if (!inflight_fd_.valid()) {
    auto r = request_reply(make_request(FrontendRequest::get_inflight_fd,
                                        InflightDesc{0, 0, num_queues, queue_size, {}}));
    if (!r) return unexpected(r.error());
    auto d = decode_payload<InflightDesc>(*r);
    if (!d) return unexpected(d.error().message());
    if (d->mmap_size == 0) return unexpected(std::string("back-end returned no inflight area"));
    void* map = ::mmap(nullptr, d->mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, r->fds[0].get(),
                       static_cast<off_t>(d->mmap_offset));
    if (map == MAP_FAILED)
      return unexpected(fmt::format("mmap inflight area: {}", std::strerror(errno)));
    inflight_fd_ = std::move(r->fds[0]);
    inflight_desc_ = *d;
    inflight_map_ = map;
  }
  Message m = make_request(FrontendRequest::set_inflight_fd, inflight_desc_);
  m.fds.emplace_back(::dup(inflight_fd_.get()));
  return request_ack(std::move(m));
}

std::span<const std::uint8_t> FrontendClient::inflight_area() const {
  if (inflight_map_ == nullptr) return {};
  return {static_cast<const std::uint8_t*>(inflight_map_), inflight_desc_.mmap_size};
}

void FrontendClient::drop_inflight() {
  if (inflight_map_ != nullptr) ::munmap(inflight_map_, inflight_desc_.mmap_size);
  inflight_map_ = nullptr;
  inflight_fd_.reset();
  inflight_desc_ = {};
}

Result<std::vector<RingNotifiers>, std::string> FrontendClient::reconnect(
    UniqueFd socket, const ClientOptions& options, const GuestMemory& memory,
    std::span<const VirtioDriver* const> drivers) {
  close();
  {
    std::lock_guard lock(mu_);
    sock_ = std::move(socket);
    backend_sock_.reset();
    closing_.store(false);
    features_ = 0;
    protocol_features_ = 0;
  }
  if (auto r = negotiate(options); !r) return unexpected(r.error());
  if (auto r = set_mem_table(memory); !r) return unexpected(r.error());
  if (inflight_fd_.valid() && inflight()) {
    if (auto r = setup_inflight(inflight_desc_.num_queues, inflight_desc_.queue_size); !r)
      return unexpected(r.error());
  }
  std::vector<RingNotifiers> rings;
  for (std::uint32_t i = 0; i < drivers.size(); ++i) {
    const VirtioDriver& d = *drivers[i];
    std::optional<std::uint32_t> base;
    if (!d.options().packed) {
      // The back-end could not say where it stopped: QEMU resumes from the used index.
      base = std::atomic_ref<std::uint16_t>(
                 *reinterpret_cast<std::uint16_t*>(d.device_host() + virtio::split::kUsedIdx))
                 .load(std::memory_order_acquire);
    }
    auto n = start_queue(i, memory, d, base);
    if (!n) return unexpected(n.error());
    rings.push_back(std::move(*n));
  }
  if (auto r = driver_ok(); !r) return unexpected(r.error());
  return rings;
}

bool FrontendClient::device_state() const {
  return negotiated().has(ProtocolFeature::device_state);
}

namespace {
// How long a device state transfer may stall before the client gives up on the back-end.
constexpr std::chrono::milliseconds kStateTimeout{30000};

// SET_DEVICE_STATE_FD's reply: the back-end's own channel if it returned one, else `ours`.
Result<UniqueFd, std::string> transfer_channel(Message& reply, UniqueFd ours) {
  auto v = decode_u64(reply);
  if (!v) return unexpected(v.error().message());
  if ((*v & 0xff) != 0)
    return unexpected(fmt::format("back-end refused SET_DEVICE_STATE_FD (error {})", *v & 0xff));
  if ((*v & kDeviceStateNoFdMask) != 0) return ours;
  return std::move(reply.fds[0]);  // validate_reply: exactly one fd without the flag
}
}  // namespace

Result<void, std::string> FrontendClient::check_device_state_locked() {
  auto r = exchange_locked(make_request(FrontendRequest::check_device_state));
  if (!r) return unexpected(r.error());
  auto v = decode_u64(*r);
  if (!v) return unexpected(v.error().message());
  if (*v != 0)
    return unexpected(fmt::format(
        "CHECK_DEVICE_STATE answered {}: the back-end failed the transfer (its log says why)", *v));
  return {};
}

Result<std::vector<std::uint8_t>, std::string> FrontendClient::save_device_state() {
  if (!device_state())
    return unexpected(std::string("VHOST_USER_PROTOCOL_F_DEVICE_STATE was not negotiated"));
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) return unexpected(fmt::format("pipe: {}", std::strerror(errno)));
  UniqueFd read_end(p[0]);
  Message m = make_request(FrontendRequest::set_device_state_fd, DeviceStateTransfer{0, 0});
  m.fds.emplace_back(p[1]);  // closed here once sent: the back-end holds the only write end
  std::lock_guard lock(mu_);
  auto reply = exchange_locked(std::move(m));
  if (!reply) return unexpected(reply.error());
  auto channel = transfer_channel(*reply, std::move(read_end));
  if (!channel) return unexpected(channel.error());
  auto state = read_state(channel->get(), kMaxDeviceStateBytes, -1, kStateTimeout);
  channel->reset();
  // CHECK whatever happened, so that the back-end ends its side of the transfer.
  auto checked = check_device_state_locked();
  if (!state) return unexpected("reading the device state: " + state.error());
  if (!checked) return unexpected(checked.error());
  return std::move(*state);
}

Result<void, std::string> FrontendClient::load_device_state(std::span<const std::uint8_t> state) {
  if (!device_state())
    return unexpected(std::string("VHOST_USER_PROTOCOL_F_DEVICE_STATE was not negotiated"));
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) return unexpected(fmt::format("pipe: {}", std::strerror(errno)));
  UniqueFd write_end(p[1]);
  Message m = make_request(FrontendRequest::set_device_state_fd, DeviceStateTransfer{1, 0});
  m.fds.emplace_back(p[0]);
  std::lock_guard lock(mu_);
  auto reply = exchange_locked(std::move(m));
  if (!reply) return unexpected(reply.error());
  auto channel = transfer_channel(*reply, std::move(write_end));
  if (!channel) return unexpected(channel.error());
  auto written = write_state(channel->get(), state, -1, kStateTimeout);
  channel->reset();  // end of file: the whole state
  auto checked = check_device_state_locked();
  if (!written) return unexpected("writing the device state: " + written.error());
  if (!checked) return unexpected(checked.error());
  return {};
}

Result<void, std::string> FrontendClient::reset_device() {
  if (!negotiated().has(ProtocolFeature::reset_device))
    return unexpected(std::string("VHOST_USER_PROTOCOL_F_RESET_DEVICE was not negotiated"));
  return request_ack(make_request(FrontendRequest::reset_device));
}

Result<void, std::string> FrontendClient::set_status(std::uint8_t status) {
  if (!negotiated().has(ProtocolFeature::status))
    return unexpected(std::string("VHOST_USER_PROTOCOL_F_STATUS was not negotiated"));
  return request_ack(make_request(FrontendRequest::set_status, std::uint64_t{status}));
}

Result<void, std::string> FrontendClient::set_features(std::uint64_t features) {
  features_.store(features, std::memory_order_relaxed);
  return request_ack(make_request(FrontendRequest::set_features, features));
}

Result<void, std::string> FrontendClient::enable_logging(std::uint64_t bytes,
                                                         std::uint64_t offset) {
  log_fd_.reset(::memfd_create("vhostkit-dirty-log", MFD_CLOEXEC));
  if (!log_fd_.valid() || ::ftruncate(log_fd_.get(), static_cast<off_t>(offset + bytes)) != 0)
    return unexpected(std::string("cannot create the log memfd"));
  if (log_map_ != nullptr) ::munmap(log_map_, log_map_len_);
  log_map_len_ = offset + bytes;
  log_map_ = ::mmap(nullptr, log_map_len_, PROT_READ | PROT_WRITE, MAP_SHARED, log_fd_.get(), 0);
  if (log_map_ == MAP_FAILED) {
    log_map_ = nullptr;
    return unexpected(std::string("cannot map the log"));
  }
  log_view_ = DirtyLog::over(std::span(static_cast<std::uint8_t*>(log_map_) + offset, bytes));
  auto r = request_reply(make_log_base(LogDesc{bytes, offset}, UniqueFd(::dup(log_fd_.get()))));
  if (!r) return unexpected(r.error());
  const std::uint64_t with_log =
      features_.fetch_or(bit(virtio::kVhostFLogAll), std::memory_order_relaxed) |
      bit(virtio::kVhostFLogAll);
  return request_ack(make_request(FrontendRequest::set_features, with_log));
}

Result<void, std::string> FrontendClient::disable_logging() {
  const std::uint64_t without_log =
      features_.fetch_and(~bit(virtio::kVhostFLogAll), std::memory_order_relaxed) &
      ~bit(virtio::kVhostFLogAll);
  return request_ack(make_request(FrontendRequest::set_features, without_log));
}

void FrontendClient::attach_viommu(Viommu& iommu, const GuestMemory& memory) {
  memory_.store(&memory, std::memory_order_release);
  iommu_.store(&iommu, std::memory_order_release);
  iommu.set_invalidate_listener([this](Iova iova, std::uint64_t len) {
    if (auto r = iotlb_invalidate(iova, len); !r)
      vhostkit::log(LogLevel::warn, "frontend: IOTLB invalidate {:#x}+{:#x}: {}", iova.value, len,
                    r.error());
  });
}

Result<void, std::string> FrontendClient::iotlb_update(const ViommuMapping& map) {
  auto send_one = [&](std::uint64_t iova, std::uint64_t len, std::uint64_t addr) {
    const IotlbMsg t{Iova(iova),
                     len,
                     addr,
                     static_cast<std::uint8_t>(map.perm),
                     static_cast<std::uint8_t>(IotlbType::update),
                     {}};
    return request_ack(make_request(FrontendRequest::iotlb_msg, t));
  };
  if (gpa_addresses()) return send_one(map.iova.value, map.len, map.gpa.value);
  // Legacy: the back-end needs our own virtual addresses, contiguous per message.
  const GuestMemory* memory = memory_.load(std::memory_order_acquire);
  if (memory == nullptr) return unexpected(std::string("no guest memory attached"));
  std::uint64_t off = 0;
  for (const GpaRange& piece : memory->split_by_region(map.gpa, map.len)) {
    auto ua = memory->uaddr_of(piece.gpa);
    if (!ua) return unexpected(std::string("mapping outside guest memory"));
    if (auto r = send_one(map.iova.value + off, piece.len, ua->value); !r) return r;
    off += piece.len;
  }
  if (off != map.len) return unexpected(std::string("mapping outside guest memory"));
  return {};
}

Result<void, std::string> FrontendClient::iotlb_invalidate(Iova iova, std::uint64_t len) {
  const IotlbMsg t{iova, len, 0, 0, static_cast<std::uint8_t>(IotlbType::invalidate), {}};
  return request_ack(make_request(FrontendRequest::iotlb_msg, t));
}

void FrontendClient::backend_channel_loop() {
  while (!closing_.load()) {
    auto m = read_message(backend_sock_.get(), Channel::backend);
    if (!m) {
      if (!m.error().recoverable()) return;  // closed
      continue;
    }
    const Negotiated n = negotiated();
    const bool valid = validate_backend_request(*m, n).has_value();
    if (valid && m->backend_request() == BackendRequest::iotlb_msg) {
      auto ev = decode_iotlb(*m, Channel::backend, n);
      Viommu* iommu = iommu_.load(std::memory_order_acquire);
      if (ev && ev->type == IotlbType::miss && iommu != nullptr) {
        // Ordered against the Viommu's invalidations: an IOVA unmapped and reused
        // meanwhile is never answered with its old translation after the invalidation.
        bool mapped = iommu->answer_miss(ev->iova, [&](const ViommuMapping& map) {
          if (auto r = iotlb_update(map); r)
            misses_answered_.fetch_add(1);
          else
            vhostkit::log(LogLevel::warn, "frontend: answering miss at {:#x}: {}", ev->iova.value,
                          r.error());
        });
        if (!mapped)
          vhostkit::log(LogLevel::debug, "frontend: miss at unmapped IOVA {:#x} ({})",
                        ev->iova.value, to_string(ev->perm));
      }
    }
    if (expects_backend_reply(*m))
      (void)write_message(backend_sock_.get(), make_ack(*m, valid), Channel::backend);
  }
}

}  // namespace vhostkit::frontend
