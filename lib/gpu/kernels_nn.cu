// Layer and loss kernels (kernels.h). Simple and deterministic: one thread per element, or one block of
// kThreads per row with fixed-order tree reductions in shared memory.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "lib/gpu/bce_math.h"
#include "lib/gpu/bf16_store.h"
#include "lib/gpu/grid.h"
#include "lib/gpu/kernels.h"
#include "lib/gpu/layernorm_rows.h"
#include "lib/gpu/launch.h"
#include "lib/gpu/loss_grad.h"

namespace dtrain::gpu::kernels {
namespace {

constexpr int kThreads = 256;  // a power of two: the tree reductions below halve it

std::atomic<bool> gLayerNormParamsFusion{true};  // setLayerNormParamsFusion

// Grids are bounded (CUDA allows 2^31 - 1 blocks in x; a GPT's attention has batch * heads * T rows, which a
// long context or a large batch could push past that): every kernel loops, elementwise ones over elements
// (grid-stride), row ones over rows (block-stride); column sums are in kernels_reduce.cu. Sizes: grid.h.
unsigned blocksFor(size_t n) { return gridFor(n, kThreads); }
unsigned rowBlocks(int64_t rows) { return rowGrid(rows); }

#define DTRAIN_GRID_STRIDE(i, n) \
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < (n); i += static_cast<size_t>(blockDim.x) * gridDim.x)
// One block per row, for rows beyond the grid too (r is the same in every thread of a block: __syncthreads is safe).
#define DTRAIN_ROW_STRIDE(r, rows) for (int64_t r = blockIdx.x; r < (rows); r += gridDim.x)

// Sum of v over the block (every thread gets it); sh holds kThreads floats. Fixed order: deterministic.
__device__ float blockSum(float v, float* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  const float r = sh[0];
  __syncthreads();
  return r;
}

__device__ float blockMax(float v, float* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  const float r = sh[0];
  __syncthreads();
  return r;
}

__global__ void fillKernel(float* p, size_t n, float value) {
  DTRAIN_GRID_STRIDE(i, n) p[i] = value;
}
__global__ void scaleKernel(const float* in, float* out, size_t n, float s) {
  DTRAIN_GRID_STRIDE(i, n) out[i] = in[i] * s;
}
__global__ void toBf16Kernel(const float* x, __nv_bfloat16* y, size_t n) {
  DTRAIN_GRID_STRIDE(i, n) y[i] = __float2bfloat16_rn(x[i]);
}
__global__ void addKernel(const float* a, const float* b, float* out, size_t n) {
  DTRAIN_GRID_STRIDE(i, n) out[i] = a[i] + b[i];
}
__global__ void addBiasKernel(float* y, const float* bias, size_t n, int64_t cols) {
  DTRAIN_GRID_STRIDE(i, n) y[i] += bias[static_cast<int64_t>(i) % cols];
}
// addBias then toBf16 (bf16_store.h's biasedValue: the same float sum as addBiasKernel's).
__global__ void addBiasToBf16Kernel(const float* x, const float* bias, uint16_t* y, size_t n, int64_t cols) {
  DTRAIN_GRID_STRIDE(i, n) y[i] = bf16Bits(biasedValue(x, bias, static_cast<int64_t>(i), cols));
}
// The formulas are reduce_index.h's (shared with the fused bias + activation kernels, so fused and unfused agree).
// Out: float, or uint16_t for bf16 storage (bf16_store.h's storeActivation: only the store differs).
template <class Out>
__global__ void activationForwardKernel(Activation f, const float* x, Out* y, size_t n) {
  DTRAIN_GRID_STRIDE(i, n) storeActivation(y, static_cast<int64_t>(i), activationValue(f, x[i]));
}

__global__ void activationBackwardKernel(Activation f, const float* x, const float* y, const float* dy, float* dx,
                                         size_t n) {
  DTRAIN_GRID_STRIDE(i, n) dx[i] = activationGrad(f, x[i], y[i], dy[i]);
}

// Out: float, or uint16_t for bf16 storage (only the store differs: bf16_store.h).
// A row's statistics and outputs from its threads' partial sums s (layernorm_rows.h): the part both LayerNorm
// forward kernels share.
template <class Out>
__device__ void layerNormFinishRow(const float* xr, float s, const float* w, const float* b, Out* y, float* mean,
                                   float* rstd, int64_t r, int64_t d, float eps, float* sh) {
  const float mu = blockSum(s, sh) / static_cast<float>(d);
  const float v = layerNormRowSquares(xr, mu, d, threadIdx.x, kThreads);
  const float var = blockSum(v, sh) / static_cast<float>(d);
  const float rs = 1.0f / sqrtf(var + eps);
  if (threadIdx.x == 0) mean[r] = mu, rstd[r] = rs;
  for (int64_t j = threadIdx.x; j < d; j += kThreads)
    storeActivation(y, r * d + j, layerNormValue(xr[j], mu, rs, w, b, j));
}

template <class Out>
__global__ void layerNormForwardKernel(const float* x, const float* w, const float* b, Out* y, float* mean,
                                       float* rstd, int64_t rows, int64_t d, float eps) {
  __shared__ float sh[kThreads];
  DTRAIN_ROW_STRIDE(r, rows) {
    const float* xr = x + r * d;
    layerNormFinishRow(xr, layerNormRowSum(xr, d, threadIdx.x, kThreads), w, b, y, mean, rstd, r, d, eps, sh);
  }
}

// addKernel(a, f, f) then layerNormForwardKernel(f, ...) in one pass over the row: each thread stores its columns'
// sums a + f in place of f and reads back only those (its own writes: no barrier needed beyond blockSum's).
template <class Out>
__global__ void residualLayerNormForwardKernel(const float* a, float* f, const float* w, const float* b, Out* y,
                                               float* mean, float* rstd, int64_t rows, int64_t d, float eps) {
  __shared__ float sh[kThreads];
  DTRAIN_ROW_STRIDE(r, rows) {
    float* fr = f + r * d;
    const float s = residualRowSum(a + r * d, fr, d, threadIdx.x, kThreads);
    layerNormFinishRow(fr, s, w, b, y, mean, rstd, r, d, eps, sh);
  }
}

// LayerNorm's dx (layernorm_rows.h's two passes around the block's sums); with residual (not null) each stored value
// takes on residual's element (residualLayerNormBackward: the same kernel, only the store adds, __fadd_rn).
__global__ void layerNormDxKernel(const float* x, const float* w, const float* mean, const float* rstd,
                                  const float* dy, const float* residual, float* dx, int64_t rows, int64_t d) {
  __shared__ float sh[kThreads];
  DTRAIN_ROW_STRIDE(r, rows) {
    const float mu = mean[r], rs = rstd[r];
    const int64_t o = r * d;
    float sg = 0.0f, sgx = 0.0f;
    layerNormDxRowSums(x + o, w, dy + o, mu, rs, d, threadIdx.x, kThreads, &sg, &sgx);
    const float meanG = blockSum(sg, sh) / static_cast<float>(d);
    const float meanGx = blockSum(sgx, sh) / static_cast<float>(d);
    layerNormDxRowStore(x + o, w, dy + o, residual != nullptr ? residual + o : nullptr, dx + o, mu, rs, meanG, meanGx,
                        d, threadIdx.x, kThreads);
  }
}

// blockSum for a group of kThreads threads inside a larger block (group g: threads g kThreads .. (g + 1) kThreads - 1,
// sh its own kThreads floats): the same tree over the same partials, so the same sum. Every thread of the block
// calls it the same number of times (its __syncthreads are the block's).
__device__ float groupSum(float v, float* sh, int t) {
  sh[t] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (t < s) sh[t] += sh[t + s];
    __syncthreads();
  }
  const float r = sh[0];
  __syncthreads();
  return r;
}

