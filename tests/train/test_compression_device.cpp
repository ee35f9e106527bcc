// PowerSGD's and top-k's GPU paths run on the CPU: the hooks' operations (lib/nn/powersgd_ops.h, topk_ops.h) are a
// stand-in that computes like the CPU's but keeps its buffers away from the host as a GPU does (hostMemory() false: the checkpointed state
// goes through toHost/toDevice copies, every write of a buffer through an operation). Driven by DDP as a GPU job
// drives it (its buckets, their order, overlap on and off) on 2 ranks, it must give the CPU hook's results, state
// and traffic bit for bit; its state saved into a CPU hook (a GPU checkpoint resumed on the CPU) and the other way
// round must continue bit for bit.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "lib/comm/registry.h"
#include "lib/nn/model.h"
#include "lib/nn/powersgd_ops.h"
#include "lib/nn/topk_ops.h"
#include "lib/train/compression.h"
#include "lib/train/compression_hooks.h"
#include "lib/train/ddp.h"
#include "rendezvous/memory_store.h"
#include "tests/comm/comm_test_util.h"

using namespace dtrain;
using namespace dtrain::train;
using nlohmann::json;

namespace {

// The CPU's operations behind a device's interface: buffers the host must not use directly, counted copies.
class OffHostOps final : public nn::PowerSgdOps {
 public:
  Device device() const override { return Device::cpu(); }
  bool hostMemory() const override { return false; }
  nn::DeviceFloats allocate(size_t n) override { return cpu_->allocate(n); }
  void accumulate(float* g, const float* e, float* in, size_t n) override { cpu_->accumulate(g, e, in, n); }
  void residual(float* e, const float* in, const float* g, size_t n, const uint32_t* gate) override {
    cpu_->residual(e, in, g, n, gate);
  }
  void copy(float* dst, const float* src, size_t n) override { cpu_->copy(dst, src, n); }
  // Each call is one product (a GPU's one GEMM launch, batched or not); `seen` records every matrix it covered.
  void project(const nn::LowRankBatch& b) override {
    record(b, 0);
    cpu_->project(b);
  }
  void backProject(const nn::LowRankBatch& b) override {
    record(b, 1);
    cpu_->backProject(b);
  }
  void decompress(const nn::LowRankBatch& b) override {
    record(b, 2);
    cpu_->decompress(b);
  }
  struct Seen {
    int product;  // 0 project, 1 backProject, 2 decompress
    const float *m, *pt, *qt;
    int64_t rows, cols;
  };
  std::vector<Seen> seen;
  // Each call is one Gram-Schmidt launch (a GPU's, for up to 128 matrices); `orthogonalised` records every P it
  // covered (P^T, rank, rows).
  void orthogonalise(std::span<const nn::LowRankFactors> matrices) override {
    ++orthoCalls;
    for (const nn::LowRankFactors& f : matrices) orthogonalised.push_back({f.pt, f.rank, f.rows});
    cpu_->orthogonalise(matrices);
  }
  struct Orthogonalised {
    const float* pt;
    int rank;
    int64_t rows;
  };
  std::vector<Orthogonalised> orthogonalised;
  int orthoCalls = 0;
  void divide(float* x, size_t n, float divisor) override { cpu_->divide(x, n, divisor); }
  // The gate lives in the stand-in's memory like every buffer: reading it is the CPU ops' business, not the hook's.
  void checkFinite(uint32_t* gate, const float* q, size_t nq, const float* g, size_t ng) override {
    cpu_->checkFinite(gate, q, nq, g, ng);
  }
  void restart(float* q, const float* initial, size_t n, const uint32_t* gate) override {
    cpu_->restart(q, initial, n, gate);
  }
  void toDevice(float* dst, const float* host, size_t n) override {
    ++toDeviceCalls;
    cpu_->toDevice(dst, host, n);
  }
  void toHost(float* host, const float* src, size_t n) override {
    ++toHostCalls;
    ++hostReads;
    cpu_->toHost(host, src, n);
  }
  int toDeviceCalls = 0, toHostCalls = 0;
  int gemmCalls = 0;
  int hostReads = 0;  // calls that make the host wait for the device (a GPU's would): none may happen in a step

