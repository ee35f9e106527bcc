// The trainer's side of checkpoints (lib/ckpt does the files): what a checkpoint holds, when every rank writes
// its part, and how a (re)started group resumes.
//
// A checkpoint at optimizer step S holds: model.safetensors (the parameter arena under torch.nn.Sequential's
// names), optimizer.safetensors (the optimizer's state arenas and its step count), one rank-<r>.json per rank
// (what that rank saw: the group's data position and its world), and meta.json (step, epoch, samples of the
// epoch consumed by the group, world size, model-spec hash, format version). Which rank writes and reads which
// named buffers is the strategy's CheckpointShard (lib/train/strategy.h): with data parallelism parameters and
// optimizer state are identical on every rank, so rank 0 writes them and every rank loads them. The per-rank
// files prove every rank reached the same step, and the checkpoint is committed by rank 0 only after a barrier
// (lib/ckpt's protocol).
//
// With a stateful communication hook (gradient compression: error-feedback residuals, PowerSGD's Q), every rank
// also writes comm_hook-rank-<r>.safetensors, its hook's stateBuffers(); a resume with the same world size loads
// each rank's own, another world size loads rank 0's (the hook then drops what was per rank).
//
// Exact resume: with the same world size a resumed run continues with the same batches (the sampler resumes at
// the saved position), the same parameters and optimizer state bit for bit, the same lr (a function of the
// step), and the same dropout masks (the trainer reseeds dropout from (seed, rank, step) every step), so it ends
// with bit-identical weights. With another world size the position is global: the rest of the epoch is shared
// out over the new world, no sample skipped and none repeated (padding aside).
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "lib/common/hash.h"
#include "lib/nn/model.h"
#include "lib/nn/optimizer.h"
#include "lib/train/job.h"
#include "lib/train/sparse_tables.h"
#include "lib/train/strategy.h"

namespace dtrain::train {

// The loss a progress interval had gathered when a checkpoint was saved (summed over the ranks and micro-batches:
// TrainLoop::saveCheckpoint), kept in its meta as user "log_interval" {"loss_sum", "batches", "log_every"}: a run
// resumed there with the same log_every logs its first regular line over the same steps as an uninterrupted run.
struct IntervalLoss {
  double lossSum = 0;
  int64_t batches = 0;
  int64_t logEvery = 0;  // 0: not recorded (older checkpoints)
};

struct ResumePoint {
  int64_t step = 0;
  int64_t epoch = 0;
  int64_t samplesConsumed = 0;  // of `epoch`, by the whole group
  int savedWorldSize = 1;
  // The world whose padding rule `epoch` follows (the sampler's shards): the world that started the epoch, or 0
  // once a resize made the rest of the epoch uneven. Checkpoints older than this field: savedWorldSize.
  int epochWorld = 1;
  std::filesystem::path path;
  IntervalLoss interval;
};

// The checkpoint a run of `job` would resume from, checked against the job's model without building it, so that
// the agent of `dtrain run` and `dtrain check` refuse another model's checkpoint before any rendezvous or worker
// (a worker's resume refuses it with the same message): the newest valid checkpoint of job.checkpoint.dir (as
// ckpt::findLatestValid picks it, checksums verified; skipped ones are not logged here), its model-spec hash, and
// every dense parameter of the model (nn::paramTableOf, whole-model names; sparse embedding tables live on the
// parameter servers and are not among them) present in its model files, whole or in slices of any layout, with
// the model's full shape. nullopt when the job does not resume (checkpoints or resume off, no valid checkpoint),
// or when the folder is a running job's whose retention removed the picked checkpoint three times in a row while it
// was read (the workers check it again when they resume).
// CheckpointError (exit 8) naming the checkpoint, the first tensor that differs (missing, or both shapes) and both
// spec hashes. Blocks on file I/O (reads the candidate's files once for their crc32). `skipped` (optional) gets a
// line per newer checkpoint passed over ("runs/x/checkpoints/step-000000120: corrupt (model.safetensors has 10
// bytes, ...)"), for `dtrain check` to show where a run would not resume from and why.
std::optional<ResumePoint> checkResumeCheckpoint(const Job& job, std::vector<std::string>* skipped = nullptr);

// CheckpointError (exit 8) naming the job's /init/from unless its weights file (the dense file of an index) opens
// as safetensors (header, dtypes and sizes checked, no data read) and holds every dense parameter of the job's
// model under its name with its full shape (a Hugging Face GPT-2 file, converted by name and layout when loaded,
// only has its header checked). For `dtrain check` and the agent of `dtrain run`, before any worker: each worker
// used to fail the same way, after the rendezvous, and restarts retried it. No-op without init.from.
void checkInitWeights(const Job& job);

// With checkpoints on and checkpoint.resume false: when job.checkpoint.dir already holds complete checkpoints, a
// warning that they stay beside this run's and that a later resume takes the newest step there, which may be an
// older run's (nullopt otherwise). Lists the folder without reading checksums.
std::optional<std::string> resumeOffWarning(const Job& job);

class Checkpointer {
 public:
  // `strategy` (its groups, barrier and shard) must outlive the checkpointer.
  Checkpointer(const Job& job, Strategy& strategy, std::string runTag);

