// Layout-free checkpoint pieces (lib/ckpt/sharded.h): slices written by one layout, assembled for another.
#include <doctest/doctest.h>

#include <unistd.h>

#include <filesystem>
#include <numeric>
#include <vector>

#include "lib/ckpt/sharded.h"
#include "lib/common/error.h"

using namespace dtrain;
using namespace dtrain::ckpt;

namespace {

std::filesystem::path tempDir() {
  auto dir = std::filesystem::temp_directory_path() / ("dtrain-sharded-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  return dir;
}

void writePieces(const std::filesystem::path& path, std::vector<PieceTensor> pieces) {
  const PieceFile f = piecesToWrite(pieces, {{"format", "pt"}});
  writeSafetensorsFile(path, f.tensors, f.metadata);
}

}  // namespace

TEST_CASE("sharded: row and column slices written by two ranks assemble into the whole and into other slices") {
  const auto dir = tempDir();
  // The full tensor w [4, 6] holds 0..23 row-major.
  std::vector<float> full(24);
  std::iota(full.begin(), full.end(), 0.0f);
  const Shape shape{4, 6};
  // Layout A: split by columns into [4, 2] and [4, 4]; a second tensor b [6] whole.
  std::vector<float> left, right;
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 6; ++c) (c < 2 ? left : right).push_back(full[static_cast<size_t>(r * 6 + c)]);
  std::vector<float> bias{1, 2, 3, 4, 5, 6};
  writePieces(dir / "model-p0-t0.safetensors",
              {{"w", TensorView::of(left.data(), Shape{4, 2}), shape, {.dim = 1, .start = 0, .length = 2}},
               {"b", TensorView::of(bias.data(), Shape{6}), Shape{6}, {}}});
  writePieces(dir / "model-p0-t1.safetensors",
              {{"w", TensorView::of(right.data(), Shape{4, 4}), shape, {.dim = 1, .start = 2, .length = 4}}});

  TensorAssembler a;
  a.addFile(dir / "model-p0-t0.safetensors");
  a.addFile(dir / "model-p0-t1.safetensors");
  CHECK(a.fullShape("w") == shape);
  std::vector<float> whole(24);
  a.load("w", shape, {}, whole);
  CHECK(whole == full);
  // Layout B: rows 1..2 (a row slice), across both column pieces.
  std::vector<float> rows(12);
  a.load("w", shape, {.dim = 0, .start = 1, .length = 2}, rows);
  CHECK(rows == std::vector<float>(full.begin() + 6, full.begin() + 18));
  // Layout C: columns 1..3, which straddles the pieces.
  std::vector<float> cols(12);
  a.load("w", shape, {.dim = 1, .start = 1, .length = 3}, cols);
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 3; ++c) CHECK(cols[static_cast<size_t>(r * 3 + c)] == full[static_cast<size_t>(r * 6 + 1 + c)]);
  std::vector<float> b(6);
  a.load("b", Shape{6}, {}, b);
  CHECK(b == bias);
  std::filesystem::remove_all(dir);
}

TEST_CASE("sharded: several slices of one tensor in one file (q, k and v rows) are stored apart and assemble") {
  const auto dir = tempDir();
  std::vector<float> full(12);
  std::iota(full.begin(), full.end(), 0.0f);  // [6, 2]: rows 0..5
  // This rank holds rows 0 and 4 (two one-row slices of the same tensor); the other rows 1..3 and 5.
  std::vector<float> r0(full.begin(), full.begin() + 2), r4(full.begin() + 8, full.begin() + 10);
  std::vector<float> r13(full.begin() + 2, full.begin() + 8), r5(full.begin() + 10, full.end());
  writePieces(dir / "a.safetensors",
              {{"w", TensorView::of(r0.data(), Shape{1, 2}), Shape{6, 2}, {.dim = 0, .start = 0, .length = 1}},
               {"w", TensorView::of(r4.data(), Shape{1, 2}), Shape{6, 2}, {.dim = 0, .start = 4, .length = 1}}});
  writePieces(dir / "b.safetensors",
              {{"w", TensorView::of(r13.data(), Shape{3, 2}), Shape{6, 2}, {.dim = 0, .start = 1, .length = 3}},
               {"w", TensorView::of(r5.data(), Shape{1, 2}), Shape{6, 2}, {.dim = 0, .start = 5, .length = 1}}});
  TensorAssembler a;
  a.addFile(dir / "a.safetensors");
  a.addFile(dir / "b.safetensors");
  std::vector<float> whole(12);
  a.load("w", Shape{6, 2}, {}, whole);
  CHECK(whole == full);
  std::filesystem::remove_all(dir);
}

TEST_CASE("sharded: missing pieces, a wrong shape and an unknown tensor are CheckpointErrors") {
  const auto dir = tempDir();
  std::vector<float> half(12, 1.0f);
  writePieces(dir / "model-p0-t0.safetensors",
              {{"w", TensorView::of(half.data(), Shape{2, 6}), Shape{4, 6}, {.dim = 0, .start = 0, .length = 2}}});
  TensorAssembler a;
  a.addFile(dir / "model-p0-t0.safetensors");
  std::vector<float> whole(24);
  CHECK_THROWS_WITH_AS(a.load("w", Shape{4, 6}, {}, whole), doctest::Contains("cover 12 of the 24 values"),
                       CheckpointError);
  CHECK_THROWS_WITH_AS(a.load("w", Shape{6, 4}, {}, whole), doctest::Contains("has shape [4,6], expected [6,4]"),
                       CheckpointError);
  CHECK_THROWS_WITH_AS(a.load("v", Shape{4, 6}, {}, whole), doctest::Contains("no tensor 'v'"), CheckpointError);
  // A slice that does not fit the full shape is refused when writing.
  CHECK_THROWS_AS(piecesToWrite(std::vector<PieceTensor>{{"w", TensorView::of(half.data(), Shape{2, 6}), Shape{4, 6},
                                                          {.dim = 0, .start = 3, .length = 2}}}),
                  CheckpointError);
  std::filesystem::remove_all(dir);
}

TEST_CASE("sharded: flat pieces index the unsharded optimizer arena by the full model's offsets") {
  const auto dir = tempDir();
  std::vector<float> arena(10);
  std::iota(arena.begin(), arena.end(), 0.0f);
  std::vector<NamedTensor> t{{"exp_avg", TensorView::of(arena.data(), Shape{10})}};
  writeSafetensorsFile(dir / "optimizer.safetensors", t);
  TensorAssembler a;
  a.addFlatPiece(dir / "optimizer.safetensors", "exp_avg", "exp_avg/0.weight", 0, Shape{2, 3});
  a.addFlatPiece(dir / "optimizer.safetensors", "exp_avg", "exp_avg/0.bias", 6, Shape{2});
  std::vector<float> col(2);
  a.load("exp_avg/0.weight", Shape{2, 3}, {.dim = 1, .start = 2, .length = 1}, col);
  CHECK(col == std::vector<float>{2, 5});
  std::vector<float> bias(2);
  a.load("exp_avg/0.bias", Shape{2}, {}, bias);
  CHECK(bias == std::vector<float>{6, 7});
  std::filesystem::remove_all(dir);
}
