#include "lib/gpu/device.h"

#include "lib/gpu/check.h"
#include "lib/gpu/launch.h"

namespace dtrain::gpu {

int visibleGpuCount() {
  // Once: cudaGetDeviceCount initialises the runtime, and the answer cannot change within a process.
  static const int count = [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();  // clear the "no device" / "no driver" error
      return 0;
    }
    return n;
  }();
  return count;
}

void setDevice(int index) {
  const int count = visibleGpuCount();
  DTRAIN_CHECK_AS(UsageError, index >= 0 && index < count, "cuda:{} is not a GPU of this process ({} visible)",
                  index, count);
  DTRAIN_CUDA_CHECK(cudaSetDevice(index));
}

int currentDevice() {
  int d = 0;
  DTRAIN_CUDA_CHECK(cudaGetDevice(&d));
  return d;
}

void synchronizeDevice() { DTRAIN_CUDA_CHECK(cudaDeviceSynchronize()); }

namespace detail {

void cudaFailed(const char* what, int error, const char* file, int line) {
  cudaGetLastError();
  ::dtrain::detail::throwAt<GpuError>(file, line, fmt::format("{} failed: {} ({})", what,
                                                              cudaGetErrorString(static_cast<cudaError_t>(error)),
                                                              checkSite(file, line)));
}

}  // namespace detail

}  // namespace dtrain::gpu