 private:
  void record(const nn::LowRankBatch& b, int product) {
    ++gemmCalls;
    for (int64_t i = 0; i < b.count; ++i) {
      const nn::LowRankFactors f = b.at(i);
      seen.push_back({product, f.m, f.pt, f.qt, f.rows, f.cols});
    }
  }
  std::unique_ptr<nn::PowerSgdOps> cpu_ = nn::makePowerSgdOps(Device::cpu());
};

// The same for top-k.
class OffHostTopKOps final : public nn::TopKOps {
 public:
  Device device() const override { return Device::cpu(); }
  bool hostMemory() const override { return false; }
  nn::DeviceFloats allocate(size_t n) override { return cpu_->allocate(n); }
  // The gates live in the stand-in's memory like every buffer: reading one is the CPU ops' business, not the hook's.
  void openGate(uint32_t* gate, const float* x, size_t n) override { cpu_->openGate(gate, x, n); }
  void clip(float* g, size_t n, double limit, const uint32_t* gate) override { cpu_->clip(g, n, limit, gate); }
  void zero(float* x, size_t n) override { cpu_->zero(x, n); }
  void adamMoments(float* m, float* v, const float* g, size_t n, const gpu::TopkAdam& a,
                   const uint32_t* gate) override {
    cpu_->adamMoments(m, v, g, n, a, gate);
  }
  void adamUpdate(float* m, float* v, float* g, size_t n, const gpu::TopkAdam& a, const uint32_t* gate) override {
    cpu_->adamUpdate(m, v, g, n, a, gate);
  }
  void accumulate(float* acc, const float* g, size_t n, const uint32_t* gate) override {
    cpu_->accumulate(acc, g, n, gate);
  }
  void momentum(float* u, float* acc, const float* g, size_t n, float m, const uint32_t* gate) override {
    cpu_->momentum(u, acc, g, n, m, gate);
  }
  void plainMomentum(float* u, float* g, size_t n, float m, const uint32_t* gate) override {
    cpu_->plainMomentum(u, g, n, m, gate);
  }
  void dropNonFinite(float* acc, float* velocity, size_t n, uint32_t* gate) override {
    cpu_->dropNonFinite(acc, velocity, n, gate);
  }
  void select(float* acc, size_t n, size_t k, int32_t* pairs, bool zeroTaken, float* velocity,
              const uint32_t* gate) override {
    cpu_->select(acc, n, k, pairs, zeroTaken, velocity, gate);
  }
  void decompress(float* g, size_t n, const int32_t* pairs, size_t k, int ranks) override {
    cpu_->decompress(g, n, pairs, k, ranks);
  }
  void toDevice(float* dst, const float* host, size_t n) override {
    ++toDeviceCalls;
    cpu_->toDevice(dst, host, n);
  }
  void toHost(float* host, const float* src, size_t n) override {
    ++toHostCalls;
    ++hostReads;
    cpu_->toHost(host, src, n);
  }
  int toDeviceCalls = 0, toHostCalls = 0;
  int hostReads = 0;  // calls that make the host wait for the device (a GPU's would): none may happen in a step

