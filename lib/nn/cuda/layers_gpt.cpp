// CUDA transformer layers: embedding, causal_self_attention, lm_head and the residual block (CPU twins in
// layers_gpt.cpp, same math and parameter layouts). Attention runs the fused, memory-efficient (flash) kernels
// where they cover the layer (lib/gpu/flash_attention.h: no [T, T] in memory), else the matmul form: per sample,
// cuBLAS batched GEMMs over the heads on strided views of the stacked qkv buffer, the full [T, T] score square, and
// a masked softmax kernel, the probabilities recomputed in backward (one sample's [H, T, T] of scratch, shared by
// the model's attention layers). The job's "attention" chooses (lib/nn/attention_kernel.h; see
// CausalSelfAttention). bf16 activation storage ("precision": "bf16", Layer::setBf16Storage): attention and
// lm_head may read their input as stored bf16, a block pairs its children's buffers, and attention keeps q, k, v
// (and on the matmul path the heads) in bf16 (see CausalSelfAttention).
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "lib/common/aligned_buffer.h"
#include "lib/common/error.h"
#include "lib/gpu/blas.h"
#include "lib/gpu/kernels_attention.h"
#include "lib/gpu/kernels.h"
#include "lib/gpu/token_order.h"
#include "lib/nn/attention_kernel.h"
#include "lib/nn/cuda_impl.h"
#include "lib/nn/device.h"
#include "lib/nn/dropout_mask.h"
#include "lib/nn/layer.h"
#include "lib/nn/registry.h"

namespace dtrain::nn::cuda {
namespace {

namespace k = gpu::kernels;

size_t sz(int64_t n) { return static_cast<size_t>(n); }
// Floats that hold n values: n float32, or n bf16 (2 bytes each) rounded up to whole floats.
size_t floatsFor(size_t n, bool bf16) { return bf16 ? (n + 1) / 2 : n; }
// A buffer of float32 or (bf16) stored bf16 values as a GEMM operand.
gpu::GemmOperand operandOf(const float* p, bool bf16) {
  return bf16 ? gpu::GemmOperand::bf16(p) : gpu::GemmOperand(p);
}

// The token ids come back to the host in every forward (one small blocking copy, as the former one-int read): the
// host checks them (a bad id is the CPU's error) and, for training, orders the rows by token (gpu::TokenOrder), so
// the backward adds each token's rows in row order with distinct tokens in parallel (kernels::embeddingTokenGrad).
class Embedding final : public Layer {
 public:
  Embedding(const LayerSpec& spec, const LayerBuild& build)
      : Layer(spec, build.device), t_(spec.input[0]), c_(spec.output.back()), v_(spec.vocab),
        hostTokens_(sz(build.maxBatch) * sz(t_)), order_(hostTokens_.size(), build.device),
        start_(hostTokens_.size() + 1, build.device), tok_(hostTokens_.size(), build.device) {}

  void bind(float* params, float* grads) override {
    wte_ = params, gwte_ = grads;
    if (spec().position) wpe_ = params + v_ * c_, gwpe_ = grads + v_ * c_;
  }

  void forward(const float* x, float* y, int batch, bool train) override {
    const int64_t rows = batch * t_;
    copyBytes(hostTokens_.data(), Device::cpu(), x, device(), sz(rows) * sizeof(float));
    orderedRows_ = -1;
    for (int64_t r = 0; r < rows; ++r) {
      if (gpu::tokenIndex(hostTokens_[sz(r)], v_) < 0)
        DTRAIN_THROW(Error, "{}: token id {} at position {} is outside [0, {}) (vocab_size)", spec().path,
                     hostTokens_[sz(r)], r % t_, v_);
    }
    // Before the forward kernel, while the stream is empty (the copy above drained it): a copy from pageable
    // memory waits for the stream's earlier work first.
    if (train) uploadOrder(rows);
    k::embeddingForward(x, wte_, wpe_, y, rows, t_, c_, v_, nullptr);
  }

  void backward(const float*, const float*, const float* dy, float*, int batch, bool accumulate) override {
    const int64_t rows = batch * t_;
    if (orderedRows_ != rows) uploadOrder(rows);  // a backward after an evaluation forward
    // A tied lm_head has already written (or added to) the token table's gradient in this backward.
    if (!accumulate && !spec().tied) k::fill(gwte_, sz(v_ * c_), 0.0f);
    k::embeddingTokenGrad(asInts(order_), asInts(start_), asInts(tok_), tokenOrder_.segments(), dy, gwte_, c_);
    if (gwpe_ != nullptr) {
      if (!accumulate) k::fill(gwpe_, sz(t_ * c_), 0.0f);
      k::biasGrad(dy, gwpe_, batch, t_ * c_, true);  // gwpe[p] += dy[n, p] over the samples, in order
    }
  }

