#include "lib/nn/json_fields.h"

#include <fmt/format.h>

#include "lib/common/error.h"

namespace dtrain::nn {

std::string configMessage(std::string_view source, std::string_view path, std::string_view message) {
  std::string out;
  if (!source.empty()) out += fmt::format("{}: ", source);
  if (!path.empty()) out += fmt::format("{}: ", path);
  out += message;
  return out;
}

void throwConfig(std::string_view source, std::string_view path, std::string_view message) {
  throw ConfigError(configMessage(source, path, message));
}

std::string jsonSnippet(const nlohmann::json& value) {
  constexpr size_t kMax = 60;
  std::string s = value.dump();
  if (s.size() > kMax) s = s.substr(0, kMax - 3) + "...";
  return s;
}

JsonFields::JsonFields(const nlohmann::json& value, std::string source, std::string path, std::string_view what)
    : value_(value), source_(std::move(source)), path_(std::move(path)) {
  if (!value_.is_object()) {
    fail(fmt::format("expected {}a JSON object, got {}", what.empty() ? "" : fmt::format("{} as ", what),
                     jsonSnippet(value_)));
  }
}

std::string JsonFields::pathOf(std::string_view key) const {
  // JSON pointer escaping (RFC 6901), so the printed path can be fed to any JSON pointer tool.
  std::string out = path_ + "/";
  for (char c : key) {
    if (c == '~') {
      out += "~0";
    } else if (c == '/') {
      out += "~1";
    } else {
      out += c;
    }
  }
  return out;
}

bool JsonFields::has(std::string_view key) const { return value_.contains(key); }

const nlohmann::json& JsonFields::at(std::string_view key) const {
  auto it = value_.find(key);
  if (it == value_.end()) fail(fmt::format("missing required field '{}'", key));
  return *it;
}

void JsonFields::fail(std::string_view message) const { throwConfig(source_, path_, message); }

void JsonFields::failAt(std::string_view key, std::string_view message) const {
  throwConfig(source_, pathOf(key), message);
}

void JsonFields::allowOnly(std::initializer_list<std::string_view> keys) const {
  for (const auto& item : value_.items()) {
    bool known = false;
    for (std::string_view k : keys) known = known || item.key() == k;
    if (!known) failAt(item.key(), fmt::format("unknown field '{}' (expected {})", item.key(), fmt::join(keys, ", ")));
  }
}

std::string JsonFields::string(std::string_view key) const {
  auto it = value_.find(key);
  if (it == value_.end()) fail(fmt::format("missing required field '{}' (a string)", key));
  if (!it->is_string()) failAt(key, fmt::format("expected a string, got {}", jsonSnippet(*it)));
  return it->get<std::string>();
}

std::string JsonFields::string(std::string_view key, const std::string& fallback) const {
  if (!has(key)) return fallback;
  return string(key);
}

std::string JsonFields::choice(std::string_view key, const std::vector<std::string_view>& allowed,
                               std::string_view what) const {
  auto it = value_.find(key);
  if (it == value_.end()) {
    fail(fmt::format("missing required field '{}' (one of {})", key, fmt::join(allowed, ", ")));
  }
  if (!it->is_string()) {
    failAt(key, fmt::format("expected a string (one of {}), got {}", fmt::join(allowed, ", "), jsonSnippet(*it)));
  }
  std::string v = it->get<std::string>();
  for (std::string_view a : allowed) {
    if (v == a) return v;
  }
  failAt(key, fmt::format("unknown {} '{}' (expected {})", what, v, fmt::join(allowed, ", ")));
}

int64_t JsonFields::toInteger(const std::string& fullPath, const nlohmann::json& v, std::string_view expected,
                              const std::function<bool(int64_t)>& valid) const {
  bool ok = v.is_number_integer() &&
            !(v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX));
  if (!ok || !valid(v.get<int64_t>())) {
    throwConfig(source_, fullPath, fmt::format("expected {}, got {}", expected, jsonSnippet(v)));
  }
  return v.get<int64_t>();
}

int64_t JsonFields::integer(std::string_view key, std::string_view expected,
                            const std::function<bool(int64_t)>& valid) const {
  auto it = value_.find(key);
  if (it == value_.end()) fail(fmt::format("missing required field '{}' ({})", key, expected));
  return toInteger(pathOf(key), *it, expected, valid);
}

int64_t JsonFields::integer(std::string_view key, int64_t fallback, std::string_view expected,
                            const std::function<bool(int64_t)>& valid) const {
  if (!has(key)) return fallback;
  return integer(key, expected, valid);
}

double JsonFields::number(std::string_view key, std::string_view expected,
                          const std::function<bool(double)>& valid) const {
  auto it = value_.find(key);
  if (it == value_.end()) fail(fmt::format("missing required field '{}' ({})", key, expected));
  if (!it->is_number()) failAt(key, fmt::format("expected {}, got {}", expected, jsonSnippet(*it)));
  double d = it->get<double>();
  if (!valid(d)) failAt(key, fmt::format("expected {}, got {}", expected, jsonSnippet(*it)));
  return d;
}

double JsonFields::number(std::string_view key, double fallback, std::string_view expected,
                          const std::function<bool(double)>& valid) const {
  if (!has(key)) return fallback;
  return number(key, expected, valid);
}

bool JsonFields::boolean(std::string_view key, bool fallback) const {
  auto it = value_.find(key);
  if (it == value_.end()) return fallback;
  if (!it->is_boolean()) failAt(key, fmt::format("expected true or false, got {}", jsonSnippet(*it)));
  return it->get<bool>();
}

std::vector<int64_t> JsonFields::integers(std::string_view key, size_t count, const std::vector<int64_t>& fallback,
                                          std::string_view expected,
                                          const std::function<bool(int64_t)>& valid) const {
  auto it = value_.find(key);
  if (it == value_.end()) {
    if (!fallback.empty()) return fallback;
    fail(fmt::format("missing required field '{}' ({}, or a list of {})", key, expected, count));
  }
  if (it->is_array()) {
    if (it->size() != count) {
      failAt(key, fmt::format("expected {} or a list of {} such values, got {}", expected, count, jsonSnippet(*it)));
    }
    std::vector<int64_t> out;
    for (size_t i = 0; i < count; ++i) {
      out.push_back(toInteger(fmt::format("{}/{}", pathOf(key), i), (*it)[i], expected, valid));
    }
    return out;
  }
  if (!it->is_number_integer()) {
    failAt(key, fmt::format("expected {} or a list of {} such values, got {}", expected, count, jsonSnippet(*it)));
  }
  return std::vector<int64_t>(count, toInteger(pathOf(key), *it, expected, valid));
}

}  // namespace dtrain::nn