 private:
  std::unique_ptr<nn::TopKOps> cpu_ = nn::makeTopKOps(Device::cpu());
};

// The stand-in's counters: its toHost copies, and (top-k) its calls that would make the host wait for a GPU.
struct OffHostCounts {
  std::function<int()> toHost;
  // PowerSGD's Q all-reduce blocks at wait() (a collective, not a read of the device's values): not counted.
  std::function<int()> hostReads;
};

// Puts a bound PowerSGD or top-k hook on the stand-in.
OffHostCounts offHost(CommHook& hook) {
  if (auto* p = dynamic_cast<PowerSgdHook*>(&hook)) {
    auto owned = std::make_unique<OffHostOps>();
    OffHostOps* ops = owned.get();
    p->useOps(std::move(owned));
    return {[ops] { return ops->toHostCalls; }, [ops] { return ops->hostReads; }};
  }
  auto owned = std::make_unique<OffHostTopKOps>();
  OffHostTopKOps* ops = owned.get();
  dynamic_cast<TopKHook&>(hook).useOps(std::move(owned));
  return {[ops] { return ops->toHostCalls; }, [ops] { return ops->hostReads; }};
}

bool sameBits(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

std::vector<std::vector<float>> floatState(CommHook& hook) {
  std::vector<std::vector<float>> out;
  for (auto& s : hook.stateBuffers())
    if (s.view.dtype == DType::kFloat32) out.emplace_back(s.view.as<float>(), s.view.as<float>() + s.view.numel());
  return out;
}

struct RankResult {
  std::vector<std::vector<float>> grads;  // per step, after the hook
  std::vector<std::vector<float>> state;
  HookTraffic traffic;
  int toHost = 0;
  std::vector<int> hostReads;  // per step, the stand-in's blocking reads
};

// Changes a rank's output gradient dy at a step (a non-finite or huge gradient on one rank).
using Perturb = std::function<void(int rank, int step, std::vector<float>& dy)>;

constexpr int kRanks = 2, kBatch = 4, kSteps = 5;

// kSteps DDP steps of a 3-layer MLP on 2 ranks (one bucket per layer with overlap, the whole arena without).
std::vector<RankResult> runDdp(const CompressionSettings& c, bool overlap, bool offHostOps, const Perturb& perturb) {
  auto spec = nn::parseModelSpec(json::parse(R"({"input": [100], "layers": [
      {"type": "linear", "out": 50}, {"type": "relu"}, {"type": "linear", "out": 40}, {"type": "relu"},
      {"type": "linear", "out": 10}]})"), "t.json");
  auto store = rendezvous::MemoryStore::create();
  std::vector<RankResult> out(kRanks);
  auto errors = comm::testing::onRanks(kRanks, [&](int rank) {
    RankResult& r = out[static_cast<size_t>(rank)];
    auto data = comm::createBackend("tcp", comm::testing::rankOptions(rank, kRanks, store));
    auto hook = makeCompressionHook(c, 3);
    DdpStrategy ddp(ProcessGroups{.rank = rank, .worldSize = kRanks, .dataRank = rank, .dataSize = kRanks,
                                  .world = data, .data = data},
                    {.firstBucketMb = 0.002, .bucketMb = 0.023, .overlap = overlap, .hook = hook});
    nn::Model model = nn::Model::build(spec, kBatch, 1);
    ddp.prepare(model);
    OffHostCounts counts;
    if (offHostOps) counts = offHost(*hook);
    for (int step = 0; step < kSteps; ++step) {
      std::vector<float> x(kBatch * 100), dy(kBatch * 10);
      for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.1f * static_cast<float>(i) + static_cast<float>(rank + step));
      for (size_t i = 0; i < dy.size(); ++i)
        dy[i] = 0.01f * static_cast<float>((i * 7 + rank * 3 + step) % 11) - 0.05f;
      if (perturb) perturb(rank, step, dy);
      const int readsBefore = counts.hostReads ? counts.hostReads() : 0;
      model.forward(x.data(), kBatch, true);
      model.backward(TensorView::f32(dy.data(), Shape{kBatch, 10}), ddp.gradReadyHook(), nn::GradMode::kOverwrite);
      ddp.finishStep();
      if (counts.hostReads) r.hostReads.push_back(counts.hostReads() - readsBefore);
      auto g = model.grads();
      r.grads.emplace_back(g.begin(), g.end());
    }
    r.state = floatState(*hook);
    r.traffic = *hook->traffic();
    if (counts.toHost) r.toHost = counts.toHost();
  });
  REQUIRE(comm::testing::firstError(errors) == "");
  return out;
}