 private:
  static int32_t* asInts(DeviceFloats& b) { return reinterpret_cast<int32_t*>(b.data()); }

  // The rows of the last forward ordered by token, copied to the device (blocking; three small arrays).
  void uploadOrder(int64_t rows) {
    tokenOrder_.build(hostTokens_.data(), rows, v_);
    auto upload = [&](DeviceFloats& to, const std::vector<int32_t>& from) {
      copyBytes(to.data(), device(), from.data(), Device::cpu(), from.size() * sizeof(int32_t));
    };
    upload(order_, tokenOrder_.order);
    upload(start_, tokenOrder_.start);
    upload(tok_, tokenOrder_.tok);
    orderedRows_ = rows;
  }

  int64_t t_, c_, v_;
  AlignedBuffer<float> hostTokens_;   // the last forward's token ids (maxBatch x t)
  gpu::TokenOrder tokenOrder_;
  DeviceFloats order_, start_, tok_;  // int32 each: TokenOrder's arrays on the device
  int64_t orderedRows_ = -1;          // rows of the order on the device, -1 when it is not the last forward's
  float* wte_ = nullptr;
  float* wpe_ = nullptr;
  float* gwte_ = nullptr;
  float* gwpe_ = nullptr;
};

// Causal self-attention (CPU twin: layers_attention.cpp). Two implementations, chosen when the layer is built
// (nn::attentionKernel(), the job's "attention"; usesFusedAttention):
//
// Fused ("fused", and "auto" where it covers the layer (head size <= 128) and the matmul path's score scratch would
// exceed 256 MiB: attention_kernel.h): the qkv projection, then
// kernels::flashAttentionForward writes the concatenated heads and the rows' log-sum-exp lse_ (maxBatch x H x T
// floats, kept per layer to backward) without ever forming [T, T]; backward: the c_proj GEMMs, then
// kernels::flashAttentionBackward writes every element of dqkv (D = rowwise datt . att into a scratch, then one
// kernel each for dq, dk and dv, each element one thread's fixed-order sum: deterministic), then the qkv GEMMs.
// The kernels' arithmetic follows the GEMMs' (flashMath): bf16 tensor-core tiles under "precision": "bf16", TF32
// ones while "tf32" is on (lib/gpu/flash_attention_tc.h: two backward kernels, dq, then dk and dv, each element
// one warp's fixed-order MMAs), exact float32 on CUDA cores with "tf32": false (lib/gpu/flash_attention.h).
// Scratch: dqkv + datt + D in the model's kAttention slot (kAttentionScores is not reserved at all). Attention
// dropout: the kernels take the forward's draw and compute each element's fate from its counter where they need
// it (forward, and again in backward with the same draw): the CPU layer's mask, nothing kept.
//
// Matmul: per sample, cuBLAS batched GEMMs over the heads on strided views of the stacked qkv buffer, the full
// [T, T] score square per head and a masked softmax kernel.
//
// Memory (matmul): the probabilities are not kept for backward. Forward computes one sample's [H, T, T] at a time
// into a scratch; backward recomputes them per sample. The correctness argument: the recomputation is the very same
// cuBLAS call (same operands, same pointers, leading dimensions and strides, same handle, math mode and output
// buffer) followed by the very same softmax kernel launch, and both are deterministic (cuBLAS GEMMs give identical
// bits for identical calls on one GPU; the softmax reduces in a fixed tree), so backward's P is bit-identical to
// the P forward multiplied v by, and every gradient is bit-identical to keeping P. The cost is one [T, T] x hs
// GEMM and one softmax per sample and head again in backward (at GPT-2-small shape about 2.5% of the step's FLOPs).
// The scratch (P and dP: 2 x H x T x T floats) is the model's SharedScratch::kAttentionScores slot, shared by every
// attention layer (layers run one at a time on one stream), or the layer's own when built without one (tests).
// dqkv and datt, which live only inside one backward, share the kAttention slot the same way (as on the CPU).
// Kept per layer from forward to backward: qkv and the concatenated heads (maxBatch x 4C x T floats; with bf16
// storage 2C T floats' worth on the matmul path, 2.5C T on the fused one), and on the fused path lse.
//
// Attention dropout on the matmul path ("dropout" > 0, training): the mask is the CPU layer's, computed on the device
// from the counter (lib/gpu/philox.h: Philox4x32-10 keyed by mixSeed(seed, index), element ((b H + h) T + i) T + j
// of the forward's draw, the same DropoutStream as the CPU layer), by the kernel that applies it: nothing is drawn
// on the host, copied or kept. Forward multiplies v by the dropped P (P x 1/(1-p) where kept, 0 where dropped, the
// CPU's select); backward recomputes P as above and, with the forward's draw (same key and offset), drops dP and
// the recomputed P with the same kernel, so they too are the forward's bit for bit.
//
// bf16 activation storage (built with LayerBuild::bf16, "precision": "bf16"): the input x may be stored as bf16
// (setBf16Storage: a layernorm before it), read by the qkv GEMMs as it is. On the matmul path every reader of q, k,
// v and the heads is a bf16 GEMM, so qkv_ and att_ hold bf16 (half the memory kept per layer): the qkv projection
// is computed in float32 into the backward scratch (kAttention, unused during forward), then its bias is added and
// the sum rounded into qkv_ by one kernel (kernels::addBiasToBf16: addBias's sum, toBf16's rounding); the heads are
// computed into the same scratch and rounded into att_ (toBf16). The GEMMs then read those bf16 values instead of
// converting the float32 ones first: the same values, so the same products. On the fused path qkv_ holds bf16 too
// (written the same way) and the bf16 kernels stage those values as they are (kernels::flashAttentionForwardBf16):
// the operands they rounded the float32 q, k, v to, so the same bits; nothing else in them reads q, k or v. att_
// stays float32 there: the dQ kernel's D = rowsum(dO . O) reads it in float32 (a bf16 O would change D's bits).
class CausalSelfAttention final : public Layer {
 public:
  CausalSelfAttention(const LayerSpec& spec, const LayerBuild& build)
      : Layer(spec, build.device), t_(spec.input[0]), c_(spec.input[1]), h_(spec.nHead), hs_(c_ / h_),
        rows_(sz(build.maxBatch) * sz(t_)), fused_(fusedFor(spec)), bf16Qkv_(build.bf16),
        bf16Heads_(build.bf16 && !fused_),
        qkv_(floatsFor(rows_ * sz(3 * c_), bf16Qkv_), build.device),
        att_(floatsFor(rows_ * sz(c_), bf16Heads_), build.device),
        lse_(fused_ ? sz(build.maxBatch) * sz(h_ * t_) : 0, build.device),
        scratch_(build.scratch), stream_(std::nullopt, spec.index) {
    DTRAIN_CHECK(scratch_ == nullptr || scratch_->device() == build.device,
                 "{}: the shared scratch is on {}, the layer on {}", spec.path, scratch_->device().str(),
                 build.device.str());
    // Fused: dqkv + datt, then D (the dsum rows); matmul: the one-sample square [2, H, T, T] too.
    const size_t backwardOnly = rows_ * sz(4 * c_) + lse_.size();
    if (scratch_ != nullptr) {
      if (!fused_) scratch_->reserve(SharedScratch::kAttentionScores, 2 * square());
      scratch_->reserve(SharedScratch::kAttention, backwardOnly);
    } else {
      own_ = DeviceFloats((fused_ ? 0 : 2 * square()) + backwardOnly, build.device);
    }
    reseed(build.seed, 0);
  }

