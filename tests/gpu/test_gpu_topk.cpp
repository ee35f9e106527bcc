// top-k's device kernels emulated on the CPU (no GPU needed; compiled with -ffp-contract=off like the CPU hook's
// operations and the kernels' --fmad=false): every thread of every block of topkSelect's launches (kernels_topk.cu:
// the radix select's histogram and pick passes, the chunk counts, the plan, the block scans and the writes) runs
// topk_select.h's work, and the pairs and the residual must be the CPU hook's selection's (nn::makeTopKOps(cpu),
// the code of lib/train's TopKHook) bit for bit: sizes below, at and above a chunk, the CPU's sampled prefilter on
// and off, k from 1 to n, many ties (the smaller index wins), -0 beside +0. The decompression (rank by rank) and the
// element-wise steps are compared the same way. What this cannot show is the device itself:
// tests/gpu/test_gpu_compression.cpp runs the hook on a GPU.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "lib/gpu/grid.h"
#include "lib/gpu/topk_select.h"
#include "lib/nn/topk_ops.h"

using namespace dtrain;
using namespace dtrain::gpu;

namespace {

const uint32_t kOpen[2] = {0, 0};  // an open gate (nn::TopKOps)

// topkSelect's launches, thread by thread, in launch order.
void emulateSelect(float* acc, size_t n, size_t k, int32_t* pairs, bool zeroTaken) {
  RadixState state{0, static_cast<uint32_t>(k)};
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    std::vector<uint32_t> hist(kRadixBuckets, 0);
    const unsigned blocks = gridFor(n, kTopkThreads);
    for (unsigned b = 0; b < blocks; ++b) {
      std::vector<uint32_t> local(kRadixBuckets, 0);  // the block's shared histogram
      for (int t = 0; t < kTopkThreads; ++t)
        for (size_t i = b * static_cast<size_t>(kTopkThreads) + static_cast<size_t>(t); i < n;
             i += static_cast<size_t>(kTopkThreads) * blocks) {
          const uint32_t key = topkKey(acc[i]);
          if (radixCandidate(key, pass, state.prefix)) ++local[radixDigit(key, pass)];
        }
      for (int d = 0; d < kRadixBuckets; ++d) hist[static_cast<size_t>(d)] += local[static_cast<size_t>(d)];
    }
    radixPick(hist.data(), state);
  }
  const size_t chunks = (n + kTopkChunk - 1) / kTopkChunk;
  std::vector<uint32_t> above(chunks), equal(chunks), eqBase(chunks), outBase(chunks);
  for (size_t c = 0; c < chunks; ++c) {
    uint32_t a[kTopkThreads], e[kTopkThreads];
    for (int t = 0; t < kTopkThreads; ++t) countRange(acc, threadRange(n, c, t), state.prefix, a[t], e[t]);
    above[c] = equal[c] = 0;
    for (int t = 0; t < kTopkThreads; ++t) above[c] += a[t], equal[c] += e[t];
  }
  planChunks(above.data(), equal.data(), chunks, state.remaining, eqBase.data(), outBase.data());
  for (size_t c = 0; c < chunks; ++c) {
    uint32_t eq[kTopkThreads], tk[kTopkThreads], eqStart[kTopkThreads];
    for (int t = 0; t < kTopkThreads; ++t) {
      uint32_t ignored;
      countRange(acc, threadRange(n, c, t), state.prefix, ignored, eq[t]);
    }
    exclusiveScan(eq, kTopkThreads);
    for (int t = 0; t < kTopkThreads; ++t) {
      eqStart[t] = eqBase[c] + eq[t];
      tk[t] = takenInRange(acc, threadRange(n, c, t), state.prefix, state.remaining, eqStart[t]);
    }
    exclusiveScan(tk, kTopkThreads);
    for (int t = 0; t < kTopkThreads; ++t)
      writeRange(acc, threadRange(n, c, t), state.prefix, state.remaining, eqStart[t], pairs, outBase[c] + tk[t],
                 zeroTaken);
  }
}

// Values with many ties: multiples of 1/8 in [-4, 4] (so equal magnitudes of both signs), some -0 and +0.
std::vector<float> tiedValues(size_t n, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int> pick(-32, 32);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(pick(gen)) / 8.0f;
  for (size_t i = 0; i < n; i += 97) v[i] = (i / 97) % 2 == 0 ? -0.0f : 0.0f;
  return v;
}

std::vector<float> spreadValues(size_t n, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(gen) * std::exp(normal(gen));
  return v;
}

}  // namespace

