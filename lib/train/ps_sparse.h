// Sparse embedding tables on the parameter servers (issue 13, docs/parameter_server.md "Sparse embeddings"): the
// row partitioning of a table over the servers, the worker's id deduplication and gradient coalescing, and one
// server's shard of a table with the sparse optimizers of torch.optim (PyTorch 1.13, single-tensor path).
//
// Layout: a table is `rows` x `dim` float32, row-major. planRowRanges() cuts it into one contiguous row range per
// server (sizes differ by at most one row, server k holds range k), so the whole table never lives in one process.
//
// A step on a worker (the layer integration is not on main yet): dedupIds() the batch's ids (sorted unique ids and,
// per occurrence, its slot), pull those rows from their servers, run forward/backward, coalesceRowGrads() the
// per-occurrence gradient rows into one gradient row per unique id (the sum, as torch's sparse coalesce()), and
// push them; the server's SparseShard::apply() updates only those rows.
//
// Sparse optimizers (the update of every touched row; untouched rows and their state never change):
//  - kSgd: torch.optim.SGD with a sparse gradient and momentum 0: p -= lr * g.
//  - kAdagrad: torch.optim.Adagrad with a sparse gradient: sum += g^2; p -= clr * g / (sqrt(sum) + eps),
//    clr = lr / (1 + (step - 1) * lr_decay), defaults eps 1e-10, lr_decay 0, initial accumulator 0.
//  - kAdam: torch.optim.SparseAdam: m += (1 - b1)(g - m), v += (1 - b2)(g^2 - v) for the touched rows only;
//    p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps).
// The step count t is the shard's (one per apply(), touched or not, as torch's per-parameter state['step']).
// Weight decay and momentum are not defined for sparse gradients in torch (it raises); sparseOptimizerFor() rejects
// them with a ConfigError.
// Thread-safety: none; the server serialises calls under its mutex.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "lib/nn/optimizer.h"

namespace dtrain::train::ps {

struct RowRange {
  int64_t begin = 0;  // first row
  int64_t end = 0;    // one past the last row
  int server = 0;
  int64_t rows() const { return end - begin; }
};

// One range per server in server order (a server gets an empty range when rows < servers).
std::vector<RowRange> planRowRanges(int64_t rows, int servers);
// The server holding `row` (Error when out of [0, rows)).
int rowServer(const std::vector<RowRange>& plan, int64_t row);

// The batch's distinct ids, sorted, and for each occurrence i the index of ids[i] in `ids` (its slot).
struct UniqueIds {
  std::vector<int64_t> ids;
  std::vector<uint32_t> slot;
};
// Error naming the id when one is outside [0, rows).
UniqueIds dedupIds(std::span<const int64_t> ids, int64_t rows);
// Sums the per-occurrence gradient rows (occurrences x dim) into one row per unique id (ids.size() x dim).
std::vector<float> coalesceRowGrads(const UniqueIds& unique, std::span<const float> occurrenceGrads, int dim);

// Adds one coalesced row gradient (`moreIds` distinct and ascending, moreGrads moreIds.size() x dim) into a running
// sum (`ids` distinct and ascending, grads ids.size() x dim), keeping it sorted: the rows of both, a row in both
// summed. The micro-batches of a step with grad_accum > 1 are summed so (torch's sparse gradient accumulation).
void accumulateRowGrads(std::vector<int64_t>& ids, std::vector<float>& grads, std::span<const int64_t> moreIds,
                        std::span<const float> moreGrads, int dim);

enum class SparseOptimizerType { kSgd, kAdagrad, kAdam };
const char* sparseOptimizerName(SparseOptimizerType type);

struct SparseOptimizerSpec {
  SparseOptimizerType type = SparseOptimizerType::kSgd;
  double lr = 1e-2;
  double beta1 = 0.9;   // kAdam
  double beta2 = 0.999; // kAdam
  double eps = 1e-8;    // kAdam; kAdagrad's default is 1e-10
  double lrDecay = 0;   // kAdagrad
  double initialAccumulator = 0;  // kAdagrad
};

// The sparse counterpart of the job's optimizer: sgd -> kSgd, adam/adamw -> kAdam (SparseAdam), adagrad -> kAdagrad
// (its lr, eps, lr_decay, initial_accumulator_value); `adagrad` true forces kAdagrad with the job's lr and
// Adagrad's eps 1e-10. ConfigError for momentum, weight decay (adamw's default 0.01 included) or amsgrad, which
// torch does not support with sparse gradients, naming the field under `where` (the optimizer object, "job.json:
// /optimizer": "job.json: /optimizer/momentum: 0.9 with sparse embeddings<context> (expected 0: ...)");
// `context` says which table (" (for the sparse table of /model/layers/0)").
SparseOptimizerSpec sparseOptimizerFor(const nn::OptimizerSpec& job, bool adagrad, const std::string& where,
                                       const std::string& context = "");

// One server's rows of one table with their optimizer state.
class SparseShard {
 public:
  // Rows start as N(0, initStd) drawn per (seed, row, column), so a table's values do not depend on how it is
  // partitioned; initStd 1 is torch.nn.Embedding's default.
  SparseShard(RowRange range, int dim, SparseOptimizerSpec spec, double initStd, uint64_t seed);

  const RowRange& range() const { return range_; }
  int dim() const { return dim_; }
  int64_t steps() const { return steps_; }
  void setSteps(int64_t steps) { steps_ = steps; }

  // Copies the rows `ids` (table row numbers inside range()) into out (ids.size() x dim). Error when outside.
  void pull(std::span<const int64_t> ids, std::span<float> out) const;
  // One optimizer step: `grads` (ids.size() x dim) for the distinct rows `ids`, at learning rate `lr`. Error on a
  // repeated id, an id outside range() or a size mismatch (nothing is applied then).
  void apply(std::span<const int64_t> ids, std::span<const float> grads, double lr);

  // The shard's rows (range().rows() x dim) and its state buffers ("sum" for kAdagrad; "exp_avg", "exp_avg_sq" for
  // kAdam; none for kSgd), for checkpoints: write into the spans to restore.
  std::span<float> values() { return values_; }
  std::vector<nn::StateBuffer> stateBuffers();

 private:
  void check(std::span<const int64_t> ids, size_t floats, const char* what) const;

  RowRange range_;
  int dim_;
  SparseOptimizerSpec spec_;
  int64_t steps_ = 0;
  std::vector<float> values_;
  std::vector<float> state0_;  // kAdagrad: sum; kAdam: exp_avg
  std::vector<float> state1_;  // kAdam: exp_avg_sq
};

}  // namespace dtrain::train::ps
