// The holders of sparse embedding tables (an `embedding` with "sparse": true; lib/nn/sparse_rows.h,
// docs/parameter_server.md "Sparse embeddings"): the parameter servers (PsSparseTables, through ps::Client) or,
// for a one-process run of a parameter-server job, this process (LocalSparseTables). Both apply torch.optim's sparse
// optimizers (ps_sparse.h) with the job's optimizer mapped by sparseOptimizerFor: sgd -> SGD on a sparse
// gradient, adam/adamw -> SparseAdam; anything torch cannot do with sparse gradients (momentum, weight decay,
// amsgrad) is a ConfigError naming /optimizer.
//
// Checkpoints and the exported model (lib/train/checkpointing.h, sparse_shards.h): each holder writes its own rows
// of every table into the checkpoint (saveShards) or beside model.safetensors (exportShards), and on a resume reads
// the rows it now holds from whichever files cover them (loadShards), so the tables are restored whatever the
// number of servers was (resharding is the row ranges of the new plan) and no process ever holds a whole table.
// readTable/writeTable move a whole table through the calling process (tests, small tables).
// Threading: the trainer's thread only.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "lib/nn/model.h"
#include "lib/nn/sparse_rows.h"
#include "lib/train/job.h"
#include "lib/train/ps_client.h"
#include "lib/train/ps_server.h"
#include "lib/train/sparse_shards.h"

namespace dtrain::train {

// The servers' (or the local) options of every sparse table of the job's model, in layer order: rows, dim,
// initStd, the sparse optimizer mapped from the job's (ConfigError naming /optimizer when it has no sparse variant)
// and a seed per table from (train.seed, layer index).
std::vector<ps::SparseTableOptions> sparseTableOptions(const Job& job);
// The names of a sparse optimizer's state buffers (SparseShard::stateBuffers order): none, "sum", or
// "exp_avg", "exp_avg_sq".
std::vector<std::string> sparseStateNames(ps::SparseOptimizerType type);

// A whole table with its optimizer state, for checkpoints.
struct SparseTableState {
  int64_t steps = 0;                      // optimizer steps the table took (torch's state['step'])
  std::vector<float> values;              // rows x dim
  std::vector<std::vector<float>> state;  // per sparseStateNames(), rows x dim each
};

class SparseTables : public nn::SparseRows {
 public:
  explicit SparseTables(std::vector<ps::SparseTableOptions> tables)
      : tables_(std::move(tables)), pending_(tables_.size()) {}
  const std::vector<ps::SparseTableOptions>& tables() const { return tables_; }
  // The step the next pulls and pushes belong to, and its learning rate (before each optimizer step).
  void beginStep(int64_t step, double lr);
  // grad_accum > 1: before each micro-batch's backward, whether it is the step's last. The pushes of the ones before
  // are summed here per table and row (accumulateRowGrads); the last one's push sends the step's sum, so a step
  // pushes once per table, the gradient of the whole step's batch (the micro-batches' losses are already scaled by
  // 1/grad_accum). Default: every push is a step's last.
  void setLastMicroBatch(bool last) { lastMicro_ = last; }
  // The step's last micro-batch had no rows (an empty batch of an uneven shard): pushes what the earlier ones summed,
  // or no rows, for every table not pushed yet this step (a sync step needs every worker's push).
  void flushStep();
  // nn::SparseRows: sums or sends (above).
  void push(int table, std::vector<int64_t> ids, std::vector<float> grads) final;
  // Blocking: the whole table `table` (every server's rows) with its optimizer state.
  virtual SparseTableState readTable(int table) = 0;
  // Blocking: restores the whole table (values and state as readTable gives them) at training step `step`.
  virtual void writeTable(int table, int64_t step, const SparseTableState& state) = 0;
  // Blocking: every holder writes its rows of every table, with their optimizer state, into the checkpoint staging
  // dir of (root, step, token) (lib/ckpt's protocol). Returns the files' names, which the commit must find.
  virtual std::vector<std::string> saveShards(const std::filesystem::path& root, int64_t step,
                                              const std::string& token) = 0;
  // Blocking: every holder writes its rows (values only) as dir/model-<k>-of-<N>.safetensors. Returns N.
  virtual int exportShards(const std::filesystem::path& dir) = 0;
  // Blocking: every holder reads the rows it holds from `files` (pieces of the tables under any split), with the
  // optimizer state and step counts when `withState` (a resume) or fresh (init.from); the tables are at training
  // step `step`. CheckpointError/CommError when the files do not cover the rows.
  virtual void loadShards(const std::vector<std::filesystem::path>& files, bool withState, int64_t step) = 0;