TEST_CASE("top-k's selection kernels, thread by thread, choose the CPU hook's pairs bit for bit (ties to the smaller index)") {
  auto cpu = nn::makeTopKOps(Device::cpu());
  for (const size_t n : {size_t{1}, size_t{7}, size_t{4095}, size_t{4096}, size_t{4097}, size_t{10000}, size_t{20000},
                         size_t{70001}}) {
    for (const bool tied : {true, false}) {
      const std::vector<float> values = tied ? tiedValues(n, n) : spreadValues(n, n + 1);
      for (const size_t k : {size_t{1}, size_t{3}, n / 100 + 1, n / 2 + 1, n}) {
        if (k > n || k == 0) continue;
        for (const bool zeroTaken : {true, false}) {
          CAPTURE(n);
          CAPTURE(tied);
          CAPTURE(k);
          CAPTURE(zeroTaken);
          std::vector<float> cpuAcc = values, gpuAcc = values, velocity(n, 1.0f);
          std::vector<int32_t> cpuPairs(2 * k, -1), gpuPairs(2 * k, -1);
          cpu->select(cpuAcc.data(), n, k, cpuPairs.data(), zeroTaken, velocity.data(), kOpen);
          emulateSelect(gpuAcc.data(), n, k, gpuPairs.data(), zeroTaken);
          REQUIRE(cpuPairs == gpuPairs);
          REQUIRE(std::memcmp(cpuAcc.data(), gpuAcc.data(), n * sizeof(float)) == 0);
          // The masking the GPU does from the pairs (topkZeroAt) zeroes the same velocities.
          std::vector<float> gpuVelocity(n, 1.0f);
          for (size_t j = 0; j < k; ++j) gpuVelocity[static_cast<size_t>(gpuPairs[2 * j])] = 0.0f;
          REQUIRE(gpuVelocity == velocity);
        }
      }
    }
  }
}

TEST_CASE("top-k's decompression kernels add the ranks' pairs in rank order: the CPU hook's sums bit for bit") {
  auto cpu = nn::makeTopKOps(Device::cpu());
  const size_t n = 5000, k = 700;
  const int ranks = 3;
  std::vector<int32_t> pairs;
  for (int r = 0; r < ranks; ++r) {
    std::vector<float> acc = spreadValues(n, 40 + static_cast<uint64_t>(r));
    std::vector<int32_t> p(2 * k);
    cpu->select(acc.data(), n, k, p.data(), true, nullptr, kOpen);
    pairs.insert(pairs.end(), p.begin(), p.end());
  }
  std::vector<float> want(n, 7.0f), got(n, 7.0f);
  cpu->decompress(want.data(), n, pairs.data(), k, ranks);
  std::fill(got.begin(), got.end(), 0.0f);  // the kernel's memset
  for (int r = 0; r < ranks; ++r)  // one launch per rank, one thread per pair
    for (size_t j = 0; j < k; ++j) addPair(got.data(), n, pairs.data() + 2 * k * static_cast<size_t>(r), j);
  for (size_t i = 0; i < n; ++i) got[i] = got[i] / static_cast<float>(ranks);
  CHECK(std::memcmp(want.data(), got.data(), n * sizeof(float)) == 0);
}

TEST_CASE("top-k's element-wise kernels (momentum correction, local Adam) are the CPU hook's loops bit for bit") {
  auto cpu = nn::makeTopKOps(Device::cpu());
  const size_t n = 3000;
  const std::vector<float> g = spreadValues(n, 1), u0 = spreadValues(n, 2), e0 = spreadValues(n, 3);
  std::vector<float> u = u0, acc = e0, ku = u0, kacc = e0;
  cpu->momentum(u.data(), acc.data(), g.data(), n, 0.9f, kOpen);
  for (size_t i = 0; i < n; ++i) topkMomentum(ku.data(), kacc.data(), g.data(), 0.9f, i);
  CHECK(u == ku);
  CHECK(acc == kacc);
  // The CPU's own expression, each product rounded: u = 0.9 u + g; acc += u.
  for (size_t i = 0; i < n; ++i) {
    const float mu = 0.9f * u0[i];
    CHECK(u[i] == mu + g[i]);
  }
  const TopkAdam a{.beta1 = 0.9f, .keep1 = 0.1f, .beta2 = 0.999f, .keep2 = 0.001f, .invBc1 = 5.26f, .bc2Sqrt = 0.0447f,
                   .eps = 1e-8f};
  std::vector<float> m(n, 0.01f), v(n, 0.02f), g1 = g, km(n, 0.01f), kv(n, 0.02f), kg = g;
  cpu->adamUpdate(m.data(), v.data(), g1.data(), n, a, kOpen);
  for (size_t i = 0; i < n; ++i) topkAdamUpdate(km.data(), kv.data(), kg.data(), a, i);
  CHECK(m == km);
  CHECK(v == kv);
  CHECK(g1 == kg);
}

