// vhostkit/types.h: the address vocabulary shared by every layer.
//
// Concepts
//   Gpa    guest-physical address: what the memory table is indexed by and what the
//          dirty log records.
//   Iova   I/O virtual address: what a device sees behind a vIOMMU. Without
//          VIRTIO_F_ACCESS_PLATFORM an Iova is numerically equal to a Gpa.
//   Uaddr  the frontend's own virtual address of guest memory ("userspace_addr" in the
//          vhost-user specification). Never dereferenced by the backend.
//   Access the permission an access needs or an IOTLB entry grants.
//
// The three address kinds are distinct types so that one can never be passed where
// another is expected; converting between them is a lookup, not a cast.
#pragma once

#include <compare>
#include <cstdint>
#include <optional>

#include <tl/expected.hpp>

#include "vhostkit/export.h"

namespace vhostkit {

template <typename T, typename E>
using Result = tl::expected<T, E>;
using tl::make_unexpected;
using tl::unexpected;

// Checked a + b for operands that come from a guest or a frontend.
[[nodiscard]] constexpr std::optional<std::uint64_t> checked_add(std::uint64_t a, std::uint64_t b) {
  std::uint64_t r = 0;
  if (__builtin_add_overflow(a, b, &r)) return std::nullopt;
  return r;
}

// A strongly typed 64-bit address. Tag makes each kind a distinct type.
template <typename Tag>
struct Address {
  std::uint64_t value = 0;

  constexpr Address() = default;
  constexpr explicit Address(std::uint64_t v) : value(v) {}

  constexpr auto operator<=>(const Address&) const = default;

  // Offsetting by a length. REQUIRES: no overflow (callers on hostile input check
  // with checked_end() first).
  [[nodiscard]] constexpr Address operator+(std::uint64_t off) const {
    return Address(value + off);
  }
  [[nodiscard]] constexpr std::uint64_t operator-(Address other) const {
    return value - other.value;
  }
  // The exclusive end of [*this, *this + len), or nullopt if it wraps past 2^64.
  [[nodiscard]] constexpr std::optional<Address> checked_end(std::uint64_t len) const {
    auto e = checked_add(value, len);
    if (!e) return std::nullopt;
    return Address(*e);
  }
  // Guest page number for 4 KiB pages (the dirty log's granule).
  [[nodiscard]] constexpr std::uint64_t page() const { return value >> 12; }
};

struct GpaTag {};
struct IovaTag {};
struct UaddrTag {};
using Gpa = Address<GpaTag>;
using Iova = Address<IovaTag>;
using Uaddr = Address<UaddrTag>;

// Host pointer into mapped guest memory.
using HostPtr = std::uint8_t*;

inline constexpr std::uint64_t kPageSize = 4096;  // dirty-log granule (VHOST_LOG_PAGE)

// Access rights: a bit set. Numerically equal to VHOST_ACCESS_{RO,WO,RW}.
enum class Access : std::uint8_t { none = 0, read = 1, write = 2, read_write = 3 };

[[nodiscard]] constexpr bool permits(Access granted, Access needed) {
  auto g = static_cast<std::uint8_t>(granted);
  auto n = static_cast<std::uint8_t>(needed);
  return (g & n) == n;
}

[[nodiscard]] VHOSTKIT_API const char* to_string(Access a);

}  // namespace vhostkit
