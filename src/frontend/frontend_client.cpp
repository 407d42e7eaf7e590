// FrontendClient: the VMM side of vhost-user, for tests, tools and benchmarks.
#include "vhostkit/frontend/frontend_client.h"

#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "vhostkit/log.h"
#include "vhostkit/virtio_spec.h"

namespace vhostkit::frontend {

using namespace vhost_user;
using virtio::bit;

FrontendClient::FrontendClient(UniqueFd socket) : sock_(std::move(socket)) {}

FrontendClient::~FrontendClient() {
  close();
  if (log_map_ != nullptr) ::munmap(log_map_, log_map_len_);
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
  return (protocol_features_ >> protocol::kGpaAddresses) & 1;
}
bool FrontendClient::iommu() const {
  return (features_ >> virtio::kFAccessPlatform) & 1;
}

Result<void, std::string> FrontendClient::send(const Message& m) {
  std::lock_guard lock(mu_);
  if (auto w = write_message(sock_.get(), m); !w) return unexpected(w.error().message());
  return {};
}

Result<Message, std::string> FrontendClient::request_reply(Message m) {
  std::lock_guard lock(mu_);
  Request to = m.req();
  if (auto w = write_message(sock_.get(), m); !w) return unexpected(w.error().message());
  auto r = read_message(sock_.get());
  if (!r) return unexpected(fmt::format("reply to {}: {}", to_string(to), r.error().message()));
  if (auto v = validate_reply(*r, to); !v) return unexpected(v.error().message());
  return std::move(*r);
}

Result<void, std::string> FrontendClient::request_ack_locked(Message m) {
  bool ack = (protocol_features_ >> protocol::kReplyAck) & 1;
  if (ack) m.flags |= kFlagNeedReply;
  Request to = m.req();
  if (auto w = write_message(sock_.get(), m); !w) return unexpected(w.error().message());
  if (!ack) return {};
  auto r = read_message(sock_.get());
  if (!r) return unexpected(fmt::format("reply to {}: {}", to_string(to), r.error().message()));
  if (auto v = validate_reply(*r, to); !v) return unexpected(v.error().message());
  if (r->payload.size() != 8)
    return unexpected(fmt::format("reply to {}: bad size", to_string(to)));
  if (r->u64() != 0) return unexpected(fmt::format("back-end refused {}", to_string(to)));
  return {};
}

Result<void, std::string> FrontendClient::request_ack(Message m) {
  std::lock_guard lock(mu_);
  return request_ack_locked(std::move(m));
}

Result<void, std::string> FrontendClient::negotiate(const ClientOptions& options) {
  auto f = request_reply(Message::make_empty(static_cast<std::uint32_t>(Request::get_features)));
  if (!f) return unexpected(f.error());
  std::uint64_t offered = f->u64();
  if (!((offered >> kFProtocolFeatures) & 1))
    return unexpected(std::string("back-end does not offer VHOST_USER_F_PROTOCOL_FEATURES"));
  auto pf = request_reply(
      Message::make_empty(static_cast<std::uint32_t>(Request::get_protocol_features)));
  if (!pf) return unexpected(pf.error());
  std::uint64_t want_pf = bit(protocol::kMq) | bit(protocol::kLogShmfd) | bit(protocol::kReplyAck) |
                          bit(protocol::kBackendReq) | bit(protocol::kConfig) |
                          bit(protocol::kStatus) | bit(protocol::kConfigureMemSlots) |
                          bit(protocol::kResetDevice);
  if (options.want_gpa_addresses) want_pf |= bit(protocol::kGpaAddresses);
  std::uint64_t chosen_pf = pf->u64() & want_pf;
  if (auto w = send(
          Message::make(static_cast<std::uint32_t>(Request::set_protocol_features), chosen_pf));
      !w)
    return w;
  protocol_features_ = chosen_pf;
  if (auto r = request_ack(Message::make_empty(static_cast<std::uint32_t>(Request::set_owner))); !r)
    return r;
  if ((protocol_features_ >> protocol::kBackendReq) & 1) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
      return unexpected(fmt::format("socketpair: {}", std::strerror(errno)));
    backend_sock_.reset(sv[0]);
    Message m = Message::make_empty(static_cast<std::uint32_t>(Request::set_backend_req_fd));
    m.fds.emplace_back(sv[1]);
    if (auto r = request_ack(std::move(m)); !r) return r;
    backend_thread_ = std::thread([this] { backend_channel_loop(); });
  }
  features_ = offered & (options.want_features | bit(virtio::kFVersion1) | bit(kFProtocolFeatures));
  return request_ack(Message::make(static_cast<std::uint32_t>(Request::set_features), features_));
}

