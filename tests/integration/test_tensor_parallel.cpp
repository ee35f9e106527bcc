// Tensor parallelism (issue 12) from a user's side: `"parallel": {"tensor": T}` under `dtrain run` ends with the
// same weights (1e-5 relative) as the one-process run of the same job, for an MLP and the gpt preset, alone and
// combined with data parallelism; checkpoints resume across layouts (1x1x2 <-> 1x1x1); the exported
// model.safetensors is the full, unsplit model; a tensor degree that does not divide the heads or widths is
// refused with exit 2 before any worker starts.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "tests/integration/launch_helpers.h"
#include "tests/integration/train_helpers.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;
using nlohmann::json;

namespace {

json mlpJob() {
  return json::parse(R"({
  "model": {"input": [6], "layers": [{"type": "linear", "out": 16}, {"type": "relu"}, {"type": "linear", "out": 8},
                                     {"type": "tanh"}, {"type": "linear", "out": 12}, {"type": "gelu"},
                                     {"type": "linear", "out": 3}]},
  "loss": {"type": "cross_entropy"},
  "data": {"train": {"format": "synthetic", "task": "classification", "samples": 96, "features": 6, "num_classes": 3,
                     "seed": 5},
           "batch_size": 8, "shuffle": true},
  "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9, "clip_grad_norm": 0.5},
  "train": {"epochs": 1, "seed": 11, "log_every": 1, "max_steps": 5},
  "checkpoint": false
})");
}

json gptJob(const std::string& textFile) {
  return json{{"model", {{"preset", "gpt"}, {"vocab_size", 256}, {"block_size", 8}, {"n_layer", 2}, {"n_head", 4},
                         {"n_embd", 16}}},
              {"loss", {{"type", "cross_entropy"}}},
              // SGD, not Adam: the gradient of attention's key bias is 0 in exact arithmetic (softmax ignores a
              // per-row shift), i.e. rounding noise that Adam would scale up to lr-sized steps in any layout.
              {"optimizer", {{"type", "sgd"}, {"lr", 0.1}, {"momentum", 0.9}, {"clip_grad_norm", 1.0}}},
              {"data", {{"train", {{"format", "text"}, {"path", textFile}, {"split", "train"}}}, {"batch_size", 4}}},
              {"train", {{"epochs", 1}, {"seed", 1}, {"log_every", 1}, {"max_steps", 4}}},
              {"checkpoint", false}};
}

std::string writeText(const std::string& dir) {
  std::string text;
  for (int i = 0; i < 60; ++i) text += "the quick brown fox jumps over the lazy dog. ";
  writeFile(dir + "/text.txt", text);
  return dir + "/text.txt";
}

// Every tensor of `got` equals `want`'s within `rel` of the tensor's largest magnitude.
void checkSameWeights(const std::string& gotFile, const std::string& wantFile, double rel = 1e-5) {
  auto got = readTensorsF32(gotFile);
  auto want = readTensorsF32(wantFile);
  REQUIRE(got.size() == want.size());
  for (auto& [name, w] : want) {
    CAPTURE(name);
    REQUIRE(got.count(name) == 1);
    const auto& g = got[name];
    REQUIRE(g.size() == w.size());
    double scale = 1e-12, worst = 0;
    for (size_t i = 0; i < w.size(); ++i) {
      scale = std::max(scale, static_cast<double>(std::fabs(w[i])));
      worst = std::max(worst, std::fabs(static_cast<double>(g[i]) - w[i]));
    }
    CHECK(worst <= rel * scale);
  }
}

RunResult train1(const std::string& job, const std::string& out, std::vector<std::string> extra = {}) {
  std::vector<std::string> args{dtrainBinary(), "train", job, "--output-dir", out};
  args.insert(args.end(), extra.begin(), extra.end());
  auto r = run(args, {.timeout = 120s});
  INFO(r.err);
  REQUIRE(r.exitCode == 0);
  return r;
}

RunResult trainN(int n, const std::string& job, const std::string& out, std::vector<std::string> extra = {}) {
  std::vector<std::string> args{dtrainBinary(), "run", "--standalone", "--nproc-per-node", std::to_string(n), job,
                                "--output-dir", out};
  args.insert(args.end(), extra.begin(), extra.end());
  auto r = run(args, {.timeout = 180s});
  INFO(r.out);
  INFO(r.err);
  REQUIRE(r.exitCode == 0);
  return r;
}

}  // namespace

TEST_CASE("tensor parallel MLP: 1x1x2 and 2x1x2 end with the one-process weights") {
  const std::string dir = tempDir("tp_mlp");
  writeFile(dir + "/job.json", mlpJob().dump());
  train1(dir + "/job.json", dir + "/one");
  auto t2 = trainN(2, dir + "/job.json", dir + "/t2", {"--set", "parallel.tensor=2"});
  CHECK(t2.out.find("tensor 2 x data 1") != std::string::npos);
  checkSameWeights(dir + "/t2/model.safetensors", dir + "/one/model.safetensors");
  // Data 2 x tensor 2 with batch 4 per replica is the one-process run with batch 8.
  trainN(4, dir + "/job.json", dir + "/d2t2", {"--set", "parallel.tensor=2", "--set", "data.batch_size=4"});
  checkSameWeights(dir + "/d2t2/model.safetensors", dir + "/one/model.safetensors");
}

