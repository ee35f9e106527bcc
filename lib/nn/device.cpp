#include "lib/nn/device.h"
#include "lib/nn/host_staging.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <unordered_map>

#include "lib/common/config.h"
#include "lib/common/error.h"
#include "lib/nn/optimizer.h"
#if DTRAIN_WITH_CUDA
#include "lib/gpu/blas.h"
#include "lib/gpu/device.h"
#include "lib/gpu/kernels.h"
#include "lib/gpu/kernels_cast.h"
#include "lib/gpu/memory.h"
#include "lib/gpu/staging.h"
#endif

namespace dtrain::nn {
namespace {

[[noreturn, maybe_unused]] void notBuilt(Device device, std::string_view what) {
  DTRAIN_THROW(NotBuiltError, "device {}: {} needs CUDA, but this dtrain was built without it (configure with "
                              "-DDTRAIN_WITH_CUDA=ON where nvcc and NCCL are installed)",
               device.str(), what);
}

#if DTRAIN_WITH_CUDA
// Per thread and GPU: the partial sums of the device reductions (kernels::kReduceBlocks doubles).
double* reducePartials(Device device) {
  thread_local std::unordered_map<int, gpu::DeviceBuffer> buffers;
  auto it = buffers.find(device.index);
  if (it == buffers.end())
    it = buffers.emplace(device.index, gpu::DeviceBuffer(gpu::kernels::kReduceBlocks * sizeof(double), device.index))
             .first;
  return static_cast<double*>(it->second.data());
}
#endif

}  // namespace

bool cudaBuilt() noexcept { return DTRAIN_WITH_CUDA != 0; }

int visibleGpus() noexcept {
#if DTRAIN_WITH_CUDA
  return gpu::visibleGpuCount();
#else
  return 0;
#endif
}

size_t peakDeviceBytes() noexcept {
#if DTRAIN_WITH_CUDA
  return gpu::allocatedBytes().peak;
#else
  return 0;
#endif
}

void useDevice(Device device) {
  if (device.isCpu()) return;
#if DTRAIN_WITH_CUDA
  gpu::setDevice(device.index);
#else
  notBuilt(device, "selecting a GPU");
#endif
}

void setTf32(bool on) {
#if DTRAIN_WITH_CUDA
  gpu::setTf32(on);
#else
  (void)on;
#endif
}

void setBf16(bool on) {
#if DTRAIN_WITH_CUDA
  gpu::setBf16(on);
#else
  (void)on;
#endif
}

namespace {
std::atomic<bool> gBf16Activations{true};
}  // namespace

void setBf16Activations(bool on) { gBf16Activations.store(on); }

namespace {
std::atomic<bool> gResidualLayerNormFusion{true};
}  // namespace

void setResidualLayerNormFusion(bool on) { gResidualLayerNormFusion.store(on); }
bool residualLayerNormFusionOn() noexcept { return gResidualLayerNormFusion.load(); }

namespace {
std::atomic<bool> gResidualLayerNormBackwardFusion{true};
}  // namespace

void setResidualLayerNormBackwardFusion(bool on) { gResidualLayerNormBackwardFusion.store(on); }
bool residualLayerNormBackwardFusionOn() noexcept { return gResidualLayerNormBackwardFusion.load(); }

bool bf16ActivationsOn() noexcept {
#if DTRAIN_WITH_CUDA
  return gpu::bf16() && gBf16Activations.load();
#else
  return false;
#endif
}

DeviceFloats::DeviceFloats(size_t count, Device device) : size_(count), device_(device) {
  if (device.isCpu()) {
    host_ = AlignedBuffer<float>(count);
    data_ = host_.data();
    return;
  }
#if DTRAIN_WITH_CUDA
  auto buffer = std::make_shared<gpu::DeviceBuffer>(count * sizeof(float), device.index);
  buffer->zero();
  data_ = static_cast<float*>(buffer->data());
  gpu_ = std::move(buffer);
#else
  notBuilt(device, "device memory");
#endif
}

DeviceFloats::~DeviceFloats() = default;
DeviceFloats::DeviceFloats(DeviceFloats&&) noexcept = default;
DeviceFloats& DeviceFloats::operator=(DeviceFloats&&) noexcept = default;

void DeviceFloats::zero() { zeroFloats(data_, size_, device_); }

void zeroFloats(float* p, size_t count, Device device) {
  if (count == 0) return;
  if (device.isCpu()) {
    std::memset(p, 0, count * sizeof(float));
    return;
  }
#if DTRAIN_WITH_CUDA
  gpu::kernels::fill(p, count, 0.0f);
#else
  notBuilt(device, "zeroing device memory");
#endif
}

BatchStaging::BatchStaging(size_t maxFeatureBytes, size_t maxLabelBytes, Device device) {
#if DTRAIN_WITH_CUDA
  if (device.isCuda()) {
    gpu_ = std::make_shared<gpu::BatchStaging>(std::array<size_t, 2>{maxFeatureBytes, maxLabelBytes}, device.index);
    return;
  }
#else
  (void)maxFeatureBytes;
  (void)maxLabelBytes;
#endif
  DTRAIN_THROW(NotBuiltError, "device {}: batch staging is for GPUs{}", device.str(),
               cudaBuilt() ? "" : " (this dtrain was built without CUDA)");
}

int BatchStaging::stage(const void* features, size_t featureBytes, const void* labels, size_t labelBytes) {
  DTRAIN_CHECK_AS(UsageError, gpu_ != nullptr, "BatchStaging: stage() on an empty staging");
#if DTRAIN_WITH_CUDA
  return static_cast<gpu::BatchStaging*>(gpu_.get())->stage({{features, featureBytes}, {labels, labelBytes}});
#else
  (void)features;
  (void)featureBytes;
  (void)labels;
  (void)labelBytes;
  return 0;
#endif
}

std::pair<void*, void*> BatchStaging::use(int slot) {
  DTRAIN_CHECK_AS(UsageError, gpu_ != nullptr, "BatchStaging: use() on an empty staging");
#if DTRAIN_WITH_CUDA
  const auto p = static_cast<gpu::BatchStaging*>(gpu_.get())->use(slot);
  return {p[0], p[1]};
#else
  (void)slot;
  return {nullptr, nullptr};
#endif
}

void BatchStaging::unstage(int slot) {
  DTRAIN_CHECK_AS(UsageError, gpu_ != nullptr, "BatchStaging: unstage() on an empty staging");
#if DTRAIN_WITH_CUDA
  static_cast<gpu::BatchStaging*>(gpu_.get())->unstage(slot);
#else
  (void)slot;
#endif
}

#if DTRAIN_WITH_CUDA
namespace {
class GpuHostStaging final : public HostStaging {
 public:
  GpuHostStaging(size_t count, int device) : staging_(count, device) {}
  float* host() override { return staging_.host(); }
  size_t size() const override { return staging_.size(); }
  int download(const float* src, size_t offset, size_t n) override { return staging_.download(src, offset, n); }
  void wait(int ticket) override { staging_.wait(ticket); }
  void upload(float* dst, size_t offset, size_t n) override { staging_.upload(dst, offset, n); }

