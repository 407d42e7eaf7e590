// vhostkit/log.h: the library's logging hook.
//
// The library never writes to stderr itself: it formats a line and hands it to the sink
// the application installed (the daemons send it to stderr with a level prefix; tests
// may capture it). Every line the library emits names the device or socket it concerns.
// With no sink installed, lines at warn and above go to stderr.
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <utility>

#include <fmt/format.h>

#include "vhostkit/export.h"

namespace vhostkit {

enum class LogLevel { debug = 0, info = 1, warn = 2, error = 3 };

using LogSink = std::function<void(LogLevel, std::string_view)>;

// Installs the sink (nullptr restores the default) and the minimum level passed to it.
VHOSTKIT_API void set_log_sink(LogSink sink, LogLevel min_level = LogLevel::info);

[[nodiscard]] VHOSTKIT_API bool log_enabled(LogLevel level);
VHOSTKIT_API void log_line(LogLevel level, std::string_view line);

[[nodiscard]] VHOSTKIT_API const char* to_string(LogLevel level);

// Formats and emits a line if level is enabled.
template <typename... Args>
void log(LogLevel level, fmt::format_string<Args...> f, Args&&... args) {
  if (!log_enabled(level)) return;
  log_line(level, fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace vhostkit
