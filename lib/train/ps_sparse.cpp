#include "lib/train/ps_sparse.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "lib/common/error.h"

namespace dtrain::train::ps {

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A standard normal value for one (seed, row, column), Box-Muller over two 53-bit uniforms.
float normalAt(uint64_t seed, int64_t row, int col) {
  const uint64_t h = splitmix64(seed ^ splitmix64(static_cast<uint64_t>(row) * 0x100000001B3ull +
                                                  static_cast<uint64_t>(col)));
  const uint64_t h2 = splitmix64(h);
  const double u1 = (static_cast<double>(h >> 11) + 1.0) / 9007199254740993.0;  // (0, 1]
  const double u2 = static_cast<double>(h2 >> 11) / 9007199254740992.0;          // [0, 1)
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2));
}

}  // namespace

std::vector<RowRange> planRowRanges(int64_t rows, int servers) {
  DTRAIN_CHECK(rows >= 0 && servers >= 1, "sparse table: {} rows over {} servers", rows, servers);
  std::vector<RowRange> plan;
  const int64_t base = rows / servers, extra = rows % servers;
  int64_t at = 0;
  for (int s = 0; s < servers; ++s) {
    const int64_t n = base + (s < extra ? 1 : 0);
    plan.push_back({at, at + n, s});
    at += n;
  }
  return plan;
}

int rowServer(const std::vector<RowRange>& plan, int64_t row) {
  DTRAIN_CHECK(!plan.empty() && row >= 0 && row < plan.back().end, "sparse table: row {} outside [0, {})", row,
               plan.empty() ? 0 : plan.back().end);
  auto it = std::upper_bound(plan.begin(), plan.end(), row, [](int64_t r, const RowRange& p) { return r < p.end; });
  return it->server;
}

UniqueIds dedupIds(std::span<const int64_t> ids, int64_t rows) {
  UniqueIds u;
  for (int64_t id : ids)
    DTRAIN_CHECK(id >= 0 && id < rows, "sparse embedding: id {} outside the table's rows [0, {})", id, rows);
  u.ids.assign(ids.begin(), ids.end());
  std::sort(u.ids.begin(), u.ids.end());
  u.ids.erase(std::unique(u.ids.begin(), u.ids.end()), u.ids.end());
  u.slot.reserve(ids.size());
  for (int64_t id : ids)
    u.slot.push_back(static_cast<uint32_t>(std::lower_bound(u.ids.begin(), u.ids.end(), id) - u.ids.begin()));
  return u;
}

std::vector<float> coalesceRowGrads(const UniqueIds& unique, std::span<const float> occurrenceGrads, int dim) {
  const size_t d = static_cast<size_t>(dim);
  DTRAIN_CHECK(occurrenceGrads.size() == unique.slot.size() * d,
               "sparse embedding: {} gradient floats for {} occurrences of dim {}", occurrenceGrads.size(),
               unique.slot.size(), dim);
  std::vector<float> out(unique.ids.size() * d, 0.0f);
  for (size_t i = 0; i < unique.slot.size(); ++i) {
    float* dst = out.data() + unique.slot[i] * d;
    const float* src = occurrenceGrads.data() + i * d;
    for (size_t c = 0; c < d; ++c) dst[c] += src[c];
  }
  return out;
}

