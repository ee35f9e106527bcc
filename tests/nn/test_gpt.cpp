// Transformer layers (embedding, causal_self_attention, block, lm_head, linear over a sequence) against naive
// references and finite differences, and the gpt preset: nanoGPT's names, count, initialisation, a tied head whose
// gradient reaches the token table, and the sequence cross-entropy.
#include <doctest/doctest.h>

#include <chrono>

#include <fmt/format.h>

#include <cmath>
#include <map>
#include <set>
#include <vector>

#include "lib/common/error.h"
#include "lib/nn/loss.h"
#include "lib/nn/model.h"
#include "lib/nn/optimizer.h"
#include "lib/nn/sparse_rows.h"
#include "tests/nn/layer_harness.h"

using namespace dtrain;
using namespace dtrain::nn;
using dtrain::nn::testing::Harness;
using nlohmann::json;

namespace {

template <class F>
std::string messageOf(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

json gptPreset(int layers = 2, int heads = 2, int embd = 8, int block = 5, int vocab = 11) {
  return json{{"preset", "gpt"}, {"vocab_size", vocab}, {"block_size", block}, {"n_layer", layers},
              {"n_head", heads}, {"n_embd", embd}};
}

}  // namespace

TEST_CASE("embedding: token rows plus position rows; scatter-added gradients") {
  Harness h(json{{"type", "embedding"}, {"vocab_size", 5}, {"n_embd", 3}}, {4}, 2);
  CHECK(h.spec.output == Shape{4, 3});
  REQUIRE(h.impl->paramShapes().size() == 2);
  CHECK(h.impl->paramShapes()[0].suffix == "wte.weight");
  CHECK(h.impl->paramShapes()[1].shape == Shape{4, 3});
  h.x = {0, 4, 4, 2, 1, 1, 3, 0};
  h.impl->forward(h.x.data(), h.y.data(), 2, false);
  for (int r = 0; r < 8; ++r)
    for (int j = 0; j < 3; ++j) {
      const float expected = h.params[static_cast<size_t>(h.x[r] * 3 + j)] + h.params[static_cast<size_t>(15 + (r % 4) * 3 + j)];
      CHECK(h.y[static_cast<size_t>(r * 3 + j)] == expected);
    }
  h.checkGradients(1e-2);
  // A token id outside the vocabulary is an error, not a read past the table.
  h.x[1] = 5;
  CHECK(messageOf([&] { h.impl->forward(h.x.data(), h.y.data(), 2, false); }).find("token id 5 at position 1") !=
        std::string::npos);
}

namespace {

// A table holder for tests: the rows live here; pushes are recorded.
struct FakeRows final : SparseRows {
  int dim = 0;
  std::vector<float> table;
  std::vector<std::vector<int64_t>> pulled, pushedIds;
  std::vector<std::vector<float>> pushedGrads;
  void pull(int table0, std::span<const int64_t> ids, std::span<float> out) override {
    CHECK(table0 == 0);
    pulled.emplace_back(ids.begin(), ids.end());
    for (size_t i = 0; i < ids.size(); ++i)
      std::copy_n(table.data() + ids[i] * dim, dim, out.data() + i * static_cast<size_t>(dim));
  }
  void push(int, std::vector<int64_t> ids, std::vector<float> grads) override {
    pushedIds.push_back(std::move(ids));
    pushedGrads.push_back(std::move(grads));
  }
};

}  // namespace

TEST_CASE("sparse embedding: the table is outside the arena; dedup pulls and coalesced pushes equal the dense layer") {
  auto modelOf = [](bool sparse) {
    json m{{"input", {3}},
           {"layers",
            {{{"type", "embedding"}, {"vocab_size", 7}, {"n_embd", 2}, {"position", false}, {"sparse", sparse}},
             {{"type", "flatten"}},
             {{"type", "linear"}, {"out", 1}}}}};
    return Model::build(parseModelSpec(m, "job.json"), 4, 5);
  };
  Model dense = modelOf(false), sparse = modelOf(true);
  CHECK(dense.numParams() == 14 + 7);
  REQUIRE(sparse.numParams() == 7);  // the linear only
  REQUIRE(sparse.sparseTables().size() == 1);
  CHECK(sparse.sparseTables()[0].name == "0.wte.weight");
  CHECK(sparse.sparseTables()[0].rows == 7);
  FakeRows rows;
  rows.dim = 2;
  rows.table.assign(dense.params().begin(), dense.params().begin() + 14);
  std::copy(dense.params().begin() + 14, dense.params().end(), sparse.params().begin());  // same linear
  std::vector<float> x{3, 1, 3, 6, 1, 1};  // two samples; id 3 and id 1 repeat
  CHECK_THROWS_AS(sparse.forward(x.data(), 2, true), Error);  // no holder bound yet
  sparse.bindSparseRows(&rows);
  TensorView yd = dense.forward(x.data(), 2, true);
  TensorView ys = sparse.forward(x.data(), 2, true);
  REQUIRE(rows.pulled.size() == 1);
  CHECK(rows.pulled[0] == std::vector<int64_t>{1, 3, 6});
  for (int i = 0; i < 2; ++i) CHECK(ys.f32()[i] == yd.f32()[i]);
  std::vector<float> dy{0.5f, -2.0f};
  dense.backward(TensorView::f32(dy.data(), Shape{2, 1}), {}, GradMode::kOverwrite);
  sparse.backward(TensorView::f32(dy.data(), Shape{2, 1}), {}, GradMode::kOverwrite);
  REQUIRE(rows.pushedIds.size() == 1);
  CHECK(rows.pushedIds[0] == std::vector<int64_t>{1, 3, 6});
  for (size_t i = 0; i < 3; ++i)
    for (size_t c = 0; c < 2; ++c)
      CHECK(rows.pushedGrads[0][i * 2 + c] ==
            doctest::Approx(dense.grads()[static_cast<size_t>(rows.pushedIds[0][i]) * 2 + c]));
  for (size_t i = 0; i < 7; ++i) CHECK(sparse.grads()[i] == dense.grads()[14 + i]);
}

namespace {

// Attention from its definition, in double: qkv = x Wa^T + ba; per head softmax(q k^T / sqrt(hs)) over j <= i.
std::vector<double> naiveAttention(const Harness& h, int64_t heads) {
  const int64_t t = h.spec.input[0], c = h.spec.input[1], hs = c / heads;
  const float* wa = h.params.data();
  const float* ba = wa + 3 * c * c;
  const float* wp = ba + 3 * c;
  const float* bp = wp + c * c;
  std::vector<double> y;
  for (int b = 0; b < h.batch; ++b) {
    const float* x = h.x.data() + b * t * c;
    std::vector<double> qkv(static_cast<size_t>(t * 3 * c));
    for (int64_t i = 0; i < t; ++i)
      for (int64_t o = 0; o < 3 * c; ++o) {
        double s = ba[o];
        for (int64_t k = 0; k < c; ++k) s += static_cast<double>(x[i * c + k]) * wa[o * c + k];
        qkv[static_cast<size_t>(i * 3 * c + o)] = s;
      }
    std::vector<double> att(static_cast<size_t>(t * c), 0.0);
    for (int64_t hd = 0; hd < heads; ++hd)
      for (int64_t i = 0; i < t; ++i) {
        std::vector<double> p(static_cast<size_t>(i + 1));
        double m = -1e300, z = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double s = 0;
          for (int64_t d = 0; d < hs; ++d)
            s += qkv[static_cast<size_t>(i * 3 * c + hd * hs + d)] * qkv[static_cast<size_t>(j * 3 * c + c + hd * hs + d)];
          p[static_cast<size_t>(j)] = s / std::sqrt(static_cast<double>(hs));
          m = std::max(m, p[static_cast<size_t>(j)]);
        }
        for (auto& v : p) z += (v = std::exp(v - m));
        for (int64_t j = 0; j <= i; ++j)
          for (int64_t d = 0; d < hs; ++d)
            att[static_cast<size_t>(i * c + hd * hs + d)] +=
                p[static_cast<size_t>(j)] / z * qkv[static_cast<size_t>(j * 3 * c + 2 * c + hd * hs + d)];
      }
    for (int64_t i = 0; i < t; ++i)
      for (int64_t o = 0; o < c; ++o) {
        double s = bp[o];
        for (int64_t k = 0; k < c; ++k) s += att[static_cast<size_t>(i * c + k)] * wp[o * c + k];
        y.push_back(s);
      }
  }
  return y;
}

}  // namespace

