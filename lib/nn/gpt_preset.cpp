// {"preset": "gpt", ...}: nanoGPT's GPT (model.py, Karpathy) written with the registry's layers, so that
// `dtrain check` shows it layer by layer and every parameter carries nanoGPT's name:
//
//   embedding "transformer"            wte [V, C], wpe [T, C]           (+ dropout when > 0)
//   per layer i:
//     block "transformer.h.i"          x + attn(ln_1(x))                 ln_1, attn.c_attn [3C, C], attn.c_proj [C, C]
//     block "transformer.h.i"          x + mlp(ln_2(x))                  ln_2, mlp.c_fc [4C, C], gelu, mlp.c_proj [C, 4C]
//   layernorm "transformer.ln_f"
//   lm_head tied to wte                logits [T, V]
//
// Initialisation is nanoGPT's: normal(0, 0.02) for every Linear and Embedding weight, 0.02 / sqrt(2 n_layer) for
// the residual projections (c_proj), zero biases, LayerNorm weight 1 and bias 0. Dropout (when > 0) follows the
// embedding, ends each residual branch (nanoGPT's resid_dropout and mlp dropout) and applies to the attention
// probabilities (attn_dropout, inside causal_self_attention). "bias": false drops every Linear's and LayerNorm's
// bias, as nanoGPT's bias=False.
#include <fmt/format.h>

#include <cmath>

#include "lib/common/json_fields.h"
#include "lib/nn/spec.h"

