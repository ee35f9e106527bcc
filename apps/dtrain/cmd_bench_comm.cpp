#include "apps/dtrain/commands.h"

namespace dtrain::app {

void addBenchCollectives(CLI::App& bench, Action& action) {
  (void)bench;
  (void)action;
}

}  // namespace dtrain::app
