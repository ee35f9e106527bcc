// PowerSGD's device work emulated on the CPU (no GPU needed; compiled with -ffp-contract=off like the CPU hook's
// operations and the kernels' --fmad=false):
// - the Gram-Schmidt kernel (kernels_powersgd.cu): every thread of its one block runs powersgd_math.h's lane loop,
//   the tree runs level by level as between the kernel's barriers, and the result must be the CPU hook's
//   (nn::gramSchmidt, lib/nn/powersgd_ops.h) bit for bit, on shapes below, at and above the block's 256 lanes, with
//   a zero column (the epsilon) and nearly dependent columns; the batched launch (a bucket's matrices, a block each,
//   the list in the kernel's parameters) block by block against the per-matrix kernel and nn::gramSchmidt, bit for
//   bit, and its split of a long list into launches;
// - the three cuBLAS products: the GEMM arguments the GPU operations pass (projectGemm, backProjectGemm,
//   decompressGemm) through blas.cpp's column-major mapping and the reference GEMM, against the CPU operations'
//   loops, within float rounding;
// - the error-feedback kernels' per-element work, and the finiteness gate's (Q's restart, the gated residual),
//   against the CPU operations, bit for bit.
// What this cannot show is the device itself: tests/gpu/test_gpu_compression.cpp runs the hook on a GPU.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "lib/gpu/powersgd_math.h"
#include "lib/nn/powersgd_ops.h"
#include "tests/gpu/gemm_reference.h"

using namespace dtrain;
using namespace dtrain::gpu;

namespace {

std::vector<float> randomValues(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(gen);
  return v;
}

// The kernel's block over pt [r, n], thread by thread: each sum's lane partials (thread l's loop), the tree level by
// level (a level's threads between two barriers), then every thread's share of the scaling and the subtraction.
void gramSchmidtBlock(float* pt, int r, size_t n) {
  double shared[kGramSchmidtLanes];
  auto blockSum = [&](const float* a, const float* b) {
    for (int l = 0; l < kGramSchmidtLanes; ++l) shared[l] = gsLanePartial(a, b, n, l);
    for (int s = kGramSchmidtLanes / 2; s > 0; s /= 2)
      for (int l = 0; l < kGramSchmidtLanes; ++l) gsTreeStep(shared, l, s);
    return shared[0];
  };
  for (int c = 0; c < r; ++c) {
    float* col = pt + static_cast<size_t>(c) * n;
    const float inv = gsInverse(blockSum(col, col));
    for (int l = 0; l < kGramSchmidtLanes; ++l)
      for (size_t i = static_cast<size_t>(l); i < n; i += kGramSchmidtLanes) col[i] = col[i] * inv;
    for (int d = c + 1; d < r; ++d) {
      float* rest = pt + static_cast<size_t>(d) * n;
      const auto f = static_cast<float>(blockSum(col, rest));
      for (int l = 0; l < kGramSchmidtLanes; ++l)
        for (size_t i = static_cast<size_t>(l); i < n; i += kGramSchmidtLanes) rest[i] = gsSubtract(rest[i], f, col[i]);
    }
  }
}

}  // namespace

TEST_CASE("PowerSGD's Gram-Schmidt kernel, thread by thread, is the CPU hook's bit for bit") {
  struct Shape {
    size_t rows;
    int rank;
  };
  for (const Shape s : {Shape{1, 1}, Shape{7, 3}, Shape{255, 2}, Shape{256, 4}, Shape{257, 4}, Shape{3000, 8},
                        Shape{50257, 2}}) {
    CAPTURE(s.rows);
    CAPTURE(s.rank);
    std::vector<float> p = randomValues(s.rows * static_cast<size_t>(s.rank), s.rows * 31 + static_cast<size_t>(s.rank), 3.0f);
    if (s.rank >= 3) {
      // A zero column (a layer without gradient: stays zero by the epsilon) and a column nearly equal to column 0.
      std::fill(p.begin() + static_cast<ptrdiff_t>(s.rows), p.begin() + static_cast<ptrdiff_t>(2 * s.rows), 0.0f);
      for (size_t i = 0; i < s.rows; ++i) p[2 * s.rows + i] = p[i] * 1.001f + 1e-4f;
    }
    std::vector<float> cpu = p, gpu = p;
    nn::gramSchmidt(cpu.data(), s.rank, s.rows);
    gramSchmidtBlock(gpu.data(), s.rank, s.rows);
    REQUIRE(std::memcmp(cpu.data(), gpu.data(), cpu.size() * sizeof(float)) == 0);
    // And it orthonormalises: unit columns (zero ones stay zero), orthogonal pairs.
    for (int c = 0; c < s.rank; ++c) {
      for (int d = c; d < s.rank; ++d) {
        double dot = 0;
        for (size_t i = 0; i < s.rows; ++i) dot += double(cpu[c * s.rows + i]) * cpu[d * s.rows + i];
        const bool zero = s.rank >= 3 && (c == 1 || d == 1);
        // After the nearly dependent column (2) float rounding shows: modified Gram-Schmidt loses orthogonality there.
        CHECK(std::fabs(dot - (c == d && !zero ? 1.0 : 0.0)) < (s.rank >= 3 && d >= 2 ? 1e-2 : 1e-4));
      }
    }
  }
}

