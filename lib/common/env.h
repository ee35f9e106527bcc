// Environment variables, read with clear errors. Values are parsed where they are read; a malformed value is
// a UsageError naming the variable, the value and what was expected.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

namespace dtrain::env {

std::optional<std::string> get(const char* name);
std::string getOr(const char* name, const std::string& fallback);
int64_t getInt(const char* name, int64_t fallback);
// Accepts "30", "30s", "500ms", "2m" (seconds when no unit).
std::chrono::milliseconds getDuration(const char* name, std::chrono::milliseconds fallback);
// Accepts "65536", "64K", "1M", "1GiB" (binary multiples, parse::toBytes).
uint64_t getBytes(const char* name, uint64_t fallback);
bool getBool(const char* name, bool fallback);

}  // namespace dtrain::env
