#include "lib/gpu/blas.h"

#include <cublas_v2.h>
#include <dlfcn.h>
#include <fmt/format.h>

#include <atomic>
#include <limits>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "lib/gpu/check.h"
#include "lib/gpu/device.h"
#include "lib/gpu/gemm_args.h"
#include "lib/gpu/kernels.h"
#include "lib/gpu/memory.h"

// cuBLAS calls return cublasStatus_t: the same shape of check as DTRAIN_CUDA_CHECK, the call site in the message
// ("<call> failed: CUBLAS_STATUS_... (lib/gpu/blas.cpp:N)").
#define DTRAIN_CUBLAS_CHECK(expr)                                                                           \
  do {                                                                                                      \
    const cublasStatus_t dtrain_blas_s_ = (expr);                                                           \
    if (dtrain_blas_s_ != CUBLAS_STATUS_SUCCESS) [[unlikely]]                                               \
      ::dtrain::detail::throwAt<::dtrain::gpu::GpuError>(                                                   \
          __FILE__, __LINE__,                                                                               \
          ::fmt::format("{} failed: {} ({})", #expr, cublas().statusName(dtrain_blas_s_),                   \
                        ::dtrain::gpu::detail::checkSite(__FILE__, __LINE__)));                             \
  } while (0)

namespace dtrain::gpu {
namespace {

// cuBLAS is loaded on the first GEMM (dlopen), not linked: linked, every dtrain process, the agent and each worker
// of a CPU job included, mapped and relocated libcublas + libcublasLt at start-up (+150 MB RSS and +1.8 s before
// the first step of the main job, scripts/bench/train). PyTorch defers CUDA libraries the same way.
// The C entry points (cublas_api.h also declares C++ overloads taking a cudaDataType compute type).
using GemmExFn = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                                    const void*, cudaDataType, int, const void*, cudaDataType, int, const void*, void*,
                                    cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
using GemmStridedBatchedExFn = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                                                  const void*, const void*, cudaDataType, int, long long int,
                                                  const void*, cudaDataType, int, long long int, const void*, void*,
                                                  cudaDataType, int, long long int, int, cublasComputeType_t,
                                                  cublasGemmAlgo_t);
// Overload resolution against the declarations checks these types at compile time (unevaluated: no link reference).
static_assert(sizeof(static_cast<GemmExFn>(&cublasGemmEx)) > 0);
static_assert(sizeof(static_cast<GemmStridedBatchedExFn>(&cublasGemmStridedBatchedEx)) > 0);
struct CublasApi {
  decltype(&cublasCreate_v2) create;
  GemmExFn gemmEx;
  GemmStridedBatchedExFn gemmStridedBatchedEx;
  decltype(&cublasGetStatusName) statusName;
};

// Thread-safe (a function-local static); throws GpuError naming the library and dlerror() when it cannot load.
const CublasApi& cublas() {
  static const CublasApi api = [] {
    const std::string soname = fmt::format("libcublas.so.{}", CUBLAS_VER_MAJOR);
    void* lib = ::dlopen(soname.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) lib = ::dlopen(("/usr/local/cuda/lib64/" + soname).c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr)
      throw GpuError(fmt::format("cannot load cuBLAS ({}): {}; put CUDA's lib64 folder on LD_LIBRARY_PATH", soname,
                                 ::dlerror()));
    auto symbol = [&](const char* name) {
      void* f = ::dlsym(lib, name);
      if (f == nullptr) throw GpuError(fmt::format("{} has no {}: {}", soname, name, ::dlerror()));
      return f;
    };
    CublasApi a{};
    a.create = reinterpret_cast<decltype(a.create)>(symbol("cublasCreate_v2"));
    a.gemmEx = reinterpret_cast<decltype(a.gemmEx)>(symbol("cublasGemmEx"));
    a.gemmStridedBatchedEx = reinterpret_cast<decltype(a.gemmStridedBatchedEx)>(symbol("cublasGemmStridedBatchedEx"));
    a.statusName = reinterpret_cast<decltype(a.statusName)>(symbol("cublasGetStatusName"));
    return a;
  }();
  return api;
}

std::atomic<bool> gTf32{true};
std::atomic<bool> gBf16{false};

// One handle per GPU index, created on first use on that GPU (made current by the caller).
cublasHandle_t handleFor(int device) {
  static std::mutex mu;
  static cublasHandle_t handles[64] = {};
  DTRAIN_CHECK(device >= 0 && device < 64, "GPU index {} is beyond the 64 this build supports", device);
  std::lock_guard<std::mutex> lock(mu);
  if (handles[device] == nullptr) DTRAIN_CUBLAS_CHECK(cublas().create(&handles[device]));
  return handles[device];
}

int checkedInt(int64_t v, const char* what) {
  DTRAIN_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "gemm: {} = {} does not fit cuBLAS's int", what, v);
  return static_cast<int>(v);
}

