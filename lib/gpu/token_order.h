// The stable ordering of an embedding's rows by token that the CUDA embedding's backward walks
// (kernels::embeddingTokenGrad, reduce_index.h's embeddingTokenSegment): host code, plain C++ (the CUDA embedding
// copies the batch's token ids back in its forward anyway, to check them, so ordering them on the host costs one
// counting sort and one small upload per training step, and no device sort).
//
// order lists the rows grouped by token (tokens ascending), rows ascending within a token (a stable counting
// sort); segment s is order[start[s] .. start[s + 1]), every row of it holding token tok[s]. Summing each segment
// in order adds every token's rows in row order: the CPU embedding's summation order (layers_gpt.cpp), bit for
// bit, while distinct tokens run in parallel.
// Not thread-safe (one per layer); build() reuses its vectors, so a steady state allocates nothing.
#pragma once

#include <cstdint>
#include <vector>

#include "lib/common/error.h"
#include "lib/gpu/reduce_index.h"

namespace dtrain::gpu {

struct TokenOrder {
  std::vector<int32_t> order, start, tok;

  int64_t segments() const { return static_cast<int64_t>(tok.size()); }

  // Orders rows [0, rows) of `tokens` (float token ids, each already checked to lie in [0, vocab)) by token.
  void build(const float* tokens, int64_t rows, int64_t vocab) {
    DTRAIN_CHECK(rows >= 0 && rows <= INT32_MAX, "token order: {} rows do not fit int32", rows);
    count_.assign(static_cast<size_t>(vocab) + 1, 0);
    for (int64_t r = 0; r < rows; ++r) ++count_[static_cast<size_t>(tokenIndex(tokens[r], vocab)) + 1];
    tok.clear();
    start.clear();
    for (int64_t v = 0; v < vocab; ++v) {
      const int32_t n = count_[static_cast<size_t>(v) + 1];
      if (n > 0) tok.push_back(static_cast<int32_t>(v)), start.push_back(count_[static_cast<size_t>(v)]);
      count_[static_cast<size_t>(v) + 1] += count_[static_cast<size_t>(v)];  // count_[v] = first slot of token v
    }
    start.push_back(static_cast<int32_t>(rows));
    order.resize(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r)
      order[static_cast<size_t>(count_[static_cast<size_t>(tokenIndex(tokens[r], vocab))]++)] = static_cast<int32_t>(r);
  }

 private:
  std::vector<int32_t> count_;  // vocab + 1 counters: counts, then (prefix sums) each token's next free slot
};

}  // namespace dtrain::gpu
