// vhostkit/vhost_user/socket.h: whole vhost-user messages on a Unix stream socket.
//
// Concepts
//   Framing   a message is read header first (12 bytes), then exactly `size` payload
//             bytes. A size above kMaxPayload is refused before anything is allocated.
//   Fds       file descriptors travel as SCM_RIGHTS ancillary data attached to the first
//             byte of the header (the specification: "the back-end can expect that file
//             descriptors will only be received in the first recvmsg operation for a
//             message header"). At most kMaxFds per message. Received fds are
//             close-on-exec and owned by the Message from the moment they arrive, so
//             every error path closes them: more fds than fit (the kernel truncated the
//             control data), fds arriving with payload bytes, EOF inside the message.
//   Blocking  the socket must be blocking; EINTR is retried, short reads and writes are
//             continued. Writes use MSG_NOSIGNAL: a closed peer is an error, not SIGPIPE.
//
// After an error whose recoverable() is false the stream position is lost: close the
// connection. After a recoverable one (too_many_fds, misplaced_fds) the whole message was
// consumed and the next read starts at the next header.
#pragma once

#include "vhostkit/vhost_user/message.h"

namespace vhostkit::vhost_user {

// Reads one whole message from the blocking stream socket `fd`. Error closed when the
// peer closed the connection before the first header byte, truncated when it closed
// inside a message. Validation is the caller's next step (validate_*()).
[[nodiscard]] Result<Message, CodecError> read_message(int fd, Channel c = Channel::main);

// Writes m (header, payload, its fds as SCM_RIGHTS with the header). The fds stay owned
// by m. Error too_many_fds for more than kMaxFds fds and too_large for a payload above
// kMaxPayload, both before anything is sent; io_error (EBADF) for an invalid fd in m.
[[nodiscard]] Result<void, CodecError> write_message(int fd, const Message& m,
                                                     Channel c = Channel::main);

// As write_message(), but when the socket cannot take the message's first byte now,
// returns io_error with EAGAIN and has sent nothing. Once the first part is sent the rest
// is sent blocking, so the stream never holds half a message. For a data-path thread that
// must not block on a peer that may be waiting for it (IOTLB misses on the back-end
// channel).
[[nodiscard]] Result<void, CodecError> try_write_message(int fd, const Message& m,
                                                         Channel c = Channel::main);

}  // namespace vhostkit::vhost_user
