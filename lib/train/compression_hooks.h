// The compression hooks behind makeCompressionHook (lib/train/compression.h, which states the methods and their
// sources), visible here for tests and for the byte estimates of `dtrain check`.
//
// State lives in buffers indexed by the gradient arena (residuals) or by a plan over the arena's parameters
// (PowerSGD's P, Q and the uncompressed vectors), allocated once in bind(); a bucket is a slice of the arena at
// parameter boundaries, so each bucket's share of every buffer is one contiguous range, whatever the bucket
// sizes or overlap setting are. Nothing allocates per step except the first use of a bucket size (top-k).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "lib/nn/device.h"
#include "lib/nn/host_staging.h"
#include "lib/nn/powersgd_ops.h"
#include "lib/nn/topk_ops.h"
#include "lib/train/compression.h"

namespace dtrain::train {

// A tensor of rank >= 2 as a matrix [shape[0], numel / shape[0]] (PyTorch's tensor.view(shape[0], -1));
// nullopt for vectors and scalars.
struct MatrixDims {
  int64_t rows = 0;
  int64_t cols = 0;
};
std::optional<MatrixDims> matrixDims(const Shape& shape);

// Bytes of one top-k pair on the wire: an int32 index and a float32 value.
inline constexpr uint64_t kTopKPairBytes = 8;

// Where each parameter's gradient goes in PowerSGD: a rank-r factorisation (P: r x rows, Q: r x cols, both
// stored transposed so each factor column is contiguous) or the uncompressed vector buffer.
struct PowerSgdPlan {
  struct Entry {
    size_t offset = 0;  // in the gradient arena
    size_t count = 0;
    bool compressed = false;
    int64_t rows = 0, cols = 0;
    int rank = 0;       // min(rank, rows, cols)
    size_t pOff = 0, qOff = 0, vOff = 0;  // in the P, Q and vector buffers
  };
  std::vector<Entry> entries;  // arena order
  size_t pSize = 0, qSize = 0, vectorSize = 0;
};
// PyTorch's rule: a matrix is compressed when (rows + cols) x r x 2 < rows x cols.
PowerSgdPlan planPowerSgd(const std::vector<GradParam>& params, int rank);

// top-k's fraction of a bucket sent at `compressedStep` (steps since start_step): `ratio`, or during DGC's sparsity
// warm-up (c.warmupSteps > 0) 25%, 6.25%, ... (each stage a quarter of the one before, never below `ratio`), the
// stages equal in length and together warmupSteps long.
double topKDensity(const CompressionSettings& c, int64_t compressedStep);

// What every compression hook shares: bind(), the start_step switch (plain averaging all-reduce before it),
// the step count (checkpointed), the traffic counters, and host staging for GPU buckets.
//
// Host staging (the fallback: top-k and PowerSGD with "device": "cuda" and DTRAIN_COMPRESSION_HOST_STAGING=1; by
// default every hook runs on the device; docs/gpu.md, docs/compression.md; the rule: compression.h's
// stagedThroughHost): the hook gets, for a GPU arena, a host copy of the arena from bind() (nn::HostStaging: pinned
// memory, a copy stream), its operations on the CPU, and runs unchanged on that copy, over the layout's hostGroup (the
// CPU group beside nccl) instead of the nccl data group; stageOnHost() stages any hook bound to a CPU arena (tests):
//   start(bucket)   enqueues the bucket's download (device -> pinned host, on the copy stream after the compute
//                   stream's kernels that wrote it) and returns; the host does not wait, so backward's kernels keep
//                   being enqueued
//   wait()          of any staged bucket first begins, in start order, every staged bucket not begun yet: waits for
//                   its download, then the CPU hook's own start() on the host slice over hostGroup (the selection or
//                   P = M Q, then the asynchronous collective). Then it waits for its own bucket's collective (and
//                   finishing: PowerSGD's Q round, when staged) and enqueues the upload of the result into the device
//                   slice on the compute stream, before the optimizer's kernels.
// The host collectives are therefore issued in the same order on every rank whatever the GPU's timing (all
// starts in bucket order, then the finishing rounds in wait order, as on the CPU), and the values, the state and
// the checkpointed state are the CPU hook's bit for bit. Steps before start_step that keep no host state (the
// plain average without momentum_correction or local_adam) all-reduce on the device group (nccl) unstaged.
// Cost: each compressed step copies the arena down and up once (2 x 4 bytes per parameter over PCIe) and runs the
// hook on the host; the compression's communication starts after backward, not during it.
class CompressionHook : public CommHook {
 public:
  explicit CompressionHook(CompressionSettings settings) : settings_(settings) {}
  std::string name() const override { return compressionTypeName(settings_.type); }
  comm::WorkPtr start(const GradBucket& bucket, comm::Backend& group) final;
  // With layout.device a GPU and a hook that computes on the host (keepsHostState()): also makes the host staging
  // (nn::makeHostStaging) and takes layout.hostGroup (a dtrain::Error when it is null).
  void bind(const HookLayout& layout) final;
  std::vector<HookState> stateBuffers() final;
  std::optional<HookTraffic> traffic() const final { return traffic_; }
  int64_t stepsStarted() const { return step_[0]; }
  // Whether the last step's buckets were compressed (its step was at or after start_step).
  bool lastStepCompressed() const { return step_[0] > settings_.startStep; }
  // Stages every bucket through `staging` and runs the hook over `hostGroup` (as bind() does for a GPU arena);
  // after bind(). Tests pass a CPU stand-in for the device copies. `staging` holds the arena (size() >= arenaSize).
  void stageOnHost(std::unique_ptr<nn::HostStaging> staging, comm::BackendPtr hostGroup);
  bool staged() const { return staging_ != nullptr; }