using Cases = std::vector<std::pair<std::string, CompressionSettings>>;

// Out of line: GCC 12's -Warray-bounds misreads an inlined growth of these vectors (a false positive under -Werror).
[[gnu::noinline]] void addCase(Cases& cases, std::string name, const CompressionSettings& c) {
  cases.emplace_back(std::move(name), c);
}

CompressionSettings topk(double ratio) {
  CompressionSettings c;
  c.type = CompressionSettings::Type::kTopK;
  c.ratio = ratio;
  return c;
}

// Runs every case through DDP on both paths and compares rank by rank, step by step, bit for bit.
// No step makes the host wait for the device (the stand-in's blocking reads), as a GPU's backward must keep
// enqueueing while earlier buckets are exchanged.
void compareDdp(const std::vector<std::pair<std::string, CompressionSettings>>& cases, const Perturb& perturb = {}) {
  for (const auto& [name, c] : cases)
    for (bool overlap : {true, false}) {
      CAPTURE(name);
      CAPTURE(overlap);
      const auto cpu = runDdp(c, overlap, false, perturb);
      const auto dev = runDdp(c, overlap, true, perturb);
      for (int rank = 0; rank < kRanks; ++rank) {
        CAPTURE(rank);
        const auto& a = cpu[static_cast<size_t>(rank)];
        const auto& b = dev[static_cast<size_t>(rank)];
        for (int step = 0; step < kSteps; ++step) {
          CAPTURE(step);
          CHECK(sameBits(a.grads[static_cast<size_t>(step)], b.grads[static_cast<size_t>(step)]));
        }
        REQUIRE(a.state.size() == b.state.size());
        for (size_t s = 0; s < a.state.size(); ++s) CHECK(sameBits(a.state[s], b.state[s]));
        CHECK(a.traffic.bytesSent == b.traffic.bytesSent);
        CHECK(a.traffic.bytesUncompressed == b.traffic.bytesUncompressed);
        if (!a.state.empty()) CHECK(b.toHost > 0);  // the state was copied down for stateBuffers()
        REQUIRE(b.hostReads.size() == static_cast<size_t>(kSteps));
        for (int step = 0; step < kSteps; ++step) {
          CAPTURE(step);
          CHECK(b.hostReads[static_cast<size_t>(step)] == 0);
        }
      }
      // Replicas agree.
      CHECK(sameBits(dev[0].grads.back(), dev[1].grads.back()));
    }
}

// What the CPU hook's rules give, on the device path: the perturbed step's result is NaN on both ranks (so both
// skip or stop together), and the step after is finite again (no state was poisoned).
void nanThenFinite(const Cases& cases, const Perturb& perturb, int badStep) {
  for (const auto& [name, c] : cases) {
    CAPTURE(name);
    const auto dev = runDdp(c, true, true, perturb);
    for (const RankResult& r : dev) {
      const auto& bad = r.grads[static_cast<size_t>(badStep)];
      const auto& next = r.grads[static_cast<size_t>(badStep + 1)];
      CHECK(std::any_of(bad.begin(), bad.end(), [](float v) { return std::isnan(v); }));
      CHECK(std::all_of(next.begin(), next.end(), [](float v) { return std::isfinite(v); }));
    }
  }
}

// An infinity in rank 1's gradient at steps 1 and 3.
Perturb infinityAt1And3() {
  return [](int rank, int step, std::vector<float>& dy) {
    if (rank == 1 && (step == 1 || step == 3)) dy[0] = std::numeric_limits<float>::infinity();
  };
}

// A finite gradient on rank 1 at steps 2 and 3 whose sum with the residual (or whose products) overflow.
Perturb hugeAt2And3() {
  return [](int rank, int step, std::vector<float>& dy) {
    if (rank == 1 && (step == 2 || step == 3)) std::fill(dy.begin(), dy.end(), 1e38f);
  };
}

