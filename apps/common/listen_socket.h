// apps/common/listen_socket.h: the listening socket a daemon is handed with --fd.
//
// Concepts
//   --fd N          QEMU's back-end program convention: serve the already listening
//                   Unix stream socket N, inherited from whoever started the daemon.
//   Socket          systemd passes the sockets of a .socket unit as fds 3, 4, ... and says
//   activation      so in LISTEN_FDS (how many) and LISTEN_PID (for which process); the
//                   vhostkit units start the daemons with --fd 3 (sd_listen_fds(3)
//                   convention). When LISTEN_PID names this process, N must be one of the
//                   passed fds and exactly one socket must have been passed; when it names
//                   another process the variables were inherited by mistake and only N is
//                   checked. Either way the variables are removed from the environment so
//                   nothing started later sees them.
//   Checks          N must be an open, listening AF_UNIX SOCK_STREAM socket; any other fd
//                   is refused with a message that says what it is instead.
#pragma once

#include <string>

#include "vhostkit/types.h"
#include "vhostkit/unique_fd.h"

namespace vhostkit::daemon {

// The first fd systemd passes (SD_LISTEN_FDS_START).
inline constexpr int kFirstActivatedFd = 3;

// Takes ownership of the listening socket fd (see the concepts above) and marks it
// close-on-exec. first_activated_fd is kFirstActivatedFd except in tests. Errors are one
// line, naming --fd and the fd.
[[nodiscard]] Result<UniqueFd, std::string> adopt_listen_fd(
    int fd, int first_activated_fd = kFirstActivatedFd);

}  // namespace vhostkit::daemon
