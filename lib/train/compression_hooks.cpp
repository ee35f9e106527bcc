// The shared part of the compression hooks, fp16/bf16 casts and top-k (PowerSGD: powersgd.cpp).
#include "lib/train/compression_hooks.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>

#include "lib/comm/reduce.h"
#include "lib/common/error.h"
#include "lib/nn/optimizer.h"

#if defined(__F16C__) && defined(__AVX2__)
#include <immintrin.h>
#define DTRAIN_TRAIN_F16C 1
#else
#define DTRAIN_TRAIN_F16C 0
#endif

namespace dtrain::train {

namespace {

// h[i] = fp16(g[i] / d), 8 lanes at a time with F16C where the build has it (round to nearest even, as the
// scalar comm::floatToFp16 of the tail).
void toFp16(const float* g, uint16_t* h, size_t n, float d) {
  size_t i = 0;
#if DTRAIN_TRAIN_F16C
  const __m256 div = _mm256_set1_ps(d);
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h + i),
                     _mm256_cvtps_ph(_mm256_div_ps(_mm256_loadu_ps(g + i), div),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) h[i] = comm::floatToFp16(g[i] / d);
}

void fromFp16(const uint16_t* h, float* g, size_t n) {
  size_t i = 0;
#if DTRAIN_TRAIN_F16C
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(g + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
#endif
  for (; i < n; ++i) g[i] = comm::fp16ToFloat(h[i]);
}

// comm::floatToBf16's branch-free rounding, inline so these loops vectorise.
void toBf16(const float* g, uint16_t* h, size_t n, float d) {
  for (size_t i = 0; i < n; ++i) {
    const uint32_t u = std::bit_cast<uint32_t>(g[i] / d);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t quietNan = (u >> 16) | 0x40u;
    h[i] = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quietNan : rounded);
  }
}

void fromBf16(const uint16_t* h, float* g, size_t n) {
  for (size_t i = 0; i < n; ++i) g[i] = std::bit_cast<float>(static_cast<uint32_t>(h[i]) << 16);
}

}  // namespace

std::optional<MatrixDims> matrixDims(const Shape& shape) {
  if (shape.rank() < 2 || shape[0] <= 0) return std::nullopt;
  return MatrixDims{shape[0], shape.numel() / shape[0]};
}

// --- CompressionHook ---

namespace {

// A Work that is already complete: thenWork over it runs its function when waited for.
class CompleteWork final : public comm::Work {
 public:
  void wait() override {}
  bool done() override { return true; }
};

}  // namespace

void CompressionHook::bind(const HookLayout& layout) {
  layout_ = layout;
  bound_ = true;
  allocate();
  if (!layout.device.isCpu() && keepsHostState()) {
    DTRAIN_CHECK(layout.hostGroup != nullptr,
                 "compression hook '{}': a {} arena needs a CPU group beside the device group (HookLayout::hostGroup)",
                 name(), layout.device.str());
    stageOnHost(nn::makeHostStaging(layout.arenaSize, layout.device), layout.hostGroup);
  }
}

void CompressionHook::stageOnHost(std::unique_ptr<nn::HostStaging> staging, comm::BackendPtr hostGroup) {
  DTRAIN_CHECK(bound_, "compression hook '{}': stageOnHost() before bind()", name());
  DTRAIN_CHECK(staging != nullptr && staging->size() >= layout_.arenaSize && hostGroup != nullptr &&
                   hostGroup->device().isCpu(),
               "compression hook '{}': host staging needs an arena of {} floats and a CPU group", name(),
               layout_.arenaSize);
  staging_ = std::move(staging);
  hostGroup_ = std::move(hostGroup);
}

