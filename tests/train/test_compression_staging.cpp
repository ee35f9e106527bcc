// top-k and PowerSGD with a GPU arena (CompressionHook's host staging, lib/train/compression_hooks.h), run on the CPU:
// DDP hands the hook its buckets as a GPU job does, the device copies are a CPU stand-in that lands downloads only
// when waited for and uploads only when "the compute stream" gets there, and the hook's collectives go over a second
// (host) group. The results, the state and the traffic must be the unstaged CPU hook's bit for bit, every option on.
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "lib/comm/registry.h"
#include "lib/common/error.h"
#include "lib/nn/host_staging.h"
#include "lib/nn/model.h"
#include "lib/train/compression.h"
#include "lib/train/compression_hooks.h"
#include "lib/train/ddp.h"
#include "rendezvous/memory_store.h"
#include "tests/comm/comm_test_util.h"

using namespace dtrain;
using namespace dtrain::train;
using nlohmann::json;

namespace {

// The GPU's copies as the hook may rely on them, and no more: a download's values are in host() only after its
// wait() (until then the slice holds NaN: a hook that read it early would produce NaN); an upload reads host() at
// some time between upload() and the compute stream getting there (the next download or sync()): the values must
// be final at upload() (what lands is what host() held then) and stay so until then (a change is a problem).
class LateStaging final : public nn::HostStaging {
 public:
  explicit LateStaging(size_t n) : host_(n, 0.0f) {}
  float* host() override { return host_.data(); }
  size_t size() const override { return host_.size(); }
  int download(const float* src, size_t offset, size_t n) override {
    sync();  // the compute stream runs the uploads enqueued before
    std::fill_n(host_.data() + offset, n, std::numeric_limits<float>::quiet_NaN());
    downloads_.push_back({src, offset, n, false});
    ++downloadsThisStep;
    return static_cast<int>(downloads_.size() - 1);
  }
  void wait(int ticket) override {
    Download& d = downloads_.at(static_cast<size_t>(ticket));
    if (d.landed) throw std::logic_error("a download waited for twice");
    std::copy_n(d.src, d.n, host_.data() + d.offset);
    d.landed = true;
  }
  void upload(float* dst, size_t offset, size_t n) override {
    uploads_.push_back({dst, offset, std::vector<float>(host_.data() + offset, host_.data() + offset + n)});
  }
  // The compute stream reaches the optimizer: every upload enqueued lands.
  void sync() {
    for (const Upload& u : uploads_) {
      if (!std::equal(u.values.begin(), u.values.end(), host_.data() + u.offset, [](float a, float b) {
            return std::bit_cast<uint32_t>(a) == std::bit_cast<uint32_t>(b);
          }))
        problem = "the host wrote a slice between its upload and the copy";
      std::copy(u.values.begin(), u.values.end(), u.dst);
    }
    uploads_.clear();
  }
  bool allLanded() const {
    return std::all_of(downloads_.begin(), downloads_.end(), [](const Download& d) { return d.landed; });
  }
  int downloadsThisStep = 0;
  std::string problem;

