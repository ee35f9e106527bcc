#include "lib/train/job.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <functional>

#include "lib/ckpt/checkpoint.h"
#include "lib/common/error.h"
#include "lib/common/parse.h"
#include "lib/common/json_fields.h"
#include "lib/nn/device.h"
#include "lib/nn/registry.h"
#include "lib/nn/tensor_parallel.h"
#include "lib/train/compression.h"
#include "lib/train/layout.h"
#include "lib/train/sparse_tables.h"

namespace dtrain::train {

using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

json readJsonFile(const fs::path& path, const std::string& what) {
  // A regular file of a config file's size, checked before reading (a FIFO or /dev/zero is refused).
  return parseConfigJson(readConfigText(path, what), path.string(), "not valid JSON");
}

bool positive(int64_t v) { return v >= 1; }

bool nonNegative(int64_t v) { return v >= 0; }

// An upper bound checked after the field's own check, so "expected an integer >= 1, got 0" stays as it was and a
// huge value says what the limit is instead of being truncated (a batch size of 2^31 used to wrap to a negative int).
int64_t atMost(const JsonFields& f, std::string_view key, int64_t value, int64_t max, std::string_view unit = "") {
  if (value > max) f.failAt(key, fmt::format("{} is more than the supported {}{}", value, max, unit));
  return value;
}

// "model": {...} inline, or "model": "path/to/model.json" (a model object, or a job file with a "model").
struct ResolvedModel {
  json model;
  std::string source;   // where its fields are, for messages: the job file, or the model file it names
  std::string pointer;  // the model object's JSON pointer in `source` ("/model", or "" for a bare model file)
};
ResolvedModel resolveModel(json& doc, const std::string& source, const fs::path& baseDir) {
  DTRAIN_CHECK_AS(ConfigError, doc.contains("model"), "{}: missing required field 'model' (an object or a model file)",
                  source);
  json& model = doc["model"];
  ResolvedModel out{json(), source, "/model"};
  if (model.is_string()) {
    fs::path file = baseDir / model.get<std::string>();
    DTRAIN_CHECK_AS(ConfigError, fs::exists(file), "{}: /model: model file {} does not exist", source, file.string());
    json loaded;
    try {
      loaded = readJsonFile(file, "model file");
    } catch (const ConfigError& e) {
      throw ConfigError(fmt::format("{}: /model: {}", source, e.what()));  // which job and field named the file
    }
    // A bad value inside is reported in that file, at its own pointer (was: the job file's /model).
    out.source = fmt::format("{} (the model file of {})", file.string(), source);
    out.pointer = "";
    if (loaded.is_object() && loaded.contains("model") && !loaded.contains("layers")) {
      loaded = loaded["model"];
      out.pointer = "/model";
    }
    model = loaded;
    DTRAIN_CHECK_AS(ConfigError, model.is_object(), "{}: {}: expected a model object, got {}", out.source,
                    out.pointer.empty() ? "/" : out.pointer, jsonSnippet(model));
  } else {
    DTRAIN_CHECK_AS(ConfigError, model.is_object(), "{}: /model: expected an object or a model file path, got {}",
                    source, jsonSnippet(model));
  }
  out.model = model;
  return out;
}

DataSettings parseData(const json& doc, const std::string& source, const fs::path& baseDir) {
  DataSettings d;
  DTRAIN_CHECK_AS(ConfigError, doc.contains("data"), "{}: missing required field 'data' (with 'train' inside)", source);
  JsonFields f(doc.at("data"), source, "/data", "the data section");
  f.allowOnly({"train", "eval", "batch_size", "shuffle", "drop_last", "prefetch"});
  d.train = data::parseDataSpec(f.at("train"), source, "/data/train", baseDir);
  if (f.has("eval")) d.eval = data::parseDataSpec(f.at("eval"), source, "/data/eval", baseDir);
  d.batchSize = atMost(f, "batch_size", f.integer("batch_size", 64, "an integer >= 1 (samples per rank)", positive),
                       kMaxBatchSize, " samples per rank");
  d.shuffle = f.boolean("shuffle", true);
  d.dropLast = f.boolean("drop_last", false);
  if (f.has("prefetch")) d.prefetch = f.boolean("prefetch", true);
  return d;
}

LoopSettings parseLoop(const json& doc, const std::string& source) {
  LoopSettings l;
  if (!doc.contains("train")) return l;
  JsonFields f(doc.at("train"), source, "/train", "the train section");
  f.allowOnly({"epochs", "seed", "max_steps", "grad_accum", "log_every", "eval", "on_nonfinite", "max_skipped_steps"});
  l.epochs = f.integer("epochs", 1, "an integer >= 1", positive);
  l.seed = static_cast<uint64_t>(f.integer("seed", 0, "an integer >= 0", nonNegative));
  l.maxSteps = f.integer("max_steps", 0, "an integer >= 0 (0: no limit)", nonNegative);
  l.gradAccum = static_cast<int>(f.integer("grad_accum", 1, "an integer between 1 and 4096", [](int64_t v) {
    return v >= 1 && v <= 4096;
  }));
  l.logEverySteps = f.integer("log_every", 0, "an integer >= 0 (0: about 20 lines per epoch)", nonNegative);
  l.evalEachEpoch = f.boolean("eval", true);
  l.onNonFinite = f.choice("on_nonfinite", {"stop", "skip"}, "on_nonfinite value", "stop") == "skip"
                      ? LoopSettings::OnNonFinite::kSkip
                      : LoopSettings::OnNonFinite::kStop;
  l.maxSkippedSteps = f.integer("max_skipped_steps", l.maxSkippedSteps, "an integer >= 1", positive);
  return l;
}

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

CheckpointSettings parseCheckpoint(const json& doc, const std::string& source, const fs::path& outputDir) {
  CheckpointSettings c;
  c.dir = outputDir / "checkpoints";
  if (!doc.contains("checkpoint")) return c;
  const json& v = doc.at("checkpoint");
  if (v.is_boolean()) {
    c.enabled = v.get<bool>();
    return c;
  }
  JsonFields f(v, source, "/checkpoint", "the checkpoint section");
  f.allowOnly({"dir", "every_steps", "keep", "enabled", "resume"});
  if (f.has("dir")) {
    const std::string dir = f.string("dir");
    DTRAIN_CHECK_AS(ConfigError, !dir.empty(), "{}: /checkpoint/dir: expected a folder path, got an empty string",
                    source);
    c.dir = outputDir / dir;  // relative to the output folder (absolute stays)
  }
  c.everySteps = f.integer("every_steps", 0, "an integer >= 0 (0: at epoch ends only)", nonNegative);
  c.keep = static_cast<int>(atMost(f, "keep", f.integer("keep", 3, "an integer >= 1", positive), 1 << 20));
  c.enabled = f.boolean("enabled", true);
  c.resume = f.boolean("resume", true);
  return c;
}

}  // namespace

