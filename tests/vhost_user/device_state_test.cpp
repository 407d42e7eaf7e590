// Device state images (vhostkit/vhost_user/device_state.h): records written and read back,
// the header and checksum, and every way a hostile image is refused: each byte altered,
// each length cut short, malformed records, duplicates, deep nesting, oversized images.
#include <rapidcheck.h>

#include <gtest/gtest.h>

#include "vhostkit/vhost_user/device_state.h"

namespace vhostkit {
namespace {

DeviceStateWriter sample_records() {
  DeviceStateWriter w;
  w.u64(1, 0x0123456789abcdefULL);
  const std::uint8_t mac[6] = {0x52, 0x54, 0x00, 0xab, 0xcd, 0xef};
  w.bytes(2, mac);
  w.text(3, "vhostkit-serial");
  DeviceStateWriter q0, q1, queues;
  q0.u64(1, 7);
  q1.u64(1, 9);
  q1.bytes(2, {});
  queues.group(0, q0);
  queues.group(1, q1);
  w.group(4, queues);
  return w;
}

std::vector<std::uint8_t> sample_image() {
  return *encode_device_state({{"virtio-test", 3}, 2}, sample_records());
}

TEST(DeviceState, RecordsRoundTrip) {
  auto image = sample_image();
  auto d = decode_device_state(image);
  ASSERT_TRUE(d.has_value()) << d.error().message();
  EXPECT_EQ(d->header.format.kind, "virtio-test");
  EXPECT_EQ(d->header.format.version, 3u);
  EXPECT_EQ(d->header.queues, 2u);
  const DeviceStateReader& r = d->records;
  EXPECT_EQ(*r.u64(1), 0x0123456789abcdefULL);
  EXPECT_EQ(r.bytes(2, 6)->size(), 6u);
  EXPECT_EQ((*r.bytes(2))[3], 0xab);
  EXPECT_EQ(*r.text(3), "vhostkit-serial");
  auto queues = r.group(4);
  ASSERT_TRUE(queues.has_value());
  ASSERT_EQ(queues->records().size(), 2u);
  EXPECT_EQ(*queues->group(0)->u64(1), 7u);
  EXPECT_EQ(*queues->group(1)->u64(1), 9u);
  EXPECT_TRUE(queues->group(1)->bytes(2)->empty());
  // Records come back in the order they were written, with their types.
  ASSERT_EQ(r.records().size(), 4u);
  EXPECT_EQ(r.records()[0].type, RecordType::u64);
  EXPECT_EQ(r.records()[3].type, RecordType::group);
  // An empty writer is a valid state.
  auto empty = encode_device_state({{"stateless", 0}, 1}, DeviceStateWriter{});
  ASSERT_TRUE(empty.has_value());
  auto e = decode_device_state(*empty);
  ASSERT_TRUE(e.has_value());
  EXPECT_TRUE(e->records.records().empty());
}

TEST(DeviceState, ReadersSayWhatIsWrong) {
  auto image = sample_image();
  auto d = decode_device_state(image);
  ASSERT_TRUE(d.has_value());
  const DeviceStateReader& r = d->records;
  EXPECT_EQ(r.u64(99).error().code, DeviceStateErrc::missing);
  EXPECT_EQ(r.u64(99).error().tag, 99);
  EXPECT_EQ(r.bytes(1).error().code, DeviceStateErrc::wrong_type);
  EXPECT_EQ(r.u64(3).error().code, DeviceStateErrc::wrong_type);
  EXPECT_EQ(r.bytes(2, 5).error().code, DeviceStateErrc::bad_value);
  EXPECT_EQ(r.u64(1, 10).error().code, DeviceStateErrc::bad_value);
  EXPECT_TRUE(r.u64(1, UINT64_MAX).has_value());
  EXPECT_EQ(r.group(1).error().code, DeviceStateErrc::wrong_type);
  EXPECT_NE(r.u64(99).error().message().find("missing record (tag 99)"), std::string::npos);
}

TEST(DeviceState, EveryAlteredByteIsRefused) {
  const auto image = sample_image();
  for (std::size_t i = 0; i < image.size(); ++i) {
    for (std::uint8_t flip : {0x01, 0x80, 0xff}) {
      auto bad = image;
      bad[i] ^= flip;
      EXPECT_FALSE(decode_device_state(bad).has_value()) << "byte " << i << " ^ " << int(flip);
    }
  }
}

TEST(DeviceState, EveryTruncationAndExtensionIsRefused) {
  const auto image = sample_image();
  for (std::size_t n = 0; n < image.size(); ++n) {
    std::vector<std::uint8_t> cut(image.begin(), image.begin() + static_cast<long>(n));
    EXPECT_FALSE(decode_device_state(cut).has_value()) << n << " bytes";
  }
  auto longer = image;
  longer.push_back(0);
  EXPECT_FALSE(decode_device_state(longer).has_value());
}

// An image with a valid header and checksum around `records` (as a hostile front-end
// would make one: the checksum proves nothing about intent).
std::vector<std::uint8_t> forge(std::span<const std::uint8_t> records, std::uint16_t format = 1,
                                std::string kind = "forged") {
  std::vector<std::uint8_t> out = {'V', 'H', 'K', 'S', 'T', 'A', 'T', 'E'};
  auto put = [&](std::uint64_t v, int n) {
    for (int i = 0; i < n; ++i) out.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
  };
  put(format, 2);
  put(kind.size(), 2);
  put(1, 4);
  put(1, 4);
  put(records.size(), 4);
  out.insert(out.end(), kind.begin(), kind.end());
  out.insert(out.end(), records.begin(), records.end());
  put(crc32c(out), 4);
  return out;
}

std::vector<std::uint8_t> record(std::uint16_t tag, std::uint8_t type, std::uint32_t len,
                                 std::span<const std::uint8_t> value, std::uint8_t reserved = 0) {
  std::vector<std::uint8_t> r = {static_cast<std::uint8_t>(tag),
                                 static_cast<std::uint8_t>(tag >> 8), type, reserved};
  for (int i = 0; i < 4; ++i) r.push_back(static_cast<std::uint8_t>(len >> (8 * i)));
  r.insert(r.end(), value.begin(), value.end());
  return r;
}

DeviceStateErrc refusal(std::span<const std::uint8_t> image) {
  auto d = decode_device_state(image);
  EXPECT_FALSE(d.has_value());
  return d ? DeviceStateErrc::bad_value : d.error().code;
}

TEST(DeviceState, HostileImagesAreRefused) {
  const std::uint8_t eight[8] = {};
  // The checked forge is accepted when well formed.
  ASSERT_TRUE(decode_device_state(forge(record(1, 1, 8, eight))).has_value());
  EXPECT_EQ(refusal(forge(record(1, 1, 8, eight), 2)), DeviceStateErrc::bad_format);
  EXPECT_EQ(refusal(forge(record(1, 1, 8, eight), 1, "")), DeviceStateErrc::bad_header);
  EXPECT_EQ(refusal(forge(record(1, 1, 8, eight), 1, "bad\nkind")), DeviceStateErrc::bad_header);
  EXPECT_EQ(refusal(forge(record(1, 1, 8, eight), 1, std::string(65, 'k'))),
            DeviceStateErrc::bad_header);
  // Unknown type, reserved byte set, u64 of the wrong length, unprintable text.
  EXPECT_EQ(refusal(forge(record(1, 5, 8, eight))), DeviceStateErrc::bad_record);
  EXPECT_EQ(refusal(forge(record(1, 0, 8, eight))), DeviceStateErrc::bad_record);
  EXPECT_EQ(refusal(forge(record(1, 1, 8, eight, 1))), DeviceStateErrc::bad_record);
  EXPECT_EQ(refusal(forge(record(1, 1, 4, std::span(eight, 4)))), DeviceStateErrc::bad_record);
  const std::uint8_t nul[2] = {'a', 0};
  EXPECT_EQ(refusal(forge(record(1, 3, 2, nul))), DeviceStateErrc::bad_record);
  // A record claiming more bytes than there are, and a half record header.
  EXPECT_EQ(refusal(forge(record(1, 2, 0xffffffffu, eight))), DeviceStateErrc::truncated);
  EXPECT_EQ(refusal(forge(std::span(eight, 5))), DeviceStateErrc::truncated);
  // The same tag twice.
  auto twice = record(7, 1, 8, eight);
  auto again = record(7, 2, 0, {});
  twice.insert(twice.end(), again.begin(), again.end());
  EXPECT_EQ(refusal(forge(twice)), DeviceStateErrc::duplicate);
  // A bad record inside a group is refused with the image, even if nobody opens the group.
  auto inner = record(1, 9, 0, {});
  EXPECT_EQ(refusal(forge(record(2, 4, static_cast<std::uint32_t>(inner.size()), inner))),
            DeviceStateErrc::bad_record);
  // Groups nested deeper than allowed.
  std::vector<std::uint8_t> nest = record(1, 1, 8, eight);
  for (unsigned d = 0; d <= kMaxDeviceStateDepth; ++d)
    nest = record(1, 4, static_cast<std::uint32_t>(nest.size()), nest);
  EXPECT_EQ(refusal(forge(nest)), DeviceStateErrc::too_deep);
  // Not an image at all, and an image beyond the limit.
  std::vector<std::uint8_t> junk(64, 0x5a);
  EXPECT_EQ(refusal(junk), DeviceStateErrc::bad_magic);
  std::vector<std::uint8_t> huge(kMaxDeviceStateBytes + 1, 0);
  EXPECT_EQ(refusal(huge), DeviceStateErrc::too_large);
}

TEST(DeviceState, ManyTinyRecordsAreCheckedQuickly) {
  // 65536 distinct tags is the most one level can hold; one more is a duplicate. Checked
  // in n log n, not n^2 (a hostile image of millions of records must not stall a load).
  std::vector<std::uint8_t> records;
  for (std::uint32_t t = 0; t <= 65536; ++t) {
    auto r = record(static_cast<std::uint16_t>(t), 2, 0, {});
    records.insert(records.end(), r.begin(), r.end());
  }
  EXPECT_EQ(refusal(forge(records)), DeviceStateErrc::duplicate);
  records.erase(records.end() - 8, records.end());
  const auto image = forge(records);  // the reader is a view of it
  auto d = decode_device_state(image);
  ASSERT_TRUE(d.has_value());
  EXPECT_EQ(d->records.records().size(), 65536u);
}

TEST(DeviceState, EncodingRefusesWhatCannotBeRead) {
  EXPECT_EQ(encode_device_state({{"", 1}, 1}, {}).error().code, DeviceStateErrc::bad_header);
  EXPECT_EQ(encode_device_state({{"tab\tkind", 1}, 1}, {}).error().code,
            DeviceStateErrc::bad_header);
  DeviceStateWriter big;
  std::vector<std::uint8_t> chunk(kMaxDeviceStateBytes / 2);
  big.bytes(1, chunk);
  big.bytes(2, chunk);
  EXPECT_EQ(encode_device_state({{"big", 1}, 1}, big).error().code, DeviceStateErrc::too_large);
}

TEST(DeviceState, Crc32cKnownValue) {
  // The check value of CRC-32C (RFC 3720, appendix B.4).
  const std::string s = "123456789";
  EXPECT_EQ(crc32c(std::span(reinterpret_cast<const std::uint8_t*>(s.data()), s.size())),
            0xe3069283u);
}

TEST(DeviceStateProperty, RandomRecordsRoundTripAndRandomBytesNeverCrash) {
  auto ok = rc::check("records round-trip", [] {
    const auto values =
        *rc::gen::container<std::vector<std::uint64_t>>(rc::gen::arbitrary<std::uint64_t>());
    const auto blob =
        *rc::gen::container<std::vector<std::uint8_t>>(rc::gen::arbitrary<std::uint8_t>());
    DeviceStateWriter w, inner;
    for (std::size_t i = 0; i < values.size(); ++i) w.u64(static_cast<std::uint16_t>(i), values[i]);
    inner.bytes(0, blob);
    w.group(static_cast<std::uint16_t>(values.size()), inner);
    auto image = encode_device_state({{"prop", 1}, 1}, w);
    RC_ASSERT(image.has_value());
    auto d = decode_device_state(*image);
    RC_ASSERT(d.has_value());
    for (std::size_t i = 0; i < values.size(); ++i)
      RC_ASSERT(*d->records.u64(static_cast<std::uint16_t>(i)) == values[i]);
    auto g = d->records.group(static_cast<std::uint16_t>(values.size()));
    RC_ASSERT(g.has_value());
    auto b = g->bytes(0);
    RC_ASSERT(std::vector<std::uint8_t>(b->begin(), b->end()) == blob);
  });
  EXPECT_TRUE(ok);
  auto robust = rc::check("random records never crash the reader", [] {
    const auto records =
        *rc::gen::container<std::vector<std::uint8_t>>(rc::gen::arbitrary<std::uint8_t>());
    const auto image = forge(records);  // the reader is a view of it
    auto d = decode_device_state(image);
    if (d) {
      // Whatever was accepted can be walked.
      for (const auto& r : d->records.records())
        if (r.type == RecordType::group) RC_ASSERT(d->records.group(r.tag).has_value());
    }
  });
  EXPECT_TRUE(robust);
}

}  // namespace
}  // namespace vhostkit