TEST_CASE("causal_self_attention: matches the definition, is causal, and its gradients") {
  Harness h(json{{"type", "causal_self_attention"}, {"n_head", 2}}, {5, 4}, 2);
  const auto shapes = h.impl->paramShapes();
  REQUIRE(shapes.size() == 4);
  CHECK(shapes[0].suffix == "c_attn.weight");
  CHECK(shapes[0].shape == Shape{12, 4});
  CHECK(shapes[3].suffix == "c_proj.bias");
  h.impl->forward(h.x.data(), h.y.data(), 2, false);
  const auto ref = naiveAttention(h, 2);
  for (size_t i = 0; i < ref.size(); ++i) CHECK(h.y[i] == doctest::Approx(ref[i]).epsilon(1e-4));
  // Changing the last position's input leaves every earlier output unchanged.
  const std::vector<float> before = h.y;
  for (int k = 0; k < 4; ++k) h.x[static_cast<size_t>(4 * 4 + k)] += 1.0f;
  h.impl->forward(h.x.data(), h.y.data(), 2, false);
  for (size_t i = 0; i < 16; ++i) CHECK(h.y[i] == before[i]);
  CHECK(h.y[16] != before[16]);
  h.checkGradients(1e-2);
  Harness(json{{"type", "causal_self_attention"}, {"n_head", 1}, {"bias", false}}, {3, 6}, 1).checkGradients(1e-2);
}