int64_t stepsForSamples(const Job& job, int64_t samplesPerRank) {
  const int64_t batch = job.data.batchSize;
  int64_t batches = job.data.dropLast ? samplesPerRank / batch : (samplesPerRank + batch - 1) / batch;
  return (batches + job.loop.gradAccum - 1) / job.loop.gradAccum;
}

void applySet(json& doc, const std::string& assignment, const std::string& source) {
  auto eq = assignment.find('=');
  DTRAIN_CHECK_AS(ConfigError, eq != std::string::npos && eq > 0,
                  "--set {}: expected PATH=VALUE, e.g. --set train.epochs=1", assignment);
  std::string path = assignment.substr(0, eq);
  std::string text = assignment.substr(eq + 1);
  json value = json::parse(text, nullptr, false);
  if (value.is_discarded()) value = text;
  json* node = &doc;
  std::string walked;
  auto parts = parse::split(path, '.');
  for (size_t i = 0; i < parts.size(); ++i) {
    const std::string& part = parts[i];
    DTRAIN_CHECK_AS(ConfigError, !part.empty(), "--set {}: empty component in path '{}'", assignment, path);
    walked += "/" + part;
    bool last = i + 1 == parts.size();
    if (node->is_array()) {
      auto idx = parse::toInt(part);
      DTRAIN_CHECK_AS(ConfigError, idx && *idx >= 0 && static_cast<size_t>(*idx) < node->size(),
                      "--set {}: {}: {} is an array of {} element(s); expected an index 0..{}", assignment, walked,
                      walked.substr(0, walked.rfind('/')), node->size(), node->size() == 0 ? 0 : node->size() - 1);
      node = &(*node)[static_cast<size_t>(*idx)];
    } else {
      if (node->is_null()) *node = json::object();
      DTRAIN_CHECK_AS(ConfigError, node->is_object(), "--set {}: {} is {}, not an object with a field '{}' ({})",
                      assignment, walked.substr(0, walked.rfind('/')), jsonSnippet(*node), part, source);
      node = &(*node)[part];
    }
    if (last) *node = value;
  }
}

