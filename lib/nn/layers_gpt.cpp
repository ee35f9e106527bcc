// Transformer layers: embedding, causal_self_attention, lm_head and the residual block container, with their
// registry entries (docs/model-spec.md "Transformers"). Shapes are per sample: tokens [T] (token ids carried as
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
using detail::ConstArrMap;
using detail::ConstMatMap;
using detail::MatMap;
using detail::positive;
using detail::RowMat;

using StridedMap = Eigen::Map<RowMat, 0, Eigen::OuterStride<>>;
using ConstStridedMap = Eigen::Map<const RowMat, 0, Eigen::OuterStride<>>;

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

// Causal multi-head self-attention, nanoGPT's CausalSelfAttention (its resid_dropout is a dropout layer after it):
//   q, k, v = split(x c_attn^T + b, C);  per head h (hs = C / H columns):
//   P = softmax(mask(q_h k_h^T / sqrt(hs)));  y_h = dropout(P) v_h;  out = concat_h(y_h) c_proj^T + b.
// Dropout on P (nanoGPT's attn_dropout, "dropout" > 0, training only) keeps element (i, j <= i) with probability
// 1 - p and scales it by 1 / (1 - p); its masks come from the layer's own stream, reseeded every step by the
// trainer (Model::reseedDropout), so a run is deterministic per seed and resumes bit for bit. The dropped
// probabilities are kept beside P for backward (another maxBatch * H * T * T floats).
// Per sample and head the scores are GEMMs over strided views of the stacked qkv buffer (no copies), one per
// block of 32 query rows against the keys it may see: the masked upper triangle is skipped block-wise (62.5% of
// the full square's work at T = 128) while every product stays large enough for Eigen's fast kernel. qkv, the
// concatenated heads and the probabilities are kept for backward (maxBatch * (4C + H*T) * T floats).
// Tensor-parallel (spec().shard kHeads, lib/nn/tensor_parallel.h): the rank computes its H / size heads, w = C /
// size columns of q, k, v and of the concatenated heads; c_proj's partial output is all-reduced before its
// (whole) bias is added, and dx is all-reduced in backward. With one rank w = C and nothing is communicated.
class CausalSelfAttention final : public Layer {
 public:
  CausalSelfAttention(const LayerSpec& spec, int maxBatch, SharedScratch* scratch, TensorGroup* group, uint64_t seed)
      : Layer(spec, Device::cpu()), t_(spec.input[0]), c_(spec.input[1]), parts_(spec.shard.size),
        h_(spec.nHead / parts_), hs_(c_ / spec.nHead), w_(h_ * hs_), rows_(sz(maxBatch) * sz(t_)),
        qkv_(rows_ * sz(3 * w_)), att_(rows_ * sz(w_)), probs_(sz(maxBatch) * sz(h_ * t_ * t_)),
        dprobs_(sz(t_ * t_)), dropped_(spec.p > 0 ? sz(maxBatch) * sz(h_ * t_ * t_) : 0), scratch_(scratch),
        group_(spec.shard.kind == TensorShard::kHeads ? group : nullptr) {
    DTRAIN_CHECK(spec.shard.kind != TensorShard::kHeads || group_ != nullptr,
                 "{}: a tensor-parallel attention layer needs its tensor group", spec.path);
    reseed(seed);
    // dqkv and datt live only inside one backward: the model's attention layers share them.
    if (scratch_ != nullptr) scratch_->reserve(SharedScratch::kAttention, rows_ * sz(4 * w_));
    else own_ = AlignedBuffer<float>(rows_ * sz(4 * w_));
  }

  void bind(float* params, float* grads) override {
    wAttn_ = params, gwAttn_ = grads;
    size_t at = sz(3 * w_ * c_);
    if (spec().bias) bAttn_ = params + at, gbAttn_ = grads + at, at += sz(3 * w_);
    wProj_ = params + at, gwProj_ = grads + at, at += sz(c_ * w_);
    if (spec().bias) bProj_ = params + at, gbProj_ = grads + at;
  }

  void reseed(uint64_t seed) override { engine_.seed(detail::mixSeed(seed, static_cast<uint64_t>(spec().index))); }

  void initParams(InitRng& rng) override {
    if (group_ != nullptr) return initShard(rng);
    initLinear(rng, wAttn_, bAttn_, 3 * c_, spec().initStd);
    initLinear(rng, wProj_, bProj_, c_, spec().projInitStd > 0 ? spec().projInitStd : spec().initStd);
  }