  // The CPU layer's stream (layers_attention.cpp): restarted by every reseed.
  void reseed(uint64_t seed, uint64_t position) override { stream_.reseed(seed, position); }

  // x is read only by the qkv GEMMs (forward, and backward's weight gradient).
  void setBf16Storage(bool input, bool output) override {
    DTRAIN_CHECK(!output, "{}: attention's output is not stored as bf16", spec().path);
    bf16Input_ = input;
  }

  void bind(float* params, float* grads) override {
    wAttn_ = params, gwAttn_ = grads;
    size_t at = sz(3 * c_ * c_);
    if (spec().bias) bAttn_ = params + at, gbAttn_ = grads + at, at += sz(3 * c_);
    wProj_ = params + at, gwProj_ = grads + at, at += sz(c_ * c_);
    if (spec().bias) bProj_ = params + at, gbProj_ = grads + at;
  }

  void forward(const float* x, float* y, int batch, bool train) override {
    const int64_t rows = batch * t_, c3 = 3 * c_;
    dropping_ = train && spec().p > 0;
    if (dropping_) draw_ = stream_.next(sz(batch) * square(), spec().p, keep());
    const gpu::GemmOperand in = operandOf(x, bf16Input_);
    if (bf16Qkv_) {
      // q, k, v in float32 into the backward scratch (dead during forward), then + bias and rounded into qkv_.
      float* staged = backwardScratch();
      gpu::gemm(false, true, rows, c3, c_, 1.0f, in, c_, wAttn_, c_, 0.0f, staged, c3);
      k::addBiasToBf16(staged, bAttn_, qkvBf16(), rows, c3);
      if (fused_) {
        k::flashAttentionForwardBf16(qkvBf16(), att_.data(), lse_.data(), batch, t_, h_, hs_,
                                     dropping_ ? &draw_ : nullptr);
      } else {
        matmulForward(staged, batch);  // the heads in float32 into the scratch again
        k::toBf16(staged, att_.data(), sz(rows) * sz(c_));
      }
    } else {
      float* qkv = qkv_.data();
      gpu::gemm(false, true, rows, c3, c_, 1.0f, in, c_, wAttn_, c_, 0.0f, qkv, c3);
      if (bAttn_ != nullptr) k::addBias(qkv, bAttn_, rows, c3);
      if (fused_) {
        k::flashAttentionForward(qkv, att_.data(), lse_.data(), batch, t_, h_, hs_, dropping_ ? &draw_ : nullptr,
                                 flashMath());
      } else {
        matmulForward(att_.data(), batch);
      }
    }
    gpu::gemm(false, true, rows, c_, c_, 1.0f, operandOf(att_.data(), bf16Heads_), c_, wProj_, c_, 0.0f, y, c_);
    if (bProj_ != nullptr) k::addBias(y, bProj_, rows, c_);
  }

