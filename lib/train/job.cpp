#include "lib/train/job.h"

// loadJob: the job file's top level and its sections in order. Beside it: job_parallel.cpp (the parallel section),
// job_device.cpp (GPU jobs), job_sets.cpp (--set), sharing job_fields.h.
#include "lib/ckpt/checkpoint.h"
#include "lib/common/error.h"
#include "lib/common/json_fields.h"
#include "lib/nn/device.h"
#include "lib/train/compression.h"
#include "lib/train/job_fields.h"

namespace dtrain::train {

using json = nlohmann::json;
namespace fs = std::filesystem;
using detail::atMost;
using detail::nonNegative;
using detail::positive;

namespace {

json readJsonFile(const fs::path& path, const std::string& what) {
  // A regular file of a config file's size, checked before reading (a FIFO or /dev/zero is refused).
  return parseConfigJson(readConfigText(path, what), path.string(), "not valid JSON");
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
  // The train and val splits of the same text files cut them at 1 - val_fraction each: two different fractions
  // make the eval set overlap the training tokens (an eval loss that flatters the model) or leave a gap.
  if (d.eval && d.train.format == data::Format::kText && d.eval->format == data::Format::kText &&
      !d.train.sequence.valSplit && d.eval->sequence.valSplit && d.train.sequence.paths == d.eval->sequence.paths &&
      d.train.sequence.valFraction != d.eval->sequence.valFraction) {
    const double t = d.train.sequence.valFraction, e = d.eval->sequence.valFraction;
    throw ConfigError(fmt::format(
        "{}: /data/eval/val_fraction: {} but /data/train/val_fraction is {} over the same files: the val split would "
        "{} the train split (expected the same val_fraction in both; the default is 0.1)",
        source, e, t, e > t ? fmt::format("overlap the last {:g}% of", (e - t) * 100)
                            : fmt::format("leave {:g}% of the tokens out of both", (t - e) * 100)));
  }
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
  job.parallel = detail::parseParallel(job.doc, src);
  if (job.parallel.ps) detail::checkPsFitsJob(job);
  detail::checkSparseLayers(job);
  detail::checkParallelFitsModel(job.parallel, job.model, job.data.batchSize, src);
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
    detail::checkCudaJob(job, src);
  }
  job.tf32 = top.boolean("tf32", true);
  if (job.doc.contains("attention")) {
    job.attention = *nn::parseAttentionKernel(top.choice("attention", {"auto", "fused", "matmul"}, "attention kernel"));
    if (job.device.isCuda() && job.attention == nn::AttentionKernel::kFused) detail::checkFusedAttention(job, src);
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