CompressionSettings powersgd(int rank) {
  CompressionSettings c;
  c.type = CompressionSettings::Type::kPowerSgd;
  c.rank = rank;
  return c;
}

}  // namespace

TEST_CASE("PowerSGD with its buffers off the host (a GPU's path): the CPU hook's results, state and traffic bit for bit") {
  std::vector<std::pair<std::string, CompressionSettings>> cases;
  addCase(cases, "rank 1", powersgd(1));
  addCase(cases, "rank 2", powersgd(2));
  {
    CompressionSettings c = powersgd(2);
    c.startStep = 2;
    addCase(cases, "rank 2, start_step 2", c);
  }
  {
    CompressionSettings c = powersgd(4);
    c.errorFeedback = false;
    addCase(cases, "rank 4, no error feedback", c);
  }
  compareDdp(cases);
}

TEST_CASE("top-k with its buffers off the host (a GPU's path): the CPU hook's results, state and traffic bit for bit") {
  std::vector<std::pair<std::string, CompressionSettings>> cases;
  {
    CompressionSettings c = topk(0.2);
    c.startStep = 1;
    addCase(cases, "topk 0.2, start_step 1", c);
  }
  {
    CompressionSettings c = topk(0.01);
    c.momentumCorrection = true;
    c.momentum = 0.9;
    c.warmupSteps = 3;
    c.startStep = 1;
    c.localClipNorm = 0.05;
    addCase(cases, "topk momentum_correction, DGC warm-up, local clipping", c);
  }
  {
    CompressionSettings c = topk(0.1);
    c.momentumCorrection = true;
    c.momentum = 0.9;
    c.momentumMasking = false;
    addCase(cases, "topk momentum_correction without masking", c);
  }
  {
    CompressionSettings c = topk(0.1);
    c.localAdam = true;
    c.startStep = 2;
    addCase(cases, "topk local_adam from step 2", c);
  }
  {
    CompressionSettings c = topk(0.05);
    c.errorFeedback = false;
    addCase(cases, "topk without error feedback", c);
  }
  addCase(cases, "topk ratio 1", topk(1.0));
  compareDdp(cases);
}

TEST_CASE("top-k off the host: a non-finite or overflowing bucket, clipping and warm-up as the CPU hook, no host waits") {
  // What the CPU hook does with them: a non-finite gradient is sent as NaN pairs (every rank's result is NaN) and
  // leaves the residual, velocity and local Adam's moments as they were; a residual that overflows is dropped (and
  // the velocity with it). Before start_step a non-finite gradient skips local Adam's moments and a non-finite
  // average the velocity. The device path decides all of it on the device: the same bits, and not one wait.
  std::vector<std::pair<std::string, CompressionSettings>> cases;
  addCase(cases, "topk 0.1", topk(0.1));
  {
    CompressionSettings c = topk(0.01);
    c.momentumCorrection = true;
    c.momentum = 0.9;
    c.warmupSteps = 4;
    c.startStep = 1;
    c.localClipNorm = 0.05;
    addCase(cases, "topk momentum_correction, DGC warm-up, local clipping", c);
  }
  {
    CompressionSettings c = topk(0.1);
    c.localAdam = true;
    c.localClipNorm = 1.0;
    c.startStep = 2;
    addCase(cases, "topk local_adam and local clipping from step 2", c);
  }
  {
    CompressionSettings c = topk(0.1);
    c.momentumCorrection = true;
    c.momentum = 0.9;
    c.startStep = 3;
    addCase(cases, "topk momentum_correction from step 3", c);
  }
  SUBCASE("an infinity in one rank's gradient (before and after start_step)") {
    compareDdp(cases, infinityAt1And3());
    nanThenFinite(cases, infinityAt1And3(), 3);
  }
  SUBCASE("a finite gradient whose sum with the residual overflows") {
    compareDdp(cases, hugeAt2And3());
    nanThenFinite(cases, hugeAt2And3(), 3);
  }
}