  void backward(const float* x, const float*, const float* dy, float* dx, int batch, bool accumulate) override {
    const int64_t rows = batch * t_, c3 = 3 * c_;
    const float beta = accumulate ? 1.0f : 0.0f;
    float* dqkvData = backwardScratch();
    float* datt = dqkvData + rows_ * sz(c3);
    gpu::gemm(true, false, c_, c_, rows, 1.0f, dy, c_, operandOf(att_.data(), bf16Heads_), c_, beta, gwProj_, c_);
    if (gbProj_ != nullptr) k::biasGrad(dy, gbProj_, rows, c_, accumulate);
    gpu::gemm(false, false, rows, c_, c_, 1.0f, dy, c_, wProj_, c_, 0.0f, datt, c_);
    if (fused_) {
      float* dsum = datt + rows_ * sz(c_);
      if (bf16Qkv_)
        k::flashAttentionBackwardBf16(qkvBf16(), att_.data(), lse_.data(), datt, dsum, dqkvData, batch, t_, h_, hs_,
                                      dropping_ ? &draw_ : nullptr);
      else
        k::flashAttentionBackward(qkv_.data(), att_.data(), lse_.data(), datt, dsum, dqkvData, batch, t_, h_, hs_,
                                  dropping_ ? &draw_ : nullptr, flashMath());
    } else {
      matmulBackward(dqkvData, datt, batch);
    }
    const float* dqkv = dqkvData;
    gpu::gemm(true, false, c3, c_, rows, 1.0f, dqkv, c3, operandOf(x, bf16Input_), c_, beta, gwAttn_, c_);
    if (gbAttn_ != nullptr) k::biasGrad(dqkv, gbAttn_, rows, c3, accumulate);
    if (dx != nullptr) gpu::gemm(false, false, rows, c_, c3, 1.0f, dqkv, c3, wAttn_, c_, 0.0f, dx, c_);
  }

 private:
  // The kernel choice for `spec` under the process-wide setting; "fused" where the kernels do not cover the layer
  // is an error (the job refuses it when loaded, naming the field).
  static bool fusedFor(const LayerSpec& spec) {
    const AttentionKernel k = attentionKernel();
    if (k == AttentionKernel::kFused) {
      const std::string gap = fusedAttentionGap(spec);
      if (!gap.empty())
        DTRAIN_THROW(UsageError, "{}: the fused attention kernels cannot run this layer: {}", spec.path, gap);
    }
    return usesFusedAttention(spec, k);
  }

  // The fused kernels' arithmetic, as the GEMMs': bf16 tensor cores under "precision": "bf16", TF32 ones while
  // "tf32" is on (the default), else exact float32 (read per call, as gpu::gemm reads it).
  static k::FlashMath flashMath() {
    return gpu::bf16() ? k::FlashMath::kBf16 : gpu::tf32() ? k::FlashMath::kTf32 : k::FlashMath::kFloat32;
  }