comm::WorkPtr CompressionHook::start(const GradBucket& bucket, comm::Backend& group) {
  DTRAIN_CHECK(bound_, "compression hook '{}': bucket {} started before bind()", name(), bucket.index);
  DTRAIN_CHECK(bucket.offset + static_cast<size_t>(bucket.grads.numel()) <= layout_.arenaSize,
               "compression hook '{}': bucket [{}, +{}) outside the arena of {}", name(), bucket.offset,
               bucket.grads.numel(), layout_.arenaSize);
  // step_ changes only when a step's last bucket begins, after every bucket of the step was started (the strategy
  // starts them all before waiting for any): every bucket of a step takes the same branch.
  if (!staging_ || (step_[0] < settings_.startStep && !plainOnHost())) return begin(bucket, group);
  const size_t n = static_cast<size_t>(bucket.grads.numel());
  auto s = std::make_shared<Staged>();
  s->host = bucket;
  s->host.grads = TensorView::flat(staging_->host() + bucket.offset, n);
  s->device = bucket.grads.as<float>();
  s->ticket = staging_->download(s->device, bucket.offset, n);
  notBegun_.push_back(s);
  return thenWork(std::make_shared<CompleteWork>(), [this, s, n] {
    beginStaged();
    DTRAIN_CHECK(s->work != nullptr, "compression hook: bucket {} was not begun (an earlier bucket of the step failed)",
                 s->host.index);
    s->work->wait();
    staging_->upload(s->device, s->host.offset, n);
  });
}

void CompressionHook::beginStaged() {
  // Oldest first; a bucket leaves the queue before it begins, so a failure does not begin it twice.
  std::vector<std::shared_ptr<Staged>> queue;
  queue.swap(notBegun_);
  for (auto& s : queue) {
    staging_->wait(s->ticket);
    s->work = begin(s->host, *hostGroup_);
  }
}

comm::WorkPtr CompressionHook::begin(const GradBucket& bucket, comm::Backend& group) {
  const uint64_t dense = allreduceWireBytes(bucket.grads.bytes(), group.size());
  traffic_.bytesUncompressed += dense;
  comm::WorkPtr work;
  if (step_[0] < settings_.startStep) {
    sent(dense);
    work = plain(bucket, group);
  } else {
    work = compress(bucket, group);
  }
  if (bucket.last) {
    ++step_[0];
    ++traffic_.steps;
  }
  return work;
}

comm::WorkPtr CompressionHook::plain(const GradBucket& bucket, comm::Backend& group) {
  return group.allreduceAsync(bucket.grads, comm::ReduceOp::kAvg);
}

std::vector<HookState> CompressionHook::stateBuffers() {
  std::vector<HookState> out{{name() + ".step", TensorView::flat(step_, 1)}};
  addState(out);
  return out;
}

// --- fp16 / bf16 ---

comm::WorkPtr CastHook::compress(const GradBucket& bucket, comm::Backend& group) {
  const size_t n = static_cast<size_t>(bucket.grads.numel());
  float* g = bucket.grads.as<float>();
  const bool fp16 = settings_.type == CompressionSettings::Type::kFp16;
  // Divided before the cast (PyTorch's fp16 hook divides by the world size): the sum of n values is then as
  // large as the largest of them, so the 16-bit sum overflows only where one rank's gradient alone would.
  const auto size = static_cast<float>(group.size());
  const Device device = bucket.grads.device;
  if (!device.isCpu()) {
    // On the GPU: cast kernel, NCCL all-reduce in 16 bits on its stream (ordered after the cast by the backend's
    // event on the compute stream), cast back enqueued on the compute stream when the all-reduce has completed
    // (before the optimizer, which is enqueued after the step's buckets are waited for).
    if (deviceHalf_.size() == 0) deviceHalf_ = nn::DeviceFloats(layout_.arenaSize / 2 + 1, device);
    uint16_t* h = reinterpret_cast<uint16_t*>(deviceHalf_.data()) + bucket.offset;
    nn::castToHalf(g, h, n, size, fp16, device);
    sent(allreduceWireBytes(n * 2, group.size()));
    auto work = group.allreduceAsync(TensorView::flat(h, n, fp16 ? DType::kFloat16 : DType::kBFloat16, device),
                                     comm::ReduceOp::kSum);
    return thenWork(std::move(work), [g, h, n, fp16, device] { nn::castFromHalf(h, g, n, fp16, device); });
  }
  if (half_.size() != layout_.arenaSize) half_.assign(layout_.arenaSize, 0);
  uint16_t* h = half_.data() + bucket.offset;
  if (fp16)
    toFp16(g, h, n, size);
  else
    toBf16(g, h, n, size);
  const DType dtype = fp16 ? DType::kFloat16 : DType::kBFloat16;
  sent(allreduceWireBytes(n * 2, group.size()));
  auto work = group.allreduceAsync(TensorView::flat(h, n, dtype), comm::ReduceOp::kSum);
  return thenWork(std::move(work), [g, h, n, fp16] {
    if (fp16)
      fromFp16(h, g, n);
    else
      fromBf16(h, g, n);
  });
}