TEST_CASE("PowerSGD's Gram-Schmidt sums in the kernel's lane order where the order decides the result") {
  // Column 1 holds +1e20 and -1e20 in lane 0 (elements 0 and 256) and 1 in lane 1: summed element by element the 1 is
  // lost beside 1e20 (the dot product with the all-ones column 0 comes out 0); by lanes it survives (lane 0 cancels
  // to 0, lane 1 keeps it). The kernel's order is the lanes', and so must the CPU hook's be.
  const size_t n = 512;
  std::vector<float> p(2 * n, 0.0f);
  std::fill(p.begin(), p.begin() + n, 1.0f);
  p[n + 0] = 1e20f;
  p[n + 1] = 1.0f;
  p[n + 256] = -1e20f;
  std::vector<float> cpu = p, gpu = p;
  nn::gramSchmidt(cpu.data(), 2, n);
  gramSchmidtBlock(gpu.data(), 2, n);
  REQUIRE(std::memcmp(cpu.data(), gpu.data(), cpu.size() * sizeof(float)) == 0);
  const float col0 = cpu[0];
  CHECK(col0 == doctest::Approx(1.0 / std::sqrt(512.0)));
  // The dot product was col0 (the 1 survived), so element 2 of column 1 (0 before) became -col0 * col0 before scaling.
  CHECK(cpu[n + 2] != 0.0f);
}

TEST_CASE("PowerSGD's three GEMMs, mapped for cuBLAS and run by the reference GEMM, equal the CPU hook's products") {
  auto cpu = nn::makePowerSgdOps(Device::cpu());
  struct Dims {
    int64_t rows, cols;
    int rank;
  };
  for (const Dims d : {Dims{30, 40, 2}, Dims{768, 64, 4}, Dims{17, 301, 1}, Dims{64, 2304, 8}}) {
    CAPTURE(d.rows);
    CAPTURE(d.cols);
    CAPTURE(d.rank);
    const auto rows = static_cast<size_t>(d.rows), cols = static_cast<size_t>(d.cols), r = static_cast<size_t>(d.rank);
    std::vector<float> m = randomValues(rows * cols, 1), qt = randomValues(r * cols, 2), pt(r * rows);
    // The CPU's loops.
    nn::LowRankFactors f{.m = m.data(), .pt = pt.data(), .qt = qt.data(), .rows = d.rows, .cols = d.cols, .rank = d.rank};
    cpu->project(f);
    std::vector<float> cpuP = pt;
    // cuBLAS's arguments (B first), through the reference.
    auto run = [](const RowMajorGemm& g, const float* a, const float* b, float* c) {
      REQUIRE(badLeadingDimension(g) == nullptr);
      referenceColumnMajor(toColumnMajor(g), 1.0f, b, a, 0.0f, c);
    };
    auto near = [](const std::vector<float>& want, const std::vector<float>& got, double scale) {
      REQUIRE(want.size() == got.size());
      for (size_t i = 0; i < want.size(); ++i) {
        CAPTURE(i);
        REQUIRE(std::fabs(double(want[i]) - got[i]) <= 1e-5 * scale);
      }
    };
    std::vector<float> gpuP(r * rows, -1.0f);
    run(projectGemm(d.rows, d.cols, d.rank), qt.data(), m.data(), gpuP.data());
    near(cpuP, gpuP, std::sqrt(double(cols)) * 4);
    nn::gramSchmidt(pt.data(), d.rank, rows);
    cpu->backProject(f);
    std::vector<float> cpuQ = qt, gpuQ(r * cols, -1.0f);
    run(backProjectGemm(d.rows, d.cols, d.rank), pt.data(), m.data(), gpuQ.data());
    near(cpuQ, gpuQ, 4);
    std::vector<float> gpuM(rows * cols, -1.0f);
    run(decompressGemm(d.rows, d.cols, d.rank), pt.data(), qt.data(), gpuM.data());
    cpu->decompress(f);  // overwrites m
    near(m, gpuM, 4);
  }
}