  // The backward scratch: dqkv, then datt (and D), inside one backward; during a bf16 forward, the float32 q, k, v
  // and then the float32 heads before they are rounded.
  float* backwardScratch() {
    if (scratch_ != nullptr) return scratch_->data(SharedScratch::kAttention);
    return own_.data() + (fused_ ? 0 : 2 * square());
  }

  // Element `offset` of qkv_ (float32, or bf16 with bf16 storage) as a GEMM operand.
  gpu::GemmOperand qkvAt(int64_t offset) const {
    if (bf16Qkv_) return gpu::GemmOperand::bf16(reinterpret_cast<const uint16_t*>(qkv_.data()) + offset);
    return qkv_.data() + offset;
  }
  uint16_t* qkvBf16() { return reinterpret_cast<uint16_t*>(qkv_.data()); }

  // The matmul path's attention core: the concatenated heads [rows, C] in float32 into `heads`, from qkv_, sample
  // by sample through the score square.
  void matmulForward(float* heads, int batch) {
    const int64_t c3 = 3 * c_;
    float* p = scores();
    for (int b = 0; b < batch; ++b) {
      const int64_t base = b * t_ * c3;  // q at column h*hs, k at C + h*hs, v at 2C + h*hs
      probabilities(base, p);
      // Attention dropout: v is multiplied by the dropped P, computed in place (P itself is not needed again).
      if (dropping_) k::dropoutSelect(p, draw_, firstElement(b), p, square());
      // y_h = P_h v_h into the concatenated heads.
      gpu::gemmBatched(false, false, t_, hs_, t_, 1.0f, p, t_, t_ * t_, qkvAt(base + 2 * c_), c3, hs_, 0.0f,
                       heads + b * t_ * c_, c_, hs_, h_);
    }
  }

  // The matmul path's backward core: dqkv from datt, P recomputed sample by sample.
  void matmulBackward(float* dqkvData, const float* datt, int batch) {
    const int64_t c3 = 3 * c_, tt = t_ * t_;
    float* p = scores();
    float* dp = p + square();
    for (int b = 0; b < batch; ++b) {
      const int64_t base = b * t_ * c3;
      float* dbase = dqkvData + base;
      const float* dout = datt + b * t_ * c_;
      probabilities(base, p);  // forward's P, bit for bit (see the class comment)
      // dP_h = dOut_h v_h^T, then through the dropout: dP x 1/(1-p) where kept, 0 where dropped.
      gpu::gemmBatched(false, true, t_, t_, hs_, 1.0f, dout, c_, hs_, qkvAt(base + 2 * c_), c3, hs_, 0.0f, dp, t_, tt,
                       h_);
      if (dropping_) k::dropoutSelect(dp, draw_, firstElement(b), dp, square());
      k::causalSoftmaxBackward(p, dp, h_, t_, scaleOf());  // dp becomes dS (scaled, masked)
      // P is no longer needed: the dropped P (forward's, bit for bit) takes its place for dv.
      if (dropping_) k::dropoutSelect(p, draw_, firstElement(b), p, square());
      // dv_h = P_h^T dOut_h (P: what multiplied v in forward);  dq_h = dS_h k_h;  dk_h = dS_h^T q_h.
      gpu::gemmBatched(true, false, t_, hs_, t_, 1.0f, p, t_, tt, dout, c_, hs_, 0.0f, dbase + 2 * c_, c3, hs_, h_);
      gpu::gemmBatched(false, false, t_, hs_, t_, 1.0f, dp, t_, tt, qkvAt(base + c_), c3, hs_, 0.0f, dbase, c3, hs_,
                       h_);
      gpu::gemmBatched(true, false, t_, hs_, t_, 1.0f, dp, t_, tt, qkvAt(base), c3, hs_, 0.0f, dbase + c_, c3, hs_, h_);
    }
  }

  size_t square() const { return sz(h_ * t_ * t_); }  // one sample's [H, T, T]
  float scaleOf() const { return 1.0f / std::sqrt(static_cast<float>(hs_)); }
  float keep() const { return 1.0f / static_cast<float>(1.0 - spec().p); }  // the CPU's float rounding
  // P and dP of one sample: [2, H, T, T].
  float* scores() { return scratch_ != nullptr ? scratch_->data(SharedScratch::kAttentionScores) : own_.data(); }
  uint64_t firstElement(int b) const { return sz(b) * square(); }  // sample b's element (0, 0, 0) in the draw