// --- top-k ---

double topKDensity(const CompressionSettings& c, int64_t compressedStep) {
  constexpr double kFirst = 0.25;  // DGC's first stage: 75% sparsity
  if (c.warmupSteps <= 0 || c.ratio >= kFirst || compressedStep >= c.warmupSteps) return c.ratio;
  int stages = 0;  // densities 25%, 6.25%, 1.56%... above the target
  for (double d = kFirst; d > c.ratio; d /= 4) ++stages;
  const auto stage = static_cast<int>(std::max<int64_t>(compressedStep, 0) * stages / c.warmupSteps);
  return std::max(c.ratio, kFirst / std::pow(4.0, stage));
}

void TopKHook::allocate() {
  // A CPU arena never consults the environment (its hook computes on the CPU either way).
  useOps(nn::makeTopKOps(layout_.device.isCpu() || keepsHostState() ? Device::cpu() : layout_.device));
}

void TopKHook::useOps(std::unique_ptr<nn::TopKOps> ops) {
  DTRAIN_CHECK(bound_ && ops != nullptr, "topk: useOps() before bind() or without operations");
  ops_ = std::move(ops);
  const size_t n = layout_.arenaSize;
  residual_ = ops_->allocate(settings_.errorFeedback ? n : 0);
  velocity_ = ops_->allocate(settings_.momentumCorrection ? n : 0);
  adamM_ = ops_->allocate(settings_.localAdam ? n : 0);
  adamV_ = ops_->allocate(settings_.localAdam ? n : 0);
  buffers_.clear();
  auto mirror = [&](std::vector<float>& host, const nn::DeviceFloats& dev) {
    host.assign(ops_->hostMemory() ? 0 : dev.size(), 0.0f);
  };
  mirror(residualHost_, residual_);
  mirror(velocityHost_, velocity_);
  mirror(adamMHost_, adamM_);
  mirror(adamVHost_, adamV_);
}

std::span<const float> TopKHook::residual() const {
  if (!ops_) return {};  // before bind()
  return ops_->hostMemory() ? residual_.span() : std::span<const float>(residualHost_);
}

gpu::TopkAdam TopKHook::adamCoefficients() const {
  // torch.optim.Adam's update without lr, on this rank's gradient: m and v per rank (updated since the first step,
  // before start_step too), bias-corrected by the hook's step count.
  const auto t = static_cast<double>(stepsStarted() + 1);
  const double bc1 = 1.0 - std::pow(settings_.beta1, t);
  const double bc2 = 1.0 - std::pow(settings_.beta2, t);
  return {.beta1 = static_cast<float>(settings_.beta1), .keep1 = static_cast<float>(1.0 - settings_.beta1),
          .beta2 = static_cast<float>(settings_.beta2), .keep2 = static_cast<float>(1.0 - settings_.beta2),
          .invBc1 = static_cast<float>(1.0 / bc1), .bc2Sqrt = static_cast<float>(std::sqrt(bc2)),
          .eps = static_cast<float>(settings_.eps)};
}

