// Shared by the fuzz targets: reads typed values off the fuzzer's input, with zeros once
// the input is used up, so every byte string is a valid (if short) program.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace vhostkit::fuzzing {

struct Input {
  const std::uint8_t* p;
  std::size_t n;

  template <typename T>
  T take() {
    T v{};
    std::size_t k = std::min(sizeof(T), n);
    std::memcpy(&v, p, k);
    p += k;
    n -= k;
    return v;
  }
  [[nodiscard]] bool empty() const { return n == 0; }
};

}  // namespace vhostkit::fuzzing
