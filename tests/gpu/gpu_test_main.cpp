// main() of the `gpu`-labelled tests: without a visible CUDA device they print "skipped: no CUDA device" and exit
// 77, which ctest reports as skipped (SKIP_RETURN_CODE), so a machine without a GPU stays green.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>

#include "lib/nn/device.h"

int main(int argc, char** argv) {
  if (dtrain::nn::visibleGpus() == 0) {
    std::printf("skipped: no CUDA device\n");
    return 77;
  }
  dtrain::nn::setTf32(false);  // exact float32 products: the parity tests compare with the CPU
  doctest::Context context(argc, argv);
  return context.run();
}
