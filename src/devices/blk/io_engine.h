// src/devices/blk/io_engine.h: how the block device moves data between the image and
// guest memory. One engine per queue, used by that queue's worker only.
//   IoRequest  a read or write (vectored, at a byte offset) or a flush (fdatasync) of a
//              file descriptor; result is the number of bytes transferred or -errno.
//   IoEngine   run() executes a batch and returns when every request has a result. A
//              flush covers every request before it in the batch. A short transfer is
//              completed by the engine (retried from where it stopped) or reported as
//              such in result.
//   Buffered   a request on a descriptor without O_DIRECT (IoRequest::buffered). The
//              io_uring engine writes these with pwritev on the calling thread: io_uring
//              would try them without blocking, fail (the file system must lock the
//              inode) and hand every buffered write to one file to a single kernel
//              worker thread, one after the other, each with a thread switch. Buffered
//              reads of 128 KiB or more go to io_uring's kernel workers at once
//              (IOSQE_ASYNC): the copies out of the page cache then run on every core,
//              not one after the other on the queue's worker.
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
  int fd = -1;
  int iovcnt = 0;
  iovec* iov = nullptr;  // REQUIRES: iovcnt <= IOV_MAX; the engine may advance it
  std::uint64_t offset = 0;
  std::uint64_t len = 0;  // sum of the iov lengths
  bool buffered = true;   // fd has no O_DIRECT (the page cache serves it)
  std::int64_t result = 0;
};

class IoEngine {
 public:
  virtual ~IoEngine() = default;
  [[nodiscard]] virtual const char* name() const = 0;
  virtual void run(std::span<IoRequest> requests) = 0;
};

// Synchronous preadv/pwritev/fdatasync.
[[nodiscard]] std::unique_ptr<IoEngine> make_sync_engine();
// io_uring with `depth` entries; error text if the kernel refuses.
[[nodiscard]] Result<std::unique_ptr<IoEngine>, std::string> make_uring_engine(unsigned depth);

// Completes a vectored transfer synchronously from `done` bytes on; returns the total
// transferred or -errno.
std::int64_t finish_sync(IoRequest& r, std::uint64_t done);
// fdatasync: 0 or -errno.
std::int64_t flush_sync(int fd);

}  // namespace vhostkit::blk
