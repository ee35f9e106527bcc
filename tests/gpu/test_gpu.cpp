// lib/gpu: the check macros and the NCCL mapping (no GPU needed), buffers, copies, streams and events (round
// trips when a GPU is visible; clear errors when none is).
#include <doctest/doctest.h>

#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "lib/gpu/check.h"
#include "lib/gpu/device.h"
#include "lib/gpu/memory.h"
#include "lib/gpu/nccl.h"
#include "lib/gpu/stream.h"

using namespace dtrain;
using namespace dtrain::gpu;

TEST_CASE("DTRAIN_CUDA_CHECK throws GpuError naming the call, CUDA's text and the file:line") {
  try {
    DTRAIN_CUDA_CHECK(cudaSetDevice(-1));
    FAIL("cudaSetDevice(-1) succeeded");
  } catch (const GpuError& e) {
    CHECK(std::string(e.what()).find("cudaSetDevice(-1) failed: ") == 0);
    CHECK(e.where().find("test_gpu.cpp:") != std::string::npos);
    CHECK(e.exitCode() == static_cast<int>(ExitCode::kInternal));
  }
  // Cleared, so the next check starts clean (without a driver every call, this one too, reports the missing
  // driver).
  if (visibleGpuCount() > 0) CHECK(cudaGetLastError() == cudaSuccess);
  CHECK_THROWS_AS(DTRAIN_CUDA_CHECK_AS(CommError, cudaSetDevice(-1)), CommError);
  DTRAIN_CUDA_CHECK(cudaSuccess);  // no throw
}

TEST_CASE("DTRAIN_NCCL_CHECK throws CommError with NCCL's text; DType maps to NCCL's types in one place") {
  int n = 0;
  try {
    DTRAIN_NCCL_CHECK(ncclCommCount(nullptr, &n));
    FAIL("ncclCommCount(nullptr) succeeded");
  } catch (const CommError& e) {
    CHECK(std::string(e.what()).find("ncclCommCount(nullptr, &n) failed: ") == 0);
    CHECK(e.where().find("test_gpu.cpp:") != std::string::npos);
  }
  CHECK(ncclType(DType::kFloat32) == ncclFloat32);
  CHECK(ncclType(DType::kFloat64) == ncclFloat64);
  CHECK(ncclType(DType::kBFloat16) == ncclBfloat16);
  CHECK(ncclType(DType::kFloat16) == ncclFloat16);
  CHECK(ncclType(DType::kInt32) == ncclInt32);
  CHECK(ncclType(DType::kInt64) == ncclInt64);
  CHECK(ncclType(DType::kUInt8) == ncclUint8);
  for (DType t : {DType::kBool, DType::kInt16, DType::kUInt16}) CHECK_FALSE(ncclType(t).has_value());
  static_assert(ncclType(DType::kInt8) == ncclInt8, "the mapping is constexpr");
}

TEST_CASE("buffers, streams and events are move-only owners; empty ones need no GPU") {
  static_assert(!std::is_copy_constructible_v<DeviceBuffer> && std::is_nothrow_move_constructible_v<DeviceBuffer>);
  static_assert(!std::is_copy_constructible_v<Stream> && std::is_nothrow_move_constructible_v<Stream>);
  static_assert(!std::is_copy_constructible_v<Event> && std::is_nothrow_move_constructible_v<Event>);
  DeviceBuffer empty;
  CHECK(empty.data() == nullptr);
  CHECK(empty.empty());
  DeviceBuffer moved = std::move(empty);
  CHECK(moved.empty());
  CHECK_THROWS_AS(moved.view(DType::kFloat32, 1), UsageError);  // nothing fits an empty buffer
}

TEST_CASE("copy between CPU views is a memcpy; sizes must agree") {
  std::vector<float> a = {1, 2, 3}, b(3, 0);
  copy(TensorView::flat(b.data(), 3), TensorView::flat(a.data(), 3));
  CHECK(b == a);
  CHECK_THROWS_AS(copy(TensorView::flat(b.data(), 2), TensorView::flat(a.data(), 3)), UsageError);
  CHECK_FALSE(isDeviceMemory(a.data()));
  CHECK_FALSE(isDeviceMemory(nullptr));
}

TEST_CASE("the visible GPU count is asked once and never throws; without a GPU every allocation is a clear error") {
  const int n = visibleGpuCount();
  CHECK(n >= 0);
  CHECK(visibleGpuCount() == n);
  CHECK_THROWS_WITH_AS(setDevice(n), doctest::Contains("is not a GPU of this process"), UsageError);
  if (n > 0) return;
  CHECK_THROWS_AS(DeviceBuffer(64, 0), UsageError);
  CHECK_THROWS_AS(Stream(0), UsageError);
  CHECK_THROWS_AS(Event(0), UsageError);
  float x = 1;
  CHECK_THROWS_AS(copy(TensorView::flat(&x, 1, Device::cuda(0)), TensorView::flat(&x, 1)), UsageError);
}

TEST_CASE("with a GPU: host -> device -> device -> host round trips, on a stream and blocking") {
  if (visibleGpuCount() == 0) return;
  const int dev = visibleGpuCount() - 1;
  std::vector<int64_t> host(1000);
  for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<int64_t>(i * 7) - 300;
  DeviceBuffer a(host.size() * sizeof(int64_t), dev), b(host.size() * sizeof(int64_t), dev);
  CHECK(isDeviceMemory(a.data()));
  CHECK(a.device() == Device::cuda(dev));
  CHECK(currentDevice() == dev);
  const TensorView hostView = TensorView::flat(host.data(), host.size());
  copy(a.view(DType::kInt64, host.size()), hostView);
  Stream stream(dev, true);
  copy(b.view(DType::kInt64, host.size()), a.view(DType::kInt64, host.size()), stream.handle());
  Event done(dev);
  done.record(stream);
  done.synchronize();
  CHECK(done.query());
  std::vector<int64_t> back(host.size(), 0);
  copy(TensorView::flat(back.data(), back.size()), b.view(DType::kInt64, host.size()));
  CHECK(back == host);
  b.zero();
  copy(TensorView::flat(back.data(), back.size()), b.view(DType::kInt64, host.size()));
  CHECK(back == std::vector<int64_t>(host.size(), 0));
  DeviceBuffer c = std::move(a);  // memory stays where it is
  CHECK(a.empty());
  CHECK(isDeviceMemory(c.data()));
  synchronizeDevice();
}
