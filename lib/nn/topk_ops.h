// The operations of top-k gradient compression (lib/train's TopKHook; Deep Gradient Compression, Lin et al. 2018)
// on the gradient arena's device, so one hook runs on the CPU and on a GPU without host copies of the buckets: the
// CPU hook's loops on the CPU; kernels on a GPU (lib/gpu/kernels_topk.h), enqueued on the legacy default stream where
// the layers compute, so NCCL's all-gather of the pairs is ordered after them by the communicator's events.
// lib/gpu/topk_select.h states the arithmetic and the selection both sides share.
//
// Equality between the two, on the same inputs: the selection (the k largest |x|, ties to the smaller index, pairs in
// ascending index order), error feedback, momentum correction, local Adam and the decompression (pairs added rank by
// rank, then divided) give the same bits; the local clipping's norm is summed in another order on a GPU (nn::gradNorm
// on the device), so a clipped bucket is equal within float rounding only (and a selection tie may then go the other
// way).
//
// Pointers are the ops' device memory (allocate()); pair buffers are int32 (index, float bits) in that memory. Every
// call but allFinite, clip, toDevice and toHost is asynchronous on a GPU. Thread-safety: none (the trainer's thread).
// Errors: gpu::GpuError, NotBuiltError (a GPU without a CUDA build), dtrain::Error (a peer's index outside the bucket,
// CPU only).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "lib/common/tensor.h"
#include "lib/gpu/topk_select.h"
#include "lib/nn/device.h"

namespace dtrain::nn {

class TopKOps {
 public:
  virtual ~TopKOps() = default;
  virtual Device device() const = 0;
  // Whether the host may use the buffers directly (the CPU); otherwise the hook keeps host copies of its state.
  virtual bool hostMemory() const = 0;
  // n zeroed floats on device() (pair buffers: 2 floats' storage per pair).
  virtual DeviceFloats allocate(size_t n) = 0;
  virtual bool allFinite(const float* x, size_t n) = 0;  // blocks on a GPU
  // torch.nn.utils.clip_grad_norm_ of g to `limit` (blocks on a GPU for the norm).
  virtual void clip(float* g, size_t n, double limit) = 0;
  virtual void zero(float* x, size_t n) = 0;
  // topk_select.h's element-wise steps over n elements.
  virtual void adamMoments(float* m, float* v, const float* g, size_t n, const gpu::TopkAdam& a) = 0;
  virtual void adamUpdate(float* m, float* v, float* g, size_t n, const gpu::TopkAdam& a) = 0;
  virtual void accumulate(float* acc, const float* g, size_t n) = 0;  // acc = acc + g
  virtual void momentum(float* u, float* acc, const float* g, size_t n, float m) = 0;  // u = m u + g; acc += u
  virtual void plainMomentum(float* u, float* g, size_t n, float m) = 0;               // g = u = m u + g
  // The k (1 <= k <= n) largest |acc| (ties to the smaller index) as pairs in ascending index order; with zeroTaken
  // they leave acc, and with `velocity` their velocity is zeroed (DGC's momentum factor masking). acc finite.
  virtual void select(float* acc, size_t n, size_t k, int32_t* pairs, bool zeroTaken, float* velocity) = 0;
  virtual void nanPairs(int32_t* pairs, size_t k) = 0;  // (j, NaN) for j < k
  // g = (sum over ranks, in rank order, of their k pairs) / ranks.
  virtual void decompress(float* g, size_t n, const int32_t* pairs, size_t k, int ranks) = 0;
  // Host memory <-> the ops' memory; block until copied.
  virtual void toDevice(float* dst, const float* host, size_t n) = 0;
  virtual void toHost(float* host, const float* src, size_t n) = 0;
};

// The operations for an arena on `device` (NotBuiltError for a GPU without a CUDA build).
std::unique_ptr<TopKOps> makeTopKOps(Device device);

}  // namespace dtrain::nn
