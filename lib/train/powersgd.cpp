// PowerSGD (Vogels, Karimireddy, Jaggi: "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
// Optimization", NeurIPS 2019), following PyTorch's torch/distributed/algorithms/ddp_comm_hooks/powerSGD_hook.py:
//
//   M = g + e (error feedback), per matrix-shaped parameter; vectors go to one uncompressed buffer
//   P = M Q             (Q: last step's, warm start; at first from N(0, 1), equal on every rank)
//   all-reduce P (sum) and the vectors (average), at once, while backward goes on
//   orthogonalise P (Gram-Schmidt over its r columns)
//   Q = M^T P; all-reduce Q (sum); Q /= n
//   M ~ P Q^T           (the average of the ranks' M, projected on P's span)
//   e = (g + e) - M~    (what this rank's gradient lost; the whole bucket, vectors included, as PyTorch)
// The first step runs when the bucket starts (start()), the rest when the strategy waits for it (wait()).
// Factors are stored transposed (r x rows, r x cols) so that every product below walks contiguous rows.
#include <algorithm>
#include <cmath>
#include <random>

#include "lib/common/error.h"
#include "lib/nn/optimizer.h"
#include "lib/train/compression_hooks.h"

namespace dtrain::train {

namespace {

// PyTorch's orthogonalization_epsilon: keeps a zero column (a layer without gradient) zero instead of NaN.
constexpr double kOrthoEpsilon = 1e-8;

// Gram-Schmidt over the r rows (length `len`) of `pt`: each row normalised, then removed from the later ones.
void orthogonalise(float* pt, int r, int64_t len) {
  const auto n = static_cast<size_t>(len);
  for (int c = 0; c < r; ++c) {
    float* col = pt + static_cast<size_t>(c) * n;
    double norm = 0;
    for (size_t i = 0; i < n; ++i) norm += static_cast<double>(col[i]) * col[i];
    const auto inv = static_cast<float>(1.0 / (std::sqrt(norm) + kOrthoEpsilon));
    for (size_t i = 0; i < n; ++i) col[i] *= inv;
    for (int d = c + 1; d < r; ++d) {
      float* rest = pt + static_cast<size_t>(d) * n;
      double dot = 0;
      for (size_t i = 0; i < n; ++i) dot += static_cast<double>(col[i]) * rest[i];
      const auto f = static_cast<float>(dot);
      for (size_t i = 0; i < n; ++i) rest[i] -= f * col[i];
    }
  }
}

// A dot product in 8 independent partial sums (then added in a fixed order): the compiler vectorises it
// without reassociating anything, and every rank computes it the same way.
float dot(const float* a, const float* b, size_t n) {
  float part[8] = {};
  size_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (size_t l = 0; l < 8; ++l) part[l] += a[j + l] * b[j + l];
  float sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

}  // namespace

PowerSgdPlan planPowerSgd(const std::vector<GradParam>& params, int rank) {
  PowerSgdPlan plan;
  for (const GradParam& p : params) {
    PowerSgdPlan::Entry e{.offset = p.offset, .count = p.count, .pOff = plan.pSize, .qOff = plan.qSize,
                          .vOff = plan.vectorSize};
    if (auto dims = matrixDims(p.shape)) {
      const int r = static_cast<int>(std::min<int64_t>({rank, dims->rows, dims->cols}));
      // PyTorch's _should_compress with min_compression_rate 2.
      if ((dims->rows + dims->cols) * r * 2 < dims->rows * dims->cols) {
        e.compressed = true;
        e.rows = dims->rows;
        e.cols = dims->cols;
        e.rank = r;
      }
    }
    if (e.compressed) {
      plan.pSize += static_cast<size_t>(e.rank * e.rows);
      plan.qSize += static_cast<size_t>(e.rank * e.cols);
    } else {
      plan.vectorSize += e.count;
    }
    plan.entries.push_back(e);
  }
  return plan;
}

void PowerSgdHook::allocate() {
  std::vector<GradParam> params = layout_.params;
  // A strategy that names no parameters: the arena is one vector (sent uncompressed).
  if (params.empty() && layout_.arenaSize > 0)
    params.push_back({"arena", Shape{static_cast<int64_t>(layout_.arenaSize)}, 0, layout_.arenaSize});
  plan_ = planPowerSgd(params, settings_.rank);
  p_.assign(plan_.pSize, 0.0f);
  q_.assign(plan_.qSize, 0.0f);
  vectors_.assign(plan_.vectorSize, 0.0f);
  for (size_t e = 0; e < plan_.entries.size(); ++e) initQ(e);
  residual_.assign(settings_.errorFeedback ? layout_.arenaSize : 0, 0.0f);
  input_.assign(settings_.errorFeedback ? layout_.arenaSize : 0, 0.0f);
}

void PowerSgdHook::initQ(size_t entry) {
  const auto& e = plan_.entries[entry];
  if (!e.compressed) return;
  std::mt19937_64 gen(seed_ * 0x9E3779B97F4A7C15ull + entry);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  float* q = q_.data() + e.qOff;
  for (size_t i = 0; i < static_cast<size_t>(e.rank * e.cols); ++i) q[i] = normal(gen);
}

void PowerSgdHook::addState(std::vector<HookState>& out) {
  out.push_back({"powersgd.q", TensorView::flat(q_.data(), q_.size())});
  if (settings_.errorFeedback)
    out.push_back({"powersgd.residual", TensorView::flat(residual_.data(), residual_.size())});
}

void PowerSgdHook::stateLoaded(bool sameWorld) {
  // Q is the same on every rank and carries over; residuals were other ranks' in another world.
  if (!sameWorld) std::fill(residual_.begin(), residual_.end(), 0.0f);
}

comm::WorkPtr PowerSgdHook::compress(const GradBucket& bucket, comm::Backend& group) {
  const size_t n = static_cast<size_t>(bucket.grads.numel());
  float* g = bucket.grads.as<float>();
  const auto& entries = plan_.entries;
  auto at = [&](size_t offset) {
    return static_cast<size_t>(std::lower_bound(entries.begin(), entries.end(), offset,
                                                [](const PowerSgdPlan::Entry& e, size_t o) { return e.offset < o; }) -
                               entries.begin());
  };
  const size_t first = at(bucket.offset), last = at(bucket.offset + n);
  DTRAIN_CHECK(first < entries.size() && entries[first].offset == bucket.offset && first < last,
               "powersgd: bucket {} at arena offset {} does not start at a parameter", bucket.index, bucket.offset);
  if (settings_.errorFeedback) {
    const float* e = residual_.data() + bucket.offset;
    for (size_t i = 0; i < n; ++i) g[i] += e[i];
    std::copy(g, g + n, input_.data() + bucket.offset);
  }
  // P = M Q per matrix; vectors packed for the uncompressed all-reduce.
  for (size_t k = first; k < last; ++k) {
    const auto& e = entries[k];
    const float* m = g + (e.offset - bucket.offset);
    if (!e.compressed) {
      std::copy(m, m + e.count, vectors_.data() + e.vOff);
      continue;
    }
    const auto rows = static_cast<size_t>(e.rows), cols = static_cast<size_t>(e.cols);
    float* pt = p_.data() + e.pOff;
    const float* qt = q_.data() + e.qOff;
    for (size_t i = 0; i < rows; ++i) {
      const float* row = m + i * cols;
      for (int c = 0; c < e.rank; ++c) pt[static_cast<size_t>(c) * rows + i] = dot(row, qt + static_cast<size_t>(c) * cols, cols);
    }
  }
  auto end = [&](size_t PowerSgdPlan::Entry::*off, size_t total) { return last < entries.size() ? entries[last].*off : total; };
  const size_t v0 = entries[first].vOff, v1 = end(&PowerSgdPlan::Entry::vOff, plan_.vectorSize);
  const size_t p0 = entries[first].pOff, p1 = end(&PowerSgdPlan::Entry::pOff, plan_.pSize);
  const size_t q0 = entries[first].qOff, q1 = end(&PowerSgdPlan::Entry::qOff, plan_.qSize);
  const int ranks = group.size();
  sent(allreduceWireBytes((v1 - v0 + p1 - p0 + q1 - q0) * sizeof(float), ranks));
  auto vectors = group.allreduceAsync(TensorView::flat(vectors_.data() + v0, v1 - v0), comm::ReduceOp::kAvg);
  auto ps = group.allreduceAsync(TensorView::flat(p_.data() + p0, p1 - p0), comm::ReduceOp::kSum);
  return thenWork(std::move(ps), [this, vectors, bucket, &group, first, last] {
    vectors->wait();
    finish(bucket, group, first, last);
  });
}

void PowerSgdHook::finish(const GradBucket& bucket, comm::Backend& group, size_t first, size_t last) {
  const size_t n = static_cast<size_t>(bucket.grads.numel());
  float* g = bucket.grads.as<float>();
  const auto& entries = plan_.entries;
  // Q = M^T P after orthogonalising P.
  for (size_t k = first; k < last; ++k) {
    const auto& e = entries[k];
    if (!e.compressed) continue;
    const auto rows = static_cast<size_t>(e.rows), cols = static_cast<size_t>(e.cols);
    const float* m = g + (e.offset - bucket.offset);
    float* pt = p_.data() + e.pOff;
    float* qt = q_.data() + e.qOff;
    orthogonalise(pt, e.rank, e.rows);
    std::fill(qt, qt + static_cast<size_t>(e.rank) * cols, 0.0f);
    for (size_t i = 0; i < rows; ++i) {
      const float* row = m + i * cols;
      for (int c = 0; c < e.rank; ++c) {
        const float a = pt[static_cast<size_t>(c) * rows + i];
        float* qc = qt + static_cast<size_t>(c) * cols;
        for (size_t j = 0; j < cols; ++j) qc[j] += a * row[j];
      }
    }
  }
  const size_t q0 = entries[first].qOff, q1 = last < entries.size() ? entries[last].qOff : plan_.qSize;
  group.allreduce(TensorView::flat(q_.data() + q0, q1 - q0), comm::ReduceOp::kSum);
  const auto size = static_cast<float>(group.size());
  for (size_t i = q0; i < q1; ++i) q_[i] /= size;
  // M ~ P Q^T; vectors back in place.
  for (size_t k = first; k < last; ++k) {
    const auto& e = entries[k];
    float* m = g + (e.offset - bucket.offset);
    if (!e.compressed) {
      std::copy(vectors_.data() + e.vOff, vectors_.data() + e.vOff + e.count, m);
      continue;
    }
    const auto rows = static_cast<size_t>(e.rows), cols = static_cast<size_t>(e.cols);
    const float* pt = p_.data() + e.pOff;
    const float* qt = q_.data() + e.qOff;
    for (size_t i = 0; i < rows; ++i) {
      float* row = m + i * cols;
      std::fill(row, row + cols, 0.0f);
      for (int c = 0; c < e.rank; ++c) {
        const float a = pt[static_cast<size_t>(c) * rows + i];
        const float* qc = qt + static_cast<size_t>(c) * cols;
        for (size_t j = 0; j < cols; ++j) row[j] += a * qc[j];
      }
    }
  }
  // The result is the same on every rank, so every rank takes the same branch. A non-finite step (some rank's
  // gradient was) keeps the residual of the step before and restarts Q, so later steps are not poisoned.
  if (!nn::allFinite({q_.data() + q0, q1 - q0}))
    for (size_t k = first; k < last; ++k) initQ(k);
  if (settings_.errorFeedback && nn::allFinite({g, n})) {
    float* e = residual_.data() + bucket.offset;
    const float* in = input_.data() + bucket.offset;
    for (size_t i = 0; i < n; ++i) e[i] = in[i] - g[i];
  }
}

}  // namespace dtrain::train