namespace dtrain::nn {

namespace {
// n_layer's limit (docs/model-spec.md): GPT-3 175B has 96 layers; 100000 used to expand and build for minutes
// before a memory check could refuse it.
constexpr int64_t kMaxGptLayers = 1024;
}  // namespace

nlohmann::json expandGptPreset(const nlohmann::json& model, const std::string& sourceFile,
                               const std::string& jsonPathPrefix) {
  using nlohmann::json;
  JsonFields f(model, sourceFile, jsonPathPrefix, "the model");
  f.allowOnly({"preset", "name", "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias"});
  f.choice("preset", {"gpt"}, "model preset");
  auto positiveInt = [&](std::string_view key, int64_t fallback) {
    int64_t v = f.integer(key, fallback, "an integer >= 1", [](int64_t x) { return x >= 1; });
    if (v > kMaxSampleNumel) f.failAt(key, fmt::format("{} is more than the supported {}", v, kMaxSampleNumel));
    return v;
  };
  // nanoGPT's GPTConfig defaults.
  const int64_t vocab = positiveInt("vocab_size", 50304);
  const int64_t block = positiveInt("block_size", 1024);
  const int64_t layers = positiveInt("n_layer", 12);
  const int64_t heads = positiveInt("n_head", 12);
  const int64_t embd = positiveInt("n_embd", 768);
  const double dropout = f.number("dropout", 0.0, "a probability in [0, 1)", [](double v) { return v >= 0 && v < 1; });
  const bool bias = f.boolean("bias", true);
  if (layers > kMaxGptLayers)
    f.failAt("n_layer", fmt::format("{} is more than the supported {} layers", layers, kMaxGptLayers));
  if (embd % heads != 0)
    f.failAt("n_head", fmt::format("n_embd {} is not divisible by n_head {} (each head takes n_embd / n_head columns)",
                                   embd, heads));
  if (f.has("name")) (void)f.string("name");
  // The limits every model obeys (docs/model-spec.md "Limits"), checked here against the fields the user wrote:
  // checked on the expanded layers, they named a layer the user never wrote (/model/layers/1/layers/2). Every
  // value is at most kMaxSampleNumel (2^30), so each product below fits in an int64.
  const int64_t mlpParams = 4 * embd * embd + (bias ? 4 * embd : 0);
  if (vocab * embd + block * embd > kMaxParams)
    f.failAt(vocab >= block ? "vocab_size" : "block_size",
             fmt::format("the embedding (vocab_size {} + block_size {}) x n_embd {} has {} parameters, more than the "
                         "supported {} per layer ({} GiB as float32)",
                         vocab, block, embd, (vocab + block) * embd, kMaxParams, (kMaxParams * 4) >> 30));
  if (mlpParams > kMaxParams)
    f.failAt("n_embd", fmt::format("{}: each block's MLP (mlp.c_fc, 4 x n_embd x n_embd) has {} parameters, more "
                                   "than the supported {} per layer ({} GiB as float32)",
                                   embd, mlpParams, kMaxParams, (kMaxParams * 4) >> 30));
  if (block * vocab > kMaxSampleNumel)
    f.failAt(vocab >= block ? "vocab_size" : "block_size",
             fmt::format("the logits of a sample (block_size {} x vocab_size {}) have {} values, more than the "
                         "supported {} per sample",
                         block, vocab, block * vocab, kMaxSampleNumel));
  if (block * 4 * embd > kMaxSampleNumel)
    f.failAt(embd * 4 >= block ? "n_embd" : "block_size",
             fmt::format("the MLP activations of a sample (block_size {} x 4 x n_embd {}) have {} values, more than "
                         "the supported {} per sample",
                         block, embd, block * 4 * embd, kMaxSampleNumel));
  // V·C + T·C + L·(12C² + 13C) + 2C with biases (docs/model-spec.md); in double, as L·12C² can pass 2^63.
  const double c = static_cast<double>(embd);
  const double total = static_cast<double>(vocab + block) * c +
                       static_cast<double>(layers) * (12 * c * c + (bias ? 13 : 2) * c) + (bias ? 2 : 1) * c;
  if (total > static_cast<double>(kMaxParams))
    f.fail(fmt::format("the gpt preset (vocab_size {}, block_size {}, n_layer {}, n_embd {}) has {:.0f} parameters, "
                       "more than the supported {} ({} GiB as float32)",
                       vocab, block, layers, embd, total, kMaxParams, (kMaxParams * 4) >> 30));

  constexpr double kStd = 0.02;
  const double projStd = kStd / std::sqrt(2.0 * static_cast<double>(layers));
  auto ln = [&](const std::string& name) {
    // nanoGPT's LayerNorm(ndim, bias): with bias=False only the weight.
    return json{{"type", "layernorm"}, {"name", name}, {"eps", 1e-5}, {"bias", bias}};
  };
  auto drop = [&](json& list) {
    if (dropout > 0) list.push_back({{"type", "dropout"}, {"p", dropout}});
  };
  json list = json::array();
  list.push_back({{"type", "embedding"}, {"name", "transformer"}, {"vocab_size", vocab}, {"n_embd", embd},
                  {"position", true}, {"init_std", kStd}});
  drop(list);
  for (int64_t i = 0; i < layers; ++i) {
    const std::string name = fmt::format("transformer.h.{}", i);
    json attention{{"type", "causal_self_attention"}, {"name", "attn"}, {"n_head", heads}, {"bias", bias},
                   {"init_std", kStd}, {"proj_init_std", projStd}};
    if (dropout > 0) attention["dropout"] = dropout;  // nanoGPT's attn_dropout
    json attn = json::array({ln("ln_1"), attention});
    drop(attn);
    list.push_back({{"type", "block"}, {"name", name}, {"layers", attn}});
    json mlp = json::array({ln("ln_2"),
                            json{{"type", "linear"}, {"name", "mlp.c_fc"}, {"out", 4 * embd}, {"bias", bias},
                                 {"init_std", kStd}},
                            json{{"type", "gelu"}},
                            json{{"type", "linear"}, {"name", "mlp.c_proj"}, {"out", embd}, {"bias", bias},
                                 {"init_std", projStd}}});
    drop(mlp);
    list.push_back({{"type", "block"}, {"name", name}, {"layers", mlp}});
  }
  list.push_back(ln("transformer.ln_f"));
  list.push_back({{"type", "lm_head"}, {"vocab_size", vocab}, {"tied", true}});
  json out{{"input", {block}}, {"layers", list}};
  if (model.contains("name")) out["name"] = model["name"];
  return out;
}

}  // namespace dtrain::nn
