// Sparse embeddings on the parameter servers as a user sees them (docs/parameter_server.md "Sparse embeddings"):
// a small variant of configs/recsys_ps.json trains through `dtrain run`, beats the popularity baseline's AUC, and
// the servers write their rows of the table into the checkpoints and beside model.safetensors (row shards listed in
// model.safetensors.index.json); a resume with another server count, and a restart after a server was killed,
// reproduce the table bit for bit; a checkpoint with a missing or damaged shard is skipped; worker 0's peak memory
// stays below the table's size through checkpoints and the export; "sparse" without the parameter-server strategy
// exits 2 before any rank starts.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

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
  // The table is not in the workers' arena (5000 x 8 on the server) nor in model.safetensors: the server wrote its
  // rows beside it (model-00001-of-00001.safetensors), listed in the index under torch's name.
  CHECK(r.out.find("577 parameters") != std::string::npos);
  CHECK(readTensorsF32(dir + "/out/model.safetensors").count("0.wte.weight") == 0);
  auto weights = readExportedModel(dir + "/out");
  REQUIRE(weights.count("0.wte.weight") == 1);
  CHECK(weights["0.wte.weight"].size() == 5000u * 8u);
  CHECK(weights.count("2.weight") == 1);
  bool sparseFile = false;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir + "/out/checkpoints"))
    sparseFile = sparseFile || e.path().filename() == "sparse-00001-of-00001.safetensors";
  CHECK(sparseFile);
  // init.from the exported model (the index's shards, read by 2 servers this time): a job that barely moves the
  // weights (lr 1e-9, one epoch of 2 steps) evaluates as the trained model did; a fresh model is near 0.5.
  json next = recsysJob("async", 2);
  next["init"] = {{"from", dir + "/out/model.safetensors"}};
  next["optimizer"]["lr"] = 1e-9;
  next["train"]["epochs"] = 1;
  next["data"]["train"]["samples"] = 256;
  next.erase("checkpoint");
  writeFile(dir + "/next.json", next.dump());
  auto n = run(ranks(4, dir + "/next.json", dir + "/next"), {.timeout = 240s});
  INFO(n.out, n.err);
  REQUIRE(n.exitCode == 0);
  CHECK(lastEval(dir + "/next/metrics.jsonl")["eval_auc"].get<double>() ==
        doctest::Approx(eval["eval_auc"].get<double>()).epsilon(0.01));
  // `dtrain ckpt inspect` reads the index: the table's row shards (2 servers wrote them this time) cover it.
  auto inspect = run({dtrainBinary(), "ckpt", "inspect", dir + "/next/model.safetensors.index.json"});
  INFO(inspect.out, inspect.err);
  CHECK(inspect.exitCode == 0);
  CHECK(inspect.out.find("status       complete") != std::string::npos);
  CHECK(inspect.out.find("model-00002-of-00002.safetensors      rows [2500, 5000)") != std::string::npos);
  std::filesystem::remove(dir + "/next/model-00002-of-00002.safetensors");
  inspect = run({dtrainBinary(), "ckpt", "inspect", dir + "/next/model.safetensors.index.json"});
  CHECK(inspect.out.find("incomplete: model-00002-of-00002.safetensors missing") != std::string::npos);
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
  // Each server wrote its own rows into the checkpoint; the commit required both files and meta.json names them.
  const std::string cp4 = dir + "/b/checkpoints/step-000000004";
  CHECK(std::filesystem::exists(cp4 + "/sparse-00001-of-00002.safetensors"));
  CHECK(std::filesystem::exists(cp4 + "/sparse-00002-of-00002.safetensors"));
  CHECK(readFile(cp4 + "/manifest.json").find("sparse-00002-of-00002.safetensors") != std::string::npos);
  CHECK(json::parse(readFile(cp4 + "/meta.json"))["user"]["sparse_shards"].size() == 2);
  auto wa = readExportedModel(dir + "/a"), wb = readExportedModel(dir + "/b");
  REQUIRE(wa.count("0.wte.weight") == 1);
  REQUIRE(wb.count("0.wte.weight") == 1);
  // Two workers' sums are exact in either order, and every update is elementwise: bit-identical.
  CHECK(wa["0.wte.weight"] == wb["0.wte.weight"]);
  CHECK(wa["2.weight"] == wb["2.weight"]);
  // The second part exported with 1 server: the first part's 2 shards are gone, the index names the one left.
  CHECK(std::filesystem::exists(dir + "/b/model-00001-of-00001.safetensors"));
  CHECK(!std::filesystem::exists(dir + "/b/model-00002-of-00002.safetensors"));

  // A server killed mid-job: the launcher restarts the group, which resumes from the last checkpoint's two shards
  // and ends with the uninterrupted run's table. Server 1 dies at its 13th push (step 7; checkpoint at step 4).
  auto k = run(runArgs({"--standalone", "--nproc-per-node", "4", "--max-restarts", "1", "--shutdown-timeout", "2s",
                        dir + "/job.json", "--output-dir", dir + "/k", "--set", "train.max_steps=8"}),
               {.timeout = 180s, .env = {{"DTRAIN_FAULT", "role=server,rank=1,step=13,action=kill"}}});
  INFO(k.out, k.err);
  REQUIRE(k.exitCode == 0);
  CHECK((k.out + k.err).find("parameter server 1 kills itself") != std::string::npos);
  CHECK(k.out.find("resumed from") != std::string::npos);
  CHECK(k.out.find("step-000000004") != std::string::npos);
  auto wk = readExportedModel(dir + "/k");
  CHECK(wk["0.wte.weight"] == wa["0.wte.weight"]);
  CHECK(wk["2.weight"] == wa["2.weight"]);
}

