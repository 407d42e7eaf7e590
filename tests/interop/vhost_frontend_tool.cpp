// A vhost-user front-end program for interoperability tests: connects to a back-end's
// socket as a virtio-net driver would (queue 0 receive, queue 1 transmit), sends
// `--packets` recognisable frames, and counts what comes back on the receive queue.
// With --iommu it negotiates VIRTIO_F_ACCESS_PLATFORM, maps every buffer through a
// strict vIOMMU and answers the back-end's IOTLB misses. Prints
//   RESULT sent=<n> received=<n> matched=<n> misses=<n>
// and exits 0 if every frame sent came back intact (with --expect-echo), or otherwise if
// frames came back and every one that did was intact.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "tool_support.h"
#include "vhostkit/frontend/frontend_client.h"
#include "vhostkit/log.h"

using namespace vhostkit;
using namespace vhostkit::frontend;

int main(int argc, char** argv) {
  std::string path;
  int packets = 1000;
  bool iommu = false, expect_echo = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--socket-path" && i + 1 < argc)
      path = argv[++i];
    else if (a == "--packets" && i + 1 < argc)
      packets = std::atoi(argv[++i]);
    else if (a == "--iommu")
      iommu = true;
    else if (a == "--expect-echo")
      expect_echo = true;
    else {
      std::fprintf(stderr,
                   "usage: vhost_frontend_tool --socket-path PATH [--packets N] [--iommu] "
                   "[--expect-echo]\n");
      return 2;
    }
  }
  tools::log_to_stderr(LogLevel::info);
  std::unique_ptr<FrontendClient> client = tools::connect_when_up(path);
  if (!client) {
    std::fprintf(stderr, "vhost_frontend_tool: cannot connect to %s\n", path.c_str());
    return 1;
  }
  auto mem = GuestMemory::create({{Gpa(0x0), 0x800000}, {Gpa(0x100000000), 0x800000}});
  Viommu io(ViommuMode::strict);
  ClientOptions co;
  co.want_features = virtio::bit(virtio::kFRingEventIdx);
  if (iommu) co.want_features |= virtio::bit(virtio::kFAccessPlatform);
  if (auto r = client->negotiate(co); !r) {
    std::fprintf(stderr, "negotiate: %s\n", r.error().c_str());
    return 1;
  }
  if (iommu && !client->iommu()) {
    std::fprintf(stderr, "the back-end did not accept VIRTIO_F_ACCESS_PLATFORM\n");
    return 1;
  }
  if (auto r = client->set_mem_table(*mem); !r) {
    std::fprintf(stderr, "set_mem_table: %s\n", r.error().c_str());
    return 1;
  }
  if (iommu) client->attach_viommu(io, *mem);
  DriverOptions d;
  d.size = 256;
  d.event_idx = true;
  d.iommu = iommu ? &io : nullptr;
  d.map_writable_read_write = true;  // DPDK checks read-write on receive buffers
  auto rx = VirtioDriver::create(*mem, d);
  auto tx = VirtioDriver::create(*mem, d);
  if (!rx || !tx) return 1;
  auto nrx = client->start_queue(0, *mem, *rx);
  auto ntx = client->start_queue(1, *mem, *tx);
  if (!nrx || !ntx) {
    std::fprintf(stderr, "start_queue: %s\n", (!nrx ? nrx.error() : ntx.error()).c_str());
    return 1;
  }
  if (auto r = client->driver_ok(); !r) {
    std::fprintf(stderr, "driver_ok: %s\n", r.error().c_str());
    return 1;
  }
  auto kick = [](const UniqueFd& fd) {
    std::uint64_t one = 1;
    (void)!::write(fd.get(), &one, 8);
  };
  // Receive buffers: 12-byte virtio-net header + a full frame, in the second region.
  const std::uint64_t rx_base = 0x100000000 + 0x100000, tx_base = 0x200000;
  std::map<std::uint16_t, std::uint64_t> rx_slot;
  std::uint64_t next_rx = 0;
  auto refill = [&] {
    bool added = false;
    while (rx->free_descriptors() > 0) {
      std::uint64_t slot = next_rx++ % 512;
      DriverBuffer b{Gpa(rx_base + slot * 2048), 1526, true};
      auto id = rx->add(std::span(&b, 1), false);
      if (!id) break;
      rx_slot[*id] = slot;
      added = true;
    }
    if (added) {
      rx->publish();
      if (rx->kick_needed()) kick(nrx->kick);
    }
  };
  refill();
  int sent = 0, received = 0, matched = 0;
  std::map<std::uint16_t, int> tx_ids;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  auto last_progress = std::chrono::steady_clock::now();
  int last_received = 0;
  while ((sent < packets || (expect_echo && received < sent)) &&
         std::chrono::steady_clock::now() < deadline) {
    // A back-end that drops (DPDK drops a packet whose buffer misses in its IOTLB) never
    // echoes everything: stop once nothing has come back for two seconds.
    if (received != last_received) {
      last_received = received;
      last_progress = std::chrono::steady_clock::now();
    } else if (sent == packets &&
               std::chrono::steady_clock::now() - last_progress > std::chrono::seconds(2)) {
      break;
    }
    // Pace the sender: DPDK drops a frame when the receive ring has no buffer, so keep at
    // most half the receive ring's worth of frames in flight when every frame must return.
    while (sent < packets && tx->free_descriptors() > 0 &&
           (!expect_echo || sent - received < 128)) {
      std::uint8_t frame[12 + 64] = {};
      std::uint8_t* eth = frame + 12;
      std::memset(eth, 0x02, 6);      // destination
      std::memset(eth + 6, 0x04, 6);  // source
      eth[12] = 0x88;
      eth[13] = 0xb5;
      std::snprintf(reinterpret_cast<char*>(eth + 14), 40, "vhostkit frame %08d", sent);
      std::uint64_t slot = static_cast<std::uint64_t>(sent % 256);
      Gpa g(tx_base + slot * 128);
      if (!mem->write(g, frame)) return 1;
      DriverBuffer b{g, sizeof frame, false};
      auto id = tx->add(std::span(&b, 1), false);
      if (!id) break;
      tx_ids[*id] = sent++;
    }
    tx->publish();
    if (tx->kick_needed()) kick(ntx->kick);
    while (tx->poll()) {
    }
    while (auto u = rx->poll()) {
      ++received;
      std::uint8_t buf[12 + 64] = {};
      if (u->len >= sizeof buf && mem->read(Gpa(rx_base + rx_slot[u->id] * 2048), buf) &&
          std::strncmp(reinterpret_cast<char*>(buf + 12 + 14), "vhostkit frame ", 15) == 0)
        ++matched;
    }
    refill();
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  std::printf("RESULT sent=%d received=%d matched=%d misses=%llu\n", sent, received, matched,
              static_cast<unsigned long long>(client->misses_answered()));
  std::fflush(stdout);
  // --expect-echo: everything sent came back intact. Otherwise: something came back, and
  // whatever came back is intact.
  bool echoed = expect_echo ? matched == sent : (received > 0 && matched == received);
  bool ok = sent == packets && echoed && rx->device_errors() == 0 && tx->device_errors() == 0;
  client->close();
  return ok ? 0 : 1;
}
