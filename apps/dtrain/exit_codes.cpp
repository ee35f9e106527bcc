// The "Exit codes" section of each command's --help: the meanings are README.md's table (one copy, here), and
// each command lists the codes it can return.
#include <fmt/format.h>

#include <map>
#include <stdexcept>

#include "apps/dtrain/commands.h"

namespace dtrain::app {

namespace {

// README.md, "Exit codes" (tests/integration/test_exit_codes.cpp checks that every code here is a row there),
// plus `dtrain top`'s 10.
const std::map<std::string, std::string, std::less<>>& meanings() {
  static const std::map<std::string, std::string, std::less<>> m = {
      {"0", "success"},
      {"1", "internal error in dtrain"},
      {"2", "invalid job or model file, missing dataset, bad --set"},
      {"3", "invalid command line: unknown flag, bad value, contradicting flags"},
      {"4", "rendezvous failed: store unreachable, timeout, wrong or missing --rdzv-token"},
      {"5", "cannot listen: port in use or address not local"},
      {"6", "the store at the endpoint speaks another protocol or version"},
      {"7", "a collective failed (peer lost, timeout)"},
      {"8", "checkpoint error"},
      {"9", "training diverged: a non-finite loss, gradient or weights"},
      {"10", "the job is not running: it ended, or its store or agents do not answer"},
      {"126 / 127", "the worker program is not executable / not found"},
      {"128+N", "killed (or stopped) by signal N"},
      {"other", "the failing worker's own exit code"},
  };
  return m;
}

}  // namespace

std::string exitCodesHelp(const std::vector<ExitCodeHelp>& codes) {
  std::string out = "Exit codes (README.md, \"Exit codes\"):";
  for (const auto& c : codes) {
    const auto it = meanings().find(c.code);
    if (it == meanings().end()) throw std::logic_error("exitCodesHelp: no meaning for exit code " + c.code);
    out += fmt::format("\n  {:<10}{}", c.code, c.meaning.empty() ? it->second : c.meaning);
  }
  return out + "\n";  // CLI11 ends the help with the footer as it is
}

}  // namespace dtrain::app