TEST_CASE("causal_self_attention dropout: on the probabilities in training only, seeded, resumable, gradients") {
  Harness plain(json{{"type", "causal_self_attention"}, {"n_head", 2}}, {6, 4}, 2);
  Harness drop(json{{"type", "causal_self_attention"}, {"n_head", 2}, {"dropout", 0.3}}, {6, 4}, 2);
  CHECK(drop.spec.detail().find("dropout 0.3") != std::string::npos);
  CHECK(drawsRandom(drop.spec));
  CHECK_FALSE(drawsRandom(plain.spec));
  // Same parameters and input: evaluation is the plain layer's.
  drop.params = plain.params;
  drop.x = plain.x;
  plain.impl->forward(plain.x.data(), plain.y.data(), 2, false);
  drop.impl->forward(drop.x.data(), drop.y.data(), 2, false);
  CHECK(drop.y == plain.y);
  // Training: different outputs, a new mask each forward, the same mask after the same reseed.
  drop.impl->reseed(42, 0);
  drop.impl->forward(drop.x.data(), drop.y.data(), 2, true);
  const std::vector<float> first = drop.y;
  CHECK(first != plain.y);
  drop.impl->forward(drop.x.data(), drop.y.data(), 2, true);
  CHECK(drop.y != first);
  drop.impl->reseed(42, 0);
  drop.impl->forward(drop.x.data(), drop.y.data(), 2, true);
  CHECK(drop.y == first);
  // The first position attends to itself only: its output is the plain one, or the bias alone when dropped.
  drop.reseed = true;
  drop.checkGradients(1e-2, /*train=*/true);
  drop.checkGradients(1e-2, /*train=*/false);
  CHECK(messageOf([] {
          parseModelSpec(json{{"input", {3, 4}}, {"layers", {{{"type", "causal_self_attention"}, {"n_head", 2},
                                                               {"dropout", 1.0}}}}},
                         "job.json", "/model");
        }).find("/model/layers/0/dropout: expected a probability in [0, 1)") != std::string::npos);
  // What it keeps for backward: qkv and heads [T, 4C], probabilities [H, T, T] and their dropped copy.
  CHECK(keptFloatsOf(plain.spec) == 6 * 16 + 2 * 36);
  CHECK(keptFloatsOf(drop.spec) == 6 * 16 + 2 * 2 * 36);
  // On a GPU: with the fused kernels the log-sum-exp rows [H, T] (with dropout too: its mask is computed from a
  // counter); on the matmul path nothing per sample beyond qkv and heads.
  CHECK(keptFloatsOf(plain.spec, {.cuda = true, .attention = AttentionKernel::kFused}) == 6 * 16 + 2 * 6);
  CHECK(keptFloatsOf(plain.spec, {.cuda = true}) == 6 * 16);  // "auto" at this size: the matmul path
  CHECK(keptFloatsOf(plain.spec, {.cuda = true, .attention = AttentionKernel::kMatmul}) == 6 * 16);
  CHECK(keptFloatsOf(drop.spec, {.cuda = true, .attention = AttentionKernel::kFused}) == 6 * 16 + 2 * 6);
  CHECK(keptFloatsOf(drop.spec, {.cuda = true, .attention = AttentionKernel::kMatmul}) == 6 * 16);
  // bf16 activation storage ("precision": "bf16" on a GPU): the matmul path keeps qkv and heads in bf16 ([T, 4C]
  // values in 2 bytes: [T, 2C] floats' worth); the fused kernels read q, k, v in bf16 (qkv: [T, 1.5C] floats'
  // worth, 36) but the heads in float32 (D = dO . O; 24), so [T, 2.5C] and the log-sum-exp; the CPU has no bf16.
  CHECK(keptFloatsOf(plain.spec, {.cuda = true, .attention = AttentionKernel::kMatmul, .bf16 = true}) == 3 * 16);
  CHECK(keptFloatsOf(drop.spec, {.cuda = true, .attention = AttentionKernel::kMatmul, .bf16 = true}) == 3 * 16);
  CHECK(keptFloatsOf(plain.spec, {.cuda = true, .attention = AttentionKernel::kFused, .bf16 = true}) ==
        36 + 24 + 2 * 6);
  CHECK(keptFloatsOf(drop.spec, {.cuda = true, .attention = AttentionKernel::kFused, .bf16 = true}) ==
        36 + 24 + 2 * 6);
  CHECK(keptFloatsOf(plain.spec, {.cuda = false, .bf16 = true}) == 6 * 16 + 2 * 36);
  CHECK(usesFusedAttention(plain.spec, AttentionKernel::kFused));
  CHECK_FALSE(usesFusedAttention(plain.spec, AttentionKernel::kMatmul));
  // "auto": the matmul path while its score scratch (P and dP of one sample: 2 x H x T x T floats) is at most
  // 256 MiB, the fused kernels beyond: GPT-2's 12 heads at T 1024 (100.7 MB) stay on the matmul path, at T 2048
  // (403 MB) they fuse.
  CHECK_FALSE(usesFusedAttention(plain.spec, AttentionKernel::kAuto));
  CHECK_FALSE(usesFusedAttention(drop.spec, AttentionKernel::kAuto));
  LayerSpec gpt2 = plain.spec;
  gpt2.nHead = 12;
  gpt2.input = Shape{1024, 768};
  CHECK(matmulAttentionScratchBytes(gpt2) == 2 * 12 * 1024 * 1024 * 4);
  CHECK_FALSE(usesFusedAttention(gpt2, AttentionKernel::kAuto));
  gpt2.input = Shape{2048, 768};
  CHECK(usesFusedAttention(gpt2, AttentionKernel::kAuto));
  CHECK(keptFloatsOf(gpt2, {.cuda = true}) == 4 * 2048 * 768 + 12 * 2048);  // qkv, heads and the log-sum-exp rows
  gpt2.input = Shape{2048, 12 * 256};  // head size 256: beyond the fused kernels, "auto" keeps the matmul path
  CHECK_FALSE(usesFusedAttention(gpt2, AttentionKernel::kAuto));
}

TEST_CASE("block: x + f(x) with its children's parameters named under it; gradients") {
  json layer = json::parse(R"({"type": "block", "layers": [{"type": "layernorm", "name": "ln"},
      {"type": "linear", "out": 6, "name": "fc"}, {"type": "gelu"}, {"type": "linear", "out": 3}]})");
  Harness h(layer, {4, 3}, 2);
  const auto shapes = h.impl->paramShapes();
  REQUIRE(shapes.size() == 6);
  CHECK(shapes[0].suffix == "ln.weight");
  CHECK(shapes[2].suffix == "fc.weight");
  CHECK(shapes[2].shape == Shape{6, 3});
  CHECK(shapes[4].suffix == "3.weight");
  h.checkGradients(1e-2);
  // Blocks share their backward scratch inside a model, so they do not nest.
  json nested = json::parse(R"({"input": [4, 3], "layers": [{"type": "block", "layers": [{"type": "block",
      "layers": [{"type": "relu"}]}]}]})");
  CHECK(messageOf([&] { parseModelSpec(nested, "job.json", "/model"); }) ==
        "job.json: /model/layers/0/layers/0: a block cannot contain a block; list them one after another");
  // The branch must keep the shape it adds to.
  json bad = json::parse(R"({"input": [4, 3], "layers": [{"type": "block", "layers": [{"type": "linear", "out": 5}]}]})");
  CHECK(messageOf([&] { parseModelSpec(bad, "job.json", "/model"); }) ==
        "job.json: /model/layers/0: a block adds its layers' output to its input, so they must keep the shape "
        "[N,4,3] but give [N,4,5]");
}