// Rows in flight per block of the fused backward: its block is kParamsGroups x kThreads threads.
constexpr int kParamsGroups = 4;

// layerNormDxKernel with the weight and bias gradients' first pass folded in (layernorm_rows.h): one block per chunk
// of the column-sum plan p (reduce_index.h columnChunks(rows)); each pass over the chunk gives its next kParamsGroups
// rows to the groups (group g: row g's dx as layerNormDxKernel's block computes it); between the groups' sums and
// their stores every thread adds those rows in order to its columns' sums in dynamic shared memory (acc: 2 d floats,
// accW then accB; each element is its one thread's). Pass 2 (several chunks) is layerNormParamCombine's.
__global__ void __launch_bounds__(kParamsGroups* kThreads)
    layerNormBackwardParamsKernel(ColumnChunks p, const float* x, const float* w, const float* mean, const float* rstd,
                                  const float* dy, const float* residual, float* dx, float* dw, float* db,
                                  float* partials, int64_t d, bool accumulate) {
  __shared__ float sh[kParamsGroups * kThreads];
  extern __shared__ float acc[];
  float* accW = acc;
  float* accB = acc + d;
  const int T = static_cast<int>(threadIdx.x), all = kParamsGroups * kThreads;
  const int g = T / kThreads, t = T % kThreads;
  float* gsh = sh + g * kThreads;
  for (int64_t k = blockIdx.x; k < p.chunks; k += gridDim.x) {
    layerNormParamChunkStart(p, dw, db, accumulate, accW, accB, d, T, all);
    for (int64_t r0 = p.begin(k); r0 < p.end(k); r0 += kParamsGroups) {
      // The group's row; past the chunk's end the group still meets the barriers (uniform across the block).
      const int64_t r = r0 + g;
      const bool mine = r < p.end(k);
      const float mu = mine ? mean[r] : 0.0f, rs = mine ? rstd[r] : 0.0f;
      float sg = 0.0f, sgx = 0.0f;
      if (mine) layerNormDxRowSums(x + r * d, w, dy + r * d, mu, rs, d, t, kThreads, &sg, &sgx);
      const float meanG = groupSum(sg, gsh, t) / static_cast<float>(d);
      const float meanGx = groupSum(sgx, gsh, t) / static_cast<float>(d);
      // The pass's rows in row order into this thread's columns' sums, read before any of their dx is stored (the
      // barrier): dx may be dy's or x's memory, as the dx kernel allows (each thread reads an element, then stores it).
      const int64_t last = r0 + kParamsGroups < p.end(k) ? r0 + kParamsGroups : p.end(k);
      for (int64_t q = r0; q < last; ++q)
        layerNormParamRowAdd(x + q * d, dy + q * d, mean[q], rstd[q], d, T, all, accW, accB);
      __syncthreads();
      if (mine)
        layerNormDxRowStore(x + r * d, w, dy + r * d, residual != nullptr ? residual + r * d : nullptr, dx + r * d, mu,
                            rs, meanG, meanGx, d, t, kThreads);
    }
    layerNormParamChunkStore(p, k, accW, accB, dw, db, partials, d, T, all);
  }
}

