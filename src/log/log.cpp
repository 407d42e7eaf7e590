// The logging hook: the sink the application installed, or stderr.
#include "vhostkit/log.h"

#include <atomic>
#include <cstdio>
#include <mutex>

namespace vhostkit {

namespace {
std::mutex g_mu;  // guards g_sink
LogSink g_sink;
std::atomic<int> g_min{static_cast<int>(LogLevel::warn)};
}  // namespace

const char* to_string(LogLevel level) {
  switch (level) {
    case LogLevel::debug: return "debug";
    case LogLevel::info: return "info";
    case LogLevel::warn: return "warn";
    case LogLevel::error: return "error";
  }
  return "?";
}

void set_log_sink(LogSink sink, LogLevel min_level) {
  std::lock_guard lock(g_mu);
  g_sink = std::move(sink);
  g_min.store(static_cast<int>(g_sink ? min_level : LogLevel::warn), std::memory_order_relaxed);
}

bool log_enabled(LogLevel level) {
  return static_cast<int>(level) >= g_min.load(std::memory_order_relaxed);
}

void log_line(LogLevel level, std::string_view line) {
  std::lock_guard lock(g_mu);
  if (g_sink) {
    g_sink(level, line);
    return;
  }
  std::fprintf(stderr, "vhostkit %s: %.*s\n", to_string(level), static_cast<int>(line.size()),
               line.data());
}

}  // namespace vhostkit
