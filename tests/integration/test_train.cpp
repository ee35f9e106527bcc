// The built-in trainer as a user runs it: dtrain check / train / run JOB.json, files written, equivalence.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <set>

#include "tests/integration/launch_helpers.h"
#include "tests/integration/train_helpers.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;
using nlohmann::json;

namespace {

const char* kJob = R"({
  "model": {"input": [6], "layers": [{"type": "linear", "out": 16}, {"type": "tanh"}, {"type": "linear", "out": 3}]},
  "loss": {"type": "cross_entropy"},
  "data": {"train": {"format": "synthetic", "task": "classification", "samples": 96, "features": 6, "num_classes": 3,
                     "seed": 5},
           "eval": {"format": "synthetic", "task": "classification", "samples": 50, "features": 6, "num_classes": 3,
                    "seed": 5, "sample_seed": 9},
           "batch_size": 8, "shuffle": true},
  "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
  "train": {"epochs": 2, "seed": 11, "log_every": 1},
  "checkpoint": false
})";

// The last evaluation line of a metrics.jsonl.
json lastEval(const std::vector<json>& lines) {
  for (auto it = lines.rbegin(); it != lines.rend(); ++it)
    if (it->contains("eval_loss")) return *it;
  FAIL("no evaluation line");
  return {};
}

}  // namespace

TEST_CASE("dtrain check validates the shipped main job and prints the model summary") {
  auto r = run({dtrainBinary(), "check", sourceDir() + "/configs/fashion_mnist_mlp.json"}, {.timeout = 60s});
  INFO(r.err);
  REQUIRE(r.exitCode == 0);
  CHECK(r.out.find("OK") != std::string::npos);
  CHECK(r.out.find("269322") != std::string::npos);  // 784*256+256 + 256*256+256 + 256*10+10 parameters
  for (auto name : {"linear_regression.json", "fashion_mnist_cnn.json"}) {
    auto c = run({dtrainBinary(), "check", sourceDir() + "/configs/" + name}, {.timeout = 60s});
    CHECK_MESSAGE(c.exitCode == 0, name, c.err);
  }
}

TEST_CASE("a bad job is rejected with exit 2 by check, train and run (before any worker starts)") {
  std::string dir = tempDir("badjob");
  json doc = json::parse(kJob);
  doc["model"]["layers"][2]["out"] = "three";
  writeFile(dir + "/bad.json", doc.dump());
  auto c = run({dtrainBinary(), "check", dir + "/bad.json"});
  CHECK(c.exitCode == 2);
  CHECK(c.err.find("/model/layers/2/out") != std::string::npos);
  auto t = run({dtrainBinary(), "train", dir + "/bad.json"});
  CHECK(t.exitCode == 2);
  auto r = run({dtrainBinary(), "run", "--standalone", "--nproc-per-node", "2", dir + "/bad.json", "--output-dir", dir + "/out"});
  CHECK(r.exitCode == 2);
  CHECK(r.err.find("/model/layers/2/out") != std::string::npos);
  CHECK(r.out.find("[n0 r") == std::string::npos);  // no worker printed anything: none was started
  CHECK_FALSE(std::filesystem::exists(dir + "/out"));
  auto s = run({dtrainBinary(), "check", dir + "/bad.json", "--set", "nonsense"});
  CHECK(s.exitCode == 2);
  CHECK(s.err.find("expected PATH=VALUE") != std::string::npos);
}

TEST_CASE("a cosine warm-up as long as the run is exit 2 naming /schedule/warmup_steps, before any worker starts") {
  std::string dir = tempDir("warmup");
  json doc = json::parse(kJob);  // 96 samples, batch 8: 12 steps per epoch on 1 rank, 2 epochs
  doc["schedule"] = {{"type", "cosine"}, {"warmup_steps", 30}};
  writeFile(dir + "/job.json", doc.dump());
  auto c = run({dtrainBinary(), "check", dir + "/job.json"});
  CHECK(c.exitCode == 2);
  CHECK_MESSAGE(c.err.find("/schedule/warmup_steps: 30 warm-up step(s), but the run has only 24 step(s) (2 epoch(s) "
                           "of 12 step(s) on 1 rank)") != std::string::npos,
                c.err);
  auto r = run({dtrainBinary(), "run", "--standalone", "--nproc-per-node", "2", dir + "/job.json", "--set",
                "schedule.warmup_steps=10", "--set", "train.max_steps=5", "--output-dir", dir + "/out"});
  CHECK(r.exitCode == 2);
  CHECK_MESSAGE(r.err.find("/schedule/warmup_steps: 10 warm-up step(s), but the run has only 5 step(s) "
                           "(/train/max_steps 5)") != std::string::npos,
                r.err);
  CHECK(r.out.find("[n0 r") == std::string::npos);  // no worker was started
  // A world large enough to leave fewer steps than the warm-up: the trainer names the field and its world.
  auto t = run({dtrainBinary(), "run", "--standalone", "--nproc-per-node", "2", dir + "/job.json", "--set",
                "schedule.warmup_steps=20", "--output-dir", dir + "/out2"});
  CHECK(t.exitCode == 2);
  CHECK_MESSAGE(t.err.find("/schedule/warmup_steps: 20 warm-up step(s), but the run has only 12 step(s) (2 epoch(s) "
                           "of 6 step(s) on 2 rank(s))") != std::string::npos,
                t.err);
  writeFile(dir + "/ok.json", doc.dump());
  auto ok = run({dtrainBinary(), "train", dir + "/ok.json", "--set", "schedule.warmup_steps=4", "--output-dir",
                 dir + "/out3"});
  CHECK_MESSAGE(ok.exitCode == 0, ok.err);
}

