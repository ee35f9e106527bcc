// Not a test: scripts/bench/gpt runs it. One core's float32 GEMM throughput through Eigen (what lib/nn's layers
// call), at the shapes of configs/gpt_fortunes.json's step (batch 16 x 128 positions = 2048 rows, width 128) and a
// large square one, as GFLOP/s (2*M*N*K per product), best of --iters repeats. The ceiling the GPT's own
// GFLOP/s is compared against.
#include <Eigen/Core>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

double bestSeconds(int iters, const auto& fn) {
  double best = 1e30;
  for (int i = 0; i < iters; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 20;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--iters") == 0) iters = std::atoi(argv[i + 1]);
  Eigen::setNbThreads(1);
  struct Shape {
    const char* what;
    int m, n, k;
    bool transposedB;  // X * W^T (nn.Linear's forward)
  };
  const Shape shapes[] = {{"x c_attn^T  [2048x128]x[128x384]", 2048, 384, 128, true},
                          {"x c_fc^T    [2048x128]x[128x512]", 2048, 512, 128, true},
                          {"h c_proj^T  [2048x512]x[512x128]", 2048, 128, 512, true},
                          {"x wte^T     [2048x128]x[128x256]", 2048, 256, 128, true},
                          {"dW = dY^T X [512x2048]x[2048x128]", 512, 128, 2048, false},
                          {"q k^T       [128x32]x[32x128]", 128, 128, 32, true},
                          {"square      [1024x1024]x[1024x1024]", 1024, 1024, 1024, false}};
  std::printf("%-40s %10s\n", "GEMM (one core, float32, Eigen)", "GFLOP/s");
  for (const auto& s : shapes) {
    Mat a = Mat::Random(s.m, s.k);
    Mat b = s.transposedB ? Mat::Random(s.n, s.k) : Mat::Random(s.k, s.n);
    Mat c(s.m, s.n);
    const double sec = bestSeconds(iters, [&] {
      if (s.transposedB) c.noalias() = a * b.transpose();
      else c.noalias() = a * b;
    });
    std::printf("%-40s %10.1f\n", s.what, 2.0 * s.m * s.n * s.k / sec / 1e9);
  }
  return 0;
}