// The fused kernel's shared memory (its static kParamsGroups x kThreads floats of tree, 4 KiB, and the dynamic 2 d
// floats of sums) fits the 48 KiB a launch gets without opting in: d <= 5632 (static and dynamic count together).
constexpr int64_t kFloatBytes = sizeof(float);
constexpr int64_t kParamsFusedMaxD = (48 * 1024 - kParamsGroups * kThreads * kFloatBytes) / (2 * kFloatBytes);
static_assert(kParamsFusedMaxD == 5632);

// dx (residual: null, or the gradient each stored value takes on) with dw, db: the fused kernel where its shared
// memory fits, else layerNormParamGrad then the dx kernel (their bits are the same).
void layerNormBackwardWithParams(const float* x, const float* w, const float* mean, const float* rstd,
                                 const float* dy, const float* residual, float* dx, float* dw, float* db,
                                 int64_t rows, int64_t d, bool accumulate) {
  if (d == 0) return;
  if (d > kParamsFusedMaxD || !layerNormParamsFusionOn()) {
    layerNormParamGrad(x, mean, rstd, dy, dw, db, rows, d, accumulate);
    layerNormDxKernel<<<rowBlocks(rows), kThreads>>>(x, w, mean, rstd, dy, residual, dx, rows, d);
    DTRAIN_CU_CHECK_LAUNCH("layerNormDxKernel (after layerNormParamGrad)");
    return;
  }
  const ColumnChunks p = columnChunks(rows);
  float* partials = layerNormParamPartials(rows, d);
  const size_t shared = static_cast<size_t>(2 * d) * sizeof(float);
  layerNormBackwardParamsKernel<<<static_cast<unsigned>(p.chunks), kParamsGroups * kThreads, shared>>>(
      p, x, w, mean, rstd, dy, residual, dx, dw, db, partials, d, accumulate);
  DTRAIN_CU_CHECK_LAUNCH("layerNormBackwardParamsKernel");
  layerNormParamCombine(partials, dw, db, rows, d, accumulate);
}

