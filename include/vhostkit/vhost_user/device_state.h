// vhostkit/vhost_user/device_state.h: the device state a back-end hands over in a live
// migration (VHOST_USER_PROTOCOL_F_DEVICE_STATE), and its encoding.
//
// Concepts
//   Device state  what a device keeps beyond what the protocol itself carries (ring
//                 positions, features, memory): a net device's MAC, MTU and counters, a
//                 blk device's completions still waiting for the used ring. The source
//                 back-end saves it with every ring stopped; the destination loads it
//                 before its rings start (docs/vhost-user.md, "Device state").
//   Image         the bytes that travel: a fixed header (magic, format version, the
//                 device's kind and state version, its number of queues), the device's
//                 records, and a CRC-32C of everything before it. A load refuses an image
//                 whose header, checksum or framing is wrong before the device sees it.
//   Records       the device's part, self-describing: each record is {tag u16, type u8,
//                 reserved u8, length u32, value}, all little-endian, with the type one of
//                 u64, bytes, text (printable ASCII) or group (records nested inside, a
//                 per-queue block for instance). Tags are the device's choice and unique
//                 within one level; any reader can walk an image without knowing the
//                 device. Every length is checked against what encloses it.
//   Versions      the header's format version is this encoding's (kDeviceStateFormat);
//                 the state version is the device's (Device::state_format()). A device
//                 loads states of its own kind up to its own version; a newer one is
//                 refused.
// Threading: the types here are plain values, used on one thread at a time.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "vhostkit/export.h"
#include "vhostkit/types.h"

namespace vhostkit {

// The version of the image encoding below.
inline constexpr std::uint16_t kDeviceStateFormat = 1;
// No image is larger than this: a save that would exceed it fails, and a load stops
// reading there.
inline constexpr std::size_t kMaxDeviceStateBytes = 64u << 20;
// Groups nest at most this deep.
inline constexpr unsigned kMaxDeviceStateDepth = 8;
// A device kind is 1 to this many printable ASCII characters.
inline constexpr std::size_t kMaxDeviceKindLength = 64;

// Identifies a device's state: its kind ("virtio-net") and the version of its records.
struct DeviceStateFormat {
  std::string kind;
  std::uint32_t version = 0;
};

enum class DeviceStateErrc {
  truncated,     // the image or a record ends early
  bad_magic,     // not a device state image
  bad_format,    // an encoding version this code does not read
  bad_checksum,  // the bytes were altered
  bad_header,    // kind empty, too long or not printable
  bad_record,    // a record's type or reserved byte, or trailing bytes
  duplicate,     // the same tag twice in one group
  too_deep,      // groups nested deeper than kMaxDeviceStateDepth
  too_large,     // beyond kMaxDeviceStateBytes
  missing,       // a record the reader asked for is absent
  wrong_type,    // a record has another type than the reader asked for
  bad_value,     // a value outside what the reader accepts
};

[[nodiscard]] VHOSTKIT_API const char* to_string(DeviceStateErrc e);

struct VHOSTKIT_API DeviceStateError {
  DeviceStateErrc code;
  std::uint16_t tag = 0;  // the record concerned, where there is one
  std::string detail;

  // One line: what is wrong and where.
  [[nodiscard]] std::string message() const;
};

enum class RecordType : std::uint8_t { u64 = 1, bytes = 2, text = 3, group = 4 };

// Writes records (save_state()). Tags must be unique within one writer.
class VHOSTKIT_API DeviceStateWriter {
 public:
  void u64(std::uint16_t tag, std::uint64_t value);
  void bytes(std::uint16_t tag, std::span<const std::uint8_t> value);
  // REQUIRES: printable ASCII only (checked when read back).
  void text(std::uint16_t tag, std::string_view value);
  // A group: the records `inner` holds, nested under `tag`.
  void group(std::uint16_t tag, const DeviceStateWriter& inner);

  // The encoded records.
  [[nodiscard]] std::span<const std::uint8_t> data() const { return data_; }

 private:
  void header(std::uint16_t tag, RecordType type, std::size_t length);
  std::vector<std::uint8_t> data_;
};

// One record as it was found.
struct DeviceStateRecord {
  std::uint16_t tag = 0;
  RecordType type = RecordType::bytes;
  std::span<const std::uint8_t> value;
};

// Reads records (load_state()): a view of bytes that must outlive it.
class VHOSTKIT_API DeviceStateReader {
 public:
  // Checks the framing of every record, recursively: types, lengths, unique tags, depth.
  [[nodiscard]] static Result<DeviceStateReader, DeviceStateError> parse(
      std::span<const std::uint8_t> records, unsigned depth = 0);

  [[nodiscard]] bool has(std::uint16_t tag) const;
  [[nodiscard]] Result<std::uint64_t, DeviceStateError> u64(std::uint16_t tag) const;
  // A u64 no larger than max (bad_value otherwise).
  [[nodiscard]] Result<std::uint64_t, DeviceStateError> u64(std::uint16_t tag,
                                                            std::uint64_t max) const;
  [[nodiscard]] Result<std::span<const std::uint8_t>, DeviceStateError> bytes(
      std::uint16_t tag) const;
  // Exactly `length` bytes (bad_value otherwise).
  [[nodiscard]] Result<std::span<const std::uint8_t>, DeviceStateError> bytes(
      std::uint16_t tag, std::size_t length) const;
  [[nodiscard]] Result<std::string_view, DeviceStateError> text(std::uint16_t tag) const;
  [[nodiscard]] Result<DeviceStateReader, DeviceStateError> group(std::uint16_t tag) const;
  // Every record of this level, in the order they were written.
  [[nodiscard]] std::span<const DeviceStateRecord> records() const { return records_; }

 private:
  Result<const DeviceStateRecord*, DeviceStateError> find(std::uint16_t tag, RecordType type) const;
  std::vector<DeviceStateRecord> records_;
  unsigned depth_ = 0;
};

// What the image header says.
struct DeviceStateHeader {
  DeviceStateFormat format;
  std::uint32_t queues = 0;
};

// The image of `records` under `header`. Error too_large beyond kMaxDeviceStateBytes,
// bad_header for an empty, long or unprintable kind.
[[nodiscard]] VHOSTKIT_API Result<std::vector<std::uint8_t>, DeviceStateError> encode_device_state(
    const DeviceStateHeader& header, const DeviceStateWriter& records);

struct DecodedDeviceState {
  DeviceStateHeader header;
  DeviceStateReader records;  // a view into the image
};
// Checks and opens an image (magic, format, header, checksum, every record's framing).
[[nodiscard]] VHOSTKIT_API Result<DecodedDeviceState, DeviceStateError> decode_device_state(
    std::span<const std::uint8_t> image);

// CRC-32C (Castagnoli) of data, as the image's trailer holds it.
[[nodiscard]] VHOSTKIT_API std::uint32_t crc32c(std::span<const std::uint8_t> data);

}  // namespace vhostkit