void accumulateRowGrads(std::vector<int64_t>& ids, std::vector<float>& grads, std::span<const int64_t> moreIds,
                        std::span<const float> moreGrads, int dim) {
  const size_t d = static_cast<size_t>(dim);
  DTRAIN_CHECK(grads.size() == ids.size() * d && moreGrads.size() == moreIds.size() * d,
               "sparse gradient sum: {} + {} floats for {} + {} rows of dim {}", grads.size(), moreGrads.size(),
               ids.size(), moreIds.size(), dim);
  std::vector<int64_t> outIds;
  std::vector<float> out;
  outIds.reserve(ids.size() + moreIds.size());
  out.reserve(grads.size() + moreGrads.size());
  size_t a = 0, b = 0;
  while (a < ids.size() || b < moreIds.size()) {
    const bool takeA = b == moreIds.size() || (a < ids.size() && ids[a] <= moreIds[b]);
    const bool both = takeA && b < moreIds.size() && ids[a] == moreIds[b];
    const float* row = takeA ? grads.data() + a * d : moreGrads.data() + b * d;
    outIds.push_back(takeA ? ids[a] : moreIds[b]);
    out.insert(out.end(), row, row + d);
    if (both)
      for (size_t c = 0; c < d; ++c) out[out.size() - d + c] += moreGrads[b * d + c];
    a += takeA ? 1 : 0;
    b += !takeA || both ? 1 : 0;
  }
  ids = std::move(outIds);
  grads = std::move(out);
}

const char* sparseOptimizerName(SparseOptimizerType type) {
  switch (type) {
    case SparseOptimizerType::kSgd: return "sgd";
    case SparseOptimizerType::kAdagrad: return "adagrad";
    case SparseOptimizerType::kAdam: return "sparse_adam";
  }
  return "?";
}

SparseOptimizerSpec sparseOptimizerFor(const nn::OptimizerSpec& job, bool adagrad, const std::string& where,
                                       const std::string& context) {
  DTRAIN_CHECK_AS(ConfigError, job.weightDecay == 0,
                  "{}/weight_decay: {} with sparse embeddings{} (expected 0: torch.optim does not decay sparse "
                  "gradients)",
                  where, job.weightDecay, context);
  SparseOptimizerSpec s;
  s.lr = job.lr;
  if (adagrad || job.type == nn::OptimizerType::kAdagrad) {
    s.type = SparseOptimizerType::kAdagrad;
    s.eps = job.type == nn::OptimizerType::kAdagrad ? job.eps : 1e-10;
    s.lrDecay = job.lrDecay;
    s.initialAccumulator = job.initialAccumulator;
    return s;
  }
  if (job.type == nn::OptimizerType::kSgd) {
    DTRAIN_CHECK_AS(ConfigError, job.momentum == 0,
                    "{}/momentum: {} with sparse embeddings{} (expected 0: torch.optim.SGD has no sparse momentum)",
                    where, job.momentum, context);
    s.type = SparseOptimizerType::kSgd;
    return s;
  }
  DTRAIN_CHECK_AS(ConfigError, !job.amsgrad,
                  "{}/amsgrad: true with sparse embeddings{} (expected false: SparseAdam has no amsgrad)", where,
                  context);
  s.type = SparseOptimizerType::kAdam;
  s.beta1 = job.beta1;
  s.beta2 = job.beta2;
  s.eps = job.eps;
  return s;
}

SparseShard::SparseShard(RowRange range, int dim, SparseOptimizerSpec spec, double initStd, uint64_t seed)
    : range_(range), dim_(dim), spec_(spec) {
  DTRAIN_CHECK(dim >= 1 && range.end >= range.begin, "sparse shard: dim {} rows [{}, {})", dim, range.begin,
               range.end);
  const size_t n = static_cast<size_t>(range.rows()) * static_cast<size_t>(dim);
  values_.resize(n);
  for (int64_t r = range.begin; r < range.end; ++r)
    for (int c = 0; c < dim; ++c)
      values_[static_cast<size_t>(r - range.begin) * static_cast<size_t>(dim) + static_cast<size_t>(c)] =
          static_cast<float>(initStd) * normalAt(seed, r, c);
  if (spec.type == SparseOptimizerType::kAdagrad) state0_.assign(n, static_cast<float>(spec.initialAccumulator));
  if (spec.type == SparseOptimizerType::kAdam) {
    state0_.assign(n, 0.0f);
    state1_.assign(n, 0.0f);
  }
}

std::vector<nn::StateBuffer> SparseShard::stateBuffers() {
  switch (spec_.type) {
    case SparseOptimizerType::kSgd: return {};
    case SparseOptimizerType::kAdagrad: return {{"sum", state0_}};
    case SparseOptimizerType::kAdam: return {{"exp_avg", state0_}, {"exp_avg_sq", state1_}};
  }
  return {};
}