 protected:
  virtual void startStep(int64_t step, double lr) = 0;
  // One push of the step's gradient rows of `table` (ids ascending, distinct).
  virtual void pushRows(int table, std::vector<int64_t> ids, std::vector<float> grads) = 0;

  std::vector<ps::SparseTableOptions> tables_;

 private:
  struct Pending {
    std::vector<int64_t> ids;
    std::vector<float> grads;
    bool pushed = false;  // this step
  };
  std::vector<Pending> pending_;
  bool lastMicro_ = true;
};

// The tables in this process (a one-process run): every push is applied at once.
class LocalSparseTables final : public SparseTables {
 public:
  explicit LocalSparseTables(std::vector<ps::SparseTableOptions> tables);
  void pull(int table, std::span<const int64_t> ids, std::span<float> out) override;
  void startStep(int64_t step, double lr) override { lr_ = lr, (void)step; }
  void pushRows(int table, std::vector<int64_t> ids, std::vector<float> grads) override;
  SparseTableState readTable(int table) override;
  void writeTable(int table, int64_t step, const SparseTableState& state) override;
  std::vector<std::string> saveShards(const std::filesystem::path& root, int64_t step,
                                      const std::string& token) override;
  int exportShards(const std::filesystem::path& dir) override;
  void loadShards(const std::vector<std::filesystem::path>& files, bool withState, int64_t step) override;

 private:
  std::vector<HeldTable> held() const;

  std::vector<std::unique_ptr<ps::SparseShard>> shards_;
  double lr_ = 0;
};

// The tables on the parameter servers, through the worker's client: a pull asks each server for its run of the
// sorted ids (in parallel, one request per server) and waits; a push queues one request per server (every server,
// also with no rows, so that a sync step completes), which the strategy's finishStep() waits for.
class PsSparseTables final : public SparseTables {
 public:
  PsSparseTables(std::vector<ps::SparseTableOptions> tables, ps::Client& client, int servers, int64_t startStep);
  void pull(int table, std::span<const int64_t> ids, std::span<float> out) override;
  void startStep(int64_t step, double lr) override { step_ = step, lr_ = lr; }
  void pushRows(int table, std::vector<int64_t> ids, std::vector<float> grads) override;
  SparseTableState readTable(int table) override;
  void writeTable(int table, int64_t step, const SparseTableState& state) override;
  std::vector<std::string> saveShards(const std::filesystem::path& root, int64_t step,
                                      const std::string& token) override;
  int exportShards(const std::filesystem::path& dir) override;
  void loadShards(const std::vector<std::filesystem::path>& files, bool withState, int64_t step) override;

 private:
  // Index of the first id of each server's run ([server], plus the end): ids are sorted, ranges contiguous.
  std::vector<size_t> runs(int table, std::span<const int64_t> ids) const;
  // Rows per fetch/init request: a window of at most kMaxPartitionFloats floats per buffer.
  int64_t windowRows(int table) const;

  ps::Client& client_;
  int servers_;
  std::vector<std::vector<ps::RowRange>> plans_;  // per table: each server's rows
  int64_t step_ = 0;
  double lr_ = 0;
};

// The exported model's sparse tables (rank 0 at the end, after model.safetensors): every holder writes its rows as
// dir/model-<k>-of-<N>.safetensors, then model.safetensors.index.json lists the dense parameters (weight_map) and
// the tables' row shards (sparse_shards.h); model-*-of-*.safetensors files of an earlier export with another
// holder count are removed. Blocking; CommError/CheckpointError.
void exportSparseModel(SparseTables& tables, const nn::Model& model, const std::filesystem::path& dir);

}  // namespace dtrain::train