// A block whose last child's backward never reads its output (attention, a linear) has that child write into the
// block's output and adds the residual there in place (blockAddsInPlace): no buffer for that output, and the same
// bits as the children run as a model of their own plus x (y = x + f, dx = dy + df).
TEST_CASE("block in place: the last child writes into y; outputs and gradients bit for bit, its output not kept") {
  const char* blocks[] = {
      R"({"type": "block", "layers": [{"type": "layernorm"}, {"type": "causal_self_attention", "n_head": 2}]})",
      R"({"type": "block", "layers": [{"type": "layernorm"}, {"type": "linear", "out": 16}, {"type": "gelu"},
          {"type": "linear", "out": 4}]})",
      R"({"type": "block", "layers": [{"type": "layernorm"}, {"type": "linear", "out": 4}, {"type": "gelu"}]})",
      R"({"type": "block", "layers": [{"type": "layernorm"}, {"type": "linear", "out": 4}, {"type": "relu"}]})",
      R"({"type": "block", "layers": [{"type": "linear", "out": 4}, {"type": "dropout", "p": 0.5}]})"};
  const bool inPlace[] = {true, true, true, false, true};
  for (size_t b = 0; b < std::size(blocks); ++b) {
    CAPTURE(blocks[b]);
    const int batch = 2;
    Harness h(json::parse(blocks[b]), {3, 4}, batch);
    CHECK(blockAddsInPlace(h.spec) == inPlace[b]);
    // The reference: the children as a model of their own (same parameters), then x + f and dy + df (evaluation:
    // the dropout's masks are keyed by the block's index inside a block).
    const json children = json::parse(blocks[b])["layers"];
    Model seq = Model::build(parseModelSpec(json{{"input", {3, 4}}, {"layers", children}}, "", "/model"), batch, 7,
                             Device::cpu(), {}, {.inputGrad = true});
    REQUIRE(seq.params().size() == h.params.size());
    std::copy(h.params.begin(), h.params.end(), seq.params().begin());
    h.impl->forward(h.x.data(), h.y.data(), batch, false);
    h.impl->backward(h.x.data(), h.y.data(), h.r.data(), h.dx.data(), batch, false);
    const TensorView f = seq.forward(h.x.data(), batch, false);
    seq.backward(TensorView::of(h.r.data(), h.spec.output.withBatch(batch)), {}, GradMode::kOverwrite);
    const auto* fv = static_cast<const float*>(f.data);
    const auto* dfv = static_cast<const float*>(seq.inputGrad().data);
    int bad = 0;
    for (size_t i = 0; i < h.y.size(); ++i) bad += h.y[i] != h.x[i] + fv[i] ? 1 : 0;
    for (size_t i = 0; i < h.dx.size(); ++i) bad += h.dx[i] != h.r[i] + dfv[i] ? 1 : 0;
    for (size_t i = 0; i < h.grads.size(); ++i) bad += h.grads[i] != seq.grads()[i] ? 1 : 0;
    CHECK(bad == 0);
    // Kept per sample: every child's output but an in-place last one's, plus what each child keeps.
    int64_t kept = 0;
    for (size_t i = 0; i < h.spec.children.size(); ++i) {
      const LayerSpec& c = h.spec.children[i];
      kept += keptFloatsOf(c) + (inPlace[b] && i + 1 == h.spec.children.size() ? 0 : c.output.numel());
    }
    CHECK(keptFloatsOf(h.spec) == kept);
  }
}

// The fused residual + LayerNorm's pairing (residualAddFusesInto, the CUDA blocks' rule; docs/gpu.md "Fused
// residual + LayerNorm"): in a GPT every block hands its residual add to the layernorm after it, ln_2 inside the MLP
// block, the next layer's ln_1 inside the next attention block, ln_f after the last: 2 n_layer adds per forward
// (24 at GPT-2 small), not only the last block's with ln_f.
TEST_CASE("fused residual + LayerNorm pairing: every GPT block hands its add on, also to a block's first child") {
  for (int layers : {1, 2, 3, 12}) {
    CAPTURE(layers);
    for (double dropout : {0.0, 0.1}) {  // dropout ends each block (in place too) and follows the embedding
      CAPTURE(dropout);
      json preset = gptPreset(layers, 2, 8, 5, 11);
      preset["dropout"] = dropout;
      const ModelSpec spec = parseModelSpec(preset, "job.json", "/model");
      CHECK(residualLayerNormPairs(spec.layers) == 2 * layers);
      // Which pairs: each block with the layer after it, nothing before the first block or after ln_f.
      for (size_t i = 0; i + 1 < spec.layers.size(); ++i) {
        CAPTURE(i);
        CHECK(residualAddFusesInto(spec.layers[i], spec.layers[i + 1]) == (spec.layers[i].type() == "block"));
      }
    }
  }
  const auto layersOf = [](const char* text) {
    return parseModelSpec(json::parse(text), "job.json", "/model").layers;
  };
  // Not in place (relu's derivative reads its output: the block keeps it and adds separately): nothing to hand on.
  CHECK(residualLayerNormPairs(layersOf(R"({"input": [3, 4], "layers": [
      {"type": "block", "layers": [{"type": "linear", "out": 4}, {"type": "relu"}]},
      {"type": "layernorm"}]})")) == 0);
  // A block whose first child is not a layernorm cannot take it; a flatten between them breaks the pair.
  CHECK(residualLayerNormPairs(layersOf(R"({"input": [3, 4], "layers": [
      {"type": "block", "layers": [{"type": "layernorm"}, {"type": "linear", "out": 4}]},
      {"type": "block", "layers": [{"type": "linear", "out": 4}, {"type": "layernorm"}]},
      {"type": "flatten"}, {"type": "layernorm"}]})")) == 0);
  // A lone layernorm is no producer; an in-place block straight after another pairs.
  CHECK(residualLayerNormPairs(layersOf(R"({"input": [3, 4], "layers": [
      {"type": "layernorm"},
      {"type": "block", "layers": [{"type": "layernorm"}, {"type": "linear", "out": 4}]},
      {"type": "block", "layers": [{"type": "layernorm"}, {"type": "linear", "out": 4}]}]})")) == 1);
}

