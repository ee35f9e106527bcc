// Which kernels the CUDA causal_self_attention runs (the job's "attention" field; docs/gpu.md "Attention kernels"):
//   kFused:  the fused, memory-efficient kernels (lib/gpu/flash_attention.h: FlashAttention-2's online softmax over
//            key tiles, nothing of size T x T in memory, the probabilities recomputed in backward from the
//            log-sum-exp kept per row, attention dropout from the counter-based mask); head sizes up to
//            kFusedAttentionMaxHeadSize.
//   kMatmul: cuBLAS batched GEMMs over the full [H, T, T] score square per sample and a masked softmax kernel (the
//            first, simple form; one sample's square of scratch per model), kept for comparison and for what the
//            fused kernels do not cover.
//   kAuto:   kFused where it covers the layer and the matmul path's score scratch would exceed
//            kAutoFusedAttentionScratchBytes (long sequences, many heads), else kMatmul (the default). Both paths
//            run on tensor cores under bf16 or TF32 (the fused kernels: lib/gpu/flash_attention_tc.h; exact
//            float32 on CUDA cores with TF32 off), but neither has been timed, or run, on a GPU, so the switch stays
//            where memory alone decides; the benchmark's fused row decides whether to lower it to 0 (docs/gpu.md
//            "Using it" and "What a first GPU run must check").
// CPU layers have one implementation and ignore the choice. No CUDA header or build is needed for any of this.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace dtrain::nn {

struct LayerSpec;

enum class AttentionKernel { kAuto, kFused, kMatmul };

// "auto", "fused", "matmul"; the parse returns nullopt for anything else.
std::string_view attentionKernelName(AttentionKernel k) noexcept;
std::optional<AttentionKernel> parseAttentionKernel(std::string_view name) noexcept;

// The process-wide choice (as setTf32): read by each CUDA attention layer when it is built, which keeps it for its
// life. Default kAuto. Thread-safe (an atomic); the trainer sets it from the job before building the model.
void setAttentionKernel(AttentionKernel k) noexcept;
AttentionKernel attentionKernel() noexcept;

inline constexpr int64_t kFusedAttentionMaxHeadSize = 128;
// kAuto's switch to the fused kernels: the matmul path's score scratch above this many bytes (256 MiB: GPT-2's 12
// heads from T 2048 on; at T 1024 it is 100.7 MB).
inline constexpr int64_t kAutoFusedAttentionScratchBytes = int64_t{256} << 20;

// The matmul path's per-sample score scratch for `spec`: P and dP, 2 x n_head x T x T floats, in bytes.
int64_t matmulAttentionScratchBytes(const LayerSpec& spec);

// Why the fused kernels cannot run the causal_self_attention `spec`, or empty when they can: a head size (n_embd /
// n_head) above kFusedAttentionMaxHeadSize.
std::string fusedAttentionGap(const LayerSpec& spec);

// Whether the CUDA layer built for `spec` under `k` runs the fused kernels: kFused where fusedAttentionGap is
// empty (a job asking for kFused where it is not is refused when loaded), kAuto where moreover the matmul path's
// scratch would exceed kAutoFusedAttentionScratchBytes, kMatmul never.
bool usesFusedAttention(const LayerSpec& spec, AttentionKernel k);

}  // namespace dtrain::nn
