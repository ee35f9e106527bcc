// Gradient compression for data parallelism: communication hooks (lib/train/comm_hook.h) that send fewer bytes
// than the float32 all-reduce, chosen by the job file's "parallel": {"compression": {...}} (docs/compression.md).
//
//  fp16 / bf16   PyTorch's fp16_compress_hook / bf16_compress_hook: the bucket divided by the group size (so the
//                sum of n values stays in fp16's range), cast to 16 bits, all-reduced (sum) in 16 bits, cast
//                back. Half the bytes; no state.
//  topk          Deep Gradient Compression's sparsification (Lin et al. 2018) without momentum correction: per
//                bucket, the ceil(ratio x count) elements of largest |g + e| are exchanged by an all-gather of
//                (int32 index, float32 value) pairs and averaged; with error feedback the rest accumulates in a
//                per-rank residual e (e = (g + e) - sent) that is added to the next step's gradient. With
//                momentum_correction (DGC, section 3.2) the SGD momentum runs here instead: u = m u + g, e += u,
//                and u and e are zeroed where sent (momentum factor masking; momentum_masking false keeps u, so
//                that ratio 1 is exactly momentum SGD); the optimizer runs without momentum.
//                DGC's sparsity warm-up (warmup_steps: the ratio falls from 25% to `ratio` in stages that divide it
//                by 4) and, when the optimizer clips, its local gradient clipping (each rank clips its bucket to
//                clip_grad_norm x sqrt(bucket / arena) x sqrt(ranks) before accumulating it: DGC's threshold / sqrt(ranks)
//                for gradients scaled by 1/ranks, as each rank's unscaled mean here).
//                local_adam (with adam/adamw): Efficient-Adam (Chen et al., "Efficient-Adam: Communication-Efficient
//                Distributed Adam", IEEE TSP 2023, arXiv:2205.14473; also Chen et al., "Quantized Adam with Error
//                Feedback", ACM TIST 2021): from start_step each rank runs Adam on its own gradient (its own exp_avg
//                and exp_avg_sq in the hook, bias-corrected from start_step) and top-k with error feedback sends
//                that update direction m_hat / (sqrt(v_hat) + eps) instead of the gradient; the optimizer applies
//                lr x the average (nn::Optimizer::setUpdateGiven, set by the trainer from the hook's step count;
//                AdamW's decoupled decay still applies, the trainer no longer clips it). A residual sent after k steps is then k Adam steps, where Adam on
//                the sparse averaged gradient turns it into about one.
//  powersgd      PowerSGD (Vogels et al., NeurIPS 2019), as PyTorch's powerSGD_hook: per matrix-shaped
//                parameter M (a tensor of rank >= 2 viewed as [shape[0], rest]), one power-iteration step with
//                the previous step's Q (warm start): P = M Q, all-reduce P, orthogonalise P (Gram-Schmidt),
//                Q = M^T P, all-reduce Q, M ~ P Q^T / n. Vectors (biases, norms) and matrices too small to gain
//                (PyTorch's min_compression_rate 2: (m + n) r x 2 >= m n) are batched and all-reduced uncompressed.
//                With error feedback e = (g + e) - P Q^T / n per rank (as PyTorch: the whole bucket).
// Every method does the plain averaging all-reduce for steps before start_step (PyTorch's start_powerSGD_iter).
//
// Determinism: each rank computes the same operations on bitwise-identical collective results, so replicas stay
// identical; the state (residuals, Q, the step count) is saved per rank in checkpoints, so a resumed run with the
// same world size continues bit for bit. A non-finite gradient on any rank makes the step's result non-finite
// on every rank (the trainer then stops or skips the step) and leaves the state as it was before that step.
// Threading: as CommHook (the trainer's thread submits; wait() finishes a bucket on the waiting thread).
#pragma once

#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <vector>

#include "lib/nn/spec.h"
#include "lib/train/comm_hook.h"
#include "lib/train/job.h"

