// The CUDA kernels behind lib/nn's CUDA layers, losses and optimizers. No CUDA header is needed to include this.
//
// Conventions (every function):
// - Pointers are device memory of the current GPU; matrices are row-major and contiguous unless a stride is given.
// - Work is enqueued on the legacy default stream and the call returns at once, except the few functions that
//   return a value to the host (documented "blocks"), which copy it back and so wait for the stream.
// - A launch failure throws GpuError naming the kernel and the file:line of the check; a fault inside a kernel
//   is reported by the next blocking call (CUDA's rule), whose error then names that call.
// - Kernels are written simply, one thread per element or one block per row, and are deterministic: no float
//   atomics, fixed reduction orders, so the same inputs give bit-identical outputs run after run (what a
//   bitwise-identical resume needs). Speed comes second; docs/gpu.md lists what a faster version would fuse.
// The formulas are the CPU layers' (lib/nn/*.cpp), which are PyTorch's; each function names its CPU twin.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lib/gpu/philox.h"
#include "lib/gpu/reduce_index.h"
#include "lib/gpu/window_index.h"

namespace dtrain::gpu::kernels {

// --- Elementwise and bias (layers_dense.cpp) ---
void fill(float* p, size_t n, float value);
// out[i] = in[i] * s (in == out allowed).
void scale(const float* in, float* out, size_t n, float s);
// out[i] = a[i] + b[i] (aliasing allowed).
void add(const float* a, const float* b, float* out, size_t n);
// y[r, c] += bias[c] for r < rows, c < cols.
void addBias(float* y, const float* bias, int64_t rows, int64_t cols);
// db[c] = (accumulate ? db[c] : 0) + sum_r dy[r, c]: a deterministic two-pass column sum over fixed row chunks
// (reduce_index.h: in row order, the CPU's, for rows <= 64; chunk partials added in chunk order beyond), parallel
// over columns x chunks; partials in reduceScratch (scratch.h). Also the embedding's position-table gradient.
void biasGrad(const float* dy, float* db, int64_t rows, int64_t cols, bool accumulate);

using Activation = gpu::Activation;  // reduce_index.h: relu, gelu, tanh, sigmoid
// y = f(x). Gelu is the exact (erf) form, PyTorch's approximate='none'.
void activationForward(Activation f, const float* x, float* y, size_t n);
// dx = dy * f'(x): relu and tanh/sigmoid use y (as PyTorch's backward formulas do), gelu uses x.
void activationBackward(Activation f, const float* x, const float* y, const float* dy, float* dx, size_t n);

// --- A linear's bias fused into the activation after it (kernels_reduce.cu; lib/nn/cuda/layers.cpp pairs them) ---
// xw [rows, cols] is the linear's output without its bias. y = f(xw + bias) in one pass (xw left as it is): the
// unfused addBias + activationForward, bit for bit.
void biasActivationForward(Activation f, const float* xw, const float* bias, float* y, int64_t rows, int64_t cols);
// dx = dy * f'(xw + bias) (f' from y for relu/tanh/sigmoid, from xw + bias for gelu) and the bias gradient
// db (+)= sum_r dx[r] in biasGrad's chunks and order, in one pass over the elements plus biasGrad's pass 2: the
// unfused activationBackward + biasGrad, bit for bit. dx is the linear's dy (it must not alias dy unless equal).
void biasActivationBackward(Activation f, const float* xw, const float* bias, const float* y, const float* dy,
                            float* dx, float* db, int64_t rows, int64_t cols, bool accumulate);

// --- bf16 (the GEMM inputs of "precision": "bf16", lib/gpu/blas.cpp) ---
// y[i] = x[i] rounded to bfloat16, to nearest even (__float2bfloat16_rn, as PyTorch's .to(torch.bfloat16)); y
// holds n 2-byte values (device memory, at least 2 * n bytes).
void toBf16(const float* x, void* y, size_t n);

// --- bf16 activation storage ("precision": "bf16": a layer output read only by bf16 GEMMs is stored as bf16) ---
// Each is its float32 twin with the store rounded (bf16_store.h: the same value, then toBf16's rounding), so y
// holds exactly toBf16 of what the twin writes; y is device memory of 2-byte values, as many as the twin's floats.
void layerNormForwardBf16(const float* x, const float* w, const float* b, uint16_t* y, float* mean, float* rstd,
                          int64_t rows, int64_t d, float eps);
void activationForwardBf16(Activation f, const float* x, uint16_t* y, size_t n);
void biasActivationForwardBf16(Activation f, const float* xw, const float* bias, uint16_t* y, int64_t rows,
                               int64_t cols);
// y[r, c] = bf16 of x[r, c] + bias[c] (bias == nullptr: of x): addBias then toBf16 in one pass (x is unchanged).
void addBiasToBf16(const float* x, const float* bias, uint16_t* y, int64_t rows, int64_t cols);

// --- LayerNorm over the last dimension d (layers_spatial.cpp LayerNorm); one block per row ---
// y = (x - mean) * rstd (* w when w != nullptr, + b when b != nullptr too: b may be nullptr, "bias": false); mean and rstd of each row are kept for backward.
void layerNormForward(const float* x, const float* w, const float* b, float* y, float* mean, float* rstd,
                      int64_t rows, int64_t d, float eps);
// A block's residual add fused with the LayerNorm after it (llm.c's fused_residual_forward; docs/gpu.md "Fused
// residual + LayerNorm"): f[i] = a[i] + f[i] in place (add(a, f, f)'s sums: the block's output), then
// layerNormForward(f, ...) over those sums, in one pass: the same bits as the two calls (layernorm_rows.h).
// a and f are [rows, d] float32, distinct; y as layerNormForward's (the Bf16 twin: 2-byte values).
void residualLayerNormForward(const float* a, float* f, const float* w, const float* b, float* y, float* mean,
                              float* rstd, int64_t rows, int64_t d, float eps);
void residualLayerNormForwardBf16(const float* a, float* f, const float* w, const float* b, uint16_t* y,
                                  float* mean, float* rstd, int64_t rows, int64_t d, float eps);
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w (dx may be nullptr); with w, the weight and bias
// gradients dw (+)= sum_r dy * xhat, db (+)= sum_r dy (layerNormParamGrad's sums; db may be nullptr). With w and
// dx, the gradients' first pass runs inside the dx kernel (one block per row chunk of layerNormParamGrad's plan,
// each thread summing its columns in row order as that pass does: the same bits, layernorm_rows.h; then the
// second pass when there are several chunks), for d <= 5632 (the block's 2 d floats of shared memory beside its
// 4 KiB tree); else, or with setLayerNormParamsFusion(false), layerNormParamGrad then the dx kernel. docs/gpu.md
// "LayerNorm backward with its parameter gradients" (compiled and CPU-emulated, not yet run on a GPU).
void layerNormBackward(const float* x, const float* w, const float* mean, const float* rstd, const float* dy,
                       float* dx, float* dw, float* db, int64_t rows, int64_t d, bool accumulate);
// layerNormBackward with a residual's gradient added into dx as it is stored (llm.c's layernorm_backward, which
// accumulates into dinp; docs/gpu.md "Fused residual gradient + LayerNorm backward"): dx = layerNormBackward's dx +
// residualGrad, one pass instead of the dx kernel and then add(residualGrad, dx, dx), the same bits (the add is
// __fadd_rn, never contracted into an FMA; layernorm_rows.h). residualGrad and dx are [rows, d] float32, distinct
// from each other and from dy, neither null; dw, db as layerNormBackward's.
void residualLayerNormBackward(const float* x, const float* w, const float* mean, const float* rstd, const float* dy,
                               const float* residualGrad, float* dx, float* dw, float* db, int64_t rows, int64_t d,
                               bool accumulate);
// The weight and bias gradients alone (layerNormBackward's, kernels_reduce.cu): dw (+)= sum_r dy * xhat, db (+)=
// sum_r dy (db may be nullptr), biasGrad's two-pass plan over the rows.
void layerNormParamGrad(const float* x, const float* mean, const float* rstd, const float* dy, float* dw, float* db,
                        int64_t rows, int64_t d, bool accumulate);
// Its two passes apart, for the fused backward: the partials pass 1 writes (2 x chunks x d floats of reduceScratch,
// nullptr with a single chunk; valid until the next larger request on this thread), and pass 2 over them (nothing
// with a single chunk: pass 1 wrote dw and db).
float* layerNormParamPartials(int64_t rows, int64_t d);
void layerNormParamCombine(const float* partials, float* dw, float* db, int64_t rows, int64_t d, bool accumulate);
// Whether layerNormBackward/residualLayerNormBackward fold the gradients' first pass into the dx kernel (default
// on): a process-wide switch, so a GPU test can compare both launches' bits (thread-safe; takes effect at the next
// call).
void setLayerNormParamsFusion(bool on);
bool layerNormParamsFusionOn() noexcept;

// --- Embedding (layers_gpt.cpp Embedding): token ids carried as floats ---
// y[r] = wte[token[r]] + (wpe ? wpe[r % t] : 0) for r < rows; a token outside [0, vocab) (reduce_index.h's
// tokenIndex) writes zeros there and, when badRow != nullptr, sets *badRow to the smallest such r (initialise it
// to INT32_MAX).
void embeddingForward(const float* tokens, const float* wte, const float* wpe, float* y, int64_t rows, int64_t t,
                      int64_t c, int64_t vocab, int32_t* badRow);
// The token table's gradient over the rows ordered by token (token_order.h, copied to the device: order, start
// (segments + 1 entries), tok): gwte[tok[s]] += dy[row] for each row of segment s, in row order; one thread per
// (segment, column), 128 columns per block, so distinct tokens run in parallel and each adds its rows in the CPU's
// order (bit-identical to it). The position table's gradient is biasGrad(dy as [batch, t * c], gwpe, batch, t * c,
// true).
void embeddingTokenGrad(const int32_t* order, const int32_t* start, const int32_t* tok, int64_t segments,
                        const float* dy, float* gwte, int64_t c);

// --- Causal attention's softmax (layers_gpt.cpp CausalSelfAttention); one block per row of [count, t, t] ---
// Row i of each [t, t] matrix: softmax of s[0..i] * scale (shifted by its maximum), zero beyond i (the mask).
void causalSoftmaxForward(float* s, int64_t count, int64_t t, float scale);
// In place on dp: dS = P * (dP - sum_j(dP * P)) * scale over the unmasked prefix, 0 beyond it.
void causalSoftmaxBackward(const float* p, float* dp, int64_t count, int64_t t, float scale);

// --- conv2d and maxpool2d (layers_spatial.cpp), NCHW; kernels_spatial.cu, index maps in window_index.h ---
using Window2d = gpu::Window2d;
// cols[n, r, q] for r = (ci * kh + i) * kw + j (rows c * kh * kw) and q = oy * ow + ox (columns oh * ow): the input
// value x[n, ci, oy * sh - ph + i, ox * sw - pw + j], 0 in the padding. cols holds batch * c*kh*kw * oh*ow floats.
void im2col(const float* x, float* cols, int64_t batch, const Window2d& g);
// The adjoint: dx[n, ci, iy, ix] = the sum of dcols[n, r, q] over every (r, q) that im2col read it into, added in
// increasing r (the CPU's col2im order, so the sums round alike). Overwrites dx (batch * c * h * w floats).
void col2im(const float* dcols, float* dx, int64_t batch, const Window2d& g);
// y[n, ch, q] += bias[ch] over y [batch, channels, positions].
void addChannelBias(float* y, const float* bias, int64_t batch, int64_t channels, int64_t positions);
// db[ch] = (accumulate ? db[ch] : 0) + sum over n, q of dy[n, ch, q]: blocks per (channel, chunk of the batch x
// positions values), fixed trees, chunk partials added in order (reduce_index.h's channelChunks; deterministic).
void channelBiasGrad(const float* dy, float* db, int64_t batch, int64_t channels, int64_t positions, bool accumulate);
// Max pooling per plane (batch * c planes): y = the window's maximum, argmax[out] = its index h * w-flat within the
// plane; the first maximum wins and a NaN propagates (PyTorch's rule, layers_spatial.cpp's MaxPool2d).
void maxPoolForward(const float* x, float* y, int32_t* argmax, int64_t batch, const Window2d& g);
// dx[plane, s] = the sum of dy[plane, o] over outputs o (increasing) with argmax[plane, o] == s; overwrites dx. A
// gather (one thread per input element), so no atomics: deterministic and the CPU's order.
void maxPoolBackward(const float* dy, const int32_t* argmax, float* dx, int64_t batch, const Window2d& g);
// The dropout layer (layers_dense.cpp Dropout) on elements [0, n) of `draw`: out[i] = in[i] * (draw.scale where
// element i is kept, 0 where dropped), philox.h's kMultiply form (in == out allowed). The mask is computed from the
// counter (philox.h dropoutQuad, one Philox block per thread): nothing is read but `in`, backward calls it again
// with the forward's draw on dy.
void dropout(const float* in, const DropoutDraw& draw, float* out, size_t n);

// --- Losses (loss.cpp) ---
// Cross-entropy over rows of `classes` logits with int32 or int64 labels. Writes diff = softmax - onehot (when
// diff != nullptr), rowLoss[r] = logsumexp - logit[label] (double) and rowCorrect[r] = (argmax == label, the
// first maximum as torch.argmax); a label outside [0, classes) sets *badRow to the smallest such row (initialise
// it to INT32_MAX) and contributes nothing. rowStats (when not nullptr): the row's maximum and sum of exp(x - max),
// two floats per row (loss_grad.h), for crossEntropyGradBf16InPlace.
void crossEntropyRows(const float* logits, const void* labels, bool labels64, int64_t rows, int64_t classes,
                      float* diff, double* rowLoss, int32_t* rowCorrect, int32_t* badRow, float* rowStats = nullptr);
// The bf16 gradient of "precision": "bf16" (loss_grad.h), written in place over the logits: row r's
// grad[r, c] = bf16 of (softmax - onehot)[r, c] * factor goes to bf16 element r * 2 * classes + c of the same memory
// (a [rows, classes] bf16 matrix with leading dimension crossEntropyGradLd(classes) = 2 x classes), recomputed from
// the float32 logits, the labels and the rowStats a crossEntropyRows call wrote; bit for bit toBf16 of
// scale(diff, factor) of that call's diff (and 4071a74's out-of-place kernel). The logits are no longer valid
// afterwards. One block per row, 256 columns a pass, each pass read before it is written (loss_grad.h's proof).
void crossEntropyGradBf16InPlace(float* logits, const void* labels, bool labels64, int64_t rows, int64_t classes,
                                 const float* rowStats, float factor);
// diff = y - t; sq[i] = (double)diff^2.
void mseRows(const float* y, const float* t, float* diff, double* sq, size_t n);
// bce_with_logits over n logits x (one per sample) and targets of `targetKind` (float32 in [0, 1], or int32/int64
// 0/1 labels), in double as loss.cpp's BceWithLogits: rowLoss[i] = max(x, 0) - x t + log1p(exp(-|x|)); diff[i] =
// float(sigmoid(x) - t) (when diff != nullptr); rowCorrect[i] = ((x > 0) == (t >= 0.5)) and hist[bin] += 1, bin =
// min(bins - 1, floor(sigmoid(x) * bins)) (0 for a NaN logit), offset by `bins` for a negative sample (when rowCorrect / hist are not
// nullptr: integer atomics, so the counts are exact whatever the order). A target outside its domain sets *badRow
// to the smallest such i (initialise it to INT32_MAX) and contributes zeros.
enum class TargetKind { kFloat32, kInt32, kInt64 };
void bceWithLogitsRows(const float* x, const void* targets, TargetKind targetKind, size_t n, float* diff,
                       double* rowLoss, int32_t* rowCorrect, int32_t* hist, int bins, int32_t* badRow);

// --- Deterministic reductions (blocking: they return the value to the host). `partials` is device memory of at
// least kReduceBlocks doubles, owned by the caller. ---
inline constexpr int kReduceBlocks = 256;
double sumDoubles(const double* v, size_t n, double* partials);
int64_t sumInts(const int32_t* v, size_t n, double* partials);
double sumSquares(const float* v, size_t n, double* partials);  // sum v^2 in double
bool allFinite(const float* v, size_t n, double* partials);
// sumSquares without the read: the sum is left in partials[0] on the device (asynchronous; the same order and bits).
void sumSquaresOnDevice(const float* v, size_t n, double* partials);
// Reads one int32 / one float from device memory (blocks).
int32_t readInt(const int32_t* p);
float readFloat(const float* p);

// --- Optimizers over a slice of the arena (optimizer.cpp; compiled without FMA contraction, as the CPU's) ---
struct SgdStep {
  float weightDecay = 0, momentum = 0, keep = 1 /* 1 - dampening */, negLr = 0;
  bool first = false, nesterov = false;
};
void sgdStep(float* p, const float* g, float* momentumBuffer, size_t n, const SgdStep& s);

struct AdamStep {
  bool decoupled = false, applyDecay = false;
  float decay = 1 /* AdamW: 1 - lr * wd */, wd = 0 /* Adam: L2 */, beta1 = 0, keep1 = 0, beta2 = 0, keep2 = 0;
  float negStepSize = 0, bc2Sqrt = 1, eps = 0;
};
// vmax may be nullptr (no amsgrad).
void adamStep(float* p, const float* g, float* m, float* v, float* vmax, size_t n, const AdamStep& s);

struct AdagradStep {
  float weightDecay = 0, negClr = 0 /* -lr / (1 + (step - 1) * lr_decay) */, eps = 0;
};
// sum += g'^2; p += negClr * (g' / (sqrt(sum) + eps)), g' = g + weightDecay * p (optimizer.cpp's Adagrad).
void adagradStep(float* p, const float* g, float* sum, size_t n, const AdagradStep& s);

}  // namespace dtrain::gpu::kernels
