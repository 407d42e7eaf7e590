// Test support: real memfd-backed guest memory.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <stdexcept>

#include "vhostkit/memory.h"
#include "vhostkit/unique_fd.h"

namespace vhostkit::testing {

// A memfd of `size` bytes (zero filled).
inline UniqueFd make_memfd(std::uint64_t size, const char* name = "vhostkit-test") {
  int fd = ::memfd_create(name, MFD_CLOEXEC);
  if (fd < 0) throw std::runtime_error("memfd_create failed");
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0) {
    ::close(fd);
    throw std::runtime_error("ftruncate failed");
  }
  return UniqueFd(fd);
}

// A duplicate of fd (the memory table consumes the fd it is given).
inline UniqueFd dup_fd(const UniqueFd& fd) {
  return UniqueFd(::dup(fd.get()));
}

inline RegionSpec region(UniqueFd fd, std::uint64_t offset, std::uint64_t size, std::uint64_t gpa,
                         std::uint64_t uaddr) {
  RegionSpec s;
  s.fd = std::move(fd);
  s.mmap_offset = offset;
  s.size = size;
  s.gpa = Gpa(gpa);
  s.uaddr = Uaddr(uaddr);
  return s;
}

// Number of open fds of this process.
std::size_t open_fd_count();

}  // namespace vhostkit::testing
