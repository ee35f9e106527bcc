// Sparse embedding tables (an `embedding` layer with "sparse": true, docs/parameter_server.md "Sparse
// embeddings"): the table is not in the model's parameter arena. Before its forward the layer asks a SparseRows
// for the rows its batch touches (deduplicated, sorted), and after its backward it hands over one coalesced
// gradient row per distinct id (the sum over the occurrences, torch's sparse gradient after coalesce()). Who holds
// the table is not the model's business: the parameter-server strategy (the servers, lib/train/ps_strategy.h) or,
// for a one-process run, a local table (lib/train/sparse_tables.h); both apply torch.optim's sparse optimizers.
// nn never sees comm: this interface is the seam.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace dtrain::nn {

// One sparse table of a model (Model::sparseTables()).
struct SparseTableInfo {
  int table = 0;       // index among the model's sparse tables (layer order)
  int layer = 0;       // the embedding layer's index in the model
  std::string name;    // its parameter name, as a dense table would have it ("0.wte.weight")
  int64_t rows = 0;    // vocab_size
  int dim = 0;         // n_embd
  double initStd = 1;  // N(0, initStd) initial rows (torch.nn.Embedding's N(0, 1) by default)
};

class SparseRows {
 public:
  virtual ~SparseRows() = default;
  // Writes the rows `ids` (distinct, ascending, each in [0, rows)) of `table` into out (ids.size() x dim floats,
  // row-major). Blocks until they are there. Errors (a lost server) are dtrain::Error subclasses.
  virtual void pull(int table, std::span<const int64_t> ids, std::span<float> out) = 0;
  // The step's gradient of `table`: one row per distinct id (ids ascending, grads ids.size() x dim). May return
  // before it is applied (the strategy's finishStep() waits); called once per optimizer step and table in training.
  virtual void push(int table, std::vector<int64_t> ids, std::vector<float> grads) = 0;
};

}  // namespace dtrain::nn
