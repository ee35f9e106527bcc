// The collective benchmark behind `dtrain bench allreduce|broadcast|allgather|reduce_scatter`, measured the
// way nccl-tests measures: per size, warm-up calls, then a timed loop whose iteration count rank 0 chooses
// (so the loop lasts about `budget`) and broadcasts, so every rank runs the same count; the reported time is
// the slowest rank's mean. algbw = bytes / time; busbw = algbw x the collective's bus factor (allreduce
// 2(n-1)/n, allgather and reduce_scatter (n-1)/n, broadcast 1), comparable across world sizes. After timing,
// one call on known inputs (small integers whose reduction is exact) counts wrong elements on all ranks.
// Sizes follow nccl-tests: allgather's is the gathered output, reduce_scatter's the full input.
// Blocking, collective: every rank calls runBench with the same options.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "lib/comm/backend.h"

namespace dtrain::comm {

enum class Collective { kAllreduce, kBroadcast, kAllgather, kReduceScatter };

std::string collectiveName(Collective c);  // "allreduce", "broadcast", "allgather", "reduce_scatter"
std::optional<Collective> parseCollective(const std::string& s);
// busbw / algbw for this collective over n ranks.
double busFactor(Collective c, int n);

struct BenchOptions {
  Collective what = Collective::kAllreduce;
  size_t minBytes = 1024;
  size_t maxBytes = 64u << 20;
  double stepFactor = 2.0;
  DType dtype = DType::kFloat32;
  ReduceOp op = ReduceOp::kSum;
  int iters = 0;  // 0: chosen per size from the budget
  int warmup = 3;
  double budgetSeconds = 0.25;
  bool check = true;
};

struct BenchRow {
  size_t bytes = 0;
  size_t count = 0;  // elements in the measured buffer
  int iters = 0;
  double timeUs = 0;
  double algbwGBps = 0;
  double busbwGBps = 0;
  int64_t wrong = -1;  // -1: not checked
};

// Runs the benchmark on `bench`; `control` (the same backend, or a CPU one when bench works on GPU buffers)
// carries the timing agreement. Calls onRow for each size as soon as it is measured, on every rank.
void runBench(Backend& bench, Backend& control, const BenchOptions& options,
              const std::function<void(const BenchRow&)>& onRow);

}  // namespace dtrain::comm