// LayerKind::backwardIgnoresOutput is a promise: such a layer's backward gives the same bits with y overwritten
// (as an in-place block overwrites it). relu, whose derivative is read from y, is the control.
TEST_CASE("backwardIgnoresOutput: the flagged kinds' backward does not read y") {
  int flagged = 0;
  for (const LayerKind* kind : layerKinds()) {
    CAPTURE(kind->name);
    if (!kind->backwardIgnoresOutput && kind->name != "relu") continue;
    if (kind->name == "embedding" || kind->name == "block") continue;  // token ids as input; a block: above
    flagged += kind->backwardIgnoresOutput ? 1 : 0;
    Harness h(json::parse(kind->exampleLayer), json::parse(kind->exampleInput).get<std::vector<int64_t>>(), 2);
    h.reseed = true;
    h.analytic(/*train=*/true);
    const std::vector<float> dx = h.dx, grads = h.grads;
    h.objective(true);
    for (float& v : h.y) v = -1.0f;  // any value: relu then passes no gradient at all
    h.impl->backward(h.x.data(), h.y.data(), h.r.data(), h.dx.data(), 2, false);
    CHECK((h.dx == dx && h.grads == grads) == kind->backwardIgnoresOutput);
  }
  CHECK(flagged >= 7);  // linear, gelu, dropout, layernorm, causal_self_attention, conv2d, maxpool2d, lm_head
}

TEST_CASE("linear over a sequence and an untied lm_head: every position, gradients") {
  Harness lin(json{{"type", "linear"}, {"out", 2}}, {3, 4}, 2);
  CHECK(lin.spec.output == Shape{3, 2});
  lin.checkGradients(1e-2);
  Harness head(json{{"type", "lm_head"}, {"vocab_size", 7}, {"tied", false}}, {3, 4}, 2);
  CHECK(head.spec.output == Shape{3, 7});
  CHECK(head.impl->paramShapes().at(0).shape == Shape{7, 4});
  head.checkGradients(1e-2);
}

TEST_CASE("gpt preset: nanoGPT's parameter names, shapes, count and initialisation") {
  const int L = 2, C = 8, T = 5, V = 11;
  ModelSpec spec = parseModelSpec(gptPreset(L, 2, C, T, V), "job.json", "/model");
  CHECK(spec.input == Shape{T});
  CHECK(spec.output() == Shape{T, V});
  CHECK(spec.layers.size() == static_cast<size_t>(2 * L + 3));
  CHECK(spec.paramCount() == V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C);
  Model m = Model::build(spec, 2, 1);
  std::map<std::string, Shape> names;
  for (const auto& e : m.paramTable()) names[e.name] = e.shape;
  const std::map<std::string, Shape> expected = {
      {"transformer.wte.weight", Shape{V, C}}, {"transformer.wpe.weight", Shape{T, C}},
      {"transformer.h.0.ln_1.weight", Shape{C}}, {"transformer.h.0.ln_1.bias", Shape{C}},
      {"transformer.h.0.attn.c_attn.weight", Shape{3 * C, C}}, {"transformer.h.0.attn.c_attn.bias", Shape{3 * C}},
      {"transformer.h.0.attn.c_proj.weight", Shape{C, C}}, {"transformer.h.0.attn.c_proj.bias", Shape{C}},
      {"transformer.h.0.ln_2.weight", Shape{C}}, {"transformer.h.0.ln_2.bias", Shape{C}},
      {"transformer.h.0.mlp.c_fc.weight", Shape{4 * C, C}}, {"transformer.h.0.mlp.c_fc.bias", Shape{4 * C}},
      {"transformer.h.0.mlp.c_proj.weight", Shape{C, 4 * C}}, {"transformer.h.0.mlp.c_proj.bias", Shape{C}},
      {"transformer.ln_f.weight", Shape{C}}, {"transformer.ln_f.bias", Shape{C}}};
  for (const auto& [name, shape] : expected) {
    CAPTURE(name);
    REQUIRE(names.count(name) == 1);
    CHECK(names[name] == shape);
  }
  CHECK(names.count("transformer.h.1.mlp.c_proj.bias") == 1);
  CHECK(names.size() == 2 + 12 * L + 2);
  CHECK(names.count("lm_head.weight") == 0);  // tied to wte
  // Init: zero biases, unit LayerNorm weights, std 0.02 and 0.02/sqrt(2L) for the projections.
  auto stdOf = [&](const std::string& name) {
    for (const auto& e : m.paramTable())
      if (e.name == name) {
        double s = 0;
        for (size_t i = 0; i < e.count; ++i) s += static_cast<double>(m.params()[e.offset + i]) * m.params()[e.offset + i];
        return std::sqrt(s / static_cast<double>(e.count));
      }
    return -1.0;
  };
  CHECK(stdOf("transformer.h.0.attn.c_attn.bias") == 0.0);
  CHECK(stdOf("transformer.h.1.ln_2.weight") == 1.0);
  CHECK(stdOf("transformer.h.0.mlp.c_fc.weight") == doctest::Approx(0.02).epsilon(0.1));
  CHECK(stdOf("transformer.h.0.mlp.c_proj.weight") == doctest::Approx(0.02 / std::sqrt(2.0 * L)).epsilon(0.1));
  const std::string table = m.summaryTable();
  CHECK(table.find("x + ln_1>attn") != std::string::npos);  // blocks show their branch
  CHECK(table.find("x + ln_2>mlp.c_fc>gelu>mlp.c_proj") != std::string::npos);
  CHECK(table.find("lm_head") != std::string::npos);
  CHECK(table.find(fmt::format("total parameters: {}", spec.paramCount())) != std::string::npos);
  // The embedding's long detail does not push its output column out of line: every row's shape starts at the
  // header's "output".
  const size_t column = table.find("output");
  REQUIRE(column != std::string::npos);
  size_t start = 0, rowsChecked = 0;
  while (start < table.size()) {
    const size_t end = table.find('\n', start);
    const std::string line = table.substr(start, end - start);
    if (line.find("[N,") != std::string::npos) {
      CAPTURE(line);
      CHECK(line.find("[N,") == column);
      ++rowsChecked;
    }
    start = end == std::string::npos ? table.size() : end + 1;
  }
  CHECK(rowsChecked == spec.layers.size() + 1);
}

