// bce_with_logits and the optimizers on the GPU, emulated on the CPU (no GPU needed): every thread of kernels_nn.cu's
// bceKernel and kernels_optim.cu's adagradKernel, sgdKernel and adamKernel runs in a loop over the kernels' real
// launch grids (gridFor(n, 256) blocks of 256, grid-stride), through the functions the kernels call
// (lib/gpu/bce_math.h bceElement, lib/gpu/optim_math.h's elements and step constants), with the host work the CUDA
// loss and optimizers do around them (lib/nn/cuda/loss.cpp, optimizer.cpp), against the CPU loss and optimizers
// (lib/nn/loss.cpp, optimizer.cpp): per-sample losses, gradients, correct counts, AUC histograms and the first bad
// target bit for bit; the optimizers' parameters and state bit for bit, step after step. What this cannot show is the device: its exp/log1p may differ
// from glibc's in the last bit, and it sums the losses in its own order (kernels_optim.cu sumDoubles).
// Compiled with -ffp-contract=off (tests/gpu/CMakeLists.txt): kernels_optim.cu runs with --fmad=false and the CPU
// optimizer with -ffp-contract=off, so neither fuses a multiply-add.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "lib/common/error.h"
#include "lib/common/tensor.h"
#include "lib/gpu/bce_math.h"
#include "lib/gpu/grid.h"
#include "lib/gpu/optim_math.h"
#include "lib/nn/loss.h"
#include "lib/nn/optimizer.h"
#include "tests/gpu/host_values.h"

using namespace dtrain;
using namespace dtrain::gpu;
using namespace dtrain::gputest;
using nlohmann::json;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Equal bits, or both NaN (a NaN's payload depends on the operation that made it, not on the kernel's indexing).
bool sameValue(float a, float b) {
  return std::bit_cast<uint32_t>(a) == std::bit_cast<uint32_t>(b) || (std::isnan(a) && std::isnan(b));
}
bool sameValues(const float* a, const float* b, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (!sameValue(a[i], b[i])) {
      MESSAGE("element " << i << ": " << a[i] << " vs " << b[i]);
      return false;
    }
  return true;
}

// What the CUDA loss gets from one bceWithLogitsRows launch, every thread of bceKernel run on the CPU: the
// per-sample buffers, the histogram the atomicAdds fill and the row the atomicMin leaves (INT32_MAX: none).
struct BceLaunch {
  std::vector<float> diff;
  std::vector<double> rowLoss;
  std::vector<int32_t> rowCorrect;
  std::vector<int64_t> hist;
  int32_t badRow = std::numeric_limits<int32_t>::max();
};

BceLaunch bceKernel(const std::vector<float>& x, const void* targets, kernels::TargetKind kind, bool withDiff,
                    bool withHist) {
  const size_t n = x.size();
  BceLaunch out;
  out.diff.assign(n, kNaN);  // poison: every element must be written
  out.rowLoss.assign(n, std::numeric_limits<double>::quiet_NaN());
  out.rowCorrect.assign(n, -1);
  out.hist.assign(2 * nn::kAucBins, 0);
  gridStride(n, [&](size_t i) {
    const int64_t cell = bceElement(x.data(), targets, kind, i, withDiff ? out.diff.data() : nullptr,
                                    out.rowLoss.data(), withHist ? out.rowCorrect.data() : nullptr, nn::kAucBins);
    if (cell < 0) {
      out.badRow = std::min(out.badRow, static_cast<int32_t>(i));
    } else if (withHist) {
      REQUIRE(cell < 2 * nn::kAucBins);
      ++out.hist[static_cast<size_t>(cell)];
    }
  });
  return out;
}

// The kernel's target kind and the tensor dtype of targets of element type T (float32 values, int32/int64 labels).
template <class T>
constexpr kernels::TargetKind targetKindOf() {
  return std::is_same_v<T, float>     ? kernels::TargetKind::kFloat32
         : std::is_same_v<T, int64_t> ? kernels::TargetKind::kInt64
                                      : kernels::TargetKind::kInt32;
}
template <class T>
constexpr DType dtypeOf() {
  return std::is_same_v<T, float> ? DType::kFloat32 : std::is_same_v<T, int64_t> ? DType::kInt64 : DType::kInt32;
}

