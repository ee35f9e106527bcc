// The model spec: the JSON "model" object of a job, parsed and shape-checked.
//
//   {"input": [1, 28, 28], "layers": [{"type": "conv2d", "out": 16, "kernel": 5}, {"type": "relu"},
//                                     {"type": "maxpool2d", "kernel": 2}, {"type": "flatten"},
//                                     {"type": "linear", "out": 10}]}
//
// parseModelSpec validates every field and infers every layer's per-sample input and output shape, so
// `dtrain check` reports a bad model without building it. Errors are ConfigError naming the file, the JSON
// path and both shapes, e.g.
//   job.json: /model/layers/4: linear expects input [N, F] but gets [N,16,5,5]; add a flatten layer
// The field reference is docs/model-spec.md. Shapes here are per sample (no batch dimension).
// Plain values; thread-compatible.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "lib/common/tensor.h"

namespace dtrain::nn {

// A per-sample shape has at most 5 dimensions (the model input's limit; docs/model-spec.md), so a batched one
// fits well inside dtrain::kMaxRank.
inline constexpr int kMaxSampleRank = 5;
// Limits every model obeys (docs/model-spec.md), so no size computed from a spec can overflow: a per-sample
// tensor (the input, any layer's output) has at most kMaxSampleNumel values; every integer layer field (out,
// kernel, stride, padding, in) is at most kMaxSampleNumel; a layer and the whole model have at most kMaxParams
// parameters (8 GiB as float32, before gradients and optimizer state).
inline constexpr int64_t kMaxSampleNumel = int64_t{1} << 30;
inline constexpr int64_t kMaxParams = int64_t{1} << 31;

struct LayerKind;  // lib/nn/registry.h

// How a layer of a tensor-parallel model is split over its tensor group (lib/nn/tensor_parallel.h, Megatron-LM):
// kColumn: a linear's outputs (its weight's rows, its bias); kRow: a linear's inputs (its weight's columns; the bias
// is whole, added after the all-reduce); kHeads: causal_self_attention's heads (c_attn column, c_proj row). A
// sharded spec's shapes are the rank's own (a column linear's `out` is out / size). kNone: whole on every rank.
struct TensorShard {
  enum Kind : uint8_t { kNone, kColumn, kRow, kHeads };
  Kind kind = kNone;
  int rank = 0;  // in the tensor group
  int size = 1;
};

// One layer, with the union of all layer fields (only those its type reads are meaningful).
struct LayerSpec {
  const LayerKind* kind = nullptr;  // its registry entry; set by parsing
  int index = 0;       // position in the layer list: the "k" of PyTorch's "k.weight"
  // "name": the prefix of its parameters' names instead of the index ("transformer.ln_f" -> "transformer.ln_f.weight"),
  // so a model written with names matches a PyTorch module's state_dict (the gpt preset's nanoGPT names).
  std::string name;
  std::string path;    // JSON pointer of the layer object, for errors: "/model/layers/3"
  Shape input;         // per-sample input shape
  Shape output;        // per-sample output shape

  int64_t out = 0;     // linear: out features; conv2d: out channels
  bool bias = true;    // linear, conv2d, causal_self_attention, layernorm (with affine)
  double p = 0.5;      // dropout probability; causal_self_attention: on the attention probabilities (default 0)
  std::optional<uint64_t> seed;  // dropout: fixed mask seed (else derived from the build seed)
  double eps = 1e-5;   // layernorm
  bool affine = true;  // layernorm: learnable weight and bias
  int64_t kernelH = 0, kernelW = 0, strideH = 1, strideW = 1, padH = 0, padW = 0;  // conv2d, maxpool2d
  // Transformer layers (docs/model-spec.md "Transformers"):
  int64_t vocab = 0;       // embedding, lm_head: vocabulary size
  int64_t nHead = 0;       // causal_self_attention: heads
  bool position = true;    // embedding: add a learned position embedding of input[0] rows
  bool tied = false;       // lm_head: use the first embedding's token table as its weight; embedding: a tied
                           // lm_head adds into its gradient (set by the model parser)
  int tiedTo = -1;         // lm_head: the index of the embedding it is tied to
  bool sparse = false;     // embedding: the token table lives outside the parameter arena (lib/nn/sparse_rows.h)
  // Initialisation overrides (the gpt preset's): normal(0, initStd) weights and zero biases instead of PyTorch's
  // default; projInitStd for causal_self_attention's c_proj. 0 = the layer's PyTorch default.
  double initStd = 0, projInitStd = 0;
  std::vector<LayerSpec> children;  // block: its layers, in order (index = position in the block)
  TensorShard shard;                // set by shardModelSpec (tensor_parallel.h) only

  // The prefix of this layer's parameter names: name, else the index.
  std::string paramPrefix() const { return name.empty() ? std::to_string(index) : name; }

  // The JSON "type", e.g. "maxpool2d" (empty before parsing).
  std::string_view type() const;
  // Parameter count (weights + biases) of this layer, from its registry entry's paramShapes.
  int64_t paramCount() const;
  // "784 -> 256", "1 -> 16, k5x5 s1 p0", "p=0.5": the summary's detail column.
  std::string detail() const;
};

struct ModelSpec {
  std::string source;  // the file the spec came from, for errors (may be empty)
  std::string path;    // JSON pointer of the model object ("/model")
  Shape input;         // per-sample input shape
  std::vector<LayerSpec> layers;

  Shape output() const { return layers.empty() ? input : layers.back().output; }
  int64_t paramCount() const;
};

// Parses and shape-checks a model object. sourceFile and jsonPathPrefix only label errors.
// Throws ConfigError (exit code 2) on any invalid field or shape mismatch.
ModelSpec parseModelSpec(const nlohmann::json& model, const std::string& sourceFile,
                         const std::string& jsonPathPrefix = "/model");

// Parses one layer object at `path` whose per-sample input is `input` (the "name" field is handled here, the rest
// by its registry entry). For containers (block) parsing their children.
LayerSpec parseLayerSpec(const nlohmann::json& layer, const std::string& sourceFile, const std::string& path, int index,
                         const Shape& input);

// The layers of {"preset": "gpt", ...} (lib/nn/gpt_preset.cpp) as a plain model object {"input", "layers"}.
// Throws ConfigError naming the preset's field (n_embd not divisible by n_head, ...).
nlohmann::json expandGptPreset(const nlohmann::json& model, const std::string& sourceFile,
                               const std::string& jsonPathPrefix);

// Reads a model file (a JSON object as above, or a job file whose "model" is an object) and parses it.
// Missing file or bad JSON -> ConfigError naming the file.
ModelSpec loadModelSpec(const std::filesystem::path& file);

// One row of a model summary, as `dtrain check` prints it.
struct SummaryRow {
  int index = 0;
  std::string type;
  std::string detail;
  Shape output;  // per sample
  int64_t params = 0;
};

std::vector<SummaryRow> summarize(const ModelSpec& spec);
// A printable table of summarize(spec) with a header, an input row and a total line.
std::string formatSummary(const ModelSpec& spec);

}  // namespace dtrain::nn
