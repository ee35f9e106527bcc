// top-k's operations on the CPU (the CPU hook's loops and selection) and on a GPU (lib/gpu/kernels_topk.h).
// Compiled with -ffp-contract=off (CMakeLists.txt): the element-wise steps round like the kernels (topk_select.h).
#include "lib/nn/topk_ops.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

#include "lib/common/config.h"
#include "lib/common/error.h"
#include "lib/nn/optimizer.h"

#if DTRAIN_WITH_CUDA
#include "lib/gpu/kernels.h"
#include "lib/gpu/kernels_topk.h"
#endif

namespace dtrain::nn {

namespace {

// The indices of every element with |x| >= t, for a threshold t read off a strided sample so that about 2k
// elements pass (Deep Gradient Compression's sampled threshold, made exact): when at least k pass, the top k
// are among them (everything left out is smaller than every candidate) and the selection runs on those
// only; otherwise the caller selects from all n. Returns the candidate count (n: use all), written to `out`.
size_t selectCandidates(const float* acc, size_t n, size_t k, std::vector<int32_t>& out, std::vector<float>& sample) {
  constexpr size_t kSample = 4096;
  if (n < 4 * kSample) return n;
  const size_t stride = n / kSample;
  sample.resize(kSample);
  for (size_t j = 0; j < kSample; ++j) sample[j] = std::fabs(acc[j * stride]);
  const auto rank = std::min(kSample - 1, static_cast<size_t>(2.0 * static_cast<double>(k) / n * kSample) + 8);
  std::nth_element(sample.begin(), sample.begin() + static_cast<ptrdiff_t>(rank), sample.end(), std::greater<>());
  const float t = sample[rank];
  size_t c = 0;
  for (size_t i = 0; i < n; ++i) {
    out[c] = static_cast<int32_t>(i);
    c += std::fabs(acc[i]) >= t ? 1 : 0;  // branch-free: the store happens either way, the count decides
  }
  return c >= k ? c : n;
}

class CpuTopKOps final : public TopKOps {
 public:
  Device device() const override { return Device::cpu(); }
  bool hostMemory() const override { return true; }
  DeviceFloats allocate(size_t n) override { return DeviceFloats(n, Device::cpu()); }
  // The gate is host memory here: each operation reads it as the CPU hook's `if`s did.
  void openGate(uint32_t* gate, const float* x, size_t n) override {
    gate[0] = nn::allFinite({x, n}) ? 0u : 1u;
    gate[1] = 0u;
  }
  void clip(float* g, size_t n, double limit, const uint32_t* gate) override {
    if (gpu::topkGateOpen(gate)) nn::clipGradNorm({g, n}, limit);
  }
  void zero(float* x, size_t n) override { std::fill(x, x + n, 0.0f); }
  void adamMoments(float* m, float* v, const float* g, size_t n, const gpu::TopkAdam& a,
                   const uint32_t* gate) override {
    if (!gpu::topkGateOpen(gate)) return;
    for (size_t i = 0; i < n; ++i) gpu::topkAdamMoments(m, v, g, a, i);
  }
  void adamUpdate(float* m, float* v, float* g, size_t n, const gpu::TopkAdam& a, const uint32_t* gate) override {
    if (!gpu::topkGateOpen(gate)) return;
    for (size_t i = 0; i < n; ++i) gpu::topkAdamUpdate(m, v, g, a, i);
  }
  void accumulate(float* acc, const float* g, size_t n, const uint32_t* gate) override {
    if (!gpu::topkGateOpen(gate)) return;
    for (size_t i = 0; i < n; ++i) acc[i] = acc[i] + g[i];
  }
  void momentum(float* u, float* acc, const float* g, size_t n, float m, const uint32_t* gate) override {
    if (!gpu::topkGateOpen(gate)) return;
    for (size_t i = 0; i < n; ++i) gpu::topkMomentum(u, acc, g, m, i);
  }
  void plainMomentum(float* u, float* g, size_t n, float m, const uint32_t* gate) override {
    if (!gpu::topkGateOpen(gate)) return;
    for (size_t i = 0; i < n; ++i) gpu::topkPlainMomentum(u, g, m, i);
  }
  void dropNonFinite(float* acc, float* velocity, size_t n, uint32_t* gate) override {
    if (!gpu::topkGateOpen(gate) || nn::allFinite({acc, n})) return;
    gate[1] = 1u;
    std::fill(acc, acc + n, 0.0f);
    if (velocity != nullptr) std::fill(velocity, velocity + n, 0.0f);
  }
  void select(float* acc, size_t n, size_t k, int32_t* pairs, bool zeroTaken, float* velocity,
              const uint32_t* gate) override {
    if (!gpu::topkGateOpen(gate)) {
      nanPairs(pairs, k);
      return;
    }
    // Only grown: buckets of different sizes share it, and a resize up from a smaller bucket's size would zero the
    // difference on every step (a memset of up to the largest bucket's indices per bucket).
    if (order_.size() < n) order_.resize(n);
    const size_t candidates = k < n ? selectCandidates(acc, n, k, order_, sample_) : n;
    if (candidates == n) std::iota(order_.begin(), order_.begin() + static_cast<ptrdiff_t>(n), 0);
    if (k < n) {
      // Largest magnitude first; ties by index, so the choice does not depend on the algorithm's internals.
      auto larger = [acc](int32_t x, int32_t y) {
        const float ax = std::fabs(acc[x]), ay = std::fabs(acc[y]);
        return ax > ay || (ax == ay && x < y);
      };
      auto end = order_.begin() + static_cast<ptrdiff_t>(candidates);
      std::nth_element(order_.begin(), order_.begin() + static_cast<ptrdiff_t>(k), end, larger);
      std::sort(order_.begin(), order_.begin() + static_cast<ptrdiff_t>(k));  // ascending: a cache-friendly scatter
    }
    for (size_t j = 0; j < k; ++j) {
      const int32_t i = order_[j];
      pairs[2 * j] = i;
      pairs[2 * j + 1] = std::bit_cast<int32_t>(acc[i]);
      if (zeroTaken) acc[i] = 0.0f;     // sent: what stays in the residual is the rest
      if (velocity) velocity[i] = 0.0f;  // DGC's momentum factor masking
    }
  }
  void decompress(float* g, size_t n, const int32_t* pairs, size_t k, int ranks) override {
    // The same additions in the same order (rank 0's pairs first) on every rank: identical results.
    std::fill(g, g + n, 0.0f);
    for (size_t p = 0; p < k * static_cast<size_t>(ranks); ++p) {
      const auto i = static_cast<size_t>(static_cast<uint32_t>(pairs[2 * p]));
      DTRAIN_CHECK(i < n, "topk: a peer sent index {} for a bucket of {} elements", i, n);
      g[i] += std::bit_cast<float>(pairs[2 * p + 1]);
    }
    const auto size = static_cast<float>(ranks);
    for (size_t i = 0; i < n; ++i) g[i] /= size;
  }
  void toDevice(float* dst, const float* host, size_t n) override { std::copy(host, host + n, dst); }
  void toHost(float* host, const float* src, size_t n) override { std::copy(src, src + n, host); }