// The CUDA loss against the CPU loss for logits x and targets (float32 values, or int32/int64 labels).
template <class T>
void checkBce(const std::vector<float>& x, const std::vector<T>& targets) {
  const kernels::TargetKind kind = targetKindOf<T>();
  const DType dtype = dtypeOf<T>();
  const int64_t n = static_cast<int64_t>(x.size());
  CAPTURE(n);
  CAPTURE(dtypeName(dtype));
  auto cpu = nn::Loss::create({nn::LossType::kBceWithLogits}, Shape{1}, static_cast<int>(n));
  const TensorView out = TensorView::of(x.data(), Shape{n, 1});
  const TensorView tv = TensorView::flat(targets.data(), static_cast<size_t>(n), dtype, Device::cpu());

  // forward: the kernel with diff, then the mean of rowLoss (summed here in the CPU's order: the device's
  // sumDoubles sums the same values in its own).
  const float loss = cpu->forward(out, tv);
  const BceLaunch fwd = bceKernel(x, targets.data(), kind, true, false);
  REQUIRE(fwd.badRow == std::numeric_limits<int32_t>::max());
  double sum = 0;
  for (double v : fwd.rowLoss) sum += v;
  CHECK(sameValue(loss, static_cast<float>(sum / static_cast<double>(n))));
  // backward: kernels::scale(diff, scale / n), one thread per element.
  for (float scale : {1.0f, 0.25f}) {
    const TensorView grad = cpu->backward(scale);
    std::vector<float> g(fwd.diff.size());
    const float factor = scale / static_cast<float>(n);
    gridStride(g.size(), [&](size_t i) { g[i] = fwd.diff[i] * factor; });
    CHECK(sameValues(grad.f32(), g.data(), g.size()));
  }
  // evaluate: the kernel with the correct flags and the histograms, no diff.
  const nn::EvalSums s = cpu->evaluate(out, tv);
  const BceLaunch ev = bceKernel(x, targets.data(), kind, false, true);
  CHECK(std::all_of(ev.diff.begin(), ev.diff.end(), [](float d) { return std::isnan(d); }));  // not written
  double evalSum = 0;
  int64_t correct = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    evalSum += ev.rowLoss[i];
    correct += ev.rowCorrect[i];
    CHECK(std::bit_cast<uint64_t>(ev.rowLoss[i]) == std::bit_cast<uint64_t>(fwd.rowLoss[i]));
  }
  CHECK((std::isnan(s.lossSum) ? std::isnan(evalSum) : s.lossSum == evalSum));
  CHECK(s.correct == correct);
  REQUIRE(s.aucHist.size() == ev.hist.size());
  for (size_t b = 0; b < ev.hist.size(); ++b) {
    CAPTURE(b);
    CHECK(s.aucHist[b] == static_cast<double>(ev.hist[b]));
  }
}

// A batch with one or more targets outside their domain: the kernel's smallest bad row is the one the CPU
// loss names first, its outputs are zeros, and the other rows are computed as usual.
template <class T>
void checkBadTargets(const std::vector<float>& x, const std::vector<T>& targets, int32_t firstBad,
                     const std::string& cpuMessage) {
  const kernels::TargetKind kind = targetKindOf<T>();
  const DType dtype = dtypeOf<T>();
  const int64_t n = static_cast<int64_t>(x.size());
  auto cpu = nn::Loss::create({nn::LossType::kBceWithLogits}, Shape{1}, static_cast<int>(n));
  const TensorView tv = TensorView::flat(targets.data(), static_cast<size_t>(n), dtype, Device::cpu());
  CHECK_THROWS_WITH_AS(cpu->forward(TensorView::of(x.data(), Shape{n, 1}), tv), doctest::Contains(cpuMessage.c_str()),
                       ConfigError);
  for (bool hist : {false, true}) {
    const BceLaunch k = bceKernel(x, targets.data(), kind, !hist, hist);
    CHECK(k.badRow == firstBad);
    CHECK(k.rowLoss[static_cast<size_t>(firstBad)] == 0.0);
    int64_t unwritten = 0, counted = 0;
    for (double v : k.rowLoss) unwritten += std::isnan(v) ? 1 : 0;
    for (int64_t c : k.hist) counted += c;
    CHECK(unwritten == 0);  // every row written (the logits are finite)
    if (hist) {
      CHECK(k.rowCorrect[static_cast<size_t>(firstBad)] == 0);
      CHECK(counted < n);  // bad rows are not counted
    } else {
      CHECK(k.diff[static_cast<size_t>(firstBad)] == 0.0f);
    }
  }
}

}  // namespace

