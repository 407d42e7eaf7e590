// Device state images: records, header, checksum (include/vhostkit/vhost_user/device_state.h).
#include "vhostkit/vhost_user/device_state.h"

#include <algorithm>
#include <array>
#include <cstring>

#include <fmt/format.h>

namespace vhostkit {

namespace {

constexpr std::array<std::uint8_t, 8> kMagic = {'V', 'H', 'K', 'S', 'T', 'A', 'T', 'E'};
// magic, format u16, kind length u16, state version u32, queues u32, records length u32.
constexpr std::size_t kHeaderBytes = 24;
constexpr std::size_t kRecordHeaderBytes = 8;  // tag u16, type u8, reserved u8, length u32
constexpr std::size_t kTrailerBytes = 4;       // CRC-32C

// The image is little-endian whatever the host; every target vhostkit builds for is.
void put16(std::vector<std::uint8_t>& out, std::uint16_t v) {
  out.push_back(static_cast<std::uint8_t>(v));
  out.push_back(static_cast<std::uint8_t>(v >> 8));
}
void put32(std::vector<std::uint8_t>& out, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}
void put64(std::vector<std::uint8_t>& out, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}
std::uint16_t get16(const std::uint8_t* p) {
  return static_cast<std::uint16_t>(p[0] | (p[1] << 8));
}
std::uint32_t get32(const std::uint8_t* p) {
  std::uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
std::uint64_t get64(const std::uint8_t* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

bool printable(std::span<const std::uint8_t> s) {
  return std::all_of(s.begin(), s.end(), [](std::uint8_t c) { return c >= 0x20 && c < 0x7f; });
}

const char* type_name(RecordType t) {
  switch (t) {
    case RecordType::u64: return "u64";
    case RecordType::bytes: return "bytes";
    case RecordType::text: return "text";
    case RecordType::group: return "group";
  }
  return "?";
}

DeviceStateError fail(DeviceStateErrc code, std::uint16_t tag, std::string detail) {
  return DeviceStateError{code, tag, std::move(detail)};
}

std::array<std::uint32_t, 256> crc_table() {
  std::array<std::uint32_t, 256> t{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) != 0 ? (c >> 1) ^ 0x82f63b78u : c >> 1;
    t[i] = c;
  }
  return t;
}

}  // namespace

const char* to_string(DeviceStateErrc e) {
  switch (e) {
    case DeviceStateErrc::truncated: return "truncated";
    case DeviceStateErrc::bad_magic: return "not a device state image";
    case DeviceStateErrc::bad_format: return "unsupported image format";
    case DeviceStateErrc::bad_checksum: return "checksum mismatch";
    case DeviceStateErrc::bad_header: return "bad header";
    case DeviceStateErrc::bad_record: return "malformed record";
    case DeviceStateErrc::duplicate: return "duplicate record";
    case DeviceStateErrc::too_deep: return "groups nested too deep";
    case DeviceStateErrc::too_large: return "too large";
    case DeviceStateErrc::missing: return "missing record";
    case DeviceStateErrc::wrong_type: return "record of the wrong type";
    case DeviceStateErrc::bad_value: return "value out of range";
  }
  return "unknown device state error";
}

std::string DeviceStateError::message() const {
  std::string m = fmt::format("device state: {}", to_string(code));
  if (code == DeviceStateErrc::missing || code == DeviceStateErrc::wrong_type ||
      code == DeviceStateErrc::duplicate || code == DeviceStateErrc::bad_value ||
      code == DeviceStateErrc::bad_record)
    m += fmt::format(" (tag {})", tag);
  if (!detail.empty()) m += ": " + detail;
  return m;
}

std::uint32_t crc32c(std::span<const std::uint8_t> data) {
  static const std::array<std::uint32_t, 256> table = crc_table();
  std::uint32_t c = 0xffffffffu;
  for (std::uint8_t b : data) c = table[(c ^ b) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

// ---- DeviceStateWriter ---------------------------------------------------------------

void DeviceStateWriter::header(std::uint16_t tag, RecordType type, std::size_t length) {
  put16(data_, tag);
  data_.push_back(static_cast<std::uint8_t>(type));
  data_.push_back(0);
  // A record longer than 4 GiB cannot be framed; encode_device_state() refuses the image
  // long before (kMaxDeviceStateBytes), so saturating here only keeps the framing sane.
  put32(data_, static_cast<std::uint32_t>(std::min<std::size_t>(length, UINT32_MAX)));
}

void DeviceStateWriter::u64(std::uint16_t tag, std::uint64_t value) {
  header(tag, RecordType::u64, 8);
  put64(data_, value);
}

void DeviceStateWriter::bytes(std::uint16_t tag, std::span<const std::uint8_t> value) {
  header(tag, RecordType::bytes, value.size());
  data_.insert(data_.end(), value.begin(), value.end());
}

void DeviceStateWriter::text(std::uint16_t tag, std::string_view value) {
  header(tag, RecordType::text, value.size());
  data_.insert(data_.end(), value.begin(), value.end());
}

void DeviceStateWriter::group(std::uint16_t tag, const DeviceStateWriter& inner) {
  header(tag, RecordType::group, inner.data_.size());
  data_.insert(data_.end(), inner.data_.begin(), inner.data_.end());
}

// ---- DeviceStateReader ---------------------------------------------------------------

Result<DeviceStateReader, DeviceStateError> DeviceStateReader::parse(
    std::span<const std::uint8_t> records, unsigned depth) {
  if (depth > kMaxDeviceStateDepth)
    return unexpected(fail(DeviceStateErrc::too_deep, 0, fmt::format("depth {}", depth)));
  DeviceStateReader r;
  r.depth_ = depth;
  std::size_t off = 0;
  while (off < records.size()) {
    if (records.size() - off < kRecordHeaderBytes)
      return unexpected(
          fail(DeviceStateErrc::truncated, 0,
               fmt::format("{} bytes left for an 8-byte record header", records.size() - off)));
    const std::uint8_t* h = records.data() + off;
    DeviceStateRecord rec;
    rec.tag = get16(h);
    const std::uint8_t type = h[2];
    const std::uint32_t length = get32(h + 4);
    if (type < 1 || type > 4)
      return unexpected(fail(DeviceStateErrc::bad_record, rec.tag, fmt::format("type {}", type)));
    if (h[3] != 0)
      return unexpected(
          fail(DeviceStateErrc::bad_record, rec.tag, fmt::format("reserved byte {:#x}", h[3])));
    rec.type = static_cast<RecordType>(type);
    off += kRecordHeaderBytes;
    if (length > records.size() - off)
      return unexpected(
          fail(DeviceStateErrc::truncated, rec.tag,
               fmt::format("record of {} bytes, {} left", length, records.size() - off)));
    rec.value = records.subspan(off, length);
    off += length;
    if (rec.type == RecordType::u64 && length != 8)
      return unexpected(
          fail(DeviceStateErrc::bad_record, rec.tag, fmt::format("u64 of {} bytes", length)));
    if (rec.type == RecordType::text && !printable(rec.value))
      return unexpected(fail(DeviceStateErrc::bad_record, rec.tag, "text not printable ASCII"));
    if (rec.type == RecordType::group) {
      // Checked now, so that a reader that never opens the group still refuses the image.
      if (auto inner = parse(rec.value, depth + 1); !inner) return unexpected(inner.error());
    }
    // Tags are unique, so a level holds at most 65536 records.
    if (r.records_.size() > UINT16_MAX)
      return unexpected(fail(DeviceStateErrc::duplicate, rec.tag, "more than 65536 records"));
    r.records_.push_back(rec);
  }
  std::vector<std::uint16_t> tags;
  tags.reserve(r.records_.size());
  for (const auto& rec : r.records_) tags.push_back(rec.tag);
  std::sort(tags.begin(), tags.end());
  if (auto d = std::adjacent_find(tags.begin(), tags.end()); d != tags.end())
    return unexpected(fail(DeviceStateErrc::duplicate, *d, {}));
  return r;
}

bool DeviceStateReader::has(std::uint16_t tag) const {
  return std::any_of(records_.begin(), records_.end(),
                     [&](const DeviceStateRecord& r) { return r.tag == tag; });
}

Result<const DeviceStateRecord*, DeviceStateError> DeviceStateReader::find(std::uint16_t tag,
                                                                           RecordType type) const {
  for (const auto& r : records_) {
    if (r.tag != tag) continue;
    if (r.type != type)
      return unexpected(fail(DeviceStateErrc::wrong_type, tag,
                             fmt::format("{}, expected {}", type_name(r.type), type_name(type))));
    return &r;
  }
  return unexpected(fail(DeviceStateErrc::missing, tag, {}));
}

Result<std::uint64_t, DeviceStateError> DeviceStateReader::u64(std::uint16_t tag) const {
  auto r = find(tag, RecordType::u64);
  if (!r) return unexpected(r.error());
  return get64((*r)->value.data());
}

Result<std::uint64_t, DeviceStateError> DeviceStateReader::u64(std::uint16_t tag,
                                                               std::uint64_t max) const {
  auto v = u64(tag);
  if (v && *v > max)
    return unexpected(fail(DeviceStateErrc::bad_value, tag, fmt::format("{} > {}", *v, max)));
  return v;
}

Result<std::span<const std::uint8_t>, DeviceStateError> DeviceStateReader::bytes(
    std::uint16_t tag) const {
  auto r = find(tag, RecordType::bytes);
  if (!r) return unexpected(r.error());
  return (*r)->value;
}

Result<std::span<const std::uint8_t>, DeviceStateError> DeviceStateReader::bytes(
    std::uint16_t tag, std::size_t length) const {
  auto b = bytes(tag);
  if (b && b->size() != length)
    return unexpected(fail(DeviceStateErrc::bad_value, tag,
                           fmt::format("{} bytes, expected {}", b->size(), length)));
  return b;
}

Result<std::string_view, DeviceStateError> DeviceStateReader::text(std::uint16_t tag) const {
  auto r = find(tag, RecordType::text);
  if (!r) return unexpected(r.error());
  return std::string_view(reinterpret_cast<const char*>((*r)->value.data()), (*r)->value.size());
}

Result<DeviceStateReader, DeviceStateError> DeviceStateReader::group(std::uint16_t tag) const {
  auto r = find(tag, RecordType::group);
  if (!r) return unexpected(r.error());
  return parse((*r)->value, depth_ + 1);
}

// ---- Images --------------------------------------------------------------------------

Result<std::vector<std::uint8_t>, DeviceStateError> encode_device_state(
    const DeviceStateHeader& header, const DeviceStateWriter& records) {
  const std::string& kind = header.format.kind;
  if (kind.empty() || kind.size() > kMaxDeviceKindLength ||
      !printable(std::span(reinterpret_cast<const std::uint8_t*>(kind.data()), kind.size())))
    return unexpected(fail(DeviceStateErrc::bad_header, 0, fmt::format("kind '{}'", kind)));
  const std::size_t total = kHeaderBytes + kind.size() + records.data().size() + kTrailerBytes;
  if (total > kMaxDeviceStateBytes)
    return unexpected(fail(DeviceStateErrc::too_large, 0,
                           fmt::format("{} bytes, at most {}", total, kMaxDeviceStateBytes)));
  std::vector<std::uint8_t> out;
  out.reserve(total);
  out.insert(out.end(), kMagic.begin(), kMagic.end());
  put16(out, kDeviceStateFormat);
  put16(out, static_cast<std::uint16_t>(kind.size()));
  put32(out, header.format.version);
  put32(out, header.queues);
  put32(out, static_cast<std::uint32_t>(records.data().size()));
  out.insert(out.end(), kind.begin(), kind.end());
  out.insert(out.end(), records.data().begin(), records.data().end());
  put32(out, crc32c(out));
  return out;
}

Result<DecodedDeviceState, DeviceStateError> decode_device_state(
    std::span<const std::uint8_t> image) {
  if (image.size() > kMaxDeviceStateBytes)
    return unexpected(
        fail(DeviceStateErrc::too_large, 0,
             fmt::format("{} bytes, at most {}", image.size(), kMaxDeviceStateBytes)));
  if (image.size() < kHeaderBytes + kTrailerBytes)
    return unexpected(
        fail(DeviceStateErrc::truncated, 0, fmt::format("{} bytes of image", image.size())));
  if (!std::equal(kMagic.begin(), kMagic.end(), image.begin()))
    return unexpected(fail(DeviceStateErrc::bad_magic, 0, {}));
  const std::uint16_t format = get16(image.data() + 8);
  if (format != kDeviceStateFormat)
    return unexpected(fail(DeviceStateErrc::bad_format, 0,
                           fmt::format("format {}, this reads {}", format, kDeviceStateFormat)));
  const std::size_t kind_len = get16(image.data() + 10);
  const std::size_t records_len = get32(image.data() + 20);
  const std::size_t body = image.size() - kHeaderBytes - kTrailerBytes;
  if (kind_len > body || records_len != body - kind_len)
    return unexpected(fail(DeviceStateErrc::truncated, 0,
                           fmt::format("header announces {} + {} bytes, the image holds {}",
                                       kind_len, records_len, body)));
  const std::size_t end = image.size() - kTrailerBytes;
  if (crc32c(image.first(end)) != get32(image.data() + end))
    return unexpected(fail(DeviceStateErrc::bad_checksum, 0, {}));
  auto kind = image.subspan(kHeaderBytes, kind_len);
  if (kind_len == 0 || kind_len > kMaxDeviceKindLength || !printable(kind))
    return unexpected(fail(DeviceStateErrc::bad_header, 0, "device kind"));
  auto records = DeviceStateReader::parse(image.subspan(kHeaderBytes + kind_len, records_len));
  if (!records) return unexpected(records.error());
  DecodedDeviceState out{DeviceStateHeader{DeviceStateFormat{std::string(kind.begin(), kind.end()),
                                                             get32(image.data() + 12)},
                                           get32(image.data() + 16)},
                         std::move(*records)};
  return out;
}

}  // namespace vhostkit
