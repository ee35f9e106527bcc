#include "apps/dtrain/commands.h"

namespace dtrain::app {

void addTrainCommand(CLI::App& root, Action& action) {
  auto* sub = root.add_subcommand("train", "(not yet implemented)");
  sub->callback([&action] { action = [] { return 1; }; });
}

}  // namespace dtrain::app