TEST_CASE("data parallel: 2 ranks x batch b give the same weights as 1 rank x batch 2b") {
  std::string dir = tempDir("ddp");
  writeFile(dir + "/job.json", kJob);
  auto one = run({dtrainBinary(), "train", dir + "/job.json", "--set", "data.batch_size=16", "--output-dir", dir + "/one"},
                 {.timeout = 60s});
  INFO(one.err);
  REQUIRE(one.exitCode == 0);
  auto two = run({dtrainBinary(), "run", "--standalone", "--nproc-per-node", "2", dir + "/job.json", "--set",
                  "data.batch_size=8", "--output-dir", dir + "/two"},
                 {.timeout = 60s});
  INFO(two.err);
  REQUIRE(two.exitCode == 0);
  auto a = readTensorsF32(dir + "/one/model.safetensors");
  auto b = readTensorsF32(dir + "/two/model.safetensors");
  REQUIRE(a.size() == 4);
  REQUIRE(b.size() == 4);
  for (auto& [name, va] : a) {
    auto& vb = b[name];
    REQUIRE(va.size() == vb.size());
    for (size_t i = 0; i < va.size(); ++i) CHECK_MESSAGE(std::fabs(va[i] - vb[i]) < 1e-5f, name, "[", i, "]");
  }
  // The two runs also report the same evaluation (the eval set is sharded and reduced over ranks).
  auto ma = readJsonLines(dir + "/one/metrics.jsonl");
  auto mb = readJsonLines(dir + "/two/metrics.jsonl");
  REQUIRE(!ma.empty());
  REQUIRE(!mb.empty());
  CHECK(lastEval(ma)["eval_loss"].get<double>() == doctest::Approx(lastEval(mb)["eval_loss"].get<double>()).epsilon(1e-4));
  CHECK(lastEval(ma)["eval_accuracy"] == lastEval(mb)["eval_accuracy"]);
}

TEST_CASE("a batch_size above a rank's share of the data trains on the share, sized for it (PyTorch's DataLoader)") {
  // 96 samples over 2 ranks: 48 each. batch_size 2,000,000 is one batch of 48 per rank and epoch, as batch_size 48
  // is; the workers used to size their activations for 2,000,000 samples (919 MiB of RSS per rank for this MLP).
  std::string dir = tempDir("batch_over_share");
  writeFile(dir + "/job.json", kJob);
  auto runWith = [&](const std::string& batch, const std::string& out) {
    auto r = run({dtrainBinary(), "run", "--standalone", "--nproc-per-node", "2", dir + "/job.json", "--set",
                  "data.batch_size=" + batch, "--output-dir", dir + "/" + out},
                 {.timeout = 60s});
    INFO(r.out, r.err);
    REQUIRE(r.exitCode == 0);
    return r;
  };
  const auto share = runWith("48", "share");
  const auto absurd = runWith("2000000", "absurd");
  CHECK(absurd.out.find("2 rank(s) x batch 48 (batch_size 2000000 is more than a rank's 48 samples), 2 steps") !=
        std::string::npos);
  CHECK(readTensorsRaw(dir + "/share/model.safetensors") == readTensorsRaw(dir + "/absurd/model.safetensors"));
  const auto lines = readJsonLines(dir + "/absurd/metrics.jsonl");
  REQUIRE(!lines.empty());
  REQUIRE(lines.back().contains("peak_rss_mb"));
  CHECK(lines.back()["peak_rss_mb"].get<double>() < 200);
}

