// "device": "cuda" where the GPUs are missing: `dtrain run` refuses before starting any worker and `dtrain train`
// alone before training, with exit 2 and both counts named. CUDA_VISIBLE_DEVICES="" hides every GPU, so this
// runs the same on a machine with or without one; a build without CUDA says so instead.
#include <doctest/doctest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "tests/support/process.h"

using namespace dtrain::testing;

namespace {

const char* kCudaJob = R"({
  "model": {"input": [4], "layers": [{"type": "linear", "out": 8}, {"type": "relu"}, {"type": "linear", "out": 3}]},
  "loss": {"type": "cross_entropy"},
  "data": {"train": {"format": "synthetic", "task": "classification", "samples": 64, "features": 4, "num_classes": 3},
           "batch_size": 8},
  "optimizer": {"type": "sgd", "lr": 0.1},
  "train": {"epochs": 1, "seed": 3},
  "device": "cuda"
})";

bool builtWithCuda() { return run({dtrainBinary(), "--version"}).out.find("(cuda)") != std::string::npos; }

}  // namespace

TEST_CASE("device cuda without enough GPUs: a clear error naming both counts, before any worker starts (exit 2)") {
  const std::string dir = tempDir("gpu_device");
  writeFile(dir + "/job.json", kCudaJob);
  const RunOptions noGpu{.env = {{"CUDA_VISIBLE_DEVICES", ""}}};
  auto launched = run({dtrainBinary(), "run", "--standalone", "--nproc-per-node", "2", dir + "/job.json",
                       "--output-dir", dir + "/out"},
                      noGpu);
  INFO(launched.err);
  CHECK(launched.exitCode == 2);
  CHECK(launched.err.find(dir + "/job.json") != std::string::npos);
  if (builtWithCuda()) {
    CHECK(launched.err.find("2 local worker(s) but 0 GPU(s) visible (CUDA_VISIBLE_DEVICES=)") != std::string::npos);
    // No worker ran: nothing was written.
    CHECK_FALSE(std::filesystem::exists(dir + "/out/metrics.jsonl"));
    auto alone = run({dtrainBinary(), "train", dir + "/job.json", "--output-dir", dir + "/alone"}, noGpu);
    INFO(alone.err);
    CHECK(alone.exitCode == 2);
    CHECK(alone.err.find("1 local worker(s) but 0 GPU(s) visible") != std::string::npos);
    // `dtrain check` validates the job for the machine it is meant for, and says what this one lacks.
    auto checked = run({dtrainBinary(), "check", dir + "/job.json", "--output-dir", dir + "/out"}, noGpu);
    INFO(checked.err);
    CHECK(checked.exitCode == 0);
    CHECK(checked.err.find("warning: not on this machine: ") != std::string::npos);
    CHECK(checked.err.find("0 GPU(s) visible") != std::string::npos);
  } else {
    CHECK(launched.err.find("needs a dtrain built with CUDA") != std::string::npos);
  }
}

TEST_CASE("--nproc-per-node gpu: one worker per GPU that CUDA_VISIBLE_DEVICES shows; none is a usage error (exit 3)") {
  const std::vector<std::string> argv = {dtrainBinary(), "run", "--standalone", "--nproc-per-node", "gpu",
                                         "--dry-run", "--", "/bin/true"};
  auto none = run(argv, {.env = {{"CUDA_VISIBLE_DEVICES", ""}}});
  INFO(none.err);
  CHECK(none.exitCode == 3);
  CHECK(none.err.find("--nproc-per-node gpu: no GPU is visible to this process") != std::string::npos);
  // The agent counts without starting CUDA; with no driver here the variable's entries are taken as given.
  if (!std::filesystem::exists("/proc/driver/nvidia/gpus")) {
    auto two = run(argv, {.env = {{"CUDA_VISIBLE_DEVICES", "0,1"}}});
    INFO(two.err);
    CHECK(two.exitCode == 0);
    CHECK(two.out.find("nproc_per_node=2 ") != std::string::npos);
  }
}

TEST_CASE("device cuda with top-k or PowerSGD: `dtrain check` and `dtrain run --dry-run` accept the job") {
  if (!builtWithCuda()) return;  // the CPU-only build refuses device cuda itself (above)
  const std::string dir = tempDir("gpu_compression");
  std::string job = kCudaJob;
  const std::string sgd = R"("optimizer": {"type": "sgd", "lr": 0.1})";
  job.replace(job.find(sgd), sgd.size(), R"("optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9})");
  for (const std::string compression :
       {R"({"type": "topk", "ratio": 0.1, "momentum_correction": true, "warmup_steps": 4, "start_step": 2})",
        R"({"type": "powersgd", "rank": 2, "start_step": 2})"}) {
    CAPTURE(compression);
    std::string text = job;
    text.insert(text.rfind('}'), R"(, "parallel": {"compression": )" + compression + "}");
    writeFile(dir + "/job.json", text);
    // On the device by default; staged through host memory with DTRAIN_COMPRESSION_HOST_STAGING=1 (the fallback).
    for (const bool staged : {false, true}) {
      CAPTURE(staged);
      auto checked = run({dtrainBinary(), "check", dir + "/job.json", "--output-dir", dir + "/out"},
                         {.env = {{"CUDA_VISIBLE_DEVICES", ""}, {"DTRAIN_COMPRESSION_HOST_STAGING", staged ? "1" : "0"}}});
      INFO(checked.out);
      INFO(checked.err);
      CHECK(checked.exitCode == 0);
      const std::string said = checked.out + checked.err;
      CHECK((said.find("on the GPU staged through host memory: 268 B down and 268 B up over PCIe per step") !=
             std::string::npos) == staged);
      CHECK((said.find("on the GPU: kernels and NCCL on device buffers (no host copies; "
                       "DTRAIN_COMPRESSION_HOST_STAGING=1 stages them through host memory instead)") !=
             std::string::npos) == !staged);
    }
    // The agent counts CUDA_VISIBLE_DEVICES' entries as given where no driver is there to ask.
    if (!std::filesystem::exists("/proc/driver/nvidia/gpus")) {
      auto plan = run({dtrainBinary(), "run", "--standalone", "--nproc-per-node", "2", "--dry-run", dir + "/job.json",
                       "--output-dir", dir + "/out"},
                      {.env = {{"CUDA_VISIBLE_DEVICES", "0,1"}}});
      INFO(plan.err);
      CHECK(plan.exitCode == 0);
      CHECK(plan.out.find("nproc_per_node=2 ") != std::string::npos);
    }
  }
}
