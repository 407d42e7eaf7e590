// src/devices/blk/io_engine.h: how the block device moves data between the image and
// guest memory. One engine per queue, used by that queue's worker only.
//   IoRequest  a read or write (vectored, at a byte offset) or a flush; result is the
//              number of bytes transferred or -errno.
//   IoEngine   run() executes a batch and returns when every request has a result. A
//              flush covers every request before it in the batch. A short transfer is
//              completed by the engine (retried from where it stopped) or reported as
//              such in result.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "vhostkit/types.h"

namespace vhostkit::blk {

enum class IoOp : std::uint8_t { read, write, flush };

struct IoRequest {
  IoOp op = IoOp::read;
  int iovcnt = 0;
  iovec* iov = nullptr;  // REQUIRES: iovcnt <= IOV_MAX; the engine may advance it
  std::uint64_t offset = 0;
  std::uint64_t len = 0;  // sum of the iov lengths
  std::int64_t result = 0;
};

class IoEngine {
 public:
  virtual ~IoEngine() = default;
  [[nodiscard]] virtual const char* name() const = 0;
  virtual void run(std::span<IoRequest> requests) = 0;
};

// Synchronous preadv/pwritev/fdatasync.
[[nodiscard]] std::unique_ptr<IoEngine> make_sync_engine(int fd);
// io_uring with `depth` entries; error text if the kernel refuses.
[[nodiscard]] Result<std::unique_ptr<IoEngine>, std::string> make_uring_engine(int fd,
                                                                               unsigned depth);

// Completes a vectored transfer synchronously from `done` bytes on; returns the total
// transferred or -errno.
std::int64_t finish_sync(int fd, IoRequest& r, std::uint64_t done);

}  // namespace vhostkit::blk
