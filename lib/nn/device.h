// lib/nn's view of devices: float storage that lives on the CPU or a GPU, and the few arena-wide operations the
// trainer runs on the model's device (gradient norm, finiteness, clipping, copies), so code above lib/nn never
// needs a CUDA header or a CUDA build.
//
// - DeviceFloats: an owning array of floats on `device`: 64-byte-aligned zeroed host memory (AlignedBuffer) for
//   the CPU, cudaMalloc'd memory (zeroed) for cuda:N. Move-only; moving keeps the memory where it is.
// - On a CUDA device every pointer these functions take is device memory of that GPU; calls that return a value
//   to the host (gradNorm, allFinite, clipGradNorm) block until the GPU has computed it. Copies block.
// - In a build without CUDA (DTRAIN_WITH_CUDA 0) every CUDA request throws NotBuiltError "device cuda:0: ... this
//   dtrain was built without CUDA"; CPU requests never touch CUDA.
// Thread-safety: none beyond CUDA's (one model per thread). Errors: NotBuiltError, UsageError (a GPU that is not
// visible), gpu::GpuError (CUDA failures, naming the call and the file:line).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>

#include "lib/common/aligned_buffer.h"
#include "lib/common/tensor.h"

namespace dtrain::nn {

// True when this binary was built with CUDA (lib/gpu and the CUDA layers).
bool cudaBuilt() noexcept;
// GPUs visible to this process (CUDA_VISIBLE_DEVICES honoured); 0 without a driver, a device or a CUDA build.
// Never throws.
int visibleGpus() noexcept;
// Makes `device`'s GPU current on the calling thread (nothing for the CPU).
void useDevice(Device device);
// Whether cuBLAS may use TF32 tensor cores for float32 GEMMs (default true, PyTorch's allow_tf32 for cuDNN;
// off gives IEEE float32 products, for exact comparisons with the CPU). Process-wide; no effect on the CPU.
void setTf32(bool on);
// "precision": "bf16": GPU GEMMs round their float32 inputs to bfloat16 and multiply on bf16 tensor cores with
// float32 accumulation and output (lib/gpu/blas.h); parameters, gradients, LayerNorm and softmax statistics, losses
// and the optimizer stay float32, and so do the activations except those stored as bf16 (setBf16Activations).
// Process-wide; takes precedence over setTf32; no effect on the CPU (whose layers compute in float32 only).
void setBf16(bool on);
// bf16 activation storage (default on; docs/gpu.md "bf16"): a GPU model built while bf16 is on stores as bf16 the
// activations that only bf16 GEMMs read (a LayerNorm or GELU output feeding a linear, attention or lm_head:
// registry.h storesBf16Between; the matmul attention's q, k, v and heads), rounded by the producing kernel as the
// GEMM would have rounded them, so the step computes the same values in half the memory for those buffers. Off:
// every activation float32, converted before each GEMM (the former behaviour; for comparisons). Process-wide; read
// when a model is built (Model::build, replica), so switching it later does not change a built model.
void setBf16Activations(bool on);
// Whether a GPU model built now stores bf16 activations: a CUDA build, setBf16(true) and setBf16Activations(true).
bool bf16ActivationsOn() noexcept;
// The residual add fused into the LayerNorm after a block (default on; docs/gpu.md "Fused residual + LayerNorm"):
// a GPU model pairs an in-place block (registry.h blockAddsInPlace) with a following layernorm, whose kernel writes
// the block's output x + f and its own output in one pass, the same bits as the add then the LayerNorm. Off: the
// block adds and the LayerNorm reads (for comparisons). Process-wide; read when a model is built.
void setResidualLayerNormFusion(bool on);
bool residualLayerNormFusionOn() noexcept;
// The residual's gradient add fused into the LayerNorm backward (default on; docs/gpu.md "Fused residual gradient +
// LayerNorm backward"): a GPU block whose first child is a layernorm has that child's dx kernel store dx = dy + its
// input gradient, the same bits as the kernel then the block's add (dx = dy + g). Off: the add is a pass of its own
// (for comparisons). Process-wide; read when a model is built.
void setResidualLayerNormBackwardFusion(bool on);
bool residualLayerNormBackwardFusionOn() noexcept;

// The most device memory this process's buffers held at once since it started, in bytes, all GPUs together
// (gpu::allocatedBytes: torch.cuda.max_memory_allocated's meaning); 0 on the CPU or without a CUDA build.
// Thread-safe; never throws.
size_t peakDeviceBytes() noexcept;

class DeviceFloats {
 public:
  DeviceFloats() = default;
  DeviceFloats(size_t count, Device device);
  ~DeviceFloats();
  DeviceFloats(DeviceFloats&&) noexcept;
  DeviceFloats& operator=(DeviceFloats&&) noexcept;
  DeviceFloats(const DeviceFloats&) = delete;
  DeviceFloats& operator=(const DeviceFloats&) = delete;

