// Pipeline parallelism as a user runs it (issue 12): weights after N steps under data x pipeline layouts equal
// the one-process run (MLP and the gpt preset, gpipe and 1f1b), checkpoints resume across layouts, a killed stage
// restarts the group from the last checkpoint, and bad layouts are refused before any worker starts.
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

// Five top-level layers; SGD with momentum; no dropout, so every layout computes the same function.
json mlpJob() {
  return json::parse(R"({
    "model": {"input": [6], "layers": [{"type": "linear", "out": 16}, {"type": "tanh"}, {"type": "linear", "out": 12},
                                       {"type": "tanh"}, {"type": "linear", "out": 3}]},
    "loss": {"type": "cross_entropy"},
    "data": {"train": {"format": "synthetic", "task": "classification", "samples": 96, "features": 6,
                       "num_classes": 3, "seed": 5},
             "eval": {"format": "synthetic", "task": "classification", "samples": 40, "features": 6, "num_classes": 3,
                      "seed": 5, "sample_seed": 9},
             "batch_size": 16, "shuffle": true},
    "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
    "train": {"epochs": 1, "seed": 11, "log_every": 1, "max_steps": 6},
    "checkpoint": false
  })");
}

json gptJob(const std::string& textFile) {
  return json{{"model", {{"preset", "gpt"}, {"vocab_size", 256}, {"block_size", 8}, {"n_layer", 2}, {"n_head", 2},
                         {"n_embd", 16}}},
              {"loss", {{"type", "cross_entropy"}}},
              // SGD: Adam would turn float rounding in the attention key bias's (mathematically zero) gradient
              // into lr-sized steps of either sign, which no layout can reproduce bit for bit.
              {"optimizer", {{"type", "sgd"}, {"lr", 0.5}, {"momentum", 0.9}, {"weight_decay", 0.01},
                             {"clip_grad_norm", 1.0}}},
              {"data", {{"train", {{"format", "text"}, {"path", textFile}, {"split", "train"}}}, {"batch_size", 8}}},
              {"train", {{"epochs", 1}, {"seed", 1}, {"max_steps", 4}, {"eval", false}}},
              {"checkpoint", false}};
}

std::string writeText(const std::string& dir) {
  std::string text;
  for (int i = 0; i < 120; ++i) text += "the quick brown fox jumps over the lazy dog " + std::to_string(i % 7) + "\n";
  writeFile(dir + "/text.txt", text);
  return dir + "/text.txt";
}

// `dtrain train` alone (n == 1) or `dtrain run -n N`, with --set overrides; the run must succeed.
void train(const std::string& job, const std::string& out, int n, std::vector<std::string> sets,
           std::map<std::string, std::string> env = {}, std::vector<std::string> launch = {}) {
  std::vector<std::string> argv{dtrainBinary()};
  if (n == 1) {
    argv.insert(argv.end(), {"train", job});
  } else {
    argv.insert(argv.end(), {"run", "--standalone", "--nproc-per-node", std::to_string(n)});
    argv.insert(argv.end(), launch.begin(), launch.end());
    argv.push_back(job);
  }
  argv.insert(argv.end(), {"--output-dir", out});
  for (const auto& s : sets) argv.insert(argv.end(), {"--set", s});
  auto r = run(argv, {.timeout = 180s, .env = env});
  INFO(r.err);
  REQUIRE(r.exitCode == 0);
}

// Every tensor of b equals a's to 1e-5 relative (max-norm of the difference over the max-norm of the tensor).
void checkSameWeights(const std::string& a, const std::string& b) {
  auto wa = readTensorsF32(a);
  auto wb = readTensorsF32(b);
  REQUIRE(!wa.empty());
  REQUIRE(wa.size() == wb.size());
  for (const auto& [name, va] : wa) {
    REQUIRE(wb.count(name) == 1);
    const auto& vb = wb[name];
    REQUIRE(va.size() == vb.size());
    double diff = 0, scale = 1e-12;
    for (size_t i = 0; i < va.size(); ++i) {
      diff = std::max(diff, static_cast<double>(std::fabs(va[i] - vb[i])));
      scale = std::max(scale, static_cast<double>(std::fabs(va[i])));
    }
    CHECK_MESSAGE(diff / scale < 1e-5, name, ": max difference ", diff, " of max ", scale);
  }
}

