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
//
// Every operation on the buffers goes through nn::PowerSgdOps (lib/nn/powersgd_ops.h) on the arena's device: loops
// on the CPU, kernels and cuBLAS on a GPU, where the collectives are NCCL's on the device buffers (ordered after the
// kernels that wrote them by the communicator's events; the kernels after them are enqueued once the host waited
// for them). The host touches the buffers only through the ops (Q's initial values, checkpoints); what a step decides
// about non-finite values is a gate the ops set and read where the buffers live, so no step reads a value back.
#include <algorithm>
#include <cmath>
#include <random>

#include "lib/common/error.h"
#include "lib/train/compression_hooks.h"

namespace dtrain::train {

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
  // A CPU arena never consults the environment (its hook computes on the CPU either way).
  useOps(nn::makePowerSgdOps(layout_.device.isCpu() || keepsHostState() ? Device::cpu() : layout_.device));
}

void PowerSgdHook::useOps(std::unique_ptr<nn::PowerSgdOps> ops) {
  DTRAIN_CHECK(bound_ && ops != nullptr, "powersgd: useOps() before bind() or without operations");
  ops_ = std::move(ops);
  std::vector<GradParam> params = layout_.params;
  // A strategy that names no parameters: the arena is one vector (sent uncompressed).
  if (params.empty() && layout_.arenaSize > 0)
    params.push_back({"arena", Shape{static_cast<int64_t>(layout_.arenaSize)}, 0, layout_.arenaSize});
  plan_ = planPowerSgd(params, settings_.rank);
  runs_.clear();
  p_ = ops_->allocate(plan_.pSize);
  q_ = ops_->allocate(plan_.qSize);
  qInitial_ = ops_->allocate(plan_.qSize);
  gate_ = ops_->allocate(2);
  vectors_ = ops_->allocate(plan_.vectorSize);
  const size_t feedback = settings_.errorFeedback ? layout_.arenaSize : 0;
  residual_ = ops_->allocate(feedback);
  input_ = ops_->allocate(feedback);
  if (!ops_->hostMemory()) {
    qHost_.assign(plan_.qSize, 0.0f);
    residualHost_.assign(feedback, 0.0f);
  } else {
    qHost_.clear();
    residualHost_.clear();
  }
  for (size_t e = 0; e < plan_.entries.size(); ++e) drawInitialQ(e);
  ops_->copy(q_.data(), qInitial_.data(), plan_.qSize);
}

void PowerSgdHook::drawInitialQ(size_t entry) {
  const auto& e = plan_.entries[entry];
  if (!e.compressed) return;
  std::mt19937_64 gen(seed_ * 0x9E3779B97F4A7C15ull + entry);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto count = static_cast<size_t>(e.rank * e.cols);
  initial_.resize(count);
  for (size_t i = 0; i < count; ++i) initial_[i] = normal(gen);
  ops_->toDevice(qInitial_.data() + e.qOff, initial_.data(), count);
}

std::span<const float> PowerSgdHook::q() const {
  if (!ops_) return {};  // before bind()
  return ops_->hostMemory() ? q_.span() : std::span<const float>(qHost_);
}

std::span<const float> PowerSgdHook::residual() const {
  if (!ops_) return {};
  return ops_->hostMemory() ? residual_.span() : std::span<const float>(residualHost_);
}

void PowerSgdHook::addState(std::vector<HookState>& out) {
  if (!ops_->hostMemory()) {  // the checkpoint reads host copies, taken now
    ops_->toHost(qHost_.data(), q_.data(), qHost_.size());
    ops_->toHost(residualHost_.data(), residual_.data(), residualHost_.size());
  }
  auto view = [](std::span<const float> s) { return TensorView::flat(const_cast<float*>(s.data()), s.size()); };
  out.push_back({"powersgd.q", view(q())});
  if (settings_.errorFeedback) out.push_back({"powersgd.residual", view(residual())});
}

void PowerSgdHook::stateLoaded(bool sameWorld) {
  if (!ops_->hostMemory()) {  // the checkpoint wrote the host copies
    ops_->toDevice(q_.data(), qHost_.data(), qHost_.size());
    ops_->toDevice(residual_.data(), residualHost_.data(), residualHost_.size());
  }
  // Q is the same on every rank and carries over; residuals were other ranks' in another world.
  if (!sameWorld) residual_.zero();
}

nn::LowRankFactors PowerSgdHook::factors(size_t entry, float* bucket, size_t bucketOffset) {
  const auto& e = plan_.entries[entry];
  return {.m = bucket + (e.offset - bucketOffset), .pt = p_.data() + e.pOff, .qt = q_.data() + e.qOff,
          .rows = e.rows, .cols = e.cols, .rank = e.rank};
}

const std::vector<PowerSgdHook::Run>& PowerSgdHook::runs(size_t first, size_t last) {
  auto [it, fresh] = runs_.try_emplace({first, last});
  if (!fresh) return it->second;
  const auto& entries = plan_.entries;
  std::vector<bool> taken(last - first, false);
  auto diff = [](size_t a, size_t b) { return static_cast<int64_t>(b) - static_cast<int64_t>(a); };
  for (size_t i = first; i < last; ++i) {
    if (!entries[i].compressed || taken[i - first]) continue;
    Run r{.entry = i};
    taken[i - first] = true;
    size_t prev = i;
    // Greedy, in arena order: a later matrix of the same shape and rank joins when it keeps the run's strides.
    for (size_t j = i + 1; j < last; ++j) {
      const auto &a = entries[prev], &b = entries[j];
      if (!b.compressed || taken[j - first] || b.rows != a.rows || b.cols != a.cols || b.rank != a.rank) continue;
      const int64_t sm = diff(a.offset, b.offset), sp = diff(a.pOff, b.pOff), sq = diff(a.qOff, b.qOff);
      if (r.count > 1 && (sm != r.strideM || sp != r.strideP || sq != r.strideQ)) continue;
      r.strideM = sm, r.strideP = sp, r.strideQ = sq;
      ++r.count;
      taken[j - first] = true;
      prev = j;
    }
    it->second.push_back(r);
  }
  return it->second;
}

