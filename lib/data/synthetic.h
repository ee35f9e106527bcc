// Synthetic datasets, so a job runs with no files at all. Fully determined by the options: the same options
// give bit-identical data on every machine (see random.h for the generator).
//
//   regression:      x ~ N(0, 1)^features, y = W x + b + noise * N(0, 1), W [outputs, features] and b [outputs]
//                    drawn N(0, 1) from `seed` (the classic Linear(10, 1) example with features=10, outputs=1).
//   classification:  `blobs`: class c = sample i's draw, x = center_c + N(0, 1) with centers N(0, spread^2);
//                    `linear`: x ~ N(0, 1), class = argmax(W x) with W from `seed` (linearly separable).
//   recsys:          clicks of users on items (a recommender's click target): user u and item i are Zipf(zipf)
//                    distributed (id 0 the most frequent), x = [u, users + i] (the ids of one embedding table of
//                    users + items rows, as float32), class 1 (click) with probability
//                    sigmoid(3 <U_u, V_i> + b_i): hidden preference factors U [users, factors], V [items, factors]
//                    drawn N(0, 1/factors) and N(0, 1), item bias b ~ N(0, 0.5^2). A popularity baseline (rank by
//                    the item's click rate) sees only b_i and popularity; a model that learns U and V sees more.
//
// `seed` fixes the task (W, b, centers); `sampleSeed` fixes the samples drawn from it. A train and an eval set of
// the same task share `seed` and differ in `sampleSeed`.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lib/data/dataset.h"

namespace dtrain::data {

struct SyntheticOptions {
  enum class Task : uint8_t { kRegression, kClassification, kRecsys };
  enum class Rule : uint8_t { kBlobs, kLinear };
  Task task = Task::kRegression;
  Rule rule = Rule::kBlobs;  // classification only
  int64_t samples = 1024;
  int64_t features = 10;
  int64_t outputs = 1;       // regression targets per sample
  int64_t numClasses = 2;    // classification
  double noise = 0.01;       // regression: std of the additive noise
  double spread = 3.0;       // blobs: std of the class centers
  int64_t users = 1000;      // recsys
  int64_t items = 1000;      // recsys
  int64_t factors = 8;       // recsys: dimension of the hidden preferences
  double zipf = 1.05;        // recsys: exponent of the ids' Zipf distribution (0 = uniform)
  uint64_t seed = 0;
  uint64_t sampleSeed = 0;
};

// The recsys task's hidden truth, for tests and baselines.
struct RecsysTruth {
  int64_t factors = 0;
  std::vector<float> user, item, bias;  // [users, factors], [items, factors], [items]
  double clickProbability(int64_t user, int64_t item) const;
};
RecsysTruth syntheticRecsysTruth(const SyntheticOptions& options);

// Raw features are float32 [samples, features]. Throws ConfigError on non-positive sizes.
std::unique_ptr<ArrayDataset> makeSynthetic(const SyntheticOptions& options, const Transform& transform = {});

// The task's true parameters, for tests and for checking that a regression converged: W then b, row-major.
std::vector<float> syntheticRegressionParameters(const SyntheticOptions& options);

}  // namespace dtrain::data