 private:
  struct Download {
    const float* src;
    size_t offset, n;
    bool landed;
  };
  struct Upload {
    float* dst;
    size_t offset;
    std::vector<float> values;  // host() when upload() was called
  };
  std::vector<float> host_;
  std::vector<Download> downloads_;
  std::vector<Upload> uploads_;
};

struct RankResult {
  std::vector<std::vector<float>> grads;  // per step, after the hook
  std::vector<std::vector<float>> state;  // stateBuffers() after the last step (float32 ones)
  std::vector<int> downloads;             // per step (staged runs)
  int64_t steps = 0;
  HookTraffic traffic;
  std::string problem;
};

// kSteps DDP steps of a 3-layer MLP (one bucket per layer, or the whole arena without overlap) on 2 ranks.
constexpr int kRanks = 2, kBatch = 4, kSteps = 5;

std::vector<RankResult> runDdp(const CompressionSettings& c, bool overlap, bool staged) {
  auto spec = nn::parseModelSpec(json::parse(R"({"input": [100], "layers": [
      {"type": "linear", "out": 50}, {"type": "relu"}, {"type": "linear", "out": 40}, {"type": "relu"},
      {"type": "linear", "out": 10}]})"), "t.json");
  auto store = rendezvous::MemoryStore::create();
  std::vector<RankResult> out(kRanks);
  auto errors = comm::testing::onRanks(kRanks, [&](int rank) {
    RankResult& r = out[static_cast<size_t>(rank)];
    // The data group plays nccl's part (plain steps that keep no host state use it); the host group the CPU group.
    auto data = comm::createBackend("tcp", comm::testing::rankOptions(rank, kRanks, store));
    comm::BackendOptions hostOptions = comm::testing::rankOptions(rank, kRanks, store);
    hostOptions.groupName = "host";
    comm::BackendPtr host = staged ? comm::createBackend("tcp", hostOptions) : nullptr;
    auto hook = makeCompressionHook(c, 3);
    DdpStrategy ddp(ProcessGroups{.rank = rank, .worldSize = kRanks, .dataRank = rank, .dataSize = kRanks,
                                  .world = data, .data = data},
                    {.firstBucketMb = 0.002, .bucketMb = 0.023, .overlap = overlap, .hook = hook});
    nn::Model model = nn::Model::build(spec, kBatch, 1);
    ddp.prepare(model);
    auto& compression = dynamic_cast<CompressionHook&>(*hook);
    LateStaging* staging = nullptr;
    if (staged) {
      auto owned = std::make_unique<LateStaging>(model.grads().size());
      staging = owned.get();
      compression.stageOnHost(std::move(owned), host);
    }
    for (int step = 0; step < kSteps; ++step) {
      std::vector<float> x(kBatch * 100), dy(kBatch * 10);
      for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.1f * static_cast<float>(i) + static_cast<float>(rank + step));
      for (size_t i = 0; i < dy.size(); ++i)
        dy[i] = 0.01f * static_cast<float>((i * 7 + rank * 3 + step) % 11) - 0.05f;
      model.forward(x.data(), kBatch, true);
      if (staging) staging->downloadsThisStep = 0;
      model.backward(TensorView::f32(dy.data(), Shape{kBatch, 10}), ddp.gradReadyHook(), nn::GradMode::kOverwrite);
      ddp.finishStep();
      if (staging) {
        staging->sync();
        r.downloads.push_back(staging->downloadsThisStep);
        if (!staging->allLanded()) r.problem = "a download was never waited for";
        if (!staging->problem.empty()) r.problem = staging->problem;
      }
      auto g = model.grads();
      r.grads.emplace_back(g.begin(), g.end());
    }
    for (auto& s : hook->stateBuffers())
      if (s.view.dtype == DType::kFloat32) r.state.emplace_back(s.view.as<float>(), s.view.as<float>() + s.view.numel());
    r.steps = compression.stepsStarted();
    r.traffic = *hook->traffic();
  });
  REQUIRE(comm::testing::firstError(errors) == "");
  return out;
}

CompressionSettings topk(double ratio) {
  CompressionSettings c;
  c.type = CompressionSettings::Type::kTopK;
  c.ratio = ratio;
  return c;
}

CompressionSettings powersgd(int rank) {
  CompressionSettings c;
  c.type = CompressionSettings::Type::kPowerSgd;
  c.rank = rank;
  return c;
}

}  // namespace

TEST_CASE("top-k and PowerSGD on a GPU arena (host staging): the CPU hook's results, state and traffic bit for bit") {
  struct Case {
    std::string name;
    CompressionSettings c;
    int plainUnstaged;  // leading steps that all-reduce on the data group, not staged
  };
  std::vector<Case> cases;
  {
    CompressionSettings c = topk(0.2);
    c.startStep = 1;
    cases.push_back({"topk, start_step 1 (plain step on the device group)", c, 1});
  }
  {
    CompressionSettings c = topk(0.01);
    c.momentumCorrection = true;
    c.momentum = 0.9;
    c.warmupSteps = 3;
    c.startStep = 1;
    c.localClipNorm = 0.05;
    cases.push_back({"topk momentum_correction, DGC warm-up, local clipping (plain step staged: the velocity)", c, 0});
  }
  {
    CompressionSettings c = topk(0.1);
    c.momentumCorrection = true;
    c.momentum = 0.9;
    c.momentumMasking = false;
    c.errorFeedback = true;
    cases.push_back({"topk momentum_correction without masking", c, 0});
  }
  {
    CompressionSettings c = topk(0.1);
    c.localAdam = true;
    c.startStep = 2;
    cases.push_back({"topk local_adam from step 2 (plain steps staged: the moments)", c, 0});
  }
  {
    CompressionSettings c = topk(0.3);
    c.errorFeedback = false;
    cases.push_back({"topk without error feedback", c, 0});
  }
  {
    CompressionSettings c = powersgd(2);
    c.startStep = 2;
    cases.push_back({"powersgd rank 2, warm start, error feedback, start_step 2", c, 2});
  }
  {
    CompressionSettings c = powersgd(1);
    c.errorFeedback = false;
    cases.push_back({"powersgd rank 1 without error feedback", c, 0});
  }
  for (const Case& k : cases) {
    for (bool overlap : {true, false}) {
      CAPTURE(k.name);
      CAPTURE(overlap);
      const auto cpu = runDdp(k.c, overlap, false);
      const auto gpu = runDdp(k.c, overlap, true);
      const int buckets = overlap ? 3 : 1;
      for (int r = 0; r < kRanks; ++r) {
        CAPTURE(r);
        const RankResult& a = cpu[static_cast<size_t>(r)];
        const RankResult& b = gpu[static_cast<size_t>(r)];
        CHECK(b.problem == "");
        REQUIRE(a.grads.size() == b.grads.size());
        for (size_t s = 0; s < a.grads.size(); ++s) {
          CAPTURE(s);
          CHECK(a.grads[s] == b.grads[s]);
          // Staged: every bucket of a step that keeps host state, none of one that all-reduces on the device.
          CHECK(b.downloads[s] == (static_cast<int>(s) < k.plainUnstaged ? 0 : buckets));
        }
        CHECK(a.state == b.state);
        CHECK(a.steps == kSteps);
        CHECK(b.steps == kSteps);
        CHECK(a.traffic.bytesSent == b.traffic.bytesSent);
        CHECK(a.traffic.bytesUncompressed == b.traffic.bytesUncompressed);
        CHECK(a.traffic.steps == b.traffic.steps);
      }
      CHECK(gpu[0].grads == gpu[1].grads);  // replicas agree
    }
  }
}

