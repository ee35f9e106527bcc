#include "lib/data/sampler.h"

#include <algorithm>
#include <numeric>

#include "lib/common/error.h"
#include "lib/data/random.h"

namespace dtrain::data {

DistributedSampler::DistributedSampler(const SamplerOptions& options) : options_(options) {
  DTRAIN_CHECK_AS(ConfigError, options.worldSize >= 1, "sampler: world size {} (expected >= 1)", options.worldSize);
  DTRAIN_CHECK_AS(ConfigError, options.rank >= 0 && options.rank < options.worldSize,
                  "sampler: rank {} (expected 0 <= rank < world size {})", options.rank, options.worldSize);
  DTRAIN_CHECK_AS(ConfigError, options.datasetSize >= 0, "sampler: dataset size {}", options.datasetSize);
  setEpoch(options.epoch, options.startSample);
}

void DistributedSampler::epochOrder(int64_t n, bool shuffle, uint64_t seed, int64_t epoch, std::vector<int64_t>& out) {
  out.resize(static_cast<size_t>(n));
  std::iota(out.begin(), out.end(), int64_t{0});
  if (!shuffle) return;
  // Fisher-Yates from the back: position i swaps with a uniform j in [0, i].
  Random rng(seed + static_cast<uint64_t>(epoch));
  for (int64_t i = n - 1; i > 0; --i) {
    auto j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i) + 1));
    std::swap(out[static_cast<size_t>(i)], out[static_cast<size_t>(j)]);
  }
}

void DistributedSampler::setEpoch(int64_t epoch, int64_t startSample) {
  const int64_t n = options_.datasetSize;
  DTRAIN_CHECK_AS(ConfigError, epoch >= 0, "sampler: epoch {} (expected >= 0)", epoch);
  DTRAIN_CHECK_AS(ConfigError, startSample >= 0 && startSample <= n,
                  "sampler: resume position {} is beyond the epoch's {} samples (did the dataset change since the "
                  "checkpoint?)", startSample, n);
  epoch_ = epoch;
  startSample_ = startSample;
  const int64_t world = options_.worldSize, rank = options_.rank;
  const int64_t rest = n - startSample;
  if (options_.dropLast) total_ = rest / world * world;
  else if (options_.pad) total_ = rest == 0 ? 0 : (rest + world - 1) / world * world;
  else total_ = rest;

  epochOrder(n, options_.shuffle, options_.seed, epoch, order_);
  indices_.clear();
  indices_.reserve(static_cast<size_t>((total_ + world - 1) / world));
  // Padding repeats the epoch order from its start, as often as needed (PyTorch: indices += indices[:padding]).
  // Taking it from the order's start, not from the rest's, keeps a same-world resume identical to an uninterrupted
  // epoch: the resume position is then a multiple of the world, so the rest needs exactly the same padding.
  for (int64_t q = rank; q < total_; q += world) {
    const int64_t at = q < rest ? startSample + q : (q - rest) % n;
    indices_.push_back(order_[static_cast<size_t>(at)]);
  }
  // drop_last's tail (total_ < rest only then), dealt out as the taken entries are: dtrain sim's audit counts it
  // apart from skipped samples.
  dropped_.clear();
  for (int64_t q = total_ + rank; q < rest; q += world)
    dropped_.push_back(order_[static_cast<size_t>(startSample + q)]);
}

int64_t DistributedSampler::paddingIn(int64_t localBegin, int64_t count) const {
  // Local index k is entry q = rank + k x world of the padded rest; entries at or past the rest are padding.
  const int64_t rest = remaining(), world = options_.worldSize, rank = options_.rank;
  const int64_t firstPadding = rest <= rank ? 0 : (rest - rank + world - 1) / world;
  return std::max<int64_t>(0, localBegin + count - std::max(localBegin, firstPadding));
}

int64_t DistributedSampler::position(int64_t localTaken) const {
  return startSample_ + std::min(localTaken * options_.worldSize, remaining());
}

}  // namespace dtrain::data