  bool enabled() const { return job_.checkpoint.enabled; }
  // Finds the newest valid checkpoint (logging the ones it skips and why) and loads parameters and optimizer
  // state from it. nullopt when there is none (or resume is off). Throws CheckpointError when the newest valid
  // one was written for another model.
  std::optional<ResumePoint> resume(nn::Model& model, nn::Optimizer& optimizer);
  // Collective: every rank calls it at the same step. Returns the committed checkpoint dir.
  std::filesystem::path save(const nn::Model& model, nn::Optimizer& optimizer, int64_t step, int64_t epoch,
                             int64_t samplesConsumed, int epochWorld, const IntervalLoss& interval = {});
  // The communication hook whose state save() writes (null: none). Its stateBuffers() must be valid (bound).
  void setCommHook(CommHookPtr hook) { hook_ = std::move(hook); }
  // Loads the hook's state from the checkpoint `from` resumed (after the strategy's prepare() bound the hook).
  // Returns false, leaving the hook's fresh state, when the checkpoint holds none that fits it: written without
  // compression, with another type, or with settings that shape the state otherwise (another PowerSGD rank, top-k
  // without momentum correction); `whyFresh` (when given) then says which, for the log. A state of the right
  // shape is loaded whole (CheckpointError when its file cannot be read).
  bool loadCommHookState(const ResumePoint& from, std::string* whyFresh = nullptr);
  // The model's sparse embedding tables (null: none). save() then has the writer (the rank that writes
  // model.safetensors) ask their holders (the parameter servers) to write their own rows into the staging dir,
  // sparse-<k>-of-<S>.safetensors (sparse_shards.h: each table's rows under its parameter name "0.wte.weight" as a
  // row slice, its optimizer state as "<buffer>/<name>", its step count in the metadata "steps/<name>"); the
  // commit requires every holder's file and meta.json lists them (user.sparse_shards), so a checkpoint missing a
  // shard is never committed and one whose shard was lost or damaged later is skipped as corrupt.
  void setSparseTables(SparseTables* tables, std::vector<nn::SparseTableInfo> info) {
    sparse_ = tables, sparseInfo_ = std::move(info);
  }
  // Has the holders read the rows they hold from checkpoint `from` (one rank asks: worker 0 for the servers), from
  // its shards or an older checkpoint's sparse.safetensors. CheckpointError when the checkpoint has no sparse
  // files; CheckpointError/CommError when they lack a table or rows.
  void loadSparseTables(const ResumePoint& from);

 private:
  // The staging-dir token of `step`'s checkpoint: the same on every rank, no message needed.
  std::string token(int64_t step) const { return fnv1aHex(fmt::format("{}/{}", runTag_, step)); }

  const Job& job_;
  Strategy& strategy_;
  int rank_;
  int worldSize_;
  CommHookPtr hook_;
  SparseTables* sparse_ = nullptr;
  std::vector<nn::SparseTableInfo> sparseInfo_;
  std::string runTag_;  // makes staging-dir tokens unique per run and round, and equal on every rank
};

}  // namespace dtrain::train