  // P = causal softmax(q k^T * scale) of one sample (its q at element `base` of qkv_), every head, into p
  // [H, T, T]: the one place forward and backward compute it, so both make the identical calls.
  void probabilities(int64_t base, float* p) {
    const int64_t c3 = 3 * c_;
    gpu::gemmBatched(false, true, t_, t_, hs_, 1.0f, qkvAt(base), c3, hs_, qkvAt(base + c_), c3, hs_, 0.0f, p, t_,
                     t_ * t_, h_);
    k::causalSoftmaxForward(p, h_, t_, scaleOf());
  }

  int64_t t_, c_, h_, hs_;
  size_t rows_;
  bool fused_;                    // the fused kernels (else the matmul path)
  bool bf16Qkv_;                  // bf16 storage (either path): qkv_ holds bf16 values
  bool bf16Heads_;                 // matmul path with bf16 storage: att_ holds bf16 values too
  bool bf16Input_ = false;        // x is stored as bf16 (setBf16Storage)
  DeviceFloats qkv_, att_, lse_;  // kept from forward to backward (lse_: fused only, [maxBatch, H, T])
  SharedScratch* scratch_;        // the model's (kAttention; kAttentionScores for matmul), or null: own_
  DeviceFloats own_;  // matmul's [2, H, T, T] scores, then dqkv + datt + D, when built without a shared scratch
  detail::DropoutStream stream_;  // attention dropout's generator (the CPU layer's)
  gpu::DropoutDraw draw_;         // the last training forward's draw, for backward
  bool dropping_ = false;         // the last forward applied dropout
  float* wAttn_ = nullptr;
  float* bAttn_ = nullptr;
  float* wProj_ = nullptr;
  float* bProj_ = nullptr;
  float* gwAttn_ = nullptr;
  float* gbAttn_ = nullptr;
  float* gwProj_ = nullptr;
  float* gbProj_ = nullptr;
};

class LmHead final : public Layer {
 public:
  LmHead(const LayerSpec& spec, const LayerBuild& build)
      : Layer(spec, build.device), t_(spec.input[0]), c_(spec.input[1]), v_(spec.vocab), dyLd_(v_) {}

  void bind(float* params, float* grads) override { w_ = params, gw_ = grads; }
  void bindTied(const float* weight, float* grad) override { w_ = weight, gw_ = grad; }
  // x (the final layernorm's output) is read only by the two GEMMs with it.
  void setBf16Storage(bool input, bool output) override {
    DTRAIN_CHECK(!output, "{}: lm_head's output (the logits) is not stored as bf16", spec().path);
    bf16Input_ = input;
  }
  // dy (the logits' gradient) is read only by the two backward GEMMs: as the model's last layer it may come from the
  // loss already in bf16 (Model::outputGradType), and the GEMMs read it as it is instead of rounding an
  // [rows, vocabulary] copy of it into the conversion scratch, twice. The loss writes it over the logits (y, which
  // backward never reads), row r in the first half of row r's bytes: lda = ld = 2 x vocabulary.
  void setBf16OutputGrad(bool on, int64_t ld) override {
    DTRAIN_CHECK(!on || ld >= v_, "{}: the logits' bf16 gradient has rows {} elements apart, fewer than the {} logits",
                 spec().path, ld, v_);
    bf16Dy_ = on;
    dyLd_ = on ? ld : v_;
  }

  void forward(const float* x, float* y, int batch, bool) override {
    gpu::gemm(false, true, batch * t_, v_, c_, 1.0f, operandOf(x, bf16Input_), c_, w_, c_, 0.0f, y, v_);
  }

  void backward(const float* x, const float*, const float* dy, float* dx, int batch, bool accumulate) override {
    const int64_t rows = batch * t_;
    const gpu::GemmOperand g = operandOf(dy, bf16Dy_);
    gpu::gemm(true, false, v_, c_, rows, 1.0f, g, dyLd_, operandOf(x, bf16Input_), c_, accumulate ? 1.0f : 0.0f, gw_,
              c_);
    if (dx != nullptr) gpu::gemm(false, false, rows, c_, v_, 1.0f, g, dyLd_, w_, c_, 0.0f, dx, c_);
  }

