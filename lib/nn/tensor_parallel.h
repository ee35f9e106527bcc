// Tensor (intra-layer) model parallelism, Megatron-LM style (Shoeybi et al. 2019, "Megatron-LM: Training
// Multi-Billion Parameter Language Models Using Model Parallelism", section 3).
//
// A tensor group of `size` ranks holds one model between them: each linear pair is split so that only one
// all-reduce per pair runs forward and one backward.
//   column-parallel linear A (weight rows split):  Y_i = X A_i^T + a_i   input X whole, output Y_i a slice;
//                                                   its backward all-reduces dX (Megatron's f: identity forward,
//                                                   all-reduce backward)
//   elementwise activations between them work on the slice (gelu, relu, tanh, sigmoid)
//   row-parallel linear B (weight columns split):  Z = allreduce(Y_i B_i^T) + b   (Megatron's g: all-reduce
//                                                   forward, identity backward), b whole
// causal_self_attention is split by heads: c_attn's q, k and v rows of the rank's head group (column), c_proj's
// matching columns (row). Everything else (layernorm, embedding, lm_head, dropout outside a pair, a linear
// without a partner) is replicated: every rank holds and computes it whole, and since its inputs and output
// gradients are whole and identical on every rank, so are its gradients: replicated parameters need no
// communication and stay identical under identical updates.
//
// Which layers split (planTensorParallel): in every layer list (the model's and each block's), a linear followed,
// through elementwise activations only, by another linear forms a column/row pair, scanning left to right (an
// MLP's linears alternate column, row, column, row; an odd last one stays whole); every attention layer splits by
// heads. The GPT preset thus splits attn by heads and mlp.c_fc / mlp.c_proj as a pair, one all-reduce per block
// forward and one backward, as in the paper.
//
// Parameters keep the full model's names; a rank's ParamEntry (model.h) says which slice of the full tensor it
// holds, so checkpoints and the exported model are layout-free. Initialisation draws the full model's random
// stream and keeps the rank's slice, so a sharded model starts from exactly the weights the unsplit model does.
//
// lib/nn never sees lib/comm: the trainer hands the group's all-reduce in as a TensorGroup.
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "lib/nn/spec.h"

namespace dtrain::nn {

class Model;
struct ParamEntry;

// The tensor group as the layers see it. allReduceSum blocks until every rank of the group called it with the
// same count (the Backend contract: same order on every rank) and leaves the element-wise sum in `data` on every
// rank. It is called from the thread that runs forward/backward, in layer order; it must not allocate per call
// (tests/nn/test_nn_alloc). Errors: whatever the implementation throws (comm::CommError) propagates out of
// forward/backward.
class TensorGroup {
 public:
  virtual ~TensorGroup() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual void allReduceSum(float* data, size_t count) = 0;
};

// Problems that forbid splitting `spec` over `size` ranks, one message each, naming the layer's JSON path, the
// field and both values: "/model/layers/0/out: 250 is not divisible by parallel.tensor 4 (a column-parallel
// linear splits its outputs)". Empty: the spec splits (always for size 1).
std::vector<std::string> tensorParallelProblems(const ModelSpec& spec, int size);

// The column/row pairs of the model's top-level layer list, as (column layer index, row layer index), in order.
// A pipeline stage boundary between the two would leave both whole, since pairs form inside a stage:
// train::partitionStages keeps them together unless the balance is given (then the job warns).
std::vector<std::pair<int, int>> topLevelPairs(const ModelSpec& spec);

// The rank's part of `spec` over a tensor group of `size`: split layers get TensorShard and their local shapes
// (a column linear's out / size, the following activations' and the row linear's input last dimension / size),
// so paramShapesOf() gives the rank's slices. Throws ConfigError (the first of tensorParallelProblems) when it
// does not split. size 1 returns spec unchanged.
ModelSpec shardModelSpec(const ModelSpec& spec, int size, int rank);

// Counts of a sharded model for `dtrain check` and logs: floats a rank holds (parameters) vs the whole model.
struct ShardCounts {
  int64_t local = 0;       // parameters this rank holds (sliced + replicated)
  int64_t replicated = 0;  // of which every rank of the group holds whole
  int64_t full = 0;        // the unsplit model's
};
ShardCounts shardCounts(const ModelSpec& spec, int size, int rank);

// Sum of squares of the gradients this rank contributes to the model's global L2 norm: every sliced parameter's,
// plus the replicated parameters' only when `countReplicated` (tensor rank 0), so the tensor group's sum counts
// each parameter once. `grads` is the model's gradient arena (or any arena laid out like it).
double ownedSquaredNorm(const Model& model, std::span<const float> grads, bool countReplicated);

// Copies between a full row-major tensor (entry.fullShape) and the entry's slice (entry.shape, as in the arena):
// extractSlice full -> slice, insertSlice slice -> full. A whole (unsliced) entry copies everything.
void extractSlice(const ParamEntry& entry, const float* full, float* slice);
void insertSlice(const ParamEntry& entry, const float* slice, float* full);

}  // namespace dtrain::nn
