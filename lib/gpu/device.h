// GPUs as the CUDA runtime sees them: how many are visible, which is current, and the error type of lib/gpu.
//
// Device indices are the CUDA runtime's: positions among the visible GPUs (after CUDA_VISIBLE_DEVICES), the
// same N as dtrain::Device::cuda(N). The current device is per host thread (cudaSetDevice); every lib/gpu
// call that creates something on a GPU makes that GPU current on the calling thread first.
// No CUDA header is needed to include this file. Thread-safety: every function may be called from any thread.
#pragma once

#include <string>

#include "lib/common/error.h"

namespace dtrain::gpu {

// A CUDA runtime call failed (out of memory, an illegal address, a lost device, no driver). what() names the
// call and CUDA's text; where() is the file:line of the check. Exit code: internal (1). Callers that own a
// meaning for the failure (the nccl backend: a collective failure) translate it.
class GpuError : public Error {
 public:
  explicit GpuError(const std::string& message, ExitCode code = ExitCode::kInternal) : Error(message, code) {}
};

// GPUs visible to this process; 0 when there is no driver or no device. Asked of the CUDA runtime once (the
// first call initialises it) and cached for the life of the process. Never throws.
int visibleGpuCount();

// Makes GPU `index` current on the calling thread. Throws UsageError when no visible GPU has that index,
// GpuError when CUDA fails.
void setDevice(int index);

// The calling thread's current GPU. Throws GpuError.
int currentDevice();

// Blocks until every operation issued to the current GPU finished. Throws GpuError (also for an earlier
// asynchronous failure on that GPU).
void synchronizeDevice();

}  // namespace dtrain::gpu
