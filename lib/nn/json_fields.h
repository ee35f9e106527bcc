// JsonFields: reads one JSON object of a config file with errors that name the file, the JSON pointer of the
// offending value and what was expected, e.g.
//   job.json: /optimizer/type: unknown optimizer 'sgdd' (expected sgd, adam, adamw)
//   job.json: /model/layers/0: missing required field 'out' (an integer >= 1)
//   job.json: /optimizer/lr: expected a number > 0, got "0.1"
// Every error is a dtrain::ConfigError (exit code 2). Unknown fields are errors too (allowOnly), so a typo
// such as "momentun" is reported instead of silently ignored. The object is borrowed, not copied: keep it
// alive while the JsonFields is in use. Not thread-safe (stateless apart from the borrowed reference).
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

namespace dtrain::nn {

// "<source>: <path>: <message>", or "<path>: <message>" when source is empty.
std::string configMessage(std::string_view source, std::string_view path, std::string_view message);
[[noreturn]] void throwConfig(std::string_view source, std::string_view path, std::string_view message);
// A JSON value as written in the file, shortened for messages: "0.1", "\"0.1\"", "[1,2]".
std::string jsonSnippet(const nlohmann::json& value);

class JsonFields {
 public:
  // Throws ConfigError unless value is an object; `what` names it in that error ("the optimizer").
  JsonFields(const nlohmann::json& value, std::string source, std::string path, std::string_view what = "");

  const std::string& source() const noexcept { return source_; }
  const std::string& path() const noexcept { return path_; }
  std::string pathOf(std::string_view key) const;
  bool has(std::string_view key) const;
  const nlohmann::json& at(std::string_view key) const;  // the field; missing -> ConfigError

  [[noreturn]] void fail(std::string_view message) const;
  [[noreturn]] void failAt(std::string_view key, std::string_view message) const;

  // Unknown keys -> "unknown field 'x' (expected a, b, c)".
  void allowOnly(std::initializer_list<std::string_view> keys) const;

  std::string string(std::string_view key) const;
  std::string string(std::string_view key, const std::string& fallback) const;
  // One of `allowed`; otherwise "unknown <what> 'x' (expected a, b, c)".
  std::string choice(std::string_view key, const std::vector<std::string_view>& allowed,
                     std::string_view what) const;

  // `expected` describes the valid values for messages ("an integer >= 1"); `valid` checks the range.
  int64_t integer(std::string_view key, std::string_view expected,
                  const std::function<bool(int64_t)>& valid) const;
  int64_t integer(std::string_view key, int64_t fallback, std::string_view expected,
                  const std::function<bool(int64_t)>& valid) const;
  double number(std::string_view key, std::string_view expected, const std::function<bool(double)>& valid) const;
  double number(std::string_view key, double fallback, std::string_view expected,
                const std::function<bool(double)>& valid) const;
  bool boolean(std::string_view key, bool fallback) const;
  // An integer, or an array of `count` integers: kernel 3 or [3, 5].
  std::vector<int64_t> integers(std::string_view key, size_t count, const std::vector<int64_t>& fallback,
                                std::string_view expected, const std::function<bool(int64_t)>& valid) const;

 private:
  int64_t toInteger(const std::string& fullPath, const nlohmann::json& v, std::string_view expected,
                    const std::function<bool(int64_t)>& valid) const;

  const nlohmann::json& value_;
  std::string source_;
  std::string path_;
};

}  // namespace dtrain::nn
