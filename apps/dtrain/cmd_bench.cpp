#include "apps/dtrain/commands.h"

namespace dtrain::app {

void addBenchCommand(CLI::App& root, Action& action) {
  auto* bench = root.add_subcommand("bench", "Built-in benchmarks (run them under `dtrain run` for several ranks)");
  bench->require_subcommand(1);
  addBenchStore(*bench, action);
  addBenchRdzv(*bench, action);
  addBenchCollectives(*bench, action);
}

}  // namespace dtrain::app
