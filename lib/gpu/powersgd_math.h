// The per-thread work of PowerSGD's device kernels (kernels_powersgd.cu) and the arguments of its three GEMMs:
// plain C++ compiled for the host and the device (no CUDA header), so the CPU hook (lib/nn/powersgd_ops.h) and
// tests/gpu/test_gpu_powersgd.cpp run the same arithmetic on the CPU, as reduce_index.h does for the reductions.
//
// PowerSGD (Vogels et al., NeurIPS 2019; PyTorch's powerSGD_hook), per compressed matrix M [rows, cols] with its
// factors stored transposed (P^T: [r, rows], Q^T: [r, cols], each factor column contiguous):
//   P = M Q          row-major P^T[r, rows] = Q^T[r, cols] x M^T           (projectGemm)
//   Q = M^T P        row-major Q^T[r, cols] = P^T[r, rows] x M[rows, cols]  (backProjectGemm)
//   M ~ P Q^T        row-major M[rows, cols] = (P^T)^T[rows, r] x Q^T       (decompressGemm)
// Those run in cuBLAS on a GPU (float32 accumulation: equal to the CPU's loops within float rounding, not bit for
// bit) and as loops on the CPU.
//
// Gram-Schmidt over P's r columns (PyTorch's _orthogonalize_gram_schmidt, modified Gram-Schmidt: column c is
// normalised, then removed from every later column, c = 0, 1, ...), in one fixed summation order on both sides, so
// the CPU hook and the kernel agree bit for bit on the same P:
//   - a sum over a column (its squared norm, its dot product with a later column) is split over kGramSchmidtLanes
//     lanes: lane l adds the products of elements l, l + L, l + 2L, ... in that order, in double (a product of two
//     floats is exact in double, so a fused multiply-add gives the same bits as a multiply and an add);
//   - the lanes' partials are added by a fixed tree: at each level s = L/2, L/4, ..., 1, partial[l] += partial[l + s]
//     for l < s; the sum is partial[0].
//   - the column is scaled by inv = float(1 / (sqrt(norm) + 1e-8)) (PyTorch's orthogonalization_epsilon: a zero
//     column stays zero instead of NaN), and a later column d loses float(dot) x column: rest = rest - f x col,
//     rounded after the product and after the difference (no fused multiply-add: gsSubtract).
// On a GPU one block of kGramSchmidtLanes threads does one matrix: thread l is lane l, the tree runs in shared
// memory between barriers. On the CPU (nn::gramSchmidt) one pass accumulates partial[i mod L], which is each lane's
// sum in the same order. A bucket's matrices share one launch (GsBatch: block b does matrix b of the list, the
// single matrix's work above; their P factors are disjoint, so no block reads another's and the result is each
// matrix's alone, whatever order the blocks run in). The list travels in the kernel's parameters, as PyTorch's
// multi_tensor_apply passes its tensor lists: nothing is copied to the device first and the host waits for nothing.
//
// Finiteness (the CPU hook's `if`s, decided on the device): a gate of two words, cleared, then word 0 set by every
// thread that finds a non-finite value in Q and word 1 by every one that finds one in the bucket's result g (a benign
// race of equal stores). Word 0 set: Q restarts from its initial values (psgdRestart); word 1 set: the residual keeps
// the step before's (psgdGatedResidual). nn::allFinite's test: the exponent bits all ones.
//
// Error feedback (PyTorch's, the whole bucket): before compressing, g = g + e and in = g; after decompressing,
// e = in - g. Averaging Q: q = q / n (a true division). One thread per element.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "lib/gpu/gemm_args.h"
#include "lib/gpu/host_device.h"

