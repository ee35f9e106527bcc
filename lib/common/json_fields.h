// JsonFields: reads one JSON object of a config file (the job file's sections, a model file, a dataset spec)
// with errors that name the file, the JSON pointer of the offending value and what was expected, e.g.
//   job.json: /optimizer/type: unknown optimizer 'sgdd' (expected sgd, adam, adamw, adagrad)
//   job.json: /model/layers/0: missing required field 'out' (an integer >= 1)
//   job.json: /optimizer/lr: expected a number > 0, got "0.1"
//   job.json: /data/train/samples: 0 (expected an integer >= 1)
// Every error is a dtrain::ConfigError (exit code 2). Unknown fields are errors too (allowOnly), so a typo
// such as "momentun" is reported instead of silently ignored.
//
// One set of rules for every reader:
//  - JSON pointers are escaped as RFC 6901 says ('~' -> "~0", '/' -> "~1"), so a printed path can be fed to any
//    JSON pointer tool;
//  - a field whose value is null counts as absent (its default applies; a required field is "missing"), so
//    `--set data.eval=null` or "limit": null in a file means "not given";
//  - values are quoted as written, shortened past 60 characters (jsonSnippet).
// Two wordings exist because the sections grew apart and users (and tests) rely on both texts; the information
// is the same, only the phrasing differs:
//   kNamed (model, loss, optimizer, schedule, the job's own sections):
//     "<object>: missing required field 'k' (<expected>)", "<field>: expected <expected>, got <value>",
//     "<field>: unknown field 'k' (expected a, b)", "<field>: unknown <what> 'v' (expected a, b)"
//   kTerse (dataset specs, lib/data):
//     "<field>: missing (expected <expected>)", "<field>: <value> (expected <expected>)",
//     "<field>: unknown key (expected one of: a, b)", "<field>: 'v' (expected one of: a, b)"
// New readers use kNamed.
//
// The object is borrowed, not copied: keep it alive while the JsonFields is in use. Not thread-safe (stateless
// apart from the borrowed reference; concurrent const use is fine).
#pragma once

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace dtrain {

// "<source>: <path>: <message>", or without the parts that are empty.
std::string configMessage(std::string_view source, std::string_view path, std::string_view message);
[[noreturn]] void throwConfig(std::string_view source, std::string_view path, std::string_view message);
// A JSON value as written in the file, shortened for messages: "0.1", "\"0.1\"", "[1,2]".
std::string jsonSnippet(const nlohmann::json& value);
// `path` + "/" + `key`, the key escaped per RFC 6901.
std::string jsonPointer(std::string_view path, std::string_view key);

// Config files (job, model) are small: anything bigger is not a config file (docs/job-file.md).
inline constexpr int64_t kMaxConfigFileBytes = int64_t{64} << 20;

// The text of a config file, read only when it is a regular file of at most maxBytes: a FIFO, a device such as
// /dev/zero or a directory is refused without blocking or reading (opened O_NONBLOCK, checked with fstat), and a
// file that grows past maxBytes while being read is refused too. `what` names it in errors ("job file").
// Throws ConfigError "<what> <path> does not exist or cannot be read" / "<path>: <what> is not a regular file
// (a fifo)" / "<path>: <what> is N bytes, more than the 64 MiB a config file may have".
std::string readConfigText(const std::filesystem::path& path, std::string_view what,
                           int64_t maxBytes = kMaxConfigFileBytes);

// Parses JSON text; nlohmann's parse errors and number overflow ("lr": 1e999) become ConfigError
// "<source>: <wording>: <nlohmann's message without its [json.exception...] tag>".
nlohmann::json parseConfigJson(const std::string& text, std::string_view source, std::string_view wording);

class JsonFields {
 public:
  enum class Wording { kNamed, kTerse };

  // Throws ConfigError unless value is an object. `what` describes it in that error: kNamed "the optimizer"
  // gives "expected the optimizer as a JSON object, got 5"; kTerse "an object with a \"format\"" gives
  // "5 (expected an object with a "format")".
  JsonFields(const nlohmann::json& value, std::string source, std::string path, std::string_view what = "",
             Wording wording = Wording::kNamed);

  const std::string& source() const noexcept { return source_; }
  const std::string& path() const noexcept { return path_; }
  Wording wording() const noexcept { return wording_; }
  std::string pathOf(std::string_view key) const { return jsonPointer(path_, key); }
  // Present and not null.
  bool has(std::string_view key) const;
  const nlohmann::json& at(std::string_view key) const;  // the field; missing -> ConfigError
  // A reader of the object at `key` (same source and wording); `what` as in the constructor.
  JsonFields object(std::string_view key, std::string_view what = "") const;

  [[noreturn]] void fail(std::string_view message) const;                       // at this object's path
  [[noreturn]] void failAt(std::string_view key, std::string_view message) const;  // at the field's path

  // Unknown keys -> an error naming the key and the expected ones, in the order given.
  void allowOnly(const std::vector<std::string_view>& keys) const;

  std::string string(std::string_view key) const;
  std::string string(std::string_view key, const std::string& fallback) const;
  // One of `allowed` (listed in the order given); `what` names the kind of value ("optimizer").
  std::string choice(std::string_view key, const std::vector<std::string_view>& allowed, std::string_view what) const;
  std::string choice(std::string_view key, const std::vector<std::string_view>& allowed, std::string_view what,
                     const std::string& fallback) const;

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
  // A number, or a non-empty array of numbers (required).
  std::vector<double> numbers(std::string_view key) const;
  // A duration: a number of seconds (300, 0.5) or a string parse::toDuration accepts ("5m", "500ms"); > 0.
  std::chrono::milliseconds duration(std::string_view key, std::chrono::milliseconds fallback) const;

 private:
  [[noreturn]] void missing(std::string_view key, std::string_view expected) const;
  [[noreturn]] void wrong(const std::string& fullPath, std::string_view expected, const nlohmann::json& v) const;
  int64_t toInteger(const std::string& fullPath, const nlohmann::json& v, std::string_view expected,
                    const std::function<bool(int64_t)>& valid) const;

  const nlohmann::json& value_;
  std::string source_;
  std::string path_;
  Wording wording_;
};

}  // namespace dtrain