cublasComputeType_t computeType() {
  return gTf32.load(std::memory_order_relaxed) ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
}

// The bf16 copies of A and B: per thread and GPU, grown to the largest operand seen.
struct Bf16Scratch {
  DeviceBuffer a, b;
};
void* bf16Copy(const float* x, size_t count, bool first) {
  thread_local std::unordered_map<int, Bf16Scratch> scratch;
  const int device = currentDevice();
  DeviceBuffer& buf = first ? scratch[device].a : scratch[device].b;
  const size_t bytes = count * 2;
  if (buf.bytes() < bytes) buf = DeviceBuffer(bytes + bytes / 4, device);  // freeing the old one synchronises
  kernels::toBf16(x, buf.data(), count);
  return buf.data();
}

// The operands as cuBLAS gets them: float32 as they are, or both bf16 (stored bf16 operands as they are, float32
// ones rounded into the scratch) when bf16() is on or either operand is stored bf16 (gemm_args.h's gemmInBf16).
struct Operands {
  const void* a;
  const void* b;
  cudaDataType_t type;
  cublasComputeType_t compute;
};
Operands operands(const RowMajorGemm& g, GemmOperand a, GemmOperand b) {
  if (!gemmInBf16(gBf16.load(std::memory_order_relaxed), a.isBf16, b.isBf16) || g.k == 0)
    return {a.data, b.data, CUDA_R_32F, computeType()};
  // The copies keep every element's offset, so lda/ldb and the strides apply to them unchanged.
  const void* ha = a.isBf16 ? a.data : bf16Copy(static_cast<const float*>(a.data), spanA(g), true);
  const void* hb = b.isBf16 ? b.data : bf16Copy(static_cast<const float*>(b.data), spanB(g), false);
  return {ha, hb, CUDA_R_16BF, CUBLAS_COMPUTE_32F};
}

// The checked column-major arguments of a row-major call (gemm_args.h): every size fits cuBLAS's int and every
// leading dimension its matrix, else a clear error instead of CUBLAS_STATUS_INVALID_VALUE.
ColumnMajorGemm checkedArgs(const RowMajorGemm& g) {
  const char* bad = badLeadingDimension(g);
  DTRAIN_CHECK(bad == nullptr, "gemm: {} too small (m {} n {} k {}, lda {} ldb {} ldc {}, trans {}{})",
               bad == nullptr ? "" : bad, g.m, g.n, g.k, g.lda, g.ldb, g.ldc, g.transA ? 'T' : 'N', g.transB ? 'T' : 'N');
  const ColumnMajorGemm c = toColumnMajor(g);
  const std::pair<int64_t, const char*> sizes[] = {{c.m, "n"},       {c.n, "m"},        {c.k, "k"},    {c.batch, "batch"},
                                                  {c.ldFirst, "ldb"}, {c.ldSecond, "lda"}, {c.ldc, "ldc"}};
  for (const auto& [v, what] : sizes) checkedInt(v, what);
  return c;
}

}  // namespace

void setTf32(bool on) noexcept { gTf32.store(on); }
bool tf32() noexcept { return gTf32.load(); }
void setBf16(bool on) noexcept { gBf16.store(on); }
bool bf16() noexcept { return gBf16.load(); }

cublasOperation_t opOf(bool trans) { return trans ? CUBLAS_OP_T : CUBLAS_OP_N; }

