// Sparse embeddings on the parameter servers as a user sees them (docs/parameter_server.md "Sparse embeddings"):
// a small variant of configs/recsys_ps.json trains through `dtrain run`, beats the popularity baseline's AUC, and
// writes the table (fetched from the servers) into model.safetensors and its checkpoints; a resume with another
// server count reproduces the table; "sparse" without the parameter-server strategy exits 2 before any rank
// starts.
#include <doctest/doctest.h>

#include <filesystem>

#include "tests/integration/launch_helpers.h"
#include "tests/integration/train_helpers.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;
using nlohmann::json;

namespace {

// configs/recsys_ps.json, shrunk: 3000 + 2000 rows, 20000 clicks.
json recsysJob(const std::string& mode, int servers) {
  json data = {{"format", "synthetic"}, {"task", "recsys"}, {"users", 3000}, {"items", 2000}, {"factors", 8},
               {"seed", 3}};
  json train = data, eval = data;
  train["samples"] = 20000;
  train["sample_seed"] = 1;
  eval["samples"] = 4000;
  eval["sample_seed"] = 2;
  return {{"model",
           {{"input", {2}},
            {"layers",
             {{{"type", "embedding"}, {"vocab_size", 5000}, {"n_embd", 8}, {"position", false}, {"sparse", true},
               {"init_std", 0.1}},
              {{"type", "flatten"}},
              {{"type", "linear"}, {"out", 32}},
              {{"type", "relu"}},
              {{"type", "linear"}, {"out", 1}}}}}},
          {"loss", {{"type", "bce_with_logits"}}},
          {"data", {{"train", train}, {"eval", eval}, {"batch_size", 64}, {"shuffle", true}}},
          {"optimizer", {{"type", "adam"}, {"lr", 0.01}}},
          {"train", {{"epochs", 2}, {"seed", 1}}},
          {"parallel", {{"strategy", "parameter_server"}, {"servers", servers}, {"mode", mode}}},
          {"checkpoint", {{"every_steps", 100}, {"keep", 2}}}};
}

std::vector<std::string> ranks(int n, const std::string& job, const std::string& out,
                               std::vector<std::string> extra = {}) {
  std::vector<std::string> args{"--standalone", "--nproc-per-node", std::to_string(n), "--shutdown-timeout", "2s", job,
                                "--output-dir", out};
  args.insert(args.end(), extra.begin(), extra.end());
  return runArgs(args);
}

json lastEval(const std::string& metrics) {
  json last;
  for (const auto& line : readJsonLines(metrics))
    if (line.contains("eval_auc")) last = line;
  return last;
}

}  // namespace

TEST_CASE("recsys on parameter servers: sparse tables train, beat the popularity baseline, and are exported") {
  std::string dir = tempDir("psrecsys");
  writeFile(dir + "/job.json", recsysJob("async", 1).dump());
  auto r = run(ranks(3, dir + "/job.json", dir + "/out"), {.timeout = 240s});
  INFO(r.out, r.err);
  REQUIRE(r.exitCode == 0);
  CHECK(r.out.find("popularity baseline") != std::string::npos);
  const json eval = lastEval(dir + "/out/metrics.jsonl");
  REQUIRE(eval.contains("baseline_auc"));
  CHECK(eval["eval_auc"].get<double>() > eval["baseline_auc"].get<double>() + 0.05);
  // The table is not in the workers' arena (5000 x 8 on the server), but model.safetensors holds it, torch's name.
  CHECK(r.out.find("577 parameters") != std::string::npos);
  auto weights = readTensorsF32(dir + "/out/model.safetensors");
  REQUIRE(weights.count("0.wte.weight") == 1);
  CHECK(weights["0.wte.weight"].size() == 5000u * 8u);
  bool sparseFile = false;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir + "/out/checkpoints"))
    sparseFile = sparseFile || e.path().filename() == "sparse.safetensors";
  CHECK(sparseFile);
}

TEST_CASE("recsys on parameter servers: a resume with another server count reproduces the table") {
  std::string dir = tempDir("psrecsysresume");
  json job = recsysJob("sync", 2);
  job["checkpoint"]["every_steps"] = 4;
  writeFile(dir + "/job.json", job.dump());
  // Straight through: 8 steps, 2 workers and 2 servers.
  auto a = run(ranks(4, dir + "/job.json", dir + "/a", {"--set", "train.max_steps=8"}), {.timeout = 120s});
  INFO(a.out, a.err);
  REQUIRE(a.exitCode == 0);
  // In two parts: 4 steps with 2 servers, then resumed with 1 server up to step 8.
  auto b1 = run(ranks(4, dir + "/job.json", dir + "/b", {"--set", "train.max_steps=4"}), {.timeout = 120s});
  INFO(b1.out, b1.err);
  REQUIRE(b1.exitCode == 0);
  auto b2 = run(ranks(3, dir + "/job.json", dir + "/b", {"--set", "train.max_steps=8", "--set", "parallel.servers=1"}),
                {.timeout = 120s});
  INFO(b2.out, b2.err);
  REQUIRE(b2.exitCode == 0);
  CHECK(b2.out.find("resumed from") != std::string::npos);
  auto wa = readTensorsF32(dir + "/a/model.safetensors"), wb = readTensorsF32(dir + "/b/model.safetensors");
  REQUIRE(wa.count("0.wte.weight") == 1);
  REQUIRE(wb.count("0.wte.weight") == 1);
  // Two workers' sums are exact in either order, and every update is elementwise: bit-identical.
  CHECK(wa["0.wte.weight"] == wb["0.wte.weight"]);
  CHECK(wa["2.weight"] == wb["2.weight"]);
}

TEST_CASE("sparse embedding without the parameter-server strategy: exit 2 naming the layer, before any rank") {
  std::string dir = tempDir("psrecsysbad");
  json job = recsysJob("sync", 1);
  job.erase("parallel");
  writeFile(dir + "/job.json", job.dump());
  auto r = run(ranks(2, dir + "/job.json", dir + "/out"), {.timeout = 60s});
  INFO(r.out, r.err);
  CHECK(r.exitCode == 2);
  CHECK(r.err.find("/model/layers/0/sparse") != std::string::npos);
  CHECK(r.err.find("parameter_server") != std::string::npos);
  CHECK(!std::filesystem::exists(dir + "/out/metrics.jsonl"));
  // The shipped recommender is valid; its million-row table is on the servers, not in the workers' parameters.
  auto shipped = run({dtrainBinary(), "check", sourceDir() + "/configs/recsys_ps.json"}, {.timeout = 60s});
  INFO(shipped.out, shipped.err);
  CHECK(shipped.exitCode == 0);
  CHECK(shipped.out.find("total parameters: 2177") != std::string::npos);
  CHECK(shipped.out.find("sparse tables: 16000000 parameters") != std::string::npos);
  // An optimizer torch cannot apply to sparse gradients: the same, naming /optimizer.
  job = recsysJob("sync", 1);
  job["optimizer"] = {{"type", "sgd"}, {"lr", 0.1}, {"momentum", 0.9}};
  writeFile(dir + "/job.json", job.dump());
  auto check = run({dtrainBinary(), "check", dir + "/job.json"});
  CHECK(check.exitCode == 2);
  CHECK(check.err.find("/optimizer") != std::string::npos);
  CHECK(check.err.find("momentum") != std::string::npos);
}