TEST_CASE("host staging needs a CPU group beside the device group; fp16/bf16 are never staged") {
  HookLayout layout;
  layout.arenaSize = 8;
  layout.groupSize = 2;
  auto psgd = makeCompressionHook(powersgd(1));
  psgd->bind(layout);  // a CPU arena: nothing staged
  CHECK(!dynamic_cast<CompressionHook&>(*psgd).staged());
  auto store = rendezvous::MemoryStore::create();
  auto cpu = comm::createBackend("tcp", comm::testing::rankOptions(0, 1, store));
  auto& hook = dynamic_cast<CompressionHook&>(*psgd);
  try {
    hook.stageOnHost(std::make_unique<LateStaging>(4), cpu);  // smaller than the arena
    FAIL("expected an error");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("host staging needs an arena of 8 floats and a CPU group") != std::string::npos);
  }
  hook.stageOnHost(std::make_unique<LateStaging>(8), cpu);
  CHECK(hook.staged());
  // Staged on a GPU only with DTRAIN_COMPRESSION_HOST_STAGING=1 (the fallback; by default top-k and PowerSGD run on
  // the device). A GPU arena without the CPU group then: a clear error (DdpStrategy always passes one; a CPU-only
  // build would fail later, making the staging, with NotBuiltError).
  CHECK(!stagedThroughHost(CompressionSettings::Type::kTopK));
  CHECK(!stagedThroughHost(CompressionSettings::Type::kPowerSgd));
  ::setenv(kHostStagingVariable, "1", 1);
  CHECK(stagedThroughHost(CompressionSettings::Type::kTopK));
  CHECK(stagedThroughHost(CompressionSettings::Type::kPowerSgd));
  CHECK(!stagedThroughHost(CompressionSettings::Type::kFp16));
  layout.device = Device::cuda(0);
  for (const CompressionSettings& c : {topk(0.1), powersgd(1)}) {
    auto staged = makeCompressionHook(c);
    try {
      staged->bind(layout);
      FAIL("expected an error");
    } catch (const Error& e) {
      CHECK(std::string(e.what()).find("a cuda:0 arena needs a CPU group beside the device group") != std::string::npos);
    }
  }
  ::unsetenv(kHostStagingVariable);
  // fp16 runs its casts on the device (kernels): bind() makes no staging, even for a GPU arena.
  CompressionSettings half;
  half.type = CompressionSettings::Type::kFp16;
  auto fp16 = makeCompressionHook(half);
  fp16->bind(layout);
  CHECK(!dynamic_cast<CompressionHook&>(*fp16).staged());
}

TEST_CASE("DTRAIN_COMPRESSION_HOST_STAGING reads as a boolean: true/yes/on stage, 0/false/empty do not, others throw") {
  // "true" was read as off (only "1" counted), so a job asking for the fallback silently ran the device path.
  using Type = CompressionSettings::Type;
  for (const char* on : {"1", "true", "yes", "on"}) {
    ::setenv(kHostStagingVariable, on, 1);
    CHECK_MESSAGE(stagedThroughHost(Type::kTopK), on);
    CHECK_MESSAGE(stagedThroughHost(Type::kPowerSgd), on);
    CHECK_FALSE(stagedThroughHost(Type::kBf16));
  }
  for (const char* off : {"0", "false", "no", "off", ""}) {
    ::setenv(kHostStagingVariable, off, 1);
    CHECK_FALSE_MESSAGE(stagedThroughHost(Type::kTopK), off);
  }
  ::setenv(kHostStagingVariable, "2", 1);
  CHECK_THROWS_WITH_AS(stagedThroughHost(Type::kTopK),
                       "environment variable DTRAIN_COMPRESSION_HOST_STAGING=2: expected 0/1/true/false", UsageError);
  CHECK_FALSE(stagedThroughHost(Type::kFp16));  // never staged: the variable is not read
  // A hook bound to a CPU arena computes on the CPU whatever the variable says, and does not read it.
  CompressionSettings topk;
  topk.type = Type::kTopK;
  topk.ratio = 0.5;
  auto hook = makeCompressionHook(topk);
  HookLayout cpu;
  cpu.arenaSize = 8;
  cpu.groupSize = 2;
  CHECK_NOTHROW(hook->bind(cpu));
  ::unsetenv(kHostStagingVariable);
  CHECK_FALSE(stagedThroughHost(Type::kTopK));
}
