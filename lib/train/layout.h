// The rank layout of model parallelism: a job's ranks form a grid data x pipeline x tensor (docs/parallelism.md).
//
//   rank = (data * stages + stage) * tensor + tensorRank          (tensor fastest, then stage, then data)
//
// Tensor fastest: the ranks of one tensor-parallel group are consecutive, so with contiguous ranks per node
// (the launcher's rule) a tensor group stays inside a node and talks over shared memory, where its per-layer
// all-reduces belong. Stages of one replica come next (neighbours exchange activations), and the data-parallel
// replicas of one (stage, tensor) shard are `stages x tensor` ranks apart: the DDP all-reduce is once per step.
// This is Megatron-LM's order (tensor, then pipeline, then data) and torch's DeviceMesh ["dp", "pp", "tp"].
//
// Stages are contiguous ranges of the model's top-level layers (the gpt preset: embedding, two blocks per
// transformer layer, ln_f, lm_head). partitionStages() takes the job's "balance" (layers per stage), or balances
// automatically: it minimises the largest stage cost, a layer's cost being its parameters plus, for a tied
// lm_head, the size of the table it multiplies by (its compute), plus 1 so that no layer is free; among equal
// cuts it prefers later ones, so a parameterless layer (relu, gelu) stays with the layer before it. Under tensor
// parallelism it keeps each column/row linear pair in one stage (pairs form inside a stage).
//
// Plain functions over plain values: thread-compatible. Errors: ConfigError naming the job file and field.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "lib/nn/spec.h"
#include "lib/train/job.h"

namespace dtrain::train {

struct LayoutDims {
  int data = 1;
  int stages = 1;
  int tensor = 1;
  int world() const { return data * stages * tensor; }
  bool modelParallel() const { return stages > 1 || tensor > 1; }
};

// Where one rank sits in the grid.
struct RankCoords {
  int data = 0;
  int stage = 0;
  int tensor = 0;
};

// The grid for `worldSize` ranks: parallel.data when given (then data x stages x tensor must equal the world),
// else world / (stages x tensor). ConfigError naming `source`, the degrees and the world when it does not divide:
//   job.json: /parallel: a world of 6 ranks is not divisible by pipeline stages 4 x tensor 1 = 4 ...
LayoutDims resolveLayout(const ParallelSettings& parallel, int worldSize, const std::string& source);

// An elastic launch (--nnodes MIN:MAX, `nprocPerNode` ranks per node, `psServers` of the world serving): of the
// node counts the rendezvous may form, how many were checked (MIN to at most MIN + 4096, and none whose world
// passes INT_MAX, so the work is bounded whatever MAX says) and, in order, each unusable one with the reason its
// world cannot run the job: resolveLayout's ConfigError message, or no rank left to train beside the parameter
// servers. Pure; throws nothing.
struct NodeCountCheck {
  int checked = 0;
  std::vector<std::pair<int, std::string>> unusable;
};
NodeCountCheck unusableNodeCounts(const ParallelSettings& parallel, int minNodes, int maxNodes, int nprocPerNode,
                                  int psServers, const std::string& source);

RankCoords coordsOf(const LayoutDims& dims, int rank);
int rankOf(const LayoutDims& dims, const RankCoords& coords);

// The world ranks of this rank's groups, in group-rank order (so a group rank equals the coordinate):
// data: same stage and tensor, by data index; pipeline: same data and tensor, by stage; tensor: same data and
// stage, by tensor index.
std::vector<int> dataGroupRanks(const LayoutDims& dims, int rank);
std::vector<int> pipelineGroupRanks(const LayoutDims& dims, int rank);
std::vector<int> tensorGroupRanks(const LayoutDims& dims, int rank);

// One pipeline stage: the top-level layers [first, last) of the model.
struct StageRange {
  int first = 0;
  int last = 0;
  int64_t params = 0;  // parameters of those layers (a tied lm_head's table is counted where it is owned)
  int numLayers() const { return last - first; }
};

// The cost partitionStages balances, per top-level layer (see above).
std::vector<int64_t> layerCosts(const nn::ModelSpec& model);
// `stages` contiguous ranges covering every layer, from `balance` (layers per stage) when given, else balanced.
// With `tensor` > 1 the automatic balance never cuts between the two linears of a column/row pair
// (nn::topLevelPairs: a pair split over two stages would stay whole), unless no such cut into `stages` exists;
// stagesSplittingPairs() names the pairs a given balance (or that fallback) splits, for the job's warning.
// ConfigError (naming `source` and /parallel/pipeline) when stages > layers or the balance does not sum;
// job_parallel.cpp checks both first, with the same messages.
std::vector<StageRange> partitionStages(const nn::ModelSpec& model, int stages, const std::vector<int>& balance,
                                        const std::string& source = "", int tensor = 1);

// The top-level column/row pairs (column index, row index) whose two layers `stages` puts in different stages.
std::vector<std::pair<int, int>> stagesSplittingPairs(const nn::ModelSpec& model, const std::vector<StageRange>& stages);

// The model spec of one stage: its top-level layers (indices and names unchanged), its input the first one's.
nn::ModelSpec stageSpec(const nn::ModelSpec& model, const StageRange& stage);

// The parameters the fullest rank holds under the job's pipeline stages and tensor degree (the whole model's
// without model parallelism): what a worker's memory is sized by.
int64_t largestRankParams(const Job& job);

// What `dtrain check --world N` prints: the grid, the stages and, per rank, its coordinates, layers, parameter
// count (its tensor-parallel slices plus the replicated parameters: lib/nn/tensor_parallel.h), the memory those
// take with their gradients and optimizer state, and that share of the whole model's. ConfigError when the world does not divide (resolveLayout).
std::string describeLayout(const Job& job, int worldSize);

}  // namespace dtrain::train
