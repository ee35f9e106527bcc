// BatchLookahead (lib/train/batch_lookahead.h): the GPU trainer's one-batch look-ahead, sequenced against a fake
// stager that keeps gpu::BatchStaging's slot rules (two slots in turn, the slot in use never refilled, each staged
// slot used once, unstage rewinds) and logs every call, and sources that invalidate a batch as soon as they move on.
#include <doctest/doctest.h>

#include <limits>
#include <stdexcept>
#include <string>

#include "lib/common/error.h"
#include "lib/train/batch_lookahead.h"

using namespace dtrain;
using namespace dtrain::train;

namespace {

constexpr int64_t kFeatures = 3;

// Two slots with gpu::BatchStaging's rules; "device memory" is a vector per slot. Logs "s<batch>@<slot>" for a
// stage, "u@<slot>" for a use, "x@<slot>" for an unstage.
class FakeStager final : public BatchStager {
 public:
  int stage(const data::Batch& b) override {
    const int slot = next_;
    Slot& s = slots_[slot];
    if (s.staged) throw UsageError("slot staged again before its batch was used");
    if (slot == lastUsed_) throw UsageError("slot of the batch in use refilled");
    s.features.assign(b.features, b.features + b.size * kFeatures);
    if (b.classLabels != nullptr) s.labels.assign(b.classLabels, b.classLabels + b.size);
    else s.labels.assign(b.size, -1);
    s.staged = true;
    next_ = 1 - slot;
    log += "s" + std::to_string(b.index) + "@" + std::to_string(slot) + " ";
    ++staged;
    return slot;
  }
  std::pair<const void*, const void*> use(int slot) override {
    Slot& s = slots_.at(static_cast<size_t>(slot));
    if (!s.staged) throw UsageError("use of a slot with no staged batch");
    s.staged = false;
    lastUsed_ = slot;
    log += "u@" + std::to_string(slot) + " ";
    return {s.features.data(), s.labels.data()};
  }
  void unstage(int slot) override {
    Slot& s = slots_.at(static_cast<size_t>(slot));
    if (!s.staged) throw UsageError("unstage of a slot with no staged batch");
    s.staged = false;
    next_ = slot;
    log += "x@" + std::to_string(slot) + " ";
  }
  bool anyStaged() const { return slots_[0].staged || slots_[1].staged; }

  std::string log;
  int staged = 0;

 private:
  struct Slot {
    std::vector<float> features;
    std::vector<int32_t> labels;
    bool staged = false;
  };
  std::array<Slot, 2> slots_;
  int next_ = 0, lastUsed_ = -1;
};

// A loader stricter than BatchLoader: one buffer, overwritten with NaN and garbage metadata on every next(), so a
// batch read after the source moved on is caught. Batch i: size `sizes[i]`, sample j's features i*100 + j*10 + k,
// label i + j, index i, position 1000 + i, indices 500 + i*10 + j. Throws at batch `throwAt`.
class StrictSource {
 public:
  explicit StrictSource(std::vector<int64_t> sizes, int64_t throwAt = -1) : sizes_(std::move(sizes)), throwAt_(throwAt) {}
  const data::Batch* next() {
    ++calls;
    std::fill(features_.begin(), features_.end(), std::numeric_limits<float>::quiet_NaN());
    std::fill(labels_.begin(), labels_.end(), -99);
    std::fill(indices_.begin(), indices_.end(), -1);
    batch_ = data::Batch{.index = -7, .size = -7, .position = -7};
    if (static_cast<size_t>(i_) >= sizes_.size()) return nullptr;
    const int64_t i = i_++;
    if (i == throwAt_) throw std::runtime_error("cannot read batch " + std::to_string(i));
    const int64_t n = sizes_[static_cast<size_t>(i)];
    features_.resize(static_cast<size_t>(n * kFeatures));
    labels_.resize(static_cast<size_t>(n));
    indices_.resize(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t k = 0; k < kFeatures; ++k) features_[static_cast<size_t>(j * kFeatures + k)] = static_cast<float>(i * 100 + j * 10 + k);
      labels_[static_cast<size_t>(j)] = static_cast<int32_t>(i + j);
      indices_[static_cast<size_t>(j)] = 500 + i * 10 + j;
    }
    batch_ = data::Batch{.index = i, .size = n, .indices = indices_, .features = n > 0 ? features_.data() : nullptr,
                         .classLabels = n > 0 ? labels_.data() : nullptr, .position = 1000 + i};
    return &batch_;
  }
  int calls = 0;

