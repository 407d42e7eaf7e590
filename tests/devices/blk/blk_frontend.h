// Test and benchmark support: a virtio-blk driver on our FrontendClient + VirtioDriver.
// BlkFrontend negotiates with a vhost-user block back-end (ours or another), shares a
// memfd guest memory, starts N queues and submits requests as Linux's virtio_blk lays
// them out: a 16-byte header (readable), the data, a 1-byte status (writable). It waits
// for completions on the call eventfd. One thread per queue may drive it.
#pragma once

#include <poll.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "vhostkit/devices/blk.h"
#include "vhostkit/frontend/frontend_client.h"

namespace vhostkit::testing {

struct BlkFrontendOptions {
  std::uint32_t queues = 1;
  bool iommu = false;
  bool packed = false;
  bool indirect = true;
  bool event_idx = true;
  std::uint16_t ring_size = 128;
  std::uint64_t mem_bytes = 64ull << 20;
  // virtio-blk features to accept if offered (ring features are added from the above).
  std::uint64_t blk_features = virtio::bit(blk::kFSizeMax) | virtio::bit(blk::kFSegMax) |
                               virtio::bit(blk::kFBlkSize) | virtio::bit(blk::kFTopology) |
                               virtio::bit(blk::kFFlush) | virtio::bit(blk::kFConfigWce) |
                               virtio::bit(blk::kFMq) | virtio::bit(blk::kFDiscard) |
                               virtio::bit(blk::kFWriteZeroes) | virtio::bit(blk::kFRo);
  bool gpa_addresses = true;
};

struct BlkOutcome {
  std::uint8_t status = 0xff;
  std::uint32_t used_len = 0;
  std::vector<std::uint8_t> in;  // the data the device wrote (IN, GET_ID)
};

class BlkFrontend {
 public:
  using Client = frontend::FrontendClient;

  BlkFrontend(std::unique_ptr<Client> client, BlkFrontendOptions o)
      : client_(std::move(client)), opt_(o), viommu_(frontend::ViommuMode::strict) {}
  ~BlkFrontend() {
    if (client_) client_->close();
  }

  [[nodiscard]] Result<void, std::string> start() {
    auto m = frontend::GuestMemory::create({{Gpa(0x100000), opt_.mem_bytes}});
    if (!m) return tl::unexpected(m.error());
    mem_.emplace(std::move(*m));
    frontend::ClientOptions co;
    co.want_features = opt_.blk_features;
    if (opt_.indirect) co.want_features |= virtio::bit(virtio::kFRingIndirectDesc);
    if (opt_.event_idx) co.want_features |= virtio::bit(virtio::kFRingEventIdx);
    if (opt_.iommu) co.want_features |= virtio::bit(virtio::kFAccessPlatform);
    if (opt_.packed) co.want_features |= virtio::bit(virtio::kFRingPacked);
    co.want_gpa_addresses = opt_.gpa_addresses;
    if (auto r = client_->negotiate(co); !r) return r;
    if (auto r = client_->set_mem_table(*mem_); !r) return r;
    if (opt_.iommu) client_->attach_viommu(viommu_, *mem_);
    for (std::uint32_t q = 0; q < opt_.queues; ++q) {
      frontend::DriverOptions d;
      d.packed = opt_.packed;
      d.size = opt_.ring_size;
      d.indirect = opt_.indirect;
      d.event_idx = opt_.event_idx;
      d.iommu = opt_.iommu ? &viommu_ : nullptr;
      auto drv = frontend::VirtioDriver::create(*mem_, d);
      if (!drv) return tl::unexpected(drv.error());
      queues_.push_back(std::make_unique<Queue>(Queue{std::move(*drv), {}}));
    }
    for (std::uint32_t q = 0; q < opt_.queues; ++q) {
      auto n = client_->start_queue(q, *mem_, queues_[q]->drv);
      if (!n) return tl::unexpected(n.error());
      queues_[q]->n = std::move(*n);
    }
    return client_->driver_ok();
  }

