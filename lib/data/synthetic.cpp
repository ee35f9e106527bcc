#include "lib/data/synthetic.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "lib/common/error.h"
#include "lib/data/random.h"

namespace dtrain::data {

namespace {

// Independent streams for the task and for the samples, so changing `samples` never changes W.
constexpr uint64_t kTaskStream = 0x7461736b00000000ull;    // "task"
constexpr uint64_t kSampleStream = 0x73616d7000000000ull;  // "samp"

std::vector<float> normals(Random& rng, int64_t n, double stddev = 1.0) {
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<float>(rng.normal() * stddev);
  return v;
}

// Zipf(s) over 0..n-1 (P(k) proportional to 1 / (k + 1)^s): inverse-CDF sampling from the cumulative table.
class Zipf {
 public:
  Zipf(int64_t n, double s) : cdf_(static_cast<size_t>(n)) {
    double total = 0;
    for (int64_t k = 0; k < n; ++k) cdf_[static_cast<size_t>(k)] = total += std::pow(static_cast<double>(k + 1), -s);
    for (double& c : cdf_) c /= total;
  }
  int64_t draw(Random& rng) const {
    auto it = std::upper_bound(cdf_.begin(), cdf_.end(), rng.uniform());
    return std::min<int64_t>(it - cdf_.begin(), static_cast<int64_t>(cdf_.size()) - 1);
  }

