#include "lib/nn/tensor_parallel.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "lib/common/error.h"
#include "lib/common/json_fields.h"
#include "lib/nn/model.h"
#include "lib/nn/registry.h"

namespace dtrain::nn {
namespace {

// Activations that act element by element, so they may run on a column-parallel linear's slice of outputs.
bool elementwise(const LayerSpec& l) {
  const auto t = l.type();
  return t == "relu" || t == "gelu" || t == "tanh" || t == "sigmoid";
}

std::string where(const LayerSpec& l) {
  return l.name.empty() ? l.path : fmt::format("{} ({})", l.path, l.name);
}

// Walks one layer list (the model's or a block's), marking the pairs and attention layers as planned (header).
// `visit(layer, kind, pairEnd)` is called for each split layer: kColumn with the index of its row partner.
template <class Visit>
void plan(std::vector<LayerSpec>& layers, Visit&& visit) {
  for (size_t i = 0; i < layers.size(); ++i) {
    LayerSpec& l = layers[i];
    if (l.type() == "block") {
      plan(l.children, visit);
    } else if (l.type() == "causal_self_attention") {
      visit(layers, i, TensorShard::kHeads, i);
    } else if (l.type() == "linear") {
      size_t j = i + 1;
      while (j < layers.size() && elementwise(layers[j])) ++j;
      if (j < layers.size() && layers[j].type() == "linear") {
        visit(layers, i, TensorShard::kColumn, j);
        i = j;
      }
    }
  }
}

}  // namespace

std::vector<std::string> tensorParallelProblems(const ModelSpec& spec, int size) {
  std::vector<std::string> problems;
  if (size <= 1) return problems;
  ModelSpec copy = spec;
  plan(copy.layers, [&](std::vector<LayerSpec>& layers, size_t i, TensorShard::Kind kind, size_t) {
    const LayerSpec& l = layers[i];
    if (kind == TensorShard::kHeads && l.nHead % size != 0)
      problems.push_back(fmt::format("{}/n_head: {} heads are not divisible by parallel.tensor {} (attention is "
                                     "split by heads)",
                                     where(l), l.nHead, size));
    if (kind == TensorShard::kColumn && l.out % size != 0)
      problems.push_back(fmt::format("{}/out: {} is not divisible by parallel.tensor {} (a column-parallel linear "
                                     "splits its {} outputs)",
                                     where(l), l.out, size, l.out));
  });
  return problems;
}

std::vector<std::pair<int, int>> topLevelPairs(const ModelSpec& spec) {
  std::vector<std::pair<int, int>> pairs;
  ModelSpec copy = spec;
  plan(copy.layers, [&](std::vector<LayerSpec>& layers, size_t i, TensorShard::Kind kind, size_t end) {
    if (&layers == &copy.layers && kind == TensorShard::kColumn)
      pairs.emplace_back(static_cast<int>(i), static_cast<int>(end));
  });
  return pairs;
}

ModelSpec shardModelSpec(const ModelSpec& spec, int size, int rank) {
  DTRAIN_CHECK(size >= 1 && rank >= 0 && rank < size, "tensor rank {} outside a group of {}", rank, size);
  if (size == 1) return spec;
  if (auto problems = tensorParallelProblems(spec, size); !problems.empty())
    throwConfig(spec.source, "", problems.front());
  ModelSpec out = spec;
  const TensorShard base{.kind = TensorShard::kNone, .rank = rank, .size = size};
  plan(out.layers, [&](std::vector<LayerSpec>& layers, size_t i, TensorShard::Kind kind, size_t end) {
    if (kind == TensorShard::kHeads) {
      layers[i].shard = base;
      layers[i].shard.kind = kind;
      return;
    }
    LayerSpec& col = layers[i];
    col.shard = base;
    col.shard.kind = TensorShard::kColumn;
    col.out /= size;
    col.output[col.output.rank() - 1] = col.out;
    for (size_t k = i + 1; k < end; ++k) layers[k].input = layers[k].output = col.output;
    LayerSpec& row = layers[end];
    row.shard = base;
    row.shard.kind = TensorShard::kRow;
    row.input = col.output;
  });
  return out;
}

ShardCounts shardCounts(const ModelSpec& spec, int size, int rank) {
  ShardCounts c;
  c.full = spec.paramCount();
  const ModelSpec local = shardModelSpec(spec, size, rank);
  for (const auto& l : local.layers)
    for (const auto& p : paramShapesOf(l)) {
      c.local += p.shape.numel();
      if (p.dim < 0) c.replicated += p.shape.numel();
    }
  return c;
}

double ownedSquaredNorm(const Model& model, std::span<const float> grads, bool countReplicated) {
  DTRAIN_CHECK(grads.size() == model.numParams(), "gradient arena of {} floats for a model of {}", grads.size(),
               model.numParams());
  double sum = 0.0;
  for (const auto& e : model.paramTable()) {
    if (!e.sliced() && !countReplicated) continue;
    for (size_t i = e.offset; i < e.offset + e.count; ++i) sum += static_cast<double>(grads[i]) * grads[i];
  }
  return sum;
}

namespace {

// Visits the slice's contiguous runs: fn(offset in the full tensor, offset in the slice, floats).
template <class Fn>
void forEachRun(const ParamEntry& e, Fn&& fn) {
  if (!e.sliced()) return fn(size_t{0}, size_t{0}, e.count);
  size_t outer = 1, inner = 1;
  for (int d = 0; d < e.sliceDim; ++d) outer *= static_cast<size_t>(e.fullShape[d]);
  for (int d = e.sliceDim + 1; d < e.fullShape.rank(); ++d) inner *= static_cast<size_t>(e.fullShape[d]);
  const auto len = static_cast<size_t>(e.shape[e.sliceDim]), fullLen = static_cast<size_t>(e.fullShape[e.sliceDim]);
  for (size_t o = 0; o < outer; ++o)
    fn((o * fullLen + static_cast<size_t>(e.sliceStart)) * inner, o * len * inner, len * inner);
}

}  // namespace

void extractSlice(const ParamEntry& e, const float* full, float* slice) {
  forEachRun(e, [&](size_t f, size_t s, size_t n) { std::copy(full + f, full + f + n, slice + s); });
}

void insertSlice(const ParamEntry& e, const float* slice, float* full) {
  forEachRun(e, [&](size_t f, size_t s, size_t n) { std::copy(slice + s, slice + s + n, full + f); });
}

}  // namespace dtrain::nn
