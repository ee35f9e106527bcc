#include "lib/common/json_fields.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cerrno>
#include <set>
#include <string>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lib/common/error.h"
#include "lib/common/parse.h"

namespace dtrain {

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

std::string jsonPointer(std::string_view path, std::string_view key) {
  std::string out = std::string(path) + "/";
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

namespace {

const char* fileKind(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a fifo";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a plain file";
}

}  // namespace

std::string readConfigText(const std::filesystem::path& path, std::string_view what, int64_t maxBytes) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer before fstat could refuse it.
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) throw ConfigError(fmt::format("{} {} does not exist or cannot be read", what, path.string()));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw ConfigError(fmt::format("{} {} does not exist or cannot be read", what, path.string()));
  if (!S_ISREG(st.st_mode)) {
    throw ConfigError(fmt::format("{}: {} is not a regular file ({})", path.string(), what, fileKind(st.st_mode)));
  }
  auto tooBig = [&](int64_t size) {
    return ConfigError(fmt::format("{}: {} is {} bytes, more than the {} MiB a config file may have", path.string(),
                                   what, size, maxBytes >> 20));
  };
  if (st.st_size > maxBytes) throw tooBig(st.st_size);
  std::string text;
  text.reserve(static_cast<size_t>(st.st_size));
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw ConfigError(fmt::format("{} {} does not exist or cannot be read", what, path.string()));
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
    if (static_cast<int64_t>(text.size()) > maxBytes) throw tooBig(static_cast<int64_t>(text.size()));
  }
  return text;
}

namespace {

// Watches nlohmann's parse events for a key given twice in one object (JSON keeps one of them silently: a job
// with "lr" twice would train with whichever the parser kept). Keeps, per open object or array, the keys seen or
// the index of the element being parsed, which is also the JSON pointer of an offending key.
class DuplicateKeys {
 public:
  explicit DuplicateKeys(std::string_view source) : source_(source) {}

  bool operator()(int, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using Event = nlohmann::json::parse_event_t;
    switch (event) {
      case Event::object_start: frames_.push_back({false, {}, {}, 0}); break;
      case Event::array_start: frames_.push_back({true, {}, {}, 0}); break;
      case Event::key: {
        auto& top = frames_.back();
        top.key = parsed.get<std::string>();
        if (!top.keys.insert(top.key).second)
          throw ConfigError(fmt::format("{}: {}: the key \"{}\" is given twice in the same object (JSON keeps only "
                                        "one; which is meant?)",
                                        source_, pointer(), top.key));
        break;
      }
      case Event::object_end:
      case Event::array_end:
        frames_.pop_back();
        elementDone();
        break;
      case Event::value: elementDone(); break;
    }
    return true;
  }

 private:
  struct Frame {
    bool array;
    std::set<std::string> keys;
    std::string key;  // objects: the key being parsed
    size_t index;     // arrays: the element being parsed
  };

  void elementDone() {
    if (!frames_.empty() && frames_.back().array) ++frames_.back().index;
  }

  std::string pointer() const {
    std::string path;
    for (const auto& f : frames_) path = f.array ? fmt::format("{}/{}", path, f.index) : jsonPointer(path, f.key);
    return path;
  }

  std::string source_;
  std::vector<Frame> frames_;
};

}  // namespace

nlohmann::json parseConfigJson(const std::string& text, std::string_view source, std::string_view wording) {
  try {
    return nlohmann::json::parse(text, DuplicateKeys(source));
  } catch (const nlohmann::json::parse_error& e) {
    // Kept as it was (users and tests know this text, tag included).
    throw ConfigError(fmt::format("{}: {}: {}", source, wording, e.what()));
  } catch (const nlohmann::json::exception& e) {
    // Number overflow (out_of_range.406) and the like: drop the "[json.exception.out_of_range.406] " tag.
    std::string_view msg = e.what();
    if (auto close = msg.find("] "); !msg.empty() && msg.front() == '[' && close != std::string_view::npos)
      msg.remove_prefix(close + 2);
    throw ConfigError(fmt::format("{}: {}: {}", source, wording, msg));
  }
}