 private:
  static void nanPairs(int32_t* pairs, size_t k) {
    for (size_t j = 0; j < k; ++j) {
      pairs[2 * j] = static_cast<int32_t>(j);
      pairs[2 * j + 1] = std::bit_cast<int32_t>(std::numeric_limits<float>::quiet_NaN());
    }
  }

  std::vector<int32_t> order_;  // candidate indices for the selection
  std::vector<float> sample_;   // magnitudes sampled for the candidate threshold
};

#if DTRAIN_WITH_CUDA
class GpuTopKOps final : public TopKOps {
 public:
  explicit GpuTopKOps(Device device) : device_(device) {}
  Device device() const override { return device_; }
  bool hostMemory() const override { return false; }
  DeviceFloats allocate(size_t n) override { return DeviceFloats(n, device_); }
  void openGate(uint32_t* gate, const float* x, size_t n) override { gpu::kernels::topkOpenGate(gate, x, n); }
  void clip(float* g, size_t n, double limit, const uint32_t* gate) override {
    // The norm's double reduction stays on the device (nn::gradNorm's on a GPU, without its read).
    if (partials_.size() == 0) partials_ = DeviceFloats(2 * gpu::kernels::kReduceBlocks, device_);
    auto* partials = reinterpret_cast<double*>(partials_.data());
    gpu::kernels::sumSquaresOnDevice(g, n, partials);
    gpu::kernels::topkClip(g, n, partials, limit, gate);
  }
  void zero(float* x, size_t n) override { zeroFloats(x, n, device_); }
  void adamMoments(float* m, float* v, const float* g, size_t n, const gpu::TopkAdam& a,
                   const uint32_t* gate) override {
    gpu::kernels::topkAdamMoments(m, v, g, n, a, gate);
  }
  void adamUpdate(float* m, float* v, float* g, size_t n, const gpu::TopkAdam& a, const uint32_t* gate) override {
    gpu::kernels::topkAdamUpdate(m, v, g, n, a, gate);
  }
  void accumulate(float* acc, const float* g, size_t n, const uint32_t* gate) override {
    gpu::kernels::topkAccumulate(acc, g, n, gate);
  }
  void momentum(float* u, float* acc, const float* g, size_t n, float m, const uint32_t* gate) override {
    gpu::kernels::topkMomentum(u, acc, g, n, m, gate);
  }
  void plainMomentum(float* u, float* g, size_t n, float m, const uint32_t* gate) override {
    gpu::kernels::topkPlainMomentum(u, g, n, m, gate);
  }
  void dropNonFinite(float* acc, float* velocity, size_t n, uint32_t* gate) override {
    gpu::kernels::topkDropNonFinite(acc, velocity, n, gate);
  }
  void select(float* acc, size_t n, size_t k, int32_t* pairs, bool zeroTaken, float* velocity,
              const uint32_t* gate) override {
    const size_t words = gpu::kernels::topkScratchWords(n);
    if (scratch_.size() < words) scratch_ = DeviceFloats(words, device_);  // the largest bucket's, then kept
    gpu::kernels::topkSelect(acc, n, k, pairs, zeroTaken, reinterpret_cast<uint32_t*>(scratch_.data()), gate);
    if (velocity) gpu::kernels::topkZeroAt(velocity, pairs, k, gate);
  }
  void decompress(float* g, size_t n, const int32_t* pairs, size_t k, int ranks) override {
    gpu::kernels::topkDecompress(g, n, pairs, k, ranks);
  }
  void toDevice(float* dst, const float* host, size_t n) override {
    copyBytes(dst, device_, host, Device::cpu(), n * sizeof(float));
  }
  void toHost(float* host, const float* src, size_t n) override {
    copyBytes(host, Device::cpu(), src, device_, n * sizeof(float));
  }

 private:
  Device device_;
  DeviceFloats scratch_;
  DeviceFloats partials_;  // the clipping norm's kReduceBlocks doubles
};
#endif

}  // namespace

std::unique_ptr<TopKOps> makeTopKOps(Device device) {
  if (device.isCpu()) return std::make_unique<CpuTopKOps>();
#if DTRAIN_WITH_CUDA
  return std::make_unique<GpuTopKOps>(device);
#else
  DTRAIN_THROW(NotBuiltError, "device {}: top-k on a GPU needs a CUDA build; this dtrain was built without CUDA",
               device.str());
#endif
}

}  // namespace dtrain::nn
