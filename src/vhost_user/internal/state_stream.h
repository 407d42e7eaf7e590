// Moving a device state image through a transfer fd (a pipe end, or whatever the peer
// gave): all of it, to the end of file, without SIGPIPE, and with a way out. Used by the
// back-end server's transfer thread and by the front-end client. Internal.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "vhostkit/types.h"

namespace vhostkit::vhost_user {

// Writes all of data to fd. Gives up (with a reason) when cancel_fd (-1: none) becomes
// readable, when `timeout` passes without progress (negative: never), or on an error; a
// reader that went away is EPIPE, never SIGPIPE. Leaves fd open.
[[nodiscard]] Result<void, std::string> write_state(int fd, std::span<const std::uint8_t> data,
                                                    int cancel_fd,
                                                    std::chrono::milliseconds timeout);

// Reads fd to its end of file, at most `limit` bytes. Gives up as write_state() does.
[[nodiscard]] Result<std::vector<std::uint8_t>, std::string> read_state(
    int fd, std::size_t limit, int cancel_fd, std::chrono::milliseconds timeout);

}  // namespace vhostkit::vhost_user