JsonFields::JsonFields(const nlohmann::json& value, std::string source, std::string path, std::string_view what,
                       Wording wording)
    : value_(value), source_(std::move(source)), path_(std::move(path)), wording_(wording) {
  if (value_.is_object()) return;
  if (wording_ == Wording::kTerse)
    fail(fmt::format("{} (expected {})", jsonSnippet(value_), what.empty() ? "an object" : what));
  fail(fmt::format("expected {}a JSON object, got {}", what.empty() ? "" : fmt::format("{} as ", what),
                   jsonSnippet(value_)));
}

bool JsonFields::has(std::string_view key) const {
  auto it = value_.find(key);
  return it != value_.end() && !it->is_null();
}

const nlohmann::json& JsonFields::at(std::string_view key) const {
  if (!has(key)) {
    if (wording_ == Wording::kTerse) failAt(key, "missing");
    fail(fmt::format("missing required field '{}'", key));
  }
  return *value_.find(key);
}

JsonFields JsonFields::object(std::string_view key, std::string_view what) const {
  return JsonFields(at(key), source_, pathOf(key), what, wording_);
}

void JsonFields::fail(std::string_view message) const { throwConfig(source_, path_, message); }

void JsonFields::failAt(std::string_view key, std::string_view message) const {
  throwConfig(source_, pathOf(key), message);
}

void JsonFields::missing(std::string_view key, std::string_view expected) const {
  if (wording_ == Wording::kTerse) failAt(key, fmt::format("missing (expected {})", expected));
  fail(fmt::format("missing required field '{}' ({})", key, expected));
}

void JsonFields::wrong(const std::string& fullPath, std::string_view expected, const nlohmann::json& v) const {
  if (wording_ == Wording::kTerse) throwConfig(source_, fullPath, fmt::format("{} (expected {})", jsonSnippet(v), expected));
  throwConfig(source_, fullPath, fmt::format("expected {}, got {}", expected, jsonSnippet(v)));
}

void JsonFields::allowOnly(const std::vector<std::string_view>& keys) const {
  for (const auto& item : value_.items()) {
    bool known = false;
    for (std::string_view k : keys) known = known || item.key() == k;
    if (known) continue;
    if (wording_ == Wording::kTerse)
      failAt(item.key(), fmt::format("unknown key (expected one of: {})", fmt::join(keys, ", ")));
    failAt(item.key(), fmt::format("unknown field '{}' (expected {})", item.key(), fmt::join(keys, ", ")));
  }
}

std::string JsonFields::string(std::string_view key) const {
  if (!has(key)) missing(key, "a string");
  const auto& v = *value_.find(key);
  if (!v.is_string()) wrong(pathOf(key), "a string", v);
  return v.get<std::string>();
}

std::string JsonFields::string(std::string_view key, const std::string& fallback) const {
  return has(key) ? string(key) : fallback;
}

std::string JsonFields::choice(std::string_view key, const std::vector<std::string_view>& allowed,
                               std::string_view what) const {
  const bool terse = wording_ == Wording::kTerse;
  if (!has(key)) missing(key, fmt::format("one of{} {}", terse ? ":" : "", fmt::join(allowed, ", ")));
  const auto& v = *value_.find(key);
  if (!v.is_string()) wrong(pathOf(key), terse ? "a string" : fmt::format("a string (one of {})", fmt::join(allowed, ", ")), v);
  std::string s = v.get<std::string>();
  for (std::string_view a : allowed) {
    if (s == a) return s;
  }
  if (terse) failAt(key, fmt::format("'{}' (expected one of: {})", s, fmt::join(allowed, ", ")));
  failAt(key, fmt::format("unknown {} '{}' (expected {})", what, s, fmt::join(allowed, ", ")));
}