 private:
  int64_t t_, c_, v_;
  bool bf16Input_ = false;
  bool bf16Dy_ = false;  // backward's dy is bf16 (setBf16OutputGrad)
  int64_t dyLd_ = 0;     // dy's leading dimension: v_ for float32, the loss's (2 v_ in place) for bf16
  const float* w_ = nullptr;
  float* gw_ = nullptr;
};

// y = x + f(x), f the children in sequence (CPU twin: Block in layers_gpt.cpp). Children's outputs and the
// gradients between them live in the block's own device buffers; with bf16 storage (LayerBuild::bf16) a child's
// output that only the next child's bf16 GEMMs read is a bf16 buffer of half the size (registry.h
// storesBf16Between: ln_1 -> attention, ln_2 -> c_fc, gelu -> c_proj in a GPT block).
class Block final : public Layer, public ResidualAddTaker {
 public:
  Block(const LayerSpec& spec, const LayerBuild& build)
      : Layer(spec, build.device), inPlace_(blockAddsInPlace(spec)), scratch_(build.scratch) {
    size_t maxIn = 0;
    for (const auto& c : spec.children) {
      children_.push_back(makeLayer(c, build));
      maxIn = std::max(maxIn, sz(build.maxBatch) * sz(c.input.numel()));
      counts_.push_back(sz(paramCountOf(c)));
    }
    // Consecutive children may fuse (Layer::fuseWithNext: a linear's bias into the activation after it), as in
    // Model: forward and backward below run them in order and always give a fused activation its dx.
    for (size_t i = 0; i + 1 < children_.size(); ++i) {
      Layer& next = *children_[i + 1];
      if (!children_[i]->aliasesInput() && !next.aliasesInput()) children_[i]->fuseWithNext(next);
    }
    // bf16 activation storage, as in Model: the pairs' outputs are bf16 buffers.
    const std::vector<char> bf16 =
        build.bf16 ? bf16StoredOutputs(spec.children) : std::vector<char>(children_.size(), 0);
    if (build.bf16) applyBf16Storage(children_, bf16);
    // The last child writes into y when its backward never reads its output (blockAddsInPlace, the CPU block's
    // rule): no buffer for it. Its output is never bf16 (no next child reads it), and a fused pair's second half
    // (a gelu after its linear) writes its full result there.
    for (size_t i = 0; i < children_.size(); ++i) {
      const size_t n = floatsFor(sz(build.maxBatch) * sz(spec.children[i].output.numel()), bf16[i] != 0);
      const bool intoY = inPlace_ && i + 1 == children_.size();
      outs_.emplace_back(children_[i]->aliasesInput() || intoY ? 0 : n, build.device);
    }
    // The ping-pong gradients live only inside one backward: the model's blocks share them (SharedScratch kGradA,
    // kGradB, as the CPU's blocks do; the spec parser refuses a block inside a block, which would overwrite them).
    if (scratch_ != nullptr) {
      scratch_->reserve(SharedScratch::kGradA, maxIn);
      scratch_->reserve(SharedScratch::kGradB, maxIn);
    } else {
      gradA_ = DeviceFloats(maxIn, build.device);
      gradB_ = DeviceFloats(maxIn, build.device);
    }
    in_.assign(children_.size(), nullptr);
    out_.assign(children_.size(), nullptr);
    // A first child that is a layernorm adds the residual's gradient as it stores dx (docs/gpu.md "Fused residual
    // gradient + LayerNorm backward"): backward then skips its k::add(dy, g, dx).
    const bool lnFirst = !spec.children.empty() && spec.children.front().type() == "layernorm";
    if (lnFirst && residualLayerNormBackwardFusionOn())
      gradTaker_ = dynamic_cast<ResidualGradTaker*>(children_.front().get());
    reseed(build.seed, 0);  // the children's streams as Model::reseedDropout(build.seed, 0) keys them
  }

  void bind(float* params, float* grads) override {
    for (size_t i = 0; i < children_.size(); ++i) {
      if (counts_[i] > 0) children_[i]->bind(params, grads);
      params += counts_[i], grads += counts_[i];
    }
  }

  // The CPU block's rule (layers_gpt.cpp): children reseeded from the seed and position mixed with the block's index.
  void reseed(uint64_t seed, uint64_t position) override {
    const uint64_t salt = static_cast<uint64_t>(spec().index) + 1000;
    for (auto& c : children_) c->reseed(detail::mixSeed(seed, salt), detail::mixSeed(position, salt));
  }

  // An in-place block followed by a layernorm, or by a block whose first child is one (residualAddFusesInto), hands
  // it the add (docs/gpu.md "Fused residual + LayerNorm"): forward then leaves f in y and the layernorm's kernel
  // makes y = x + f as it normalises it, the same bits as k::add then the LayerNorm. Model runs the pair in order
  // (Layer::fuseWithNext); this block's backward reads neither y nor f.
  bool fuseWithNext(Layer& next) override {
    if (!residualLayerNormFusionOn() || !residualAddFusesInto(spec(), next.spec())) return false;
    // The rule is the spec's, so that a model's count of fused adds is residualLayerNormPairs of its layers.
    auto* taker = dynamic_cast<ResidualAddTaker*>(&next);
    const bool taken = taker != nullptr && taker->takeResidualAdd(&x_);
    DTRAIN_CHECK(taken, "{}: the '{}' after it did not take its residual add (residualAddFusesInto)", spec().path,
                 next.spec().type());
    addFused_ = true;
    return true;
  }