TEST_CASE("gpt preset with bias false: no Linear or LayerNorm bias, as nanoGPT's bias=False") {
  const int L = 2, C = 8, T = 5, V = 11;
  json preset = gptPreset(L, 2, C, T, V);
  preset["bias"] = false;
  preset["dropout"] = 0.1;
  ModelSpec spec = parseModelSpec(preset, "job.json", "/model");
  // nanoGPT: wte, wpe, per block ln_1.weight, c_attn, c_proj, ln_2.weight, c_fc, c_proj; ln_f.weight.
  CHECK(spec.paramCount() == V * C + T * C + L * (12 * C * C + 2 * C) + C);
  Model m = Model::build(spec, 2, 1);
  std::set<std::string> names;
  for (const auto& e : m.paramTable()) names.insert(e.name);
  CHECK(names.size() == 2 + 6 * L + 1);
  for (const auto& n : names) CHECK_MESSAGE(n.find("bias") == std::string::npos, n);
  CHECK(names.count("transformer.h.1.ln_2.weight") == 1);
  CHECK(names.count("transformer.ln_f.weight") == 1);
  CHECK(m.summaryTable().find("no bias") != std::string::npos);
  // attn_dropout: the attention layers draw random numbers too.
  CHECK(drawsRandom(spec.layers[2].children[1]));
}

TEST_CASE("gpt preset: bad fields name the field and value") {
  CHECK(messageOf([] { parseModelSpec(gptPreset(1, 3, 8), "job.json", "/model"); }) ==
        "job.json: /model/n_head: n_embd 8 is not divisible by n_head 3 (each head takes n_embd / n_head columns)");
  json typo = gptPreset();
  typo["n_layers"] = 2;
  CHECK(messageOf([&] { parseModelSpec(typo, "job.json", "/model"); }).find("n_layers") != std::string::npos);
  json bad = gptPreset();
  bad["preset"] = "bert";
  CHECK(messageOf([&] { parseModelSpec(bad, "job.json", "/model"); }).find("/model/preset") != std::string::npos);
}

TEST_CASE("gpt preset: sizes past the limits name the preset's own fields, not an expanded layer") {
  auto parse = [](json preset) { return messageOf([&] { parseModelSpec(preset, "job.json", "/model"); }); };
  auto timed = [&](json preset) {
    const auto start = std::chrono::steady_clock::now();
    std::string m = parse(std::move(preset));
    CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(2));  // refused before expanding
    return m;
  };
  // 100000 layers used to expand into 200000 blocks and build for minutes.
  CHECK(timed(gptPreset(100000)) == "job.json: /model/n_layer: 100000 is more than the supported 1024 layers");
  CHECK(parse(gptPreset(1024)).find("n_layer") == std::string::npos);
  // Each used to name /model/layers/0 or /model/layers/N (an expanded layer the job file does not have).
  CHECK(parse(gptPreset(1, 1, 65536, 8, 65536)) ==
        "job.json: /model/vocab_size: the embedding (vocab_size 65536 + block_size 8) x n_embd 65536 has 4295491584 "
        "parameters, more than the supported 2147483648 per layer (8 GiB as float32)");
  CHECK(parse(gptPreset(1, 1, 32768, 8, 11)) ==
        "job.json: /model/n_embd: 32768: each block's MLP (mlp.c_fc, 4 x n_embd x n_embd) has 4295098368 "
        "parameters, more than the supported 2147483648 per layer (8 GiB as float32)");
  CHECK(parse(gptPreset(1, 1, 8, 65536, 65536)) ==
        "job.json: /model/vocab_size: the logits of a sample (block_size 65536 x vocab_size 65536) have 4294967296 "
        "values, more than the supported 1073741824 per sample");
  CHECK(parse(gptPreset(1, 1, 8192, 65536, 11)) ==
        "job.json: /model/block_size: the MLP activations of a sample (block_size 65536 x 4 x n_embd 8192) have "
        "2147483648 values, more than the supported 1073741824 per sample");
  // Within every layer's limit, too many in all: named at the preset's object, with its fields.
  CHECK(parse(gptPreset(12, 8, 8000, 8, 11)) ==
        "job.json: /model: the gpt preset (vocab_size 11, block_size 8, n_layer 12, n_embd 8000) has 9217416000 "
        "parameters, more than the supported 2147483648 (8 GiB as float32)");
  // A name that is not a string.
  json named = gptPreset();
  named["name"] = 5;
  CHECK(parse(named) == "job.json: /model/name: expected a string, got 5");
}