 protected:
  // Whether the hook computes on host buffers (staged on a GPU); false: it runs where the bucket lives (every type
  // has device kernels). compression.h's stagedThroughHost: only with DTRAIN_COMPRESSION_HOST_STAGING=1.
  bool keepsHostState() const { return stagedThroughHost(settings_.type); }
  // Whether plain() (before start_step) touches host state: then it is staged too on a GPU.
  virtual bool plainOnHost() const { return false; }
  // Starts compressing and communicating a bucket once step >= start_step.
  virtual comm::WorkPtr compress(const GradBucket& bucket, comm::Backend& group) = 0;
  // Before start_step: the plain averaging all-reduce (a hook that took over part of the optimizer adds it here).
  virtual comm::WorkPtr plain(const GradBucket& bucket, comm::Backend& group);
  virtual void allocate() {}
  virtual void addState(std::vector<HookState>& /*out*/) {}
  void sent(uint64_t wireBytes) { traffic_.bytesSent += wireBytes; }

  CompressionSettings settings_;
  HookLayout layout_;
  bool bound_ = false;

 private:
  // The CPU path: traffic, the start_step switch, plain() or compress(), the step count.
  comm::WorkPtr begin(const GradBucket& bucket, comm::Backend& group);
  // Begins every staged bucket not begun yet, in start order (waiting for each one's download).
  void beginStaged();

  struct Staged {
    GradBucket host;        // the bucket over the staging's host memory
    float* device = nullptr;  // the device slice the result goes back to
    int ticket = -1;        // its download
    comm::WorkPtr work;     // the CPU hook's, once begun
  };
  int64_t step_[1] = {0};  // optimizer steps whose buckets were started
  HookTraffic traffic_;
  std::unique_ptr<nn::HostStaging> staging_;
  comm::BackendPtr hostGroup_;
  std::vector<std::shared_ptr<Staged>> notBegun_;  // staged buckets in start order, not begun yet
};

// fp16 / bf16: g / n cast to 16 bits, summed in 16 bits, cast back. Where the bucket lives: a CPU bucket is cast by
// host loops into a host buffer; a GPU bucket (device: cuda, nccl) by kernels into a device buffer, all-reduced by
// NCCL in fp16/bf16 and cast back on the device once the all-reduce completed (PyTorch's fp16_compress_hook /
// bf16_compress_hook on CUDA tensors), so nothing crosses to the host. The same rounding on both (CPU <-> GPU
// parity of the casts; NCCL's 16-bit sums are its own).
class CastHook final : public CompressionHook {
 public:
  using CompressionHook::CompressionHook;

 protected:
  comm::WorkPtr compress(const GradBucket& bucket, comm::Backend& group) override;

 private:
  std::vector<uint16_t> half_;  // arena-sized, allocated at the first CPU bucket
  nn::DeviceFloats deviceHalf_;  // arena-sized 16-bit values (as floats' storage), at the first GPU bucket
};

// top-k with error feedback, exchanged by all-gather of (index, value) pairs, where the arena lives: its state
// (residual, velocity, local Adam's moments), the pair buffers and every operation on them are nn::TopKOps on the
// arena's device (the CPU hook's loops and selection on the CPU; kernels and NCCL's all-gather on device buffers on a
// GPU: nothing staged through host memory; lib/nn/topk_ops.h says what is bit for bit).
class TopKHook final : public CompressionHook {
 public:
  using CompressionHook::CompressionHook;
  // The residual as the checkpoint sees it: the buffer itself on the CPU; on a GPU a host copy taken by
  // stateBuffers().
  std::span<const float> residual() const;
  void stateLoaded(bool sameWorld) override;
  // Runs on `ops` instead of the arena device's (after bind(); state and buffers start afresh): tests pass a CPU
  // stand-in that keeps its buffers away from the host (hostMemory() false), as a GPU does.
  void useOps(std::unique_ptr<nn::TopKOps> ops);
  const nn::TopKOps& ops() const { return *ops_; }  // after bind()