  void forward(const float* x, float* y, int batch, bool train) override {
    const Eigen::Index rows = batch * t_;
    dropping_ = train && spec().p > 0;
    MatMap qkv(qkv_.data(), rows, 3 * w_);
    qkv.noalias() = ConstMatMap(x, rows, c_) * ConstMatMap(wAttn_, 3 * w_, c_).transpose();
    if (bAttn_ != nullptr) qkv.rowwise() += Eigen::Map<const Eigen::RowVectorXf>(bAttn_, 3 * w_);
    const float scale = 1.0f / std::sqrt(static_cast<float>(hs_));
    for (int b = 0; b < batch; ++b) {
      for (int64_t h = 0; h < h_; ++h) {
        const float* base = qkv_.data() + b * t_ * 3 * w_ + h * hs_;
        ConstStridedMap q(base, t_, hs_, Eigen::OuterStride<>(3 * w_));
        ConstStridedMap k(base + w_, t_, hs_, Eigen::OuterStride<>(3 * w_));
        ConstStridedMap v(base + 2 * w_, t_, hs_, Eigen::OuterStride<>(3 * w_));
        MatMap p(probs(b, h), t_, t_);
        StridedMap out(att_.data() + b * t_ * w_ + h * hs_, t_, hs_, Eigen::OuterStride<>(w_));
        // Row block [i0, i1) attends to columns [0, i1) only: the rest of its rows is masked.
        for (int64_t i0 = 0; i0 < t_; i0 += kRowBlock) {
          const int64_t rb = std::min(kRowBlock, t_ - i0), i1 = i0 + rb;
          p.block(i0, 0, rb, i1).noalias() = q.middleRows(i0, rb) * k.topRows(i1).transpose();
          for (int64_t i = i0; i < i1; ++i) softmaxRow(p.row(i).data(), i + 1, i1, scale);
          if (dropping_) {
            MatMap pd(dropped(b, h), t_, t_);
            for (int64_t i = i0; i < i1; ++i) dropRow(p.row(i).data(), pd.row(i).data(), i + 1, i1);
            out.middleRows(i0, rb).noalias() = pd.block(i0, 0, rb, i1) * v.topRows(i1);
          } else {
            out.middleRows(i0, rb).noalias() = p.block(i0, 0, rb, i1) * v.topRows(i1);
          }
        }
      }
    }
    MatMap Y(y, rows, c_);
    Y.noalias() = ConstMatMap(att_.data(), rows, w_) * ConstMatMap(wProj_, c_, w_).transpose();
    if (group_ != nullptr) group_->allReduceSum(y, sz(rows * c_));
    if (bProj_ != nullptr) Y.rowwise() += Eigen::Map<const Eigen::RowVectorXf>(bProj_, c_);
  }

