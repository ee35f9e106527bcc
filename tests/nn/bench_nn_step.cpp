// bench_nn_step: time of one training step of the 784-256-256-10 MLP (ReLU, cross-entropy) at batch 64 on
// one core, the figure issue 4 sets against Eigen's limit (~0.7 ms forward+backward). Prints forward,
// backward, forward+backward, optimizer step and the whole step, as min and median over repeats.
// Run through scripts/bench/nn_step. Options: --batch N, --iters N, --model FILE (a model JSON instead of
// the MLP; input random, labels 0).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "lib/common/error.h"
#include "lib/nn/loss.h"
#include "lib/nn/model.h"
#include "lib/nn/optimizer.h"

using namespace dtrain;
using namespace dtrain::nn;
using Clock = std::chrono::steady_clock;

namespace {

struct Stats {
  std::vector<double> us;
  void add(Clock::time_point a, Clock::time_point b) {
    us.push_back(std::chrono::duration<double, std::micro>(b - a).count());
  }
  double min() const { return *std::min_element(us.begin(), us.end()); }
  double median() const {
    auto v = us;
    std::nth_element(v.begin(), v.begin() + static_cast<long>(v.size() / 2), v.end());
    return v[v.size() / 2];
  }
};

void print(const char* what, const Stats& s, int batch) {
  std::printf("%-28s min %8.1f us   median %8.1f us   (%.0f samples/s at the median)\n", what, s.min(), s.median(),
              batch / (s.median() * 1e-6));
}

}  // namespace

int main(int argc, char** argv) {
  int batch = 64;
  int iters = 2000;
  std::string modelFile;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--batch") == 0) batch = std::atoi(argv[i + 1]);
    else if (std::strcmp(argv[i], "--iters") == 0) iters = std::atoi(argv[i + 1]);
    else if (std::strcmp(argv[i], "--model") == 0) modelFile = argv[i + 1];
  }
  try {
    ModelSpec spec = modelFile.empty()
                         ? parseModelSpec(nlohmann::json::parse(R"({"input": [784], "layers": [
                               {"type": "linear", "out": 256}, {"type": "relu"},
                               {"type": "linear", "out": 256}, {"type": "relu"},
                               {"type": "linear", "out": 10}]})"),
                                          "bench", "/model")
                         : loadModelSpec(modelFile);
    Model model = Model::build(spec, batch, 42);
    auto loss = Loss::create({LossType::kCrossEntropy}, model.outputShape(), batch);
    OptimizerSpec os;
    os.lr = 0.05;
    os.momentum = 0.9;
    auto opt = Optimizer::create(os, model.numParams());

    std::mt19937 rng(1);
    std::uniform_real_distribution<float> pixel(0.0f, 1.0f);
    std::vector<float> x(static_cast<size_t>(batch * spec.input.numel()));
    for (float& v : x) v = pixel(rng);
    std::vector<int64_t> labels(static_cast<size_t>(batch));
    for (size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<int64_t>(i % model.outputShape().numel());
    TensorView y = TensorView::i64(labels.data(), Shape{batch});

    Stats fwd, bwd, fb, step, whole;
    for (int it = 0; it < iters + iters / 10; ++it) {
      auto t0 = Clock::now();
      TensorView out = model.forward(x.data(), batch, true);
      loss->forward(out, y);
      auto t1 = Clock::now();
      model.backward(loss->backward(), {}, GradMode::kOverwrite);
      auto t2 = Clock::now();
      opt->step(model.params(), model.grads());
      auto t3 = Clock::now();
      if (it < iters / 10) continue;  // warm-up
      fwd.add(t0, t1);
      bwd.add(t1, t2);
      fb.add(t0, t2);
      step.add(t2, t3);
      whole.add(t0, t3);
    }
    std::printf("model: %s  batch %d  %zu parameters  %d iterations, 1 thread\n",
                modelFile.empty() ? "MLP 784-256-256-10 (ReLU, cross-entropy)" : modelFile.c_str(), batch,
                model.numParams(), iters);
    print("forward (+loss)", fwd, batch);
    print("backward", bwd, batch);
    print("forward+backward", fb, batch);
    print("sgd step (momentum 0.9)", step, batch);
    print("whole training step", whole, batch);
    // forward GEMM + weight-gradient GEMM per linear layer, + input-gradient GEMM except for the first layer.
    double flops = 0;
    bool first = true;
    for (const auto& l : spec.layers) {
      if (l.type() != "linear") continue;
      flops += 2.0 * batch * static_cast<double>(l.input[0] * l.out) * (first ? 2.0 : 3.0);
      first = false;
    }
    if (flops > 0) {
      std::printf("linear layers: %.1f GFLOP/s over forward+backward at the minimum\n", flops / (fb.min() * 1e3));
    }
  } catch (const dtrain::Error& e) {
    std::fprintf(stderr, "bench_nn_step: %s\n", e.what());
    return e.exitCode();
  }
  return 0;
}