  float* data() noexcept { return data_; }
  const float* data() const noexcept { return data_; }
  size_t size() const noexcept { return size_; }
  std::span<float> span() noexcept { return {data_, size_}; }
  std::span<const float> span() const noexcept { return {data_, size_}; }
  Device device() const noexcept { return device_; }
  // Sets every element to 0 (asynchronous on a GPU).
  void zero();

 private:
  AlignedBuffer<float> host_;
  std::shared_ptr<void> gpu_;  // a gpu::DeviceBuffer (CUDA builds), type-erased so no CUDA type shows here
  float* data_ = nullptr;
  size_t size_ = 0;
  Device device_;
};

// Batches copied host -> device for the layers (lib/gpu/staging.h): pinned host memory, a separate copy stream and
// two device slots ordered by events, so batch n+1 may be staged while batch n computes. stage() starts the copy of
// a batch's features and labels and returns its slot; use(slot) gives their device pointers, ordered after the
// copy on the layers' stream (the host does not wait). At most one batch is staged ahead of the one in use; one
// that will not be used is dropped by unstage(slot) (lib/train/batch_lookahead.h sequences these calls). GPU
// only (a CPU or CPU-only build throws NotBuiltError): on the CPU the loader's buffers are used as they are.
// Move-only; not thread-safe. Errors: gpu::GpuError, UsageError (a batch larger than the maximum, or misuse).
class BatchStaging {
 public:
  BatchStaging() = default;
  BatchStaging(size_t maxFeatureBytes, size_t maxLabelBytes, Device device);
  bool empty() const noexcept { return gpu_ == nullptr; }
  int stage(const void* features, size_t featureBytes, const void* labels, size_t labelBytes);
  std::pair<void*, void*> use(int slot);  // features, labels
  void unstage(int slot);                 // drops a staged batch never used; the next stage() takes its slot

 private:
  std::shared_ptr<void> gpu_;  // a gpu::BatchStaging (CUDA builds)
};

// Copies `bytes` between host and device memory (either side may be either); blocks until done.
void copyBytes(void* dst, Device dstDevice, const void* src, Device srcDevice, size_t bytes);
// Sets `count` floats at `p` on `device` to 0 (asynchronous on a GPU, on the legacy default stream).
void zeroFloats(float* p, size_t count, Device device);
// Writes one float at `p` on `device` (the trainer's NaN marker in a gradient slice).
void setFloat(float* p, float value, Device device);
// The global L2 norm (accumulated in double) and whether every value is finite: optimizer.h's gradNorm and
// allFinite on the values' device.
float gradNorm(std::span<const float> values, Device device);
bool allFinite(std::span<const float> values, Device device);
// torch.nn.utils.clip_grad_norm_ (optimizer.h's clipGradNorm) on the gradients' device.
float clipGradNorm(std::span<float> grads, double maxNorm, Device device);
// The fp16/bf16 gradient compression's casts on a GPU (lib/train's CastHook; PyTorch's fp16_compress_hook /
// bf16_compress_hook): h[i] = fp16 (fp16) or bf16 of g[i] / divisor, rounded to nearest even, as the CPU hook's
// loops round; and back, g[i] = float(h[i]). g and h (n 2-byte values) are device memory of `device`; enqueued on
// the legacy default stream (asynchronous). A CPU device is a dtrain::Error (the CPU hook has its own loops).
void castToHalf(const float* g, uint16_t* h, size_t n, float divisor, bool fp16, Device device);
void castFromHalf(const uint16_t* h, float* g, size_t n, bool fp16, Device device);

}  // namespace dtrain::nn