TEST_CASE("PowerSGD off the host: a non-finite or overflowing bucket as the CPU hook, no host waits") {
  // What the CPU hook does with them: the non-finite step's result is non-finite on every rank (the trainer reports
  // it), Q restarts from its initial values and the residual stays the step before's. The device path decides it
  // on the device (a gate): the same bits, and not one read of the device's values.
  Cases cases;
  addCase(cases, "rank 2", powersgd(2));
  {
    CompressionSettings c = powersgd(1);
    c.startStep = 2;
    addCase(cases, "rank 1, start_step 2", c);
  }
  {
    CompressionSettings c = powersgd(4);
    c.errorFeedback = false;
    addCase(cases, "rank 4, no error feedback", c);
  }
  SUBCASE("an infinity in one rank's gradient (before and after start_step)") {
    compareDdp(cases, infinityAt1And3());
    nanThenFinite(cases, infinityAt1And3(), 3);
  }
  SUBCASE("a finite gradient whose sum with the residual overflows") {
    compareDdp(cases, hugeAt2And3());
    nanThenFinite(cases, hugeAt2And3(), 3);
  }
}

TEST_CASE("PowerSGD batches a bucket: one product per run of same-shape matrices, one Gram-Schmidt launch for the "
          "bucket, no host reads") {
  // Four transformer-like blocks (w1 [24, 16], its bias, w2 [16, 24], its bias) and a head [10, 16]; block 3 has an
  // extra vector first, so its matrices do not keep the stride of blocks 0-2 and start runs of their own. Runs: w1 of
  // blocks 0-2, w2 of blocks 0-2, w1 of block 3, w2 of block 3, the head: 5 products of each kind per step, where
  // one per matrix made 9. Gram-Schmidt: one launch over the bucket's 9 P factors (of 3 shapes), where one per
  // matrix made 9; and the host never waits for the device's values (a finiteness check read back made 2).
  HookLayout layout;
  size_t at = 0;
  auto add = [&](std::string name, Shape s) {
    const auto count = static_cast<size_t>(s.numel());
    layout.params.push_back({std::move(name), s, at, count});
    at += count;
  };
  for (int b = 0; b < 4; ++b) {
    const std::string p = "h." + std::to_string(b) + ".";
    if (b == 3) add(p + "ln", Shape{8});
    add(p + "w1", Shape{24, 16});
    add(p + "b1", Shape{24});
    add(p + "w2", Shape{16, 24});
    add(p + "b2", Shape{16});
  }
  add("head", Shape{10, 16});
  layout.arenaSize = at;
  layout.groupSize = kRanks;
  constexpr int kMatrices = 9, kRuns = 5, kStepsHere = 3;
  auto store = rendezvous::MemoryStore::create();
  std::vector<std::string> problems(kRanks);
  auto errors = comm::testing::onRanks(kRanks, [&](int rank) {
    auto group = comm::createBackend("tcp", comm::testing::rankOptions(rank, kRanks, store));
    auto cpu = makeCompressionHook(powersgd(2), 5), dev = makeCompressionHook(powersgd(2), 5);
    cpu->bind(layout);
    dev->bind(layout);
    auto owned = std::make_unique<OffHostOps>();
    OffHostOps* ops = owned.get();
    dynamic_cast<PowerSgdHook&>(*dev).useOps(std::move(owned));
    const PowerSgdPlan& plan = dynamic_cast<PowerSgdHook&>(*dev).plan();
    auto problem = [&](const std::string& p) { problems[static_cast<size_t>(rank)] += p + "; "; };
    for (int s = 0; s < kStepsHere; ++s) {
      std::vector<float> g(layout.arenaSize);
      for (size_t i = 0; i < g.size(); ++i)
        g[i] = std::sin(0.37f * static_cast<float>(i) + 1.3f * static_cast<float>(rank) + 0.7f * static_cast<float>(s));
      std::vector<float> h = g;
      auto bucket = [&](std::vector<float>& v) {
        return GradBucket{.index = 0, .grads = TensorView::flat(v.data(), v.size()), .offset = 0, .layers = {},
                          .last = true, .params = layout.params};
      };
      const int before = ops->gemmCalls, orthoBefore = ops->orthoCalls, readsBefore = ops->hostReads;
      ops->seen.clear();
      ops->orthogonalised.clear();
      auto a = cpu->start(bucket(h), *group);
      auto b = dev->start(bucket(g), *group);
      a->wait();
      b->wait();
      if (!sameBits(h, g)) problem("the batched products differ from the CPU hook's");
      if (ops->gemmCalls - before != 3 * kRuns)
        problem("step " + std::to_string(s) + ": " + std::to_string(ops->gemmCalls - before) + " products, not " +
                std::to_string(3 * kRuns));
      // Every compressed matrix exactly once per product, with its own P and Q (the plan's offsets, independent of
      // the runs' strides): relative to the first matrix's factors.
      const float* p0 = nullptr;
      const float* q0 = nullptr;
      for (const auto& seen : ops->seen)
        if (seen.m == g.data() + plan.entries[0].offset) p0 = seen.pt, q0 = seen.qt;  // entry 0: block 0's w1
      for (int product = 0; product < 3; ++product) {
        int matched = 0;
        for (const auto& e : plan.entries) {
          if (!e.compressed) continue;
          int found = 0;
          for (const auto& seen : ops->seen)
            if (seen.product == product && seen.m == g.data() + e.offset && seen.rows == e.rows && seen.cols == e.cols &&
                p0 != nullptr && seen.pt == p0 + e.pOff && seen.qt == q0 + e.qOff)
              ++found;
          matched += found == 1 ? 1 : 0;
        }
        if (matched != kMatrices) problem("product " + std::to_string(product) + " covered " + std::to_string(matched) +
                                          " of the " + std::to_string(kMatrices) + " matrices exactly once");
      }
      if (ops->orthoCalls - orthoBefore != 1)
        problem("step " + std::to_string(s) + ": " + std::to_string(ops->orthoCalls - orthoBefore) +
                " Gram-Schmidt launches, not 1");
      int orthogonalised = 0;
      for (const auto& e : plan.entries) {
        if (!e.compressed) continue;
        int found = 0;
        for (const auto& o : ops->orthogonalised)
          if (p0 != nullptr && o.pt == p0 + e.pOff && o.rank == e.rank && o.rows == e.rows) ++found;
        orthogonalised += found == 1 ? 1 : 0;
      }
      if (orthogonalised != kMatrices || ops->orthogonalised.size() != static_cast<size_t>(kMatrices))
        problem("Gram-Schmidt covered " + std::to_string(orthogonalised) + " of the " + std::to_string(kMatrices) +
                " P factors exactly once (" + std::to_string(ops->orthogonalised.size()) + " in all)");
      if (ops->hostReads - readsBefore != 0)
        problem("step " + std::to_string(s) + ": " + std::to_string(ops->hostReads - readsBefore) +
                " reads of the device's values");
    }
    if (!plan.entries[0].compressed || plan.entries[0].pOff != 0) problem("the layout's first matrix is not entry 0");
  });
  REQUIRE(comm::testing::firstError(errors) == "");
  for (const auto& p : problems) CHECK(p == "");
}