namespace dtrain::train {

// "fp16", "bf16", "powersgd", "topk".
std::string compressionTypeName(CompressionSettings::Type type);

// Parses parallel.compression (`pointer` is its JSON path, "/parallel/compression"). ConfigError naming the file,
// the field and the value: an unknown type, rank < 1, ratio outside (0, 1], start_step < 0, a field that does
// not apply to the type (rank for topk...), an unknown field.
CompressionSettings parseCompression(const nlohmann::json& value, const std::string& source,
                                     const std::string& pointer);

// ConfigError when a powersgd rank is larger than a matrix of the model can take (min(m, n) of its smallest
// matrix-shaped parameter), naming the parameter and its shape.
void checkCompressionFitsModel(const CompressionSettings& c, const nn::ModelSpec& model, const std::string& source,
                               const std::string& pointer);

// momentum_correction needs SGD with momentum (no nesterov, no dampening): ConfigError naming the field
// otherwise; sets c.momentum from the optimizer, and for topk c.localClipNorm from its clip_grad_norm.
void checkCompressionFitsOptimizer(CompressionSettings& c, const nn::OptimizerSpec& optimizer, const std::string& source,
                                   const std::string& pointer);

// Bytes per optimizer step for one rank in a group of `worldSize`, as HookTraffic counts them, from the
// parameters alone (top-k per whole arena: per-bucket rounding adds at most one pair per bucket).
struct CompressionEstimate {
  uint64_t bytesSent = 0;
  uint64_t bytesUncompressed = 0;
  double ratio() const { return bytesSent > 0 ? static_cast<double>(bytesUncompressed) / bytesSent : 0; }
};
CompressionEstimate estimateCompression(const CompressionSettings& c, const std::vector<GradParam>& params,
                                        int worldSize);
// Bytes the hook for `c` allocates per rank beyond the gradients (residuals, velocity, PowerSGD's P, Q, Q's initial
// values, vectors and error-feedback copy, 16-bit copies, top-k's index and pair buffers at their largest, during the sparsity
// warm-up), for a group of `worldSize` ranks (top-k's all-gather buffer grows with it). From the parameters alone.
uint64_t compressionBufferBytes(const CompressionSettings& c, const std::vector<GradParam>& params, int worldSize);
// The parameters of a model spec in arena order (names, shapes, offsets), without building the model.
std::vector<GradParam> paramsOfSpec(const nn::ModelSpec& model);

// Where a hook of this type computes with "device": "cuda" (docs/gpu.md, docs/compression.md "On a GPU"): every type
// on the device (kernels, cuBLAS, NCCL on device buffers), unless the environment sets
// DTRAIN_COMPRESSION_HOST_STAGING=1: then top-k and PowerSGD run the CPU hook on host copies of the buckets
// (CompressionHook's host staging over the CPU group beside nccl: the path before their device kernels, kept as the
// fallback while those have not run on a GPU); fp16/bf16 are never staged. The rule the hooks follow (bind()), stated
// once for the worker's log line and `dtrain check`. Reads the environment on each call: 1/true/yes/on stage, unset,
// empty or 0/false/no/off do not, any other value throws UsageError naming the variable and the value (checkCudaJob
// calls it, so a bad value fails `dtrain check`, `dtrain train` and dtrain run's agent before any worker starts).
inline constexpr const char* kHostStagingVariable = "DTRAIN_COMPRESSION_HOST_STAGING";
bool stagedThroughHost(CompressionSettings::Type type);
// "on the GPU (...)" or "on the GPU's buckets staged through host memory (...)", for the log line of a cuda job.
std::string gpuCompressionPath(CompressionSettings::Type type);

// The hook for `c` (seed: PowerSGD's initial Q, equal on every rank).
CommHookPtr makeCompressionHook(const CompressionSettings& c, uint64_t seed = 0);

}  // namespace dtrain::train