  void backward(const float* x, const float*, const float* dy, float* dx, int batch, bool accumulate) override {
    const Eigen::Index rows = batch * t_;
    float* dqkvData = scratch_ != nullptr ? scratch_->data(SharedScratch::kAttention) : own_.data();
    float* dattData = dqkvData + rows_ * sz(3 * w_);
    ConstMatMap dY(dy, rows, c_);
    ConstMatMap att(att_.data(), rows, w_);
    linearGrads(dY, att, gwProj_, gbProj_, c_, w_, accumulate);
    MatMap dAtt(dattData, rows, w_);
    dAtt.noalias() = dY * ConstMatMap(wProj_, c_, w_);
    const float scale = 1.0f / std::sqrt(static_cast<float>(hs_));
    MatMap dP(dprobs_.data(), t_, t_);
    for (int b = 0; b < batch; ++b) {
      for (int64_t h = 0; h < h_; ++h) {
        const int64_t off = b * t_ * 3 * w_ + h * hs_;
        const Eigen::OuterStride<> s3(3 * w_);
        ConstStridedMap q(qkv_.data() + off, t_, hs_, s3);
        ConstStridedMap k(qkv_.data() + off + w_, t_, hs_, s3);
        ConstStridedMap v(qkv_.data() + off + 2 * w_, t_, hs_, s3);
        StridedMap dq(dqkvData + off, t_, hs_, s3);
        StridedMap dk(dqkvData + off + w_, t_, hs_, s3);
        StridedMap dv(dqkvData + off + 2 * w_, t_, hs_, s3);
        ConstStridedMap dOut(dattData + b * t_ * w_ + h * hs_, t_, hs_, Eigen::OuterStride<>(w_));
        MatMap p(probs(b, h), t_, t_);
        MatMap pd(dropping_ ? dropped(b, h) : probs(b, h), t_, t_);  // what multiplied v in forward
        const float keep = dropping_ ? 1.0f / static_cast<float>(1.0 - spec().p) : 1.0f;
        // Row blocks as in forward, the last first: it covers every column, so it assigns dv and dk, and the
        // earlier blocks add to their first i1 rows.
        for (int64_t i0 = (t_ - 1) / kRowBlock * kRowBlock; i0 >= 0; i0 -= kRowBlock) {
          const int64_t rb = std::min(kRowBlock, t_ - i0), i1 = i0 + rb;
          const bool all = i1 == t_;
          auto dOutRows = dOut.middleRows(i0, rb);
          if (all) {
            dv.noalias() = pd.block(i0, 0, rb, i1).transpose() * dOutRows;
          } else {
            dv.topRows(i1).noalias() += pd.block(i0, 0, rb, i1).transpose() * dOutRows;
          }
          auto dS = dP.block(i0, 0, rb, i1);
          dS.noalias() = dOutRows * v.topRows(i1).transpose();
          if (dropping_) {
            // Through the dropout: d(P) = d(dropped P) x 1 / (1 - p) where kept, 0 where dropped (a kept element
            // that is exactly 0 has P = 0 too, and the softmax backward below multiplies by P).
            dS.array() = (pd.block(i0, 0, rb, i1).array() != 0.0f).select(dS.array() * keep, 0.0f);
          }
          // Softmax backward per row over the unmasked prefix: dS = P * (dP - sum(dP * P)) * scale, 0 where masked.
          for (int64_t i = i0; i < i1; ++i) {
            ConstArrMap pr(p.row(i).data(), i + 1);
            ArrMap dr(dP.row(i).data(), i + 1);
            const float dot = (pr * dr).sum();
            dr = pr * (dr - dot) * scale;
            std::fill(dP.row(i).data() + i + 1, dP.row(i).data() + i1, 0.0f);
          }
          dq.middleRows(i0, rb).noalias() = dS * k.topRows(i1);
          if (all) {
            dk.noalias() = dS.transpose() * q.middleRows(i0, rb);
          } else {
            dk.topRows(i1).noalias() += dS.transpose() * q.middleRows(i0, rb);
          }
        }
      }
    }
    ConstMatMap dQkv(dqkvData, rows, 3 * w_);
    linearGrads(dQkv, ConstMatMap(x, rows, c_), gwAttn_, gbAttn_, 3 * w_, c_, accumulate);
    if (dx == nullptr) return;
    MatMap(dx, rows, c_).noalias() = dQkv * ConstMatMap(wAttn_, 3 * w_, c_);
    if (group_ != nullptr) group_->allReduceSum(dx, sz(rows * c_));
  }

 private:
  float* probs(int b, int64_t h) { return probs_.data() + (b * h_ + h) * t_ * t_; }
  float* dropped(int b, int64_t h) { return dropped_.data() + (b * h_ + h) * t_ * t_; }

  // Rows of the causal mask's blocks: 32 rows attend to at most 32 more columns than they need, so the
  // products cost (T / 32 + 1) / (2 T / 32) of the full square (62.5% at T = 128) and stay large enough for Eigen's
  // fast kernel.
  static constexpr int64_t kRowBlock = 32;

  // out[0, end) = dropout(p[0, n)) then zeros: one draw per element j < n in order (the row's causal prefix).
  void dropRow(const float* p, float* out, int64_t n, int64_t end) {
    const double drop = spec().p;
    const float keep = 1.0f / static_cast<float>(1.0 - drop);
    for (int64_t j = 0; j < n; ++j) {
      const double u = static_cast<double>(engine_() >> 40) * 0x1.0p-24;
      out[j] = u >= drop ? p[j] * keep : 0.0f;
    }
    std::fill(out + n, out + end, 0.0f);
  }

