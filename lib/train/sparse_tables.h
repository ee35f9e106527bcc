// The holders of sparse embedding tables (an `embedding` with "sparse": true; lib/nn/sparse_rows.h,
// docs/parameter_server.md "Sparse embeddings"): the parameter servers (PsSparseTables, through ps::Client) or,
// for a one-process run of a parameter-server job, this process (LocalSparseTables). Both apply torch.optim's sparse
// optimizers (ps_sparse.h) with the job's optimizer mapped by sparseOptimizerFor: sgd -> SGD on a sparse
// gradient, adam/adamw -> SparseAdam; anything torch cannot do with sparse gradients (momentum, weight decay,
// amsgrad) is a ConfigError naming /optimizer.
//
// Checkpoints (lib/train/checkpointing.h): the writer reads every table whole (readTable, window by window from
// each server) and writes it beside the dense parameters; a resume writes it back (writeTable), so the servers'
// shards are restored whatever the number of servers was (resharding is the row ranges of the new plan).
// Threading: the trainer's thread only.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "lib/nn/model.h"
#include "lib/nn/sparse_rows.h"
#include "lib/train/job.h"
#include "lib/train/ps_client.h"
#include "lib/train/ps_server.h"

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
  explicit SparseTables(std::vector<ps::SparseTableOptions> tables) : tables_(std::move(tables)) {}
  const std::vector<ps::SparseTableOptions>& tables() const { return tables_; }
  // The step the next pulls and pushes belong to, and its learning rate (before each optimizer step).
  virtual void beginStep(int64_t step, double lr) = 0;
  // Blocking: the whole table `table` (every server's rows) with its optimizer state.
  virtual SparseTableState readTable(int table) = 0;
  // Blocking: restores the whole table (values and state as readTable gives them) at training step `step`.
  virtual void writeTable(int table, int64_t step, const SparseTableState& state) = 0;

 protected:
  std::vector<ps::SparseTableOptions> tables_;
};

// The tables in this process (a one-process run): every push is applied at once.
class LocalSparseTables final : public SparseTables {
 public:
  explicit LocalSparseTables(std::vector<ps::SparseTableOptions> tables);
  void pull(int table, std::span<const int64_t> ids, std::span<float> out) override;
  void push(int table, std::vector<int64_t> ids, std::vector<float> grads) override;
  void beginStep(int64_t step, double lr) override { lr_ = lr, (void)step; }
  SparseTableState readTable(int table) override;
  void writeTable(int table, int64_t step, const SparseTableState& state) override;

 private:
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
  void push(int table, std::vector<int64_t> ids, std::vector<float> grads) override;
  void beginStep(int64_t step, double lr) override { step_ = step, lr_ = lr; }
  SparseTableState readTable(int table) override;
  void writeTable(int table, int64_t step, const SparseTableState& state) override;

 private:
  // Index of the first id of each server's run ([server], plus the end): ids are sorted, ranges contiguous.
  std::vector<size_t> runs(int table, std::span<const int64_t> ids) const;
  // Rows per fetch/init request: a window of at most kMaxPartitionFloats floats per buffer.
  int64_t windowRows(int table) const;

  ps::Client& client_;
  std::vector<std::vector<ps::RowRange>> plans_;  // per table: each server's rows
  int64_t step_ = 0;
  double lr_ = 0;
};

}  // namespace dtrain::train
