// `dtrain generate RUN_DIR --prompt TEXT --tokens N [--temperature T --top-k K --seed S]`: sample text from a
// language model a run trained (lib/train/generate.h). Prints the prompt and the sampled text as it is drawn.
#include <fmt/format.h>

#include <cstdio>

#include "apps/dtrain/commands.h"
#include "lib/train/generate.h"

namespace dtrain::app {

void addGenerateCommand(CLI::App& root, Action& action) {
  auto o = std::make_shared<train::GenerateOptions>();
  auto* sub = root.add_subcommand("generate", "Sample text from a language model trained on text or tokens");
  sub->add_option("run_dir", o->runDir, "The run's output directory (model.json, model.safetensors, vocab.json)")
      ->required();
  sub->add_option("--prompt", o->prompt, "Text to continue (default: a newline)");
  sub->add_option("--tokens", o->tokens, "How many tokens to sample (default 200)");
  sub->add_option("--temperature", o->temperature, "Divide the logits by this (default 0.8; lower: more likely text)");
  sub->add_option("--top-k", o->topK, "Sample among the k most likely tokens only (default 0: all)");
  sub->add_option("--seed", o->seed, "Random seed (default 1337): the same seed gives the same text");
  sub->footer(exitCodesHelp({{"0", ""},
                             {"1", ""},
                             {"2", "the run folder, its model or vocabulary is missing or invalid"},
                             {"3", "invalid command line (a --prompt the model cannot read included)"},
                             {"8", "the model's weights cannot be read"}}));
  sub->callback([&action, o] {
    action = [o] {
      // The prompt is echoed with the first token, once the run directory, model and prompt are checked: an
      // error must not follow a half-printed text.
      bool echoed = false;
      train::generateText(*o, [&](const std::string& piece) {
        if (!echoed) {
          fmt::print("{}", o->prompt);
          echoed = true;
        }
        fmt::print("{}", piece);
        std::fflush(stdout);
      });
      fmt::print("{}\n", echoed ? "" : o->prompt);
      return 0;
    };
  });
}

}  // namespace dtrain::app
