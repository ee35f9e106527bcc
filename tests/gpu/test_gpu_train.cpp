// Whole runs of `dtrain train` on the GPU against the CPU (TF32 off): an MLP, a small GPT (fused attention,
// without and with dropout, and the matmul path) and a small CNN (conv2d, maxpool2d, dropout, bce_with_logits, adagrad) end within 1e-3 of the
// CPU run's weights; a GPU run stopped and
// resumed ends bit-identical to an uninterrupted one (also with dropout, on the matmul path and the fused kernels); checkpoints move
// between devices (GPU -> CPU and CPU -> GPU); a bf16 run's losses follow the float32 run's.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include <fstream>

#include "lib/ckpt/safetensors.h"
#include "tests/support/process.h"

using namespace dtrain;
using namespace dtrain::testing;
using nlohmann::json;

namespace {

json mlpJob() {
  return json::parse(R"({
    "model": {"input": [12], "layers": [{"type": "linear", "out": 32}, {"type": "gelu"}, {"type": "linear", "out": 32},
                                        {"type": "relu"}, {"type": "linear", "out": 4}]},
    "loss": {"type": "cross_entropy"},
    "data": {"train": {"format": "synthetic", "task": "classification", "samples": 512, "features": 12,
                       "num_classes": 4},
             "batch_size": 32, "shuffle": true},
    "optimizer": {"type": "sgd", "lr": 0.05, "momentum": 0.9, "clip_grad_norm": 5.0},
    "train": {"epochs": 1, "seed": 5, "max_steps": 12},
    "tf32": false,
    "checkpoint": {"every_steps": 6, "keep": 5}
  })");
}

// conv2d, maxpool2d and dropout with bce_with_logits and adagrad (the initial accumulator keeps updates linear in
// near-zero gradients, so rounding-level differences stay rounding-level).
json cnnJob() {
  return json::parse(R"({
    "model": {"input": [1, 8, 8], "layers": [{"type": "conv2d", "out": 4, "kernel": 3, "padding": 1}, {"type": "relu"},
                                             {"type": "maxpool2d", "kernel": 2}, {"type": "dropout", "p": 0.25},
                                             {"type": "flatten"}, {"type": "linear", "out": 1}]},
    "loss": {"type": "bce_with_logits"},
    "data": {"train": {"format": "synthetic", "task": "classification", "samples": 512, "features": 64,
                       "num_classes": 2},
             "batch_size": 32, "shuffle": true},
    "optimizer": {"type": "adagrad", "lr": 0.05, "initial_accumulator_value": 0.1},
    "train": {"epochs": 1, "seed": 5, "max_steps": 12},
    "tf32": false,
    "checkpoint": {"every_steps": 6, "keep": 5}
  })");
}

json gptJob(const std::string& text) {
  return json{{"model", {{"preset", "gpt"}, {"vocab_size", 256}, {"block_size", 32}, {"n_layer", 2}, {"n_head", 2},
                         {"n_embd", 32}}},
              {"loss", {{"type", "cross_entropy"}}},
              {"optimizer", {{"type", "adamw"}, {"lr", 0.003}, {"weight_decay_on", "matrices"}, {"clip_grad_norm", 1.0}}},
              {"data", {{"train", {{"format", "text"}, {"path", text}, {"split", "train"}}}, {"batch_size", 8}}},
              {"train", {{"epochs", 1}, {"seed", 1}, {"max_steps", 12}}},
              {"tf32", false},
              {"checkpoint", {{"every_steps", 6}, {"keep", 5}}}};
}

// Runs `dtrain train` alone (one process, LOCAL_RANK 0) with the job at `dir`/job.json.
void train(const std::string& dir, json job, const std::string& device, int maxSteps, const std::string& out) {
  job["device"] = device;
  job["train"]["max_steps"] = maxSteps;
  writeFile(dir + "/job.json", job.dump());
  auto r = run({dtrainBinary(), "train", dir + "/job.json", "--output-dir", out}, {.timeout = std::chrono::minutes(3)});
  INFO(r.err);
  REQUIRE(r.exitCode == 0);
}