nn::LowRankBatch PowerSgdHook::batch(const Run& r, float* bucket, size_t bucketOffset) {
  return {factors(r.entry, bucket, bucketOffset), r.count, r.strideM, r.strideP, r.strideQ};
}

comm::WorkPtr PowerSgdHook::compress(const GradBucket& bucket, comm::Backend& group) {
  const size_t n = static_cast<size_t>(bucket.grads.numel());
  DTRAIN_CHECK(bucket.grads.device == ops_->device(),
               "powersgd: bucket {} lives on {}, but the hook's buffers on {} (bind() saw another device)",
               bucket.index, bucket.grads.device.str(), ops_->device().str());
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
  if (settings_.errorFeedback)
    ops_->accumulate(g, residual_.data() + bucket.offset, input_.data() + bucket.offset, n);
  // P = M Q, one product per run of same-shape matrices; vectors packed for the uncompressed all-reduce.
  for (const Run& r : runs(first, last)) ops_->project(batch(r, g, bucket.offset));
  for (size_t k = first; k < last; ++k) {
    const auto& e = entries[k];
    if (!e.compressed) ops_->copy(vectors_.data() + e.vOff, g + (e.offset - bucket.offset), e.count);
  }
  auto end = [&](size_t PowerSgdPlan::Entry::*off, size_t total) { return last < entries.size() ? entries[last].*off : total; };
  const size_t v0 = entries[first].vOff, v1 = end(&PowerSgdPlan::Entry::vOff, plan_.vectorSize);
  const size_t p0 = entries[first].pOff, p1 = end(&PowerSgdPlan::Entry::pOff, plan_.pSize);
  const size_t q0 = entries[first].qOff, q1 = end(&PowerSgdPlan::Entry::qOff, plan_.qSize);
  const int ranks = group.size();
  const Device device = ops_->device();
  auto view = [device](float* p, size_t n) { return TensorView::flat(p, n, DType::kFloat32, device); };
  sent(allreduceWireBytes((v1 - v0 + p1 - p0 + q1 - q0) * sizeof(float), ranks));
  auto vectors = group.allreduceAsync(view(vectors_.data() + v0, v1 - v0), comm::ReduceOp::kAvg);
  auto ps = group.allreduceAsync(view(p_.data() + p0, p1 - p0), comm::ReduceOp::kSum);
  return thenWork(std::move(ps), [this, vectors, bucket, &group, first, last] {
    vectors->wait();
    finish(bucket, group, first, last);
  });
}

void PowerSgdHook::finish(const GradBucket& bucket, comm::Backend& group, size_t first, size_t last) {
  const size_t n = static_cast<size_t>(bucket.grads.numel());
  float* g = bucket.grads.as<float>();
  const auto& entries = plan_.entries;
  const Device device = ops_->device();
  // Q = M^T P after orthogonalising P: every matrix of the bucket in one call (one launch on a GPU).
  orthogonal_.clear();
  for (size_t k = first; k < last; ++k)
    if (entries[k].compressed) orthogonal_.push_back(factors(k, g, bucket.offset));
  ops_->orthogonalise(orthogonal_);
  for (const Run& r : runs(first, last)) ops_->backProject(batch(r, g, bucket.offset));
  const size_t q0 = entries[first].qOff, q1 = last < entries.size() ? entries[last].qOff : plan_.qSize;
  group.allreduce(TensorView::flat(q_.data() + q0, q1 - q0, DType::kFloat32, device), comm::ReduceOp::kSum);
  ops_->divide(q_.data() + q0, q1 - q0, static_cast<float>(group.size()));
  // M ~ P Q^T; vectors back in place.
  for (const Run& r : runs(first, last)) ops_->decompress(batch(r, g, bucket.offset));
  for (size_t k = first; k < last; ++k) {
    const auto& e = entries[k];
    if (!e.compressed) ops_->copy(g + (e.offset - bucket.offset), vectors_.data() + e.vOff, e.count);
  }
  // The result is the same on every rank, so every rank takes the same branch. A non-finite step (some rank's
  // gradient was) keeps the residual of the step before and restarts Q from its initial values, so later steps are
  // not poisoned; the result stays non-finite for the trainer to report. Decided by the gate where the buffers live.
  auto* gate = reinterpret_cast<uint32_t*>(gate_.data());
  const bool feedback = settings_.errorFeedback;
  ops_->checkFinite(gate, q_.data() + q0, q1 - q0, feedback ? g : nullptr, feedback ? n : 0);
  ops_->restart(q_.data() + q0, qInitial_.data() + q0, q1 - q0, gate);
  if (feedback) ops_->residual(residual_.data() + bucket.offset, input_.data() + bucket.offset, g, n, gate);
}

}  // namespace dtrain::train