 private:
  std::vector<double> cdf_;
};

}  // namespace

double RecsysTruth::clickProbability(int64_t u, int64_t i) const {
  double dot = 0;
  for (int64_t k = 0; k < factors; ++k)
    dot += static_cast<double>(user[static_cast<size_t>(u * factors + k)]) * item[static_cast<size_t>(i * factors + k)];
  return 1.0 / (1.0 + std::exp(-(3.0 * dot + bias[static_cast<size_t>(i)])));
}

RecsysTruth syntheticRecsysTruth(const SyntheticOptions& o) {
  Random task(o.seed ^ kTaskStream);
  RecsysTruth t;
  t.factors = o.factors;
  t.user = normals(task, o.users * o.factors, 1.0 / std::sqrt(static_cast<double>(o.factors)));
  t.item = normals(task, o.items * o.factors);
  t.bias = normals(task, o.items, 0.5);
  return t;
}

std::vector<float> syntheticRegressionParameters(const SyntheticOptions& o) {
  Random task(o.seed ^ kTaskStream);
  return normals(task, o.outputs * o.features + o.outputs);
}

std::unique_ptr<ArrayDataset> makeSynthetic(const SyntheticOptions& o, const Transform& transform) {
  DTRAIN_CHECK_AS(ConfigError, o.samples > 0, "synthetic: samples {} (expected > 0)", o.samples);
  DTRAIN_CHECK_AS(ConfigError, o.features > 0, "synthetic: features {} (expected > 0)", o.features);
  if (o.task == SyntheticOptions::Task::kRecsys) {
    DTRAIN_CHECK_AS(ConfigError, o.users > 0 && o.items > 0 && o.users + o.items <= (int64_t{1} << 24),
                    "synthetic recsys: users {} items {} (expected > 0 and users + items <= 2^24, the ids float32 "
                    "holds exactly)",
                    o.users, o.items);
    DTRAIN_CHECK_AS(ConfigError, o.factors > 0 && o.zipf >= 0, "synthetic recsys: factors {} zipf {} (expected "
                    "factors > 0, zipf >= 0)", o.factors, o.zipf);
    const RecsysTruth truth = syntheticRecsysTruth(o);
    const Zipf users(o.users, o.zipf), items(o.items, o.zipf);
    Random rng(o.sampleSeed ^ kSampleStream);
    RawArray raw;
    raw.type = DType::kFloat32;
    raw.shape = {o.samples, 2};
    raw.bytes = ByteBuffer::uninitialized(static_cast<size_t>(o.samples * 2) * sizeof(float));
    auto* x = reinterpret_cast<float*>(raw.bytes.mutableData());
    Labels labels;
    labels.kind = LabelKind::kClass;
    labels.numClasses = 2;
    labels.classes.resize(static_cast<size_t>(o.samples));
    for (int64_t s = 0; s < o.samples; ++s) {
      const int64_t u = users.draw(rng), i = items.draw(rng);
      x[2 * s] = static_cast<float>(u);
      x[2 * s + 1] = static_cast<float>(o.users + i);
      labels.classes[static_cast<size_t>(s)] = rng.uniform() < truth.clickProbability(u, i) ? 1 : 0;
    }
    return std::make_unique<ArrayDataset>(
        std::move(raw), std::move(labels), transform,
        fmt::format("synthetic recsys: {} clicks of {} users on {} items (zipf {}, {} hidden factors)", o.samples,
                    o.users, o.items, o.zipf, o.factors));
  }
  const bool regression = o.task == SyntheticOptions::Task::kRegression;
  if (regression) DTRAIN_CHECK_AS(ConfigError, o.outputs > 0, "synthetic: outputs {} (expected > 0)", o.outputs);
  else DTRAIN_CHECK_AS(ConfigError, o.numClasses >= 2, "synthetic: num_classes {} (expected >= 2)", o.numClasses);

  Random task(o.seed ^ kTaskStream);
  Random rng(o.sampleSeed ^ kSampleStream);
  const int64_t n = o.samples, f = o.features;
  RawArray raw;
  raw.type = DType::kFloat32;
  raw.shape = {n, f};
  raw.bytes = ByteBuffer::uninitialized(static_cast<size_t>(n * f) * sizeof(float));
  auto* x = reinterpret_cast<float*>(raw.bytes.mutableData());
  Labels labels;
  std::string what;

  if (regression) {
    const int64_t k = o.outputs;
    auto params = normals(task, k * f + k);  // W [k, f] then b [k]
    labels.kind = LabelKind::kTarget;
    labels.shape = {k};
    labels.targets.resize(static_cast<size_t>(n * k));
    for (int64_t i = 0; i < n; ++i) {
      float* xi = x + i * f;
      for (int64_t j = 0; j < f; ++j) xi[j] = static_cast<float>(rng.normal());
      for (int64_t o2 = 0; o2 < k; ++o2) {
        double y = params[static_cast<size_t>(k * f + o2)];
        for (int64_t j = 0; j < f; ++j) y += static_cast<double>(params[static_cast<size_t>(o2 * f + j)]) * xi[j];
        labels.targets[static_cast<size_t>(i * k + o2)] = static_cast<float>(y + o.noise * rng.normal());
      }
    }
    what = fmt::format("synthetic regression: {} x [{}] -> [{}], noise {}", n, f, k, o.noise);
  } else {
    const int64_t c = o.numClasses;
    labels.kind = LabelKind::kClass;
    labels.numClasses = c;
    labels.classes.resize(static_cast<size_t>(n));
    if (o.rule == SyntheticOptions::Rule::kBlobs) {
      auto centers = normals(task, c * f, o.spread);
      for (int64_t i = 0; i < n; ++i) {
        auto cls = static_cast<int64_t>(rng.below(static_cast<uint64_t>(c)));
        labels.classes[static_cast<size_t>(i)] = static_cast<int32_t>(cls);
        for (int64_t j = 0; j < f; ++j)
          x[i * f + j] = centers[static_cast<size_t>(cls * f + j)] + static_cast<float>(rng.normal());
      }
    } else {
      auto w = normals(task, c * f);
      for (int64_t i = 0; i < n; ++i) {
        float* xi = x + i * f;
        for (int64_t j = 0; j < f; ++j) xi[j] = static_cast<float>(rng.normal());
        int64_t best = 0;
        double bestScore = -1e300;
        for (int64_t cls = 0; cls < c; ++cls) {
          double s = 0;
          for (int64_t j = 0; j < f; ++j) s += static_cast<double>(w[static_cast<size_t>(cls * f + j)]) * xi[j];
          if (s > bestScore) bestScore = s, best = cls;
        }
        labels.classes[static_cast<size_t>(i)] = static_cast<int32_t>(best);
      }
    }
    what = fmt::format("synthetic classification ({}): {} x [{}], {} classes",
                       o.rule == SyntheticOptions::Rule::kBlobs ? "blobs" : "linear", n, f, c);
  }
  return std::make_unique<ArrayDataset>(std::move(raw), std::move(labels), transform, what);
}

}  // namespace dtrain::data
