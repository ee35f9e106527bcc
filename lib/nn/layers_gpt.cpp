// Transformer layers: embedding, lm_head and the residual block container (causal_self_attention is in
// layers_attention.cpp), with their registry entries (docs/model-spec.md "Transformers"). Shapes are per sample: tokens [T] (token ids carried as
// floats, exact below 2^24) -> [T, C] -> ... -> logits [T, V]. The math and parameter layouts are nanoGPT's
// (model.py: Embedding, CausalSelfAttention with c_attn [3C, C] stacking q, k, v, Block, tied lm_head), so a
// checkpoint's tensors load into its PyTorch module as they are.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "lib/common/aligned_buffer.h"
#include "lib/common/error.h"
#include "lib/common/json_fields.h"
#include "lib/nn/cuda_impl.h"
#include "lib/nn/layers_impl.h"
#include "lib/nn/tensor_parallel.h"

namespace dtrain::nn {
namespace {

using detail::ArrMap;
using detail::checkSize;
using detail::initStdField;
using detail::requireSequence;
using detail::ConstArrMap;
using detail::ConstMatMap;
using detail::MatMap;
using detail::positive;
using detail::RowMat;

size_t sz(int64_t n) { return static_cast<size_t>(n); }

// y[t] = wte[token[t]] + wpe[t] (nn.Embedding; the position table when "position"). The token gradient is a
// scatter-add into the table's rows; no gradient flows to the token ids.
// Sparse ("sparse": true, torch's nn.Embedding(sparse=True)): wte is not in the arena. forward() deduplicates the
// batch's ids (sorted), pulls those rows from the SparseRows bound to the layer into rows_, and reads them from
// there; backward() sums dy per distinct id (torch's coalesce()) and pushes those gradient rows. Only wpe (when
// "position") stays in the arena.
class Embedding final : public Layer {
 public:
  Embedding(const LayerSpec& spec, int maxBatch)
      : Layer(spec, Device::cpu()), t_(spec.input[0]), c_(spec.output.back()), v_(spec.vocab) {
    if (spec.sparse) {
      const size_t occurrences = sz(maxBatch) * sz(t_);
      rows_ = AlignedBuffer<float>(occurrences * sz(c_));
      slot_.resize(occurrences);
      ids_.reserve(occurrences);
    }
  }

  void bind(float* params, float* grads) override {
    if (spec().sparse) {
      if (spec().position) wpe_ = params, gwpe_ = grads;
      return;
    }
    wte_ = params, gwte_ = grads;
    if (spec().position) wpe_ = params + v_ * c_, gwpe_ = grads + v_ * c_;
  }
  void bindSparse(SparseRows* rows, int table) override { source_ = rows, table_ = table; }

  // PyTorch's nn.Embedding default is N(0, 1); the gpt preset sets initStd 0.02 (nanoGPT).
  void initParams(InitRng& rng) override {
    const double std = spec().initStd > 0 ? spec().initStd : 1.0;
    if (wte_ != nullptr)
      for (int64_t i = 0; i < v_ * c_; ++i) wte_[i] = rng.normal(std);
    if (wpe_ != nullptr)
      for (int64_t i = 0; i < t_ * c_; ++i) wpe_[i] = rng.normal(std);
  }

  void forward(const float* x, float* y, int batch, bool) override {
    const float* table = wte_;
    if (spec().sparse) table = pullRows(x, batch);
    for (int64_t r = 0; r < batch * t_; ++r) {
      const int64_t row = spec().sparse ? slot_[sz(r)] : token(x[r], r);
      float* out = y + r * c_;
      std::memcpy(out, table + row * c_, sz(c_) * sizeof(float));
      if (wpe_ != nullptr) ArrMap(out, c_) += ConstArrMap(wpe_ + (r % t_) * c_, c_);
    }
  }

  void backward(const float* x, const float*, const float* dy, float*, int batch, bool accumulate) override {
    if (!accumulate && gwpe_ != nullptr) std::memset(gwpe_, 0, sz(t_ * c_) * sizeof(float));
    if (spec().sparse) {
      // One gradient row per distinct id (the ids of the last forward), pushed as the step's sparse gradient.
      std::vector<float> g(ids_.size() * sz(c_), 0.0f);
      for (int64_t r = 0; r < batch * t_; ++r) {
        ArrMap(g.data() + sz(slot_[sz(r)]) * sz(c_), c_) += ConstArrMap(dy + r * c_, c_);
        if (gwpe_ != nullptr) ArrMap(gwpe_ + (r % t_) * c_, c_) += ConstArrMap(dy + r * c_, c_);
      }
      source_->push(table_, ids_, std::move(g));
      return;
    }
    // A tied lm_head has already written (or added to) the token table's gradient in this backward.
    if (!accumulate && !spec().tied) std::memset(gwte_, 0, sz(v_ * c_) * sizeof(float));
    for (int64_t r = 0; r < batch * t_; ++r) {
      ConstArrMap g(dy + r * c_, c_);
      ArrMap(gwte_ + token(x[r], r) * c_, c_) += g;
      if (gwpe_ != nullptr) ArrMap(gwpe_ + (r % t_) * c_, c_) += g;
    }
  }