namespace {

// A grid-stride launch of gridFor(n, kTopkThreads) blocks, thread by thread (the order does not matter to these
// kernels: each element is its own thread's, and the gate words only ever receive equal stores).
template <class F>
void emulateStride(size_t n, F work) {
  const unsigned blocks = gridFor(n, kTopkThreads);
  const size_t stride = static_cast<size_t>(kTopkThreads) * blocks;
  for (unsigned b = 0; b < blocks; ++b)
    for (int t = 0; t < kTopkThreads; ++t)
      for (size_t i = b * static_cast<size_t>(kTopkThreads) + static_cast<size_t>(t); i < n; i += stride) work(i);
}

}  // namespace

TEST_CASE("top-k's gate kernels (finiteness, an overflowing residual dropped, local clipping) decide as the CPU hook's ifs") {
  // kernels_topk.cu's topkOpenGate, topkDropNonFinite and topkClip, thread by thread, against the CPU operations
  // (whose gate is the CPU hook's finite / allFinite(acc) / clipGradNorm decisions).
  auto cpu = nn::makeTopKOps(Device::cpu());
  const size_t n = 70000;  // more than one grid's stride: gridFor caps the blocks
  const std::vector<float> base = spreadValues(n, 7);
  for (int bad : {-1, 0, 12345, 69999}) {  // where one non-finite value sits (-1: none)
    for (float badValue : {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                           std::numeric_limits<float>::quiet_NaN()}) {
      CAPTURE(bad);
      std::vector<float> x = base;
      if (bad >= 0) x[static_cast<size_t>(bad)] = badValue;
      uint32_t want[2] = {7, 7}, got[2] = {0, 0};  // topkOpenGate's memset clears both words first
      cpu->openGate(want, x.data(), n);
      emulateStride(n, [&](size_t i) { topkFlagNonFinite(x.data(), &got[0], i); });
      CHECK(want[0] == got[0]);
      CHECK(want[1] == got[1]);
      CHECK(topkGateOpen(got) == (bad < 0));
      // dropNonFinite on an open gate: the first kernel flags word 1 (gated by the gate), the second zeroes.
      std::vector<float> acc = x, vel = base, kacc = x, kvel = base;
      uint32_t cpuGate[2] = {0, 0}, kGate[2] = {0, 0};
      cpu->dropNonFinite(acc.data(), vel.data(), n, cpuGate);
      if (topkGateOpen(kGate)) emulateStride(n, [&](size_t i) { topkFlagNonFinite(kacc.data(), &kGate[1], i); });
      emulateStride(n, [&](size_t i) { topkDropAt(kacc.data(), kvel.data(), kGate, i); });
      CHECK(cpuGate[1] == kGate[1]);
      CHECK(std::memcmp(acc.data(), kacc.data(), n * sizeof(float)) == 0);
      CHECK(vel == kvel);
      CHECK((bad >= 0) == (acc[0] == 0.0f && vel[0] == 0.0f));
      // A closed gate leaves the residual alone on both.
      const uint32_t closed[2] = {1, 0};
      std::vector<float> untouched = x;
      cpu->dropNonFinite(untouched.data(), nullptr, n, const_cast<uint32_t*>(closed));
      CHECK(std::memcmp(untouched.data(), x.data(), n * sizeof(float)) == 0);
      if (bad < 0) break;
    }
  }
  // Clipping: the CPU's clipGradNorm against topkClipCoefficient of the same double sum (the device's sum is
  // another order: kernels_optim.cu's fixed tree) and the kernel's per-element scale.
  for (double limit : {1.0, 50.0, 1e9}) {
    CAPTURE(limit);
    std::vector<float> g = base, kg = base;
    cpu->clip(g.data(), n, limit, kOpen);
    double sum = 0.0;
    for (float v : base) sum += static_cast<double>(v) * static_cast<double>(v);
    const float coef = topkClipCoefficient(sum, limit);
    emulateStride(n, [&](size_t i) { topkClipAt(kg.data(), coef, i); });
    CHECK(g == kg);
    CHECK((limit < 1e9) == (g != base));  // the small limits clip, the huge one does not
    const uint32_t closed[2] = {0, 1};
    std::vector<float> same = base;
    cpu->clip(same.data(), n, limit, closed);
    CHECK(same == base);
  }
}
