// Deterministic random numbers for data: permutations and synthetic datasets.
//
// std::uniform_int_distribution and std::normal_distribution are implementation-defined (libstdc++ and libc++
// give different streams), so a shuffled epoch or a synthetic dataset would change with the standard library.
// dtrain fixes the generator to std::mt19937_64 (whose output sequence the standard specifies) and derives
// bounded integers with Lemire's multiply-shift rejection method and normals with Box-Muller, both written
// here, so the same seed gives the same data on every platform. Not thread-safe (one generator per user).
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>
#include <random>

namespace dtrain::data {

class Random {
 public:
  explicit Random(uint64_t seed) : engine_(seed) {}

  uint64_t next() { return engine_(); }

  // Uniform integer in [0, bound), bound > 0, without modulo bias (Lemire 2019).
  uint64_t below(uint64_t bound) {
    unsigned __int128 m = static_cast<unsigned __int128>(engine_()) * bound;
    auto low = static_cast<uint64_t>(m);
    if (low < bound) {
      uint64_t threshold = -bound % bound;
      while (low < threshold) {
        m = static_cast<unsigned __int128>(engine_()) * bound;
        low = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }

  // Uniform double in [0, 1) from the top 53 bits.
  double uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }

  // Standard normal, Box-Muller; the second value of each pair is kept for the next call.
  double normal() {
    if (haveSpare_) {
      haveSpare_ = false;
      return spare_;
    }
    double u1 = 0;
    while (u1 <= 0) u1 = uniform();
    double u2 = uniform();
    double r = std::sqrt(-2.0 * std::log(u1));
    double theta = 2.0 * std::numbers::pi * u2;
    spare_ = r * std::sin(theta);
    haveSpare_ = true;
    return r * std::cos(theta);
  }

 private:
  std::mt19937_64 engine_;
  double spare_ = 0;
  bool haveSpare_ = false;
};

}  // namespace dtrain::data
