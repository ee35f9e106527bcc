// lib/gpu: the check macros, the NCCL mapping, the grid sizes and the GEMM argument mapping (no GPU needed),
// buffers, copies, streams and events (round trips when a GPU is visible; clear errors when none is).
#include <doctest/doctest.h>

#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "lib/comm/nccl/nccl_wait.h"
#include "lib/gpu/check.h"
#include "lib/gpu/device.h"
#include "lib/gpu/gemm_args.h"
#include "lib/gpu/grid.h"
#include "lib/gpu/kernels.h"
#include "lib/gpu/launch.h"
#include "lib/gpu/memory.h"
#include "lib/gpu/nccl.h"
#include "lib/gpu/staging.h"
#include "lib/gpu/stream.h"
#include "tests/gpu/gemm_reference.h"

using namespace dtrain;
using namespace dtrain::gpu;

TEST_CASE("DTRAIN_CUDA_CHECK throws GpuError naming the call, CUDA's text and the file:line") {
  try {
    DTRAIN_CUDA_CHECK(cudaSetDevice(-1));
    FAIL("cudaSetDevice(-1) succeeded");
  } catch (const GpuError& e) {
    CHECK(std::string(e.what()).find("cudaSetDevice(-1) failed: ") == 0);
    CHECK(e.where().find("test_gpu.cpp:") != std::string::npos);
    // The message itself ends with the call site from the repository root: a worker's one-line error names it.
    CHECK(std::string(e.what()).find(" (tests/gpu/test_gpu.cpp:") != std::string::npos);
    CHECK(std::string(e.what()).back() == ')');
    CHECK(e.exitCode() == static_cast<int>(ExitCode::kInternal));
  }
  // Cleared, so the next check starts clean (without a driver every call, this one too, reports the missing
  // driver).
  if (visibleGpuCount() > 0) CHECK(cudaGetLastError() == cudaSuccess);
  CHECK_THROWS_AS(DTRAIN_CUDA_CHECK_AS(CommError, cudaSetDevice(-1)), CommError);
  DTRAIN_CUDA_CHECK(cudaSuccess);  // no throw
}

TEST_CASE("a check's call site is named from the repository root, whatever directory the build ran in") {
  CHECK(gpu::detail::checkSite("/work/wt/x/lib/gpu/memory.cpp", 31) == "lib/gpu/memory.cpp:31");
  CHECK(gpu::detail::checkSite("../lib/comm/nccl/nccl_backend.cpp", 7) == "lib/comm/nccl/nccl_backend.cpp:7");
  CHECK(gpu::detail::checkSite("/src/dtrain/tests/gpu/test_gpu.cpp", 2) == "tests/gpu/test_gpu.cpp:2");
  CHECK(gpu::detail::checkSite("/home/u/lib/dtrain/lib/nn/cuda/loss.cpp", 5) == "lib/nn/cuda/loss.cpp:5");  // the last
  CHECK(gpu::detail::checkSite("memory.cpp", 1) == "memory.cpp:1");
  // Kernel launches (launch.h's DTRAIN_CU_CHECK / launch checks) fail the same way.
  try {
    gpu::detail::cudaFailed("launch of softmax", 2, "/b/lib/gpu/kernels_nn.cu", 40);
  } catch (const GpuError& e) {
    const std::string what = e.what();
    CHECK(what.find("launch of softmax failed: ") == 0);
    CHECK(what.find(" (lib/gpu/kernels_nn.cu:40)") != std::string::npos);
    CHECK(e.where() == "/b/lib/gpu/kernels_nn.cu:40");
  }
}

