// The per-thread work of lib/gpu's column reductions and fused bias + activation kernels (kernels_reduce.cu):
// plain C++ compiled for the host and the device (no CUDA header), so tests/gpu/test_gpu_reduce.cpp runs every
// thread's work on the CPU against the CPU layers, as window_index.h does for conv2d/maxpool2d.
//
// Deterministic two-pass column sums. A column reduction out[c] (+)= sum_r v[r, c] over a row-major [rows, cols]
// matrix (a bias gradient, LayerNorm's weight/bias gradients, the position table's gradient) is split into
// fixed row chunks: pass 1 runs one thread per (column, chunk), summing the chunk's rows in row order into a
// partial (coalesced: neighbouring threads read neighbouring columns), pass 2 one thread per column adding the
// partials in chunk order onto out[c] (or 0). The chunking (columnChunks) is a function of `rows` only, never of
// the device or of timing, so a result is bit-identical run after run (no float atomics anywhere). With a single
// chunk (rows <= kReduceChunkRows) pass 1 writes out[c] itself, starting from it: the CPU layers' row-order sum,
// bit for bit. With several chunks the order is ((out + chunk 0) + chunk 1) + ..., each chunk summed from 0: not
// the CPU's order, so equal within float rounding.
//
// Embedding token gradient (embeddingTokenSegment): the rows are ordered by token on the host (token_order.h),
// stably, and one thread per (distinct token, column) adds that token's rows in row order onto gwte: exactly the
// CPU's (and the former one-thread-per-column kernel's) summation order, so bit-identical to both.
//
// Fused bias + activation (a linear followed by relu/gelu/tanh/sigmoid, docs/gpu.md): forward writes
// y = f(xw + b) in one pass, leaving the linear's output xw (x W^T, without the bias) as it is; backward recomputes
// the pre-activation xw + b (the same float addition, so the same value) and writes dx = dy f'(.) while summing it
// into the bias gradient's chunk partials (biasActivationBackwardChunk), in the column-sum plan above.
#pragma once

#include <cmath>
#include <cstdint>

#include "lib/gpu/host_device.h"

