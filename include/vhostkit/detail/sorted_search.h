// vhostkit/detail/sorted_search.h: branch-free search in sorted key arrays (internal).
#pragma once

#include <cstddef>
#include <cstdint>

namespace vhostkit::detail {

// Number of elements of the sorted array a[0..n) that are <= key. The loop runs
// log2(n) times whatever the data and compiles to a conditional move, so a random
// lookup costs no branch mispredictions.
inline std::size_t count_le(const std::uint64_t* a, std::size_t n, std::uint64_t key) {
  if (n == 0) return 0;
  const std::uint64_t* base = a;
  while (n > 1) {
    std::size_t half = n / 2;
    base = (base[half] <= key) ? base + half : base;
    n -= half;
  }
  return static_cast<std::size_t>(base - a) + (*base <= key ? 1 : 0);
}

}  // namespace vhostkit::detail