 private:
  std::vector<int64_t> sizes_;
  int64_t throwAt_;
  int64_t i_ = 0;
  std::vector<float> features_;
  std::vector<int32_t> labels_;
  std::vector<int64_t> indices_;
  data::Batch batch_;
};

// Batch i as StrictSource made it, read through the look-ahead's copy (its buffers the stager's slot).
void checkBatch(const data::Batch& b, int64_t i, int64_t size) {
  REQUIRE(b.index == i);
  REQUIRE(b.size == size);
  CHECK(b.position == 1000 + i);
  REQUIRE(b.indices.size() == static_cast<size_t>(size));
  CHECK(b.targets == nullptr);
  for (int64_t j = 0; j < size; ++j) {
    CHECK(b.indices[static_cast<size_t>(j)] == 500 + i * 10 + j);
    CHECK(b.classLabels[j] == i + j);
    for (int64_t k = 0; k < kFeatures; ++k) CHECK(b.features[j * kFeatures + k] == static_cast<float>(i * 100 + j * 10 + k));
  }
}

}  // namespace

TEST_CASE("look-ahead: without a stager (the CPU) the source's batches pass through, asked for only by next()") {
  StrictSource source({2, 2, 1});
  BatchLookahead ahead([&] { return source.next(); }, nullptr);
  const data::Batch* b = ahead.next();
  REQUIRE(b != nullptr);
  CHECK(source.calls == 1);
  ahead.prefetch();  // nothing on the CPU
  ahead.prefetch();
  CHECK(source.calls == 1);
  CHECK_FALSE(ahead.stagedAhead());
  checkBatch(*b, 0, 2);  // the source's own buffers
  int n = 1;
  while (ahead.next() != nullptr) ++n;
  CHECK(n == 3);
  ahead.cancel();
}

TEST_CASE("look-ahead: batch n+1 is staged after batch n is used and read from its slot after the source moved on") {
  for (int accum : {1, 3}) {
    CAPTURE(accum);
    // 7 batches, the last partial; a trainer-like loop with `accum` micro-batches per step prefetches after every
    // micro-batch's backward, and reads the batch's metadata (position) after the prefetch, at the step's end.
    StrictSource source({4, 4, 4, 4, 4, 4, 2});
    FakeStager stager;
    BatchLookahead ahead([&] { return source.next(); }, &stager);
    int64_t i = 0, steps = 0;
    int micro = 0;
    while (const data::Batch* b = ahead.next()) {
      checkBatch(*b, i, i < 6 ? 4 : 2);
      ahead.prefetch();
      ahead.prefetch();  // one ahead at most
      CHECK(source.calls == std::min<int64_t>(i + 2, 8));
      checkBatch(*b, i, i < 6 ? 4 : 2);  // the copy survives the source's next()
      ++i;
      if (++micro == accum || i == 7) {
        micro = 0;
        ++steps;
      }
    }
    CHECK(i == 7);
    CHECK(steps == (accum == 1 ? 7 : 3));
    CHECK(source.calls == 8);  // the end was seen once, by a prefetch, and not asked again
    CHECK(ahead.next() == nullptr);
    CHECK(source.calls == 8);
    // Slots alternate; each batch but the first is staged while the one before it is in use.
    CHECK(stager.log == "s0@0 u@0 s1@1 u@1 s2@0 u@0 s3@1 u@1 s4@0 u@0 s5@1 u@1 s6@0 u@0 ");
    CHECK_FALSE(stager.anyStaged());
  }
}

TEST_CASE("look-ahead: without prefetch() each batch is staged and used at once (evaluation-like use, still correct)") {
  StrictSource source({2, 3, 1});
  FakeStager stager;
  BatchLookahead ahead([&] { return source.next(); }, &stager);
  int64_t i = 0;
  while (const data::Batch* b = ahead.next()) {
    checkBatch(*b, i, std::vector<int64_t>{2, 3, 1}[static_cast<size_t>(i)]);
    ++i;
  }
  CHECK(stager.log == "s0@0 u@0 s1@1 u@1 s2@0 u@0 ");
}