Result<void, std::string> FrontendClient::set_mem_table(const GuestMemory& memory) {
  const auto& regions = memory.regions();
  if (regions.empty() || regions.size() > kMaxFds)
    return unexpected(fmt::format("{} regions do not fit one SET_MEM_TABLE", regions.size()));
  Message m = Message::make_empty(static_cast<std::uint32_t>(Request::set_mem_table));
  MemTableHeader h{static_cast<std::uint32_t>(regions.size()), 0};
  m.payload.resize(sizeof h + regions.size() * sizeof(MemRegion));
  std::memcpy(m.payload.data(), &h, sizeof h);
  auto specs = memory.region_specs();
  for (std::size_t i = 0; i < specs.size(); ++i) {
    std::uint64_t ua = gpa_addresses() ? specs[i].gpa.value : specs[i].uaddr.value;
    MemRegion r{specs[i].gpa.value, specs[i].size, ua, specs[i].mmap_offset};
    std::memcpy(m.payload.data() + sizeof h + i * sizeof r, &r, sizeof r);
    m.fds.push_back(std::move(specs[i].fd));
  }
  return request_ack(std::move(m));
}

Result<void, std::string> FrontendClient::add_mem_reg(const GuestMemory& memory,
                                                      std::size_t region) {
  RegionSpec s = memory.region_spec(region);
  std::uint64_t ua = gpa_addresses() ? s.gpa.value : s.uaddr.value;
  Message m = Message::make(static_cast<std::uint32_t>(Request::add_mem_reg),
                            SingleMemRegion{0, {s.gpa.value, s.size, ua, s.mmap_offset}});
  m.fds.push_back(std::move(s.fd));
  return request_ack(std::move(m));
}

Result<void, std::string> FrontendClient::rem_mem_reg(const GuestMemory& memory,
                                                      std::size_t region) {
  const GuestRegion& r = memory.regions()[region];
  std::uint64_t ua = gpa_addresses() ? r.gpa.value : r.uaddr().value;
  return request_ack(Message::make(static_cast<std::uint32_t>(Request::rem_mem_reg),
                                   SingleMemRegion{0, {r.gpa.value, r.size, ua, r.file_offset}}));
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
  auto num = Message::make(static_cast<std::uint32_t>(Request::set_vring_num),
                           VringState{index, driver.options().size});
  if (auto r = request_ack(std::move(num)); !r) return unexpected(r.error());
  if (auto r = request_ack(Message::make(static_cast<std::uint32_t>(Request::set_vring_base),
                                         VringState{index, base}));
      !r)
    return unexpected(r.error());
  RingAddresses a = driver.addresses();
  RingGpas g = driver.gpas();
  VringAddr va{index,
               log_ring ? kVringFLog : 0u,
               ring_address(memory, a.desc, g.desc),
               ring_address(memory, a.device, g.device),
               ring_address(memory, a.driver, g.driver),
               g.device.value};
  if (auto r = request_ack(Message::make(static_cast<std::uint32_t>(Request::set_vring_addr), va));
      !r)
    return unexpected(r.error());
  RingNotifiers n{UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)),
                  UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK))};
  Message call =
      Message::make(static_cast<std::uint32_t>(Request::set_vring_call), std::uint64_t{index});
  call.fds.emplace_back(::dup(n.call.get()));
  if (auto r = request_ack(std::move(call)); !r) return unexpected(r.error());
  Message kick =
      Message::make(static_cast<std::uint32_t>(Request::set_vring_kick), std::uint64_t{index});
  kick.fds.emplace_back(::dup(n.kick.get()));
  if (auto r = request_ack(std::move(kick)); !r) return unexpected(r.error());
  if (auto r = request_ack(Message::make(static_cast<std::uint32_t>(Request::set_vring_enable),
                                         VringState{index, 1}));
      !r)
    return unexpected(r.error());
  return n;
}

