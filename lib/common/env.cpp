#include "lib/common/env.h"

#include <cstdlib>

#include "lib/common/error.h"
#include "lib/common/parse.h"

namespace dtrain::env {

std::optional<std::string> get(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return std::nullopt;
  return std::string(v);
}

std::string getOr(const char* name, const std::string& fallback) {
  auto v = get(name);
  return v ? *v : fallback;
}

int64_t getInt(const char* name, int64_t fallback) {
  auto v = get(name);
  if (!v || v->empty()) return fallback;
  auto parsed = parse::toInt(*v);
  DTRAIN_CHECK_AS(UsageError, parsed.has_value(), "environment variable {}={}: expected an integer", name, *v);
  return *parsed;
}

std::chrono::milliseconds getDuration(const char* name, std::chrono::milliseconds fallback) {
  auto v = get(name);
  if (!v || v->empty()) return fallback;
  return parse::durationOrThrow(*v, fmt::format("environment variable {}={}", name, *v));
}

uint64_t getBytes(const char* name, uint64_t fallback) {
  auto v = get(name);
  if (!v || v->empty()) return fallback;
  return parse::bytesOrThrow(*v, fmt::format("environment variable {}={}", name, *v));
}

bool getBool(const char* name, bool fallback) {
  auto v = get(name);
  if (!v || v->empty()) return fallback;
  auto parsed = parse::toBool(*v);
  DTRAIN_CHECK_AS(UsageError, parsed.has_value(), "environment variable {}={}: expected 0/1/true/false", name,
                  *v);
  return *parsed;
}

}  // namespace dtrain::env
