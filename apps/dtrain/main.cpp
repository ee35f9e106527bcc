// dtrain: launcher and runtime for distributed training. main() is thin: parse, run, map errors to exit codes.
#include <CLI/CLI.hpp>

#include <signal.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "apps/dtrain/commands.h"
#include "apps/dtrain/job_hooks.h"
#include "lib/common/config.h"
#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/launch/process_tree.h"

namespace {

int report(const dtrain::Error& e, const std::string& suffix = "") {
  std::fprintf(stderr, "dtrain: error: %s%s\n", e.what(), suffix.c_str());
  if (dtrain::log::enabled(dtrain::log::Level::kDebug) && !e.where().empty())
    std::fprintf(stderr, "dtrain: (raised at %s)\n", e.where().c_str());
  return e.exitCode();
}

// When a parse error names an option that is not on the command line but whose DTRAIN_* variable is set, the
// bad value came from the environment: " (the value came from the environment variable X)", else "".
std::string fromEnvironment(const CLI::App& root, const std::vector<std::string>& args, const std::string& message) {
  for (const CLI::App* sub : root.get_subcommands()) {
    for (const CLI::Option* opt : sub->get_options()) {
      const std::string env = opt->get_envname();
      if (env.empty() || std::getenv(env.c_str()) == nullptr) continue;
      bool named = false, given = false;
      for (const auto& name : opt->get_lnames()) {
        const std::string flag = "--" + name;
        for (auto at = message.find(flag); at != std::string::npos && !named; at = message.find(flag, at + 1)) {
          const char next = at + flag.size() < message.size() ? message[at + flag.size()] : ' ';
          named = !(std::isalnum(static_cast<unsigned char>(next)) || next == '-' || next == '_');
        }
        for (const auto& a : args) given = given || a == flag || a.rfind(flag + "=", 0) == 0;
      }
      for (const auto& name : opt->get_snames())
        for (const auto& a : args) given = given || a == "-" + name;
      if (named && !given) return fmt::format(" (the value came from the environment variable {})", env);
    }
  }
  return "";
}

// The command a parse error belongs to, as typed: "dtrain", "dtrain run", "dtrain ckpt list" (the subcommands CLI11
// parsed before it failed), so the error can point at that command's --help rather than the top level's.
std::string commandPath(const CLI::App& root) {
  std::string path = "dtrain";
  for (const CLI::App* app = &root;;) {
    const auto parsed = app->get_subcommands();
    if (parsed.empty()) return path;
    app = parsed.front();
    path += " " + app->get_name();
  }
}

// `dtrain tarin job.json`, `dtrain ckpt lst DIR`: CLI11 says "A subcommand is required", which hides the typo.
// Walks the words that name subcommands; the first one that names none (where one was expected) is returned with
// the command it followed and the names it could have been. Empty when every word named a subcommand.
struct UnknownCommand {
  std::string word, path, expected;
};
UnknownCommand unknownSubcommand(const CLI::App& root, const std::vector<std::string>& args) {
  const CLI::App* app = &root;
  std::string path = "dtrain";
  for (size_t i = 1; i < args.size(); ++i) {
    const auto subs = app->get_subcommands({});
    if (subs.empty() || args[i].empty() || args[i][0] == '-') break;
    const CLI::App* next = nullptr;
    for (const CLI::App* sub : subs)
      if (sub->check_name(args[i])) next = sub;
    if (next == nullptr) {
      std::string names;
      for (const CLI::App* sub : subs) names += (names.empty() ? "" : ", ") + sub->get_name();
      return {args[i], path, names};
    }
    app = next;
    path += " " + app->get_name();
  }
  return {};
}

// The first word of the command line that CLI11 set aside as no option of the command it was given to and that
// looks like a flag (`--bogus`, `--bogus=1`, `-x`; not a negative number), or "". CLI11 reports such a word only
// after the command's requirements: `dtrain check --bogus` said "job is required", `dtrain sim --node 2 job.json`
// "--nodes is required", hiding the unknown flag that caused them.
std::string unknownFlag(const CLI::App& root) {
  for (const std::string& word : root.remaining(true)) {
    if (word.size() < 2 || word[0] != '-' || word == "--") continue;
    if (std::isdigit(static_cast<unsigned char>(word[1])) || word[1] == '.') continue;  // -1, -.5: values
    return word;
  }
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  // The process watchdog of `dtrain run` (lib/launch/process_tree.h): hidden, and kept out of CLI11.
  if (argc > 1 && std::strcmp(argv[1], dtrain::launch::kWatchdogCommand) == 0)
    return dtrain::launch::watchdogMain(argc, argv);
  // `dtrain run` and `dtrain train` honour SIGINT and SIGTERM in every phase (the agent's rendezvous and rounds, the
  // trainer's checkpoint-and-stop), also when inherited ignored (a script's `dtrain run ... &` ignores SIGINT).
  // Their handlers come after the job was validated and its data read (seconds for a large text set), and a
  // signal that arrived meanwhile was dropped: the job then started and trained to its end. Until the handlers
  // exist, the default action ends the process (128+signal; nothing has started yet).
  if (argc > 1 && (std::strcmp(argv[1], "run") == 0 || std::strcmp(argv[1], "train") == 0))
    for (int sig : {SIGINT, SIGTERM}) {
      struct sigaction now {};
      if (::sigaction(sig, nullptr, &now) == 0 && now.sa_handler == SIG_IGN) ::signal(sig, SIG_DFL);
    }
  CLI::App root{"dtrain: launch and run distributed training (torchrun-compatible), one native binary", "dtrain"};
  root.set_version_flag("--version", std::string("dtrain ") + DTRAIN_VERSION +
                                         (DTRAIN_WITH_CUDA ? " (cuda)" : " (cpu)"));
  root.require_subcommand(1);
  root.footer("Each command's --help lists the exit codes it can return (README.md, \"Exit codes\").");
  dtrain::app::Action action;
  dtrain::app::addRunCommand(root, action);
  dtrain::app::addStoreCommand(root, action);
  dtrain::app::addTrainCommand(root, action);
  dtrain::app::addCheckCommand(root, action);
  dtrain::app::addBenchCommand(root, action);
  dtrain::app::addCkptCommand(root, action);
  dtrain::app::addDebugCommand(root, action);
  dtrain::app::addGenerateCommand(root, action);
  dtrain::app::addPlotCommand(root, action);
  dtrain::app::addTopCommand(root, action);
  dtrain::app::addSimCommand(root, action);
  std::vector<std::string> args(argv, argv + argc);
  dtrain::app::splitWorkerArgs(root, args);
  dtrain::app::splitSimArgs(args);
  std::vector<std::string> reversed(args.rbegin(), args.rend() - 1);  // CLI11 wants them reversed, no argv[0]
  try {
    root.parse(reversed);
  } catch (const CLI::Success& e) {
    return root.exit(e);
  } catch (const CLI::ParseError& e) {
    if (const auto unknown = unknownSubcommand(root, args); !unknown.word.empty()) {
      std::fprintf(stderr, "dtrain: error: %s: unknown command '%s'; expected one of %s (see %s --help)\n",
                   unknown.path.c_str(), unknown.word.c_str(), unknown.expected.c_str(), unknown.path.c_str());
      return static_cast<int>(dtrain::ExitCode::kUsage);
    }
    if (const std::string flag = unknownFlag(root); !flag.empty() && dynamic_cast<const CLI::ExtrasError*>(&e) == nullptr) {
      const std::string path = commandPath(root);
      std::fprintf(stderr, "dtrain: error: %s: unknown flag '%s' (see %s --help)\n", path.c_str(), flag.c_str(),
                   path.c_str());
      return static_cast<int>(dtrain::ExitCode::kUsage);
    }
    std::fprintf(stderr, "dtrain: error: %s%s (see %s --help)\n", dtrain::app::parseErrorText(e).c_str(),
                 fromEnvironment(root, args, e.what()).c_str(), commandPath(root).c_str());
    return static_cast<int>(dtrain::ExitCode::kUsage);
  } catch (const dtrain::Error& e) {
    return report(e);
  }
  try {
    return action ? action() : 0;
  } catch (const dtrain::UsageError& e) {
    // A value checked after parsing (--nproc-per-node abc, --nnodes 0, --rdzv-timeout 0) may have come from its
    // DTRAIN_* variable too: say so, as for the values CLI11 refuses while parsing.
    return report(e, fromEnvironment(root, args, e.what()));
  } catch (const dtrain::Error& e) {
    return report(e);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dtrain: internal error: %s\n", e.what());
    return static_cast<int>(dtrain::ExitCode::kInternal);
  }
}
