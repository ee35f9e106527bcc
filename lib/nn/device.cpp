#include "lib/nn/device.h"

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

HostStaging::HostStaging(size_t maxBytes, Device device) {
  if (device.isCpu()) return;
#if DTRAIN_WITH_CUDA
  gpu_ = std::make_shared<gpu::HostStaging>(maxBytes, device.index);
#else
  (void)maxBytes;
  notBuilt(device, "pinned staging");
#endif
}

void HostStaging::toDevice(void* dst, const void* src, size_t bytes) {
  if (gpu_ == nullptr) {
    if (bytes > 0) std::memcpy(dst, src, bytes);
    return;
  }
#if DTRAIN_WITH_CUDA
  static_cast<gpu::HostStaging*>(gpu_.get())->toDevice(dst, src, bytes);
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

}  // namespace dtrain::nn