namespace {

void gemmWith(bool transA, bool transB, int64_t m, int64_t n, int64_t k, float alpha, GemmOperand a, int64_t lda,
              GemmOperand b, int64_t ldb, float beta, float* c, int64_t ldc, bool allowBf16) {
  if (m == 0 || n == 0) return;
  const RowMajorGemm g{.transA = transA, .transB = transB, .m = m, .n = n, .k = k, .lda = lda, .ldb = ldb, .ldc = ldc};
  const ColumnMajorGemm cm = checkedArgs(g);
  cublasHandle_t h = handleFor(currentDevice());
  const Operands op = allowBf16 ? operands(g, a, b) : Operands{a.data, b.data, CUDA_R_32F, computeType()};
  // Row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T: B first, dimensions n x m (gemm_args.h).
  DTRAIN_CUBLAS_CHECK(cublas().gemmEx(h, opOf(cm.transFirst), opOf(cm.transSecond), static_cast<int>(cm.m),
                                      static_cast<int>(cm.n), static_cast<int>(cm.k), &alpha, op.b, op.type,
                                      static_cast<int>(cm.ldFirst), op.a, op.type, static_cast<int>(cm.ldSecond), &beta,
                                      c, CUDA_R_32F, static_cast<int>(cm.ldc), op.compute, CUBLAS_GEMM_DEFAULT));
}

}  // namespace

void gemm(bool transA, bool transB, int64_t m, int64_t n, int64_t k, float alpha, GemmOperand a, int64_t lda,
          GemmOperand b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemmWith(transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, /*allowBf16=*/true);
}

void gemmFloat32(bool transA, bool transB, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemmWith(transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, /*allowBf16=*/false);
}

namespace {

void gemmBatchedWith(bool transA, bool transB, int64_t m, int64_t n, int64_t k, float alpha, GemmOperand a,
                     int64_t lda, int64_t strideA, GemmOperand b, int64_t ldb, int64_t strideB, float beta, float* c,
                     int64_t ldc, int64_t strideC, int64_t batch, bool allowBf16) {
  if (m == 0 || n == 0 || batch == 0) return;
  const RowMajorGemm g{.transA = transA, .transB = transB, .m = m, .n = n, .k = k, .lda = lda, .ldb = ldb, .ldc = ldc,
                       .strideA = strideA, .strideB = strideB, .strideC = strideC, .batch = batch};
  const ColumnMajorGemm cm = checkedArgs(g);
  cublasHandle_t h = handleFor(currentDevice());
  const Operands op = allowBf16 ? operands(g, a, b) : Operands{a.data, b.data, CUDA_R_32F, computeType()};
  DTRAIN_CUBLAS_CHECK(cublas().gemmStridedBatchedEx(
      h, opOf(cm.transFirst), opOf(cm.transSecond), static_cast<int>(cm.m), static_cast<int>(cm.n),
      static_cast<int>(cm.k), &alpha, op.b, op.type, static_cast<int>(cm.ldFirst), cm.strideFirst, op.a, op.type,
      static_cast<int>(cm.ldSecond), cm.strideSecond, &beta, c, CUDA_R_32F, static_cast<int>(cm.ldc), cm.strideC,
      static_cast<int>(cm.batch), op.compute, CUBLAS_GEMM_DEFAULT));
}

}  // namespace

void gemmBatched(bool transA, bool transB, int64_t m, int64_t n, int64_t k, float alpha, GemmOperand a, int64_t lda,
                 int64_t strideA, GemmOperand b, int64_t ldb, int64_t strideB, float beta, float* c, int64_t ldc,
                 int64_t strideC, int64_t batch) {
  gemmBatchedWith(transA, transB, m, n, k, alpha, a, lda, strideA, b, ldb, strideB, beta, c, ldc, strideC, batch,
                  /*allowBf16=*/true);
}

void gemmFloat32Batched(bool transA, bool transB, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                        int64_t lda, int64_t strideA, const float* b, int64_t ldb, int64_t strideB, float beta, float* c,
                        int64_t ldc, int64_t strideC, int64_t batch) {
  gemmBatchedWith(transA, transB, m, n, k, alpha, a, lda, strideA, b, ldb, strideB, beta, c, ldc, strideC, batch,
                  /*allowBf16=*/false);
}

}  // namespace dtrain::gpu
