// Test support: a trivial device that echoes each chain's readable bytes into its
// writable buffers. It exercises every part of the data path (pop, read, write with
// logging, push, notification) without device-specific logic. Its state: an 8-byte
// config space the driver may write (SET_CONFIG; back to 1..8 on reset) and the count of
// chains echoed, both carried in its device state (kind "echo", version 1).
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <functional>
#include <string>
#include <vector>

#include "vhostkit/vhost_user/device.h"

namespace vhostkit::testing {

class EchoDevice : public Device {
 public:
  // Every queue has its own worker thread, so its own batch and scratch memory.
  explicit EchoDevice(std::uint32_t queues = 1, std::string name = "echo0")
      : name_(std::move(name)), queues_(queues), batches_(queues), bufs_(queues) {}

  std::string name() const override { return name_; }
  bool inflight_tracking() const override { return track_inflight; }
  std::uint64_t device_features() const override { return 0; }
  std::uint32_t num_queues() const override { return queues_; }
  std::vector<std::uint8_t> config() const override { return {config_.begin(), config_.end()}; }
  bool set_config(std::uint32_t offset, std::span<const std::uint8_t> data) override {
    if (offset > config_.size() || data.size() > config_.size() - offset) return false;
    std::copy(data.begin(), data.end(), config_.begin() + offset);
    return true;
  }
  void reset() override {
    config_ = kInitialConfig;
    resets.fetch_add(1);
  }
  DeviceStateFormat state_format() const override { return {"echo", 1}; }
  void save_state(DeviceStateWriter& out) const override {
    out.bytes(1, config_);
    out.u64(2, chains.load());
  }
  Result<void, std::string> load_state(const DeviceStateReader& in, std::uint32_t) override {
    auto cfg = in.bytes(1, config_.size());
    if (!cfg) return tl::unexpected(cfg.error().message());
    auto n = in.u64(2);
    if (!n) return tl::unexpected(n.error().message());
    std::copy(cfg->begin(), cfg->end(), config_.begin());
    chains.store(*n);
    return {};
  }

  QueueWork process(std::uint32_t q, Virtqueue& vq) override {
    QueueWork w;
    ChainBatch& batch = batches_[q];
    std::vector<std::uint8_t>& buf = bufs_[q];
    batch.clear();
    auto r = vq.pop(batch, 32);
    if (!r) {
      w.error = r.error();
      return w;
    }
    w.deferred = r->deferred;
    if (after_pop && batch.size() > 0) after_pop(q);
    std::vector<Completion> done;
    for (const DescChain& c : batch.chains()) {
      buf.resize(c.readable_len);
      std::uint32_t n = vq.read_chain(batch, c, 0, buf);
      auto written = vq.write_chain(batch, c, 0, std::span(buf.data(), n));
      if (!written) {
        w.error = written.error();
        return w;
      }
      done.push_back(Completion{c.id, c.ring_descs, *written});
    }
    if (!done.empty()) {
      auto notify = vq.push(done);
      if (!notify) {
        w.error = notify.error();
        return w;
      }
      w.notify = *notify;
      w.progress = true;
      chains.fetch_add(done.size());
    }
    return w;
  }

  // Called on the queue's worker after a pop that returned chains, before they are
  // echoed and pushed (inside the worker's burst): tests use it to make a control
  // message land between a pop and its push. Set before the queues start.
  std::function<void(std::uint32_t queue)> after_pop;

  // Offer VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD. Set before the server is created.
  bool track_inflight = false;

  std::atomic<std::uint64_t> chains{0};
  std::atomic<std::uint64_t> resets{0};

 private:
  static constexpr std::array<std::uint8_t, 8> kInitialConfig = {1, 2, 3, 4, 5, 6, 7, 8};
  std::array<std::uint8_t, 8> config_ = kInitialConfig;  // control thread
  std::string name_;
  std::uint32_t queues_;
  std::vector<ChainBatch> batches_;
  std::vector<std::vector<std::uint8_t>> bufs_;
};

}  // namespace vhostkit::testing
