// Validation of a job against its data, shared by `dtrain check` and the trainer.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "lib/data/dataset.h"
#include "lib/nn/loss.h"
#include "lib/train/job.h"

namespace dtrain::train {

// The data must fit the model (feature count) and the loss (label kind and shape): ConfigError naming the
// job file, the data section (`which`, e.g. "/data/train") and both shapes otherwise.
void checkDataFitsModel(const Job& job, const data::Dataset& ds, const nn::Loss& loss, const std::string& which);

// A model whose first layer is an embedding takes token ids as its input features (a recommender's user and item
// ids): every feature of every sample of `ds` (read in full, not probed) must be an integer in [0, vocab_size).
// ConfigError (exit 2) naming the job file, the data section (`which`), the sample, the feature, its value and the
// layer's vocab_size otherwise; nothing for other models and for token datasets (checkDataFitsModel checks those).
// Reads every sample once (a fetch of 4096 at a time). Without this the embedding failed mid-training with an
// internal error (exit 1), after the steps before the first bad id.
void checkEmbeddingIds(const Job& job, const data::Dataset& ds, const std::string& which);

// Text with "vocab": "char" numbers the distinct characters of its own files: a training and an eval set read from
// different files with different characters would give one id two meanings (a meaningless eval loss and bigram
// baseline). ConfigError (exit 2) naming the job file, /data/eval, both sets and a character only one of them has,
// unless both have the same character table (always so for the train/val splits of the same files). No-op for
// other data.
void checkSameVocabulary(const Job& job, const data::Dataset& train, const data::Dataset& eval);

// A byte count in the unit that suits it, one decimal: "792 B", "236.8 KiB", "6.8 MiB" (binary units).
std::string humanBytes(int64_t bytes);

// Loads the datasets, builds the model and loss, checks that they fit, and returns the report `dtrain check`
// prints: the model summary table, the data, and the run's shape (steps per epoch at the job's batch size).
std::string checkJob(const Job& job);

// What `dtrain run` (before any store or worker exists) and `dtrain check` learn about a job's data: the
// datasets read with data::ReadMode::kHeader (headers, sizes against the files, labels in full; no feature data),
// checked against the model and the loss with checkDataFitsModel. Bad magic, a truncated or lying file, a label
// count that differs from the sample count, labels out of range: ConfigError (exit 2) naming the job file, the
// data section and the file. Blocks on file I/O (milliseconds for headers; labels and CSV are read whole).
struct DataCheck {
  std::shared_ptr<const data::Dataset> train, eval;  // probed: no fetch()
  int64_t bytes = 0;  // what the datasets take in one worker's own memory once read (features + labels)
  // Features mapped read-only from the data cache (data::RawArray::shared): the node's workers share one copy.
  int64_t sharedBytes = 0;
  int64_t samples = 0;  // the larger set's samples: one rank's share at most, so the largest batch of any world
};
DataCheck checkJobData(const Job& job);

// A cosine schedule without T_max decays over the run's steps after its warm-up, so the run must be longer than
// the warm-up: ConfigError (exit 2) naming the job file, /schedule/warmup_steps (or /lr_schedule/...), the
// warm-up and `totalSteps` (described by `how`, e.g. "2 epoch(s) of 12 steps on 1 rank"). No check for other
// schedules. checkJobData runs it for one rank (the most steps any world has, so a failure there fails every
// world); the trainer for its own world.
void checkScheduleFitsRun(const Job& job, int64_t totalSteps, const std::string& how);

// What one worker of `job` needs in memory, in bytes, estimated from the spec alone (nothing is allocated). Every
// product and sum saturates at INT64_MAX instead of wrapping, so a huge job is never estimated as a small one.
//   parameters: weights + gradients + the DDP communication copy (3 x 4 bytes per parameter);
//   optimizer: state (SGD with momentum 1, Adam/AdamW 2, amsgrad 3 floats per parameter);
//   activations: per layer output + its gradient for batch_size samples, plus the input batch and what layers keep
//     for backward (nn::keptFloatsOf on the job's device: a block's inner outputs, attention's qkv and heads, and
//     on the CPU its probabilities [H, T, T], on a GPU with the fused kernels its log-sum-exp rows [H, T]) (float32;
//     with "precision": "bf16" on a GPU, 2 bytes for the values stored as bf16: nn::storesBf16Between's outputs,
//     the matmul attention's qkv and heads; and nothing for the model output's gradient where the last layer takes
//     it as bf16 and the loss gives it so, nn::takesBf16OutputGrad and nn::givesBf16Gradient: a GPT's logits'
//     gradient, written over the logits);
//   data: the training and eval sets as floats when their size is known from the spec (synthetic), else 0;
//   compression: the gradient compression hook's buffers (compressionBufferBytes) at `worldSize` ranks; with
//     "device": "cuda", top-k and PowerSGD add the pinned host copy of the gradient arena they compute on (4 bytes
//     per parameter; their state is host memory too).
struct MemoryEstimate {
  int64_t parameters = 0;
  int64_t optimizer = 0;
  int64_t activations = 0;
  int64_t data = 0;
  int64_t compression = 0;
  // The sparse tables this process holds itself, with their optimizer state: a one-process run of a
  // parameter-server job keeps every table (psServerBytes(job, 1)); 0 for a worker, whose tables are on the servers.
  int64_t sparse = 0;
  // Datasets mapped read-only from the data cache (DataCheck::sharedBytes): in every worker's address space, but
  // one copy in the node's memory, counted once per node; not in total().
  int64_t sharedData = 0;
  int64_t total() const noexcept;
  // "9.1 GiB (parameters 1.2 GiB, optimizer 0.8 GiB, activations 7.1 GiB, data 0 B)", then
  // ", compression 12 MiB" inside the parentheses when the job compresses gradients, ", sparse tables 183 MiB"
  // when the process holds sparse tables; "data 240 KiB + 54.7 MiB mapped, shared by the node's workers" with
  // sharedData.
  std::string str() const;
};
// Activations count the largest batch a rank can get: data.batch_size, or `samples` (the larger data set's size,
// one rank's share in a world of one) when smaller; without `samples`, the synthetic sets' sizes from the spec.
MemoryEstimate estimateMemory(const Job& job, int worldSize = 2, std::optional<int64_t> samples = std::nullopt);
// min(data.batch_size, samples) as estimateMemory takes it (at least 1).
int64_t largestBatchOf(const Job& job, std::optional<int64_t> samples = std::nullopt);
// The larger data set's samples when the spec says it (synthetic train and eval sets), else nullopt.
std::optional<int64_t> specSamples(const Job& job);

// MemAvailable and MemTotal of /proc/meminfo (bytes); nullopt when the file cannot be read or parsed.
struct MachineMemory {
  int64_t available = 0;
  int64_t total = 0;
  int64_t addressSpaceLimit = 0;  // this process's RLIMIT_AS (`ulimit -v`) in bytes, inherited by workers; 0: none
  // The smallest memory limit of this process's cgroups (lib/common/cgroup.h: v2 memory.max, v1
  // memory.limit_in_bytes, of its cgroup and their ancestors), in bytes, shared by this process and every worker
  // it starts; 0: none. `cgroupLimitFile` is the file it was read from.
  int64_t cgroupLimit = 0;
  std::string cgroupLimitFile;
};
// MemAvailable and MemTotal from `meminfoPath`, the process's RLIMIT_AS, and its cgroup memory limit
// (readCgroupMemoryLimit of the two files); nullopt when `meminfoPath` has no MemTotal.
std::optional<MachineMemory> readMachineMemory(const std::string& meminfoPath = "/proc/meminfo",
                                               const std::string& procCgroupPath = "/proc/self/cgroup",
                                               const std::string& mountinfoPath = "/proc/self/mountinfo");
// "cgroup /sys/fs/cgroup/x memory.max = 4.0 GiB": where MachineMemory::cgroupLimit comes from, for messages.
std::string describeCgroupLimit(const MachineMemory& machine);

// ConfigError (exit 2) when localWorkers x estimateMemory(job) exceeds the machine's available memory, naming
// the estimate and the machine's memory, e.g. "job.json: this job needs about 64 TiB per worker x 2 local
// workers = 128 TiB, but this machine has 12.3 GiB available (15.5 GiB total); reduce the model, the batch size
// or --nproc-per-node". No check when the machine's memory is unknown. Also ConfigError when one worker's estimate
// (or a parameter server's rows) exceeds MachineMemory::addressSpaceLimit (`ulimit -v`), which each worker inherits,
// and when the local workers' total exceeds MachineMemory::cgroupLimit below the available memory (the kernel's OOM
// killer ends the cgroup's processes past it), naming the file and the limit: "... = 6.0 GiB, but this process's
// cgroup may use at most 4.0 GiB (cgroup /sys/fs/cgroup/x memory.max = 4.0 GiB) ...". The limit is compared as it
// is: memory the cgroup already holds (this process, page cache) is not subtracted.
// `dataBytes`: the datasets' size when known (DataCheck::bytes), else the estimate's own (synthetic data only);
// `sharedDataBytes` (DataCheck::sharedBytes): datasets mapped from the data cache, counted once for the node's
// workers (they share the page cache's copy) and in each worker's address space for `ulimit -v`.
// `nodes` > 0 (dtrain run's agent: the launch's node count, the smallest of an elastic range): with the
// parameter-server strategy, up to ceil(servers / nodes) of the local ranks are servers, each holding its rows of
// the sparse tables with their optimizer state (psServerBytes) instead of a worker's estimate; they are counted.
// `samples`: DataCheck::samples (estimateMemory).
void checkJobFitsMemory(const Job& job, int localWorkers, const std::optional<MachineMemory>& machine,
                        std::optional<int64_t> dataBytes = std::nullopt, int nodes = 0,
                        std::optional<int64_t> samples = std::nullopt, int64_t sharedDataBytes = 0);
// Bytes one of `servers` parameter servers keeps of the job's sparse tables: its ceil(rows / servers) rows of
// each, float32, with the sparse optimizer's state (SparseAdam: 2 more, Adagrad: 1, SGD: none). 0 without tables.
int64_t psServerBytes(const Job& job, int servers);
// A one-process `dtrain train` of a parameter-server job (a world of 1) holds every sparse table itself: ConfigError
// (exit 2) when the worker's estimate plus psServerBytes(job, 1) exceeds the machine's available memory (or the
// cgroup limit, when smaller), naming the tables' share and how to split them ("launch it with dtrain run and
// parameter servers"). No check without sparse tables or when the machine's memory is unknown.
void checkOneProcessFitsMemory(const Job& job, const std::optional<MachineMemory>& machine);
// `dtrain check`'s warning when data.drop_last leaves every epoch without a step for some of the worlds the summary
// lists (1, 2 and 4 ranks, data replicas or workers): each one's share of the `samples` training samples is smaller
// than one batch (PyTorch's DistributedSampler and DataLoader with drop_last), which dtrain train refuses at start;
// nullopt otherwise. Says from which world size on, or that even one cannot take a step.
std::optional<std::string> emptyEpochWarning(const Job& job, int64_t samples);
// `dtrain check`'s lines on the sparse tables' memory ("" without tables): each table's rows x dim float32 and the
// sparse optimizer's state, what each of the job's parallel.servers servers holds (its row range of every table,
// ps::planRowRanges), and what a one-process run holds (all of it, beside a worker's `workerBytes`).
std::string describeSparseMemory(const Job& job, int64_t workerBytes);

// The folders a run writes to must be usable before any worker starts (a checkpoint folder that cannot be created
// used to fail the first checkpoint, after an epoch of training): job.outputDir and, with checkpoints on,
// job.checkpoint.dir must each be a directory the process can write, or not exist yet under a writable directory
// (nothing is created here). ConfigError (exit 2) naming the job file, the folder, where it was set and what is
// wrong ("exists and is not a directory", "not writable"). Only stats and access(2) calls.
void checkOutputDirs(const Job& job);

}  // namespace dtrain::train