namespace dtrain::gpu {

// --- The chunk plan and the grid that walks it ---

inline constexpr int64_t kReduceChunkRows = 64;   // rows per chunk, at least
inline constexpr int64_t kReduceMaxChunks = 128;  // chunks per column, at most (bounds the partials)
inline constexpr unsigned kColumnTile = 128;      // threads per block = columns per block (a multiple of 32)
inline constexpr unsigned kMaxGridY = 65535;      // CUDA's limit on gridDim.y

struct ColumnChunks {
  int64_t rows = 0, chunkRows = 1, chunks = 1;
  DTRAIN_HOST_DEVICE int64_t begin(int64_t k) const { return k * chunkRows; }
  DTRAIN_HOST_DEVICE int64_t end(int64_t k) const { return (k + 1) * chunkRows < rows ? (k + 1) * chunkRows : rows; }
};

// chunkRows = max(64, ceil(rows / 128)), chunks = ceil(rows / chunkRows) (1 for rows <= 64; at most 128). A
// function of rows only.
constexpr ColumnChunks columnChunks(int64_t rows) {
  const int64_t spread = (rows + kReduceMaxChunks - 1) / kReduceMaxChunks;
  const int64_t chunkRows = spread > kReduceChunkRows ? spread : kReduceChunkRows;
  const int64_t chunks = rows <= 0 ? 1 : (rows + chunkRows - 1) / chunkRows;
  return {rows < 0 ? 0 : rows, chunkRows, chunks};
}

// The floats of partials a plan needs per summed output column (0 with a single chunk: pass 1 writes out).
constexpr int64_t partialCount(const ColumnChunks& p, int64_t cols) { return p.chunks > 1 ? p.chunks * cols : 0; }

// A 2-D grid of kColumnTile-thread blocks: x over column tiles, y over "lanes" (chunks, or the embedding's
// segments); both capped (x at 2^20 as grid.h, y at CUDA's 65535), the threads stride over what is left.
struct CellGrid {
  unsigned x = 1, y = 1;
};
constexpr CellGrid cellGrid(int64_t cols, int64_t lanes) {
  const int64_t tiles = (cols + kColumnTile - 1) / kColumnTile;
  const int64_t maxX = int64_t{1} << 20;
  return {static_cast<unsigned>(tiles < 1 ? 1 : tiles > maxX ? maxX : tiles),
          static_cast<unsigned>(lanes < 1 ? 1 : lanes > kMaxGridY ? kMaxGridY : lanes)};
}

// The cells (lane, column) that thread tx of block (bx, by) of grid g handles: f(lane, column) for each, lanes
// striding by g.y and columns by g.x tiles. Every cell of [lanes) x [cols) exactly once over the whole grid.
template <class F>
DTRAIN_HOST_DEVICE inline void forEachCell(CellGrid g, unsigned bx, unsigned by, unsigned tx, int64_t lanes,
                                           int64_t cols, F&& f) {
  for (int64_t lane = by; lane < lanes; lane += g.y)
    for (int64_t c = static_cast<int64_t>(bx) * kColumnTile + tx; c < cols; c += static_cast<int64_t>(kColumnTile) * g.x)
      f(lane, c);
}

// --- Column sums: pass 1 (one thread per (chunk k, column c)) and pass 2 (one thread per column) ---

// v is [rows, cols] row-major. With one chunk: out[c] = (accumulate ? out[c] : 0) + the rows in order; else
// partials[k * cols + c] = the chunk's rows in order, from 0.
DTRAIN_HOST_DEVICE inline void columnSumChunk(const ColumnChunks& p, int64_t k, int64_t c, int64_t cols, const float* v,
                                              float* out, float* partials, bool accumulate) {
  const bool direct = p.chunks == 1;
  float acc = direct && accumulate ? out[c] : 0.0f;
  for (int64_t r = p.begin(k); r < p.end(k); ++r) acc += v[r * cols + c];
  if (direct) {
    out[c] = acc;
  } else {
    partials[k * cols + c] = acc;
  }
}

// Pass 2 (only with several chunks): out[c] = (accumulate ? out[c] : 0) + partial 0 + partial 1 + ... in order.
DTRAIN_HOST_DEVICE inline void columnSumCombine(const ColumnChunks& p, int64_t c, int64_t cols, const float* partials,
                                                float* out, bool accumulate) {
  float acc = accumulate ? out[c] : 0.0f;
  for (int64_t k = 0; k < p.chunks; ++k) acc += partials[k * cols + c];
  out[c] = acc;
}

// One term of LayerNorm's weight gradient: acc + dy * xhat. Shared by layerNormParamChunk and the fused LayerNorm
// backward's stores (layernorm_rows.h), so nvcc sees one expression in both and contracts it alike (an FMA in
// both, or in neither).
DTRAIN_HOST_DEVICE inline float layerNormParamTerm(float acc, float dy, float xhat) { return acc + dy * xhat; }

// LayerNorm's weight and bias gradients over [rows, d]: dw[j] (+)= sum_r dy[r, j] xhat[r, j], db[j] (+)= sum_r
// dy[r, j] (db may be nullptr), xhat = (x - mean[r]) * rstd[r] as the forward. Partials: dw's chunks, then db's
// (2 * chunks * d floats).
DTRAIN_HOST_DEVICE inline void layerNormParamChunk(const ColumnChunks& p, int64_t k, int64_t j, int64_t d, const float* x,
                                                   const float* mean, const float* rstd, const float* dy, float* dw,
                                                   float* db, float* partials, bool accumulate) {
  const bool direct = p.chunks == 1;
  float gw = direct && accumulate ? dw[j] : 0.0f;
  float gb = direct && accumulate && db != nullptr ? db[j] : 0.0f;
  for (int64_t r = p.begin(k); r < p.end(k); ++r) {
    const float g = dy[r * d + j];
    gw = layerNormParamTerm(gw, g, (x[r * d + j] - mean[r]) * rstd[r]);
    gb += g;
  }
  if (direct) {
    dw[j] = gw;
    if (db != nullptr) db[j] = gb;
  } else {
    partials[k * d + j] = gw;
    partials[(p.chunks + k) * d + j] = gb;
  }
}

// --- Per-channel sums of [batch, channels, positions] (conv2d's bias gradient) ---
// Channel ch sums batch x positions values, strided in memory, so the chunks are of that flattened range (e = n *
// positions + q): at least kChannelChunkElems values, at most kReduceMaxChunks chunks. One block of kChannelThreads
// threads per (channel, chunk): thread t sums e = begin + t, begin + t + kChannelThreads, ... in order
// (channelThreadSum), then a fixed tree halves the block (channelBlockSum on the host; shared memory on the
// device, same pairs in the same order); pass 2 is columnSumCombine over `channels` columns. With one chunk the
// block writes db[ch] = (accumulate ? db[ch] : 0) + its sum, as the former one-block-per-channel kernel did.

inline constexpr int64_t kChannelChunkElems = 4096;
inline constexpr unsigned kChannelThreads = 256;  // a power of two: the tree halves it

constexpr ColumnChunks channelChunks(int64_t batch, int64_t positions) {
  const int64_t elems = batch * positions;
  const int64_t spread = (elems + kReduceMaxChunks - 1) / kReduceMaxChunks;
  const int64_t chunkElems = spread > kChannelChunkElems ? spread : kChannelChunkElems;
  return {elems < 0 ? 0 : elems, chunkElems, elems <= 0 ? 1 : (elems + chunkElems - 1) / chunkElems};
}

DTRAIN_HOST_DEVICE inline float channelThreadSum(const ColumnChunks& p, int64_t k, int64_t ch, unsigned t,
                                                 const float* dy, int64_t channels, int64_t positions) {
  float acc = 0.0f;
  for (int64_t e = p.begin(k) + t; e < p.end(k); e += kChannelThreads)
    acc += dy[((e / positions) * channels + ch) * positions + e % positions];
  return acc;
}

// The block's tree over its threads' sums (sh: kChannelThreads values, summed in place into sh[0]): the host
// twin of the device kernel's shared-memory loop.
inline float channelBlockSum(float* sh) {
  for (unsigned s = kChannelThreads / 2; s > 0; s >>= 1)
    for (unsigned t = 0; t < s; ++t) sh[t] += sh[t + s];
  return sh[0];
}

// --- Activations (layers_dense.cpp's formulas, PyTorch's) ---

enum class Activation { kRelu, kGelu, kTanh, kSigmoid };

// Gelu is the exact (erf) form, PyTorch's approximate='none'. ::erff/::expf/::tanhf are libm's on the host and
// CUDA's on the device (they may differ in the last bits: the emulation compares within a tolerance).
DTRAIN_HOST_DEVICE inline float activationValue(Activation f, float v) {
  switch (f) {
    case Activation::kRelu: return v > 0.0f ? v : 0.0f;
    case Activation::kGelu: return v * 0.5f * (1.0f + ::erff(v * static_cast<float>(M_SQRT1_2)));
    case Activation::kTanh: return ::tanhf(v);
    case Activation::kSigmoid: return 1.0f / (1.0f + ::expf(-v));
  }
  return v;
}

// dy * f'(x): relu, tanh and sigmoid from the output y (as PyTorch's backward formulas), gelu from the input x.
DTRAIN_HOST_DEVICE inline float activationGrad(Activation f, float x, float y, float dy) {
  switch (f) {
    case Activation::kRelu: return y > 0.0f ? dy : 0.0f;
    case Activation::kGelu: {
      const float kBeta = static_cast<float>(M_2_SQRTPI * M_SQRT1_2 * 0.5);
      return dy * (0.5f * (1.0f + ::erff(x * static_cast<float>(M_SQRT1_2))) + x * (::expf(-0.5f * x * x) * kBeta));
    }
    case Activation::kTanh: return dy * (1.0f - y * y);
    case Activation::kSigmoid: return dy * (1.0f - y) * y;
  }
  return dy;
}

// --- Fused bias + activation over [rows, cols]: xw the linear's output without its bias ---

// Element i of the forward: y[i] = f(xw[i] + bias[i % cols]) (the unfused pair's addBias then activation).
DTRAIN_HOST_DEVICE inline float biasActivationValue(Activation f, const float* xw, const float* bias, int64_t i,
                                                    int64_t cols) {
  return activationValue(f, xw[i] + bias[i % cols]);
}

// a + b rounded on its own. On the device __fadd_rn, which nvcc and ptxas never contract with the multiplication
// that produced b: a plain `acc += d` after `d = dy * g` may become fma(dy, g, acc) there (nvcc's default
// --fmad=true), a sum of the unrounded products, while the unfused kernels (and the CPU) add the stored, rounded d.
DTRAIN_HOST_DEVICE inline float addRounded(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Pass 1 of the backward for chunk k, column c: dx[r, c] = dy f'(xw + b) for the chunk's rows, summed into the bias
// gradient as columnSumChunk does (db itself with one chunk, partials otherwise; pass 2 is columnSumCombine): the
// stored dx values are added (addRounded), so the bias gradient is the unfused pair's bit for bit on the device too.
DTRAIN_HOST_DEVICE inline void biasActivationBackwardChunk(Activation f, const ColumnChunks& p, int64_t k, int64_t c,
                                                           int64_t cols, const float* xw, const float* bias,
                                                           const float* y, const float* dy, float* dx, float* db,
                                                           float* partials, bool accumulate) {
  const bool direct = p.chunks == 1;
  float acc = direct && accumulate ? db[c] : 0.0f;
  const float b = bias[c];
  for (int64_t r = p.begin(k); r < p.end(k); ++r) {
    const int64_t i = r * cols + c;
    const float d = activationGrad(f, xw[i] + b, y[i], dy[i]);
    dx[i] = d;
    acc = addRounded(acc, d);
  }
  if (direct) {
    db[c] = acc;
  } else {
    partials[k * cols + c] = acc;
  }
}

// --- Embedding token gradient ---

// The token id a float input holds (rounded to nearest even, as the CPU's nearbyint), or -1 when it is outside
// [0, vocab) or not a number.
DTRAIN_HOST_DEVICE inline int64_t tokenIndex(float v, int64_t vocab) {
  const double r = ::rint(static_cast<double>(v));
  return r >= 0.0 && r < static_cast<double>(vocab) ? static_cast<int64_t>(r) : -1;
}

// Segment s of the token order (token_order.h): rows order[start[s] .. start[s + 1]) all hold token tok[s], in
// increasing row order. Column j: gwte[tok, j] += dy[row, j] for each of them, in that order.
DTRAIN_HOST_DEVICE inline void embeddingTokenSegment(int64_t s, int64_t j, int64_t c, const int32_t* order,
                                                     const int32_t* start, const int32_t* tok, const float* dy,
                                                     float* gwte) {
  float* g = gwte + static_cast<int64_t>(tok[s]) * c + j;
  float acc = *g;
  for (int32_t i = start[s]; i < start[s + 1]; ++i) acc += dy[static_cast<int64_t>(order[i]) * c + j];
  *g = acc;
}

}  // namespace dtrain::gpu
