#include "rng_device.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <span>

#include "vhostkit/log.h"

namespace rng {

using vhostkit::LogLevel;

vhostkit::Result<std::unique_ptr<RngDevice>, std::string> RngDevice::open(
    std::string name, const std::string& source) {
  vhostkit::UniqueFd fd(::open(source.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    return vhostkit::make_unexpected("cannot open the entropy source " + source + ": " +
                                     std::strerror(errno));
  }
  return std::unique_ptr<RngDevice>(new RngDevice(std::move(name), source, std::move(fd)));
}

RngDevice::RngDevice(std::string name, std::string source, vhostkit::UniqueFd fd)
    : name_(std::move(name)), source_(std::move(source)), fd_(std::move(fd)) {
  buf_.resize(kMaxRequestBytes);
  done_.reserve(kBurst);
}

bool RngDevice::fill(std::uint8_t* buf, std::size_t len) {
  std::size_t got = 0;
  while (got < len) {
    ssize_t n = ::read(fd_.get(), buf + got, len - got);
    if (n > 0) {
      got += static_cast<std::size_t>(n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      stats_.source_errors.fetch_add(1, std::memory_order_relaxed);
      vhostkit::log(LogLevel::error, "{}: reading {}: {}", name_, source_,
                    n == 0 ? "end of file" : std::strerror(errno));
      return false;
    }
  }
  return true;
}

vhostkit::QueueWork RngDevice::process(std::uint32_t /*queue*/, vhostkit::Virtqueue& vq) {
  vhostkit::QueueWork work;
  batch_.clear();
  done_.clear();
  auto popped = vq.pop(batch_, kBurst);
  if (!popped) {
    work.error = popped.error();  // a malformed ring: the queue is broken
    return work;
  }
  work.deferred = popped->deferred;  // an IOTLB miss: the runner asks the front-end
  for (const vhostkit::DescChain& chain : batch_.chains()) {
    std::uint32_t len = std::min(chain.writable_len, kMaxRequestBytes);
    std::uint32_t written = 0;
    if (len == 0) {
      stats_.unwritable.fetch_add(1, std::memory_order_relaxed);
      if (!warned_unwritable_) {
        vhostkit::log(LogLevel::warn,
                      "{}: request {} has no device-writable buffer; completed empty "
                      "(logged once per connection)",
                      name_, chain.id);
        warned_unwritable_ = true;
      }
    } else if (fill(buf_.data(), len)) {
      auto n = vq.write_chain(batch_, chain, 0, std::span(buf_.data(), len));
      if (!n) {
        work.error = n.error();
        return work;
      }
      written = *n;
    }
    done_.push_back(vhostkit::Completion{chain.id, chain.ring_descs, written});
    stats_.bytes.fetch_add(written, std::memory_order_relaxed);
  }
  if (!done_.empty()) {
    auto notify = vq.push(done_);
    if (!notify) {
      work.error = notify.error();
      return work;
    }
    stats_.requests.fetch_add(done_.size(), std::memory_order_relaxed);
    work.notify = *notify;
    work.progress = true;
  }
  return work;
}

void RngDevice::reset() {
  std::uint64_t bytes = stats_.bytes.load();
  std::uint64_t requests = stats_.requests.load();
  if (requests != requests_at_reset_) {
    vhostkit::log(LogLevel::info, "{}: {} requests, {} bytes served since the last reset", name_,
                  requests - requests_at_reset_, bytes - bytes_at_reset_);
  }
  bytes_at_reset_ = bytes;
  requests_at_reset_ = requests;
  warned_unwritable_ = false;
}

}  // namespace rng