  // Softmax of row[0..n) scaled by `scale` (stable: shifted by the maximum; Eigen's vectorised exp); row[n..end)
  // becomes 0 (the mask inside the row's block).
  static void softmaxRow(float* row, int64_t n, int64_t end, float scale) {
    ArrMap r(row, n);
    const float m = r.maxCoeff();
    r = ((r - m) * scale).exp();
    r *= 1.0f / r.sum();
    std::fill(row + n, row + end, 0.0f);
  }

  // dW (+)= dY^T X, db (+)= column sums of dY.
  static void linearGrads(const ConstMatMap& dY, const ConstMatMap& X, float* gw, float* gb, int64_t out, int64_t in,
                          bool accumulate) {
    MatMap dW(gw, out, in);
    if (accumulate) {
      dW.noalias() += dY.transpose() * X;
    } else {
      dW.noalias() = dY.transpose() * X;
    }
    if (gb == nullptr) return;
    Eigen::Map<Eigen::RowVectorXf> db(gb, out);
    if (!accumulate) db.setZero();
    db += dY.colwise().sum();
  }

  // nn.Linear's default (kaiming uniform, bias U(+-1/sqrt(in))) or normal(0, std) with a zero bias.
  void initLinear(InitRng& rng, float* w, float* b, int64_t out, double std) const {
    const double bound = 1.0 / std::sqrt(static_cast<double>(c_));
    for (int64_t i = 0; i < out * c_; ++i) w[i] = std > 0 ? rng.normal(std) : rng.symmetric(bound);
    if (b == nullptr) return;
    for (int64_t i = 0; i < out; ++i) b[i] = std > 0 ? 0.0f : rng.symmetric(bound);
  }

  // initLinear's draws for the full c_attn [3C, C] and c_proj [C, C], keeping the head group's q, k, v rows
  // [k * C + rank * w, +w) and c_proj's columns [rank * w, +w).
  void initShard(InitRng& rng) {
    const int64_t r = spec().shard.rank;
    const double bound = 1.0 / std::sqrt(static_cast<double>(c_));
    auto drawer = [&](double std) {
      return [&rng, std, bound] { return std > 0 ? rng.normal(std) : rng.symmetric(bound); };
    };
    auto attn = drawer(spec().initStd);
    for (int64_t k = 0; k < 3; ++k) {
      detail::drawBlock(wAttn_ + k * w_ * c_, c_, c_, r * w_, w_, 0, c_, attn);
    }
    if (bAttn_ != nullptr) {
      for (int64_t k = 0; k < 3; ++k) {
        if (spec().initStd > 0) std::fill(bAttn_ + k * w_, bAttn_ + (k + 1) * w_, 0.0f);
        else detail::drawBlock(bAttn_ + k * w_, 1, c_, 0, 1, r * w_, w_, attn);
      }
    }
    auto proj = drawer(spec().projInitStd > 0 ? spec().projInitStd : spec().initStd);
    detail::drawBlock(wProj_, c_, c_, 0, c_, r * w_, w_, proj);
    if (bProj_ != nullptr) {
      const double std = spec().projInitStd > 0 ? spec().projInitStd : spec().initStd;
      for (int64_t i = 0; i < c_; ++i) bProj_[i] = std > 0 ? 0.0f : proj();
    }
  }