TEST_CASE("look-ahead: an early stop unstages the batch staged ahead; the next user of the stager (eval, next epoch) "
          "gets its slot") {
  StrictSource source({2, 2, 2, 2});
  FakeStager stager;
  {
    BatchLookahead ahead([&] { return source.next(); }, &stager);
    REQUIRE(ahead.next() != nullptr);
    ahead.prefetch();
    REQUIRE(ahead.next() != nullptr);  // batch 1, slot 1
    ahead.prefetch();                  // batch 2 into slot 0
    CHECK(ahead.stagedAhead());
    ahead.cancel();  // stop_: break
    CHECK_FALSE(ahead.stagedAhead());
    CHECK(ahead.next() == nullptr);  // cancelled: the end
    ahead.prefetch();
    CHECK(source.calls == 3);
  }
  CHECK(stager.log == "s0@0 u@0 s1@1 u@1 s2@0 x@0 ");
  CHECK_FALSE(stager.anyStaged());
  // Evaluation after the stop: its first batch takes the freed slot (0), not the slot in use (1).
  StrictSource eval({1, 1});
  BatchLookahead next([&] { return eval.next(); }, &stager);
  REQUIRE(next.next() != nullptr);
  next.prefetch();
  CHECK(stager.log == "s0@0 u@0 s1@1 u@1 s2@0 x@0 s0@0 u@0 s1@1 ");
}

TEST_CASE("look-ahead: the destructor unstages a batch staged ahead") {
  StrictSource source({2, 2});
  FakeStager stager;
  {
    BatchLookahead ahead([&] { return source.next(); }, &stager);
    REQUIRE(ahead.next() != nullptr);
    ahead.prefetch();
    CHECK(stager.anyStaged());
  }
  CHECK_FALSE(stager.anyStaged());
  CHECK(stager.log == "s0@0 u@0 s1@1 x@1 ");
}

TEST_CASE("look-ahead: empty batches (a rank's uneven share ran out) are not staged and keep their metadata") {
  StrictSource source({2, 1, 0, 0});
  FakeStager stager;
  BatchLookahead ahead([&] { return source.next(); }, &stager);
  std::vector<int64_t> sizes;
  while (const data::Batch* b = ahead.next()) {
    ahead.prefetch();
    checkBatch(*b, static_cast<int64_t>(sizes.size()), b->size);
    if (b->size == 0) CHECK(b->features == nullptr);
    sizes.push_back(b->size);
  }
  CHECK(sizes == std::vector<int64_t>{2, 1, 0, 0});
  CHECK(stager.log == "s0@0 u@0 s1@1 u@1 ");
}

TEST_CASE("look-ahead: a source error during prefetch() surfaces at the next next(), after the step in flight") {
  StrictSource source({2, 2, 2}, /*throwAt=*/1);
  FakeStager stager;
  BatchLookahead ahead([&] { return source.next(); }, &stager);
  const data::Batch* b = ahead.next();
  REQUIRE(b != nullptr);
  CHECK_NOTHROW(ahead.prefetch());
  checkBatch(*b, 0, 2);  // the step in flight still has its batch
  CHECK_THROWS_WITH_AS(ahead.next(), "cannot read batch 1", std::runtime_error);
}

TEST_CASE("look-ahead: a stager error during prefetch() surfaces at the next next() too") {
  StrictSource source({2, 9});
  struct Small final : BatchStager {
    FakeStager fake;
    int stage(const data::Batch& b) override {
      if (b.size > 4) throw Error("batch of " + std::to_string(b.size) + " samples does not fit");
      return fake.stage(b);
    }
    std::pair<const void*, const void*> use(int slot) override { return fake.use(slot); }
    void unstage(int slot) override { fake.unstage(slot); }
  } stager;
  BatchLookahead ahead([&] { return source.next(); }, &stager);
  REQUIRE(ahead.next() != nullptr);
  ahead.prefetch();
  CHECK_FALSE(ahead.stagedAhead());
  CHECK_THROWS_WITH_AS(ahead.next(), "batch of 9 samples does not fit", Error);
}

namespace {

// Feature k of sample i is i * 10 + k; class label i % 5.
class CountingDataset final : public data::Dataset {
 public:
  explicit CountingDataset(int64_t n) : n_(n) {}
  int64_t size() const override { return n_; }
  const Shape& featureShape() const override { return shape_; }
  data::LabelKind labelKind() const override { return data::LabelKind::kClass; }
  const Shape& labelShape() const override { return labelShape_; }
  std::optional<int64_t> numClasses() const override { return 5; }
  const std::vector<std::string>& classNames() const override { return names_; }
  std::string describe() const override { return "counting"; }
  void fetch(std::span<const int64_t> indices, float* features, void* labels) const override {
    for (size_t b = 0; b < indices.size(); ++b) {
      for (int64_t k = 0; k < kFeatures; ++k) features[b * kFeatures + static_cast<size_t>(k)] = static_cast<float>(indices[b] * 10 + k);
      static_cast<int32_t*>(labels)[b] = static_cast<int32_t>(indices[b] % 5);
    }
  }