// The first training line and the last evaluation line of a metrics.jsonl.
json firstTrain(const std::vector<json>& lines) {
  for (const auto& l : lines)
    if (l.contains("loss") && !l.contains("eval_loss")) return l;
  FAIL("no training line");
  return {};
}
json lastEval(const std::vector<json>& lines) {
  for (auto it = lines.rbegin(); it != lines.rend(); ++it)
    if (it->contains("eval_loss")) return *it;
  FAIL("no evaluation line");
  return {};
}

std::string pipelineSet(int stages, const std::string& schedule, int micro) {
  return fmt::format(R"(parallel={{"pipeline": {{"stages": {}, "schedule": "{}", "micro_batches": {}}}}})", stages,
                     schedule, micro);
}

}  // namespace

TEST_CASE("pipeline: an MLP at 1x2x1, 1x4x1 (gpipe and 1f1b) and 2x2x1 ends with the one-process weights") {
  const std::string dir = tempDir("pipeline_mlp");
  writeFile(dir + "/job.json", mlpJob().dump());
  const std::string job = dir + "/job.json";
  train(job, dir + "/one", 1, {});
  train(job, dir + "/p2", 2, {pipelineSet(2, "gpipe", 4)});
  checkSameWeights(dir + "/one/model.safetensors", dir + "/p2/model.safetensors");
  train(job, dir + "/p4g", 4, {pipelineSet(4, "gpipe", 4)});
  checkSameWeights(dir + "/one/model.safetensors", dir + "/p4g/model.safetensors");
  train(job, dir + "/p4f", 4, {pipelineSet(4, "1f1b", 8)});
  checkSameWeights(dir + "/one/model.safetensors", dir + "/p4f/model.safetensors");
  // Two replicas of two stages: batch 8 per replica is the one process's 16.
  train(job, dir + "/d2p2", 4, {pipelineSet(2, "1f1b", 2), "data.batch_size=8"});
  checkSameWeights(dir + "/one/model.safetensors", dir + "/d2p2/model.safetensors");
  // The loss and evaluation are reported once per sample, as alone.
  auto one = readJsonLines(dir + "/one/metrics.jsonl");
  auto pipe = readJsonLines(dir + "/d2p2/metrics.jsonl");
  REQUIRE(!one.empty());
  REQUIRE(!pipe.empty());
  CHECK(firstTrain(pipe)["loss"].get<double>() == doctest::Approx(firstTrain(one)["loss"].get<double>()).epsilon(1e-4));
  CHECK(lastEval(pipe)["eval_loss"].get<double>() == doctest::Approx(lastEval(one)["eval_loss"].get<double>()).epsilon(1e-4));
}

TEST_CASE("pipeline: the gpt preset (tied lm_head, clipping by the global norm) at 1x2x1, 1x4x1 and 2x2x1") {
  const std::string dir = tempDir("pipeline_gpt");
  const std::string job = dir + "/job.json";
  writeFile(job, gptJob(writeText(dir)).dump());
  train(job, dir + "/one", 1, {});
  train(job, dir + "/p2", 2, {pipelineSet(2, "gpipe", 2)});
  checkSameWeights(dir + "/one/model.safetensors", dir + "/p2/model.safetensors");
  train(job, dir + "/p4", 4, {pipelineSet(4, "1f1b", 4)});
  checkSameWeights(dir + "/one/model.safetensors", dir + "/p4/model.safetensors");
  train(job, dir + "/d2p2", 4, {pipelineSet(2, "1f1b", 2), "data.batch_size=4"});
  checkSameWeights(dir + "/one/model.safetensors", dir + "/d2p2/model.safetensors");
}

