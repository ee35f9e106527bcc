// Element-wise reduction kernels used by every CPU backend. Plain loops the compiler vectorises (the build
// uses -O3 and, by default, -march=native); fp16 uses F16C conversions when the CPU has them.
//
// Semantics shared by all backends:
//  - kAvg reduces as kSum here; the backend divides once at the end (`divide`), so an average is exactly
//    sum / n wherever it is computed.
//  - integer sums wrap (two's complement) instead of being undefined behaviour;
//  - bf16 / fp16 are widened to float32, combined, and rounded back to nearest-even at every step;
//  - float min/max return the first operand when a comparison is false (NaN in the second is dropped).
// Thread-safety: pure functions.
#pragma once

#include <cstddef>

#include "lib/comm/types.h"

namespace dtrain::comm {

// out[i] = a[i] op b[i]. `out` may be `a` or `b` (exactly), never a partial overlap.
void reduce2(void* out, const void* a, const void* b, size_t count, DType dtype, ReduceOp op);

// out[i] = ((srcs[0][i] op srcs[1][i]) op srcs[2][i]) ..., worked through in L1-sized blocks so each output
// block is written once. When `divisor` > 1 the block is divided by it (kAvg's last step). When `out2` is not
// null the finished block is also copied there (the shm backend publishes its slice while keeping its own).
// `out` may be srcs[0]; nsrc >= 1.
void reduceMany(void* out, void* out2, const void* const* srcs, int nsrc, size_t count, DType dtype, ReduceOp op,
                int divisor = 1);

// buf[i] = buf[i] / divisor (integer division truncates). No-op when divisor <= 1.
void divide(void* buf, size_t count, DType dtype, int divisor);

// The op a backend applies while combining: kAvg combines as kSum.
constexpr ReduceOp combiningOp(ReduceOp op) { return op == ReduceOp::kAvg ? ReduceOp::kSum : op; }

// Conversions used by the kernels and by tests that build reference values.
float bf16ToFloat(uint16_t v);
uint16_t floatToBf16(float v);  // round to nearest even, NaN stays NaN
float fp16ToFloat(uint16_t v);
uint16_t floatToFp16(float v);  // round to nearest even, overflow to inf

}  // namespace dtrain::comm
