// vhostkit/devices/net.h: the virtio-net device behind vhostkit-net.
//
// Concepts
//   Queues      queue pair i is receive queue 2i (device -> driver) and transmit queue
//               2i + 1 (driver -> device), virtio 1.2 section 5.1.2. Each queue has its
//               own worker (QueueRunner); the device keeps per-pair state, touched by
//               the pair's two workers only through PacketQueue (loopback) or a tap fd.
//   Header      every packet is preceded by struct virtio_net_hdr: 12 bytes with
//               VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF, 10 bytes otherwise. No
//               checksum or segmentation offload is offered, so the header the device
//               writes is all zeros except num_buffers, and the one it reads is skipped.
//   Mergeable   with VIRTIO_NET_F_MRG_RXBUF a received packet may span several receive
//               chains; num_buffers in the first says how many. If the ring runs dry in
//               the middle of a packet, the chains taken so far are returned with
//               length 0 (a driver drops a buffer shorter than a header) and the packet
//               is counted as dropped: the device never holds a chain between calls.
//   Modes       where packets come from and go to:
//                 sink      transmitted packets are counted and dropped; nothing is
//                           received.
//                 source    transmitted packets are counted and dropped; every receive
//                           buffer is filled with a generated frame (size and rate
//                           configurable) carrying the marker "VHOSTKIT", the queue
//                           and a sequence number, so a copy of it in guest memory is
//                           recognizable (the migration proof classifies pages by it).
//                 loopback  packets transmitted on pair i are received on pair i.
//                 tap       packets go to and come from a Linux TAP interface (one fd
//                           per pair, IFF_MULTI_QUEUE when there are several pairs).
//   Blocking    a receive queue with nothing to deliver, or a transmit queue whose
//               loopback peer is full, reports QueueWork::blocked; event_fd() gives the
//               fd that wakes it (tap fd, eventfd, timerfd for the rate limit).
//   State       save_state() carries what the guest sees (MAC, MTU, the accepted
//               features), the counters, each source queue's sequence number and the
//               frames waiting for the guest (loopback frames not yet received, frames
//               read from the tap and not yet delivered; at most 16 MiB, the rest count
//               as dropped). A destination takes the source's MAC and MTU, and delivers
//               the waiting frames if its mode has room for them (loopback, tap; other
//               modes drop them, counted). reset() drops waiting frames and returns the
//               MAC and MTU to the configured ones; counters keep counting.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "vhostkit/types.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/vhost_user/device.h"

namespace vhostkit {

// Feature bits of virtio-net (virtio 1.2 section 5.1.3) that vhostkit-net offers.
inline constexpr unsigned kNetFMtu = 3;
inline constexpr unsigned kNetFMac = 5;
inline constexpr unsigned kNetFMrgRxbuf = 15;
inline constexpr unsigned kNetFStatus = 16;
inline constexpr unsigned kNetFMq = 22;
inline constexpr std::uint16_t kNetSLinkUp = 1;

enum class NetMode { sink, source, loopback, tap };

[[nodiscard]] const char* to_string(NetMode m);
[[nodiscard]] Result<NetMode, std::string> parse_net_mode(std::string_view s);
// "52:54:00:12:34:56" -> bytes.
[[nodiscard]] Result<std::array<std::uint8_t, 6>, std::string> parse_mac(std::string_view s);

struct NetOptions {
  NetMode mode = NetMode::loopback;
  std::uint32_t queue_pairs = 1;
  std::array<std::uint8_t, 6> mac = {0x52, 0x54, 0x00, 0x12, 0x34, 0x56};
  std::uint16_t mtu = 1500;
  std::string tap;                   // tap mode: interface name (created if absent)
  std::uint32_t packet_size = 64;    // source mode: Ethernet frame bytes, 60..65535
  std::uint64_t rate_pps = 0;        // source mode: packets per second in all, 0 = max
  std::size_t loopback_depth = 256;  // loopback mode: packets buffered per pair
  // sink mode: copy every frame out of the guest's buffers before dropping it (as a host
  // stack would, or DPDK's vhost PMD into an mbuf), counted in NetQueueStats::bytes_read.
  bool sink_read = false;
};

struct NetQueueStats {
  std::uint64_t packets = 0;
  std::uint64_t bytes = 0;       // frame bytes, without the virtio-net header
  std::uint64_t dropped = 0;     // packets lost (no room, malformed, tap refused)
  std::uint64_t bytes_read = 0;  // sink_read: frame bytes copied out (not in the device state)
};

// The marker at the start of a source frame's payload (after the Ethernet header).
inline constexpr std::array<std::uint8_t, 8> kNetSourceMarker = {'V', 'H', 'O', 'S',
                                                                 'T', 'K', 'I', 'T'};

class NetDevice : public Device {
 public:
  // Validates options, opens the tap (tap mode) and the per-queue event fds.
  [[nodiscard]] static Result<std::unique_ptr<NetDevice>, std::string> create(NetOptions options);
  ~NetDevice() override;

