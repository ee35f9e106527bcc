#include <doctest/doctest.h>

#include <atomic>
#include <map>
#include <stdexcept>
#include <vector>

#include "lib/data/batch_loader.h"
#include "lib/data/synthetic.h"

using namespace dtrain;
using namespace dtrain::data;

namespace {

// Feature j of sample i is i * 10 + j; class label i % 7; fetch can be told to fail at some sample.
class CountingDataset final : public Dataset {
 public:
  explicit CountingDataset(int64_t n, int64_t failAt = -1) : n_(n), failAt_(failAt) {}
  int64_t size() const override { return n_; }
  const Shape& featureShape() const override { return shape_; }
  LabelKind labelKind() const override { return LabelKind::kClass; }
  const Shape& labelShape() const override { return labelShape_; }
  std::optional<int64_t> numClasses() const override { return 7; }
  const std::vector<std::string>& classNames() const override { return names_; }
  std::string describe() const override { return "counting"; }
  void fetch(std::span<const int64_t> indices, float* features, void* labels) const override {
    for (size_t b = 0; b < indices.size(); ++b) {
      if (indices[b] == failAt_) throw std::runtime_error("cannot read sample " + std::to_string(failAt_));
      for (int j = 0; j < 3; ++j) features[b * 3 + static_cast<size_t>(j)] = static_cast<float>(indices[b] * 10 + j);
      static_cast<int32_t*>(labels)[b] = static_cast<int32_t>(indices[b] % 7);
    }
  }

 private:
  int64_t n_, failAt_;
  Shape shape_{3};
  Shape labelShape_{};
  std::vector<std::string> names_;
};

}  // namespace

TEST_CASE("batches cover the rank's shard in order, last one partial, positions advance by batch * world") {
  for (bool prefetch : {true, false}) {
    CAPTURE(prefetch);
    CountingDataset ds(100);
    DistributedSampler sampler({.datasetSize = 100, .rank = 1, .worldSize = 3, .seed = 4});
    BatchLoader loader(ds, sampler, {.batchSize = 8, .prefetch = prefetch});
    CHECK(sampler.numSamplesThisRank() == 34);
    CHECK(loader.numBatches() == 5);
    int64_t seen = 0, count = 0;
    for (const Batch& b : loader) {
      CHECK(b.index == count);
      CHECK(b.size == (count < 4 ? 8 : 2));
      for (int64_t k = 0; k < b.size; ++k) {
        int64_t idx = sampler.indices()[static_cast<size_t>(seen + k)];
        REQUIRE(b.indices[static_cast<size_t>(k)] == idx);
        REQUIRE(b.features[k * 3 + 2] == static_cast<float>(idx * 10 + 2));
        REQUIRE(b.classLabels[k] == idx % 7);
      }
      CHECK(b.targets == nullptr);
      seen += b.size;
      CHECK(b.position == std::min<int64_t>(seen * 3, 100));
      // 100 samples over 3 ranks pad to 102: rank 1's last entry (entry 100 of the padded epoch) repeats sample 0's.
      CHECK(b.padding == (count < 4 ? 0 : 1));
      ++count;
    }
    CHECK(count == 5);
    CHECK(seen == 34);
    CHECK(loader.next() == nullptr);
  }
}

TEST_CASE("dropLast: the epoch's last batch lists what the sampler and the loader dropped, the others nothing") {
  // 100 samples over 3 ranks: the sampler drops 1 (99 taken, 33 a rank), the loader each rank's last 33 - 4 x 8 = 1.
  for (bool prefetch : {true, false}) {
    CAPTURE(prefetch);
    CountingDataset ds(100);
    std::map<int64_t, int> times;
    for (int rank = 0; rank < 3; ++rank) {
      DistributedSampler sampler({.datasetSize = 100, .rank = rank, .worldSize = 3, .seed = 4, .dropLast = true});
      BatchLoader loader(ds, sampler, {.batchSize = 8, .dropLast = true, .prefetch = prefetch});
      REQUIRE(loader.numBatches() == 4);
      for (const Batch& b : loader) {
        for (auto i : b.indices) ++times[i];
        for (auto i : b.dropped) ++times[i];
        if (b.index < 3) {
          CHECK(b.dropped.empty());
          continue;
        }
        // The sampler's share of the tail (rank 0's only: 100 = 33 x 3 + 1), then the rank's last partial batch.
        std::vector<int64_t> expected(sampler.dropped().begin(), sampler.dropped().end());
        expected.push_back(sampler.indices()[32]);
        CHECK(std::vector<int64_t>(b.dropped.begin(), b.dropped.end()) == expected);
        CHECK(b.dropped.size() == (rank == 0 ? 2u : 1u));
      }
    }
    CHECK(times.size() == 100);  // every sample trained or dropped, once
    for (const auto& [sample, k] : times) CHECK(k == 1);
  }
  // Without dropLast nothing is dropped.
  CountingDataset ds(100);
  DistributedSampler sampler({.datasetSize = 100, .rank = 0, .worldSize = 3, .seed = 4});
  BatchLoader loader(ds, sampler, {.batchSize = 8});
  for (const Batch& b : loader) CHECK(b.dropped.empty());
}

TEST_CASE("dropLast drops the partial batch; a resumed sampler yields only the rest") {
  CountingDataset ds(100);
  DistributedSampler sampler({.datasetSize = 100, .rank = 0, .worldSize = 2, .seed = 4, .startSample = 40});
  BatchLoader loader(ds, sampler, {.batchSize = 8, .dropLast = true});
  CHECK(loader.numBatches() == 3);  // 30 samples on this rank
  int64_t last = 0;
  for (const Batch& b : loader) {
    CHECK(b.size == 8);
    last = b.position;
  }
  CHECK(last == 40 + 3 * 8 * 2);
}

TEST_CASE("a fetch error reaches the consumer; destroying a loader mid-epoch does not hang") {
  CountingDataset bad(50, /*failAt=*/30);
  DistributedSampler sampler({.datasetSize = 50, .rank = 0, .worldSize = 1, .shuffle = false});
  {
    BatchLoader loader(bad, sampler, {.batchSize = 10});
    CHECK(loader.next() != nullptr);
    CHECK(loader.next() != nullptr);
    CHECK(loader.next() != nullptr);
    CHECK_THROWS_WITH(loader.next(), "cannot read sample 30");
    CHECK(loader.next() == nullptr);
  }
  CountingDataset good(1000);
  DistributedSampler s2({.datasetSize = 1000, .rank = 0, .worldSize = 1});
  BatchLoader early(good, s2, {.batchSize = 10});
  CHECK(early.next() != nullptr);  // the destructor stops the producer waiting on a full slot
}

TEST_CASE("target labels come through as floats") {
  auto ds = makeSynthetic({.samples = 20, .features = 4, .outputs = 2});
  DistributedSampler sampler({.datasetSize = 20, .rank = 0, .worldSize = 1, .shuffle = false});
  BatchLoader loader(*ds, sampler, {.batchSize = 20});
  const Batch* b = loader.next();
  REQUIRE(b != nullptr);
  CHECK(b->classLabels == nullptr);
  REQUIRE(b->targets != nullptr);
  std::vector<float> f(4 * 20), t(2 * 20);
  std::vector<int64_t> idx(20);
  for (int i = 0; i < 20; ++i) idx[static_cast<size_t>(i)] = i;
  ds->fetch(idx, f.data(), t.data());
  for (size_t i = 0; i < t.size(); ++i) CHECK(b->targets[i] == t[i]);
}