TEST_CASE("emulated CUDA bce_with_logits (every thread of bceKernel) equals the CPU loss bit for bit") {
  // Batches below, at and above one block of 256 threads; logits and targets random.
  for (size_t n : {size_t{1}, size_t{7}, size_t{256}, size_t{700}}) {
    const std::vector<float> x = randomVector(n, 11, -6.0f, 6.0f);
    std::vector<int32_t> l32(n);
    std::vector<int64_t> l64(n);
    std::vector<float> tf = randomVector(n, 12, 0.0f, 1.0f);
    for (size_t i = 0; i < n; ++i) l32[i] = static_cast<int32_t>((i * 7 + 3) % 5 < 2 ? 1 : 0), l64[i] = l32[i];
    checkBce(x, l32);
    checkBce(x, l64);
    checkBce(x, tf);
  }
  // Extreme logits: saturated sigmoids (0 and 1 in double, so the first and the last, closed, AUC bin), exp's
  // overflow in the stable form, +-0, denormals, the largest floats, infinities and NaN (its loss and gradient NaN,
  // bin 0, counted wrong), each with both labels and with float targets at 0, 1 and in between.
  const float tiny = std::numeric_limits<float>::denorm_min(), big = std::numeric_limits<float>::max();
  const std::vector<float> extremes = {0.0f, -0.0f, tiny, -tiny, 1e-30f, -1e-30f, 17.0f, -17.0f, 36.8f, -36.8f,
                                       40.0f, -40.0f, 88.7f, -88.7f, 100.0f, -100.0f, 745.2f, -745.2f, 1e30f,
                                       -1e30f, big, -big, kInf, -kInf, kNaN};
  std::vector<float> x;
  std::vector<int32_t> l32;
  std::vector<float> tf;
  for (float v : extremes)
    for (int label : {0, 1}) {
      x.push_back(v);
      l32.push_back(label);
      tf.push_back(static_cast<float>(label));
    }
  for (float v : extremes)
    for (float t : {0.5f, 0.25f, 1e-8f}) {
      x.push_back(v);
      l32.push_back(t > 0.3f ? 1 : 0);
      tf.push_back(t);
    }
  checkBce(x, l32);
  checkBce(x, tf);
  // Logits whose sigmoid lands on or next to a bin edge (s * 4096 an integer or a few ulps off).
  std::vector<float> edges;
  for (int b : {1, 2, 1024, 2048, 3000, 4094, 4095})
    for (float d : {-1e-6f, 0.0f, 1e-6f}) {
      const double s = b / 4096.0;
      edges.push_back(static_cast<float>(std::log(s / (1.0 - s))) + d);
    }
  checkBce(edges, std::vector<int64_t>(edges.size(), 1));
  checkBce(edges, std::vector<int64_t>(edges.size(), 0));
}

TEST_CASE("emulated CUDA bce_with_logits: the first bad target is the CPU's, its row zeroed, over the whole grid") {
  // Bad rows in two blocks: the smallest (not the first thread to run) is the one reported.
  std::vector<float> x = randomVector(600, 13);
  std::vector<float> tf = randomVector(600, 14, 0.0f, 1.0f);
  tf[300] = 1.5f;
  tf[3] = kNaN;
  tf[599] = -0.25f;
  checkBadTargets(x, tf, 3, "bce_with_logits target nan outside [0, 1]");
  tf[3] = 0.5f;
  checkBadTargets(x, tf, 300, "bce_with_logits target 1.5 outside [0, 1]");
  std::vector<int32_t> l32(600, 1);
  l32[257] = 2;
  l32[400] = -1;
  checkBadTargets(x, l32, 257, "bce_with_logits label 2 (expected 0 or 1)");
  std::vector<int64_t> l64(600, 0);
  l64[599] = int64_t{1} << 40;  // would be 0 in 32 bits
  checkBadTargets(x, l64, 599, "bce_with_logits label 1099511627776 (expected 0 or 1)");
}

