// Parsing of user-typed scalars: integers, sizes ("64M"), durations ("30s"), booleans.
// Every function returns std::nullopt on malformed input; callers build the error naming the flag or field.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dtrain::parse {

std::optional<int64_t> toInt(std::string_view s);
std::optional<double> toDouble(std::string_view s);
// "1024", "1K"/"1KB"/"1KiB" (1024), "64M", "2G"; binary multiples, as nccl-tests does.
std::optional<uint64_t> toBytes(std::string_view s);
// "30" (seconds), "30s", "500ms", "2m", "1h", "1.5s".
std::optional<std::chrono::milliseconds> toDuration(std::string_view s);
std::optional<bool> toBool(std::string_view s);
std::vector<std::string> split(std::string_view s, char sep);
std::string_view trim(std::string_view s);
// "1.5 KiB", "64 MiB": for tables and messages.
std::string formatBytes(uint64_t bytes);

}  // namespace dtrain::parse
