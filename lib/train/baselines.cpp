#include "lib/train/baselines.h"

#include <cmath>
#include <numeric>
#include <unordered_map>
#include <vector>

#include "lib/nn/loss.h"

namespace dtrain::train {

namespace {

// Calls f(item id, label) for every sample of `d`, reading it in chunks.
template <typename F>
void forEachSample(const data::Dataset& d, F&& f) {
  const int64_t features = d.featureSize();
  constexpr int64_t kChunk = 4096;
  std::vector<int64_t> idx;
  std::vector<float> x;
  std::vector<int32_t> y;
  for (int64_t first = 0; first < d.size(); first += kChunk) {
    const int64_t n = std::min(kChunk, d.size() - first);
    idx.resize(static_cast<size_t>(n));
    std::iota(idx.begin(), idx.end(), first);
    x.resize(static_cast<size_t>(n * features));
    y.resize(static_cast<size_t>(n));
    d.fetch(idx, x.data(), y.data());
    for (int64_t i = 0; i < n; ++i)
      f(static_cast<int64_t>(std::nearbyint(x[static_cast<size_t>((i + 1) * features - 1)])), y[static_cast<size_t>(i)]);
  }
}

}  // namespace

std::optional<double> popularityBaselineAuc(const data::Dataset& train, const data::Dataset& eval) {
  for (const data::Dataset* d : {&train, &eval})
    if (d->labelKind() != data::LabelKind::kClass || d->numClasses() != 2 || d->labelSize() != 1 ||
        d->featureSize() < 1)
      return std::nullopt;
  std::unordered_map<int64_t, std::pair<double, double>> counts;  // item -> (clicks, shows)
  double clicks = 0;
  forEachSample(train, [&](int64_t item, int32_t label) {
    auto& c = counts[item];
    c.first += label;
    c.second += 1;
    clicks += label;
  });
  const double overall = train.size() > 0 ? clicks / static_cast<double>(train.size()) : 0.5;
  std::vector<double> scores;
  std::vector<int> labels;
  forEachSample(eval, [&](int64_t item, int32_t label) {
    auto it = counts.find(item);
    scores.push_back(it == counts.end() ? overall : it->second.first / it->second.second);
    labels.push_back(label);
  });
  return nn::rocAuc(scores, labels);
}

}  // namespace dtrain::train
