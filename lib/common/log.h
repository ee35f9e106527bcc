// Logging through fmt, to stderr, one write(2) per line so lines from threads and processes never interleave.
//
// Level from DTRAIN_LOG_LEVEL (debug|info|warn|error, default info), read once. The tag (default "dtrain")
// names the process: the agent uses "dtrain", a worker "dtrain r<RANK>". Thread-safe.
#pragma once

#include <fmt/format.h>

#include <string>
#include <string_view>

namespace dtrain::log {

enum class Level { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

Level level();
void setLevel(Level level);
void setTag(std::string tag);
bool enabled(Level level);
void write(Level level, std::string_view message);

template <typename... Args>
void debug(fmt::format_string<Args...> f, Args&&... args) {
  if (enabled(Level::kDebug)) write(Level::kDebug, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void info(fmt::format_string<Args...> f, Args&&... args) {
  if (enabled(Level::kInfo)) write(Level::kInfo, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void warn(fmt::format_string<Args...> f, Args&&... args) {
  if (enabled(Level::kWarn)) write(Level::kWarn, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void error(fmt::format_string<Args...> f, Args&&... args) {
  if (enabled(Level::kError)) write(Level::kError, fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace dtrain::log