__global__ void embeddingForwardKernel(const float* tokens, const float* wte, const float* wpe, float* y, size_t n,
                                       int64_t t, int64_t c, int64_t vocab, int32_t* badRow) {
  DTRAIN_GRID_STRIDE(i, n) {
    const int64_t r = static_cast<int64_t>(i) / c, j = static_cast<int64_t>(i) % c;
    const int64_t tok = tokenIndex(tokens[r], vocab);
    if (tok < 0) {
      if (j == 0 && badRow != nullptr) atomicMin(badRow, static_cast<int32_t>(r));
      y[i] = 0.0f;
      continue;
    }
    float v = wte[tok * c + j];
    if (wpe != nullptr) v += wpe[(r % t) * c + j];
    y[i] = v;
  }
}

__global__ void causalSoftmaxForwardKernel(float* s, int64_t rows, int64_t t, float scale) {
  __shared__ float sh[kThreads];
  DTRAIN_ROW_STRIDE(row, rows) {
  const int64_t i = row % t;  // position: columns 0..i are visible
  float* x = s + row * t;
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j <= i; j += kThreads) m = fmaxf(m, x[j]);
  m = blockMax(m, sh);
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j <= i; j += kThreads) {
    const float e = expf((x[j] - m) * scale);
    x[j] = e;
    sum += e;
  }
  const float inv = 1.0f / blockSum(sum, sh);
  for (int64_t j = threadIdx.x; j < t; j += kThreads) x[j] = j <= i ? x[j] * inv : 0.0f;
  }
}

__global__ void causalSoftmaxBackwardKernel(const float* p, float* dp, int64_t rows, int64_t t, float scale) {
  __shared__ float sh[kThreads];
  DTRAIN_ROW_STRIDE(row, rows) {
  const int64_t i = row % t;
  const float* pr = p + row * t;
  float* dr = dp + row * t;
  float dot = 0.0f;
  for (int64_t j = threadIdx.x; j <= i; j += kThreads) dot += pr[j] * dr[j];
  dot = blockSum(dot, sh);
  for (int64_t j = threadIdx.x; j < t; j += kThreads) dr[j] = j <= i ? pr[j] * (dr[j] - dot) * scale : 0.0f;
  }
}

__global__ void crossEntropyKernel(const float* logits, const void* labels, bool labels64, int64_t rows,
                                   int64_t classes, float* diff, double* rowLoss, int32_t* rowCorrect, int32_t* badRow,
                                   float* rowStats) {
  __shared__ float sh[kThreads];
  __shared__ float shv[kThreads];
  __shared__ int64_t shi[kThreads];
  DTRAIN_ROW_STRIDE(r, rows) {
  const float* x = logits + r * classes;
  const int64_t label = labels64 ? static_cast<const int64_t*>(labels)[r] : static_cast<const int32_t*>(labels)[r];
  const bool valid = label >= 0 && label < classes;
  // Maximum, and the first index holding it (torch.argmax): per thread in increasing j, then a tree that prefers
  // the larger value and, on a tie, the smaller index.
  float best = -INFINITY;
  int64_t bestAt = classes;
  for (int64_t j = threadIdx.x; j < classes; j += kThreads)
    if (x[j] > best || bestAt == classes) best = x[j], bestAt = j;
  shv[threadIdx.x] = best;
  shi[threadIdx.x] = bestAt;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const float ov = shv[threadIdx.x + s];
      const int64_t oi = shi[threadIdx.x + s];
      if (oi < classes && (shi[threadIdx.x] == classes || ov > shv[threadIdx.x] ||
                           (ov == shv[threadIdx.x] && oi < shi[threadIdx.x])))
        shv[threadIdx.x] = ov, shi[threadIdx.x] = oi;
    }
    __syncthreads();
  }
  const float m = shv[0];
  const int64_t argmax = shi[0];
  __syncthreads();
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < classes; j += kThreads) sum += expf(x[j] - m);
  const float total = blockSum(sum, sh);
  if (diff != nullptr) {
    const float inv = 1.0f / total;
    for (int64_t j = threadIdx.x; j < classes; j += kThreads)
      diff[r * classes + j] = crossEntropyDiff(x[j], m, inv, valid && j == label);
  }
  if (threadIdx.x == 0) {
    if (rowStats != nullptr) rowStats[kCrossEntropyStats * r] = m, rowStats[kCrossEntropyStats * r + 1] = total;
    if (!valid) atomicMin(badRow, static_cast<int32_t>(r));
    rowLoss[r] = valid ? static_cast<double>(m + logf(total) - x[label]) : 0.0;
    rowCorrect[r] = valid && argmax == label ? 1 : 0;
  }
  __syncthreads();  // shv/shi are rewritten by the next row
  }
}