TEST_CASE("PowerSGD's error-feedback kernels, element by element, are the CPU hook's bit for bit") {
  const size_t n = 1000;
  const std::vector<float> g0 = randomValues(n, 5), e0 = randomValues(n, 6, 1e-3f), approx = randomValues(n, 7);
  auto cpu = nn::makePowerSgdOps(Device::cpu());
  std::vector<float> cg = g0, cin(n), ce = e0, kg = g0, kin(n), ke = e0;
  cpu->accumulate(cg.data(), ce.data(), cin.data(), n);
  for (size_t i = 0; i < n; ++i) efAccumulate(kg.data(), ke.data(), kin.data(), i);  // one thread per element
  CHECK(std::memcmp(cg.data(), kg.data(), n * sizeof(float)) == 0);
  CHECK(std::memcmp(cin.data(), kin.data(), n * sizeof(float)) == 0);
  for (size_t i = 0; i < n; ++i) CHECK(cg[i] == g0[i] + e0[i]);
  cpu->residual(ce.data(), cin.data(), approx.data(), n, nullptr);
  for (size_t i = 0; i < n; ++i) efResidual(ke.data(), kin.data(), approx.data(), i);
  CHECK(std::memcmp(ce.data(), ke.data(), n * sizeof(float)) == 0);
  for (size_t i = 0; i < n; ++i) CHECK(ce[i] == cin[i] - approx[i]);
}

namespace {

// The batched kernel (kernels_powersgd.cu's gramSchmidtKernel) over a list: gsNextBatch's launches, each launch's
// blocks in reverse order (the blocks are independent: any order must give the same bits), block b running the
// single matrix's block over matrices[b]. Returns the launches made.
int gramSchmidtLaunches(const std::vector<GsMatrix>& list) {
  int launches = 0;
  GsBatch batch;
  for (size_t next = 0; next < list.size();) {
    next = gsNextBatch(list.data(), list.size(), next, batch);
    if (batch.count == 0) break;
    ++launches;
    for (int b = batch.count - 1; b >= 0; --b) {
      const GsMatrix& m = batch.matrices[b];
      gramSchmidtBlock(m.pt, m.rank, static_cast<size_t>(m.rows));
    }
  }
  return launches;
}

struct GsShape {
  int64_t rows;
  int rank;
  bool degenerate;  // a zero column and a column nearly dependent on column 0 (rank >= 3)
};

// The shapes' P factors one after the other in one buffer (as a bucket's in the hook's P), filled with random values;
// their descriptors in `list`.
std::vector<float> packedFactors(const std::vector<GsShape>& shapes, std::vector<GsMatrix>& list, uint64_t seed) {
  size_t total = 0;
  for (const GsShape& s : shapes) total += static_cast<size_t>(s.rows) * static_cast<size_t>(std::max(s.rank, 0));
  std::vector<float> p = randomValues(total, seed, 3.0f);
  size_t at = 0;
  for (const GsShape& s : shapes) {
    const auto rows = static_cast<size_t>(s.rows);
    float* pt = p.data() + at;
    if (s.degenerate && s.rank >= 3) {
      std::fill(pt + rows, pt + 2 * rows, 0.0f);
      for (size_t i = 0; i < rows; ++i) pt[2 * rows + i] = pt[i] * 1.001f + 1e-4f;
    }
    list.push_back({.pt = pt, .rows = s.rows, .rank = s.rank});
    at += rows * static_cast<size_t>(std::max(s.rank, 0));
  }
  return p;  // moved: the pointers stay valid
}

}  // namespace

