// A job file: one JSON object describing the model, loss, optimizer, schedule, data, training loop, parallel
// strategy and checkpoints (see docs/job-file.md). loadJob() reads it, applies `--set PATH=VALUE` overrides,
// resolves relative input paths against the job file's folder, and validates every section up front, so a
// bad job is rejected (ConfigError, exit code 2, naming the file and JSON path) before any worker starts.
// Files are only checked for existence here; datasets are read by the trainer.
#pragma once

#include <nlohmann/json.hpp>

#include <chrono>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "lib/common/error.h"
#include "lib/data/spec.h"
#include "lib/nn/attention_kernel.h"
#include "lib/nn/loss.h"
#include "lib/nn/optimizer.h"
#include "lib/nn/schedule.h"
#include "lib/nn/spec.h"

namespace dtrain::train {

// The largest batch_size (per rank): batch sizes are int inside the layers, and batch x sample values must stay
// far from overflow; memory is estimated separately (estimateJobMemory).
inline constexpr int64_t kMaxBatchSize = int64_t{1} << 24;

struct DataSettings {
  data::DataSpec train;
  std::optional<data::DataSpec> eval;
  int64_t batchSize = 64;  // per rank
  bool shuffle = true;
  bool dropLast = false;
  std::optional<bool> prefetch;  // unset: on when the node has more cores than workers
};

struct LoopSettings {
  int64_t epochs = 1;
  uint64_t seed = 0;
  int64_t maxSteps = 0;       // 0: no limit
  int gradAccum = 1;          // micro-batches per optimizer step
  int64_t logEverySteps = 0;  // 0: about 20 lines per epoch
  bool evalEachEpoch = true;
  // "on_nonfinite": what a step whose loss or gradient is NaN/inf does. kStop: the run ends with DivergedError
  // (exit 9) naming the step, before that step changes the weights; kSkip: the step's update is dropped (as
  // mixed-precision loss scalers do) and training goes on. Weights that become non-finite always stop the run.
  // Nothing non-finite is ever written to a checkpoint or model.safetensors.
  enum class OnNonFinite : uint8_t { kStop, kSkip };
  OnNonFinite onNonFinite = OnNonFinite::kStop;
  // "max_skipped_steps": with kSkip, this many skipped steps in a row end the run as diverged (exit 9): a run whose
  // every step is non-finite is not training, and would otherwise "succeed" with its initial weights.
  int64_t maxSkippedSteps = 100;
};

// parallel.strategy values that have an implementation (makeStrategy, lib/train/strategy.h); any other value
// ("pipeline", ...) is a ConfigError naming /parallel/strategy until its strategy exists.
inline const std::vector<std::string_view> kStrategyNames = {"ddp", "parameter_server"};

// "parallel": {"strategy": "parameter_server", "servers": S, "mode": "sync"|"async"|"ssp", "staleness": k}
// (docs/parameter_server.md, lib/train/ps_strategy.h). `servers` ranks of the world serve, the others train.
struct PsSettings {
  int servers = 1;            // 1 <= servers < world size (checked where the world size is known)
  std::string mode = "sync";  // sync | async | ssp
  int staleness = 0;          // ssp: how many steps a worker may run ahead of the slowest (>= 0)
};

// parallel.compression (lib/train/compression.h, docs/compression.md): how DDP compresses gradients.
struct CompressionSettings {
  enum class Type : uint8_t { kFp16, kBf16, kPowerSgd, kTopK };
  Type type = Type::kFp16;
  int rank = 1;              // powersgd: rank of the approximation (PyTorch's matrix_approximation_rank)
  double ratio = 0.01;       // topk: fraction of each bucket's elements sent, in (0, 1]
  int64_t startStep = 0;     // optimizer steps of plain all-reduce before compressing
  bool errorFeedback = true; // powersgd/topk: carry what was not sent into the next step
  // topk: Deep Gradient Compression's momentum correction. The SGD momentum moves from the optimizer into the
  // hook (velocity accumulated per rank before sparsification, masked once sent); the trainer then runs SGD
  // without momentum. `momentum` is the optimizer's, filled in by loadJob.
  bool momentumCorrection = false;
  double momentum = 0;
  // topk with an adam/adamw optimizer: each rank runs Adam on its own gradient from startStep on and top-k sends
  // its update direction (Efficient-Adam, lib/train/compression.h); the optimizer only applies the average.
  // beta1, beta2 and eps are the optimizer's, filled in by loadJob.
  bool localAdam = false;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  // topk with momentumCorrection: DGC's momentum factor masking (the velocity zeroed where sent, as the residual).
  // Off, every sent coordinate keeps its velocity, and ratio 1 is exactly momentum SGD on the average.
  bool momentumMasking = true;
  // topk: Deep Gradient Compression's sparsity warm-up: over the first `warmupSteps` compressed steps the ratio
  // falls exponentially from 25% to `ratio` (DGC's 75%, 93.75%, 98.4%... sparsity stages, equal in length).
  int64_t warmupSteps = 0;
  // topk: DGC's local gradient clipping, on when the optimizer clips (its clip_grad_norm, filled in by loadJob):
  // each rank clips its own mean gradient before accumulating it into the residual, to clipNorm x sqrt(ranks).
  double localClipNorm = 0;
};

// parallel.pipeline (lib/train/pipeline.h, docs/parallelism.md): the model cut into `stages` contiguous ranges of
// its top-level layers, each batch cut into `microBatches` micro-batches that flow through the stages.
struct PipelineSettings {
  int stages = 1;
  int microBatches = 1;  // default 4 x stages (GPipe's advice: M >= 4K keeps the bubble under 20%)
  enum class Schedule : uint8_t { kGpipe, k1F1B };
  Schedule schedule = Schedule::k1F1B;
  std::vector<int> balance;  // layers per stage; empty: balanced by parameters and compute (layout.h)
};

struct ParallelSettings {
  std::string strategy = "ddp";  // one of kStrategyNames
  std::string backend = "auto";  // tcp | shm | hier | nccl | auto
  double bucketMb = 25;
  double firstBucketMb = 1;      // PyTorch DDP's small first bucket: communication starts early
  // Overlap gradient all-reduce with backward (buckets on the communication thread). Unset: on when the node
  // has more cores than workers; with a core per worker there is nothing to overlap on and one synchronous
  // all-reduce of the whole arena after backward is faster (measured, see README Benchmarks).
  std::optional<bool> overlap;
  std::chrono::milliseconds timeout{std::chrono::minutes(5)};
  // How the learning rate follows the world size: "none" keeps the job's lr; "linear" multiplies it by
  // world_size / reference_world_size (Goyal et al.), so a resized elastic group keeps its effective step.
  std::string lrScaling = "none";
  int referenceWorldSize = 1;
  std::optional<CompressionSettings> compression;  // unset: the float32 averaging all-reduce
  std::optional<PsSettings> ps;                    // set when strategy is "parameter_server"
  // The rank grid data x pipeline x tensor (lib/train/layout.h). data 0: world / (stages x tensor), resolved
  // when the world size is known (resolveLayout); a world that does not divide is a ConfigError then.
  int data = 0;
  PipelineSettings pipeline;
  int tensor = 1;
  // Warnings about the parallel section that are not errors (micro_batches < stages: a large bubble), for the
  // launcher and `dtrain check` to print before workers start.
  std::vector<std::string> warnings;
};

struct CheckpointSettings {
  std::filesystem::path dir;  // resolved; empty when checkpoints are off
  int64_t everySteps = 0;     // 0: only at epoch ends (and on SIGTERM/SIGUSR1)
  int keep = 3;
  bool enabled = true;
  bool resume = true;         // load the newest valid checkpoint at start
};

struct LoggingSettings {
  bool tensorboard = false;  // "logging": {"tensorboard": true}: event files under <output dir>/tensorboard
};

struct Job {
  std::string sourceFile;           // as given, for messages
  std::string modelSource;          // where the model's fields are, for messages: sourceFile, or the model file it
                                    // names ("net.json (the model file of job.json)"); LayerSpec::path is in it
  std::filesystem::path baseDir;    // the job file's folder
  std::string name;                 // "name" or the file's stem
  nlohmann::json doc;               // the job after --set overrides (model inlined)
  std::vector<std::string> sets;    // the --set assignments applied ("train.epochs=1"), for messages
  nn::ModelSpec model;
  nn::LossSpec loss;
  nn::OptimizerSpec optimizer;
  nn::ScheduleSpec schedule;
  DataSettings data;
  LoopSettings loop;
  ParallelSettings parallel;
  CheckpointSettings checkpoint;
  LoggingSettings logging;
  std::filesystem::path initFrom;   // "init": {"from": "w.safetensors"}; empty when not given
  std::filesystem::path outputDir;  // everything the run writes goes here
  std::string modelHash;            // FNV-1a of the canonical model JSON: guards checkpoint loading
  // "device": "cpu" (default) or "cuda": each worker then computes on the GPU of its LOCAL_RANK among the visible
  // ones (the index is set by the worker; the job holds cuda:0). "tf32": cuBLAS may use TF32 tensor cores for
  // float32 GEMMs (default true; false for exact comparisons with the CPU). "precision": "fp32" (default) or
  // "bf16" (GPU only: bf16 GEMM inputs, float32 master weights, accumulation, statistics and gradient
  // all-reduces; nn::setBf16, docs/gpu.md). "attention": the CUDA causal_self_attention's kernels, "auto"
  // (default: fused where they cover the layer), "fused" or "matmul" (nn::setAttentionKernel); CPU jobs ignore it.
  Device device;
  bool tf32 = true;
  nn::AttentionKernel attention = nn::AttentionKernel::kAuto;
  enum class Precision { kFp32, kBf16 };
  Precision precision = Precision::kFp32;
};

// "device": "cuda" needs one visible GPU per local worker. Throws ConfigError naming the job file, both counts and
// CUDA_VISIBLE_DEVICES when `localWorkers` exceed `visibleGpus` (none visible included); nothing for the CPU.
void checkGpusForWorkers(const Job& job, int localWorkers, int visibleGpus);

struct JobArgs {
  std::string path;
  std::vector<std::string> sets;  // "train.epochs=1"
  std::string outputDir;          // --output-dir; empty: "output_dir" field, else runs/<name>
};

// Reads and validates the job. A ConfigError about a value a --set put there (or a field a --set replaced the
// object of) ends with "(from --set optimizer.lr=-1)"; one whose message names a field a --set changed (a
// cross-field check: "(strategy is \"ddp\")", "/parallel/strategy", "missing required field 'loss'") ends with
// "(with --set parallel.strategy=ddp)" (withSetsNamed).
Job loadJob(const JobArgs& args);

// The --set assignments behind a ConfigError message "SOURCE: /pointer: ...": "from --set a=1" for those that
// wrote at, inside or above the pointer; "with --set b=2" for those whose field the message names (its JSON
// pointer; its key quoted, 'loss'; or, within the same top-level section, its key as a word); "" for none.
std::string setsBehindError(const std::string& message, const std::string& source,
                            const std::vector<std::string>& sets);
// `e` with " (from --set ...; with --set ...)" appended when setsBehindError names any; else `e` unchanged. For
// errors found after loadJob too (dtrain check's memory and layout checks), with Job::sets.
ConfigError withSetsNamed(const ConfigError& e, const std::string& source, const std::vector<std::string>& sets);

// Optimizer steps one epoch takes when a rank holds `samplesPerRank` samples (batch size, drop_last, grad_accum).
int64_t stepsForSamples(const Job& job, int64_t samplesPerRank);

// Applies one "a.b.c=VALUE" override: VALUE is parsed as JSON when it is valid JSON (numbers, true, [1,2],
// {"k":1}, "quoted"), else taken as a string. Array elements are addressed by index (model.layers.0.out).
// Throws ConfigError naming the assignment.
void applySet(nlohmann::json& doc, const std::string& assignment, const std::string& sourceFile);

}  // namespace dtrain::train
