// Shared helpers for launcher integration tests.
#pragma once

#include <fmt/format.h>

#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "tests/support/process.h"

namespace dtrain::testing {

inline std::string uniqueRunId(const std::string& tag) {
  std::random_device rd;
  return fmt::format("test-{}-{:x}", tag, rd());
}

// Lines of `text` that start with `prefix`.
inline std::vector<std::string> linesWith(const std::string& text, const std::string& needle) {
  std::vector<std::string> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line))
    if (line.find(needle) != std::string::npos) out.push_back(line);
  return out;
}

// Parses "[n<node> r<rank>] NAME=value" lines (from a worker running `env`) into rank -> {NAME -> value}.
inline std::map<int, std::map<std::string, std::string>> envByRank(const std::string& text) {
  std::map<int, std::map<std::string, std::string>> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    int node = -1, rank = -1;
    char rest[4096];
    if (std::sscanf(line.c_str(), "[n%d r%d] %4095[^\n]", &node, &rank, rest) != 3) continue;
    std::string kv(rest);
    auto eq = kv.find('=');
    if (eq == std::string::npos) continue;
    out[rank][kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  return out;
}

inline std::vector<std::string> runArgs(std::vector<std::string> args) {
  args.insert(args.begin(), {dtrainBinary(), "run"});
  return args;
}

}  // namespace dtrain::testing