void TopKHook::addState(std::vector<HookState>& out) {
  struct Piece {
    const char* name;
    bool on;
    nn::DeviceFloats& dev;
    std::vector<float>& host;
  };
  const Piece pieces[] = {{"topk.residual", settings_.errorFeedback, residual_, residualHost_},
                          {"topk.velocity", settings_.momentumCorrection, velocity_, velocityHost_},
                          {"topk.adam_exp_avg", settings_.localAdam, adamM_, adamMHost_},
                          {"topk.adam_exp_avg_sq", settings_.localAdam, adamV_, adamVHost_}};
  for (const Piece& p : pieces) {
    if (!p.on) continue;
    if (ops_->hostMemory()) {
      out.push_back({p.name, TensorView::flat(p.dev.data(), p.dev.size())});
    } else {  // the checkpoint reads host copies, taken now
      ops_->toHost(p.host.data(), p.dev.data(), p.host.size());
      out.push_back({p.name, TensorView::flat(p.host.data(), p.host.size())});
    }
  }
}

void TopKHook::stateLoaded(bool sameWorld) {
  if (!ops_->hostMemory()) {  // the checkpoint wrote the host copies
    ops_->toDevice(residual_.data(), residualHost_.data(), residualHost_.size());
    ops_->toDevice(velocity_.data(), velocityHost_.data(), velocityHost_.size());
    ops_->toDevice(adamM_.data(), adamMHost_.data(), adamMHost_.size());
    ops_->toDevice(adamV_.data(), adamVHost_.data(), adamVHost_.size());
  }
  // Another world: the residuals were other ranks' (and another data split's); start from none. Local Adam's
  // moments (rank 0's) are kept: any rank's estimate of the gradient's statistics is as good as its own.
  if (!sameWorld) {
    ops_->zero(residual_.data(), residual_.size());
    ops_->zero(velocity_.data(), velocity_.size());
  }
}

TopKHook::Buffers& TopKHook::buffersOf(const GradBucket& bucket) {
  Buffers& b = buffers_[{bucket.offset, static_cast<size_t>(bucket.grads.numel())}];
  if (b.gates.size() == 0) b.gates = ops_->allocate(4);
  return b;
}

comm::WorkPtr TopKHook::plain(const GradBucket& bucket, comm::Backend& group) {
  const size_t n = static_cast<size_t>(bucket.grads.numel());
  float* g = bucket.grads.as<float>();
  auto* gates = reinterpret_cast<uint32_t*>(buffersOf(bucket).gates.data());
  // local_adam: this rank's moments follow its gradients from the first step, so that they are warm (and their
  // bias correction small) when the hook starts sending its Adam update: started cold at start_step, every
  // coordinate's first update would be a full step of sign(g) at the learning rate of that step. A non-finite
  // gradient leaves them as they were (the gate).
  if (settings_.localAdam) {
    ops_->openGate(gates, g, n);
    ops_->adamMoments(adamM_.data() + bucket.offset, adamV_.data() + bucket.offset, g, n, adamCoefficients(), gates);
  }
  auto work = group.allreduceAsync(bucket.grads, comm::ReduceOp::kAvg);
  if (!settings_.momentumCorrection) return work;
  return thenWork(std::move(work), [this, g, u = velocity_.data() + bucket.offset, n, gate = gates + 2,
                                    m = static_cast<float>(settings_.momentum)] {
    // The same average on every rank: the velocities stay equal. A non-finite average leaves u as it was.
    ops_->openGate(gate, g, n);
    ops_->plainMomentum(u, g, n, m, gate);
  });
}

