// The operations of top-k gradient compression (lib/train's TopKHook; Deep Gradient Compression, Lin et al. 2018)
// on the gradient arena's device, so one hook runs on the CPU and on a GPU without host copies of the buckets: the
// CPU hook's loops on the CPU; kernels on a GPU (lib/gpu/kernels_topk.h), enqueued on the legacy default stream where
// the layers compute, so NCCL's all-gather of the pairs is ordered after them by the communicator's events.
// lib/gpu/topk_select.h states the arithmetic and the selection both sides share.
//
// Equality between the two, on the same inputs: the selection (the k largest |x|, ties to the smaller index, pairs in
// ascending index order), error feedback, momentum correction, local Adam and the decompression (pairs added rank by
// rank, then divided) give the same bits; the local clipping's norm is summed in another order on a GPU (the
// deterministic double reduction of nn::gradNorm on the device), so a clipped bucket is equal within float rounding
// only (and a selection tie may then go the other way).
//
// A gate decides on the device what the CPU hook decides with `if`s, so a GPU's host never waits for a bucket's
// values (backward keeps enqueueing while earlier buckets are exchanged): two words of the ops' memory per use
// (allocate(2) holds one gate; topk_select.h's topkGateOpen), set by openGate() and dropNonFinite(). Every operation
// that takes a gate acts only while it is open and otherwise leaves its outputs as they were; select() then writes
// NaN pairs instead.
//
// Pointers are the ops' device memory (allocate()); pair buffers are int32 (index, float bits) in that memory. Every
// call but toDevice and toHost is asynchronous on a GPU (none reads a value back). Thread-safety: none (the trainer's
// thread). Errors: gpu::GpuError, NotBuiltError (a GPU without a CUDA build), dtrain::Error (a peer's index outside
// the bucket, CPU only).
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
  // n zeroed floats on device() (pair buffers: 2 floats' storage per pair; a gate: 2 words, allocate(2)).
  virtual DeviceFloats allocate(size_t n) = 0;
  // The gate opens when every x[0, n) is finite, and is closed otherwise.
  virtual void openGate(uint32_t* gate, const float* x, size_t n) = 0;
  // Gated: torch.nn.utils.clip_grad_norm_ of g to `limit` (the norm stays on the device).
  virtual void clip(float* g, size_t n, double limit, const uint32_t* gate) = 0;
  virtual void zero(float* x, size_t n) = 0;
  // Gated: topk_select.h's element-wise steps over n elements.
  virtual void adamMoments(float* m, float* v, const float* g, size_t n, const gpu::TopkAdam& a,
                           const uint32_t* gate) = 0;
  virtual void adamUpdate(float* m, float* v, float* g, size_t n, const gpu::TopkAdam& a, const uint32_t* gate) = 0;
  virtual void accumulate(float* acc, const float* g, size_t n, const uint32_t* gate) = 0;  // acc = acc + g
  virtual void momentum(float* u, float* acc, const float* g, size_t n, float m,
                        const uint32_t* gate) = 0;                                   // u = m u + g; acc += u
  virtual void plainMomentum(float* u, float* g, size_t n, float m, const uint32_t* gate) = 0;  // g = u = m u + g
  // Gated: when acc[0, n) holds a non-finite value (an error-feedback sum that overflowed), zeroes acc and velocity
  // (nullptr: none) and closes the gate.
  virtual void dropNonFinite(float* acc, float* velocity, size_t n, uint32_t* gate) = 0;
  // Gate open: the k (1 <= k <= n) largest |acc| (ties to the smaller index) as pairs in ascending index order; with
  // zeroTaken they leave acc, and with `velocity` their velocity is zeroed (DGC's momentum factor masking); acc is
  // finite there. Gate closed: k pairs (j, NaN) for j < k, acc and velocity untouched.
  virtual void select(float* acc, size_t n, size_t k, int32_t* pairs, bool zeroTaken, float* velocity,
                      const uint32_t* gate) = 0;
  // g = (sum over ranks, in rank order, of their k pairs) / ranks.
  virtual void decompress(float* g, size_t n, const int32_t* pairs, size_t k, int ranks) = 0;
  // Host memory <-> the ops' memory; block until copied.
  virtual void toDevice(float* dst, const float* host, size_t n) = 0;
  virtual void toHost(float* host, const float* src, size_t n) = 0;
};

// The operations for an arena on `device` (NotBuiltError for a GPU without a CUDA build).
std::unique_ptr<TopKOps> makeTopKOps(Device device);

}  // namespace dtrain::nn