  // The previous block's add, for this block's first child (residualAddFusesInto: a layernorm). That child runs
  // first in forward, on this block's x (the previous block's y): it stores x_prev + f there before this block's own
  // residual add (or the next layer's fused one) reads x, and its backward, this block's residual gradient and the
  // previous block's backward (which reads neither its y nor f) see only the stored sums.
  bool takeResidualAdd(const float* const* residual) override {
    if (children_.empty() || spec().children.front().type() != "layernorm") return false;
    auto* taker = dynamic_cast<ResidualAddTaker*>(children_.front().get());
    return taker != nullptr && !children_.front()->aliasesInput() && taker->takeResidualAdd(residual);
  }

  // In place (blockAddsInPlace), the last child writes f into y and k::add(x, y, y) makes it x + f: the same float
  // addition as before into a separate y, so the same bits; out_ then points at y, which that child's backward never
  // reads.
  void forward(const float* x, float* y, int batch, bool train) override {
    x_ = x;
    const float* in = x;
    for (size_t i = 0; i < children_.size(); ++i) {
      const bool intoY = inPlace_ && i + 1 == children_.size();
      float* out = intoY ? y : outs_[i].size() > 0 ? outs_[i].data() : const_cast<float*>(in);
      if (out != in) children_[i]->forward(in, out, batch, train);
      in_[i] = in, out_[i] = out;
      in = out;
    }
    if (!addFused_) k::add(x, in, y, sz(batch) * sz(spec().output.numel()));
  }

  void backward(const float*, const float*, const float* dy, float* dx, int batch, bool accumulate) override {
    float* gradA = scratch_ != nullptr ? scratch_->data(SharedScratch::kGradA) : gradA_.data();
    float* gradB = scratch_ != nullptr ? scratch_->data(SharedScratch::kGradB) : gradB_.data();
    const float* g = dy;
    for (size_t i = children_.size(); i-- > 0;) {
      if (i == 0 && gradTaker_ != nullptr && dx != nullptr) {
        // The layernorm stores dx = dy + its input gradient: the add below, in its dx kernel, the same bits. dy is
        // the model's buffer, g this block's scratch, dx the model's other buffer: three distinct buffers.
        gradTaker_->backwardAddingGrad(in_[0], out_[0], g, dy, dx, batch, accumulate);
        return;
      }
      const bool aliasing = out_[i] == in_[i];
      float* d = nullptr;
      if (i > 0 || dx != nullptr) d = g == gradA ? gradB : gradA;
      if (!aliasing) children_[i]->backward(in_[i], out_[i], g, d, batch, accumulate);
      if (!aliasing) g = d;
    }
    if (dx != nullptr) k::add(dy, g, dx, sz(batch) * sz(spec().input.numel()));
  }

 private:
  bool inPlace_;  // blockAddsInPlace: the last child writes into y (its outs_ entry is empty)
  bool addFused_ = false;      // the next layer (a layernorm) adds x into y (fuseWithNext)
  const float* x_ = nullptr;   // x of the last forward, for that layer
  ResidualGradTaker* gradTaker_ = nullptr;  // the first child, when it adds dy into dx (a layernorm), or null
  std::vector<std::unique_ptr<Layer>> children_;
  std::vector<DeviceFloats> outs_;
  std::vector<size_t> counts_;
  SharedScratch* scratch_;      // the model's (kGradA, kGradB), or null: gradA_, gradB_
  DeviceFloats gradA_, gradB_;
  std::vector<const float*> in_;
  std::vector<float*> out_;
};

}  // namespace

std::unique_ptr<Layer> makeEmbedding(const LayerSpec& s, const LayerBuild& b) {
  return std::make_unique<Embedding>(s, b);
}
std::unique_ptr<Layer> makeAttention(const LayerSpec& s, const LayerBuild& b) {
  return std::make_unique<CausalSelfAttention>(s, b);
}
std::unique_ptr<Layer> makeLmHead(const LayerSpec& s, const LayerBuild& b) { return std::make_unique<LmHead>(s, b); }
std::unique_ptr<Layer> makeBlock(const LayerSpec& s, const LayerBuild& b) { return std::make_unique<Block>(s, b); }

}  // namespace dtrain::nn::cuda