std::vector<float> weights(const std::string& file) {
  auto f = ckpt::SafetensorsFile::open(file);
  std::vector<float> all;
  for (const auto& t : f.tensors()) {
    auto bytes = f.data(t);
    const size_t n = bytes.size() / sizeof(float);
    const size_t at = all.size();
    all.resize(at + n);
    std::memcpy(all.data() + at, bytes.data(), bytes.size());
  }
  return all;
}

double maxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(double(a[i]) - double(b[i])));
  return worst;
}

// The training losses of metrics.jsonl, one per progress line (eval and final lines left out).
std::vector<double> trainLosses(const std::string& file) {
  std::ifstream in(file);
  std::vector<double> out;
  for (std::string line; std::getline(in, line);) {
    const json j = json::parse(line);
    if (!j.contains("eval_loss") && !j.contains("final")) out.push_back(j.at("loss").get<double>());
  }
  return out;
}

// The last line of metrics.jsonl ("final": true).
json finalLine(const std::string& file) {
  std::ifstream in(file);
  json last;
  for (std::string line; std::getline(in, line);)
    if (json j = json::parse(line); j.contains("final")) last = j;
  REQUIRE(last.is_object());
  return last;
}

}  // namespace

TEST_CASE("an MLP and a GPT trained on the GPU end within 1e-3 of the CPU run (TF32 off)") {
  const std::string dir = tempDir("gpu_parity");
  std::string text;
  for (int i = 0; i < 200; ++i) text += "the quick brown fox jumps over the lazy dog. ";
  writeFile(dir + "/text.txt", text);
  // The GPT compares under SGD: Adam normalises each update, so rounding-level differences in near-zero gradients
  // become lr-sized weight differences that say nothing about the forward/backward math (AdamW itself is compared
  // update for update in test_gpu_nn, and the resume test below runs the GPT with AdamW).
  json gptSgd = gptJob(dir + "/text.txt");
  gptSgd["optimizer"] = {{"type", "sgd"}, {"lr", 0.1}, {"momentum", 0.9}, {"clip_grad_norm", 1.0}};
  // The GPT on the fused attention kernels (asked for: the job would be refused if they could not run it) and on
  // the matmul path ("attention" is ignored by the CPU run).
  gptSgd["attention"] = "fused";
  json gptMatmul = gptSgd;
  gptMatmul["attention"] = "matmul";
  // Attention (and residual) dropout in the fused kernels: the masks are the CPU's (philox.h).
  json gptDropout = gptSgd;
  gptDropout["model"]["dropout"] = 0.1;
  // The CNN's dropout masks are the CPU's (the GPU kernel computes them from the CPU's generator, philox.h).
  for (const auto& [name, job] : {std::pair{"mlp", mlpJob()}, std::pair{"gpt", gptSgd},
                                  std::pair{"gpt_matmul", gptMatmul}, std::pair{"gpt_dropout", gptDropout},
                                  std::pair{"cnn", cnnJob()}}) {
    CAPTURE(name);
    train(dir, job, "cpu", 12, dir + "/" + name + "_cpu");
    train(dir, job, "cuda", 12, dir + "/" + name + "_gpu");
    const double diff = maxAbsDiff(weights(dir + "/" + name + "_cpu/model.safetensors"),
                                   weights(dir + "/" + name + "_gpu/model.safetensors"));
    MESSAGE(name << ": max |w_cpu - w_gpu| after 12 steps = " << diff);
    CHECK(diff < 1e-3);
    // The final metrics line reports the GPU's peak buffer memory (at least the parameters, gradients and Adam or
    // momentum state), and only for the GPU run.
    const json cpuFinal = finalLine(dir + "/" + name + "_cpu/metrics.jsonl");
    const json gpuFinal = finalLine(dir + "/" + name + "_gpu/metrics.jsonl");
    CHECK_FALSE(cpuFinal.contains("peak_gpu_mb"));
    REQUIRE(gpuFinal.contains("peak_gpu_mb"));
    const double paramMb = static_cast<double>(weights(dir + "/" + name + "_gpu/model.safetensors").size()) * 4 / 1048576;
    CHECK(gpuFinal["peak_gpu_mb"].get<double>() >= 2 * paramMb);
  }
}

