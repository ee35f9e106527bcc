// Kernels of the CUDA causal_self_attention (lib/nn/cuda/layers_gpt.cpp): its dropout and the fused (flash)
// attention, beside kernels.h and under its conventions: device pointers of the current GPU, enqueued on the
// legacy default stream, launch failures thrown as GpuError, deterministic (no atomics: the same bits every run).
// The dropout mask is computed from the counter by lib/gpu/philox.h's per-thread function (plain C++, CPU-tested by
// emulation in tests/gpu/test_gpu_attention.cpp); the fused attention's tile loops and per-thread work are
// lib/gpu/flash_attention.h's (CPU-tested by emulation of every thread in tests/gpu/test_gpu_flash.cpp). No CUDA
// header is needed to include
// this.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lib/gpu/philox.h"

namespace dtrain::gpu::kernels {

// Attention dropout on elements [first, first + n) of `draw`: out[e] = in[e] * draw.scale where element first + e
// is kept, 0 where dropped (philox.h's kSelect form; in == out allowed). `first` is the element of in[0] in the
// draw's numbering (a sample's [H, T, T] square starts at sample * H * T * T, not necessarily on a Philox block).
// One Philox block per thread (philox.h dropoutQuad); no mask is read or kept.
void dropoutSelect(const float* in, const DropoutDraw& draw, uint64_t first, float* out, size_t n);

// The arithmetic of the fused attention: kFloat32, float32 on CUDA cores (lib/gpu/flash_attention.h: exact
// float32 products, for "tf32": false); kTf32 and kBf16, tensor-core MMAs with TF32 or bfloat16 operands and
// float32 accumulation (lib/gpu/flash_attention_tc.h; "tf32" on, the default, and "precision": "bf16").
enum class FlashMath { kFloat32, kTf32, kBf16 };

// Fused causal self-attention (FlashAttention-2's algorithm; `math` above) for head sizes 1 ..
// kFlashMaxHeadSize (128); any other head size throws GpuError (the layer checks first). Shapes (row-major floats):
//   qkv [batch * t, 3 heads hs] (q of head h at columns h hs, k at C + h hs, v at 2C + h hs, C = heads hs),
//   att and datt [batch * t, C] (the concatenated heads and their gradient), lse and dsum [batch, heads, t],
//   dqkv [batch * t, 3C].
// Forward: att = dropout(softmax(mask(q k^T / sqrt(hs)))) v per (sample, head), and lse = the rows' log-sum-exp of
// the scaled scores in base 2 (what backward needs to recompute P; nothing of size t x t exists). `dropout`: the
// training forward's draw (element ((b H + h) t + i) t + j of it, the CPU layer's numbering; philox.h), or null for
// none.
void flashAttentionForward(const float* qkv, float* att, float* lse, int64_t batch, int64_t t, int64_t heads,
                           int64_t hs, const DropoutDraw* dropout, FlashMath math);
// Backward from forward's att and lse (and its draw: the same `dropout`, or null): dsum = rowwise datt . att
// (FlashAttention's D), then every element of dqkv (dq, dk, dv of every head; overwritten, not added to) by three
// kernels (dQ, dK, dV; kFloat32), each element one thread's fixed-order sum, or by two (dQ, then dK and dV; kTf32,
// kBf16), each element one warp's fixed-order MMAs. Forward and backward of one step may use different `math`
// (backward needs only forward's att and lse), though the layer uses one.
void flashAttentionBackward(const float* qkv, const float* att, const float* lse, const float* datt, float* dsum,
                            float* dqkv, int64_t batch, int64_t t, int64_t heads, int64_t hs,
                            const DropoutDraw* dropout, FlashMath math);

// The bf16 tensor-core kernels (FlashMath::kBf16) with q, k, v stored as bf16 (qkv: bf16 bits, uint16_t, in the
// float32 qkv's layout [batch * t, 3C]; under "precision": "bf16" the layer's kernels::addBiasToBf16 writes them):
// the kernels stage the stored values as operands as they are instead of rounding float32 ones. Everything else as
// flashAttentionForward / flashAttentionBackward with kBf16 (att, lse, datt, dsum, dqkv float32); for qkv the
// nearest-even bf16 of a float32 qkv, att, lse, dsum and dqkv are bit-identical to those calls' (the MMAs see the
// same operands; nothing else reads q, k or v).
void flashAttentionForwardBf16(const uint16_t* qkv, float* att, float* lse, int64_t batch, int64_t t, int64_t heads,
                               int64_t hs, const DropoutDraw* dropout);
void flashAttentionBackwardBf16(const uint16_t* qkv, const float* att, const float* lse, const float* datt,
                                float* dsum, float* dqkv, int64_t batch, int64_t t, int64_t heads, int64_t hs,
                                const DropoutDraw* dropout);

}  // namespace dtrain::gpu::kernels