 protected:
  comm::WorkPtr compress(const GradBucket& bucket, comm::Backend& group) override;
  // With momentum_correction the optimizer runs without momentum from the first step, so before start_step
  // the averaged gradient goes through the velocity here (u = m u + g, sent as u): plain momentum SGD.
  comm::WorkPtr plain(const GradBucket& bucket, comm::Backend& group) override;
  bool plainOnHost() const override { return settings_.momentumCorrection || settings_.localAdam; }
  void allocate() override;
  void addState(std::vector<HookState>& out) override;

 private:
  // local_adam's coefficients at this step (bias corrections by the hook's step count).
  gpu::TopkAdam adamCoefficients() const;

  struct Buffers {
    nn::DeviceFloats send, recv;  // k pairs, ranks x k pairs (int32 index and float bits), at `capacity` pairs
    size_t capacity = 0;
    // nn::TopKOps gates: [0, 2) compress() and plain()'s local Adam, [2, 4) plain()'s momentum after the average.
    nn::DeviceFloats gates;
  };
  Buffers& buffersOf(const GradBucket& bucket);  // the bucket's, its gates allocated at first use
  std::unique_ptr<nn::TopKOps> ops_;
  nn::DeviceFloats residual_;  // arena-sized, this rank's unsent gradient (error feedback)
  nn::DeviceFloats velocity_;  // arena-sized, momentum_correction's u
  nn::DeviceFloats adamM_, adamV_;  // arena-sized, local_adam's exp_avg and exp_avg_sq (per rank)
  std::vector<float> residualHost_, velocityHost_, adamMHost_, adamVHost_;  // the checkpoint's copies off the host
  std::map<std::pair<size_t, size_t>, Buffers> buffers_;  // per bucket (offset, count)
};

// PowerSGD with warm start and error feedback, where the arena lives: its buffers (P, Q, the vectors, the residual
// and the copy of g + e) and every operation on them are nn::PowerSgdOps on the arena's device (loops on the CPU;
// cuBLAS, kernels and NCCL on the device buffers on a GPU: nothing staged through host memory), so a GPU job runs the
// CPU hook's algorithm with its state, options and checkpoint files (lib/nn/powersgd_ops.h says what is bit for bit).
class PowerSgdHook final : public CompressionHook {
 public:
  PowerSgdHook(CompressionSettings settings, uint64_t seed) : CompressionHook(settings), seed_(seed) {}
  const PowerSgdPlan& plan() const { return plan_; }
  // Q and the residual as the checkpoint sees them: the buffers themselves on the CPU; on a GPU host copies, taken
  // by stateBuffers(). Empty before bind().
  std::span<const float> q() const;
  std::span<const float> residual() const;
  void stateLoaded(bool sameWorld) override;
  // Runs on `ops` instead of the arena device's (after bind(); state and buffers start afresh): tests pass a CPU
  // stand-in that keeps its buffers away from the host (hostMemory() false), as a GPU does.
  void useOps(std::unique_ptr<nn::PowerSgdOps> ops);
  const nn::PowerSgdOps& ops() const { return *ops_; }  // after bind()

 protected:
  comm::WorkPtr compress(const GradBucket& bucket, comm::Backend& group) override;
  void allocate() override;
  void addState(std::vector<HookState>& out) override;

 private:
  void drawInitialQ(size_t entry);  // Q's initial values of one entry from N(0, 1), the same on every rank
  nn::LowRankFactors factors(size_t entry, float* bucket, size_t bucketOffset);
  // Same-shape compressed matrices of entries [first, last) whose M, P and Q sit at constant strides: one batched
  // product each on a GPU (a GPT's blocks: one run per weight shape). Every compressed entry is in exactly one run.
  struct Run {
    size_t entry = 0;  // the first matrix's
    int64_t count = 1, strideM = 0, strideP = 0, strideQ = 0;
  };
  const std::vector<Run>& runs(size_t first, size_t last);  // cached per bucket
  nn::LowRankBatch batch(const Run& r, float* bucket, size_t bucketOffset);
  void finish(const GradBucket& bucket, comm::Backend& group, size_t first, size_t last);

  uint64_t seed_;
  PowerSgdPlan plan_;
  std::unique_ptr<nn::PowerSgdOps> ops_;
  nn::DeviceFloats p_, q_, vectors_;
  nn::DeviceFloats qInitial_;  // Q's initial values: Q's start, and its restart after a non-finite step
  nn::DeviceFloats gate_;      // the finiteness gate (2 words; nn::PowerSgdOps::checkFinite), reused by every bucket
  nn::DeviceFloats residual_;  // arena-sized (error feedback)
  nn::DeviceFloats input_;     // arena-sized copy of g + e before decompression (error feedback)
  std::vector<float> qHost_, residualHost_;  // the checkpoint's copies when the buffers are not host memory
  std::vector<float> initial_;               // one entry's initial Q, drawn on the host
  std::vector<nn::LowRankFactors> orthogonal_;  // a bucket's matrices for orthogonalise(), reused
  std::map<std::pair<size_t, size_t>, std::vector<Run>> runs_;  // per bucket's entries [first, last)
};

}  // namespace dtrain::train