  [[nodiscard]] std::string name() const override { return "net0"; }
  [[nodiscard]] std::uint64_t device_features() const override;
  [[nodiscard]] std::uint32_t num_queues() const override { return 2 * options_.queue_pairs; }
  // One worker thread per queue pair: receive queue 2n and transmit queue 2n + 1.
  [[nodiscard]] std::uint32_t worker_of(std::uint32_t queue) const override { return queue / 2; }
  // struct virtio_net_config: mac, status (link up), max_virtqueue_pairs, mtu.
  [[nodiscard]] std::vector<std::uint8_t> config() const override;
  void set_features(std::uint64_t features) override;
  QueueWork process(std::uint32_t queue, Virtqueue& vq) override;
  [[nodiscard]] int event_fd(std::uint32_t queue) const override;
  void reset() override;
  [[nodiscard]] DeviceStateFormat state_format() const override { return {"virtio-net", 1}; }
  void save_state(DeviceStateWriter& out) const override;
  [[nodiscard]] Result<void, std::string> load_state(const DeviceStateReader& in,
                                                     std::uint32_t version) override;

  [[nodiscard]] const NetOptions& options() const { return options_; }
  [[nodiscard]] std::uint32_t header_len() const { return hdr_len_.load(); }
  [[nodiscard]] NetQueueStats stats(std::uint32_t queue) const;
  // The MAC address and MTU the guest sees (the configured ones, or a migration source's).
  // Safe from any thread (the control thread changes them on a reset or a state load).
  [[nodiscard]] std::array<std::uint8_t, 6> mac() const {
    std::lock_guard lock(identity_mu_);
    return mac_;
  }
  [[nodiscard]] std::uint16_t mtu() const {
    std::lock_guard lock(identity_mu_);
    return mtu_;
  }
  // Frames waiting for the guest on pair p's receive queue (control thread, rings stopped).
  [[nodiscard]] std::size_t waiting_frames(std::uint32_t pair) const;
  // The tap interface's name (tap mode), as the kernel gave it.
  [[nodiscard]] const std::string& tap_name() const { return tap_name_; }

  // Builds source frame number seq of a queue (frame bytes only). Exposed for tests.
  static void make_source_frame(std::span<std::uint8_t> frame,
                                const std::array<std::uint8_t, 6>& dst, std::uint32_t queue,
                                std::uint64_t seq);

 private:
  struct Pair;
  struct Counters {
    std::atomic<std::uint64_t> packets{0};
    std::atomic<std::uint64_t> bytes{0};
    std::atomic<std::uint64_t> dropped{0};
    std::atomic<std::uint64_t> bytes_read{0};
  };

  explicit NetDevice(NetOptions options);
  Result<void, std::string> open();
  QueueWork receive(std::uint32_t queue, Virtqueue& vq, Pair& pair);
  QueueWork transmit(std::uint32_t queue, Virtqueue& vq, Pair& pair);
  std::size_t frames_ready(std::uint32_t queue, Pair& pair, std::size_t max);
  std::span<std::uint8_t> frame(std::uint32_t queue, Pair& pair, std::size_t i);
  void frames_done(Pair& pair, std::size_t n);
  // Drops the frames waiting for the guest (control thread, rings stopped).
  void clear_waiting(Pair& pair);

  NetOptions options_;
  // What the guest sees (config()): written by the control thread, read by mac()/mtu()
  // from any thread (a test, an operator's query) under identity_mu_.
  mutable std::mutex identity_mu_;
  std::array<std::uint8_t, 6> mac_;
  std::uint16_t mtu_;
  // Control thread only: the features the guest accepted.
  std::uint64_t features_ = 0;
  std::atomic<std::uint32_t> hdr_len_{12};
  std::atomic<bool> mrg_rxbuf_{false};
  std::string tap_name_;
  std::vector<std::unique_ptr<Pair>> pairs_;
  std::vector<Counters> counters_;
};

}  // namespace vhostkit