TEST_CASE("PowerSGD's batched Gram-Schmidt launch, block by block, equals the per-matrix kernel and the CPU bit for bit") {
  // One bucket's P factors of mixed shapes: rank 1, below/at/above the block's 256 lanes, a zero column and a nearly
  // dependent one, rank above rows (the plan clamps it; the kernel must not care), and matrices without work (rank 0,
  // no rows) that the single launch skipped.
  const std::vector<GsShape> shapes = {{1, 1, false},    {7, 3, true},     {255, 2, false}, {256, 4, true},
                                       {0, 2, false},    {257, 4, false},  {40, 1, false},  {2, 4, false},
                                       {3000, 8, true},  {16, 0, false},   {24, 2, false},  {24, 2, false},
                                       {50257, 2, false}, {5, 5, true}};
  std::vector<GsMatrix> list;
  const std::vector<float> p = packedFactors(shapes, list, 17);
  // Per matrix: the single-matrix kernel's block (the launch before batching) and the CPU hook's nn::gramSchmidt.
  std::vector<float> single = p, cpu = p, batched = p;
  auto rebase = [&](std::vector<float>& to, const GsMatrix& m) { return to.data() + (m.pt - p.data()); };
  for (const GsMatrix& m : list) {
    if (m.rank <= 0 || m.rows <= 0) continue;  // the single launch's guard
    gramSchmidtBlock(rebase(single, m), m.rank, static_cast<size_t>(m.rows));
    nn::gramSchmidt(rebase(cpu, m), m.rank, static_cast<size_t>(m.rows));
  }
  REQUIRE(std::memcmp(single.data(), cpu.data(), p.size() * sizeof(float)) == 0);
  std::vector<GsMatrix> onBatched = list;
  for (GsMatrix& m : onBatched) m.pt = rebase(batched, m);
  CHECK(gramSchmidtLaunches(onBatched) == 1);
  CHECK(std::memcmp(batched.data(), single.data(), p.size() * sizeof(float)) == 0);
  // The CPU operations take the same list in one call: the per-matrix bits.
  std::vector<float> ops = p;
  std::vector<nn::LowRankFactors> factors;
  for (const GsMatrix& m : list) factors.push_back({.pt = rebase(ops, m), .rows = m.rows, .rank = m.rank});
  nn::makePowerSgdOps(Device::cpu())->orthogonalise(factors);
  CHECK(std::memcmp(ops.data(), cpu.data(), p.size() * sizeof(float)) == 0);
}

TEST_CASE("PowerSGD's batched Gram-Schmidt splits a long list into launches of at most 128 matrices, each once") {
  // 300 small matrices (a deep model's bucket) with an empty one every 50th: 3 launches (128, 128, 38 with work),
  // every matrix with work in exactly one, in list order.
  std::vector<GsShape> shapes;
  for (int i = 0; i < 300; ++i) shapes.push_back({i % 50 == 49 ? 0 : 3 + i % 7, 1 + i % 3, false});
  std::vector<GsMatrix> list;
  const std::vector<float> p = packedFactors(shapes, list, 23);
  std::vector<const float*> covered;
  GsBatch batch;
  int launches = 0;
  for (size_t next = 0; next < list.size();) {
    next = gsNextBatch(list.data(), list.size(), next, batch);
    if (batch.count == 0) break;
    ++launches;
    CHECK(batch.count <= kGramSchmidtBatch);
    for (int b = 0; b < batch.count; ++b) covered.push_back(batch.matrices[b].pt);
  }
  std::vector<const float*> want;
  for (const GsMatrix& m : list)
    if (m.rows > 0 && m.rank > 0) want.push_back(m.pt);
  CHECK(want.size() == 294);
  CHECK(launches == 3);
  CHECK(covered == want);
  // And the bits: the batched launches against the CPU hook's matrix by matrix.
  std::vector<float> cpu = p, batched = p;
  std::vector<GsMatrix> onBatched = list;
  for (GsMatrix& m : onBatched) m.pt = batched.data() + (m.pt - p.data());
  CHECK(gramSchmidtLaunches(onBatched) == 3);
  for (const GsMatrix& m : list)
    if (m.rows > 0 && m.rank > 0) nn::gramSchmidt(cpu.data() + (m.pt - p.data()), m.rank, static_cast<size_t>(m.rows));
  CHECK(std::memcmp(batched.data(), cpu.data(), p.size() * sizeof(float)) == 0);
}