namespace {

// What the CUDA path supports today (docs/gpu.md "What runs on a GPU"): DDP over nccl (data parallelism only), with
// every gradient compression. The model-parallel and parameter-server strategies move host buffers (pipeline
// activations, tensor-group all-reduces inside the layers, push/pull frames), so they stay on the CPU for now.
void checkCudaJob(const Job& job, const std::string& src) {
  DTRAIN_CHECK_AS(ConfigError, job.parallel.backend == "auto" || job.parallel.backend == "nccl",
                  "{}: /parallel/backend: '{}' cannot carry GPU gradients; with \"device\": \"cuda\" use \"auto\" or "
                  "\"nccl\"",
                  src, job.parallel.backend);
  DTRAIN_CHECK_AS(ConfigError, job.parallel.strategy == "ddp",
                  "{}: /parallel/strategy: '{}' runs on the CPU only in this build; \"device\": \"cuda\" supports "
                  "\"ddp\"",
                  src, job.parallel.strategy);
  DTRAIN_CHECK_AS(ConfigError, job.parallel.pipeline.stages == 1,
                  "{}: /parallel/pipeline/stages: {} pipeline stages run on the CPU only in this build; \"device\": "
                  "\"cuda\" supports data parallelism (stages 1) or use \"device\": \"cpu\"",
                  src, job.parallel.pipeline.stages);
  DTRAIN_CHECK_AS(ConfigError, job.parallel.tensor == 1,
                  "{}: /parallel/tensor: tensor parallelism ({} ranks) runs on the CPU only in this build; \"device\": "
                  "\"cuda\" supports \"tensor\": 1, or use \"device\": \"cpu\"",
                  src, job.parallel.tensor);
  // Every compression runs with cuda, on the device: fp16/bf16 (CastHook), PowerSGD (nn::PowerSgdOps), top-k
  // (nn::TopKOps); DTRAIN_COMPRESSION_HOST_STAGING=1 stages top-k and PowerSGD through host memory instead
  // (CompressionHook's host staging; stagedThroughHost in compression.h).
  // A value of that variable other than 0/1/true/false/yes/no/on/off: exit 3 here, before any worker starts.
  if (job.parallel.compression) (void)stagedThroughHost(job.parallel.compression->type);
  // Every loss (cross_entropy, mse, bce_with_logits) and optimizer (sgd, adam, adamw, adagrad) has a CUDA
  // implementation (lib/nn/cuda); a type added later without one fails in its device factory (NotBuiltError).
  // Every layer needs a CUDA implementation: name the first that has none, before any worker starts.
  std::function<void(const nn::LayerSpec&)> check = [&](const nn::LayerSpec& l) {
    DTRAIN_CHECK_AS(ConfigError, l.kind != nullptr && l.kind->cuda != nullptr,
                    "{}: {}: layer '{}' has no CUDA implementation yet (\"device\": \"cuda\"); see docs/gpu.md for "
                    "the layers that have one",
                    job.modelSource, l.path, l.type());
    for (const auto& c : l.children) check(c);
  };
  for (const auto& l : job.model.layers) check(l);
}

// "attention": "fused" on a GPU: every causal_self_attention layer must be one the fused kernels cover ("auto"
// would quietly run the matmul path for the others; asking for "fused" means asking to know).
void checkFusedAttention(const Job& job, const std::string& src) {
  std::function<void(const nn::LayerSpec&)> check = [&](const nn::LayerSpec& l) {
    if (l.type() == "causal_self_attention") {
      const std::string gap = nn::fusedAttentionGap(l);
      DTRAIN_CHECK_AS(ConfigError, gap.empty(),
                      "{}: /attention: \"fused\" cannot run {} ({}: {}); use \"auto\" (the fused kernels where they "
                      "cover a layer, the matmul path elsewhere) or \"matmul\"",
                      src, l.path, l.type(), gap);
    }
    for (const auto& c : l.children) check(c);
  };
  for (const auto& l : job.model.layers) check(l);
}

}  // namespace