  [[nodiscard]] Client& client() { return *client_; }
  [[nodiscard]] frontend::GuestMemory& mem() { return *mem_; }
  [[nodiscard]] frontend::VirtioDriver& driver(std::uint32_t q) { return queues_[q]->drv; }
  [[nodiscard]] std::uint64_t features() const { return client_->features(); }

  // Guest memory for buffers (never freed; the tests use little).
  // Thread-safe (GuestMemory::alloc is not).
  [[nodiscard]] Gpa alloc(std::uint64_t size) {
    std::lock_guard lock(alloc_mu_);
    return *mem_->alloc(std::max<std::uint64_t>(size, 1), 64);
  }
  [[nodiscard]] std::uint8_t* host(Gpa g, std::uint64_t len) { return mem_->host(g, len); }

  // Adds a chain; publishes and kicks unless publish is false.
  [[nodiscard]] Result<std::uint16_t, std::string> add(std::uint32_t q,
                                                       std::span<const frontend::DriverBuffer> b,
                                                       bool publish = true) {
    auto id = queues_[q]->drv.add(b, publish);
    if (id && publish) kick(q);
    return id;
  }
  void publish(std::uint32_t q) {
    queues_[q]->drv.publish();
    kick(q);
  }
  void kick(std::uint32_t q) {
    if (queues_[q]->drv.kick_needed()) {
      std::uint64_t one = 1;
      (void)!::write(queues_[q]->n.kick.get(), &one, 8);
    }
  }
  // The next completion on q, waiting on the call eventfd up to timeout.
  [[nodiscard]] std::optional<frontend::UsedBuffer> wait(
      std::uint32_t q, std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    auto& qu = *queues_[q];
    auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      if (auto u = qu.drv.poll()) return u;
      qu.drv.enable_interrupts();
      if (qu.drv.more_used()) continue;
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return std::nullopt;
      pollfd p{qu.n.call.get(), POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(std::min<long>(left.count(), 100))) > 0) {
        std::uint64_t v;
        (void)!::read(qu.n.call.get(), &v, 8);
      }
    }
  }

  // One request, waited for: header {type, sector}, then `out` as driver-readable data,
  // then in_len device-writable bytes and the status byte.
  [[nodiscard]] Result<BlkOutcome, std::string> request(std::uint32_t q, std::uint32_t type,
                                                        std::uint64_t sector,
                                                        std::span<const std::uint8_t> out,
                                                        std::uint32_t in_len) {
    Gpa hdr = alloc(16), data_out = alloc(out.size()), data_in = alloc(in_len), st = alloc(1);
    std::uint8_t h[16] = {};
    std::memcpy(h, &type, 4);
    std::memcpy(h + 8, &sector, 8);
    std::memcpy(host(hdr, 16), h, 16);
    if (!out.empty()) std::memcpy(host(data_out, out.size()), out.data(), out.size());
    *host(st, 1) = 0xff;
    std::vector<frontend::DriverBuffer> b{{hdr, 16, false}};
    if (!out.empty()) b.push_back({data_out, static_cast<std::uint32_t>(out.size()), false});
    if (in_len > 0) b.push_back({data_in, in_len, true});
    b.push_back({st, 1, true});
    auto id = add(q, b);
    if (!id) return tl::unexpected(id.error());
    auto u = wait(q);
    if (!u) return tl::unexpected(std::string("no completion within 10 s"));
    if (u->id != *id) return tl::unexpected(fmt::format("completion for {} not {}", u->id, *id));
    BlkOutcome o;
    o.status = *host(st, 1);
    o.used_len = u->len;
    o.in.assign(host(data_in, std::max<std::uint32_t>(in_len, 1)),
                host(data_in, std::max<std::uint32_t>(in_len, 1)) + in_len);
    return o;
  }

 private:
  struct Queue {
    frontend::VirtioDriver drv;
    frontend::RingNotifiers n;
  };
  std::unique_ptr<Client> client_;
  BlkFrontendOptions opt_;
  frontend::Viommu viommu_;
  std::optional<frontend::GuestMemory> mem_;
  std::mutex alloc_mu_;
  std::vector<std::unique_ptr<Queue>> queues_;
};

}  // namespace vhostkit::testing