TEST_CASE("recsys on parameter servers: a checkpoint with a damaged or missing server shard is skipped") {
  std::string dir = tempDir("psrecsysshard");
  json job = recsysJob("sync", 2);
  job["checkpoint"] = {{"every_steps", 4}, {"keep", 3}};
  writeFile(dir + "/job.json", job.dump());
  auto a = run(ranks(4, dir + "/job.json", dir + "/out", {"--set", "train.max_steps=8"}), {.timeout = 120s});
  INFO(a.out, a.err);
  REQUIRE(a.exitCode == 0);
  const std::string cp = dir + "/out/checkpoints/";
  // One byte of server 1's rows at step 8 flipped: its crc32 no longer matches the manifest.
  {
    std::fstream f(cp + "step-000000008/sparse-00002-of-00002.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-5, std::ios::end);
    f.put('\x7f');
  }
  auto b = run(ranks(4, dir + "/job.json", dir + "/out", {"--set", "train.max_steps=10"}), {.timeout = 120s});
  INFO(b.out, b.err);
  REQUIRE(b.exitCode == 0);
  CHECK((b.out + b.err).find("sparse-00002-of-00002.safetensors crc32") != std::string::npos);
  CHECK(b.out.find("resumed from " + cp + "step-000000004") != std::string::npos);
  // Server 0's file of the newest checkpoint (step 10) lost: skipped as corrupt, the run resumes from step 8 (the
  // second run wrote it again, whole).
  std::filesystem::remove(cp + "step-000000010/sparse-00001-of-00002.safetensors");
  auto c = run(ranks(4, dir + "/job.json", dir + "/out", {"--set", "train.max_steps=12"}), {.timeout = 120s});
  INFO(c.out, c.err);
  REQUIRE(c.exitCode == 0);
  CHECK((c.out + c.err).find("sparse-00001-of-00002.safetensors missing") != std::string::npos);
  CHECK(c.out.find("resumed from " + cp + "step-000000008") != std::string::npos);
}

TEST_CASE("recsys on parameter servers: worker 0's peak memory stays below the table through checkpoints and export") {
  // A 2,000,000 x 16 table (122 MiB of float32; 366 MiB with SparseAdam's two moments) on 2 servers, 1 worker
  // that checkpoints twice and exports the model. The servers write their rows; the worker never holds them.
  std::string dir = tempDir("psrecsysrss");
  json job = recsysJob("sync", 2);
  job["model"]["layers"][0]["vocab_size"] = 2000000;
  job["model"]["layers"][0]["n_embd"] = 16;
  job["checkpoint"] = {{"every_steps", 3}, {"keep", 1}};
  job.erase("data");
  json data = {{"format", "synthetic"}, {"task", "recsys"}, {"users", 3000}, {"items", 2000}, {"factors", 8},
               {"seed", 3}, {"samples", 2000}, {"sample_seed", 1}};
  job["data"] = {{"train", data}, {"batch_size", 64}};
  writeFile(dir + "/job.json", job.dump());
  auto r = run(ranks(3, dir + "/job.json", dir + "/out", {"--set", "train.max_steps=6"}), {.timeout = 240s});
  INFO(r.out, r.err);
  REQUIRE(r.exitCode == 0);
  json final;
  for (const auto& line : readJsonLines(dir + "/out/metrics.jsonl"))
    if (line.contains("peak_rss_mb")) final = line;
  REQUIRE(final.contains("peak_rss_mb"));
  const double tableMiB = 2000000.0 * 16 * 4 / (1 << 20);
  const double peak = final["peak_rss_mb"].get<double>();  // VmHWM (getrusage's ru_maxrss) of the one worker
  MESSAGE("worker 0 peak RSS " << peak << " MiB; table " << tableMiB << " MiB (x3 with SparseAdam's state)");
  CHECK(peak < tableMiB);
  // Both checkpoints and the export happened, written by the servers.
  CHECK(std::filesystem::exists(dir + "/out/checkpoints/step-000000006/sparse-00002-of-00002.safetensors"));
  CHECK(std::filesystem::file_size(dir + "/out/checkpoints/step-000000006/sparse-00001-of-00002.safetensors") >
        static_cast<uintmax_t>(3 * 1000000ull * 16 * 4));
  CHECK(std::filesystem::exists(dir + "/out/model-00002-of-00002.safetensors"));
  CHECK(std::filesystem::exists(dir + "/out/model.safetensors.index.json"));
  CHECK(final["peak_rss_mb"].get<double>() > 0);
}

TEST_CASE("recsys on parameter servers: grad_accum 2 x batch 32 equals one batch of 64 (row gradients summed)") {
  std::string dir = tempDir("psrecsysaccum");
  json job = recsysJob("sync", 2);
  job.erase("checkpoint");
  // SGD: an update proportional to the gradient, so summation order shows as rounding (Adam's first step is
  // lr * sign(g): a row whose gradient cancels to rounding level could flip).
  job["optimizer"] = {{"type", "sgd"}, {"lr", 0.5}};
  writeFile(dir + "/job.json", job.dump());
  // 2 workers x 64 samples per step, 6 steps, as one micro-batch and as two of 32.
  auto one = run(ranks(4, dir + "/job.json", dir + "/one", {"--set", "train.max_steps=6"}), {.timeout = 120s});
  INFO(one.out, one.err);
  REQUIRE(one.exitCode == 0);
  auto two = run(ranks(4, dir + "/job.json", dir + "/two",
                       {"--set", "train.max_steps=6", "--set", "train.grad_accum=2", "--set", "data.batch_size=32"}),
                 {.timeout = 120s});
  INFO(two.out, two.err);
  REQUIRE(two.exitCode == 0);
  auto a = readExportedModel(dir + "/one"), b = readExportedModel(dir + "/two");
  for (const std::string name : {"0.wte.weight", "2.weight", "4.weight"}) {
    CAPTURE(name);
    REQUIRE(a[name].size() == b[name].size());
    float worst = 0;
    for (size_t i = 0; i < a[name].size(); ++i) worst = std::max(worst, std::abs(a[name][i] - b[name][i]));
    // The same sums in another order. A lost micro-batch would leave its rows' updates out: far above this.
    CHECK(worst < 1e-5f);
  }
  // 6 optimizer steps in both.
  CHECK(one.out.find("done: 6 steps") != std::string::npos);
  CHECK(two.out.find("done: 6 steps") != std::string::npos);
}

TEST_CASE("a language model with a sparse token table: dtrain generate reads the servers' row shards") {
  // A bigram model (token table on 2 servers + a linear head) learns "abcabc..."; generation needs the table from
  // the shards beside model.safetensors (a table it did not read would not continue the pattern).
  std::string dir = tempDir("pssparselm");
  std::string text;
  for (int i = 0; i < 3000; ++i) text += "abc";
  writeFile(dir + "/abc.txt", text);
  const json job = {
      {"model",
       {{"input", {8}},
        {"layers",
         {{{"type", "embedding"}, {"vocab_size", 256}, {"n_embd", 8}, {"position", false}, {"sparse", true},
           {"init_std", 0.1}},
          {{"type", "linear"}, {"out", 256}}}}}},
      {"loss", {{"type", "cross_entropy"}}},
      {"data", {{"train", {{"format", "text"}, {"path", dir + "/abc.txt"}, {"vocab", "byte"}}}, {"batch_size", 8}}},
      {"optimizer", {{"type", "adam"}, {"lr", 0.05}}},
      {"train", {{"epochs", 1}, {"max_steps", 40}}},
      {"parallel", {{"strategy", "parameter_server"}, {"servers", 2}}}};
  writeFile(dir + "/lm.json", job.dump());
  auto r = run(ranks(3, dir + "/lm.json", dir + "/run"), {.timeout = 120s});
  INFO(r.out, r.err);
  REQUIRE(r.exitCode == 0);
  REQUIRE(std::filesystem::exists(dir + "/run/model-00002-of-00002.safetensors"));
  auto g = run({dtrainBinary(), "generate", dir + "/run", "--prompt", "ab", "--tokens", "12", "--temperature", "0.1",
                "--seed", "1"});
  INFO(g.out, g.err);
  CHECK(g.exitCode == 0);
  CHECK(g.out.find("abcabcabc") != std::string::npos);
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

TEST_CASE("ids the embedding does not have: exit 2 naming the data and vocab_size, before training (it failed "
          "mid-training with exit 1)") {
  std::string dir = tempDir("psrecsysids");
  // The recommender's ids reach users + items - 1 = 4999: a table of 4000 rows is refused before any rank starts.
  json job = recsysJob("async", 2);
  job["model"]["layers"][0]["vocab_size"] = 4000;
  writeFile(dir + "/job.json", job.dump());
  auto r = run(ranks(3, dir + "/job.json", dir + "/out"), {.timeout = 60s});
  INFO(r.out, r.err);
  CHECK(r.exitCode == 2);
  CHECK(r.err.find("/data/train: the recsys ids reach 4999 (users 3000 + items 2000 - 1), but "
                   "/model/layers/0/vocab_size is 4000 (expected vocab_size >= users + items = 5000)") !=
        std::string::npos);
  CHECK(r.out.find("[n0 r") == std::string::npos);  // no rank started
  auto check = run({dtrainBinary(), "check", dir + "/job.json"});
  CHECK(check.exitCode == 2);
  CHECK(check.err.find("/model/layers/0/vocab_size is 4000") != std::string::npos);
  // A click log read from a file, with a negative id at row 301 (after the first step's samples): the workers
  // refuse it once they read it, exit 2, naming the sample and the feature.
  std::string csv = "user,item,click\n";
  for (int i = 0; i < 400; ++i) csv += fmt::format("{},{},{}\n", i == 300 ? -3 : i % 50, 50 + i % 40, i % 2);
  writeFile(dir + "/clicks.csv", csv);
  job = recsysJob("async", 2);
  job["model"]["layers"][0]["vocab_size"] = 100;
  job["data"] = {{"train", {{"format", "csv"}, {"path", "clicks.csv"}, {"label", "click"}}}, {"batch_size", 16}};
  writeFile(dir + "/job.json", job.dump());
  auto bad = run(ranks(3, dir + "/job.json", dir + "/out"), {.timeout = 60s});
  INFO(bad.out, bad.err);
  CHECK(bad.exitCode == 2);
  CHECK(bad.err.find("/data/train: sample 300 (of ") != std::string::npos);
  CHECK(bad.err.find("feature 0: -3 is not a token id of /model/layers/0 (an embedding: expected an integer in "
                     "[0, 100), its vocab_size)") != std::string::npos);
  CHECK(bad.out.find("epoch 1/2 step") == std::string::npos);  // no step was trained
}
