// The reference for lib/gpu/blas.cpp's GEMMs on the CPU: BLAS's column-major GEMM as cuBLAS defines it, which the
// tests run on the arguments blas.cpp would pass (gemm_args.h's toColumnMajor) instead of calling cuBLAS.
#pragma once

#include <cstdint>

#include "lib/gpu/gemm_args.h"

namespace dtrain::gpu {

// BLAS's column-major GEMM, as cuBLAS defines it: C[i + j ldc] = alpha sum_l op(A)[i, l] op(B)[l, j] + beta C,
// op(A)[i, l] = A[i + l lda] (N) or A[l + i lda] (T).
inline void referenceColumnMajor(const ColumnMajorGemm& g, float alpha, const float* first, const float* second,
                                 float beta, float* c) {
  for (int64_t b = 0; b < g.batch; ++b) {
    const float* x = first + b * g.strideFirst;
    const float* y = second + b * g.strideSecond;
    float* z = c + b * g.strideC;
    for (int64_t i = 0; i < g.m; ++i)
      for (int64_t j = 0; j < g.n; ++j) {
        double acc = 0;
        for (int64_t l = 0; l < g.k; ++l) {
          const float xa = g.transFirst ? x[l + i * g.ldFirst] : x[i + l * g.ldFirst];
          const float yb = g.transSecond ? y[j + l * g.ldSecond] : y[l + j * g.ldSecond];
          acc += static_cast<double>(xa) * yb;
        }
        z[i + j * g.ldc] = static_cast<float>(alpha * acc + beta * z[i + j * g.ldc]);
      }
  }
}

}  // namespace dtrain::gpu
