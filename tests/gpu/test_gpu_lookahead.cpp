// The trainer's one-batch look-ahead (lib/train/batch_lookahead.h) over the real GPU staging: every batch arrives
// in its device slot as the loader gave it, with batch n+1 copied while batch n is in use (its sequencing is
// unit-tested on the CPU with a fake stager: tests/train/test_batch_lookahead.cpp). Part of test_gpu_train.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "lib/data/batch_loader.h"
#include "lib/data/dataset.h"
#include "lib/nn/device.h"
#include "lib/train/batch_lookahead.h"

using namespace dtrain;

namespace {

// Feature k of sample i is i * 100 + k (8 features); class label i % 7.
class Counting final : public data::Dataset {
 public:
  int64_t size() const override { return 203; }
  const Shape& featureShape() const override { return shape_; }
  data::LabelKind labelKind() const override { return data::LabelKind::kClass; }
  const Shape& labelShape() const override { return labels_; }
  std::optional<int64_t> numClasses() const override { return 7; }
  const std::vector<std::string>& classNames() const override { return names_; }
  std::string describe() const override { return "counting"; }
  void fetch(std::span<const int64_t> indices, float* features, void* labels) const override {
    for (size_t b = 0; b < indices.size(); ++b) {
      for (size_t k = 0; k < 8; ++k) features[b * 8 + k] = static_cast<float>(indices[b] * 100 + static_cast<int64_t>(k));
      static_cast<int32_t*>(labels)[b] = static_cast<int32_t>(indices[b] % 7);
    }
  }

 private:
  Shape shape_{8};
  Shape labels_{};
  std::vector<std::string> names_;
};

}  // namespace

TEST_CASE("with a GPU: the look-ahead stages batch n+1 while batch n is in use; every batch arrives intact") {
  const Device gpu = Device::cuda(0);
  Counting ds;
  const int64_t batch = 16;
  nn::BatchStaging staging(batch * 8 * sizeof(float), batch * sizeof(int32_t), gpu);
  train::DeviceBatchStager stager(staging, ds, batch);
  data::DistributedSampler sampler({.datasetSize = ds.size(), .rank = 0, .worldSize = 1, .seed = 3});
  for (int pass = 0; pass < 2; ++pass) {  // pass 1 stops early (cancel) and pass 2 reuses the staging
    CAPTURE(pass);
    sampler.setEpoch(pass);
    data::BatchLoader loader(ds, sampler, {.batchSize = batch});
    train::BatchLookahead ahead([&loader] { return loader.next(); }, &stager);
    int64_t seen = 0, batches = 0;
    while (const data::Batch* b = ahead.next()) {
      // Device work on batch n would be enqueued here; batch n+1 is copied meanwhile.
      ahead.prefetch();
      std::vector<float> x(static_cast<size_t>(b->size * 8));
      std::vector<int32_t> y(static_cast<size_t>(b->size));
      nn::copyBytes(x.data(), Device::cpu(), b->features, gpu, x.size() * sizeof(float));
      nn::copyBytes(y.data(), Device::cpu(), b->classLabels, gpu, y.size() * sizeof(int32_t));
      for (int64_t j = 0; j < b->size; ++j) {
        const int64_t idx = sampler.indices()[static_cast<size_t>(seen + j)];
        REQUIRE(b->indices[static_cast<size_t>(j)] == idx);
        REQUIRE(x[static_cast<size_t>(j * 8 + 7)] == static_cast<float>(idx * 100 + 7));
        REQUIRE(y[static_cast<size_t>(j)] == idx % 7);
      }
      seen += b->size;
      if (++batches == 5 && pass == 0) {
        CHECK(ahead.stagedAhead());
        ahead.cancel();  // the trainer's early stop: the slot staged ahead is freed
        break;
      }
    }
    if (pass == 1) CHECK(seen == ds.size());
  }
}