TEST_CASE("pipeline: checkpoints resume under other layouts (2x2x1 -> 1x1x1, 1x2x1 -> 4x1x1, 1x1x1 -> 1x2x1)") {
  const std::string dir = tempDir("pipeline_resume");
  json doc = mlpJob();
  doc["optimizer"] = {{"type", "adam"}, {"lr", 0.01}};  // optimizer state that has to follow the parameters
  doc["checkpoint"] = {{"every_steps", 3}};
  const std::string job = dir + "/job.json";
  writeFile(job, doc.dump());
  train(job, dir + "/ref", 1, {});
  // 2x2x1 for 3 steps, then one process for the rest.
  train(job, dir + "/a", 4, {pipelineSet(2, "1f1b", 2), "data.batch_size=8", "train.max_steps=3"});
  CHECK(std::filesystem::exists(dir + "/a/checkpoints/step-000000003/model-p1-t0.safetensors"));
  CHECK(std::filesystem::exists(dir + "/a/checkpoints/step-000000003/optimizer-p0-t0.safetensors"));
  train(job, dir + "/a", 1, {});
  checkSameWeights(dir + "/ref/model.safetensors", dir + "/a/model.safetensors");
  // 1x2x1, then four data-parallel ranks of 4 samples.
  train(job, dir + "/b", 2, {pipelineSet(2, "gpipe", 4), "train.max_steps=3"});
  train(job, dir + "/b", 4, {"data.batch_size=4"});
  checkSameWeights(dir + "/ref/model.safetensors", dir + "/b/model.safetensors");
  // An unsharded checkpoint resumes a pipeline.
  train(job, dir + "/c", 1, {"train.max_steps=3"});
  train(job, dir + "/c", 2, {pipelineSet(2, "1f1b", 4)});
  checkSameWeights(dir + "/ref/model.safetensors", dir + "/c/model.safetensors");
}

TEST_CASE("pipeline: a killed stage restarts the whole group from the last checkpoint") {
  const std::string dir = tempDir("pipeline_kill");
  json doc = mlpJob();
  doc["checkpoint"] = {{"every_steps", 3}};
  const std::string job = dir + "/job.json";
  writeFile(job, doc.dump());
  train(job, dir + "/ref", 1, {});
  train(job, dir + "/k", 2, {pipelineSet(2, "1f1b", 4)}, {{"DTRAIN_FAULT", "rank=1,step=4,action=kill"}},
        {"--max-restarts", "1"});
  checkSameWeights(dir + "/ref/model.safetensors", dir + "/k/model.safetensors");
}

TEST_CASE("pipeline: bad layouts are refused before any worker starts; few micro-batches warn") {
  const std::string dir = tempDir("pipeline_bad");
  const std::string job = dir + "/job.json";
  writeFile(job, mlpJob().dump());
  auto check = [&](std::vector<std::string> extra) {
    std::vector<std::string> argv{dtrainBinary()};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return run(argv, {.timeout = 60s});
  };
  auto tooMany = check({"run", "--standalone", "-n", "2", job, "--set", pipelineSet(6, "1f1b", 8)});
  CHECK(tooMany.exitCode == 2);
  CHECK(tooMany.err.find("/parallel/pipeline/stages: 6 stages but the model has 5 layers") != std::string::npos);
  auto balance = check({"check", job, "--set", R"(parallel={"pipeline": {"stages": 2, "balance": [2, 2]}})"});
  CHECK(balance.exitCode == 2);
  CHECK(balance.err.find("/parallel/pipeline/balance") != std::string::npos);
  auto world = check({"run", "--standalone", "-n", "3", job, "--set", pipelineSet(2, "1f1b", 4)});
  CHECK(world.exitCode == 2);
  CHECK(world.err.find("a world of 3 rank(s) is not divisible by pipeline stages 2 x tensor 1 = 2") != std::string::npos);
  CHECK(world.err.find("[n0 r") == std::string::npos);  // no worker started
  auto warned = check({"check", job, "--world", "4", "--set", pipelineSet(4, "gpipe", 2)});
  INFO(warned.err);
  CHECK(warned.exitCode == 0);
  CHECK(warned.err.find("warning:") != std::string::npos);
  CHECK(warned.err.find("2 micro-batches for 4 stages") != std::string::npos);
  CHECK(warned.out.find("layout: 4 rank(s) = data 1 x pipeline 4 x tensor 1") != std::string::npos);
}
