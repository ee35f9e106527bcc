// Pipeline parallelism as a user runs it (issue 12): weights after N steps under data x pipeline layouts equal
// the one-process run (MLP and the gpt preset, gpipe and 1f1b), checkpoints resume across layouts, a killed stage
// restarts the group from the last checkpoint, and bad layouts are refused before any worker starts.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <string>
#include <vector>

#include "tests/integration/launch_helpers.h"
#include "tests/integration/model_parallel_helpers.h"
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
  return writeCorpus(dir, "the quick brown fox jumps over the lazy dog #\n", 120);
}

}  // namespace

TEST_CASE("pipeline: an MLP at 1x2x1, 1x4x1 (gpipe and 1f1b) and 2x2x1 ends with the one-process weights") {
  const std::string dir = tempDir("pipeline_mlp");
  writeFile(dir + "/job.json", mlpJob().dump());
  const std::string job = dir + "/job.json";
  trainJob(job, dir + "/one", 1, {});
  trainJob(job, dir + "/p2", 2, {parallelSet(2, "gpipe", 4)});
  checkSameWeights(dir + "/p2/model.safetensors", dir + "/one/model.safetensors");
  trainJob(job, dir + "/p4g", 4, {parallelSet(4, "gpipe", 4)});
  checkSameWeights(dir + "/p4g/model.safetensors", dir + "/one/model.safetensors");
  trainJob(job, dir + "/p4f", 4, {parallelSet(4, "1f1b", 8)});
  checkSameWeights(dir + "/p4f/model.safetensors", dir + "/one/model.safetensors");
  // Two replicas of two stages: batch 8 per replica is the one process's 16.
  auto d2p2 = trainJob(job, dir + "/d2p2", 4, {parallelSet(2, "1f1b", 2), "data.batch_size=8"});
  checkSameWeights(dir + "/d2p2/model.safetensors", dir + "/one/model.safetensors");
  CHECK(d2p2.out.find("2 data replica(s) of 2 ranks x batch 8, 6 steps") != std::string::npos);
  // The model's parameter count, and rank 0's part of it (it printed its stage's 112 as the model's).
  CHECK_MESSAGE(d2p2.out.find(": 355 parameters (rank 0 holds 112), 96 training samples") != std::string::npos, d2p2.out);
  // The loss and evaluation are reported once per sample, as alone.
  auto one = readJsonLines(dir + "/one/metrics.jsonl");
  auto pipe = readJsonLines(dir + "/d2p2/metrics.jsonl");
  REQUIRE(!one.empty());
  REQUIRE(!pipe.empty());
  CHECK(firstTrainLine(pipe)["loss"].get<double>() == doctest::Approx(firstTrainLine(one)["loss"].get<double>()).epsilon(1e-4));
  CHECK(lastEvalLine(pipe)["eval_loss"].get<double>() == doctest::Approx(lastEvalLine(one)["eval_loss"].get<double>()).epsilon(1e-4));
}

TEST_CASE("pipeline: the gpt preset (tied lm_head, clipping by the global norm) at 1x2x1, 1x4x1 (1f1b, gpipe), 2x2x1") {
  const std::string dir = tempDir("pipeline_gpt");
  const std::string job = dir + "/job.json";
  writeFile(job, gptJob(writeText(dir)).dump());
  trainJob(job, dir + "/one", 1, {});
  trainJob(job, dir + "/p2", 2, {parallelSet(2, "gpipe", 2)});
  checkSameWeights(dir + "/p2/model.safetensors", dir + "/one/model.safetensors");
  trainJob(job, dir + "/p4", 4, {parallelSet(4, "1f1b", 4)});
  checkSameWeights(dir + "/p4/model.safetensors", dir + "/one/model.safetensors");
  trainJob(job, dir + "/p4g", 4, {parallelSet(4, "gpipe", 4)});
  checkSameWeights(dir + "/p4g/model.safetensors", dir + "/one/model.safetensors");
  trainJob(job, dir + "/d2p2", 4, {parallelSet(2, "1f1b", 2), "data.batch_size=4"});
  checkSameWeights(dir + "/d2p2/model.safetensors", dir + "/one/model.safetensors");
}