Result<void, std::string> FrontendClient::driver_ok() {
  if (!((protocol_features_ >> protocol::kStatus) & 1)) return {};
  constexpr std::uint64_t kStatusDriverOk = 1 | 2 | 8 | 4;  // ACK, DRIVER, FEATURES_OK, DRIVER_OK
  return request_ack(
      Message::make(static_cast<std::uint32_t>(Request::set_status), kStatusDriverOk));
}

Result<std::uint32_t, std::string> FrontendClient::stop_queue(std::uint32_t index) {
  auto r = request_reply(
      Message::make(static_cast<std::uint32_t>(Request::get_vring_base), VringState{index, 0}));
  if (!r) return unexpected(r.error());
  if (r->payload.size() != sizeof(VringState))
    return unexpected(std::string("GET_VRING_BASE reply size"));
  return r->as<VringState>().num;
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
  Message m =
      Message::make(static_cast<std::uint32_t>(Request::set_log_base), LogDesc{bytes, offset});
  m.fds.emplace_back(::dup(log_fd_.get()));
  auto r = request_reply(std::move(m));
  if (!r) return unexpected(r.error());
  features_ |= bit(virtio::kVhostFLogAll);
  return request_ack(Message::make(static_cast<std::uint32_t>(Request::set_features), features_));
}

Result<void, std::string> FrontendClient::disable_logging() {
  features_ &= ~bit(virtio::kVhostFLogAll);
  return request_ack(Message::make(static_cast<std::uint32_t>(Request::set_features), features_));
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
    IotlbMsg t{iova, len, addr, static_cast<std::uint8_t>(map.perm), kIotlbUpdate, {}};
    return request_ack(Message::make(static_cast<std::uint32_t>(Request::iotlb_msg), t));
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
  IotlbMsg t{iova.value, len, 0, 0, kIotlbInvalidate, {}};
  return request_ack(Message::make(static_cast<std::uint32_t>(Request::iotlb_msg), t));
}

void FrontendClient::backend_channel_loop() {
  while (!closing_.load()) {
    auto m = read_message(backend_sock_.get());
    if (!m) return;  // closed
    if (m->request == static_cast<std::uint32_t>(BackendRequest::iotlb_msg) &&
        m->payload.size() == sizeof(IotlbMsg)) {
      auto t = m->as<IotlbMsg>();
      Viommu* iommu = iommu_.load(std::memory_order_acquire);
      if (t.type == kIotlbMiss && iommu != nullptr) {
        // Ordered against the Viommu's invalidations: an IOVA unmapped and reused
        // meanwhile is never answered with its old translation after the invalidation.
        bool mapped = iommu->answer_miss(Iova(t.iova), [&](const ViommuMapping& map) {
          if (auto r = iotlb_update(map); r)
            misses_answered_.fetch_add(1);
          else
            vhostkit::log(LogLevel::warn, "frontend: answering miss at {:#x}: {}", t.iova,
                          r.error());
        });
        if (!mapped)
          vhostkit::log(LogLevel::debug, "frontend: miss at unmapped IOVA {:#x} (perm {})", t.iova,
                        t.perm);
      }
    }
    if (m->need_reply()) {
      Message ack = Message::make(m->request, std::uint64_t{0}, kVersion | kFlagReply);
      (void)write_message(backend_sock_.get(), ack);
    }
  }
}

}  // namespace vhostkit::frontend