TEST_CASE("tensor parallel GPT: 1x1x2 ends with the one-process weights; the export is the full model") {
  const std::string dir = tempDir("tp_gpt");
  writeFile(dir + "/job.json", gptJob(writeText(dir)).dump());
  train1(dir + "/job.json", dir + "/one");
  trainN(2, dir + "/job.json", dir + "/t2", {"--set", "parallel.tensor=2"});
  checkSameWeights(dir + "/t2/model.safetensors", dir + "/one/model.safetensors");
  auto t = readTensorsF32(dir + "/t2/model.safetensors");
  CHECK(t.at("transformer.h.0.attn.c_attn.weight").size() == 3 * 16 * 16);
  CHECK(t.at("transformer.h.1.mlp.c_fc.weight").size() == 64 * 16);
}

TEST_CASE("pipeline x tensor: 1x2x2 (MLP, GPT) and 2x2x2 (MLP) end with the one-process weights") {
  const std::string dir = tempDir("tp_pipe");
  const std::string pipe = R"(parallel={"tensor": 2, "pipeline": {"stages": 2, "micro_batches": 2}})";
  writeFile(dir + "/mlp.json", mlpJob().dump());
  train1(dir + "/mlp.json", dir + "/mlp1");
  trainN(4, dir + "/mlp.json", dir + "/mlp122", {"--set", pipe});
  checkSameWeights(dir + "/mlp122/model.safetensors", dir + "/mlp1/model.safetensors");
  // 8 processes on a small machine: few steps, batch 4 per replica.
  trainN(8, dir + "/mlp.json", dir + "/mlp222", {"--set", pipe, "--set", "data.batch_size=4"});
  checkSameWeights(dir + "/mlp222/model.safetensors", dir + "/mlp1/model.safetensors");
  writeFile(dir + "/gpt.json", gptJob(writeText(dir)).dump());
  train1(dir + "/gpt.json", dir + "/gpt1");
  trainN(4, dir + "/gpt.json", dir + "/gpt122", {"--set", pipe});
  checkSameWeights(dir + "/gpt122/model.safetensors", dir + "/gpt1/model.safetensors");
}

TEST_CASE("tensor parallel checkpoints resume across layouts: 1x1x2 -> 1x1x1 and 1x1x1 -> 1x1x2") {
  const std::string dir = tempDir("tp_resume");
  json job = mlpJob();
  job["checkpoint"] = {{"every_steps", 3}, {"keep", 2}};
  job["optimizer"] = {{"type", "adam"}, {"lr", 0.01}};  // per-element state travels too
  writeFile(dir + "/job.json", job.dump());
  train1(dir + "/job.json", dir + "/straight", {"--set", "train.max_steps=6", "--set", "checkpoint=false"});
  // Saved split, resumed whole.
  trainN(2, dir + "/job.json", dir + "/a", {"--set", "parallel.tensor=2", "--set", "train.max_steps=3"});
  auto resumed = train1(dir + "/job.json", dir + "/a", {"--set", "train.max_steps=6"});
  CHECK(resumed.out.find("resumed from") != std::string::npos);
  checkSameWeights(dir + "/a/model.safetensors", dir + "/straight/model.safetensors");
  // Saved whole, resumed split.
  train1(dir + "/job.json", dir + "/b", {"--set", "train.max_steps=3"});
  auto split = trainN(2, dir + "/job.json", dir + "/b", {"--set", "parallel.tensor=2", "--set", "train.max_steps=6"});
  CHECK(split.out.find("resumed from") != std::string::npos);
  checkSameWeights(dir + "/b/model.safetensors", dir + "/straight/model.safetensors");
}

TEST_CASE("a tensor degree that does not divide the heads or a width is refused with exit 2 before workers start") {
  const std::string dir = tempDir("tp_bad");
  writeFile(dir + "/job.json", gptJob(writeText(dir)).dump());
  auto r = run({dtrainBinary(), "run", "--standalone", "--nproc-per-node", "3", dir + "/job.json", "--set",
                "parallel.tensor=3", "--output-dir", dir + "/out"},
               {.timeout = 60s});
  INFO(r.err);
  CHECK(r.exitCode == 2);
  CHECK(r.err.find("n_head: 4 heads are not divisible by parallel.tensor 3") != std::string::npos);
  CHECK(r.out.find("[n0 r") == std::string::npos);  // no worker printed anything: none was started
  CHECK_FALSE(std::filesystem::exists(dir + "/out/model.safetensors"));
  writeFile(dir + "/mlp.json", mlpJob().dump());
  auto c = run({dtrainBinary(), "check", dir + "/mlp.json", "--set", "parallel.tensor=3"}, {.timeout = 60s});
  INFO(c.err);
  CHECK(c.exitCode == 2);
  CHECK(c.err.find("/model/layers/0/out: 16 is not divisible by parallel.tensor 3") != std::string::npos);
}