void checkGpusForWorkers(const Job& job, int localWorkers, int visibleGpus) {
  if (!job.device.isCuda() || localWorkers <= visibleGpus) return;
  const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
  DTRAIN_THROW(ConfigError,
               "{}: /device: \"cuda\" needs one GPU per local worker: {} local worker(s) but {} GPU(s) visible ({}); "
               "lower --nproc-per-node (or use --nproc-per-node gpu), or set \"device\": \"cpu\"",
               job.sourceFile, localWorkers, visibleGpus,
               visible != nullptr ? fmt::format("CUDA_VISIBLE_DEVICES={}", visible)
                                  : std::string(visibleGpus == 0 ? "no CUDA driver or device found"
                                                                 : "CUDA_VISIBLE_DEVICES is not set"));
}

namespace {

// The JSON pointer of an error message "FILE: /a/b: ..." about the job file `src` ("" when it names none).
std::string pointerOfMessage(const std::string& message, const std::string& src) {
  const std::string prefix = src + ": /";
  if (message.compare(0, prefix.size(), prefix) != 0) return "";
  const size_t start = src.size() + 2;
  const size_t end = message.find(": ", start);
  return end == std::string::npos ? "" : message.substr(start, end - start);
}

bool isIdentChar(char c) { return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '_'; }

// `word` occurs in `text` as a whole word (not inside a longer identifier).
bool mentionsWord(std::string_view text, std::string_view word) {
  for (size_t at = text.find(word); at != std::string_view::npos; at = text.find(word, at + 1)) {
    const size_t end = at + word.size();
    if ((at == 0 || !isIdentChar(text[at - 1])) && (end == text.size() || !isIdentChar(text[end]))) return true;
  }
  return false;
}

}  // namespace

std::string setsBehindError(const std::string& message, const std::string& source,
                            const std::vector<std::string>& sets) {
  auto within = [](const std::string& inner, const std::string& outer) {
    return inner == outer || (inner.size() > outer.size() && inner.compare(0, outer.size(), outer) == 0 &&
                              inner[outer.size()] == '/');
  };
  const std::string pointer = pointerOfMessage(message, source);
  auto section = [](const std::string& p) { return p.substr(0, p.find('/', 1)); };  // "/parallel"
  auto mentionsPointer = [](const std::string& text, const std::string& p) {
    for (size_t at = text.find(p); at != std::string::npos; at = text.find(p, at + 1))
      if (at + p.size() == text.size() || !isIdentChar(text[at + p.size()])) return true;
    return false;
  };
  // The text after "FILE: /pointer: ": what the message says about other fields ("(strategy is \"ddp\")").
  const std::string text = message.substr(std::min(message.size(), source.size() + pointer.size()));
  std::vector<std::string> from, with;
  for (const auto& s : sets) {
    const size_t eq = s.find('=');
    if (eq == std::string::npos || eq == 0) continue;
    std::string setPointer = "/" + s.substr(0, eq);
    std::replace(setPointer.begin(), setPointer.end(), '.', '/');
    const std::string leaf = setPointer.substr(setPointer.rfind('/') + 1);
    if (!pointer.empty() && (within(setPointer, pointer) || within(pointer, setPointer)))
      from.push_back("--set " + s);
    else if (mentionsPointer(text, setPointer) || text.find("'" + leaf + "'") != std::string::npos ||
             (section(setPointer) == section(pointer) && !parse::toInt(leaf) && mentionsWord(text, leaf)))
      with.push_back("--set " + s);
  }
  std::string out;
  if (!from.empty()) out = fmt::format("from {}", fmt::join(from, ", "));
  if (!with.empty()) out += fmt::format("{}with {}", out.empty() ? "" : "; ", fmt::join(with, ", "));
  return out;
}