namespace dtrain::gpu {

inline constexpr int kGramSchmidtLanes = 256;  // threads of the kernel's block; lanes of every sum
inline constexpr double kOrthoEpsilon = 1e-8;  // PyTorch's orthogonalization_epsilon

// Lane `lane`'s partial sum of a[i] x b[i] over i = lane, lane + L, ... < n (thread `lane`'s loop).
DTRAIN_HOST_DEVICE inline double gsLanePartial(const float* a, const float* b, size_t n, int lane) {
  double sum = 0;
  for (size_t i = static_cast<size_t>(lane); i < n; i += kGramSchmidtLanes)
    sum += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return sum;
}

// One level of the tree: partial[l] += partial[l + s] for l < s (thread l's share; every l of a level is
// independent). The levels run s = L/2, ..., 1 in order; partial[0] is then the sum.
DTRAIN_HOST_DEVICE inline void gsTreeStep(double* partial, int l, int s) {
  if (l < s) partial[l] += partial[l + s];
}

// The whole tree over partial[0, L), in the kernel's order (the host's emulation of the block).
inline double gsTreeSum(double* partial) {
  for (int s = kGramSchmidtLanes / 2; s > 0; s /= 2)
    for (int l = 0; l < s; ++l) gsTreeStep(partial, l, s);
  return partial[0];
}

// The factor that normalises a column of squared norm `norm`.
DTRAIN_HOST_DEVICE inline float gsInverse(double norm) {
  return static_cast<float>(1.0 / (sqrt(norm) + kOrthoEpsilon));
}

// rest - f x col, the product rounded to float before the difference (no fused multiply-add on either side: the
// kernels' file is compiled with --fmad=false, the CPU's with -ffp-contract=off).
DTRAIN_HOST_DEVICE inline float gsSubtract(float rest, float f, float col) {
  const float product = f * col;
  return rest - product;
}

// One matrix of a batched Gram-Schmidt launch: P^T [rank, rows] at pt (device memory).
struct GsMatrix {
  float* pt = nullptr;
  int64_t rows = 0;
  int rank = 0;
};
// Matrices per launch: the list is a kernel parameter, and kernel parameters are limited to 4 KiB (every CUDA
// version and architecture); a longer list takes ceil(n / kGramSchmidtBatch) launches.
inline constexpr int kGramSchmidtBatch = 128;
struct GsBatch {
  GsMatrix matrices[kGramSchmidtBatch];
  int count = 0;  // blocks of the launch: block b does matrices[b]
};
static_assert(sizeof(GsBatch) <= 4096, "a GsBatch is passed as a kernel parameter (at most 4 KiB)");

// Fills `batch` with the next matrices of list[from, n) that have work (rank > 0 and rows > 0: the single matrix's
// launch skipped the others), at most kGramSchmidtBatch of them, in list order; returns the index to continue from
// (n when the list is done). batch.count == 0: nothing left to launch.
inline size_t gsNextBatch(const GsMatrix* list, size_t n, size_t from, GsBatch& batch) {
  batch.count = 0;
  for (; from < n && batch.count < kGramSchmidtBatch; ++from)
    if (list[from].rank > 0 && list[from].rows > 0) batch.matrices[batch.count++] = list[from];
  return from;
}

// NaN or +-inf: the exponent bits all ones (nn::allFinite's test).
DTRAIN_HOST_DEVICE inline bool psgdNonFinite(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return (u & 0x7f800000u) == 0x7f800000u;
}

// Thread i of the finiteness check over Q [0, nq) then g [0, ng): sets gate[0] (Q) or gate[1] (g) where element i
// is non-finite; the gate was cleared before. i < nq + ng.
DTRAIN_HOST_DEVICE inline void psgdFlagNonFinite(const float* q, size_t nq, const float* g, uint32_t* gate, size_t i) {
  if (i < nq) {
    if (psgdNonFinite(q[i])) gate[0] = 1u;
  } else if (psgdNonFinite(g[i - nq])) {
    gate[1] = 1u;
  }
}

// Q held a non-finite value (gate word 0): q = its initial values (element i), as every rank does (Q is the same on
// every rank, so is the gate).
DTRAIN_HOST_DEVICE inline void psgdRestart(float* q, const float* initial, const uint32_t* gate, size_t i) {
  if (gate[0] != 0u) q[i] = initial[i];
}

// Error feedback before compressing: g = g + e, in = g (element i).
DTRAIN_HOST_DEVICE inline void efAccumulate(float* g, const float* e, float* in, size_t i) {
  g[i] = g[i] + e[i];
  in[i] = g[i];
}

// Error feedback after decompressing: e = in - g (element i).
DTRAIN_HOST_DEVICE inline void efResidual(float* e, const float* in, const float* g, size_t i) { e[i] = in[i] - g[i]; }

// The same, only while the result g was finite (gate word 1 clear; gate nullptr: always); otherwise e stays as it was.
DTRAIN_HOST_DEVICE inline void psgdGatedResidual(float* e, const float* in, const float* g, const uint32_t* gate,
                                                 size_t i) {
  if (gate == nullptr || gate[1] == 0u) efResidual(e, in, g, i);
}

// The three products of one matrix as row-major GEMMs (blas.h's gemm; alpha 1, beta 0), on pt (P^T [r, rows]),
// qt (Q^T [r, cols]) and m (M [rows, cols]), all dense.
// P^T = Q^T M^T: A = qt, B = m (transposed).
constexpr RowMajorGemm projectGemm(int64_t rows, int64_t cols, int64_t r) {
  return {.transA = false, .transB = true, .m = r, .n = rows, .k = cols, .lda = cols, .ldb = cols, .ldc = rows};
}
// Q^T = P^T M: A = pt, B = m.
constexpr RowMajorGemm backProjectGemm(int64_t rows, int64_t cols, int64_t r) {
  return {.transA = false, .transB = false, .m = r, .n = cols, .k = rows, .lda = rows, .ldb = cols, .ldc = cols};
}
// M = (P^T)^T Q^T: A = pt (transposed), B = qt.
constexpr RowMajorGemm decompressGemm(int64_t rows, int64_t cols, int64_t r) {
  return {.transA = true, .transB = false, .m = rows, .n = cols, .k = r, .lda = rows, .ldb = cols, .ldc = cols};
}

}  // namespace dtrain::gpu
