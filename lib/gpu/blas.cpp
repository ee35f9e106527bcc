#include "lib/gpu/blas.h"

#include <cublas_v2.h>
#include <fmt/format.h>

#include <atomic>
#include <limits>
#include <mutex>

#include "lib/gpu/check.h"
#include "lib/gpu/device.h"

// cuBLAS calls return cublasStatus_t: the same shape of check as DTRAIN_CUDA_CHECK.
#define DTRAIN_CUBLAS_CHECK(expr)                                                                          \
  do {                                                                                                     \
    const cublasStatus_t dtrain_blas_s_ = (expr);                                                          \
    if (dtrain_blas_s_ != CUBLAS_STATUS_SUCCESS) [[unlikely]]                                              \
      ::dtrain::detail::throwAt<::dtrain::gpu::GpuError>(                                                  \
          __FILE__, __LINE__, ::fmt::format("{} failed: {}", #expr, cublasGetStatusName(dtrain_blas_s_))); \
  } while (0)

namespace dtrain::gpu {
namespace {

std::atomic<bool> gTf32{true};

// One handle per GPU index, created on first use on that GPU (made current by the caller).
cublasHandle_t handleFor(int device) {
  static std::mutex mu;
  static cublasHandle_t handles[64] = {};
  DTRAIN_CHECK(device >= 0 && device < 64, "GPU index {} is beyond the 64 this build supports", device);
  std::lock_guard<std::mutex> lock(mu);
  if (handles[device] == nullptr) DTRAIN_CUBLAS_CHECK(cublasCreate(&handles[device]));
  return handles[device];
}

int checkedInt(int64_t v, const char* what) {
  DTRAIN_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "gemm: {} = {} does not fit cuBLAS's int", what, v);
  return static_cast<int>(v);
}

cublasComputeType_t computeType() {
  return gTf32.load(std::memory_order_relaxed) ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
}

}  // namespace

void setTf32(bool on) noexcept { gTf32.store(on); }
bool tf32() noexcept { return gTf32.load(); }

void gemm(bool transA, bool transB, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  cublasHandle_t h = handleFor(currentDevice());
  // Row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T: B first, dimensions n x m.
  DTRAIN_CUBLAS_CHECK(cublasGemmEx(h, transB ? CUBLAS_OP_T : CUBLAS_OP_N, transA ? CUBLAS_OP_T : CUBLAS_OP_N,
                                   checkedInt(n, "n"), checkedInt(m, "m"), checkedInt(k, "k"), &alpha, b, CUDA_R_32F,
                                   checkedInt(ldb, "ldb"), a, CUDA_R_32F, checkedInt(lda, "lda"), &beta, c,
                                   CUDA_R_32F, checkedInt(ldc, "ldc"), computeType(), CUBLAS_GEMM_DEFAULT));
}

void gemmBatched(bool transA, bool transB, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 int64_t strideA, const float* b, int64_t ldb, int64_t strideB, float beta, float* c, int64_t ldc,
                 int64_t strideC, int64_t batch) {
  if (m == 0 || n == 0 || batch == 0) return;
  cublasHandle_t h = handleFor(currentDevice());
  DTRAIN_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      h, transB ? CUBLAS_OP_T : CUBLAS_OP_N, transA ? CUBLAS_OP_T : CUBLAS_OP_N, checkedInt(n, "n"),
      checkedInt(m, "m"), checkedInt(k, "k"), &alpha, b, CUDA_R_32F, checkedInt(ldb, "ldb"), strideB, a, CUDA_R_32F,
      checkedInt(lda, "lda"), strideA, &beta, c, CUDA_R_32F, checkedInt(ldc, "ldc"), strideC,
      checkedInt(batch, "batch"), computeType(), CUBLAS_GEMM_DEFAULT));
}

}  // namespace dtrain::gpu