TEST_CASE("DTRAIN_NCCL_CHECK throws CommError with NCCL's text; DType maps to NCCL's types in one place") {
  int n = 0;
  try {
    DTRAIN_NCCL_CHECK(ncclCommCount(nullptr, &n));
    FAIL("ncclCommCount(nullptr) succeeded");
  } catch (const CommError& e) {
    CHECK(std::string(e.what()).find("ncclCommCount(nullptr, &n) failed: ") == 0);
    CHECK(e.where().find("test_gpu.cpp:") != std::string::npos);
    CHECK(std::string(e.what()).find(" (tests/gpu/test_gpu.cpp:") != std::string::npos);
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

TEST_CASE("a failed non-blocking NCCL call (the nccl backend's settle) names the call, NCCL's text and its file:line") {
  // What lib/comm/nccl/nccl_backend.cpp does with each collective: DTRAIN_NCCL_ISSUE records the call's name and
  // line, a failure goes through throwCallFailed. A real NCCL call failing without a GPU: no communicator.
  comm::nccl::NcclCall call;
  float one = 0;
  const int line = __LINE__ + 1;
  const ncclResult_t r = DTRAIN_NCCL_ISSUE(call, "ncclAllReduce",
                                           ncclAllReduce(&one, &one, 1, ncclFloat32, ncclSum, nullptr, nullptr));
  REQUIRE(r != ncclSuccess);
  REQUIRE(r != ncclInProgress);
  try {
    comm::nccl::throwCallFailed(call, ncclGetErrorString(r), "");
  } catch (const CommError& e) {
    const std::string what = e.what(), site = " (tests/gpu/test_gpu.cpp:" + std::to_string(line) + ")";
    CHECK(what.find(std::string("ncclAllReduce failed: ") + ncclGetErrorString(r)) == 0);
    REQUIRE(what.size() > site.size());
    CHECK(what.substr(what.size() - site.size()) == site);  // the message ends with the call's file:line
    CHECK(e.where().find("test_gpu.cpp:" + std::to_string(line)) != std::string::npos);
    CHECK(e.exitCode() == static_cast<int>(ExitCode::kComm));
  }
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

TEST_CASE("with a GPU: polling a running event leaves no stale error for the next kernel launch check") {
  if (visibleGpuCount() == 0) return;
  const int dev = visibleGpuCount() - 1;
  setDevice(dev);
  // About 8 GB of writes (a few ms on any GPU) queued before the event: the first query finds it running.
  const size_t n = size_t{1} << 28;
  DeviceBuffer big(n * sizeof(float), dev);
  for (int i = 0; i < 8; ++i) kernels::fill(static_cast<float*>(big.data()), n, static_cast<float>(i));
  Event done(dev);
  done.record(nullptr);
  bool sawRunning = false;
  while (!done.query()) {
    sawRunning = true;
    // cudaEventQuery's "not ready" is also recorded as the thread's last error; query() must clear it, or the
    // launch check below (cudaGetLastError) fails with "device not ready".
    CHECK(cudaPeekAtLastError() == cudaSuccess);
  }
  WARN_MESSAGE(sawRunning, "the event finished before the first query: the not-ready path was not exercised");
  CHECK_NOTHROW(kernels::fill(static_cast<float*>(big.data()), 16, 0.0f));
  synchronizeDevice();
}

TEST_CASE("with a GPU: batches staged on the copy stream arrive in order, one batch ahead at most") {
  if (visibleGpuCount() == 0) return;
  const int dev = 0;
  const size_t n = 4096;
  BatchStaging staging({n * sizeof(float), n * sizeof(int32_t)}, dev);
  auto batch = [&](int i) {
    std::vector<float> f(n);
    std::vector<int32_t> l(n);
    for (size_t j = 0; j < n; ++j) f[j] = static_cast<float>(i * 10000 + static_cast<int>(j)), l[j] = i - static_cast<int>(j);
    return std::pair{f, l};
  };
  auto readBack = [&](void* f, void* l, size_t count) {
    std::vector<float> hf(count);
    std::vector<int32_t> hl(count);
    copy(TensorView::flat(hf.data(), count), TensorView::flat(f, count, DType::kFloat32, Device::cuda(dev)));
    copy(TensorView::flat(hl.data(), count), TensorView::flat(l, count, DType::kInt32, Device::cuda(dev)));
    return std::pair{hf, hl};
  };
  // Staged and used at once, as the trainer does; then one ahead (batch i+1 staged before batch i is read).
  for (int i = 0; i < 5; ++i) {
    auto [f, l] = batch(i);
    const int slot = staging.stage({{f.data(), n * sizeof(float)}, {l.data(), n * sizeof(int32_t)}});
    const auto d = staging.use(slot);
    CHECK(readBack(d[0], d[1], n) == std::pair{f, l});
  }
  auto [f0, l0] = batch(100);
  auto d0 = staging.use(staging.stage({{f0.data(), n * sizeof(float)}, {l0.data(), n * sizeof(int32_t)}}));
  auto [f1, l1] = batch(101);
  const int ahead = staging.stage({{f1.data(), n * sizeof(float)}, {l1.data(), 8 * sizeof(int32_t)}});
  f1.assign(n, -1.0f);  // the host copy is free once stage() returned
  CHECK(readBack(d0[0], d0[1], n) == std::pair{f0, l0});
  // The slot of the batch in use cannot be refilled before the batch staged ahead is used.
  CHECK_THROWS_AS(staging.stage({{f0.data(), 4}}), UsageError);
  const auto d1 = staging.use(ahead);
  CHECK(readBack(d1[0], d1[1], 8).second == std::vector<int32_t>(l1.begin(), l1.begin() + 8));
  CHECK(readBack(d1[0], d1[1], 1).first[0] == 101 * 10000.0f);
  CHECK_THROWS_AS(staging.use(ahead), UsageError);  // used once
  CHECK_THROWS_AS(staging.stage({{f0.data(), (n + 1) * sizeof(float)}}), UsageError);  // larger than its slot
  // A batch staged ahead and dropped (the trainer stopped): its slot is the next one staged, and holds the new batch.
  auto [f2, l2] = batch(102);
  const int dropped = staging.stage({{f2.data(), n * sizeof(float)}, {l2.data(), n * sizeof(int32_t)}});
  CHECK(dropped != ahead);
  staging.unstage(dropped);
  CHECK_THROWS_AS(staging.use(dropped), UsageError);
  CHECK_THROWS_AS(staging.unstage(dropped), UsageError);
  auto [f3, l3] = batch(103);
  const int again = staging.stage({{f3.data(), n * sizeof(float)}, {l3.data(), n * sizeof(int32_t)}});
  CHECK(again == dropped);
  const auto d3 = staging.use(again);
  CHECK(readBack(d3[0], d3[1], n) == std::pair{f3, l3});
  synchronizeDevice();
}

// --- Host-side launch arithmetic (grid.h, gemm_args.h): checked on the CPU, no GPU needed ---

TEST_CASE("grids are bounded and never empty; the kernels loop over what a bounded grid does not cover") {
  CHECK(gridFor(0, 256) == 1);
  CHECK(gridFor(1, 256) == 1);
  CHECK(gridFor(256, 256) == 1);
  CHECK(gridFor(257, 256) == 2);
  CHECK(gridFor(size_t{1} << 40, 256) == kMaxBlocks);  // 4 G blocks would not fit CUDA's grid
  CHECK(rowGrid(0) == 1);
  CHECK(rowGrid(98304) == 98304);  // GPT-2-small attention at batch 8: 8 x 12 x 1024 rows, one block each
  // batch 64 x 16 heads x 8192 positions = 2^23 rows: more than kMaxBlocks, so the blocks stride over rows.
  CHECK(rowGrid(int64_t{64} * 16 * 8192) == kMaxBlocks);
  CHECK(rowGrid(int64_t{1} << 33) == kMaxBlocks);  // beyond int32: no wrap-around to a small or negative grid
  static_assert(kMaxBlocks < (size_t{1} << 31), "CUDA's limit on gridDim.x");
}

namespace {

// The row-major product the layers mean: C[r, c] of batch b with A and B read through their strides.
void referenceRowMajor(const RowMajorGemm& g, float alpha, const float* a, const float* b, float beta, float* c) {
  for (int64_t s = 0; s < g.batch; ++s)
    for (int64_t i = 0; i < g.m; ++i)
      for (int64_t j = 0; j < g.n; ++j) {
        double acc = 0;
        for (int64_t l = 0; l < g.k; ++l) {
          const float av = g.transA ? a[s * g.strideA + l * g.lda + i] : a[s * g.strideA + i * g.lda + l];
          const float bv = g.transB ? b[s * g.strideB + j * g.ldb + l] : b[s * g.strideB + l * g.ldb + j];
          acc += static_cast<double>(av) * bv;
        }
        float& out = c[s * g.strideC + i * g.ldc + j];
        out = static_cast<float>(alpha * acc + beta * out);
      }
}

std::vector<float> ramp(size_t n, float step) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<float>(static_cast<int>(i % 17) - 8) * step;
  return v;
}

// Runs `g` both ways on buffers `a`, `b` (of at least the operands' spans) and compares every element of C,
// including the gaps a strided C leaves (which both must leave untouched).
void checkMapping(const RowMajorGemm& g, const std::vector<float>& a, const std::vector<float>& b, size_t cSize) {
  REQUIRE(badLeadingDimension(g) == nullptr);
  REQUIRE(spanA(g) <= a.size());
  REQUIRE(spanB(g) <= b.size());
  std::vector<float> expected = ramp(cSize, 0.5f), got = expected;
  referenceRowMajor(g, 1.5f, a.data(), b.data(), 0.25f, expected.data());
  referenceColumnMajor(toColumnMajor(g), 1.5f, b.data(), a.data(), 0.25f, got.data());
  CHECK(got == expected);
}

}  // namespace

TEST_CASE("gemm's row-major -> cuBLAS column-major mapping computes op(A) op(B) for every transpose pair") {
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      CAPTURE(ta);
      CAPTURE(tb);
      const int64_t m = 5, n = 3, k = 4;
      // Leading dimensions larger than the rows, as views into wider buffers.
      RowMajorGemm g{.transA = ta, .transB = tb, .m = m, .n = n, .k = k, .lda = (ta ? m : k) + 2,
                     .ldb = (tb ? k : n) + 1, .ldc = n + 3};
      checkMapping(g, ramp(spanA(g), 0.25f), ramp(spanB(g), 0.125f), static_cast<size_t>(m * g.ldc));
    }
  // What the layers call (lib/nn/cuda/layers.cpp Linear, rows 6, in 4, out 3): forward, weight and input gradients.
  const int64_t rows = 6, in = 4, out = 3;
  const auto x = ramp(rows * in, 0.5f), w = ramp(out * in, 0.25f), dy = ramp(rows * out, 0.75f);
  checkMapping({.transB = true, .m = rows, .n = out, .k = in, .lda = in, .ldb = in, .ldc = out}, x, w,
               static_cast<size_t>(rows * out));
  checkMapping({.transA = true, .m = out, .n = in, .k = rows, .lda = out, .ldb = in, .ldc = in}, dy, x,
               static_cast<size_t>(out * in));
  checkMapping({.m = rows, .n = in, .k = out, .lda = out, .ldb = in, .ldc = in}, dy, w, static_cast<size_t>(rows * in));
}

TEST_CASE("attention's strided batched GEMMs over the qkv buffer: heads as batches, hs columns apart") {
  // lib/nn/cuda/layers_gpt.cpp: one sample's qkv is [T, 3C] (q, k, v side by side), head h at column h*hs.
  const int64_t t = 5, h = 3, hs = 2, c = h * hs, c3 = 3 * c, tt = t * t;
  const auto qkv = ramp(static_cast<size_t>(t * c3), 0.25f);
  const auto probs = ramp(static_cast<size_t>(h * tt), 0.125f);
  const auto dout = ramp(static_cast<size_t>(t * c), 0.5f);
  // S_h = q_h k_h^T into [H, T, T].
  checkMapping({.transB = true, .m = t, .n = t, .k = hs, .lda = c3, .ldb = c3, .ldc = t, .strideA = hs,
                .strideB = hs, .strideC = tt, .batch = h},
               qkv, std::vector<float>(qkv.begin() + c, qkv.end()), static_cast<size_t>(h * tt));
  // y_h = P_h v_h into the concatenated heads [T, C].
  checkMapping({.m = t, .n = hs, .k = t, .lda = t, .ldb = c3, .ldc = c, .strideA = tt, .strideB = hs, .strideC = hs,
                .batch = h},
               probs, std::vector<float>(qkv.begin() + 2 * c, qkv.end()), static_cast<size_t>(t * c));
  // Backward: dv_h = P_h^T dOut_h (into qkv's v columns, ldc 3C), dP_h = dOut_h v_h^T, dk_h = dS_h^T q_h.
  checkMapping({.transA = true, .m = t, .n = hs, .k = t, .lda = t, .ldb = c, .ldc = c3, .strideA = tt, .strideB = hs,
                .strideC = hs, .batch = h},
               probs, dout, static_cast<size_t>(t * c3));
  checkMapping({.transB = true, .m = t, .n = t, .k = hs, .lda = c, .ldb = c3, .ldc = t, .strideA = hs, .strideB = hs,
                .strideC = tt, .batch = h},
               dout, std::vector<float>(qkv.begin() + 2 * c, qkv.end()), static_cast<size_t>(h * tt));
  checkMapping({.transA = true, .m = t, .n = hs, .k = t, .lda = t, .ldb = c3, .ldc = c3, .strideA = tt,
                .strideB = hs, .strideC = hs, .batch = h},
               probs, qkv, static_cast<size_t>(t * c3));
}

TEST_CASE("gemm's bf16 copies span exactly the operands' elements; too-small leading dimensions are named") {
  // A [m, k] row-major with ld 10: the last element read is (m-1)*10 + k-1.
  CHECK(spanA({.m = 3, .n = 2, .k = 4, .lda = 10, .ldb = 2, .ldc = 2}) == 2 * 10 + 4);
  CHECK(spanA({.transA = true, .m = 3, .n = 2, .k = 4, .lda = 3, .ldb = 2, .ldc = 2}) == 4 * 3);
  CHECK(spanB({.transB = true, .m = 3, .n = 2, .k = 4, .lda = 4, .ldb = 4, .ldc = 2}) == 2 * 4);
  // Attention's q over all heads of one sample: up to the last head's last column of the last row.
  const int64_t t = 5, h = 3, hs = 2, c3 = 18;
  CHECK(spanA({.transB = true, .m = t, .n = t, .k = hs, .lda = c3, .ldb = c3, .ldc = t, .strideA = hs, .strideB = hs,
               .strideC = t * t, .batch = h}) == static_cast<size_t>((h - 1) * hs + (t - 1) * c3 + hs));
  CHECK(operandSpan(0, 4, 4, 0, 1) == 0);
  CHECK(std::string(badLeadingDimension({.m = 3, .n = 2, .k = 4, .lda = 3, .ldb = 2, .ldc = 2})) == "lda");
  CHECK(std::string(badLeadingDimension({.transB = true, .m = 3, .n = 2, .k = 4, .lda = 4, .ldb = 2, .ldc = 2})) ==
        "ldb");
  CHECK(std::string(badLeadingDimension({.m = 3, .n = 2, .k = 4, .lda = 4, .ldb = 2, .ldc = 1})) == "ldc");
  CHECK(badLeadingDimension({.m = 1, .n = 1, .k = 1, .lda = 1, .ldb = 1, .ldc = 1}) == nullptr);
}
