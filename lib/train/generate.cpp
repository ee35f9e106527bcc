#include "lib/train/generate.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <vector>

#include "lib/common/error.h"
#include "lib/data/sequence.h"
#include "lib/nn/model.h"
#include "lib/train/sparse_tables.h"
#include "lib/train/weights.h"

namespace dtrain::train {
namespace {

std::string readText(const std::filesystem::path& file) {
  std::ifstream in(file);
  DTRAIN_CHECK_AS(ConfigError, in.good(), "{}: cannot open (is this a run directory of a model trained on text or "
                  "tokens?)", file.string());
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

std::string generateText(const GenerateOptions& o, const std::function<void(const std::string&)>& onToken) {
  DTRAIN_CHECK_AS(UsageError, o.tokens >= 0, "--tokens: {} (expected >= 0)", o.tokens);
  DTRAIN_CHECK_AS(UsageError, o.temperature > 0, "--temperature: {} (expected > 0)", o.temperature);
  DTRAIN_CHECK_AS(UsageError, o.topK >= 0, "--top-k: {} (expected >= 0; 0 = no cut)", o.topK);
  const auto specFile = o.runDir / kModelSpecFile;
  DTRAIN_CHECK_AS(ConfigError, std::filesystem::is_directory(o.runDir),
                  "{}: no such run directory (expected the output folder of a run, e.g. runs/gpt_fortunes)",
                  o.runDir.string());
  DTRAIN_CHECK_AS(ConfigError, std::filesystem::exists(specFile),
                  "{}: no {} here: not the output folder of a language model's run (runs on text or token data write "
                  "model.json, model.safetensors and vocab.json)",
                  o.runDir.string(), kModelSpecFile);
  const nn::ModelSpec spec = nn::loadModelSpec(specFile);
  DTRAIN_CHECK_AS(ConfigError, spec.input.rank() == 1 && spec.output().rank() == 2,
                  "{}: not a language model (input {} and output {}; expected [T] and [T, V])", specFile.string(),
                  spec.input.str(), spec.output().str());
  const int64_t t = spec.input[0], v = spec.output()[1];
  nn::Model model = nn::Model::build(spec, 1, 0);
  // A run writes model.safetensors when it finishes; one stopped early (Ctrl-C, max restarts) has only checkpoints.
  const auto weights = o.runDir / "model.safetensors";
  DTRAIN_CHECK_AS(CheckpointError, std::filesystem::exists(weights),
                  "{} does not exist: the run has not finished (a run writes it at its end{}); resume the run with "
                  "the same job and --output-dir to finish it",
                  weights.string(),
                  std::filesystem::exists(o.runDir / "checkpoints") ? ", and its checkpoints are in checkpoints/" : "");
  loadWeights(weights, model);
  // Sparse embedding tables are not in model.safetensors: their rows are in the shards its index lists (or, from an
  // older run, in the file itself). Generation is one process, so it holds them (sparse_shards.h).
  std::unique_ptr<LocalSparseTables> tables;
  if (!model.sparseTables().empty()) {
    std::vector<ps::SparseTableOptions> options;
    for (const nn::SparseTableInfo& info : model.sparseTables())
      options.push_back({.rows = info.rows, .dim = info.dim, .initStd = info.initStd, .name = info.name});
    tables = std::make_unique<LocalSparseTables>(std::move(options));
    tables->loadShards(sparseWeightFiles(weights), /*withState=*/false, 0);
    model.bindSparseRows(tables.get());
  }
  data::Vocabulary vocab;
  if (std::filesystem::exists(o.runDir / "vocab.json"))
    vocab = data::Vocabulary::fromJson(readText(o.runDir / "vocab.json"), (o.runDir / "vocab.json").string());
  // A prompt the model cannot read is a bad flag value: the README's exit 3, as --temperature 0 (the vocabulary
  // reports a character it lacks, or invalid UTF-8, as a ConfigError, exit 2, which is for job and model files).
  std::vector<int32_t> context;
  try {
    context = vocab.encode(o.prompt);
  } catch (const ConfigError& e) {
    throw UsageError(e.what());
  }
  DTRAIN_CHECK_AS(UsageError, !context.empty(), "--prompt: empty (expected at least one character)");
  for (int32_t id : context)
    DTRAIN_CHECK_AS(UsageError, id < v, "--prompt: token {} is outside the model's vocabulary of {}", id, v);

  std::mt19937_64 rng(o.seed);
  std::vector<float> window(static_cast<size_t>(t));
  std::vector<double> probs(static_cast<size_t>(v));
  std::vector<int64_t> order(static_cast<size_t>(v));
  std::string out = o.prompt;
  for (int64_t n = 0; n < o.tokens; ++n) {
    const size_t len = std::min(context.size(), static_cast<size_t>(t));
    std::fill(window.begin(), window.end(), 0.0f);
    for (size_t i = 0; i < len; ++i) window[i] = static_cast<float>(context[context.size() - len + i]);
    const float* logits = model.forward(window.data(), 1, false).f32() + (len - 1) * static_cast<size_t>(v);
    double mx = -INFINITY;
    for (int64_t j = 0; j < v; ++j) mx = std::max(mx, static_cast<double>(logits[j]) / o.temperature);
    double cut = -INFINITY;
    if (o.topK > 0 && o.topK < v) {
      for (int64_t j = 0; j < v; ++j) order[static_cast<size_t>(j)] = j;
      std::nth_element(order.begin(), order.begin() + (o.topK - 1), order.end(),
                       [&](int64_t a, int64_t b) { return logits[a] > logits[b]; });
      cut = logits[order[static_cast<size_t>(o.topK - 1)]];
    }
    double total = 0;
    for (int64_t j = 0; j < v; ++j) {
      const double p = logits[j] < cut ? 0.0 : std::exp(static_cast<double>(logits[j]) / o.temperature - mx);
      probs[static_cast<size_t>(j)] = p;
      total += p;
    }
    // A uniform draw with our own conversion (std::uniform_real_distribution is implementation-defined).
    double u = static_cast<double>(rng() >> 11) * 0x1.0p-53 * total;
    int32_t next = static_cast<int32_t>(v - 1);
    for (int64_t j = 0; j < v; ++j) {
      u -= probs[static_cast<size_t>(j)];
      if (u < 0) {
        next = static_cast<int32_t>(j);
        break;
      }
    }
    context.push_back(next);
    const std::string piece = vocab.decode(next);
    out += piece;
    if (onToken) onToken(piece);
  }
  return out;
}

}  // namespace dtrain::train
