// The operations of PowerSGD gradient compression (lib/train's PowerSgdHook, lib/train/powersgd.cpp) on the
// gradient arena's device, so that one hook runs on the CPU and on a GPU without host copies of the buckets:
// loops on the CPU; cuBLAS GEMMs and kernels on a GPU (lib/gpu/kernels_powersgd.h), enqueued on the legacy default
// stream where the layers compute, so NCCL's collectives on the hook's buffers are ordered after them by the
// communicator's events (lib/comm/nccl) and the optimizer's kernels after them. lib/gpu/powersgd_math.h states
// the arithmetic both sides share.
//
// Equality between the two: Gram-Schmidt (orthogonalise), error feedback (accumulate, residual), divide and copy
// are the same operations in the same order on both (bit for bit on the same inputs); the three products (project,
// backProject, decompress) are float32 GEMMs, cuBLAS's summation order on a GPU (TF32 when gpu::tf32() is on, never
// bf16), so equal within float rounding (1e-5 relative for the sizes of tests/gpu with TF32 off). A batch of
// same-shape matrices is one strided-batched GEMM per product on a GPU (cublasGemmStridedBatchedEx), a batch of one
// the plain GEMM; cuBLAS does not promise the batched kernel sums in the unbatched one's order, so a batched matrix
// equals its unbatched product within the same float rounding, not bit for bit (the CPU loops matrix by matrix:
// batching changes nothing there).
//
// Gram-Schmidt takes a bucket's whole list of matrices: on a GPU one launch (a block per matrix; up to
// gpu::kGramSchmidtBatch per launch), each matrix's bits those of its own, so the list changes nothing on either side.
//
// The hook's decisions about non-finite values (restart Q, keep the residual) are a gate in the ops' memory, set and
// read on the device like top-k's (lib/nn/topk_ops.h): nothing in a step reads a value back to the host, so a GPU's
// host keeps enqueueing.
//
// Pointers are the ops' device memory (allocate()); every call but toDevice and toHost is asynchronous on a GPU and
// none reads a value back. Thread-safety: none (the trainer's thread). Errors: gpu::GpuError (CUDA/cuBLAS
// failures), NotBuiltError (a GPU in a build without CUDA).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "lib/common/tensor.h"
#include "lib/nn/device.h"

namespace dtrain::nn {

// One compressed matrix: M [rows, cols] row-major (a parameter's gradient in its bucket), P^T [rank, rows] and
// Q^T [rank, cols] row-major (the factors stored transposed: each factor column contiguous).
struct LowRankFactors {
  float* m = nullptr;
  float* pt = nullptr;
  float* qt = nullptr;
  int64_t rows = 0, cols = 0;
  int rank = 0;
};

// `count` matrices of first's shape and rank whose m, pt and qt sit at constant strides (in floats, > 0 when
// count > 1) from first's: matrix i is at(i). A single matrix converts implicitly (count 1).
struct LowRankBatch {
  LowRankFactors first;
  int64_t count = 1;
  int64_t strideM = 0, strideP = 0, strideQ = 0;
  LowRankBatch(const LowRankFactors& f) : first(f) {}  // NOLINT(google-explicit-constructor): one matrix
  LowRankBatch(const LowRankFactors& f, int64_t n, int64_t sm, int64_t sp, int64_t sq)
      : first(f), count(n), strideM(sm), strideP(sp), strideQ(sq) {}
  LowRankFactors at(int64_t i) const {
    LowRankFactors f = first;
    f.m += i * strideM;
    f.pt += i * strideP;
    f.qt += i * strideQ;
    return f;
  }
};

class PowerSgdOps {
 public:
  virtual ~PowerSgdOps() = default;
  // Where the buffers live and the operations run.
  virtual Device device() const = 0;
  // Whether the host may read and write the buffers directly (the CPU): the hook's checkpointed state then aliases
  // them; otherwise it keeps host copies (toHost before a save, toDevice after a load).
  virtual bool hostMemory() const = 0;
  // n zeroed floats on device() (a gate: allocate(2), its storage read as 2 uint32 words).
  virtual DeviceFloats allocate(size_t n) = 0;
  // Error feedback: g = g + e, in = g; and after decompressing, e = in - g, only while gate word 1 is clear (the
  // result was finite; gate nullptr: always), else e stays as it was.
  virtual void accumulate(float* g, const float* e, float* in, size_t n) = 0;
  virtual void residual(float* e, const float* in, const float* g, size_t n, const uint32_t* gate) = 0;
  // dst = src (n floats, both on device()).
  virtual void copy(float* dst, const float* src, size_t n) = 0;
  // P = M Q; Q = M^T P; M = P Q^T (the whole M overwritten), for each matrix of the batch.
  virtual void project(const LowRankBatch& b) = 0;
  virtual void backProject(const LowRankBatch& b) = 0;
  virtual void decompress(const LowRankBatch& b) = 0;
  // Modified Gram-Schmidt over each matrix's P (the rank rows of pt, `rows` long; m and qt unused): gramSchmidt below
  // on each, in list order on the CPU; one launch for the list on a GPU. The matrices' P factors must not overlap.
  // `matrices` is host memory, read before this returns.
  virtual void orthogonalise(std::span<const LowRankFactors> matrices) = 0;
  // x = x / divisor.
  virtual void divide(float* x, size_t n, float divisor) = 0;
  // The finiteness gate (2 words, allocate(2)): word 0 = q[0, nq) holds a NaN or an infinity, word 1 = g[0, ng) does
  // (ng 0: clear). Decided where the buffers live; the host does not wait for it.
  virtual void checkFinite(uint32_t* gate, const float* q, size_t nq, const float* g, size_t ng) = 0;
  // q = initial (n floats) when gate word 0 is set; otherwise q stays as it was.
  virtual void restart(float* q, const float* initial, size_t n, const uint32_t* gate) = 0;
  // Host memory <-> the ops' memory, n floats; block until copied.
  virtual void toDevice(float* dst, const float* host, size_t n) = 0;
  virtual void toHost(float* host, const float* src, size_t n) = 0;
};

// The operations for an arena on `device`: loops on the CPU, kernels and cuBLAS on cuda:N (NotBuiltError without a
// CUDA build).
std::unique_ptr<PowerSgdOps> makePowerSgdOps(Device device);

// Modified Gram-Schmidt over the r rows of pt (each `len` long), in place, in lib/gpu/powersgd_math.h's summation
// order (the GPU kernel's, bit for bit): each row normalised (epsilon 1e-8), then removed from the later rows.
void gramSchmidt(float* pt, int r, size_t len);

}  // namespace dtrain::nn
