// The argument mapping of lib/gpu/blas.cpp's row-major GEMMs onto cuBLAS's column-major ones: plain C++ (no CUDA
// header), so the operand swap, the leading dimensions, the batch strides and the spans of the bf16 copies are
// unit-tested on the CPU (tests/gpu/test_gpu.cpp runs the mapped arguments through a reference column-major GEMM).
//
// A row-major matrix X[r, c] with leading dimension ld sits at x[r * ld + c]; read column-major, the same memory
// is X^T with the same ld. So the row-major C = op(A) op(B) ([m, n] = [m, k] x [k, n]) is the column-major
// C^T = op(B)^T op(A)^T ([n, m] = [n, k] x [k, m]): cuBLAS gets B first, then A, with m and n exchanged and every
// op and ld unchanged (cuBLAS's own documentation of row-major use; also how PyTorch calls it).
#pragma once

#include <cstddef>
#include <cstdint>

namespace dtrain::gpu {

// A call of gemm/gemmBatched (blas.h): row-major C[m, n] = alpha op(A) op(B) + beta C, `batch` matrices at the
// strides given (ignored when batch == 1).
struct RowMajorGemm {
  bool transA = false, transB = false;
  int64_t m = 0, n = 0, k = 0;
  int64_t lda = 0, ldb = 0, ldc = 0;
  int64_t strideA = 0, strideB = 0, strideC = 0;
  int64_t batch = 1;
};

// cuBLAS's arguments, in cublasGemmEx's order: the first operand is the caller's B, the second the caller's A.
struct ColumnMajorGemm {
  bool transFirst = false, transSecond = false;  // CUBLAS_OP_T when true
  int64_t m = 0, n = 0, k = 0;
  int64_t ldFirst = 0, ldSecond = 0, ldc = 0;
  int64_t strideFirst = 0, strideSecond = 0, strideC = 0;
  int64_t batch = 1;
};

constexpr ColumnMajorGemm toColumnMajor(const RowMajorGemm& g) {
  return {.transFirst = g.transB, .transSecond = g.transA, .m = g.n, .n = g.m, .k = g.k,
          .ldFirst = g.ldb, .ldSecond = g.lda, .ldc = g.ldc,
          .strideFirst = g.strideB, .strideSecond = g.strideA, .strideC = g.strideC, .batch = g.batch};
}

// The first leading dimension that is too small for its row-major matrix ("lda", "ldb" or "ldc"), else nullptr.
// Stored row-major: A is [m, k] ([k, m] when transA), B is [k, n] ([n, k] when transB), C is [m, n]; each ld
// must be at least the stored row length (and at least 1), as cuBLAS requires of the swapped call.
constexpr const char* badLeadingDimension(const RowMajorGemm& g) {
  auto atLeast = [](int64_t ld, int64_t cols) { return ld >= (cols > 1 ? cols : 1); };
  if (!atLeast(g.lda, g.transA ? g.m : g.k)) return "lda";
  if (!atLeast(g.ldb, g.transB ? g.k : g.n)) return "ldb";
  if (!atLeast(g.ldc, g.n)) return "ldc";
  return nullptr;
}

// Elements a row-major operand of `rows` x `cols` with leading dimension ld spans, over `batch` matrices `stride`
// apart: what a copy of it (the bf16 conversion) must cover. The gaps between rows are included (a strided view
// into a larger buffer, as attention's q, k, v heads in the qkv buffer): converted too, never read.
constexpr size_t operandSpan(int64_t rows, int64_t cols, int64_t ld, int64_t stride, int64_t batch) {
  if (rows <= 0 || cols <= 0 || batch <= 0) return 0;
  return static_cast<size_t>((batch - 1) * stride + (rows - 1) * ld + cols);
}
constexpr size_t spanA(const RowMajorGemm& g) {
  return g.transA ? operandSpan(g.k, g.m, g.lda, g.strideA, g.batch) : operandSpan(g.m, g.k, g.lda, g.strideA, g.batch);
}
constexpr size_t spanB(const RowMajorGemm& g) {
  return g.transB ? operandSpan(g.n, g.k, g.ldb, g.strideB, g.batch) : operandSpan(g.k, g.n, g.ldb, g.strideB, g.batch);
}

// Whether a GEMM multiplies in bf16 (blas.cpp): "precision": "bf16" is on (bf16() in blas.h), or an operand is
// stored as bf16 already (GemmOperand::bf16), in which case the other one is rounded to bf16 too (cuBLAS takes one
// type for A and B); otherwise float32 (TF32 or IEEE).
constexpr bool gemmInBf16(bool bf16On, bool aStoredBf16, bool bStoredBf16) {
  return bf16On || aStoredBf16 || bStoredBf16;
}

}  // namespace dtrain::gpu