// loss_grad.h's Block on the device: each thread runs f for itself, held in a register; sync is __syncthreads.
struct DeviceBlock {
  uint16_t held = 0;
  template <class F>
  __device__ void each(F&& f) {
    f(static_cast<int64_t>(threadIdx.x), held);
  }
  __device__ void sync() { __syncthreads(); }
};

// One block of kCrossEntropyChunk threads per row (grid-stride over rows): loss_grad.h's
// crossEntropyGradBf16InPlaceRow writes the row's bf16 gradient over the first half of its float32 logits.
__global__ void crossEntropyGradBf16InPlaceKernel(float* logits, const void* labels, bool labels64, int64_t rows,
                                                  int64_t classes, const float* rowStats, float factor) {
  DeviceBlock block;
  DTRAIN_ROW_STRIDE(r, rows) {
    crossEntropyGradBf16InPlaceRow(block, logits + r * classes, classes, rowStats[kCrossEntropyStats * r],
                                   rowStats[kCrossEntropyStats * r + 1],
                                   crossEntropyLabelColumn(labels, labels64, classes, r), factor);
  }
}

__global__ void mseKernel(const float* y, const float* t, float* diff, double* sq, size_t n) {
  DTRAIN_GRID_STRIDE(i, n) {
    const float d = y[i] - t[i];
    if (diff != nullptr) diff[i] = d;
    sq[i] = static_cast<double>(d) * static_cast<double>(d);
  }
}

// loss.cpp's BceWithLogits, element by element in double (bce_math.h's bceElement, the function tests/gpu
// emulates); only the atomics are the kernel's own.
__global__ void bceKernel(const float* x, const void* targets, TargetKind kind, size_t n, float* diff,
                          double* rowLoss, int32_t* rowCorrect, int32_t* hist, int bins, int32_t* badRow) {
  DTRAIN_GRID_STRIDE(i, n) {
    const int64_t cell = bceElement(x, targets, kind, i, diff, rowLoss, rowCorrect, bins);
    if (cell < 0) {
      atomicMin(badRow, static_cast<int32_t>(i));
    } else if (hist != nullptr) {
      atomicAdd(&hist[cell], 1);
    }
  }
}

}  // namespace

void fill(float* p, size_t n, float value) {
  if (n == 0) return;
  fillKernel<<<blocksFor(n), kThreads>>>(p, n, value);
  DTRAIN_CU_CHECK_LAUNCH("fillKernel");
}

void toBf16(const float* x, void* y, size_t n) {
  if (n == 0) return;
  toBf16Kernel<<<blocksFor(n), kThreads>>>(x, static_cast<__nv_bfloat16*>(y), n);
  DTRAIN_CU_CHECK_LAUNCH("toBf16Kernel");
}

void scale(const float* in, float* out, size_t n, float s) {
  if (n == 0) return;
  scaleKernel<<<blocksFor(n), kThreads>>>(in, out, n, s);
  DTRAIN_CU_CHECK_LAUNCH("scaleKernel");
}

void setLayerNormParamsFusion(bool on) { gLayerNormParamsFusion.store(on); }
bool layerNormParamsFusionOn() noexcept { return gLayerNormParamsFusion.load(); }