TEST_CASE("pipeline: a gpt job's bigram baseline is the one-process one; init.from another model names file and tensor") {
  const std::string dir = tempDir("pipeline_bigram");
  const std::string job = dir + "/job.json";
  json doc = gptJob(writeText(dir));
  doc["data"]["eval"] = doc["data"]["train"];
  doc["data"]["eval"]["split"] = "val";
  doc["train"]["max_steps"] = 1;
  writeFile(job, doc.dump());
  auto baseline = [](const std::string& out) {
    const std::string key = "bigram baseline on the same split: eval loss ";
    const auto at = out.find(key);
    REQUIRE(at != std::string::npos);
    return std::stod(out.substr(at + key.size(), 6));
  };
  const double one = baseline(trainJob(job, dir + "/one", 1, {}).out);
  const double piped = baseline(trainJob(job, dir + "/p2", 2, {parallelSet(2, "1f1b", 2)}).out);
  CHECK(one > 0.5);
  CHECK(piped == doctest::Approx(one).epsilon(1e-3));
  // init.from another model's weights names the file and the missing tensor under a pipeline, as alone.
  writeFile(dir + "/mlp.json", mlpJob().dump());
  trainJob(dir + "/mlp.json", dir + "/mlp", 1, {});
  auto other = run({dtrainBinary(), "run", "--standalone", "--nproc-per-node", "2", job, "--output-dir", dir + "/o",
                    "--set", parallelSet(2, "1f1b", 2), "--set", "init.from=" + dir + "/mlp/model.safetensors"},
                   {.timeout = 120s});
  INFO(other.err);
  CHECK(other.exitCode == 8);
  // Either stage may fail first (the other is then stopped): each names the file and its first missing tensor.
  CHECK(other.err.find("/mlp/model.safetensors: no tensor named 'transformer.") != std::string::npos);
}

TEST_CASE("pipeline: checkpoints resume under other layouts (2x2x1 -> 1x1x1, 1x2x1 -> 4x1x1, 1x1x1 -> 1x2x1)") {
  const std::string dir = tempDir("pipeline_resume");
  json doc = mlpJob();
  doc["optimizer"] = {{"type", "adam"}, {"lr", 0.01}};  // optimizer state that has to follow the parameters
  doc["checkpoint"] = {{"every_steps", 3}};
  const std::string job = dir + "/job.json";
  writeFile(job, doc.dump());
  trainJob(job, dir + "/ref", 1, {});
  // 2x2x1 for 3 steps, then one process for the rest.
  trainJob(job, dir + "/a", 4, {parallelSet(2, "1f1b", 2), "data.batch_size=8", "train.max_steps=3"});
  CHECK(std::filesystem::exists(dir + "/a/checkpoints/step-000000003/model-p1-t0.safetensors"));
  CHECK(std::filesystem::exists(dir + "/a/checkpoints/step-000000003/optimizer-p0-t0.safetensors"));
  trainJob(job, dir + "/a", 1, {});
  checkSameWeights(dir + "/a/model.safetensors", dir + "/ref/model.safetensors");
  // 1x2x1, then four data-parallel ranks of 4 samples.
  trainJob(job, dir + "/b", 2, {parallelSet(2, "gpipe", 4), "train.max_steps=3"});
  trainJob(job, dir + "/b", 4, {"data.batch_size=4"});
  checkSameWeights(dir + "/b/model.safetensors", dir + "/ref/model.safetensors");
  // An unsharded checkpoint resumes a pipeline.
  trainJob(job, dir + "/c", 1, {"train.max_steps=3"});
  trainJob(job, dir + "/c", 2, {parallelSet(2, "1f1b", 4)});
  checkSameWeights(dir + "/c/model.safetensors", dir + "/ref/model.safetensors");
}

TEST_CASE("pipeline: a killed stage restarts the whole group from the last checkpoint") {
  const std::string dir = tempDir("pipeline_kill");
  json doc = mlpJob();
  doc["checkpoint"] = {{"every_steps", 3}};
  const std::string job = dir + "/job.json";
  writeFile(job, doc.dump());
  trainJob(job, dir + "/ref", 1, {});
  trainJob(job, dir + "/k", 2, {parallelSet(2, "1f1b", 4)}, {{"DTRAIN_FAULT", "rank=1,step=4,action=kill"}},
        {"--max-restarts", "1"});
  checkSameWeights(dir + "/k/model.safetensors", dir + "/ref/model.safetensors");
}