TEST_CASE("gpt: the sequence cross-entropy's gradient through the whole model, tied head included") {
  const int B = 2, T = 4, V = 7;
  ModelSpec spec = parseModelSpec(gptPreset(1, 2, 4, T, V), "", "/model");
  Model m = Model::build(spec, B, 3);
  auto loss = Loss::create({LossType::kCrossEntropy}, m.outputShape(), B);
  loss->checkTargets(Shape{T}, DType::kInt32);
  CHECK_THROWS_AS(loss->checkTargets(Shape{}, DType::kInt32), ConfigError);
  const std::vector<float> x = {1, 2, 3, 4, 6, 5, 0, 1};
  const std::vector<int32_t> y = {2, 3, 4, 5, 5, 0, 1, 1};
  const TensorView targets = TensorView::i32(y.data(), Shape{B, T});
  // Bigger weights than the init so that every gradient is well above the finite-difference noise.
  for (size_t i = 0; i < m.numParams(); ++i) m.params()[i] += 0.2f * std::sin(static_cast<float>(i));
  auto lossAt = [&] { return static_cast<double>(loss->forward(m.forward(x.data(), B, false), targets)); };
  const double l0 = lossAt();
  // The mean over all B*T positions: a uniform prediction would give log(V).
  CHECK(l0 > 0.5 * std::log(V));
  m.backward(loss->backward(), {}, GradMode::kOverwrite);
  const std::vector<float> grads(m.grads().begin(), m.grads().end());
  int bad = 0;
  for (size_t i = 0; i < m.numParams(); i += 3) {
    const float saved = m.params()[i];
    const double h = 1e-2;
    m.params()[i] = saved + static_cast<float>(h);
    const double plus = lossAt();
    m.params()[i] = saved - static_cast<float>(h);
    const double minus = lossAt();
    m.params()[i] = saved;
    const double num = (plus - minus) / (2 * h);
    if (std::fabs(num - grads[i]) > 1e-3 + 2e-2 * std::fabs(grads[i]) && bad++ < 5)
      FAIL_CHECK(m.paramTable().size() << " param " << i << ": numeric " << num << " analytic " << grads[i]);
  }
  CHECK(bad == 0);
  // Accumulating a second identical backward doubles every gradient, the tied token table's included.
  lossAt();
  m.backward(loss->backward(), {}, GradMode::kAccumulate);
  for (size_t i = 0; i < m.numParams(); ++i) CHECK(m.grads()[i] == doctest::Approx(2 * grads[i]).epsilon(1e-5));
}

TEST_CASE("adamw weight_decay_on matrices: the no-decay ranges step as weight_decay 0, the rest decays") {
  OptimizerSpec spec = parseOptimizerSpec(json{{"type", "adamw"}, {"lr", 0.1}, {"weight_decay", 0.5},
                                               {"weight_decay_on", "matrices"}},
                                          "job.json");
  CHECK(spec.decayMatricesOnly);
  std::vector<float> p(6, 1.0f), g(6, 0.0f);
  auto opt = Optimizer::create(spec, 6);
  opt->setNoDecayRanges({{1, 2}, {5, 1}});
  opt->step(p, g);
  // A zero gradient leaves only the decoupled decay: p * (1 - lr * wd) where it applies.
  CHECK(p == std::vector<float>{0.95f, 1, 1, 0.95f, 0.95f, 1});
  CHECK(messageOf([] {
          parseOptimizerSpec(json{{"type", "adamw"}, {"weight_decay_on", "vectors"}}, "job.json");
        }).find("/optimizer/weight_decay_on") != std::string::npos);
}

