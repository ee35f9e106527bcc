// `--set PATH=VALUE` overrides of a job file (applySet) and the naming of the overrides behind a ConfigError
// (setsBehindError, withSetsNamed): job.h. Split from job.cpp.
#include <fmt/ranges.h>

#include <algorithm>
#include <cctype>

#include "lib/common/error.h"
#include "lib/common/json_fields.h"
#include "lib/common/parse.h"
#include "lib/train/job.h"

namespace dtrain::train {

using json = nlohmann::json;

void applySet(json& doc, const std::string& assignment, const std::string& source) {
  auto eq = assignment.find('=');
  DTRAIN_CHECK_AS(ConfigError, eq != std::string::npos && eq > 0,
                  "--set {}: expected PATH=VALUE, e.g. --set train.epochs=1", assignment);
  std::string path = assignment.substr(0, eq);
  std::string text = assignment.substr(eq + 1);
  json value = json::parse(text, nullptr, false);
  if (value.is_discarded()) value = text;
  json* node = &doc;
  std::string walked;
  auto parts = parse::split(path, '.');
  for (size_t i = 0; i < parts.size(); ++i) {
    const std::string& part = parts[i];
    DTRAIN_CHECK_AS(ConfigError, !part.empty(), "--set {}: empty component in path '{}'", assignment, path);
    walked += "/" + part;
    bool last = i + 1 == parts.size();
    if (node->is_array()) {
      auto idx = parse::toInt(part);
      DTRAIN_CHECK_AS(ConfigError, idx && *idx >= 0 && static_cast<size_t>(*idx) < node->size(),
                      "--set {}: {}: {} is an array of {} element(s); expected an index 0..{}", assignment, walked,
                      walked.substr(0, walked.rfind('/')), node->size(), node->size() == 0 ? 0 : node->size() - 1);
      node = &(*node)[static_cast<size_t>(*idx)];
    } else {
      if (node->is_null()) *node = json::object();
      DTRAIN_CHECK_AS(ConfigError, node->is_object(), "--set {}: {} is {}, not an object with a field '{}' ({})",
                      assignment, walked.substr(0, walked.rfind('/')), jsonSnippet(*node), part, source);
      node = &(*node)[part];
    }
    if (last) *node = value;
  }
}

namespace {

// The JSON pointer of an error message "FILE: /a/b: ..." about the job file `src` ("" when it names none).
std::string pointerOfMessage(const std::string& message, const std::string& src) {
  const std::string prefix = src + ": /";
  if (message.compare(0, prefix.size(), prefix) != 0) return "";
  const size_t start = src.size() + 2;
  const size_t end = message.find(": ", start);
  return end == std::string::npos ? "" : message.substr(start, end - start);
}

bool isIdentChar(char c) { return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '_'; }

// `word` occurs in `text` as a whole word (not inside a longer identifier).
bool mentionsWord(std::string_view text, std::string_view word) {
  for (size_t at = text.find(word); at != std::string_view::npos; at = text.find(word, at + 1)) {
    const size_t end = at + word.size();
    if ((at == 0 || !isIdentChar(text[at - 1])) && (end == text.size() || !isIdentChar(text[end]))) return true;
  }
  return false;
}

}  // namespace

std::string setsBehindError(const std::string& message, const std::string& source,
                            const std::vector<std::string>& sets) {
  auto within = [](const std::string& inner, const std::string& outer) {
    return inner == outer || (inner.size() > outer.size() && inner.compare(0, outer.size(), outer) == 0 &&
                              inner[outer.size()] == '/');
  };
  const std::string pointer = pointerOfMessage(message, source);
  auto section = [](const std::string& p) { return p.substr(0, p.find('/', 1)); };  // "/parallel"
  auto mentionsPointer = [](const std::string& text, const std::string& p) {
    for (size_t at = text.find(p); at != std::string::npos; at = text.find(p, at + 1))
      if (at + p.size() == text.size() || !isIdentChar(text[at + p.size()])) return true;
    return false;
  };
  // The text after "FILE: /pointer: ": what the message says about other fields ("(strategy is \"ddp\")").
  const std::string text = message.substr(std::min(message.size(), source.size() + pointer.size()));
  std::vector<std::string> from, with;
  for (const auto& s : sets) {
    const size_t eq = s.find('=');
    if (eq == std::string::npos || eq == 0) continue;
    std::string setPointer = "/" + s.substr(0, eq);
    std::replace(setPointer.begin(), setPointer.end(), '.', '/');
    const std::string leaf = setPointer.substr(setPointer.rfind('/') + 1);
    if (!pointer.empty() && (within(setPointer, pointer) || within(pointer, setPointer)))
      from.push_back("--set " + s);
    else if (mentionsPointer(text, setPointer) || text.find("'" + leaf + "'") != std::string::npos ||
             (section(setPointer) == section(pointer) && !parse::toInt(leaf) && mentionsWord(text, leaf)))
      with.push_back("--set " + s);
  }
  std::string out;
  if (!from.empty()) out = fmt::format("from {}", fmt::join(from, ", "));
  if (!with.empty()) out += fmt::format("{}with {}", out.empty() ? "" : "; ", fmt::join(with, ", "));
  return out;
}

ConfigError withSetsNamed(const ConfigError& e, const std::string& source, const std::vector<std::string>& sets) {
  const std::string named = setsBehindError(e.what(), source, sets);
  if (named.empty()) return e;
  ConfigError out(fmt::format("{} ({})", e.what(), named), e.code());
  out.setWhere(e.where());
  return out;
}

}  // namespace dtrain::train