void SparseShard::check(std::span<const int64_t> ids, size_t floats, const char* what) const {
  DTRAIN_CHECK(floats == ids.size() * static_cast<size_t>(dim_), "sparse shard {}: {} floats for {} rows of dim {}",
               what, floats, ids.size(), dim_);
  for (int64_t id : ids)
    DTRAIN_CHECK(id >= range_.begin && id < range_.end, "sparse shard {}: row {} is not on server {} (rows [{}, {}))",
                 what, id, range_.server, range_.begin, range_.end);
}

void SparseShard::pull(std::span<const int64_t> ids, std::span<float> out) const {
  check(ids, out.size(), "pull");
  const size_t d = static_cast<size_t>(dim_);
  for (size_t i = 0; i < ids.size(); ++i)
    std::copy_n(values_.data() + static_cast<size_t>(ids[i] - range_.begin) * d, d, out.data() + i * d);
}

void SparseShard::apply(std::span<const int64_t> ids, std::span<const float> grads, double lr) {
  check(ids, grads.size(), "push");
  std::vector<int64_t> sorted(ids.begin(), ids.end());
  std::sort(sorted.begin(), sorted.end());
  DTRAIN_CHECK(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end(),
               "sparse shard push: a row appears twice (coalesce the gradient first)");
  ++steps_;
  const size_t d = static_cast<size_t>(dim_);
  const auto t = static_cast<double>(steps_);
  switch (spec_.type) {
    case SparseOptimizerType::kSgd: {
      const float alpha = static_cast<float>(-lr);
      for (size_t i = 0; i < ids.size(); ++i) {
        float* p = values_.data() + static_cast<size_t>(ids[i] - range_.begin) * d;
        const float* g = grads.data() + i * d;
        for (size_t c = 0; c < d; ++c) p[c] += alpha * g[c];
      }
      break;
    }
    case SparseOptimizerType::kAdagrad: {
      const float clr = static_cast<float>(lr / (1 + (t - 1) * spec_.lrDecay));
      const float eps = static_cast<float>(spec_.eps);
      for (size_t i = 0; i < ids.size(); ++i) {
        const size_t at = static_cast<size_t>(ids[i] - range_.begin) * d;
        float* p = values_.data() + at;
        float* sum = state0_.data() + at;
        const float* g = grads.data() + i * d;
        for (size_t c = 0; c < d; ++c) {
          sum[c] += g[c] * g[c];
          const float std = std::sqrt(sum[c]) + eps;
          p[c] += -clr * (g[c] / std);
        }
      }
      break;
    }
    case SparseOptimizerType::kAdam: {
      const float b1 = static_cast<float>(1 - spec_.beta1), b2 = static_cast<float>(1 - spec_.beta2);
      const float eps = static_cast<float>(spec_.eps);
      const double bc1 = 1 - std::pow(spec_.beta1, t), bc2 = 1 - std::pow(spec_.beta2, t);
      const float stepSize = static_cast<float>(lr * std::sqrt(bc2) / bc1);
      for (size_t i = 0; i < ids.size(); ++i) {
        const size_t at = static_cast<size_t>(ids[i] - range_.begin) * d;
        float* p = values_.data() + at;
        float* m = state0_.data() + at;
        float* v = state1_.data() + at;
        const float* g = grads.data() + i * d;
        for (size_t c = 0; c < d; ++c) {
          const float oldM = m[c], oldV = v[c];
          const float updM = (g[c] - oldM) * b1;
          const float updV = (g[c] * g[c] - oldV) * b2;
          m[c] = oldM + updM;
          v[c] = oldV + updV;
          const float numer = updM + oldM;
          const float denom = std::sqrt(updV + oldV) + eps;
          p[c] += -stepSize * (numer / denom);
        }
      }
      break;
    }
  }
}

}  // namespace dtrain::train::ps