TEST_CASE("bf16 activation storage pairs the outputs only bf16 GEMMs read: a layernorm or gelu before a GEMM layer") {
  // embedding, block (ln_1, attn), block (ln_2, c_fc, gelu, c_proj), ln_f, lm_head
  const ModelSpec gpt = parseModelSpec(json::parse(R"({"preset": "gpt", "vocab_size": 16, "block_size": 8,
                                                      "n_layer": 1, "n_head": 2, "n_embd": 4, "dropout": 0.1})"),
                                       "", "/model");
  // With dropout the model's layers are embedding, dropout, 2 blocks, ln_f, lm_head: only ln_f -> lm_head pairs.
  REQUIRE(gpt.layers.size() == 6);
  CHECK(bf16StoredOutputs(gpt.layers) == std::vector<char>{0, 0, 0, 0, 1, 0});
  CHECK(bf16StoredOutputs(gpt.layers[2].children) == std::vector<char>{1, 0, 0});        // ln_1 -> attn (, dropout)
  CHECK(bf16StoredOutputs(gpt.layers[3].children) == std::vector<char>{1, 0, 1, 0, 0});  // ln_2 -> c_fc, gelu -> c_proj
  // Not stored as bf16: relu/tanh/sigmoid outputs (their backward reads y), a linear's output (the next gelu
  // needs it in float32), anything before a layer that is no GEMM (flatten, dropout, layernorm).
  const ModelSpec mlp = parseModelSpec(json::parse(R"({"input": [2, 3], "layers": [{"type": "layernorm"},
      {"type": "flatten"}, {"type": "linear", "out": 4}, {"type": "relu"}, {"type": "linear", "out": 4},
      {"type": "tanh"}, {"type": "linear", "out": 4}, {"type": "gelu"}, {"type": "dropout", "p": 0.1},
      {"type": "linear", "out": 4}, {"type": "layernorm"}, {"type": "linear", "out": 2}]})"), "", "/model");
  CHECK(bf16StoredOutputs(mlp.layers) == std::vector<char>{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0});
  // A layer asked for storage it does not have (a CPU layer: the CPU has no bf16) says so.
  auto cpu = makeLayer(mlp.layers[2], {.device = Device::cpu()});
  CHECK(messageOf([&] { cpu->setBf16Storage(true, false); }) ==
        "/model/layers/2: layer 'linear' on cpu has no bf16 activation storage (asked for its input)");
}

TEST_CASE("the bf16 logits' gradient: lm_head takes its dy as bf16 on a GPU, the CPU keeps float32 throughout") {
  const ModelSpec gpt = parseModelSpec(json::parse(R"({"preset": "gpt", "vocab_size": 16, "block_size": 8,
                                                      "n_layer": 1, "n_head": 2, "n_embd": 4})"),
                                       "", "/model");
  // One rule (registry.h): the last layer's kind reads its dy only as a bf16 GEMM operand. lm_head does; a linear's
  // bias gradient reads dy in float32, and a layernorm is no GEMM.
  CHECK(takesBf16OutputGrad(gpt.layers.back()));
  CHECK_FALSE(takesBf16OutputGrad(gpt.layers.front()));
  // The loss writes that gradient over the layer's output: a kind whose backward read its output could not take it.
  LayerKind readsOutput = *gpt.layers.back().kind;
  readsOutput.backwardIgnoresOutput = false;
  LayerSpec head = gpt.layers.back();
  head.kind = &readsOutput;
  CHECK_FALSE(takesBf16OutputGrad(head));
  const ModelSpec mlp = parseModelSpec(json::parse(R"({"input": [3], "layers": [{"type": "layernorm"},
      {"type": "linear", "out": 4}]})"), "", "/model");
  CHECK_FALSE(takesBf16OutputGrad(mlp.layers[0]));
  CHECK_FALSE(takesBf16OutputGrad(mlp.layers[1]));
  // The loss's side: cross_entropy on a GPU gives it; mse and bce_with_logits, and any CPU loss, give float32.
  CHECK(givesBf16Gradient(LossType::kCrossEntropy, Device::cuda(0)));
  CHECK_FALSE(givesBf16Gradient(LossType::kMse, Device::cuda(0)));
  CHECK_FALSE(givesBf16Gradient(LossType::kBceWithLogits, Device::cuda(0)));
  CHECK_FALSE(givesBf16Gradient(LossType::kCrossEntropy, Device::cpu()));

  // A CPU model takes float32 only, and a CPU loss asked for bf16 (what a model would ask) gives float32: a CPU job
  // is untouched, whatever the trainer passes.
  Model m = Model::build(gpt, 2, 42);
  CHECK(m.outputGradType() == DType::kFloat32);
  auto loss = Loss::create({LossType::kCrossEntropy}, m.outputShape(), 2, Device::cpu(), DType::kBFloat16);
  CHECK(loss->gradType() == DType::kFloat32);
  CHECK(messageOf([&] {
          (void)Loss::create({LossType::kCrossEntropy}, m.outputShape(), 2, Device::cpu(), DType::kInt32);
        }).find("loss gradient dtype int32 (expected float32 or bfloat16)") != std::string::npos);
  std::vector<float> tokens(16, 1.0f);
  std::vector<int32_t> labels(16, 3);
  loss->forward(m.forward(tokens.data(), 2, true), TensorView::of(labels.data(), Shape{2, 8}));
  const TensorView g = loss->backward();
  CHECK(g.dtype == DType::kFloat32);
  // A bf16 gradient handed to a model that takes float32 is refused, naming both.
  std::vector<uint16_t> half(static_cast<size_t>(g.numel()));
  const TensorView bad{half.data(), g.shape, DType::kBFloat16, Device::cpu()};
  CHECK(messageOf([&] { m.backward(bad); }) ==
        "output gradient is bfloat16 [2,8,16] but the model takes its output's gradient as float32");
  // Only a bf16 gradient may have its rows further apart than the output's (the loss's, written over the logits).
  std::vector<float> wide(static_cast<size_t>(2 * g.numel()));
  TensorView strided = TensorView::of(wide.data(), g.shape);
  strided.ld = 32;
  CHECK(messageOf([&] { m.backward(strided); }) ==
        "output gradient is float32 [2,8,16] with rows 32 elements apart, but the model takes it packed (rows of 16)");
  CHECK_NOTHROW(m.backward(g));
  // A layer without the flag asked for a bf16 dy says so.
  auto cpuHead = makeLayer(gpt.layers.back(), {.device = Device::cpu()});
  CHECK(messageOf([&] { cpuHead->setBf16OutputGrad(true, 32); }) ==
        "/model/layers/4: layer 'lm_head' on cpu cannot take its output's gradient as bf16");
}
