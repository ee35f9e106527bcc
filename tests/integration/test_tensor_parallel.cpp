// Tensor parallelism (issue 12) from a user's side: `"parallel": {"tensor": T}` under `dtrain run` ends with the
// same weights (1e-5 relative) as the one-process run of the same job, for an MLP and the gpt preset, alone and
// combined with data parallelism and pipeline stages (up to 2x2x2); checkpoints resume across layouts (1x1x2 <->
// 1x1x1, 2x2x2 -> 1x4x1 and -> data-parallel only); the exported
// model.safetensors is the full, unsplit model; a tensor degree that does not divide the heads or widths is
// refused with exit 2 before any worker starts.
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
  return writeCorpus(dir, "the quick brown fox jumps over the lazy dog. ", 60);
}

}  // namespace

TEST_CASE("tensor parallel MLP: 1x1x2 and 2x1x2 end with the one-process weights and evaluate each sample once") {
  const std::string dir = tempDir("tp_mlp");
  // 40 training samples: the epoch (and with it an evaluation) ends at max_steps 5.
  json job = mlpJob();
  job["data"]["train"]["samples"] = 40;
  job["data"]["eval"] = {{"format", "synthetic"}, {"task", "classification"}, {"samples", 24}, {"features", 6},
                         {"num_classes", 3}, {"seed", 5}, {"sample_seed", 9}};
  writeFile(dir + "/job.json", job.dump());
  auto one = trainJob(dir + "/job.json", dir + "/one", 1);
  auto t2 = trainJob(dir + "/job.json", dir + "/t2", 2, {"parallel.tensor=2"});
  CHECK(t2.out.find("tensor 2 x data 1") != std::string::npos);
  checkSameWeights(dir + "/t2/model.safetensors", dir + "/one/model.safetensors");
  // Data 2 x tensor 2 with batch 4 per replica is the one-process run with batch 8.
  auto d2t2 = trainJob(dir + "/job.json", dir + "/d2t2", 4, {"parallel.tensor=2", "data.batch_size=4"});
  checkSameWeights(dir + "/d2t2/model.safetensors", dir + "/one/model.safetensors");
  // The 24 eval samples are counted once, not once per tensor rank ("(48 samples)" before), with the same loss.
  for (const auto* run : {&one, &t2, &d2t2}) CHECK_MESSAGE(run->out.find("(24 samples)") != std::string::npos, run->out);
  CHECK(lastEvalLine(readJsonLines(dir + "/t2/metrics.jsonl"))["eval_loss"].get<double>() ==
        doctest::Approx(lastEvalLine(readJsonLines(dir + "/one/metrics.jsonl"))["eval_loss"].get<double>()).epsilon(1e-4));
}

TEST_CASE("tensor parallel GPT: 1x1x2 ends with the one-process weights; the export is the full model") {
  const std::string dir = tempDir("tp_gpt");
  writeFile(dir + "/job.json", gptJob(writeText(dir)).dump());
  trainJob(dir + "/job.json", dir + "/one", 1);
  trainJob(dir + "/job.json", dir + "/t2", 2, {"parallel.tensor=2"});
  checkSameWeights(dir + "/t2/model.safetensors", dir + "/one/model.safetensors");
  auto t = readTensorsF32(dir + "/t2/model.safetensors");
  CHECK(t.at("transformer.h.0.attn.c_attn.weight").size() == 3 * 16 * 16);
  CHECK(t.at("transformer.h.1.mlp.c_fc.weight").size() == 64 * 16);
}

TEST_CASE("pipeline x tensor: 1x2x2 and 2x2x2 (MLP, GPT) end with the one-process weights") {
  const std::string dir = tempDir("tp_pipe");
  const std::string pipe = R"(parallel={"tensor": 2, "pipeline": {"stages": 2, "micro_batches": 2}})";
  writeFile(dir + "/mlp.json", mlpJob().dump());
  trainJob(dir + "/mlp.json", dir + "/mlp1", 1);
  trainJob(dir + "/mlp.json", dir + "/mlp122", 4, {pipe});
  checkSameWeights(dir + "/mlp122/model.safetensors", dir + "/mlp1/model.safetensors");
  // 8 processes on a small machine: few steps, batch 4 per replica.
  trainJob(dir + "/mlp.json", dir + "/mlp222", 8, {pipe, "data.batch_size=4"});
  checkSameWeights(dir + "/mlp222/model.safetensors", dir + "/mlp1/model.safetensors");
  writeFile(dir + "/gpt.json", gptJob(writeText(dir)).dump());
  trainJob(dir + "/gpt.json", dir + "/gpt1", 1);
  trainJob(dir + "/gpt.json", dir + "/gpt122", 4, {pipe});
  checkSameWeights(dir + "/gpt122/model.safetensors", dir + "/gpt1/model.safetensors");
  // 2 replicas of 2 samples (one per micro-batch) are the one process's batch of 4; the export is the full model.
  trainJob(dir + "/gpt.json", dir + "/gpt222", 8, {pipe, "data.batch_size=2"});
  checkSameWeights(dir + "/gpt222/model.safetensors", dir + "/gpt1/model.safetensors");
}

