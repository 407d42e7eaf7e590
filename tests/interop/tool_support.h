// What the interop tools (front-ends and back-ends that the Python tests start as
// processes) share: their log lines on stderr, and a front-end's connection to a
// back-end that may still be starting.
#pragma once

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <string_view>
#include <thread>

#include "vhostkit/frontend/frontend_client.h"
#include "vhostkit/log.h"

namespace vhostkit::tools {

// Log lines from `level` up go to stderr as "<level>: <line>".
inline void log_to_stderr(LogLevel level) {
  set_log_sink(
      [](LogLevel l, std::string_view line) {
        std::fprintf(stderr, "%s: %.*s\n", to_string(l), static_cast<int>(line.size()),
                     line.data());
      },
      level);
}

// Connects to the back-end listening on `path`, trying every 100 ms for 10 s while it
// starts; null if it never answered.
inline std::unique_ptr<frontend::FrontendClient> connect_when_up(const std::string& path) {
  for (int attempt = 0; attempt < 100; ++attempt) {
    if (auto c = frontend::FrontendClient::connect(path)) return std::move(*c);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return nullptr;
}

}  // namespace vhostkit::tools