TEST_CASE("PowerSGD's finiteness gate, thread by thread, decides as the CPU operations (restart Q, keep the residual)") {
  // The kernels: the gate cleared, psgdFlagNonFinite over Q then g (one thread per element), psgdRestart and
  // psgdGatedResidual per element. The CPU operations: the CPU hook's allFinite checks. Same gate, same bits.
  const size_t nq = 300, ng = 1000;
  const std::vector<float> q0 = randomValues(nq, 31), initial = randomValues(nq, 32), g0 = randomValues(ng, 33),
                           in0 = randomValues(ng, 34), e0 = randomValues(ng, 35, 1e-3f);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  struct Case {
    const char* name;
    size_t qAt, gAt;  // where a bad value goes (npos: none)
    float bad;
    bool feedback;
  };
  constexpr size_t kNone = static_cast<size_t>(-1);
  for (const Case c : {Case{"finite", kNone, kNone, 0.0f, true}, Case{"NaN in Q", 7, kNone, nan, true},
                       Case{"inf in g", kNone, ng - 1, inf, true}, Case{"-inf in both", 0, 500, -inf, true},
                       Case{"NaN in g, no error feedback", kNone, 3, nan, false},
                       Case{"largest finite float", 299, 999, 3.4028235e38f, true}}) {
    CAPTURE(c.name);
    std::vector<float> q = q0, g = g0;
    if (c.qAt != kNone) q[c.qAt] = c.bad;
    if (c.gAt != kNone) g[c.gAt] = c.bad;
    const size_t n = c.feedback ? ng : 0;
    // The CPU operations.
    auto cpu = nn::makePowerSgdOps(Device::cpu());
    uint32_t cpuGate[2] = {7, 7};
    std::vector<float> cq = q, ce = e0;
    cpu->checkFinite(cpuGate, cq.data(), nq, c.feedback ? g.data() : nullptr, n);
    cpu->restart(cq.data(), initial.data(), nq, cpuGate);
    if (c.feedback) cpu->residual(ce.data(), in0.data(), g.data(), ng, cpuGate);
    // The kernels, thread by thread.
    uint32_t gate[2] = {0, 0};  // cudaMemsetAsync
    for (size_t i = 0; i < nq + n; ++i) psgdFlagNonFinite(q.data(), nq, g.data(), gate, i);
    std::vector<float> kq = q, ke = e0;
    for (size_t i = 0; i < nq; ++i) psgdRestart(kq.data(), initial.data(), gate, i);
    if (c.feedback)
      for (size_t i = 0; i < ng; ++i) psgdGatedResidual(ke.data(), in0.data(), g.data(), gate, i);
    CHECK(gate[0] == cpuGate[0]);
    CHECK(gate[1] == cpuGate[1]);
    const bool qBad = c.qAt != kNone && !std::isfinite(c.bad), gBad = c.feedback && c.gAt != kNone && !std::isfinite(c.bad);
    CHECK(gate[0] == (qBad ? 1u : 0u));
    CHECK(gate[1] == (gBad ? 1u : 0u));
    CHECK(std::memcmp(kq.data(), cq.data(), nq * sizeof(float)) == 0);
    CHECK(std::memcmp(ke.data(), ce.data(), ng * sizeof(float)) == 0);
    // What the hook relies on: Q restarted exactly when it held a non-finite value; the residual updated exactly
    // when the result was finite.
    CHECK(std::memcmp(kq.data(), (qBad ? initial : q).data(), nq * sizeof(float)) == 0);
    if (c.feedback) {
      std::vector<float> want = e0;
      if (!gBad)
        for (size_t i = 0; i < ng; ++i) want[i] = in0[i] - g[i];
      CHECK(std::memcmp(ke.data(), want.data(), ng * sizeof(float)) == 0);
    }
  }
}