TEST_CASE("pipeline: bad layouts are refused before any worker starts; few micro-batches and a cut pair warn") {
  const std::string dir = tempDir("pipeline_bad");
  const std::string job = dir + "/job.json";
  writeFile(job, mlpJob().dump());
  auto check = [&](std::vector<std::string> extra) {
    std::vector<std::string> argv{dtrainBinary()};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return run(argv, {.timeout = 60s});
  };
  auto tooMany = check({"run", "--standalone", "-n", "2", job, "--set", parallelSet(6, "1f1b", 8)});
  CHECK(tooMany.exitCode == 2);
  CHECK(tooMany.err.find("/parallel/pipeline/stages: 6 stages but the model has 5 layers") != std::string::npos);
  auto balance = check({"check", job, "--set", R"(parallel={"pipeline": {"stages": 2, "balance": [2, 2]}})"});
  CHECK(balance.exitCode == 2);
  CHECK(balance.err.find("/parallel/pipeline/balance") != std::string::npos);
  auto world = check({"run", "--standalone", "-n", "3", job, "--set", parallelSet(2, "1f1b", 4)});
  CHECK(world.exitCode == 2);
  CHECK(world.err.find("a world of 3 rank(s) is not divisible by pipeline stages 2 x tensor 1 = 2") != std::string::npos);
  CHECK(world.err.find("[n0 r") == std::string::npos);  // no worker started
  // `check --world` with a world the layout rejects says so and nothing else: no "OK", no summary.
  auto checkWorld = check({"check", job, "--world", "3", "--set", parallelSet(2, "1f1b", 4)});
  CHECK(checkWorld.exitCode == 2);
  CHECK(checkWorld.err.find("a world of 3 rank(s) is not divisible by pipeline stages 2") != std::string::npos);
  CHECK(checkWorld.out.find("OK") == std::string::npos);
  auto warned = check({"check", job, "--world", "4", "--set", parallelSet(4, "gpipe", 2)});
  INFO(warned.err);
  CHECK(warned.exitCode == 0);
  CHECK(warned.err.find("warning:") != std::string::npos);
  CHECK(warned.err.find("2 micro-batches for 4 stages") != std::string::npos);
  CHECK(warned.out.find("layout: 4 rank(s) = data 1 x pipeline 4 x tensor 1") != std::string::npos);
  // A balance that cuts a column/row pair runs (the layer stays whole) but says so; the automatic one does not cut.
  auto cut = check({"check", job, "--world", "4", "--set",
                    R"(parallel={"tensor": 2, "pipeline": {"stages": 2, "micro_batches": 4, "balance": [2, 3]}})"});
  INFO(cut.err);
  CHECK(cut.exitCode == 0);
  CHECK(cut.err.find("warning:") != std::string::npos);
  CHECK(cut.err.find("/parallel/pipeline/balance: the stage boundary between layers 0 and 2 splits a column/row "
                     "linear pair: layer 0 stay(s) whole") != std::string::npos);
  auto kept = check({"check", job, "--world", "4", "--set", parallelSet(2, "1f1b", 4, 2)});
  INFO(kept.err);
  CHECK(kept.exitCode == 0);
  CHECK(kept.err.find("warning:") == std::string::npos);
  CHECK(kept.out.find("0..2 (3 layers: 0 linear .. 2 linear)") != std::string::npos);
  // Elastic: the node counts whose world the grid cannot use are said before any node waits (a round of that many
  // used to end the job as a config error after the rendezvous, unannounced); none usable is refused (exit 2).
  const std::vector<std::string> elastic{"run", "--dry-run", "--rdzv-backend", "store", "--rdzv-endpoint",
                                         "127.0.0.1:29999", "-n", "1"};
  auto some = elastic;
  some.insert(some.end(), {"--nnodes", "1:4", job, "--set", parallelSet(2, "1f1b", 4)});
  auto someBad = check(some);
  INFO(someBad.err);
  CHECK(someBad.exitCode == 0);
  CHECK(someBad.err.find("warning: --nnodes 1:4: the world of 1, 3 node(s) cannot run this job") != std::string::npos);
  CHECK(someBad.err.find("a world of 1 rank(s) is not divisible by pipeline stages 2") != std::string::npos);
  auto none = elastic;
  none.insert(none.end(), {"--nnodes", "1:3", job, "--set", parallelSet(4, "1f1b", 4)});
  auto noneFit = check(none);
  INFO(noneFit.err);
  CHECK(noneFit.exitCode == 2);
  CHECK(noneFit.err.find("--nnodes 1:3: no node count in 1..3 gives a world this job can use") != std::string::npos);
  auto all = elastic;
  all[7] = "2";  // 2 ranks per node: every world divides by 2 stages
  all.insert(all.end(), {"--nnodes", "1:4", job, "--set", parallelSet(2, "1f1b", 4)});
  auto allFit = check(all);
  CHECK(allFit.exitCode == 0);
  CHECK(allFit.err.find("--nnodes") == std::string::npos);
}
