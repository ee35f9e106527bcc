#include "lib/common/parse.h"

#include <fmt/format.h>

#include "lib/common/error.h"

#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdlib>

namespace dtrain::parse {

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

std::optional<int64_t> toInt(std::string_view s) {
  s = trim(s);
  if (!s.empty() && s.front() == '+') s.remove_prefix(1);
  int64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size() || s.empty()) return std::nullopt;
  return v;
}

std::optional<double> toDouble(std::string_view s) {
  s = trim(s);
  if (s.empty()) return std::nullopt;
  std::string copy(s);
  char* end = nullptr;
  double v = std::strtod(copy.c_str(), &end);
  if (end != copy.c_str() + copy.size() || !std::isfinite(v)) return std::nullopt;
  return v;
}

namespace {
// Splits "64M" into number "64" and lower-cased suffix "m".
std::pair<std::string_view, std::string> splitUnit(std::string_view s) {
  s = trim(s);
  size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  std::string unit;
  for (char c : trim(s.substr(i))) unit.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(c))));
  return {s.substr(0, i), unit};
}
}  // namespace

std::optional<uint64_t> toBytes(std::string_view s) {
  auto [num, unit] = splitUnit(s);
  auto n = toDouble(num);
  if (!n || *n < 0) return std::nullopt;
  double mult = 1;
  if (unit.empty() || unit == "b") mult = 1;
  else if (unit == "k" || unit == "kb" || unit == "kib") mult = 1024.0;
  else if (unit == "m" || unit == "mb" || unit == "mib") mult = 1024.0 * 1024;
  else if (unit == "g" || unit == "gb" || unit == "gib") mult = 1024.0 * 1024 * 1024;
  else return std::nullopt;
  return static_cast<uint64_t>(std::llround(*n * mult));
}

std::optional<std::chrono::milliseconds> toDuration(std::string_view s) {
  auto [num, unit] = splitUnit(s);
  auto n = toDouble(num);
  if (!n || *n < 0) return std::nullopt;
  double ms = 0;
  if (unit.empty() || unit == "s" || unit == "sec") ms = *n * 1000;
  else if (unit == "ms") ms = *n;
  else if (unit == "m" || unit == "min") ms = *n * 60'000;
  else if (unit == "h") ms = *n * 3'600'000;
  else return std::nullopt;
  return std::chrono::milliseconds(static_cast<int64_t>(std::llround(ms)));
}

std::optional<bool> toBool(std::string_view s) {
  s = trim(s);
  if (s == "1" || s == "true" || s == "yes" || s == "on" || s == "True") return true;
  if (s == "0" || s == "false" || s == "no" || s == "off" || s == "False") return false;
  return std::nullopt;
}

std::vector<std::string> split(std::string_view s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    size_t pos = s.find(sep, start);
    out.emplace_back(s.substr(start, pos == std::string_view::npos ? std::string_view::npos : pos - start));
    if (pos == std::string_view::npos) break;
    start = pos + 1;
  }
  return out;
}

std::string formatBytes(uint64_t bytes) {
  if (bytes >= (1ull << 30) && bytes % (1ull << 30) == 0) return fmt::format("{} GiB", bytes >> 30);
  if (bytes >= (1ull << 20) && bytes % (1ull << 20) == 0) return fmt::format("{} MiB", bytes >> 20);
  if (bytes >= (1ull << 10) && bytes % (1ull << 10) == 0) return fmt::format("{} KiB", bytes >> 10);
  if (bytes >= (1ull << 20)) return fmt::format("{:.1f} MiB", static_cast<double>(bytes) / (1 << 20));
  if (bytes >= (1ull << 10)) return fmt::format("{:.1f} KiB", static_cast<double>(bytes) / (1 << 10));
  return fmt::format("{} B", bytes);
}

std::chrono::milliseconds durationOrThrow(std::string_view value, std::string_view what, bool positive) {
  auto d = toDuration(value);
  DTRAIN_CHECK_AS(UsageError, d.has_value() && (!positive || d->count() > 0), "{}: expected {}{}", what,
                  positive ? "a positive " : "", positive ? kDurationExpected.substr(2) : kDurationExpected);
  return *d;
}

uint64_t bytesOrThrow(std::string_view value, std::string_view what, bool positive) {
  auto b = toBytes(value);
  DTRAIN_CHECK_AS(UsageError, b.has_value() && (!positive || *b > 0), "{}: expected {}{}", what,
                  positive ? "a positive " : "", positive ? kBytesExpected.substr(2) : kBytesExpected);
  return *b;
}

std::chrono::milliseconds durationFlag(std::string_view flag, std::string_view value, bool positive) {
  return durationOrThrow(value, fmt::format("{} {}", flag, value), positive);
}

uint64_t bytesFlag(std::string_view flag, std::string_view value, bool positive) {
  return bytesOrThrow(value, fmt::format("{} {}", flag, value), positive);
}

}  // namespace dtrain::parse