void add(const float* a, const float* b, float* out, size_t n) {
  if (n == 0) return;
  addKernel<<<blocksFor(n), kThreads>>>(a, b, out, n);
  DTRAIN_CU_CHECK_LAUNCH("addKernel");
}

void addBias(float* y, const float* bias, int64_t rows, int64_t cols) {
  const size_t n = static_cast<size_t>(rows * cols);
  if (n == 0) return;
  addBiasKernel<<<blocksFor(n), kThreads>>>(y, bias, n, cols);
  DTRAIN_CU_CHECK_LAUNCH("addBiasKernel");
}

void addBiasToBf16(const float* x, const float* bias, uint16_t* y, int64_t rows, int64_t cols) {
  const size_t n = static_cast<size_t>(rows * cols);
  if (n == 0) return;
  addBiasToBf16Kernel<<<blocksFor(n), kThreads>>>(x, bias, y, n, cols);
  DTRAIN_CU_CHECK_LAUNCH("addBiasToBf16Kernel");
}

void activationForward(Activation f, const float* x, float* y, size_t n) {
  if (n == 0) return;
  activationForwardKernel<<<blocksFor(n), kThreads>>>(f, x, y, n);
  DTRAIN_CU_CHECK_LAUNCH("activationForwardKernel");
}

void activationForwardBf16(Activation f, const float* x, uint16_t* y, size_t n) {
  if (n == 0) return;
  activationForwardKernel<<<blocksFor(n), kThreads>>>(f, x, y, n);
  DTRAIN_CU_CHECK_LAUNCH("activationForwardKernel<bf16>");
}

void activationBackward(Activation f, const float* x, const float* y, const float* dy, float* dx, size_t n) {
  if (n == 0) return;
  activationBackwardKernel<<<blocksFor(n), kThreads>>>(f, x, y, dy, dx, n);
  DTRAIN_CU_CHECK_LAUNCH("activationBackwardKernel");
}

void layerNormForward(const float* x, const float* w, const float* b, float* y, float* mean, float* rstd,
                      int64_t rows, int64_t d, float eps) {
  if (rows == 0) return;
  layerNormForwardKernel<<<rowBlocks(rows), kThreads>>>(x, w, b, y, mean, rstd, rows, d, eps);
  DTRAIN_CU_CHECK_LAUNCH("layerNormForwardKernel");
}

void layerNormForwardBf16(const float* x, const float* w, const float* b, uint16_t* y, float* mean, float* rstd,
                          int64_t rows, int64_t d, float eps) {
  if (rows == 0) return;
  layerNormForwardKernel<<<rowBlocks(rows), kThreads>>>(x, w, b, y, mean, rstd, rows, d, eps);
  DTRAIN_CU_CHECK_LAUNCH("layerNormForwardKernel<bf16>");
}

void residualLayerNormForward(const float* a, float* f, const float* w, const float* b, float* y, float* mean,
                              float* rstd, int64_t rows, int64_t d, float eps) {
  if (rows == 0) return;
  residualLayerNormForwardKernel<<<rowBlocks(rows), kThreads>>>(a, f, w, b, y, mean, rstd, rows, d, eps);
  DTRAIN_CU_CHECK_LAUNCH("residualLayerNormForwardKernel");
}

void residualLayerNormForwardBf16(const float* a, float* f, const float* w, const float* b, uint16_t* y,
                                  float* mean, float* rstd, int64_t rows, int64_t d, float eps) {
  if (rows == 0) return;
  residualLayerNormForwardKernel<<<rowBlocks(rows), kThreads>>>(a, f, w, b, y, mean, rstd, rows, d, eps);
  DTRAIN_CU_CHECK_LAUNCH("residualLayerNormForwardKernel<bf16>");
}

void layerNormBackward(const float* x, const float* w, const float* mean, const float* rstd, const float* dy,
                       float* dx, float* dw, float* db, int64_t rows, int64_t d, bool accumulate) {
  if (rows == 0) return;
  if (w != nullptr && dx != nullptr) return layerNormBackwardWithParams(x, w, mean, rstd, dy, nullptr, dx, dw, db, rows,
                                                                        d, accumulate);
  if (w != nullptr) layerNormParamGrad(x, mean, rstd, dy, dw, db, rows, d, accumulate);
  if (dx != nullptr) {
    layerNormDxKernel<<<rowBlocks(rows), kThreads>>>(x, w, mean, rstd, dy, nullptr, dx, rows, d);
    DTRAIN_CU_CHECK_LAUNCH("layerNormDxKernel");
  }
}