TEST_CASE("tensor parallel checkpoints resume across layouts: 1x1x2 -> 1x1x1 and 1x1x1 -> 1x1x2") {
  const std::string dir = tempDir("tp_resume");
  json job = mlpJob();
  job["checkpoint"] = {{"every_steps", 3}, {"keep", 2}};
  job["optimizer"] = {{"type", "adam"}, {"lr", 0.01}};  // per-element state travels too
  writeFile(dir + "/job.json", job.dump());
  trainJob(dir + "/job.json", dir + "/straight", 1, {"train.max_steps=6", "checkpoint=false"});
  // Saved split, resumed whole.
  trainJob(dir + "/job.json", dir + "/a", 2, {"parallel.tensor=2", "train.max_steps=3"});
  auto resumed = trainJob(dir + "/job.json", dir + "/a", 1, {"train.max_steps=6"});
  CHECK(resumed.out.find("resumed from") != std::string::npos);
  checkSameWeights(dir + "/a/model.safetensors", dir + "/straight/model.safetensors");
  // Saved whole, resumed split.
  trainJob(dir + "/job.json", dir + "/b", 1, {"train.max_steps=3"});
  auto split = trainJob(dir + "/job.json", dir + "/b", 2, {"parallel.tensor=2", "train.max_steps=6"});
  CHECK(split.out.find("resumed from") != std::string::npos);
  checkSameWeights(dir + "/b/model.safetensors", dir + "/straight/model.safetensors");
}

namespace {

// The issue's resume across layouts with pipeline and tensor together: `job` (max_steps 6, a checkpoint every 3
// steps, `batch` samples per step) saved at data 2 x pipeline 2 x tensor 2 after 3 steps, resumed once at 1x4x1
// (gpipe) and once at `dataRanks` x 1 x 1 (plain DDP); both end with the uninterrupted one-process run's weights.
void resumeFrom222(const std::string& dir, const std::string& job, int batch, int dataRanks) {
  trainJob(job, dir + "/straight", 1, {"checkpoint=false"});
  trainJob(job, dir + "/a", 8,
           {parallelSet(2, "1f1b", 2, 2), fmt::format("data.batch_size={}", batch / 2), "train.max_steps=3"});
  const std::string step3 = dir + "/a/checkpoints/step-000000003";
  for (const char* shard : {"p0-t0", "p0-t1", "p1-t0", "p1-t1"})  // each (stage, tensor) shard writes its pieces
    CHECK(std::filesystem::exists(fmt::format("{}/model-{}.safetensors", step3, shard)));
  std::filesystem::copy(dir + "/a", dir + "/b", std::filesystem::copy_options::recursive);
  auto pipeline = trainJob(job, dir + "/a", 4, {parallelSet(4, "gpipe", 4)});
  CHECK(pipeline.out.find("resumed from") != std::string::npos);
  checkSameWeights(dir + "/a/model.safetensors", dir + "/straight/model.safetensors");
  auto data = trainJob(job, dir + "/b", dataRanks, {fmt::format("data.batch_size={}", batch / dataRanks)});
  CHECK(data.out.find("resumed from") != std::string::npos);
  checkSameWeights(dir + "/b/model.safetensors", dir + "/straight/model.safetensors");
}

}  // namespace

TEST_CASE("MLP checkpoints resume across layouts with pipeline and tensor: 2x2x2 -> 1x4x1 and 2x2x2 -> 8x1x1") {
  const std::string dir = tempDir("mp_resume_mlp");
  json job = mlpJob();
  job["checkpoint"] = {{"every_steps", 3}};
  job["optimizer"] = {{"type", "adam"}, {"lr", 0.01}, {"clip_grad_norm", 0.5}};  // the moments travel too
  job["train"]["max_steps"] = 6;
  writeFile(dir + "/job.json", job.dump());
  resumeFrom222(dir, dir + "/job.json", 8, 8);
}

TEST_CASE("GPT checkpoints resume across layouts with pipeline and tensor: 2x2x2 -> 1x4x1 and 2x2x2 -> 4x1x1") {
  // 4 data ranks, not 8: the batch of 4 does not split over 8.
  const std::string dir = tempDir("mp_resume_gpt");
  json job = gptJob(writeText(dir));
  job["checkpoint"] = {{"every_steps", 3}};  // SGD's momentum travels
  job["train"]["max_steps"] = 6;
  writeFile(dir + "/job.json", job.dump());
  resumeFrom222(dir, dir + "/job.json", 4, 4);
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

TEST_CASE("a tensor degree on a model with nothing to split warns before workers start") {
  const std::string dir = tempDir("tp_nothing");
  json doc = mlpJob();
  // A dropout between the linears: no column/row pair, no attention, so every tensor rank would hold it all.
  doc["model"]["layers"] = json::parse(R"([{"type": "linear", "out": 16}, {"type": "dropout", "p": 0.1},
                                           {"type": "linear", "out": 3}])");
  writeFile(dir + "/job.json", doc.dump());
  auto c = run({dtrainBinary(), "check", dir + "/job.json", "--world", "2", "--set", "parallel.tensor=2"},
               {.timeout = 60s});
  INFO(c.err);
  CHECK(c.exitCode == 0);
  CHECK(c.err.find("warning: ") != std::string::npos);
  CHECK(c.err.find("job.json: /parallel/tensor: 2 ranks split no layer of this model") != std::string::npos);
  // A model that splits does not warn.
  writeFile(dir + "/mlp.json", mlpJob().dump());
  auto ok = run({dtrainBinary(), "check", dir + "/mlp.json", "--world", "2", "--set", "parallel.tensor=2"},
                {.timeout = 60s});
  INFO(ok.err);
  CHECK(ok.exitCode == 0);
  CHECK(ok.err.find("split no layer") == std::string::npos);
}