TEST_CASE("drop_last: an epoch whose rest makes no batch on any rank says it took 0 steps and logs its samples") {
  // 20 samples, batch 2, drop_last. 2 ranks train 4 of their 5 steps (16 samples of epoch 1) and checkpoint; the job
  // resumes with 4 ranks: the 4 samples left are 1 per rank, no batch on any rank, so the rest of epoch 1 takes no
  // step.
  // The run said nothing of it, and the sample log had no line for those samples (dtrain sim counted them skipped).
  std::string dir = tempDir("empty_epoch");
  nlohmann::json job = smallJob(20, 2, 2);
  job["data"]["drop_last"] = true;
  job["checkpoint"] = {{"every_steps", 1}, {"keep", 2}};
  writeFile(dir + "/job.json", job.dump());
  const RunOptions opts{.timeout = 60s, .env = {{"DTRAIN_SAMPLE_LOG", dir + "/samples"}}};
  auto first = run({dtrainBinary(), "run", "--standalone", "--nproc-per-node", "2", dir + "/job.json", "--set",
                    "train.max_steps=4", "--output-dir", dir + "/out"},
                   opts);
  INFO(first.out, first.err);
  REQUIRE(first.exitCode == 0);
  auto second = run({dtrainBinary(), "run", "--standalone", "--nproc-per-node", "4", dir + "/job.json", "--output-dir",
                     dir + "/out"},
                    opts);
  INFO(second.out, second.err);
  REQUIRE(second.exitCode == 0);
  CHECK((second.out + second.err).find("epoch 1/2: 0 steps: the rest of the epoch, 4 sample(s) over 4 rank(s) (at "
                                       "most 1 per rank), makes no batch of 2 (data.drop_last drops them") !=
        std::string::npos);
  // Epoch 0's samples: 16 trained by the 2 ranks, the other 4 logged as dropped on the 4 ranks' "steps": 0 lines.
  std::set<int64_t> trained, dropped;
  int emptyLines = 0;
  for (const auto& f : std::filesystem::directory_iterator(dir + "/samples"))
    for (const auto& line : readJsonLines(f.path().string())) {
      if (line["epoch"] != 0) continue;
      if (line.value("steps", 1) == 0) {
        ++emptyLines;
        CHECK(line["idx"].empty());
        CHECK(line["step"] == 4);
        CHECK(line["world"] == 4);
      }
      for (int64_t i : line["idx"]) CHECK(trained.insert(i).second);
      if (line.contains("drop")) for (int64_t i : line["drop"]) dropped.insert(i);
    }
  CHECK(emptyLines == 4);
  CHECK(trained.size() == 16);
  CHECK(dropped.size() == 4);
  for (int64_t i : dropped) CHECK_FALSE(trained.contains(i));
  // Epoch 2 trains as usual: 2 steps of 4 x 2 samples.
  CHECK((second.out + second.err).find("epoch 2/2 step 2/2") != std::string::npos);
}

TEST_CASE("a resumed run logs its first step, as a fresh run logs step 1, whatever log_every") {
  std::string dir = tempDir("resume_first_line");
  writeFile(dir + "/job.json", kJob);
  auto train = [&](const std::string& maxSteps) {
    auto r = run({dtrainBinary(), "train", dir + "/job.json", "--set", "train.log_every=100", "--set",
                  "train.max_steps=" + maxSteps, "--set", "checkpoint={}", "--output-dir", dir + "/out"},
                 {.timeout = 60s});
    INFO(r.out, r.err);
    REQUIRE(r.exitCode == 0);
    return r;
  };
  const auto fresh = train("3");
  CHECK(fresh.out.find("epoch 1/2 step 1/12 loss ") != std::string::npos);
  const auto resumed = train("20");
  REQUIRE(resumed.out.find("resumed from") != std::string::npos);
  // Step 4 is the resumed run's first: logged at once (it used to wait for step 12, the epoch's end, here).
  CHECK(resumed.out.find("epoch 1/2 step 4/12 loss ") != std::string::npos);
  CHECK(resumed.out.find("step 5/12") == std::string::npos);  // then log_every as before
  std::vector<int64_t> steps;
  for (const auto& line : readJsonLines(dir + "/out/metrics.jsonl"))
    if (line.contains("loss") && !line.contains("final") && !line.contains("eval_loss")) steps.push_back(line["step"]);
  CHECK(std::find(steps.begin(), steps.end(), 4) != steps.end());
}

TEST_CASE("metrics.jsonl has a line per log step and evaluation lines; max_steps stops early") {
  std::string dir = tempDir("metrics");
  writeFile(dir + "/job.json", kJob);
  auto r = run({dtrainBinary(), "train", dir + "/job.json", "--output-dir", dir + "/out"}, {.timeout = 60s});
  REQUIRE(r.exitCode == 0);
  auto lines = readJsonLines(dir + "/out/metrics.jsonl");
  int evals = 0, steps = 0, finals = 0;
  for (auto& j : lines) {
    for (auto key : {"step", "epoch", "loss", "lr", "samples_per_s"}) CHECK_MESSAGE(j.contains(key), key);
    if (j.value("final", false)) {
      ++finals;
      CHECK(j["peak_rss_mb"].get<double>() > 0);
    } else if (j.contains("eval_loss")) {
      ++evals;
      CHECK(j.contains("eval_accuracy"));
    } else {
      ++steps;
    }
  }
  CHECK(finals == 1);
  CHECK(lines.back().value("final", false));
  CHECK(evals == 2);         // one per epoch
  CHECK(steps == 2 * 12);    // 96 samples / batch 8 = 12 steps per epoch, log_every 1
  CHECK(r.out.find("eval: loss") != std::string::npos);
  auto capped = run({dtrainBinary(), "train", dir + "/job.json", "--set", "train.max_steps=5", "--output-dir", dir + "/cap"},
                    {.timeout = 60s});
  REQUIRE(capped.exitCode == 0);
  CHECK(capped.out.find("done: 5 steps") != std::string::npos);
}

