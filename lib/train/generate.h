// Sampling text from a trained language model (`dtrain generate RUN_DIR`), nanoGPT's sample.py semantics:
// the context is cropped to the model's block_size, logits of the last position are divided by the temperature,
// cut to the top k, softmaxed and sampled; repeated for `tokens` new tokens.
//
// RUN_DIR is a run's output directory: model.json (the model spec, written by the trainer for token datasets),
// model.safetensors (its weights) and vocab.json (lib/data/sequence.h; absent = byte vocabulary).
// The model's input is a fixed window [T]: a shorter context is padded on the right, which causal attention never
// lets the last real position see. Deterministic for a given seed. Errors: UsageError (exit 3) naming a flag
// with a bad value (--tokens, --temperature, --top-k), ConfigError naming the file.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>

namespace dtrain::train {

struct GenerateOptions {
  std::filesystem::path runDir;
  std::string prompt = "\n";
  int64_t tokens = 200;
  double temperature = 0.8;
  int64_t topK = 0;  // 0: the whole vocabulary
  uint64_t seed = 1337;
};

// Returns prompt + generated text; `onToken` (optional) receives each decoded token as it is sampled.
std::string generateText(const GenerateOptions& options, const std::function<void(const std::string&)>& onToken = {});

// Written by the trainer beside model.safetensors: the model object of the job (with its preset expanded or not).
inline constexpr const char* kModelSpecFile = "model.json";

}  // namespace dtrain::train