 private:
  gpu::ArenaStaging staging_;
};
}  // namespace
#endif

std::unique_ptr<HostStaging> makeHostStaging(size_t count, Device device) {
  DTRAIN_CHECK(!device.isCpu(), "makeHostStaging: a CPU arena needs no host staging");
#if DTRAIN_WITH_CUDA
  return std::make_unique<GpuHostStaging>(count, device.index);
#else
  (void)count;
  notBuilt(device, "host staging of GPU gradients");
#endif
}

void copyBytes(void* dst, Device dstDevice, const void* src, Device srcDevice, size_t bytes) {
  if (bytes == 0) return;
  if (dstDevice.isCpu() && srcDevice.isCpu()) {
    std::memcpy(dst, src, bytes);
    return;
  }
#if DTRAIN_WITH_CUDA
  gpu::copy(TensorView::flat(dst, bytes, DType::kUInt8, dstDevice), TensorView::flat(src, bytes, DType::kUInt8, srcDevice));
#else
  notBuilt(dstDevice.isCpu() ? srcDevice : dstDevice, "a copy to or from a GPU");
#endif
}

void setFloat(float* p, float value, Device device) { copyBytes(p, device, &value, Device::cpu(), sizeof(float)); }

float gradNorm(std::span<const float> values, Device device) {
  if (device.isCpu()) return gradNorm(values);
#if DTRAIN_WITH_CUDA
  return static_cast<float>(std::sqrt(gpu::kernels::sumSquares(values.data(), values.size(), reducePartials(device))));
#else
  notBuilt(device, "a gradient norm");
#endif
}

bool allFinite(std::span<const float> values, Device device) {
  if (device.isCpu()) return allFinite(values);
#if DTRAIN_WITH_CUDA
  return gpu::kernels::allFinite(values.data(), values.size(), reducePartials(device));
#else
  notBuilt(device, "a finiteness check");
#endif
}

float clipGradNorm(std::span<float> grads, double maxNorm, Device device) {
  if (device.isCpu()) return clipGradNorm(grads, maxNorm);
  const float norm = gradNorm(grads, device);
#if DTRAIN_WITH_CUDA
  // PyTorch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1 (as optimizer.cpp).
  const float coef = static_cast<float>(maxNorm / (static_cast<double>(norm) + 1e-6));
  if (coef < 1.0f) gpu::kernels::scale(grads.data(), grads.data(), grads.size(), coef);
#endif
  return norm;
}

void castToHalf(const float* g, uint16_t* h, size_t n, float divisor, bool fp16, Device device) {
  DTRAIN_CHECK(!device.isCpu(), "castToHalf runs on a GPU; the CPU hook casts its own buffers");
#if DTRAIN_WITH_CUDA
  gpu::kernels::toHalf(g, h, n, divisor, fp16);
#else
  (void)g, (void)h, (void)n, (void)divisor, (void)fp16;
  notBuilt(device, "a 16-bit gradient cast");
#endif
}

void castFromHalf(const uint16_t* h, float* g, size_t n, bool fp16, Device device) {
  DTRAIN_CHECK(!device.isCpu(), "castFromHalf runs on a GPU; the CPU hook casts its own buffers");
#if DTRAIN_WITH_CUDA
  gpu::kernels::fromHalf(h, g, n, fp16);
#else
  (void)h, (void)g, (void)n, (void)fp16;
  notBuilt(device, "a 16-bit gradient cast");
#endif
}

}  // namespace dtrain::nn
