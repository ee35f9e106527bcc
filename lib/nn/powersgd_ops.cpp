// PowerSGD's operations on the CPU (the loops of the CPU hook) and on a GPU (lib/gpu's kernels and cuBLAS).
// Compiled with -ffp-contract=off (CMakeLists.txt): Gram-Schmidt rounds like the GPU kernel (powersgd_math.h).
#include "lib/nn/powersgd_ops.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "lib/common/config.h"
#include "lib/common/error.h"
#include "lib/gpu/powersgd_math.h"
#include "lib/nn/optimizer.h"

#if DTRAIN_WITH_CUDA
#include "lib/gpu/blas.h"
#include "lib/gpu/device.h"
#include "lib/gpu/kernels_powersgd.h"
#endif

namespace dtrain::nn {

void gramSchmidt(float* pt, int r, size_t len) {
  constexpr int kLanes = gpu::kGramSchmidtLanes;
  std::array<double, kLanes> part{};
  // Lane l's partial is the sum of the products at l, l + L, ... in that order: one pass, L at a time.
  auto sum = [&](const float* a, const float* b) {
    part.fill(0.0);
    for (size_t base = 0; base < len; base += kLanes) {
      const size_t lanes = std::min<size_t>(kLanes, len - base);
      for (size_t l = 0; l < lanes; ++l)
        part[l] += static_cast<double>(a[base + l]) * static_cast<double>(b[base + l]);
    }
    return gpu::gsTreeSum(part.data());
  };
  for (int c = 0; c < r; ++c) {
    float* col = pt + static_cast<size_t>(c) * len;
    const float inv = gpu::gsInverse(sum(col, col));
    for (size_t i = 0; i < len; ++i) col[i] = col[i] * inv;
    for (int d = c + 1; d < r; ++d) {
      float* rest = pt + static_cast<size_t>(d) * len;
      const auto f = static_cast<float>(sum(col, rest));
      for (size_t i = 0; i < len; ++i) rest[i] = gpu::gsSubtract(rest[i], f, col[i]);
    }
  }
}

namespace {

// A dot product in 8 independent partial sums (then added in a fixed order): the compiler vectorises it
// without reassociating anything, and every rank computes it the same way.
float dot(const float* a, const float* b, size_t n) {
  float part[8] = {};
  size_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (size_t l = 0; l < 8; ++l) part[l] += a[j + l] * b[j + l];
  float sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

class CpuPowerSgdOps final : public PowerSgdOps {
 public:
  Device device() const override { return Device::cpu(); }
  bool hostMemory() const override { return true; }
  DeviceFloats allocate(size_t n) override { return DeviceFloats(n, Device::cpu()); }
  void accumulate(float* g, const float* e, float* in, size_t n) override {
    for (size_t i = 0; i < n; ++i) gpu::efAccumulate(g, e, in, i);
  }
  // The gate is host memory here: each operation reads it as the CPU hook's `if`s did.
  void residual(float* e, const float* in, const float* g, size_t n, const uint32_t* gate) override {
    if (gate != nullptr && gate[1] != 0u) return;
    for (size_t i = 0; i < n; ++i) gpu::efResidual(e, in, g, i);
  }
  void copy(float* dst, const float* src, size_t n) override { std::copy(src, src + n, dst); }
  // Matrix by matrix, as before batches existed: the same bits.
  void project(const LowRankBatch& b) override {
    for (int64_t i = 0; i < b.count; ++i) project1(b.at(i));
  }
  void backProject(const LowRankBatch& b) override {
    for (int64_t i = 0; i < b.count; ++i) backProject1(b.at(i));
  }
  void decompress(const LowRankBatch& b) override {
    for (int64_t i = 0; i < b.count; ++i) decompress1(b.at(i));
  }
  void orthogonalise(std::span<const LowRankFactors> matrices) override {
    for (const LowRankFactors& f : matrices)
      if (f.rank > 0 && f.rows > 0) gramSchmidt(f.pt, f.rank, static_cast<size_t>(f.rows));
  }
  void divide(float* x, size_t n, float divisor) override {
    for (size_t i = 0; i < n; ++i) x[i] = x[i] / divisor;
  }
  void checkFinite(uint32_t* gate, const float* q, size_t nq, const float* g, size_t ng) override {
    gate[0] = nn::allFinite({q, nq}) ? 0u : 1u;
    gate[1] = nn::allFinite({g, ng}) ? 0u : 1u;
  }
  void restart(float* q, const float* initial, size_t n, const uint32_t* gate) override {
    if (gate[0] != 0u) std::copy(initial, initial + n, q);
  }
  void toDevice(float* dst, const float* host, size_t n) override { std::copy(host, host + n, dst); }
  void toHost(float* host, const float* src, size_t n) override { std::copy(src, src + n, host); }

 private:
  static void project1(const LowRankFactors& f) {
    const auto rows = static_cast<size_t>(f.rows), cols = static_cast<size_t>(f.cols);
    for (size_t i = 0; i < rows; ++i) {
      const float* row = f.m + i * cols;
      for (int c = 0; c < f.rank; ++c)
        f.pt[static_cast<size_t>(c) * rows + i] = dot(row, f.qt + static_cast<size_t>(c) * cols, cols);
    }
  }
  static void backProject1(const LowRankFactors& f) {
    const auto rows = static_cast<size_t>(f.rows), cols = static_cast<size_t>(f.cols);
    std::fill(f.qt, f.qt + static_cast<size_t>(f.rank) * cols, 0.0f);
    for (size_t i = 0; i < rows; ++i) {
      const float* row = f.m + i * cols;
      for (int c = 0; c < f.rank; ++c) {
        const float a = f.pt[static_cast<size_t>(c) * rows + i];
        float* qc = f.qt + static_cast<size_t>(c) * cols;
        for (size_t j = 0; j < cols; ++j) qc[j] += a * row[j];
      }
    }
  }
  static void decompress1(const LowRankFactors& f) {
    const auto rows = static_cast<size_t>(f.rows), cols = static_cast<size_t>(f.cols);
    for (size_t i = 0; i < rows; ++i) {
      float* row = f.m + i * cols;
      std::fill(row, row + cols, 0.0f);
      for (int c = 0; c < f.rank; ++c) {
        const float a = f.pt[static_cast<size_t>(c) * rows + i];
        const float* qc = f.qt + static_cast<size_t>(c) * cols;
        for (size_t j = 0; j < cols; ++j) row[j] += a * qc[j];
      }
    }
  }
};

#if DTRAIN_WITH_CUDA
class GpuPowerSgdOps final : public PowerSgdOps {
 public:
  explicit GpuPowerSgdOps(Device device) : device_(device) {}
  Device device() const override { return device_; }
  bool hostMemory() const override { return false; }
  DeviceFloats allocate(size_t n) override { return DeviceFloats(n, device_); }
  void accumulate(float* g, const float* e, float* in, size_t n) override {
    gpu::kernels::powerSgdAccumulate(g, e, in, n);
  }
  void residual(float* e, const float* in, const float* g, size_t n, const uint32_t* gate) override {
    gpu::kernels::powerSgdResidual(e, in, g, n, gate);
  }
  void copy(float* dst, const float* src, size_t n) override { gpu::kernels::copyFloatsAsync(dst, src, n); }
  // One GEMM per product for the whole batch (A, B, C strides per powersgd_math.h's operand roles).
  void project(const LowRankBatch& b) override {
    const LowRankFactors& f = b.first;
    run(gpu::projectGemm(f.rows, f.cols, f.rank), f.qt, b.strideQ, f.m, b.strideM, f.pt, b.strideP, b.count);
  }
  void backProject(const LowRankBatch& b) override {
    const LowRankFactors& f = b.first;
    run(gpu::backProjectGemm(f.rows, f.cols, f.rank), f.pt, b.strideP, f.m, b.strideM, f.qt, b.strideQ, b.count);
  }
  void decompress(const LowRankBatch& b) override {
    const LowRankFactors& f = b.first;
    run(gpu::decompressGemm(f.rows, f.cols, f.rank), f.pt, b.strideP, f.qt, b.strideQ, f.m, b.strideM, b.count);
  }
  // The list as the kernels' descriptors (host memory, reused: no allocation once the largest bucket was seen).
  void orthogonalise(std::span<const LowRankFactors> matrices) override {
    list_.clear();
    for (const LowRankFactors& f : matrices) list_.push_back({.pt = f.pt, .rows = f.rows, .rank = f.rank});
    gpu::kernels::powerSgdGramSchmidt(list_.data(), list_.size());
  }
  void divide(float* x, size_t n, float divisor) override { gpu::kernels::powerSgdDivide(x, n, divisor); }
  void checkFinite(uint32_t* gate, const float* q, size_t nq, const float* g, size_t ng) override {
    gpu::kernels::powerSgdCheckFinite(gate, q, nq, g, ng);
  }
  void restart(float* q, const float* initial, size_t n, const uint32_t* gate) override {
    gpu::kernels::powerSgdRestart(q, initial, n, gate);
  }
  void toDevice(float* dst, const float* host, size_t n) override {
    copyBytes(dst, device_, host, Device::cpu(), n * sizeof(float));
  }
  void toHost(float* host, const float* src, size_t n) override {
    copyBytes(host, Device::cpu(), src, device_, n * sizeof(float));
  }

 private:
  // A batch of one: the plain GEMM (today's call, today's bits); more: the strided-batched one, float32 as well.
  static void run(const gpu::RowMajorGemm& g, const float* a, int64_t strideA, const float* b, int64_t strideB,
                  float* c, int64_t strideC, int64_t count) {
    if (count == 1)
      gpu::gemmFloat32(g.transA, g.transB, g.m, g.n, g.k, 1.0f, a, g.lda, b, g.ldb, 0.0f, c, g.ldc);
    else
      gpu::gemmFloat32Batched(g.transA, g.transB, g.m, g.n, g.k, 1.0f, a, g.lda, strideA, b, g.ldb, strideB, 0.0f, c,
                              g.ldc, strideC, count);
  }
  Device device_;
  std::vector<gpu::GsMatrix> list_;
};
#endif

}  // namespace

std::unique_ptr<PowerSgdOps> makePowerSgdOps(Device device) {
  if (device.isCpu()) return std::make_unique<CpuPowerSgdOps>();
#if DTRAIN_WITH_CUDA
  return std::make_unique<GpuPowerSgdOps>(device);
#else
  DTRAIN_THROW(NotBuiltError, "device {}: PowerSGD on a GPU needs a CUDA build; this dtrain was built without CUDA",
               device.str());
#endif
}

}  // namespace dtrain::nn
