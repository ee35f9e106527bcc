// GPU memory: an owning device buffer, and copies between host and device memory described by views.
//
// DeviceBuffer owns `bytes` of device memory on one GPU (cudaMalloc), freed when it is destroyed; it is
// move-only (moving keeps the memory where it is, so pointers and views into it stay valid). Its contents
// start undefined (zero() clears them). No CUDA header is needed to include this file.
// Thread-safety: a buffer is a plain owner, not synchronised; copy() may run on any thread.
// Errors: UsageError for a GPU index that is not visible or mismatched views; GpuError when CUDA fails.
#pragma once

#include <cstddef>

#include "lib/common/tensor.h"

namespace dtrain::gpu {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;  // empty: no memory, data() == nullptr
  // `bytes` of device memory on GPU `device` (made current on the calling thread). Zero bytes hold no memory.
  DeviceBuffer(size_t bytes, int device);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const noexcept { return data_; }
  size_t bytes() const noexcept { return bytes_; }
  bool empty() const noexcept { return bytes_ == 0; }
  Device device() const noexcept { return Device::cuda(device_); }
  // The buffer as `count` elements of `dtype` (rank 1). Throws UsageError when they do not fit.
  TensorView view(DType dtype, size_t count) const;
  // Sets every byte to zero (blocking). Throws GpuError.
  void zero();

 private:
  void release() noexcept;

  void* data_ = nullptr;
  size_t bytes_ = 0;
  int device_ = 0;
};

// Copies src's bytes into dst; the direction follows the views' devices (host to device, device to host,
// device to device, or a plain memcpy between two CPU views, which needs no GPU). The views must hold the same
// number of bytes. With `stream` (a cudaStream_t as void*, e.g. Stream::handle()) a copy that touches a GPU is
// enqueued on it and returns at once (host memory must then be pinned to overlap, and stay alive until the
// stream passed the copy); without, it returns when the copy is done.
void copy(const TensorView& dst, const TensorView& src, void* stream = nullptr);

// Device memory this process holds in DeviceBuffers, all GPUs together, in bytes: now and the most at any moment
// since the process started. The semantics of PyTorch's torch.cuda.memory_allocated() / max_memory_allocated():
// what the program's buffers occupy, not the CUDA context, cuBLAS's or NCCL's own buffers, or fragmentation
// (nvidia-smi shows those too). Thread-safe (atomics); never throws.
struct AllocatedBytes {
  size_t current = 0;
  size_t peak = 0;
};
AllocatedBytes allocatedBytes() noexcept;

// True when `p` is device or managed memory that CUDA knows; false for host memory (pageable or pinned) and
// unknown pointers. Never throws.
bool isDeviceMemory(const void* p) noexcept;

}  // namespace dtrain::gpu