ConfigError withSetsNamed(const ConfigError& e, const std::string& source, const std::vector<std::string>& sets) {
  const std::string named = setsBehindError(e.what(), source, sets);
  if (named.empty()) return e;
  ConfigError out(fmt::format("{} ({})", e.what(), named), e.code());
  out.setWhere(e.where());
  return out;
}

namespace {

void parseJobDocument(Job& job, const JobArgs& args, const fs::path& file);

}  // namespace

Job loadJob(const JobArgs& args) {
  Job job;
  job.sourceFile = args.path;
  fs::path file(args.path);
  DTRAIN_CHECK_AS(ConfigError, fs::exists(file), "job file {} does not exist", args.path);
  job.doc = readJsonFile(file, "job file");
  DTRAIN_CHECK_AS(ConfigError, job.doc.is_object(), "{}: expected a JSON object at the top level", args.path);
  job.baseDir = file.has_parent_path() ? file.parent_path() : fs::path(".");
  for (const auto& s : args.sets) applySet(job.doc, s, args.path);
  // A field set to null counts as not given (docs/job-file.md), top-level sections included: `--set parallel=null`
  // drops the section, so its defaults apply (and a required one is reported missing).
  for (auto it = job.doc.begin(); it != job.doc.end();) it = it->is_null() ? job.doc.erase(it) : std::next(it);
  try {
    parseJobDocument(job, args, file);
  } catch (const ConfigError& e) {
    // A value the command line put there is reported as the user typed it, not only as a field of the file.
    throw withSetsNamed(e, job.sourceFile, args.sets);
  }
  job.sets = args.sets;
  return job;
}