 private:
  int64_t token(float v, int64_t r) const {
    const auto tok = static_cast<int64_t>(std::nearbyint(v));
    DTRAIN_CHECK(tok >= 0 && tok < v_, "{}: token id {} at position {} is outside [0, {}) (vocab_size)", spec().path, v,
                 r % t_, v_);
    return tok;
  }

  // Dedups the batch's ids into ids_ (ascending) and slot_ (each occurrence's index in ids_), pulls the rows.
  const float* pullRows(const float* x, int batch) {
    DTRAIN_CHECK(source_ != nullptr, "{}: a sparse embedding needs its table's holder (the parameter-server "
                 "strategy, or a local table for one process)", spec().path);
    const int64_t n = batch * t_;
    ids_.clear();
    for (int64_t r = 0; r < n; ++r) ids_.push_back(token(x[r], r));
    std::sort(ids_.begin(), ids_.end());
    ids_.erase(std::unique(ids_.begin(), ids_.end()), ids_.end());
    for (int64_t r = 0; r < n; ++r)
      slot_[sz(r)] = std::lower_bound(ids_.begin(), ids_.end(), token(x[r], r)) - ids_.begin();
    source_->pull(table_, ids_, std::span<float>(rows_.data(), ids_.size() * sz(c_)));
    return rows_.data();
  }

  int64_t t_, c_, v_;
  float* wte_ = nullptr;
  float* wpe_ = nullptr;
  float* gwte_ = nullptr;
  float* gwpe_ = nullptr;
  // Sparse: the table's holder, this table's index, the last forward's distinct ids, each occurrence's slot and
  // the pulled rows (ids_.size() x c_ of maxBatch * t_ x c_).
  SparseRows* source_ = nullptr;
  int table_ = 0;
  std::vector<int64_t> ids_;
  std::vector<int64_t> slot_;
  AlignedBuffer<float> rows_;
};

// logits = x W^T, W [V, C]: its own "weight", or (tied) the embedding's token table, as nanoGPT's lm_head.
class LmHead final : public Layer {
 public:
  explicit LmHead(const LayerSpec& spec)
      : Layer(spec, Device::cpu()), t_(spec.input[0]), c_(spec.input[1]), v_(spec.vocab) {}

  void bind(float* params, float* grads) override { w_ = params, gw_ = grads; }
  void bindTied(const float* weight, float* grad) override { w_ = weight, gw_ = grad; }

  void initParams(InitRng& rng) override {
    const double std = spec().initStd;
    const double bound = 1.0 / std::sqrt(static_cast<double>(c_));
    for (int64_t i = 0; i < v_ * c_; ++i) gwInit()[i] = std > 0 ? rng.normal(std) : rng.symmetric(bound);
  }

  void forward(const float* x, float* y, int batch, bool) override {
    const Eigen::Index rows = batch * t_;
    MatMap(y, rows, v_).noalias() = ConstMatMap(x, rows, c_) * ConstMatMap(w_, v_, c_).transpose();
  }

  void backward(const float* x, const float*, const float* dy, float* dx, int batch, bool accumulate) override {
    const Eigen::Index rows = batch * t_;
    ConstMatMap dY(dy, rows, v_);
    MatMap dW(gw_, v_, c_);
    if (accumulate) {
      dW.noalias() += dY.transpose() * ConstMatMap(x, rows, c_);
    } else {
      dW.noalias() = dY.transpose() * ConstMatMap(x, rows, c_);
    }
    if (dx != nullptr) MatMap(dx, rows, c_).noalias() = dY * ConstMatMap(w_, v_, c_);
  }

 private:
  // Only an untied head owns (and initialises) its weight: bind() gave it a writable arena slice.
  float* gwInit() { return const_cast<float*>(w_); }

