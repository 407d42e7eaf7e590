// Test support: a trivial device that echoes each chain's readable bytes into its
// writable buffers. It exercises every part of the data path (pop, read, write with
// logging, push, notification) without device-specific logic.
#pragma once

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
  std::uint64_t device_features() const override { return 0; }
  std::uint32_t num_queues() const override { return queues_; }
  std::vector<std::uint8_t> config() const override { return {1, 2, 3, 4, 5, 6, 7, 8}; }
  bool set_config(std::uint32_t offset, std::span<const std::uint8_t> data) override {
    return offset + data.size() <= 8;
  }
  void reset() override { resets.fetch_add(1); }

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

  std::atomic<std::uint64_t> chains{0};
  std::atomic<std::uint64_t> resets{0};

 private:
  std::string name_;
  std::uint32_t queues_;
  std::vector<ChainBatch> batches_;
  std::vector<std::vector<std::uint8_t>> bufs_;
};

}  // namespace vhostkit::testing
