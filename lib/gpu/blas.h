// Row-major GEMMs through cuBLAS, for the CUDA layers (lib/nn/cuda). No CUDA header is needed to include this.
//
// Every matrix is row-major (C / PyTorch contiguous) with a leading dimension (elements between rows):
//   gemm:        C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C      (op(X) = X, or X^T when trans)
//   gemmBatched: the same for `batch` matrices at fixed strides (cublasGemmStridedBatchedEx).
// cuBLAS is column-major; a row-major C = op(A) op(B) is the column-major C^T = op(B)^T op(A)^T, so the calls
// below swap the operands instead of transposing any data.
//
// Stream: the legacy default stream of the current GPU (where every CUDA layer computes); asynchronous.
// Handle: one cuBLAS handle per GPU per process, created on first use (cublasCreate) and never destroyed (a
// process-lifetime object: destroying it at exit races with the CUDA runtime's own teardown).
// Precision: the operands and C are float32 in memory and accumulation is float32 in every mode.
// - TF32 tensor cores (CUBLAS_COMPUTE_32F_FAST_TF32, PyTorch's allow_tf32) are used while tf32() is true, the
//   default; setTf32(false) gives IEEE float32 products for exact comparisons with the CPU ("tf32": false).
// - While bf16() is true ("precision": "bf16"), A and B are first rounded to bfloat16 (round to nearest even)
//   into a per-thread, per-GPU scratch buffer that grows to the largest operand seen (then stays: no allocation
//   in the steady state), and cuBLAS multiplies bf16 x bf16 on tensor cores with CUBLAS_COMPUTE_32F (float32
//   accumulation and float32 C, as PyTorch's bf16 matmul with allow_bf16_reduced_precision_reduction off).
//   bf16 takes precedence over tf32. The conversion and the GEMM run on the same stream, so the scratch is reused
//   safely by the next call.
// - An operand may also be given as values already stored in bf16 (GemmOperand::bf16: the bf16 activation storage
//   of "precision": "bf16", docs/gpu.md): cuBLAS reads it as it is (no conversion pass), and the GEMM is then a
//   bf16 x bf16 one whatever bf16() says, the other operand rounded into the scratch if it is float32. Stored bf16
//   values rounded from the float32 ones (round to nearest even, kernels::toBf16's rounding) give the same GEMM as
//   the float32 operand converted here.
// Thread-safety: setTf32/setBf16 are process-wide atomics; gemm calls from several threads on one GPU share its
// handle, which cuBLAS allows only when they use the same stream (they do: the legacy default stream).
// Errors: GpuError "<call> failed: <cuBLAS status name>" with the file:line of the check.
#pragma once

#include <cstdint>

namespace dtrain::gpu {

void setTf32(bool on) noexcept;
bool tf32() noexcept;
void setBf16(bool on) noexcept;
bool bf16() noexcept;

// A GEMM input: float32 values (a const float* converts implicitly), or bf16 values (2-byte bit patterns, device
// memory) laid out as the float32 matrix would be, element for element (the same lda and strides, in elements).
struct GemmOperand {
  const void* data = nullptr;
  bool isBf16 = false;
  GemmOperand(const float* p) : data(p) {}  // NOLINT(google-explicit-constructor): every float32 call site
  static GemmOperand bf16(const void* p) {
    GemmOperand o(nullptr);
    o.data = p;
    o.isBf16 = true;
    return o;
  }
};

void gemm(bool transA, bool transB, int64_t m, int64_t n, int64_t k, float alpha, GemmOperand a, int64_t lda,
          GemmOperand b, int64_t ldb, float beta, float* c, int64_t ldc);

// gemm with float32 operands whatever bf16() says (TF32 as tf32()): for products outside the layers that
// "precision": "bf16" does not cover (PowerSGD's factors, lib/nn/powersgd_ops.h, as PyTorch's comm hooks run
// outside autocast).
void gemmFloat32(bool transA, bool transB, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

void gemmBatched(bool transA, bool transB, int64_t m, int64_t n, int64_t k, float alpha, GemmOperand a, int64_t lda,
                 int64_t strideA, GemmOperand b, int64_t ldb, int64_t strideB, float beta, float* c, int64_t ldc,
                 int64_t strideC, int64_t batch);

// gemmBatched with float32 operands whatever bf16() says (TF32 as tf32()), as gemmFloat32: PowerSGD's batches of
// same-shape matrices. cuBLAS may pick another kernel than gemmFloat32's for the same matrices, so a batched product
// equals the unbatched one within float rounding, not necessarily bit for bit.
void gemmFloat32Batched(bool transA, bool transB, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                        int64_t lda, int64_t strideA, const float* b, int64_t ldb, int64_t strideB, float beta, float* c,
                        int64_t ldc, int64_t strideC, int64_t batch);

}  // namespace dtrain::gpu