void residualLayerNormBackward(const float* x, const float* w, const float* mean, const float* rstd, const float* dy,
                               const float* residualGrad, float* dx, float* dw, float* db, int64_t rows, int64_t d,
                               bool accumulate) {
  if (rows == 0) return;
  if (w != nullptr) return layerNormBackwardWithParams(x, w, mean, rstd, dy, residualGrad, dx, dw, db, rows, d,
                                                       accumulate);
  layerNormDxKernel<<<rowBlocks(rows), kThreads>>>(x, w, mean, rstd, dy, residualGrad, dx, rows, d);
  DTRAIN_CU_CHECK_LAUNCH("layerNormDxKernel<residual>");
}

void embeddingForward(const float* tokens, const float* wte, const float* wpe, float* y, int64_t rows, int64_t t,
                      int64_t c, int64_t vocab, int32_t* badRow) {
  const size_t n = static_cast<size_t>(rows * c);
  if (n == 0) return;
  embeddingForwardKernel<<<blocksFor(n), kThreads>>>(tokens, wte, wpe, y, n, t, c, vocab, badRow);
  DTRAIN_CU_CHECK_LAUNCH("embeddingForwardKernel");
}

void causalSoftmaxForward(float* s, int64_t count, int64_t t, float scale) {
  if (count * t == 0) return;
  causalSoftmaxForwardKernel<<<rowBlocks(count * t), kThreads>>>(s, count * t, t, scale);
  DTRAIN_CU_CHECK_LAUNCH("causalSoftmaxForwardKernel");
}

void causalSoftmaxBackward(const float* p, float* dp, int64_t count, int64_t t, float scale) {
  if (count * t == 0) return;
  causalSoftmaxBackwardKernel<<<rowBlocks(count * t), kThreads>>>(p, dp, count * t, t, scale);
  DTRAIN_CU_CHECK_LAUNCH("causalSoftmaxBackwardKernel");
}

void crossEntropyRows(const float* logits, const void* labels, bool labels64, int64_t rows, int64_t classes,
                      float* diff, double* rowLoss, int32_t* rowCorrect, int32_t* badRow, float* rowStats) {
  if (rows == 0) return;
  crossEntropyKernel<<<rowBlocks(rows), kThreads>>>(logits, labels, labels64, rows, classes, diff, rowLoss,
                                                    rowCorrect, badRow, rowStats);
  DTRAIN_CU_CHECK_LAUNCH("crossEntropyKernel");
}

void crossEntropyGradBf16InPlace(float* logits, const void* labels, bool labels64, int64_t rows, int64_t classes,
                                 const float* rowStats, float factor) {
  if (rows == 0 || classes == 0) return;
  static_assert(kThreads == kCrossEntropyChunk, "one thread per column of a chunk (loss_grad.h)");
  crossEntropyGradBf16InPlaceKernel<<<rowBlocks(rows), kThreads>>>(logits, labels, labels64, rows, classes, rowStats,
                                                                   factor);
  DTRAIN_CU_CHECK_LAUNCH("crossEntropyGradBf16InPlaceKernel");
}

void mseRows(const float* y, const float* t, float* diff, double* sq, size_t n) {
  if (n == 0) return;
  mseKernel<<<blocksFor(n), kThreads>>>(y, t, diff, sq, n);
  DTRAIN_CU_CHECK_LAUNCH("mseKernel");
}

void bceWithLogitsRows(const float* x, const void* targets, TargetKind targetKind, size_t n, float* diff,
                       double* rowLoss, int32_t* rowCorrect, int32_t* hist, int bins, int32_t* badRow) {
  if (n == 0) return;
  bceKernel<<<blocksFor(n), kThreads>>>(x, targets, targetKind, n, diff, rowLoss, rowCorrect, hist, bins, badRow);
  DTRAIN_CU_CHECK_LAUNCH("bceKernel");
}

}  // namespace dtrain::gpu::kernels