TEST_CASE("PowerSGD's and top-k's state moves between the GPU's path and the CPU's (a checkpoint resumed on the other device)") {
  // Two parameters' buckets in DDP's order (the last layer first), 2 ranks, rank 2 with error feedback.
  HookLayout layout;
  layout.params = {{"0.weight", Shape{30, 40}, 0, 1200},
                   {"0.bias", Shape{30}, 1200, 30},
                   {"2.weight", Shape{20, 30}, 1230, 600},
                   {"2.bias", Shape{20}, 1830, 20}};
  layout.arenaSize = 1850;
  layout.groupSize = kRanks;
  CompressionSettings mc = topk(0.1), la = topk(0.1);
  mc.momentumCorrection = true;
  mc.momentum = 0.9;
  la.localAdam = true;
  la.startStep = 1;
  for (const CompressionSettings& c : {powersgd(2), mc, la}) {
    CAPTURE(compressionTypeName(c.type));
    auto gradient = [](int rank, int step) {
      std::vector<float> g(1850);
      for (size_t i = 0; i < g.size(); ++i)
        g[i] = std::sin(0.37f * static_cast<float>(i) + 1.3f * static_cast<float>(rank) + 0.7f * static_cast<float>(step));
      return g;
    };
    auto store = rendezvous::MemoryStore::create();
    std::vector<std::string> problems(kRanks);
    auto errors = comm::testing::onRanks(kRanks, [&](int rank) {
      auto group = comm::createBackend("tcp", comm::testing::rankOptions(rank, kRanks, store));
      auto step = [&](CommHook& hook, int s) {
        std::vector<float> g = gradient(rank, s);
        std::vector<comm::WorkPtr> work;
        const std::pair<size_t, size_t> buckets[] = {{1230, 620}, {0, 1230}};
        for (size_t b = 0; b < 2; ++b) {
          const auto params = std::span<const GradParam>(layout.params).subspan(b == 0 ? 2 : 0, 2);
          work.push_back(hook.start({.index = b, .grads = TensorView::flat(g.data() + buckets[b].first, buckets[b].second),
                                     .offset = buckets[b].first, .layers = {}, .last = b == 1, .params = params},
                                    *group));
        }
        for (auto& w : work) w->wait();
        return g;
      };
      auto make = [&](bool offHostOps) {
        auto hook = makeCompressionHook(c, 5);
        hook->bind(layout);
        if (offHostOps) offHost(*hook);
        return hook;
      };
      // A run of 3 steps on each path; then each one's state loaded into a fresh hook of the other path (the
      // checkpoint's load: into stateBuffers()' views, then stateLoaded) and 2 more steps on both.
      auto cpu = make(false), dev = make(true);
      for (int s = 0; s < 3; ++s)
        if (!sameBits(step(*cpu, s), step(*dev, s))) problems[static_cast<size_t>(rank)] = "the paths differ before the move";
      auto load = [](CommHook& from, CommHook& into) {
        auto src = from.stateBuffers();
        auto dst = into.stateBuffers();
        REQUIRE(src.size() == dst.size());
        for (size_t i = 0; i < src.size(); ++i) {
          REQUIRE(src[i].name == dst[i].name);
          REQUIRE(src[i].view.bytes() == dst[i].view.bytes());
          std::memcpy(dst[i].view.data, src[i].view.data, src[i].view.bytes());
        }
        into.stateLoaded(true);
      };
      auto cpuFromDev = make(false), devFromCpu = make(true);
      load(*dev, *cpuFromDev);
      load(*cpu, *devFromCpu);
      for (int s = 3; s < 5; ++s) {
        const auto want = step(*cpu, s);
        if (!sameBits(want, step(*dev, s))) problems[static_cast<size_t>(rank)] = "the paths differ after the move";
        if (!sameBits(want, step(*cpuFromDev, s))) problems[static_cast<size_t>(rank)] = "GPU -> CPU state did not carry";
        if (!sameBits(want, step(*devFromCpu, s))) problems[static_cast<size_t>(rank)] = "CPU -> GPU state did not carry";
      }
      const auto a = floatState(*cpu), b = floatState(*devFromCpu);
      for (size_t i = 0; i < a.size(); ++i)
        if (!sameBits(a[i], b[i])) problems[static_cast<size_t>(rank)] = "the state differs at the end";
    });
    REQUIRE(comm::testing::firstError(errors) == "");
    for (const auto& p : problems) CHECK(p == "");
  }
}