TEST_CASE("a GPU run stopped at step 6 and resumed ends bit-identical to an uninterrupted one") {
  const std::string dir = tempDir("gpu_resume");
  std::string text;
  for (int i = 0; i < 200; ++i) text += "pack my box with five dozen liquor jugs. ";
  writeFile(dir + "/text.txt", text);
  // With dropout (the CNN's layer, the GPT's attention and residual dropout) the resumed run draws the same masks.
  // "attention" is "auto" in gptJob, which at T 32 is the matmul path; the fused kernels (with their in-kernel
  // attention dropout) are asked for explicitly.
  json gptDropout = gptJob(dir + "/text.txt");
  gptDropout["model"]["dropout"] = 0.1;
  json gptFusedDropout = gptDropout;
  gptFusedDropout["attention"] = "fused";
  for (const auto& [name, job] : {std::pair{"mlp", mlpJob()}, std::pair{"gpt", gptJob(dir + "/text.txt")},
                                  std::pair{"cnn", cnnJob()}, std::pair{"gpt_dropout", gptDropout},
                                  std::pair{"gpt_fused_dropout", gptFusedDropout}}) {
    CAPTURE(name);
    train(dir, job, "cuda", 12, dir + "/" + name + "_whole");
    train(dir, job, "cuda", 6, dir + "/" + name + "_split");
    train(dir, job, "cuda", 12, dir + "/" + name + "_split");  // resumes from the step-6 checkpoint
    CHECK(weights(dir + "/" + name + "_whole/model.safetensors") ==
          weights(dir + "/" + name + "_split/model.safetensors"));
  }
}

TEST_CASE("checkpoints move between devices: GPU -> CPU and CPU -> GPU resumes match the CPU run within 1e-3") {
  const std::string dir = tempDir("gpu_cross");
  train(dir, mlpJob(), "cpu", 12, dir + "/cpu");
  train(dir, mlpJob(), "cuda", 6, dir + "/g2c");
  train(dir, mlpJob(), "cpu", 12, dir + "/g2c");
  train(dir, mlpJob(), "cpu", 6, dir + "/c2g");
  train(dir, mlpJob(), "cuda", 12, dir + "/c2g");
  const auto reference = weights(dir + "/cpu/model.safetensors");
  CHECK(maxAbsDiff(reference, weights(dir + "/g2c/model.safetensors")) < 1e-3);
  CHECK(maxAbsDiff(reference, weights(dir + "/c2g/model.safetensors")) < 1e-3);
}

TEST_CASE("\"precision\": \"bf16\": the GPT's losses stay within 2% of the float32 run's over 24 steps") {
  const std::string dir = tempDir("gpu_bf16");
  std::string text;
  for (int i = 0; i < 300; ++i) text += "sphinx of black quartz, judge my vow. ";
  writeFile(dir + "/text.txt", text);
  json job = gptJob(dir + "/text.txt");
  job["train"]["log_every"] = 4;
  job.erase("checkpoint");
  train(dir, job, "cuda", 24, dir + "/fp32");
  job["precision"] = "bf16";
  train(dir, job, "cuda", 24, dir + "/bf16");
  const auto fp32 = trainLosses(dir + "/fp32/metrics.jsonl"), bf16 = trainLosses(dir + "/bf16/metrics.jsonl");
  REQUIRE(fp32.size() == bf16.size());
  REQUIRE(fp32.size() >= 5);
  CHECK(fp32.back() < fp32.front());  // it learns
  for (size_t i = 0; i < fp32.size(); ++i) {
    CAPTURE(i);
    MESSAGE("loss fp32 " << fp32[i] << " bf16 " << bf16[i]);
    CHECK(std::fabs(bf16[i] - fp32[i]) <= 0.02 * fp32[i]);
  }
}
