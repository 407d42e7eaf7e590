// IOTLB miss handling over a real vhost-user connection: our front-end (with a strict
// vIOMMU, so every buffer is mapped before use and unmapped after, and every chain misses)
// against our back-end with an echo device. Measures chains per second with the miss
// look-ahead (all missing pages of the waiting chains requested in one burst) against
// one miss round trip at a time, side by side in one process.
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "support/echo_device.h"
#include "vhostkit/frontend/frontend_client.h"
#include "vhostkit/log.h"
#include "vhostkit/vhost_user/backend_server.h"

namespace {

using namespace vhostkit;
using namespace vhostkit::frontend;

double run_once(bool lookahead, int chains) {
  testing::EchoDevice device;
  BackendOptions bo;
  bo.runner.miss_lookahead = lookahead;
  BackendServer server(device, bo);
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) std::abort();
  std::thread st([&, fd = sv[0]] { server.serve(UniqueFd(fd)); });
  auto client = FrontendClient::adopt(UniqueFd(sv[1]));
  auto mem = GuestMemory::create({{Gpa(0x100000), 64ULL << 20}});
  Viommu io(ViommuMode::strict);
  ClientOptions co;
  co.want_features = virtio::bit(virtio::kFAccessPlatform) | virtio::bit(virtio::kFRingEventIdx);
  if (!client->negotiate(co) || !client->set_mem_table(*mem)) std::abort();
  client->attach_viommu(io, *mem);
  DriverOptions d;
  d.size = 256;
  d.event_idx = true;
  d.iommu = &io;
  auto drv = VirtioDriver::create(*mem, d);
  auto n = client->start_queue(0, *mem, *drv);
  if (!drv || !n) std::abort();
  // Each chain: 4 buffers on 4 different pages (3 readable, 1 writable).
  auto start = std::chrono::steady_clock::now();
  int sent = 0, got = 0;
  std::uint64_t base = 0x1000000;
  while (got < chains) {
    while (sent < chains && drv->free_descriptors() >= 4) {
      std::uint64_t slot = static_cast<std::uint64_t>(sent % 64) * 0x4000;
      std::vector<DriverBuffer> bufs{{Gpa(base + slot), 64, false},
                                     {Gpa(base + slot + 0x1000), 64, false},
                                     {Gpa(base + slot + 0x2000), 64, false},
                                     {Gpa(base + slot + 0x3000), 256, true}};
      if (!drv->add(bufs, false)) std::abort();
      ++sent;
    }
    drv->publish();
    if (drv->kick_needed()) {
      std::uint64_t one = 1;
      if (::write(n->kick.get(), &one, 8) != 8) std::abort();
    }
    while (drv->poll()) ++got;
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  client->close();
  server.stop();
  st.join();
  return chains / s;
}

}  // namespace

int main(int argc, char** argv) {
  set_log_sink([](LogLevel, std::string_view) {}, LogLevel::error);
  int reps = argc > 1 ? std::atoi(argv[1]) : 5;
  int chains = 2000;
  std::vector<double> on, off;
  for (int r = 0; r < reps; ++r) {  // interleaved: noise hits both alike
    on.push_back(run_once(true, chains));
    off.push_back(run_once(false, chains));
  }
  std::sort(on.begin(), on.end());
  std::sort(off.begin(), off.end());
  double mon = on[on.size() / 2], moff = off[off.size() / 2];
  std::printf("BENCH name=iotlb_miss_kchains_per_s_lookahead value=%.2f unit=kchains/s\n",
              mon / 1e3);
  std::printf("BENCH name=iotlb_miss_kchains_per_s_one_at_a_time value=%.2f unit=kchains/s\n",
              moff / 1e3);
  std::printf("BENCH name=iotlb_miss_lookahead_speedup value=%.2f unit=x\n", mon / moff);
  return 0;
}
