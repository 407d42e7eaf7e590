// The two I/O engines of the block device: synchronous and io_uring.
#include "devices/blk/io_engine.h"

#include <liburing.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include <fmt/format.h>

namespace vhostkit::blk {
namespace {

constexpr std::uint64_t kAsyncReadBytes = 128 * 1024;

// Drops the first n bytes of the vector (iov and iovcnt advance in place).
void advance(iovec*& iov, int& iovcnt, std::uint64_t n) {
  while (n > 0 && iovcnt > 0) {
    if (n < iov->iov_len) {
      iov->iov_base = static_cast<std::uint8_t*>(iov->iov_base) + n;
      iov->iov_len -= n;
      return;
    }
    n -= iov->iov_len;
    ++iov;
    --iovcnt;
  }
  while (iovcnt > 0 && iov->iov_len == 0) {
    ++iov;
    --iovcnt;
  }
}

std::int64_t run_sync(IoRequest& r) {
  return r.op == IoOp::flush ? flush_sync(r.fd) : finish_sync(r, 0);
}

class SyncEngine final : public IoEngine {
 public:
  const char* name() const override { return "sync"; }
  void run(std::span<IoRequest> requests) override {
    for (IoRequest& r : requests) r.result = run_sync(r);
  }
};

class UringEngine final : public IoEngine {
 public:
  explicit UringEngine(unsigned depth) : depth_(depth) {}
  ~UringEngine() override {
    if (initialised_) io_uring_queue_exit(&ring_);
  }
  UringEngine(const UringEngine&) = delete;
  UringEngine& operator=(const UringEngine&) = delete;

  int init() {
    int rc = io_uring_queue_init(depth_, &ring_, 0);
    if (rc == 0) initialised_ = true;
    return rc;
  }
  const char* name() const override { return "io_uring"; }

  void run(std::span<IoRequest> requests) override {
    std::size_t next = 0, in_flight = 0;
    while (next < requests.size() || in_flight > 0) {
      // Queue as many as the ring takes.
      while (next < requests.size()) {
        IoRequest& r = requests[next];
        if (r.op == IoOp::write && r.buffered) {
          // Written here (see io_engine.h). Requests of a batch have no order among
          // themselves, and a flush queued before it has not reached the kernel yet, so
          // it still covers the write.
          r.result = finish_sync(r, 0);
          ++next;
          continue;
        }
        io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
        if (sqe == nullptr) break;
        switch (r.op) {
          case IoOp::read:
            io_uring_prep_readv(sqe, r.fd, r.iov, static_cast<unsigned>(r.iovcnt), r.offset);
            // A big copy out of the page cache: to io_uring's kernel workers, which copy
            // in parallel on every core, rather than inline at submit on this thread.
            if (r.buffered && r.len >= kAsyncReadBytes) io_uring_sqe_set_flags(sqe, IOSQE_ASYNC);
            break;
          case IoOp::write:
            io_uring_prep_writev(sqe, r.fd, r.iov, static_cast<unsigned>(r.iovcnt), r.offset);
            break;
          case IoOp::flush:
            io_uring_prep_fsync(sqe, r.fd, IORING_FSYNC_DATASYNC);
            // A flush covers every request submitted before it.
            io_uring_sqe_set_flags(sqe, IOSQE_IO_DRAIN);
            break;
        }
        io_uring_sqe_set_data64(sqe, next);
        ++next;
        ++in_flight;
      }
      if (in_flight == 0) break;  // everything was written synchronously
      // One system call submits the batch and sleeps until all of it is done (the
      // device completes nothing before the whole batch anyway): no wake-up per
      // completion. Completions served at submit (page-cache hits) are already there.
      int rc;
      do {
        rc = io_uring_submit_and_wait(&ring_, static_cast<unsigned>(in_flight));
      } while (rc == -EINTR);
      if (rc < 0) {
        // The ring failed: finish everything not yet completed synchronously. Requests
        // already in the kernel are reaped below before that.
        drain_after_failure(requests, next, in_flight);
        return;
      }
      reap(requests, in_flight);
    }
  }

 private:
  void reap(std::span<IoRequest> requests, std::size_t& in_flight) {
    io_uring_cqe* cqe = nullptr;
    unsigned head = 0, seen = 0;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      std::uint64_t i = io_uring_cqe_get_data64(cqe);
      ++seen;
      if (i < requests.size()) complete(requests[i], cqe->res);
      --in_flight;
    }
    io_uring_cq_advance(&ring_, seen);
  }
  void complete(IoRequest& r, int res) {
    if (r.op == IoOp::flush || res < 0) {
      r.result = res;
      return;
    }
    if (static_cast<std::uint64_t>(res) < r.len && res > 0) {
      r.result = finish_sync(r, static_cast<std::uint64_t>(res));
      return;
    }
    r.result = res == 0 && r.len > 0 ? -EIO : res;
  }
  void drain_after_failure(std::span<IoRequest> requests, std::size_t next, std::size_t in_flight) {
    while (in_flight > 0) {
      io_uring_cqe* cqe = nullptr;
      if (io_uring_wait_cqe(&ring_, &cqe) != 0) break;
      std::uint64_t i = io_uring_cqe_get_data64(cqe);
      if (i < requests.size()) complete(requests[i], cqe->res);
      io_uring_cqe_seen(&ring_, cqe);
      --in_flight;
    }
    for (std::size_t i = next; i < requests.size(); ++i) requests[i].result = run_sync(requests[i]);
  }

  unsigned depth_;
  io_uring ring_{};
  bool initialised_ = false;
};

}  // namespace

std::int64_t flush_sync(int fd) {
  if (::fdatasync(fd) == 0) return 0;
  return -errno;
}

std::int64_t finish_sync(IoRequest& r, std::uint64_t done) {
  const int fd = r.fd;
  iovec* iov = r.iov;
  int cnt = r.iovcnt;
  advance(iov, cnt, done);
  std::uint64_t total = done;
  while (total < r.len && cnt > 0) {
    auto off = static_cast<off_t>(r.offset + total);
    ssize_t n = r.op == IoOp::read ? ::preadv(fd, iov, cnt, off) : ::pwritev(fd, iov, cnt, off);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (n == 0) return -EIO;  // end of file inside the capacity: the image shrank
    total += static_cast<std::uint64_t>(n);
    advance(iov, cnt, static_cast<std::uint64_t>(n));
  }
  return static_cast<std::int64_t>(total);
}

std::unique_ptr<IoEngine> make_sync_engine() {
  return std::make_unique<SyncEngine>();
}

Result<std::unique_ptr<IoEngine>, std::string> make_uring_engine(unsigned depth) {
  auto e = std::make_unique<UringEngine>(depth);
  if (int rc = e->init(); rc < 0)
    return tl::unexpected(fmt::format("io_uring_queue_init: {}", std::strerror(-rc)));
  return std::unique_ptr<IoEngine>(std::move(e));
}

}  // namespace vhostkit::blk
