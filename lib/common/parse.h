// Parsing of user-typed scalars: integers, sizes ("64M"), durations ("30s"), booleans.
// The to* functions return std::nullopt on malformed input; callers build the error naming the flag or field
// (or use the *OrThrow / *Flag helpers below, which do so in dtrain's one wording).
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

// Durations and sizes typed on the command line or in the environment are read here and only here (the job
// file's durations go through JsonFields::duration, which uses toDuration too), so every such error ends with
// the same phrase. CLI11's own unit transformers are not used: they would be a second parser (the job file
// cannot use them) and would word the error as CLI11 does.
inline constexpr std::string_view kDurationExpected = "a duration such as 30, 30s, 500ms or 2m";
inline constexpr std::string_view kBytesExpected = "a size such as 65536, 64K or 1G";

// Parses `value`, or throws UsageError "<what>: expected <kDurationExpected>", where `what` names the flag or
// variable and the value as typed ("--timeout 5x", "environment variable DTRAIN_COMM_TIMEOUT=5x").
// `positive`: zero is an error too.
std::chrono::milliseconds durationOrThrow(std::string_view value, std::string_view what, bool positive = false);
uint64_t bytesOrThrow(std::string_view value, std::string_view what, bool positive = false);
// The same for a command-line flag: `what` is "<flag> <value>".
std::chrono::milliseconds durationFlag(std::string_view flag, std::string_view value, bool positive = false);
uint64_t bytesFlag(std::string_view flag, std::string_view value, bool positive = false);

}  // namespace dtrain::parse
