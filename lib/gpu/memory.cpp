#include "lib/gpu/memory.h"

#include <atomic>
#include <cstring>
#include <utility>

#include "lib/gpu/check.h"

namespace dtrain::gpu {
namespace {

std::atomic<size_t> gAllocated{0};
std::atomic<size_t> gPeak{0};

void noteAllocated(size_t bytes) noexcept {
  const size_t now = gAllocated.fetch_add(bytes) + bytes;
  size_t peak = gPeak.load();
  while (now > peak && !gPeak.compare_exchange_weak(peak, now)) {
  }
}

}  // namespace

AllocatedBytes allocatedBytes() noexcept { return {gAllocated.load(), gPeak.load()}; }

DeviceBuffer::DeviceBuffer(size_t bytes, int device) : device_(device) {
  setDevice(device);
  if (bytes == 0) return;
  DTRAIN_CUDA_CHECK(cudaMalloc(&data_, bytes));
  bytes_ = bytes;
  noteAllocated(bytes);
}

DeviceBuffer::~DeviceBuffer() { release(); }

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)), device_(other.device_) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    release();
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
    device_ = other.device_;
  }
  return *this;
}

void DeviceBuffer::release() noexcept {
  // cudaFree synchronises with the device and frees on the memory's own GPU, whichever is current.
  if (data_ != nullptr) {
    cudaFree(data_);
    gAllocated.fetch_sub(bytes_);
  }
  data_ = nullptr;
  bytes_ = 0;
}

TensorView DeviceBuffer::view(DType dtype, size_t count) const {
  DTRAIN_CHECK_AS(UsageError, count * dtypeSize(dtype) <= bytes_, "{} x {} does not fit a device buffer of {} bytes",
                  count, dtypeName(dtype), bytes_);
  return TensorView::flat(data_, count, dtype, device());
}

void DeviceBuffer::zero() {
  if (bytes_ == 0) return;
  setDevice(device_);
  DTRAIN_CUDA_CHECK(cudaMemset(data_, 0, bytes_));
}

void copy(const TensorView& dst, const TensorView& src, void* stream) {
  // One contiguous copy of bytes(): a strided view (ld, e.g. the bf16 logits' gradient) would copy its gaps.
  src.requirePacked("gpu::copy's source");
  dst.requirePacked("gpu::copy's destination");
  const size_t bytes = src.bytes();
  DTRAIN_CHECK_AS(UsageError, dst.bytes() == bytes, "copy: the destination holds {} bytes, the source {}",
                  dst.bytes(), bytes);
  if (bytes == 0) return;
  if (dst.device.isCpu() && src.device.isCpu()) {
    std::memcpy(dst.data, src.data, bytes);
    return;
  }
  const cudaMemcpyKind kind = dst.device.isCpu()   ? cudaMemcpyDeviceToHost
                              : src.device.isCpu() ? cudaMemcpyHostToDevice
                                                   : cudaMemcpyDeviceToDevice;
  setDevice(src.device.isCuda() ? src.device.index : dst.device.index);
  if (stream != nullptr) {
    DTRAIN_CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data, bytes, kind, static_cast<cudaStream_t>(stream)));
  } else {
    DTRAIN_CUDA_CHECK(cudaMemcpy(dst.data, src.data, bytes, kind));
  }
}

bool isDeviceMemory(const void* p) noexcept {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
}

}  // namespace dtrain::gpu
