// Fuzz target: device state records from a hostile front-end. The input's first byte picks
// the device kind (virtio-net in loopback or tap-less sink mode, echo), the rest are the
// records; the target wraps them in a valid image header and checksum (a front-end can
// always make those) and loads the image the way BackendServer does: decode, then
// Device::load_state. Checks, beyond the sanitizers: every group of an accepted image
// opens; a state a device accepted saves again, and that image decodes and loads into a
// fresh device of the same kind; a refused load leaves the device's state as it was.
#include <cstdlib>
#include <memory>
#include <vector>

#include "support/echo_device.h"
#include "vhostkit/devices/net.h"
#include "vhostkit/log.h"
#include "vhostkit/vhost_user/device_state.h"

namespace {

using namespace vhostkit;

std::unique_ptr<Device> make_device(std::uint8_t kind) {
  switch (kind % 3) {
    case 0:
    case 1: {
      NetOptions o;
      o.mode = kind % 3 == 0 ? NetMode::loopback : NetMode::sink;
      o.loopback_depth = 8;
      auto d = NetDevice::create(o);
      if (!d) std::abort();
      return std::move(*d);
    }
    default: return std::make_unique<testing::EchoDevice>();
  }
}

std::vector<std::uint8_t> saved(const Device& d) {
  DeviceStateWriter w;
  d.save_state(w);
  auto image = encode_device_state({d.state_format(), d.num_queues()}, w);
  if (!image) std::abort();  // what a device saves always encodes
  return std::move(*image);
}

void walk(const DeviceStateReader& r) {
  for (const auto& rec : r.records()) {
    if (rec.type != RecordType::group) continue;
    auto g = r.group(rec.tag);
    if (!g) std::abort();  // parse() checked every group already
    walk(*g);
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  set_log_sink([](LogLevel, std::string_view) {}, LogLevel::error);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  auto device = make_device(data[0]);
  const DeviceStateFormat format = device->state_format();
  // The records as given, inside a header a front-end would get right.
  DeviceStateWriter none;
  auto empty = encode_device_state({format, device->num_queues()}, none);
  if (!empty) std::abort();
  std::vector<std::uint8_t> image(empty->begin(), empty->end() - 4);
  image.insert(image.end(), data + 1, data + size);
  const auto records = static_cast<std::uint32_t>(size - 1);
  for (int i = 0; i < 4; ++i) image[20 + i] = static_cast<std::uint8_t>(records >> (8 * i));
  const std::uint32_t crc = crc32c(image);
  for (int i = 0; i < 4; ++i) image.push_back(static_cast<std::uint8_t>(crc >> (8 * i)));

  auto decoded = decode_device_state(image);
  if (!decoded) return 0;
  walk(decoded->records);
  const std::vector<std::uint8_t> before = saved(*device);
  auto loaded = device->load_state(decoded->records, format.version);
  if (!loaded) {
    if (saved(*device) != before) std::abort();  // all or nothing
    return 0;
  }
  const std::vector<std::uint8_t> again = saved(*device);
  auto d2 = decode_device_state(again);
  if (!d2) std::abort();
  auto fresh = make_device(data[0]);
  if (!fresh->load_state(d2->records, format.version)) std::abort();
  return 0;
}