 private:
  int64_t n_;
  Shape shape_{kFeatures};
  Shape labelShape_{};
  std::vector<std::string> names_;
};

struct Seen {
  int64_t size, position;
  std::vector<int64_t> indices;
  std::vector<float> features;
  std::vector<int32_t> labels;
  bool operator==(const Seen&) const = default;
};

// One epoch as the trainer takes it (EpochBatches over a real BatchLoader: uneven shards, the empty batches of a
// rank that ran out), through a look-ahead with or without the fake stager; what each batch held when read.
std::vector<Seen> epoch(const data::Dataset& ds, data::DistributedSampler& sampler, int64_t startSample, bool staged,
                        bool prefetchThread, std::string* log = nullptr) {
  sampler.setEpoch(0, startSample);
  data::BatchLoader loader(ds, sampler, {.batchSize = 4, .prefetch = prefetchThread});
  const int64_t most = sampler.maxSamplesPerRank();
  const int64_t numBatches = std::max(loader.numBatches(), (most + 3) / 4);
  EpochBatches batches(loader, numBatches, sampler.position(sampler.numSamplesThisRank()));
  FakeStager stager;
  BatchLookahead ahead([&] { return batches.next(); }, staged ? &stager : nullptr);
  std::vector<Seen> seen;
  while (const data::Batch* b = ahead.next()) {
    ahead.prefetch();  // moves the loader on (its previous batch's buffers are refilled by its thread)
    Seen s{b->size, b->position, {b->indices.begin(), b->indices.end()}, {}, {}};
    if (b->size > 0) {
      s.features.assign(b->features, b->features + b->size * kFeatures);
      s.labels.assign(b->classLabels, b->classLabels + b->size);
    }
    seen.push_back(std::move(s));
  }
  CHECK(batches.taken() == numBatches);
  if (log != nullptr) *log = stager.log;
  return seen;
}

}  // namespace

TEST_CASE("look-ahead over the real loader: same batches as without it, also resumed mid-epoch with uneven shards") {
  CountingDataset ds(45);
  for (bool prefetchThread : {true, false}) {
    for (int64_t start : {int64_t{0}, int64_t{13}}) {
      CAPTURE(prefetchThread);
      CAPTURE(start);
      // Rank 2 of 3 without padding (a resize mid-epoch): it holds fewer samples than rank 0, so its last step
      // may be an empty batch.
      data::DistributedSampler sampler({.datasetSize = 45, .rank = 2, .worldSize = 3, .seed = 9, .pad = false});
      const std::vector<Seen> plain = epoch(ds, sampler, start, false, prefetchThread);
      std::string log;
      const std::vector<Seen> ahead = epoch(ds, sampler, start, true, prefetchThread, &log);
      CHECK(ahead == plain);
      REQUIRE(!plain.empty());
      CHECK(plain.back().position == sampler.position(sampler.numSamplesThisRank()));
      int64_t samples = 0;
      for (const Seen& s : plain) samples += s.size;
      CHECK(samples == sampler.numSamplesThisRank());
      for (const Seen& s : plain)
        for (size_t j = 0; j < s.indices.size(); ++j) CHECK(s.features[j * kFeatures] == static_cast<float>(s.indices[j] * 10));
    }
  }
  // The empty batch proper: 49 samples over 3 ranks without padding hold 17/16/16: rank 0 takes five batches
  // (4,4,4,4,1), so rank 2 takes its four and then joins the last step with an empty one.
  CountingDataset ds49(49);
  data::DistributedSampler sampler({.datasetSize = 49, .rank = 2, .worldSize = 3, .seed = 9, .pad = false});
  std::string log;
  const std::vector<Seen> seen = epoch(ds49, sampler, 0, true, true, &log);
  REQUIRE(seen.size() == 5);
  CHECK(seen.back().size == 0);
  CHECK(seen.back().position == sampler.position(16));
  CHECK(log == "s0@0 u@0 s1@1 u@1 s2@0 u@0 s3@1 u@1 ");
  CHECK(epoch(ds49, sampler, 0, false, true) == seen);
}