namespace {

void parseJobDocument(Job& job, const JobArgs& args, const fs::path& file) {
  const std::string& src = job.sourceFile;

  JsonFields top(job.doc, src, "", "the job");
  top.allowOnly({"name", "description", "model", "loss", "optimizer", "schedule", "lr_schedule", "data", "train",
                 "parallel", "checkpoint", "init", "output_dir", "device", "logging", "tf32", "precision", "attention"});
  job.name = top.string("name", file.stem().string());
  if (top.has("description")) (void)top.string("description");  // free text: a number or an object is a mistake
  DTRAIN_CHECK_AS(ConfigError, !job.name.empty() && job.name.find('/') == std::string::npos,
                  "{}: /name: expected a non-empty name without '/', got '{}'", src, job.name);
  ResolvedModel resolved = resolveModel(job.doc, src, job.baseDir);
  job.modelSource = resolved.source;
  job.model = nn::parseModelSpec(resolved.model, resolved.source, resolved.pointer);
  job.modelHash = ckpt::specHash(resolved.model);
  DTRAIN_CHECK_AS(ConfigError, job.doc.contains("loss"), "{}: missing required field 'loss' (e.g. {{\"type\": \"cross_entropy\"}})", src);
  job.loss = nn::parseLossSpec(job.doc["loss"], src, "/loss");
  DTRAIN_CHECK_AS(ConfigError, job.doc.contains("optimizer"),
                  "{}: missing required field 'optimizer' (e.g. {{\"type\": \"sgd\", \"lr\": 0.05}})", src);
  job.optimizer = nn::parseOptimizerSpec(job.doc["optimizer"], src, "/optimizer");
  DTRAIN_CHECK_AS(ConfigError, !(job.doc.contains("schedule") && job.doc.contains("lr_schedule")),
                  "{}: give either 'schedule' or 'lr_schedule', not both", src);
  if (job.doc.contains("schedule")) job.schedule = nn::parseScheduleSpec(job.doc["schedule"], src, "/schedule");
  if (job.doc.contains("lr_schedule")) job.schedule = nn::parseScheduleSpec(job.doc["lr_schedule"], src, "/lr_schedule");
  job.data = parseData(job.doc, src, job.baseDir);
  // Token datasets cut windows of the model's sequence length unless they say otherwise.
  for (data::DataSpec* d : {&job.data.train, job.data.eval ? &*job.data.eval : nullptr}) {
    if (d == nullptr || (d->format != data::Format::kText && d->format != data::Format::kTokens)) continue;
    if (d->sequence.blockSize == 0) {
      DTRAIN_CHECK_AS(ConfigError, job.model.input.rank() == 1,
                      "{}: {}: a {} dataset feeds a sequence model (input [T], e.g. the gpt preset) but the model's "
                      "input is {}",
                      src, d->jsonPath, data::formatName(d->format), job.model.input.str());
      d->sequence.blockSize = job.model.input[0];
    }
  }
  job.loop = parseLoop(job.doc, src);
  job.parallel = parseParallel(job.doc, src);
  if (job.parallel.ps) checkPsFitsJob(job);
  checkSparseLayers(job);
  checkParallelFitsModel(job.parallel, job.model, job.data.batchSize, src);
  if (job.parallel.compression) {
    checkCompressionFitsModel(*job.parallel.compression, job.model, src, "/parallel/compression");
    checkCompressionFitsOptimizer(*job.parallel.compression, job.optimizer, src, "/parallel/compression");
  }
  if (job.doc.contains("device") && top.choice("device", {"cpu", "cuda"}, "device") == "cuda") {
    DTRAIN_CHECK_AS(ConfigError, nn::cudaBuilt(),
                    "{}: /device: \"cuda\" needs a dtrain built with CUDA, and this one was built without it (configure "
                    "with -DDTRAIN_WITH_CUDA=ON where nvcc and NCCL are installed; see docs/gpu.md)",
                    src);
    job.device = Device::cuda(0);
    checkCudaJob(job, src);
  }
  job.tf32 = top.boolean("tf32", true);
  if (job.doc.contains("attention")) {
    job.attention = *nn::parseAttentionKernel(top.choice("attention", {"auto", "fused", "matmul"}, "attention kernel"));
    if (job.device.isCuda() && job.attention == nn::AttentionKernel::kFused) checkFusedAttention(job, src);
  }
  if (job.doc.contains("precision") && top.choice("precision", {"fp32", "bf16"}, "precision") == "bf16") {
    // The CPU layers compute in float32 (Eigen); emulating bf16 rounding there would be slow and prove little.
    DTRAIN_CHECK_AS(ConfigError, job.device.isCuda(),
                    "{}: /precision: \"bf16\" runs on GPUs only (\"device\": \"cuda\"); the CPU layers compute in "
                    "float32: use \"precision\": \"fp32\" or \"device\": \"cuda\"; see docs/gpu.md",
                    src);
    job.precision = Job::Precision::kBf16;
  }
  if (job.doc.contains("init")) {
    JsonFields init(job.doc["init"], src, "/init", "the init section");
    init.allowOnly({"from"});
    job.initFrom = job.baseDir / init.string("from");
    DTRAIN_CHECK_AS(ConfigError, fs::exists(job.initFrom), "{}: /init/from: weights file {} does not exist", src,
                    job.initFrom.string());
    DTRAIN_CHECK_AS(ConfigError, !fs::is_directory(job.initFrom),
                    "{}: /init/from: {} is a folder, not a weights file (expected a .safetensors file, or a sharded "
                    "model's model.safetensors.index.json)",
                    src, job.initFrom.string());
  }
  if (!args.outputDir.empty()) job.outputDir = args.outputDir;
  else if (job.doc.contains("output_dir")) {
    job.outputDir = top.string("output_dir");
    DTRAIN_CHECK_AS(ConfigError, !job.outputDir.empty(), "{}: /output_dir: expected a folder path, got an empty string",
                    src);
  }
  else job.outputDir = fs::path("runs") / job.name;
  job.checkpoint = parseCheckpoint(job.doc, src, job.outputDir);
  if (job.doc.contains("logging")) {
    JsonFields logging(job.doc["logging"], src, "/logging", "the logging section");
    logging.allowOnly({"tensorboard"});
    job.logging.tensorboard = logging.boolean("tensorboard", false);
  }
}

}  // namespace

}  // namespace dtrain::train
