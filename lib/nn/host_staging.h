// lib/nn's view of host staging for device arenas (the GPU side: lib/gpu/staging.h ArenaStaging), apart from
// device.h so that code which does not stage includes nothing new.
#pragma once

#include <cstddef>
#include <memory>

#include "lib/common/tensor.h"

namespace dtrain::nn {

// A host copy of a device float arena, filled and written back slice by slice without the host waiting on the GPU
// except in wait(): how code that computes on the host (the top-k and PowerSGD compression hooks with "device":
// "cuda", lib/train/compression_hooks.h) reads and writes device gradients. On a GPU (makeHostStaging): pinned host
// memory and a copy stream (lib/gpu/staging.h ArenaStaging):
//   download(src, offset, n)  starts copying the n device floats at src into host()[offset, offset + n), after the
//                             work enqueued so far on the compute stream (the kernels that wrote them); returns a
//                             ticket at once
//   wait(ticket)              blocks until that copy is in host(); each ticket is waited exactly once
//   upload(dst, offset, n)    enqueues host()[offset, offset + n) -> dst on the compute stream (returns at once);
//                             kernels enqueued later see it. The host writes that slice again only after the next
//                             download of it was waited for (which the GPU orders after the upload).
// Tests substitute their own (a CPU memcpy that copies late) to check the callers' order. Thread-safety: none.
// Errors: gpu::GpuError, UsageError (a slice outside the arena, an unknown ticket).
class HostStaging {
 public:
  virtual ~HostStaging() = default;
  virtual float* host() = 0;  // size() floats
  virtual size_t size() const = 0;
  virtual int download(const float* src, size_t offset, size_t n) = 0;
  virtual void wait(int ticket) = 0;
  virtual void upload(float* dst, size_t offset, size_t n) = 0;
};
// `count` floats staged for an arena on GPU `device`. A CPU device is a dtrain::Error (CPU arenas need no copy);
// a build without CUDA throws NotBuiltError.
std::unique_ptr<HostStaging> makeHostStaging(size_t count, Device device);

}  // namespace dtrain::nn
