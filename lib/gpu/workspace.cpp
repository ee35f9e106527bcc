#include <unordered_map>

#include "lib/gpu/device.h"
#include "lib/gpu/memory.h"
#include "lib/gpu/scratch.h"

namespace dtrain::gpu {

float* reduceScratch(size_t floats) {
  thread_local std::unordered_map<int, DeviceBuffer> scratch;
  const int device = currentDevice();
  DeviceBuffer& buf = scratch[device];
  const size_t bytes = floats * sizeof(float);
  if (buf.bytes() < bytes) buf = DeviceBuffer(bytes, device);  // freeing the old one synchronises (scratch.h)
  return static_cast<float*>(buf.data());
}

}  // namespace dtrain::gpu
