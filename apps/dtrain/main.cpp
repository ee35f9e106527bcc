// dtrain: launcher and runtime for distributed training. main() is thin: parse, run, map errors to exit codes.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <cstring>

#include "apps/dtrain/commands.h"
#include "apps/dtrain/job_hooks.h"
#include "lib/common/config.h"
#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/launch/process_tree.h"

namespace {

int report(const dtrain::Error& e) {
  std::fprintf(stderr, "dtrain: error: %s\n", e.what());
  if (dtrain::log::enabled(dtrain::log::Level::kDebug) && !e.where().empty())
    std::fprintf(stderr, "dtrain: (raised at %s)\n", e.where().c_str());
  return e.exitCode();
}

}  // namespace

int main(int argc, char** argv) {
  // The process watchdog of `dtrain run` (lib/launch/process_tree.h): hidden, and kept out of CLI11.
  if (argc > 1 && std::strcmp(argv[1], dtrain::launch::kWatchdogCommand) == 0)
    return dtrain::launch::watchdogMain(argc, argv);
  CLI::App root{"dtrain: launch and run distributed training (torchrun-compatible), one native binary", "dtrain"};
  root.set_version_flag("--version", std::string("dtrain ") + DTRAIN_VERSION +
                                         (DTRAIN_WITH_CUDA ? " (cuda)" : " (cpu)"));
  root.require_subcommand(1);
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
    std::fprintf(stderr, "dtrain: error: %s (see dtrain --help)\n", dtrain::app::parseErrorText(e).c_str());
    return static_cast<int>(dtrain::ExitCode::kUsage);
  } catch (const dtrain::Error& e) {
    return report(e);
  }
  try {
    return action ? action() : 0;
  } catch (const dtrain::Error& e) {
    return report(e);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dtrain: internal error: %s\n", e.what());
    return static_cast<int>(dtrain::ExitCode::kInternal);
  }
}