  int64_t t_, c_, v_;
  const float* w_ = nullptr;
  float* gw_ = nullptr;
};

// y = x + f(x), f the block's layers in sequence (a pre-LayerNorm transformer's residual branch). The children's
// parameters are the block's, consecutive, named "<child name or index>.<suffix>"; their outputs live in the
// block's own buffers for maxBatch samples, except the last child's when its backward never reads it
// (blockAddsInPlace: attention, a linear): that child writes into y and the residual is added there in place.
class Block final : public Layer {
 public:
  Block(const LayerSpec& spec, const LayerBuild& build) : Layer(spec, Device::cpu()), inPlace_(blockAddsInPlace(spec)) {
    size_t maxIn = 0;
    for (const auto& c : spec.children) {
      children_.push_back(makeLayer(c, build));
      const size_t n = sz(build.maxBatch) * sz(c.output.numel());
      const bool last = outs_.size() + 1 == spec.children.size();
      outs_.emplace_back(children_.back()->aliasesInput() || (last && inPlace_) ? 0 : n);
      maxIn = std::max(maxIn, sz(build.maxBatch) * sz(c.input.numel()));
      counts_.push_back(sz(paramCountOf(c)));
    }
    // The gradients between the children live only inside one backward: the model's blocks share them.
    scratch_ = build.scratch;
    if (scratch_ != nullptr) {
      scratch_->reserve(SharedScratch::kGradA, maxIn);
      scratch_->reserve(SharedScratch::kGradB, maxIn);
    } else {
      gradA_ = AlignedBuffer<float>(maxIn);
      gradB_ = AlignedBuffer<float>(maxIn);
    }
    in_.assign(children_.size(), nullptr);
    out_.assign(children_.size(), nullptr);
    reseed(build.seed, 0);  // the children's streams as Model::reseedDropout(build.seed, 0) keys them
  }

  void bind(float* params, float* grads) override {
    for (size_t i = 0; i < children_.size(); ++i) {
      if (counts_[i] > 0) children_[i]->bind(params, grads);
      params += counts_[i], grads += counts_[i];
    }
  }

  void initParams(InitRng& rng) override {
    for (size_t i = 0; i < children_.size(); ++i)
      if (counts_[i] > 0) children_[i]->initParams(rng);
  }

  // The children draw from the block's own seed and position, both mixed with the block's index: a child's index is
  // its index inside the block, so two blocks' children at the same index (a pinned-seed dropout included, which
  // ignores the seed and is keyed by its seed, the position and that index) would otherwise draw the same masks.
  // The position stays a function of the trainer's step and micro-batch only: every rank, any job seed, a resume
  // and the CUDA block (lib/nn/cuda/layers_gpt.cpp, the same rule) draw the same masks.
  void reseed(uint64_t seed, uint64_t position) override {
    const uint64_t salt = static_cast<uint64_t>(spec().index) + 1000;
    for (auto& c : children_) c->reseed(detail::mixSeed(seed, salt), detail::mixSeed(position, salt));
  }

  void forward(const float* x, float* y, int batch, bool train) override {
    const float* in = x;
    for (size_t i = 0; i < children_.size(); ++i) {
      const bool intoY = inPlace_ && i + 1 == children_.size();
      float* out = intoY ? y : outs_[i].size() > 0 ? outs_[i].data() : const_cast<float*>(in);
      if (out != in) children_[i]->forward(in, out, batch, train);
      in_[i] = in, out_[i] = out;  // in place: out_ is y, overwritten below; that child's backward never reads it
      in = out;
    }
    const Eigen::Index n = batch * spec().output.numel();
    ArrMap(y, n) = ConstArrMap(x, n) + ConstArrMap(in, n);  // in == y when in place: elementwise, so no aliasing
  }

  void backward(const float*, const float*, const float* dy, float* dx, int batch, bool accumulate) override {
    float* gradA = scratch_ != nullptr ? scratch_->data(SharedScratch::kGradA) : gradA_.data();
    float* gradB = scratch_ != nullptr ? scratch_->data(SharedScratch::kGradB) : gradB_.data();
    const float* g = dy;  // d(branch output) = dy
    for (size_t k = children_.size(); k-- > 0;) {
      const bool aliasing = out_[k] == in_[k];
      float* d = nullptr;
      if (k > 0 || dx != nullptr) d = g == gradA ? gradB : gradA;
      if (!aliasing) children_[k]->backward(in_[k], out_[k], g, d, batch, accumulate);
      if (!aliasing) g = d;
    }
    if (dx == nullptr) return;
    const Eigen::Index n = batch * spec().input.numel();
    ArrMap(dx, n) = ConstArrMap(dy, n) + ConstArrMap(g, n);
  }

