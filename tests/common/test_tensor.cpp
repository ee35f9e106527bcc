// The shared tensor vocabulary: one dtype table (names, sizes, safetensors spellings), shapes, devices, views.
#include <doctest/doctest.h>

#include <limits>

#include "lib/common/aligned_buffer.h"
#include "lib/common/error.h"
#include "lib/common/tensor.h"

using namespace dtrain;

TEST_CASE("every dtype has one name, size and safetensors spelling that parse back") {
  for (DType d : kAllDTypes) {
    CHECK(parseDType(dtypeName(d)) == d);
    CHECK(parseSafetensorsDType(safetensorsName(d)) == d);
    CHECK(dtypeSize(d) >= 1);
  }
  CHECK(dtypeSize(DType::kFloat32) == 4);
  CHECK(dtypeSize(DType::kBFloat16) == 2);
  CHECK(dtypeSize(DType::kInt64) == 8);
  CHECK(safetensorsName(DType::kBFloat16) == "BF16");
  CHECK(dtypeName(DType::kUInt8) == "uint8");
  CHECK(parseDType("FP16") == DType::kFloat16);
  CHECK(parseDType("bf16") == DType::kBFloat16);
  CHECK(parseDType("double") == DType::kFloat64);
  CHECK_FALSE(parseDType("float8").has_value());
  CHECK_FALSE(parseSafetensorsDType("f32").has_value());  // safetensors spellings are exact
  CHECK(isFloatingPoint(DType::kBFloat16));
  CHECK_FALSE(isFloatingPoint(DType::kInt32));
}

TEST_CASE("shapes: numel, batching, printing and overflow") {
  Shape s{16, 5, 5};
  CHECK(s.rank() == 3);
  CHECK(s.numel() == 400);
  CHECK(s.str() == "[16,5,5]");
  CHECK(s.spaced() == "[16, 5, 5]");
  CHECK(s.withBatch(8) == Shape{8, 16, 5, 5});
  CHECK(s.withBatch(8).dropFirst() == s);
  CHECK(s.batchStr() == "[N,16,5,5]");
  CHECK(Shape{}.numel() == 1);
  CHECK(Shape{}.batchStr() == "[N]");
  CHECK(Shape{1LL << 40, 1LL << 30}.checkedNumel() == std::nullopt);
  CHECK(Shape{-1, 3}.checkedNumel() == std::nullopt);
  CHECK(Shape{0, std::numeric_limits<int64_t>::max()}.checkedNumel() == 0);
  Shape big;
  for (int i = 0; i < kMaxRank; ++i) big.push_back(1);
  CHECK_THROWS_AS(big.push_back(1), Error);
  CHECK_THROWS_AS(big.withBatch(2), Error);
}

TEST_CASE("devices parse and print as PyTorch spells them") {
  CHECK(Device::parse("cpu") == Device::cpu());
  CHECK(Device::parse("cuda", 3) == Device::cuda(3));
  CHECK(Device::parse("cuda:1") == Device::cuda(1));
  CHECK(Device::cuda(2).str() == "cuda:2");
  CHECK(Device::cpu().str() == "cpu");
  for (const char* bad : {"gpu", "cuda:", "cuda:x", "CUDA:0", "cuda:-1", "cuda:123456"})
    CHECK_MESSAGE(!Device::parse(bad).has_value(), bad);
}

TEST_CASE("a view checks its dtype on typed access") {
  float x[6] = {};
  auto v = TensorView::of(x, Shape{2, 3});
  CHECK(v.dtype == DType::kFloat32);
  CHECK(v.bytes() == 24);
  CHECK(v.f32() == x);
  CHECK_THROWS_AS(v.i32(), Error);
  auto flat = TensorView::flat(x, 6, DType::kFloat32);
  CHECK(flat.shape == Shape{6});
  CHECK(flat.device.isCpu());
  // The typed form takes the dtype from the pointer.
  const int64_t counts[3] = {};
  auto typed = TensorView::flat(counts, 3, Device::cuda(1));
  CHECK(typed.dtype == DType::kInt64);
  CHECK(typed.bytes() == 24);
  CHECK(typed.device == Device::cuda(1));
  CHECK(TensorView::flat(x, 6).dtype == DType::kFloat32);
}

// A strided view (ld: the bf16 logits' gradient, read at ld 2 x vocabulary over the float32 logits): bytes() is the
// memory it spans, gaps included (before: numel x size, so a copy of bytes() from data took the wrong values), and
// code that reads or writes bytes() contiguously refuses it with an internal error.
TEST_CASE("a strided view's bytes are the memory it spans; code needing a packed view refuses it") {
  float x[3 * 8] = {};
  TensorView v = TensorView::of(x, Shape{3, 4});
  CHECK(v.packed());
  CHECK(v.bytes() == 48);
  CHECK_NOTHROW(v.requirePacked("a copy"));
  v.ld = 4;  // ld equal to the last dimension: packed
  CHECK(v.packed());
  CHECK(v.bytes() == 48);
  v.ld = 8;
  CHECK_FALSE(v.packed());
  CHECK(v.bytes() == (2 * 8 + 4) * sizeof(float));  // rows 0 and 1 whole, row 2's 4 values
  CHECK(v.valueBytes() == 48);
  CHECK_THROWS_WITH_AS(v.requirePacked("gpu::copy's source"),
                       "internal error: gpu::copy's source needs a packed tensor, but got a strided view: float32 [3, 4] "
                       "with rows 8 elements apart (ld), not 4",
                       Error);
  try {
    v.requirePacked("x");
  } catch (const Error& e) {
    CHECK(e.code() == ExitCode::kInternal);
  }
  // The bf16 gradient over [2, 5] float32 logits: 2-byte values, rows 10 apart.
  const TensorView g{x, Shape{2, 5}, DType::kBFloat16, Device::cpu(), 10};
  CHECK(g.bytes() == 15 * 2);
  CHECK(g.valueBytes() == 10 * 2);
  // Empty views span nothing, strided or not.
  const TensorView empty{x, Shape{0, 4}, DType::kFloat32, Device::cpu(), 8};
  CHECK(empty.bytes() == 0);
}

TEST_CASE("aligned buffers are zeroed, 64-byte aligned and keep their address when moved") {
  AlignedBuffer<float> b(100);
  CHECK(reinterpret_cast<uintptr_t>(b.data()) % 64 == 0);
  CHECK(b.size() == 100);
  CHECK(b.bytes() == 400);
  for (float f : b.span()) CHECK(f == 0.0f);
  float* p = b.data();
  AlignedBuffer<float> moved(std::move(b));
  CHECK(moved.data() == p);
  AlignedBuffer<std::byte> none;
  CHECK(none.empty());
}

TEST_CASE("uninitialised aligned buffers honour a larger alignment and refuse a bad one") {
  auto b = AlignedBuffer<std::byte>::uninitialized(10000, 4096);
  CHECK(reinterpret_cast<uintptr_t>(b.data()) % 4096 == 0);
  CHECK(b.size() == 10000);
  CHECK(AlignedBuffer<float>::uninitialized(0).empty());
  CHECK_THROWS_AS(AlignedBuffer<std::byte>::uninitialized(16, 32), std::invalid_argument);
  CHECK_THROWS_AS(AlignedBuffer<std::byte>::uninitialized(16, 96), std::invalid_argument);
}