std::string JsonFields::choice(std::string_view key, const std::vector<std::string_view>& allowed,
                               std::string_view what, const std::string& fallback) const {
  return has(key) ? choice(key, allowed, what) : fallback;
}

int64_t JsonFields::toInteger(const std::string& fullPath, const nlohmann::json& v, std::string_view expected,
                              const std::function<bool(int64_t)>& valid) const {
  bool ok = v.is_number_integer() &&
            !(v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX));
  if (!ok || !valid(v.get<int64_t>())) wrong(fullPath, expected, v);
  return v.get<int64_t>();
}

int64_t JsonFields::integer(std::string_view key, std::string_view expected,
                            const std::function<bool(int64_t)>& valid) const {
  if (!has(key)) missing(key, expected);
  return toInteger(pathOf(key), *value_.find(key), expected, valid);
}

int64_t JsonFields::integer(std::string_view key, int64_t fallback, std::string_view expected,
                            const std::function<bool(int64_t)>& valid) const {
  return has(key) ? integer(key, expected, valid) : fallback;
}

double JsonFields::number(std::string_view key, std::string_view expected,
                          const std::function<bool(double)>& valid) const {
  if (!has(key)) missing(key, expected);
  const auto& v = *value_.find(key);
  if (!v.is_number() || !valid(v.get<double>())) wrong(pathOf(key), expected, v);
  return v.get<double>();
}

double JsonFields::number(std::string_view key, double fallback, std::string_view expected,
                          const std::function<bool(double)>& valid) const {
  return has(key) ? number(key, expected, valid) : fallback;
}

bool JsonFields::boolean(std::string_view key, bool fallback) const {
  if (!has(key)) return fallback;
  const auto& v = *value_.find(key);
  if (!v.is_boolean()) wrong(pathOf(key), "true or false", v);
  return v.get<bool>();
}

std::vector<int64_t> JsonFields::integers(std::string_view key, size_t count, const std::vector<int64_t>& fallback,
                                          std::string_view expected,
                                          const std::function<bool(int64_t)>& valid) const {
  if (!has(key)) {
    if (!fallback.empty()) return fallback;
    missing(key, fmt::format("{}, or a list of {}", expected, count));
  }
  const auto& v = *value_.find(key);
  const auto listExpected = fmt::format("{} or a list of {} such values", expected, count);
  if (v.is_array()) {
    if (v.size() != count) wrong(pathOf(key), listExpected, v);
    std::vector<int64_t> out;
    for (size_t i = 0; i < count; ++i) out.push_back(toInteger(jsonPointer(pathOf(key), std::to_string(i)), v[i], expected, valid));
    return out;
  }
  if (!v.is_number_integer()) wrong(pathOf(key), listExpected, v);
  return std::vector<int64_t>(count, toInteger(pathOf(key), v, expected, valid));
}

std::vector<double> JsonFields::numbers(std::string_view key) const {
  constexpr std::string_view kExpected = "a number or an array of numbers";
  if (!has(key)) missing(key, kExpected);
  const auto& v = *value_.find(key);
  std::vector<double> out;
  if (v.is_number()) {
    out.push_back(v.get<double>());
  } else if (v.is_array() && !v.empty()) {
    for (const auto& x : v) {
      if (!x.is_number()) wrong(pathOf(key), kExpected, v);
      out.push_back(x.get<double>());
    }
  } else {
    wrong(pathOf(key), kExpected, v);
  }
  return out;
}

std::chrono::milliseconds JsonFields::duration(std::string_view key, std::chrono::milliseconds fallback) const {
  if (!has(key)) return fallback;
  const auto& v = *value_.find(key);
  std::optional<std::chrono::milliseconds> d;
  if (v.is_number() && v.get<double>() > 0) d = std::chrono::milliseconds(static_cast<int64_t>(v.get<double>() * 1000));
  else if (v.is_string()) d = parse::toDuration(v.get<std::string>());
  if (!d || d->count() <= 0) failAt(key, "expected a duration: seconds (300) or a string such as \"5m\"");
  return *d;
}

}  // namespace dtrain