 private:
  bool inPlace_;  // blockAddsInPlace: the last child writes into y (its outs_ entry is empty)
  std::vector<std::unique_ptr<Layer>> children_;
  std::vector<AlignedBuffer<float>> outs_;
  std::vector<size_t> counts_;
  SharedScratch* scratch_ = nullptr;
  AlignedBuffer<float> gradA_, gradB_;  // when built without a shared scratch
  std::vector<const float*> in_;
  std::vector<float*> out_;
};

// --- Registry entries. ---

void parseEmbedding(const JsonFields& f, LayerSpec& l) {
  f.allowOnly({"type", "vocab_size", "n_embd", "position", "init_std", "sparse"});
  l.vocab = checkSize(f, "vocab_size", f.integer("vocab_size", "an integer >= 1", positive));
  l.out = checkSize(f, "n_embd", f.integer("n_embd", "an integer >= 1", positive));
  l.position = f.boolean("position", true);
  l.sparse = f.boolean("sparse", false);
  l.initStd = initStdField(f, "init_std");
  if (l.input.rank() != 1)
    f.fail(fmt::format("embedding expects token ids [N, T] but gets {}; set the model input to [T]",
                       l.input.batchStr()));
  l.output = Shape{l.input[0], l.out};
}

std::vector<ParamShape> embeddingParams(const LayerSpec& l) {
  // A sparse table is not in the arena (lib/nn/sparse_rows.h): Model::sparseTables() lists it instead.
  std::vector<ParamShape> p;
  if (!l.sparse) p.push_back({"wte.weight", Shape{l.vocab, l.out}});
  if (l.position) p.push_back({"wpe.weight", Shape{l.input[0], l.out}});
  return p;
}

std::string embeddingDetail(const LayerSpec& l) {
  return fmt::format("vocab {} -> {}{}{}{}", l.vocab, l.out, l.position ? ", +position" : "", l.tied ? ", tied" : "",
                     l.sparse ? ", sparse" : "");
}

// Each child's output (in the block's own buffers; half the floats where it is stored as bf16; none for the last
// child when blockAddsInPlace: it writes into the block's output) and what the child keeps itself.
int64_t blockKept(const LayerSpec& l, const MemoryTarget& target) {
  const bool bf16 = target.cuda && target.bf16;
  const std::vector<char> stored = bf16 ? bf16StoredOutputs(l.children) : std::vector<char>(l.children.size(), 0);
  const bool inPlace = blockAddsInPlace(l);
  double n = 0;
  for (size_t i = 0; i < l.children.size(); ++i) {
    const LayerSpec& c = l.children[i];
    const bool intoY = inPlace && i + 1 == l.children.size();
    const double out = intoY ? 0.0 : static_cast<double>(c.output.numel());
    n += (stored[i] != 0 ? std::ceil(out / 2) : out) + static_cast<double>(keptFloatsOf(c, target));
  }
  return n >= 9.2e18 ? std::numeric_limits<int64_t>::max() : static_cast<int64_t>(n);
}

void parseLmHead(const JsonFields& f, LayerSpec& l) {
  f.allowOnly({"type", "vocab_size", "tied", "init_std"});
  requireSequence(f, l, "lm_head");
  l.vocab = checkSize(f, "vocab_size", f.integer("vocab_size", "an integer >= 1", positive));
  l.tied = f.boolean("tied", true);
  l.initStd = initStdField(f, "init_std");
  l.output = Shape{l.input[0], l.vocab};
}

std::vector<ParamShape> lmHeadParams(const LayerSpec& l) {
  if (l.tied) return {};
  return {{"weight", Shape{l.vocab, l.input[1]}}};
}

std::string lmHeadDetail(const LayerSpec& l) {
  return fmt::format("{} -> {}{}", l.input[1], l.vocab,
                     l.tied ? fmt::format(", tied to layer {}", l.tiedTo) : std::string());
}

void parseBlock(const JsonFields& f, LayerSpec& l) {
  f.allowOnly({"type", "layers"});
  const auto& layers = f.at("layers");
  if (!layers.is_array() || layers.empty())
    f.failAt("layers", fmt::format("expected a non-empty list of layer objects, got {}", jsonSnippet(layers)));
  Shape current = l.input;
  for (size_t i = 0; i < layers.size(); ++i) {
    const std::string path = f.pathOf("layers") + "/" + std::to_string(i);
    l.children.push_back(parseLayerSpec(layers[i], f.source(), path, static_cast<int>(i), current));
    const LayerSpec& c = l.children.back();
    if (c.type() == "lm_head" && c.tied)
      throwConfig(f.source(), path, "a tied lm_head cannot sit inside a block; put it after the blocks");
    // Blocks share their backward scratch (SharedScratch), which a block inside a block would overwrite.
    if (c.type() == "block") throwConfig(f.source(), path, "a block cannot contain a block; list them one after another");
    current = c.output;
  }
  if (current != l.input)
    f.fail(fmt::format("a block adds its layers' output to its input, so they must keep the shape {} but give {}",
                       l.input.batchStr(), current.batchStr()));
  l.output = l.input;
}

std::vector<ParamShape> blockParams(const LayerSpec& l) {
  std::vector<ParamShape> out;
  for (const auto& c : l.children)
    for (auto& p : paramShapesOf(c)) {
      p.suffix = c.paramPrefix() + "." + p.suffix;
      out.push_back(std::move(p));
    }
  return out;
}

std::string blockDetail(const LayerSpec& l) {
  std::string s = "x + ";
  for (size_t i = 0; i < l.children.size(); ++i) {
    const LayerSpec& c = l.children[i];
    s += (i ? ">" : "") + (c.name.empty() ? std::string(c.type()) : c.name);
  }
  return s;
}

std::unique_ptr<Layer> makeEmbedding(const LayerSpec& s, const LayerBuild& b) {
  return std::make_unique<Embedding>(s, b.maxBatch);
}
std::unique_ptr<Layer> makeLmHead(const LayerSpec& s, const LayerBuild&) { return std::make_unique<LmHead>(s); }
std::unique_ptr<Layer> makeBlock(const LayerSpec& s, const LayerBuild& b) { return std::make_unique<Block>(s, b); }

}  // namespace

const LayerKind& embeddingKind() {
  static constexpr LayerKind kind{.name = "embedding", .parse = parseEmbedding, .paramShapes = embeddingParams,
                                  .detail = embeddingDetail, .cpu = makeEmbedding, .cuda = DTRAIN_NN_CUDA(makeEmbedding),
                                  .backwardIgnoresOutput = true, .exampleLayer = R"({"type": "embedding", "vocab_size": 5, "n_embd": 4})",
                                  .exampleInput = "[3]"};
  return kind;
}

const LayerKind& lmHeadKind() {
  static constexpr LayerKind kind{.name = "lm_head", .parse = parseLmHead, .paramShapes = lmHeadParams,
                                  .detail = lmHeadDetail, .cpu = makeLmHead, .cuda = DTRAIN_NN_CUDA(makeLmHead),
                                  .bf16Input = true, .backwardIgnoresOutput = true, .bf16OutputGrad = true,
                                  .exampleLayer = R"({"type": "lm_head", "vocab_size": 5, "tied": false})",
                                  .exampleInput = "[3, 4]"};
  return kind;
}

const LayerKind& blockKind() {
  static constexpr LayerKind kind{
      .name = "block", .parse = parseBlock, .paramShapes = blockParams, .detail = blockDetail, .cpu = makeBlock, .cuda = DTRAIN_NN_CUDA(makeBlock),
      .backwardIgnoresOutput = true, .exampleLayer = R"({"type": "block", "layers": [{"type": "layernorm"}, {"type": "linear", "out": 4}]})",
      .exampleInput = "[3, 4]", .keptFloats = blockKept};
  return kind;
}

const LayerKind& attentionKind();  // layers_attention.cpp

// Whether the layer or any layer inside it draws random numbers in training (dropout inside a block).
bool drawsRandom(const LayerSpec& spec) {
  if (spec.kind != nullptr && spec.kind->random) return true;
  if (spec.kind == &attentionKind() && spec.p > 0) return true;  // attention dropout
  return std::any_of(spec.children.begin(), spec.children.end(), drawsRandom);
}

namespace detail {

double initStdField(const JsonFields& f, std::string_view key) {
  return f.number(key, 0.0, "a number >= 0 (0: PyTorch's default initialisation)", [](double v) { return v >= 0; });
}

void requireSequence(const JsonFields& f, const LayerSpec& l, const char* type) {
  if (l.input.rank() != 2)
    f.fail(fmt::format("{} expects input [N, T, C] (a sequence of vectors) but gets {}", type, l.input.batchStr()));
}

}  // namespace detail

}  // namespace dtrain::nn
