// The "parallel" section of a job file (docs/job-file.md, docs/parallelism.md, docs/parameter_server.md): its
// fields, then the checks of those fields against the model and the rest of the job. Split from job.cpp; loadJob
// calls these in order (job_fields.h).
#include <fmt/ranges.h>

#include <algorithm>
#include <optional>

#include "lib/common/error.h"
#include "lib/common/json_fields.h"
#include "lib/nn/tensor_parallel.h"
#include "lib/train/compression.h"
#include "lib/train/job_fields.h"
#include "lib/train/layout.h"
#include "lib/train/sparse_tables.h"

namespace dtrain::train::detail {

using json = nlohmann::json;

namespace {

// servers / mode / staleness: only with the parameter-server strategy (docs/parameter_server.md).
std::optional<PsSettings> parsePsSettings(const JsonFields& f, const std::string& strategy) {
  if (strategy != "parameter_server") {
    for (const char* key : {"servers", "mode", "staleness"})
      if (f.has(key))
        f.failAt(key, fmt::format("only for the parameter-server strategy (strategy is \"{}\"; set "
                                  "\"strategy\": \"parameter_server\")", strategy));
    return std::nullopt;
  }
  PsSettings ps;
  ps.servers = static_cast<int>(atMost(f, "servers", f.integer("servers", 1, "an integer >= 1", positive), 1 << 16));
  ps.mode = f.choice("mode", {"sync", "async", "ssp"}, "mode", "sync");
  ps.staleness = static_cast<int>(atMost(
      f, "staleness", f.integer("staleness", 0, "an integer >= 0 (steps a worker may run ahead)", nonNegative),
      1 << 20));
  if (f.has("staleness") && ps.mode != "ssp")
    f.failAt("staleness", fmt::format("only with \"mode\": \"ssp\" (mode is \"{}\")", ps.mode));
  return ps;
}

}  // namespace

// What the parameter server does not do (yet): say so before any rank starts.
void checkPsFitsJob(const Job& job) {
  const std::string& src = job.sourceFile;
  DTRAIN_CHECK_AS(ConfigError, !job.parallel.compression,
                  "{}: /parallel/compression: not with the parameter-server strategy (/parallel/strategy; workers "
                  "push float32 partitions; compression applies to ddp)", src);
  DTRAIN_CHECK_AS(ConfigError, job.optimizer.clipGradNorm == 0,
                  "{}: /optimizer/clip_grad_norm: not with the parameter-server strategy (/parallel/strategy; the "
                  "servers update partitions independently, so no rank sees the global gradient norm); remove it", src);
  DTRAIN_CHECK_AS(ConfigError, job.loop.onNonFinite == LoopSettings::OnNonFinite::kStop,
                  "{}: /train/on_nonfinite: \"skip\" is not available with the parameter-server strategy "
                  "(/parallel/strategy; the servers apply a gradient as it arrives); use \"stop\"", src);
}

// Sparse embeddings keep their table on the parameter servers (docs/parameter_server.md "Sparse embeddings").
void checkSparseLayers(const Job& job) {
  for (const nn::LayerSpec& l : job.model.layers) {
    if (!l.sparse) continue;
    DTRAIN_CHECK_AS(ConfigError, job.parallel.ps.has_value(),
                    "{}: {}/sparse: a sparse embedding keeps its table on parameter servers, so it needs "
                    "\"parallel\": {{\"strategy\": \"parameter_server\"}} (/parallel/strategy is \"{}\"); remove "
                    "\"sparse\" for a dense table",
                    job.modelSource, l.path, job.parallel.strategy);
  }
  sparseTableOptions(job);  // the optimizer must have a sparse variant (ConfigError naming /optimizer)
}

ParallelSettings parseParallel(const json& doc, const std::string& source) {
  ParallelSettings p;
  if (!doc.contains("parallel")) return p;
  JsonFields f(doc.at("parallel"), source, "/parallel", "the parallel section");
  f.allowOnly({"strategy", "backend", "bucket_mb", "first_bucket_mb", "overlap", "timeout", "lr_scaling",
               "reference_world_size", "compression", "servers", "mode", "staleness", "data", "pipeline", "tensor"});
  if (f.has("overlap")) p.overlap = f.boolean("overlap", true);
  p.strategy = f.choice("strategy", kStrategyNames, "strategy", "ddp");
  p.backend = f.choice("backend", {"auto", "tcp", "shm", "hier", "nccl"}, "backend", "auto");
  auto positiveMb = [](double v) { return v > 0 && v <= 4096; };
  p.bucketMb = f.number("bucket_mb", 25.0, "a number of MiB > 0 and <= 4096", positiveMb);
  p.firstBucketMb = f.number("first_bucket_mb", 1.0, "a number of MiB > 0 and <= 4096", positiveMb);
  p.timeout = f.duration("timeout", p.timeout);
  p.lrScaling = f.choice("lr_scaling", {"none", "linear"}, "lr scaling", "none");
  p.referenceWorldSize = static_cast<int>(
      atMost(f, "reference_world_size", f.integer("reference_world_size", 1, "an integer >= 1", positive), 1 << 20));
  if (f.has("compression")) p.compression = parseCompression(f.at("compression"), source, f.pathOf("compression"));
  p.ps = parsePsSettings(f, p.strategy);
  constexpr int64_t kMaxDegree = 1 << 16;
  auto degree = [](int64_t v) { return v >= 1 && v <= kMaxDegree; };
  // What a degree field expects, its bound written from kMaxDegree.
  auto expected = [](const char* what) { return fmt::format("an integer between 1 and {}{}", int64_t{kMaxDegree}, what); };
  if (f.has("data")) p.data = static_cast<int>(f.integer("data", 1, expected(" (data-parallel replicas)"), degree));
  p.tensor = static_cast<int>(f.integer("tensor", 1, expected(" (ranks per tensor-parallel group)"), degree));
  if (f.has("pipeline")) {
    JsonFields pf(f.at("pipeline"), source, f.pathOf("pipeline"), "the pipeline section");
    pf.allowOnly({"stages", "micro_batches", "schedule", "balance"});
    p.pipeline.stages = static_cast<int>(pf.integer("stages", 1, expected(" (pipeline stages)"), degree));
    p.pipeline.microBatches =
        static_cast<int>(pf.integer("micro_batches", 4 * int64_t{p.pipeline.stages}, expected(""), degree));
    p.pipeline.schedule = pf.choice("schedule", {"gpipe", "1f1b"}, "pipeline schedule", "1f1b") == "gpipe"
                              ? PipelineSettings::Schedule::kGpipe
                              : PipelineSettings::Schedule::k1F1B;
    if (pf.has("balance")) {
      const json& b = pf.at("balance");
      if (!b.is_array()) pf.failAt("balance", fmt::format("expected a list of layer counts, got {}", jsonSnippet(b)));
      for (const auto& v : b) {
        if (!v.is_number_integer() || v.get<int64_t>() < 1 || v.get<int64_t>() > kMaxDegree)
          pf.failAt("balance", fmt::format("expected a list of layer counts, each between 1 and {}, got {}",
                                           kMaxDegree, jsonSnippet(b)));
        p.pipeline.balance.push_back(static_cast<int>(v.get<int64_t>()));
      }
    }
  }
  return p;
}

// The parallel section against the model: a stage needs at least one layer, a balance names every layer once.
void checkParallelFitsModel(ParallelSettings& p, const nn::ModelSpec& model, int64_t batchSize,
                            const std::string& source) {
  const auto layers = static_cast<int64_t>(model.layers.size());
  const PipelineSettings& pl = p.pipeline;
  DTRAIN_CHECK_AS(ConfigError, pl.stages <= layers,
                  "{}: /parallel/pipeline/stages: {} stages but the model has {} layers (a stage holds at least one "
                  "top-level layer)",
                  source, pl.stages, layers);
  if (!pl.balance.empty()) {
    int64_t sum = 0;
    for (int n : pl.balance) sum += n;
    DTRAIN_CHECK_AS(ConfigError, static_cast<int>(pl.balance.size()) == pl.stages && sum == layers,
                    "{}: /parallel/pipeline/balance: {} gives {} stage(s) holding {} layers in all; expected {} "
                    "stage(s) holding the model's {} layers",
                    source, jsonSnippet(json(pl.balance)), pl.balance.size(), sum, pl.stages, layers);
  }
  if (pl.stages > 1 && pl.microBatches < pl.stages)
    p.warnings.push_back(fmt::format(
        "{}: /parallel/pipeline/micro_batches: {} micro-batches for {} stages: the pipeline stays mostly idle "
        "(bubble (K-1)/(M+K-1) = {:.0f}%); use at least {} (4 x stages keeps it under 20%)",
        source, pl.microBatches, pl.stages,
        100.0 * (pl.stages - 1) / (pl.microBatches + pl.stages - 1), pl.stages));
  if (pl.stages > 1 && pl.microBatches > batchSize)
    p.warnings.push_back(fmt::format("{}: /parallel/pipeline/micro_batches: {} micro-batches but a batch of {} "
                                     "samples: each step uses {} micro-batches of 1 sample",
                                     source, pl.microBatches, batchSize, batchSize));
  DTRAIN_CHECK_AS(ConfigError, !p.ps || (pl.stages == 1 && p.tensor == 1),
                  "{}: /parallel: the parameter_server strategy holds whole models on its workers; it does not combine "
                  "with pipeline stages ({}) or tensor parallelism ({})",
                  source, pl.stages, p.tensor);
  if (p.tensor > 1) {
    // Layers split inside each stage (a column/row pair never spans two stages): every stage must divide.
    const auto stages = partitionStages(model, p.pipeline.stages, p.pipeline.balance, source, p.tensor);
    for (const auto& stage : stages) {
      const auto problems = nn::tensorParallelProblems(stageSpec(model, stage), p.tensor);
      if (!problems.empty())
        DTRAIN_THROW(ConfigError, "{}: /parallel/tensor: {} ranks cannot split the model: {}", source, p.tensor,
                     problems.front());
    }
    // A model with no column/row pair and no attention (a dropout between the linears, convolutions only) runs
    // whole on every tensor rank: correct, but the ranks buy nothing, so say so before they start. (Pairs that
    // stage boundaries cut are the warning below.)
    if (const auto counts = nn::shardCounts(model, p.tensor, 0); counts.local >= counts.full)
      p.warnings.push_back(fmt::format(
          "{}: /parallel/tensor: {} ranks split no layer of this model: every tensor rank holds and computes all of "
          "it (only a linear followed, through relu/gelu/tanh/sigmoid, by a linear, and causal_self_attention split; "
          "docs/parallelism.md); use parallel.tensor 1 and give the ranks to data parallelism",
          source, p.tensor));
    // The automatic balance keeps pairs together when it can; a given balance (or too many stages) may not. A
    // layer of a broken pair is split only if it pairs with another inside its stage.
    std::vector<int> paired;
    for (const auto& stage : stages)
      for (const auto& [col, row] : nn::topLevelPairs(stageSpec(model, stage)))
        paired.insert(paired.end(), {stage.first + col, stage.first + row});
    for (const auto& [col, row] : stagesSplittingPairs(model, stages)) {
      std::vector<int> whole;
      for (int l : {col, row})
        if (std::find(paired.begin(), paired.end(), l) == paired.end()) whole.push_back(l);
      p.warnings.push_back(fmt::format(
          "{}: /parallel/pipeline/{}: the stage boundary between layers {} and {} splits a column/row linear pair: "
          "layer {} stay(s) whole on every tensor rank (not split over parallel.tensor {}); {}",
          source, pl.balance.empty() ? "stages" : "balance", col, row, fmt::join(whole, " and "), p.tensor,
          pl.balance.empty() ? "use fewer stages" : "give a balance that keeps the pair in one stage"));
    }
  }
}

}  // namespace dtrain::train::detail