TEST_CASE("linear regression (Linear(10,1), SGD, MSE) fits its synthetic data") {
  std::string dir = tempDir("linreg");
  auto r = run({dtrainBinary(), "train", sourceDir() + "/configs/linear_regression.json", "--output-dir", dir},
               {.timeout = 60s});
  INFO(r.out, r.err);
  REQUIRE(r.exitCode == 0);
  auto lines = readJsonLines(dir + "/metrics.jsonl");
  REQUIRE(!lines.empty());
  CHECK(lastEval(lines)["eval_loss"].get<double>() < 0.01);
  auto w = readTensorsF32(dir + "/model.safetensors");
  CHECK(w["0.weight"].size() == 10);
  CHECK(w["0.bias"].size() == 1);
}

TEST_CASE("init.from starts from a weights file; one for another model is an error naming the tensor") {
  std::string dir = tempDir("init");
  writeFile(dir + "/job.json", kJob);
  REQUIRE(run({dtrainBinary(), "train", dir + "/job.json", "--output-dir", dir + "/a"}, {.timeout = 60s}).exitCode == 0);
  std::string init = R"(init={"from": ")" + dir + R"(/a/model.safetensors"})";
  auto b = run({dtrainBinary(), "train", dir + "/job.json", "--set", init, "--set", "optimizer.lr=1e-30", "--set",
                "checkpoint=false", "--output-dir", dir + "/b"},
               {.timeout = 60s});
  INFO(b.err);
  REQUIRE(b.exitCode == 0);
  // lr 1e-30: every update rounds away, so the weights stay what was loaded
  auto wa = readTensorsF32(dir + "/a/model.safetensors");
  auto wb = readTensorsF32(dir + "/b/model.safetensors");
  CHECK(wa == wb);
  auto bad = run({dtrainBinary(), "train", dir + "/job.json", "--set", init, "--set", "model.layers.0.out=8",
                  "--output-dir", dir + "/c"},
                 {.timeout = 60s});
  CHECK(bad.exitCode == 8);
  CHECK(bad.err.find("0.weight") != std::string::npos);
  // Checked before any worker starts, by dtrain check and dtrain run: a truncated file, and another model's weights.
  // Every worker used to fail the same way after the rendezvous (and --max-restarts retried it); check said OK.
  const std::string cut = dir + "/cut.safetensors";
  writeFile(cut, readFile(dir + "/a/model.safetensors").substr(0, 60));
  for (const auto& [from, sets, message] : std::vector<std::array<std::string, 3>>{
           {cut, "", "/cut.safetensors: header length "},
           {dir + "/a/model.safetensors", "model.layers.0.out=8", "/a/model.safetensors: tensor '0.weight' has shape "}}) {
    CAPTURE(from);
    std::vector<std::string> setArgs = {"--set", R"(init={"from": ")" + from + R"("})"};
    if (!sets.empty()) setArgs.insert(setArgs.end(), {"--set", sets});
    std::vector<std::string> check = {dtrainBinary(), "check", dir + "/job.json"};
    check.insert(check.end(), setArgs.begin(), setArgs.end());
    auto checked = run(check, {.timeout = 60s});
    CHECK(checked.exitCode == 8);
    CHECK_MESSAGE(checked.err.find(dir + "/job.json: /init/from: " + dir + message) != std::string::npos, checked.err);
    std::vector<std::string> launch = {dtrainBinary(), "run", "--standalone", "-n", "2", "--max-restarts", "3",
                                       dir + "/job.json", "--output-dir", dir + "/d"};
    launch.insert(launch.end(), setArgs.begin(), setArgs.end());
    auto launched = run(launch, {.timeout = 60s});
    INFO(launched.out, launched.err);
    CHECK(launched.exitCode == 8);
    CHECK(launched.err.find(dir + "/job.json: /init/from: " + dir + message) != std::string::npos);
    CHECK(launched.out.find("[n0 r") == std::string::npos);  // no worker started
    CHECK(launched.err.find("restarting") == std::string::npos);
  }
}