namespace {

// The CUDA Adagrad (lib/nn/cuda/optimizer.cpp) emulated: its state "sum" filled with initial_accumulator_value
// (kernels::fill), then per step the constants adagradStepFor gives and every thread of adagradKernel's grid.
struct EmulatedAdagrad {
  nn::OptimizerSpec spec;
  std::vector<float> sum;
  int64_t steps = 0;
  double lr;
  EmulatedAdagrad(const nn::OptimizerSpec& s, size_t n)
      : spec(s), sum(n, static_cast<float>(s.initialAccumulator)), lr(s.lr) {}
  void step(std::vector<float>& p, const std::vector<float>& g) {
    ++steps;
    const kernels::AdagradStep s = adagradStepFor(lr, spec.lrDecay, steps, spec.weightDecay, spec.eps);
    gridStride(p.size(), [&](size_t i) { adagradElement(p.data(), g.data(), sum.data(), i, s); });
  }
};

void checkAdagrad(const json& optimizer, size_t n) {
  CAPTURE(optimizer.dump());
  CAPTURE(n);
  const nn::OptimizerSpec spec = nn::parseOptimizerSpec(optimizer, "job.json");
  auto cpu = nn::Optimizer::create(spec, n);
  EmulatedAdagrad gpu(spec, n);
  std::vector<float> p = randomVector(n, 21), q = p;
  for (int step = 0; step < 6; ++step) {
    CAPTURE(step);
    if (step == 3) {  // a schedule's new rate, set on both
      cpu->setLr(spec.lr * 0.3);
      gpu.lr = spec.lr * 0.3;
    }
    std::vector<float> g = randomVector(n, 30 + static_cast<uint32_t>(step), -2.0f, 2.0f);
    // Zero gradients (sum unchanged: with no accumulator yet 0 / eps), huge ones (g^2 overflows to inf: the
    // update is then 0 * -clr or inf / inf), a tiny one (g^2 underflows) and a NaN (it spreads to p and sum).
    if (n > 5) {
      g[0] = 0.0f, g[1] = -0.0f, g[2] = 1e20f, g[3] = -3e19f, g[4] = 1e-30f;
      if (step == 4) g[5] = kNaN;
    }
    cpu->step(p, g);
    gpu.step(q, g);
    CHECK(sameValues(p.data(), q.data(), n));
    const std::vector<nn::StateBuffer> state = cpu->stateBuffers();
    REQUIRE(state.size() == 1);
    CHECK(state[0].name == "sum");
    CHECK(sameValues(state[0].data.data(), gpu.sum.data(), n));
  }
  CHECK(cpu->steps() == gpu.steps);
}

}  // namespace

TEST_CASE("emulated CUDA adagrad (every thread of adagradKernel) equals the CPU optimizer bit for bit") {
  for (size_t n : {size_t{1}, size_t{300}, size_t{1031}}) {
    checkAdagrad({{"type", "adagrad"}}, n);  // torch's defaults: lr 1e-2, eps 1e-10, no decay, accumulator 0
    checkAdagrad({{"type", "adagrad"}, {"lr", 0.1}, {"lr_decay", 0.05}, {"weight_decay", 0.1},
                  {"initial_accumulator_value", 0.5}, {"eps", 1e-3}},
                 n);
    checkAdagrad({{"type", "adagrad"}, {"lr", 0.5}, {"weight_decay", 1e-4}, {"eps", 1e-30}}, n);  // eps below g^2
    checkAdagrad({{"type", "adagrad"}, {"lr", 3.0}, {"lr_decay", 1.0}, {"eps", 10.0}}, n);  // eps above sqrt(sum)
  }
  // The step constants: clr = lr / (1 + (step - 1) lr_decay) in double, rounded once.
  const kernels::AdagradStep s = adagradStepFor(0.1, 0.5, 3, 0.01, 1e-10);
  CHECK(s.negClr == static_cast<float>(-(0.1 / 2.0)));
  CHECK(s.weightDecay == 0.01f);
  CHECK(s.eps == 1e-10f);
  CHECK(adagradStepFor(0.1, 0.5, 1, 0, 1e-10).negClr == -0.1f);  // the first step is undecayed
}

