// Grid sizes of lib/gpu's kernels: plain C++ (no CUDA header), shared by the .cu sources and unit-tested on the CPU.
//
// CUDA caps a grid at 2^31 - 1 blocks in x. Every kernel loops (grid-stride over elements, block-stride over rows,
// thread-stride over columns), so a grid smaller than the work is correct, only less parallel; these functions
// bound the grid at kMaxBlocks, which is far more than a GPU runs at once (an H200 holds 132 SMs x 8 blocks of
// 256 threads). Without the bound, a GPT's attention softmax (batch x heads x T rows, one block each) or a cast of
// a large tensor would overflow the int32 grid size and fail to launch ("invalid configuration argument").
#pragma once

#include <cstddef>
#include <cstdint>

namespace dtrain::gpu {

inline constexpr size_t kMaxBlocks = size_t{1} << 20;

// Blocks of `threads` for `n` elements, one element per thread, at least 1 and at most kMaxBlocks.
constexpr unsigned gridFor(size_t n, unsigned threads) {
  const size_t blocks = n / threads + (n % threads != 0 ? 1 : 0);
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks > kMaxBlocks ? kMaxBlocks : blocks);
}

// Blocks for `rows` rows, one block per row, at least 1 and at most kMaxBlocks.
constexpr unsigned rowGrid(int64_t rows) {
  return static_cast<unsigned>(rows < 1 ? 1 : static_cast<size_t>(rows) > kMaxBlocks ? kMaxBlocks : rows);
}

}  // namespace dtrain::gpu
