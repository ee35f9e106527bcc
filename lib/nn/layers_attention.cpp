// causal_self_attention (nanoGPT's CausalSelfAttention) and its registry entry (docs/model-spec.md
// "Transformers"): per sample x [T, C] -> [T, C], parameters c_attn [3C, C] stacking q, k, v and c_proj [C, C] as
// nanoGPT names them, so a checkpoint's tensors load into its PyTorch module as they are. Split out of
// layers_gpt.cpp (the other transformer layers).
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>

#include "lib/common/aligned_buffer.h"
#include "lib/common/error.h"
#include "lib/common/json_fields.h"
#include "lib/nn/attention_kernel.h"
#include "lib/nn/cuda_impl.h"
#include "lib/nn/dropout_mask.h"
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

using StridedMap = Eigen::Map<RowMat, 0, Eigen::OuterStride<>>;
using ConstStridedMap = Eigen::Map<const RowMat, 0, Eigen::OuterStride<>>;

size_t sz(int64_t n) { return static_cast<size_t>(n); }

// Causal multi-head self-attention, nanoGPT's CausalSelfAttention (its resid_dropout is a dropout layer after it):
//   q, k, v = split(x c_attn^T + b, C);  per head h (hs = C / H columns):
//   P = softmax(mask(q_h k_h^T / sqrt(hs)));  y_h = dropout(P) v_h;  out = concat_h(y_h) c_proj^T + b.
// Dropout on P (nanoGPT's attn_dropout, "dropout" > 0, training only) keeps element (i, j <= i) with probability
// 1 - p and scales it by 1 / (1 - p); its masks come from the layer's own Philox stream (lib/gpu/philox.h: element
// ((sample * H + head) * T + i) * T + j of the full square, global head numbers under tensor parallelism, so the
// CUDA layer's kernels and a tensor-parallel run drop the same elements), reseeded every micro-batch by the trainer
// (Model::reseedDropout), so a run is deterministic per seed and resumes bit for bit. The dropped probabilities
// are kept beside P for backward (another maxBatch * H * T * T floats).
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
        stream_(std::nullopt, spec.index), group_(spec.shard.kind == TensorShard::kHeads ? group : nullptr) {
    DTRAIN_CHECK(spec.shard.kind != TensorShard::kHeads || group_ != nullptr,
                 "{}: a tensor-parallel attention layer needs its tensor group", spec.path);
    reseed(seed, 0);
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

  void reseed(uint64_t seed, uint64_t position) override { stream_.reseed(seed, position); }

  void initParams(InitRng& rng) override {
    if (group_ != nullptr) return initShard(rng);
    initLinear(rng, wAttn_, bAttn_, 3 * c_, spec().initStd);
    initLinear(rng, wProj_, bProj_, c_, spec().projInitStd > 0 ? spec().projInitStd : spec().initStd);
  }

  void forward(const float* x, float* y, int batch, bool train) override {
    const Eigen::Index rows = batch * t_;
    dropping_ = train && spec().p > 0;
    // The draw numbers the whole model's heads: every tensor rank takes the same span.
    if (dropping_) draw_ = stream_.next(sz(batch) * sz(spec().nHead * t_ * t_), spec().p, keepScale());
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
            for (int64_t i = i0; i < i1; ++i) dropRow(p.row(i).data(), pd.row(i).data(), i + 1, i1, element(b, h, i));
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
        const float keep = dropping_ ? keepScale() : 1.0f;
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

  // What a kept probability is multiplied by: 1 / (1 - p) rounded to float (the CUDA layer's too).
  float keepScale() const { return 1.0f / static_cast<float>(1.0 - spec().p); }

  // Element (i, 0) of sample b's local head h in the draw (lib/gpu/philox.h's numbering: the global head).
  uint64_t element(int b, int64_t h, int64_t i) const {
    const int64_t head = spec().shard.rank * h_ + h;
    return static_cast<uint64_t>(((b * spec().nHead + head) * t_ + i) * t_);
  }

  // out[0, end) = dropout(p[0, n)) then zeros, for the row whose element (i, 0) is `first` (its causal prefix:
  // elements first .. first + n - 1 of the forward's draw).
  void dropRow(const float* p, float* out, int64_t n, int64_t end, uint64_t first) const {
    detail::dropoutSelect(draw_, first, p, out, sz(n));
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
  detail::DropoutStream stream_;
  gpu::DropoutDraw draw_;  // the last training forward's draw
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

// Per sample: q, k, v and the concatenated heads [T, 4C] everywhere (with bf16 storage on a GPU q, k, v in bf16,
// and on the matmul path the heads too: 2.5C T floats' worth fused, 2C T matmul); besides, on the CPU the
// probabilities [H, T, T] and, with dropout, their dropped copy; on a GPU with the fused kernels the log-sum-exp rows
// [H, T]; on a GPU with the matmul path nothing (its one-sample score scratch is the model's, not per sample; its
// dropout mask is computed from a counter, not kept).
int64_t attentionKept(const LayerSpec& l, const MemoryTarget& target) {
  const double t = static_cast<double>(l.input[0]), c = static_cast<double>(l.input[1]);
  const double h = static_cast<double>(l.nHead);
  const bool fused = target.cuda && usesFusedAttention(l, target.attention);
  double n = !(target.cuda && target.bf16) ? 4 * c * t : fused ? 2.5 * c * t : 2 * c * t;
  if (!target.cuda) n += h * t * t * (l.p > 0 ? 2 : 1);
  else if (fused) n += h * t;
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

std::unique_ptr<Layer> makeAttention(const LayerSpec& s, const LayerBuild& b) {
  return std::make_unique<CausalSelfAttention>(s, b.maxBatch, b.scratch, b.tensor, b.seed);
}
std::atomic<AttentionKernel> gAttentionKernel{AttentionKernel::kAuto};

}  // namespace

std::string_view attentionKernelName(AttentionKernel k) noexcept {
  switch (k) {
    case AttentionKernel::kFused: return "fused";
    case AttentionKernel::kMatmul: return "matmul";
    case AttentionKernel::kAuto: break;
  }
  return "auto";
}

std::optional<AttentionKernel> parseAttentionKernel(std::string_view name) noexcept {
  for (const AttentionKernel k : {AttentionKernel::kAuto, AttentionKernel::kFused, AttentionKernel::kMatmul})
    if (name == attentionKernelName(k)) return k;
  return std::nullopt;
}

void setAttentionKernel(AttentionKernel k) noexcept { gAttentionKernel.store(k); }
AttentionKernel attentionKernel() noexcept { return gAttentionKernel.load(); }

std::string fusedAttentionGap(const LayerSpec& spec) {
  const int64_t hs = spec.input[1] / spec.nHead;
  if (hs > kFusedAttentionMaxHeadSize)
    return fmt::format("head size {} (n_embd {} / n_head {}) is above the fused kernels' {}", hs, spec.input[1],
                       spec.nHead, kFusedAttentionMaxHeadSize);
  return {};
}

int64_t matmulAttentionScratchBytes(const LayerSpec& spec) {
  const int64_t t = spec.input[0];
  return 2 * spec.nHead * t * t * static_cast<int64_t>(sizeof(float));
}

bool usesFusedAttention(const LayerSpec& spec, AttentionKernel k) {
  if (k == AttentionKernel::kMatmul || !fusedAttentionGap(spec).empty()) return false;
  return k == AttentionKernel::kFused || matmulAttentionScratchBytes(spec) > kAutoFusedAttentionScratchBytes;
}

const LayerKind& attentionKind() {
  static constexpr LayerKind kind{.name = "causal_self_attention", .parse = parseAttention,
                                  .paramShapes = attentionParams, .detail = attentionDetail, .cpu = makeAttention, .cuda = DTRAIN_NN_CUDA(makeAttention),
                                  .bf16Input = true, .backwardIgnoresOutput = true, .exampleLayer = R"({"type": "causal_self_attention", "n_head": 2})",
                                  .exampleInput = "[3, 4]", .keptFloats = attentionKept};
  return kind;
}

}  // namespace dtrain::nn