namespace {

// The pieces of [0, n) the CUDA Adam launches one kernel each for (Optimizer::forEachDecaySegment over
// setNoDecayRanges' [offset, offset + count) ranges): begin, end, weight decay on.
struct Segment {
  size_t begin, end;
  bool decayOn;
};
std::vector<Segment> decaySegments(size_t n, const std::vector<std::pair<size_t, size_t>>& noDecay) {
  std::vector<Segment> out;
  size_t at = 0;
  for (const auto& [offset, count] : noDecay) {
    out.push_back({at, offset, true});
    out.push_back({offset, offset + count, false});
    at = offset + count;
  }
  out.push_back({at, n, true});
  return out;
}

// SGD and Adam/AdamW against the CPU optimizers: `steps` updates, parameters and every state buffer compared bit for
// bit after each, the CUDA optimizers' constants (sgdStepFor / adamStepFor) and every thread of sgdKernel /
// adamKernel (one launch per decay segment for Adam) emulated.
void checkSgdAdam(const json& optimizer, size_t n, const std::vector<std::pair<size_t, size_t>>& noDecay = {}) {
  CAPTURE(optimizer.dump());
  CAPTURE(n);
  const nn::OptimizerSpec spec = nn::parseOptimizerSpec(optimizer, "job.json");
  auto cpu = nn::Optimizer::create(spec, n);
  if (!noDecay.empty()) cpu->setNoDecayRanges(noDecay);
  const bool sgd = spec.type == nn::OptimizerType::kSgd;
  std::vector<float> p = randomVector(n, 41), q = p;
  std::vector<float> buf(n, 0.0f), m(n, 0.0f), v(n, 0.0f), vmax(n, 0.0f);
  double lr = spec.lr;
  for (int64_t step = 1; step <= 6; ++step) {
    CAPTURE(step);
    if (step == 4) {  // a schedule's new rate
      lr = spec.lr * 0.25;
      cpu->setLr(lr);
    }
    std::vector<float> g = randomVector(n, 50 + static_cast<uint32_t>(step), -3.0f, 3.0f);
    if (n > 4) g[0] = 0.0f, g[1] = -0.0f, g[2] = 1e19f, g[3] = 1e-30f;
    cpu->step(p, g);
    if (sgd) {
      const kernels::SgdStep s =
          sgdStepFor(lr, spec.momentum, spec.dampening, spec.nesterov, spec.weightDecay, step == 1);
      float* b = spec.momentum != 0 ? buf.data() : nullptr;
      gridStride(n, [&](size_t i) { sgdElement(q.data(), g.data(), b, i, s); });
    } else {
      kernels::AdamStep s = adamStepFor(spec.type == nn::OptimizerType::kAdamW, lr, spec.beta1, spec.beta2, spec.eps,
                                        spec.weightDecay, step);
      for (const Segment& seg : decaySegments(n, noDecay)) {
        if (seg.end <= seg.begin) continue;
        s.applyDecay = seg.decayOn && spec.weightDecay != 0.0;
        const size_t o = seg.begin;
        gridStride(seg.end - seg.begin, [&](size_t i) {
          adamElement(q.data() + o, g.data() + o, m.data() + o, v.data() + o, spec.amsgrad ? vmax.data() + o : nullptr,
                      i, s);
        });
      }
    }
    CHECK(sameValues(p.data(), q.data(), n));
    for (const nn::StateBuffer& b : cpu->stateBuffers()) {
      CAPTURE(b.name);
      const std::vector<float>& mine = b.name == "momentum_buffer" ? buf
                                       : b.name == "exp_avg"        ? m
                                       : b.name == "exp_avg_sq"     ? v
                                                                    : vmax;
      CHECK(sameValues(b.data.data(), mine.data(), n));
    }
  }
}

}  // namespace

TEST_CASE("emulated CUDA sgd and adam/adamw (every thread of their kernels) equal the CPU optimizers bit for bit") {
  for (size_t n : {size_t{1}, size_t{300}, size_t{1031}}) {
    checkSgdAdam({{"type", "sgd"}, {"lr", 0.1}}, n);
    checkSgdAdam({{"type", "sgd"}, {"lr", 0.05}, {"momentum", 0.9}, {"dampening", 0.1}, {"weight_decay", 0.01}}, n);
    checkSgdAdam({{"type", "sgd"}, {"lr", 0.05}, {"momentum", 0.8}, {"nesterov", true}, {"weight_decay", 1e-3}}, n);
    checkSgdAdam({{"type", "adam"}}, n);
    checkSgdAdam({{"type", "adam"}, {"lr", 0.01}, {"betas", {0.8, 0.99}}, {"weight_decay", 0.1}, {"amsgrad", true}},
                 n);
    checkSgdAdam({{"type", "adamw"}, {"lr", 3e-3}, {"eps", 1e-6}}, n);
    checkSgdAdam({{"type", "adamw"}, {"lr", 3e-3}, {"weight_decay", 0.1}, {"amsgrad", true}}, n);
  }
  // Parameter groups (weight_decay_on: matrices): no decay inside the ranges, one launch per segment.
  checkSgdAdam({{"type", "adamw"}, {"lr", 1e-2}, {"weight_decay", 0.1}}, 1031, {{0, 10}, {300, 257}, {1000, 31}});
  checkSgdAdam({{"type", "adam"}, {"lr", 1e-2}, {"weight_decay", 0.1}, {"amsgrad", true}}, 1031, {{5, 500}});
}