  int64_t t_, c_;
  int parts_;          // tensor-parallel ranks sharing the heads (1: the whole layer)
  int64_t h_, hs_, w_;  // this rank's heads, the head size, this rank's columns of q/k/v (h_ * hs_)
  size_t rows_;
  AlignedBuffer<float> qkv_, att_, probs_, dprobs_;
  AlignedBuffer<float> dropped_;  // dropout(P), when "dropout" > 0
  SharedScratch* scratch_;
  std::mt19937_64 engine_;
  bool dropping_ = false;  // the last forward applied dropout (training with p > 0)
  AlignedBuffer<float> own_;  // dqkv + datt when built without a shared scratch
  TensorGroup* group_;        // the tensor group when split by heads; else null
  float* wAttn_ = nullptr;
  float* bAttn_ = nullptr;
  float* wProj_ = nullptr;
  float* bProj_ = nullptr;
  float* gwAttn_ = nullptr;
  float* gbAttn_ = nullptr;
  float* gwProj_ = nullptr;
  float* gbProj_ = nullptr;
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
// block's own buffers for maxBatch samples.
class Block final : public Layer {
 public:
  Block(const LayerSpec& spec, const LayerBuild& build) : Layer(spec, Device::cpu()) {
    size_t maxIn = 0;
    for (const auto& c : spec.children) {
      children_.push_back(makeLayer(c, build));
      const size_t n = sz(build.maxBatch) * sz(c.output.numel());
      outs_.emplace_back(children_.back()->aliasesInput() ? 0 : n);
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

  void reseed(uint64_t seed) override {
    for (auto& c : children_) c->reseed(detail::mixSeed(seed, static_cast<uint64_t>(spec().index) + 1000));
  }

  void forward(const float* x, float* y, int batch, bool train) override {
    const float* in = x;
    for (size_t i = 0; i < children_.size(); ++i) {
      float* out = outs_[i].size() > 0 ? outs_[i].data() : const_cast<float*>(in);
      if (outs_[i].size() > 0) children_[i]->forward(in, out, batch, train);
      in_[i] = in, out_[i] = out;
      in = out;
    }
    const Eigen::Index n = batch * spec().output.numel();
    ArrMap(y, n) = ConstArrMap(x, n) + ConstArrMap(in, n);
  }

  void backward(const float*, const float*, const float* dy, float* dx, int batch, bool accumulate) override {
    float* gradA = scratch_ != nullptr ? scratch_->data(SharedScratch::kGradA) : gradA_.data();
    float* gradB = scratch_ != nullptr ? scratch_->data(SharedScratch::kGradB) : gradB_.data();
    const float* g = dy;  // d(branch output) = dy
    for (size_t k = children_.size(); k-- > 0;) {
      const bool aliasing = outs_[k].size() == 0;
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
  std::vector<std::unique_ptr<Layer>> children_;
  std::vector<AlignedBuffer<float>> outs_;
  std::vector<size_t> counts_;
  SharedScratch* scratch_ = nullptr;
  AlignedBuffer<float> gradA_, gradB_;  // when built without a shared scratch
  std::vector<const float*> in_;
  std::vector<float*> out_;
};

// --- Registry entries. ---

double initStdField(const JsonFields& f, std::string_view key) {
  return f.number(key, 0.0, "a number >= 0 (0: PyTorch's default initialisation)", [](double v) { return v >= 0; });
}

void requireSequence(const JsonFields& f, const LayerSpec& l, const char* type) {
  if (l.input.rank() != 2)
    f.fail(fmt::format("{} expects input [N, T, C] (a sequence of vectors) but gets {}", type, l.input.batchStr()));
}

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

void parseAttention(const JsonFields& f, LayerSpec& l) {
  f.allowOnly({"type", "n_head", "bias", "init_std", "proj_init_std", "dropout"});
  requireSequence(f, l, "causal_self_attention");
  l.nHead = checkSize(f, "n_head", f.integer("n_head", "an integer >= 1", positive));
  if (l.input[1] % l.nHead != 0)
    f.failAt("n_head", fmt::format("n_embd {} is not divisible by n_head {} (each head takes n_embd / n_head columns)",
                                   l.input[1], l.nHead));
  l.bias = f.boolean("bias", true);
  l.p = f.number("dropout", 0.0, "a probability in [0, 1) (dropout on the attention probabilities)",
                 [](double v) { return v >= 0 && v < 1; });
  l.initStd = initStdField(f, "init_std");
  l.projInitStd = initStdField(f, "proj_init_std");
  l.output = l.input;
}

// q, k, v and the concatenated heads [T, 4C], the probabilities [H, T, T] and, with dropout, their dropped copy.
int64_t attentionKept(const LayerSpec& l) {
  const double t = static_cast<double>(l.input[0]), c = static_cast<double>(l.input[1]);
  const double n = 4 * c * t + static_cast<double>(l.nHead) * t * t * (l.p > 0 ? 2 : 1);
  return n >= 9.2e18 ? std::numeric_limits<int64_t>::max() : static_cast<int64_t>(n);
}

// Each child's output (in the block's own buffers) and what the child keeps itself.
int64_t blockKept(const LayerSpec& l) {
  double n = 0;
  for (const auto& c : l.children)
    n += static_cast<double>(c.output.numel()) + static_cast<double>(keptFloatsOf(c));
  return n >= 9.2e18 ? std::numeric_limits<int64_t>::max() : static_cast<int64_t>(n);
}

std::vector<ParamShape> attentionParams(const LayerSpec& l) {
  const int64_t c = l.input[1];
  const TensorShard& t = l.shard;
  if (t.kind == TensorShard::kHeads) {
    // The rank's head group: rows [rank * w, +w) of each of q, k and v (three slices of c_attn), the matching
    // columns of c_proj; c_proj's bias is whole (added after the all-reduce).
    const int64_t w = c / t.size;
    std::vector<ParamShape> p;
    for (int64_t k = 0; k < 3; ++k) p.push_back({"c_attn.weight", Shape{w, c}, Shape{3 * c, c}, 0, k * c + t.rank * w});
    if (l.bias)
      for (int64_t k = 0; k < 3; ++k) p.push_back({"c_attn.bias", Shape{w}, Shape{3 * c}, 0, k * c + t.rank * w});
    p.push_back({"c_proj.weight", Shape{c, w}, Shape{c, c}, 1, t.rank * w});
    if (l.bias) p.push_back({"c_proj.bias", Shape{c}});
    return p;
  }
  std::vector<ParamShape> p{{"c_attn.weight", Shape{3 * c, c}}};
  if (l.bias) p.push_back({"c_attn.bias", Shape{3 * c}});
  p.push_back({"c_proj.weight", Shape{c, c}});
  if (l.bias) p.push_back({"c_proj.bias", Shape{c}});
  return p;
}

std::string attentionDetail(const LayerSpec& l) {
  return fmt::format("{} heads x {}, causal{}{}", l.nHead, l.input[1] / l.nHead, l.bias ? "" : ", no bias",
                     l.p > 0 ? fmt::format(", dropout {}", l.p) : "");
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
std::unique_ptr<Layer> makeAttention(const LayerSpec& s, const LayerBuild& b) {
  return std::make_unique<CausalSelfAttention>(s, b.maxBatch, b.scratch, b.tensor, b.seed);
}
std::unique_ptr<Layer> makeLmHead(const LayerSpec& s, const LayerBuild&) { return std::make_unique<LmHead>(s); }
std::unique_ptr<Layer> makeBlock(const LayerSpec& s, const LayerBuild& b) { return std::make_unique<Block>(s, b); }

}  // namespace

const LayerKind& embeddingKind() {
  static constexpr LayerKind kind{.name = "embedding", .parse = parseEmbedding, .paramShapes = embeddingParams,
                                  .detail = embeddingDetail, .cpu = makeEmbedding, .cuda = DTRAIN_NN_CUDA(makeEmbedding),
                                  .exampleLayer = R"({"type": "embedding", "vocab_size": 5, "n_embd": 4})",
                                  .exampleInput = "[3]"};
  return kind;
}

const LayerKind& attentionKind() {
  static constexpr LayerKind kind{.name = "causal_self_attention", .parse = parseAttention,
                                  .paramShapes = attentionParams, .detail = attentionDetail, .cpu = makeAttention, .cuda = DTRAIN_NN_CUDA(makeAttention),
                                  .exampleLayer = R"({"type": "causal_self_attention", "n_head": 2})",
                                  .exampleInput = "[3, 4]", .keptFloats = attentionKept};
  return kind;
}

const LayerKind& lmHeadKind() {
  static constexpr LayerKind kind{.name = "lm_head", .parse = parseLmHead, .paramShapes = lmHeadParams,
                                  .detail = lmHeadDetail, .cpu = makeLmHead, .cuda = DTRAIN_NN_CUDA(makeLmHead),
                                  .exampleLayer = R"({"type": "lm_head", "vocab_size": 5, "tied": false})",
                                  .exampleInput = "[3, 4]"};
  return kind;
}

const LayerKind& blockKind() {
  static constexpr LayerKind kind{
      .name = "block", .parse = parseBlock, .paramShapes = blockParams, .detail = blockDetail, .cpu = makeBlock, .cuda = DTRAIN_NN_CUDA(makeBlock),
      .exampleLayer = R"({"type": "block", "layers": [{"type": "layernorm"}, {"type": "linear", "out": 4}]})",
      .exampleInput = "[3, 4]", .keptFloats = blockKept};
  return kind;
}

// Whether the layer or any layer inside it draws random numbers in training (dropout inside a block).
bool drawsRandom(const LayerSpec& spec) {
  if (spec.kind != nullptr && spec.kind->random) return true;
  if (spec.kind == &attentionKind() && spec.p > 0) return true;  // attention dropout
  return std::any_of(spec.children.begin(), spec.children.end(), drawsRandom);
}

}  // namespace dtrain::nn