comm::WorkPtr TopKHook::compress(const GradBucket& bucket, comm::Backend& group) {
  const size_t n = static_cast<size_t>(bucket.grads.numel());
  DTRAIN_CHECK(n <= static_cast<size_t>(std::numeric_limits<int32_t>::max()),
               "topk: bucket {} has {} elements, more than int32 indices address; lower parallel.bucket_mb",
               bucket.index, n);
  DTRAIN_CHECK(bucket.grads.device == ops_->device(),
               "topk: bucket {} lives on {}, but the hook's buffers on {} (bind() saw another device)", bucket.index,
               bucket.grads.device.str(), ops_->device().str());
  auto kOf = [n](double density) {
    return std::clamp<size_t>(static_cast<size_t>(std::ceil(density * static_cast<double>(n))), 1, n);
  };
  const size_t k = kOf(topKDensity(settings_, stepsStarted() - settings_.startStep));
  const int ranks = group.size();
  float* g = bucket.grads.as<float>();
  Buffers& b = buffersOf(bucket);
  if (b.capacity < k) {
    // The largest k this bucket sees: the sparsity warm-up's first stage (its k only falls after): no reallocation.
    b.capacity = std::max(k, kOf(topKDensity(settings_, 0)));
    b.send = ops_->allocate(2 * b.capacity);
    b.recv = ops_->allocate(2 * b.capacity * static_cast<size_t>(ranks));
  }
  auto* send = reinterpret_cast<int32_t*>(b.send.data());
  auto* recv = reinterpret_cast<int32_t*>(b.recv.data());
  // A non-finite gradient is sent as NaN values (every rank's result is then non-finite, so all stop or skip
  // together) and leaves the residual as it was. The decisions are the gate's, on the ops' device: a GPU's host
  // enqueues every step below without waiting for the bucket's values (nn::TopKOps).
  auto* gate = reinterpret_cast<uint32_t*>(b.gates.data());
  ops_->openGate(gate, g, n);
  if (settings_.localClipNorm > 0) {
    // DGC's local gradient clipping, and this bucket's share of it by its size. DGC sums the ranks' gradients,
    // each scaled by 1/ranks, and clips each to the global threshold over sqrt(ranks) (the sum of n independent
    // gradients has sqrt(n) times their norm). Here each rank holds its unscaled mean, ranks times DGC's, so the
    // threshold is the global one times sqrt(ranks).
    const double limit = settings_.localClipNorm *
                         std::sqrt(static_cast<double>(n) / static_cast<double>(layout_.arenaSize)) *
                         std::sqrt(static_cast<double>(ranks));
    ops_->clip(g, n, limit, gate);
  }
  if (settings_.localAdam)
    ops_->adamUpdate(adamM_.data() + bucket.offset, adamV_.data() + bucket.offset, g, n, adamCoefficients(), gate);
  float* acc = g;
  float* velocity = settings_.momentumCorrection ? velocity_.data() + bucket.offset : nullptr;
  if (settings_.errorFeedback) {
    acc = residual_.data() + bucket.offset;
    if (velocity)
      ops_->momentum(velocity, acc, g, n, static_cast<float>(settings_.momentum), gate);
    else
      ops_->accumulate(acc, g, n, gate);
    // The sum overflowed: drop the residual (and the velocity) rather than keep an infinity, and send NaN.
    ops_->dropNonFinite(acc, velocity, n, gate);
  }
  const bool masking = velocity != nullptr && settings_.momentumMasking;
  ops_->select(acc, n, k, send, settings_.errorFeedback, masking ? velocity : nullptr, gate);
  sent(allgatherWireBytes(k * kTopKPairBytes, ranks));
  const Device device = ops_->device();
  auto work = group.allgatherAsync(TensorView::flat(send, 2 * k, DType::kInt32, device),
                                   TensorView::flat(recv, 2 * k * static_cast<size_t>(ranks), DType::kInt32, device));
  return thenWork(std::move(work), [this, g, n, k, ranks, recv] { ops_->decompress(g, n, recv, k, ranks); });
}

}  // namespace dtrain::train
