// Gradient compression as a user sees it: `dtrain run -n 2` with each type trains and records its traffic,
// a killed worker resumes bit for bit (the residuals and Q are in the checkpoint), bad settings exit 2.
#include <doctest/doctest.h>

#include <filesystem>

#include "tests/integration/launch_helpers.h"
#include "tests/integration/train_helpers.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;
using nlohmann::json;

namespace {

std::vector<std::string> twoRanks(const std::string& job, const std::string& out) {
  return runArgs({"--standalone", "--nproc-per-node", "2", "--max-restarts", "2", "--shutdown-timeout", "2s", job,
                  "--output-dir", out});
}

double lastEvalAccuracy(const std::string& metrics) {
  double acc = -1;
  for (const auto& line : readJsonLines(metrics))
    if (line.contains("eval_accuracy") && line["eval_accuracy"].is_number()) acc = line["eval_accuracy"].get<double>();
  return acc;
}

const char* kTypes[] = {R"({"type": "fp16"})", R"({"type": "bf16"})", R"({"type": "powersgd", "rank": 2})",
                        R"({"type": "topk", "ratio": 0.25})"};

}  // namespace

TEST_CASE("dtrain run -n 2 with each compression type: exit 0, accuracy near uncompressed, ratio in metrics") {
  std::string dir = tempDir("compress");
  json job = smallJob(192, 8, 3);
  job["checkpoint"] = false;
  writeFile(dir + "/plain.json", job.dump());
  auto plain = run(twoRanks(dir + "/plain.json", dir + "/plain"), {.timeout = 60s});
  REQUIRE_MESSAGE(plain.exitCode == 0, plain.err);
  const double plainAcc = lastEvalAccuracy(dir + "/plain/metrics.jsonl");
  REQUIRE(plainAcc > 0.5);
  for (const char* type : kTypes) {
    CAPTURE(type);
    job["parallel"]["compression"] = json::parse(type);
    writeFile(dir + "/job.json", job.dump());
    auto r = run(twoRanks(dir + "/job.json", dir + "/out"), {.timeout = 60s});
    INFO(r.out, r.err);
    REQUIRE(r.exitCode == 0);
    CHECK(r.out.find("gradient compression: " + job["parallel"]["compression"]["type"].get<std::string>()) !=
          std::string::npos);
    CHECK(lastEvalAccuracy(dir + "/out/metrics.jsonl") >= plainAcc - 0.1);
    // Every progress line of a two-rank run says what a step sent and how much less than float32 that was.
    int lines = 0;
    for (const auto& line : readJsonLines(dir + "/out/metrics.jsonl")) {
      if (!line.contains("loss") || line.contains("eval_loss") || line.contains("final")) continue;
      ++lines;
      REQUIRE(line.contains("comm_bytes_per_step"));
      CHECK(line["comm_bytes_per_step"].get<double>() > 0);
      CHECK(line["compression_ratio"].get<double>() > 1.2);
    }
    CHECK(lines > 0);
  }
  // Without compression the traffic is recorded too, at ratio 1.
  auto plainLines = readJsonLines(dir + "/plain/metrics.jsonl");
  REQUIRE(plainLines.front().contains("compression_ratio"));
  CHECK(plainLines.front()["compression_ratio"].get<double>() == 1.0);
}

TEST_CASE("SIGKILL of a worker with powersgd or topk (with and without momentum correction): the resumed job's weights are bit-identical") {
  // smallJob's optimizer is Adam; local_adam hands it to the hook from step 2, before the checkpoint at step 6 that
  // the killed run resumes from (so each rank's Adam moments come back from a checkpoint).
  for (const char* type : {R"({"type": "powersgd", "rank": 1})", R"({"type": "topk", "ratio": 0.1})",
                           R"({"type": "topk", "ratio": 0.1, "momentum_correction": true})",
                           R"({"type": "topk", "ratio": 0.1, "start_step": 2, "local_adam": true})"}) {
    CAPTURE(type);
    std::string dir = tempDir("compresskill");
    json job = smallJob();
    job["parallel"]["compression"] = json::parse(type);
    if (job["parallel"]["compression"].contains("momentum_correction"))
      job["optimizer"] = json::parse(R"({"type": "sgd", "lr": 0.05, "momentum": 0.9})");
    writeFile(dir + "/job.json", job.dump());
    auto clean = run(twoRanks(dir + "/job.json", dir + "/clean"), {.timeout = 60s});
    REQUIRE_MESSAGE(clean.exitCode == 0, clean.err);
    auto killed = run(twoRanks(dir + "/job.json", dir + "/killed"),
                      {.timeout = 60s, .env = {{"DTRAIN_FAULT", "rank=1,step=7,action=kill"}}});
    INFO(killed.out, killed.err);
    REQUIRE(killed.exitCode == 0);
    CHECK(killed.out.find("resumed from") != std::string::npos);
    CHECK(killed.out.find("state resumed") != std::string::npos);
    CHECK(std::filesystem::exists(dir + "/killed/checkpoints/step-000000012/comm_hook-rank-1.safetensors"));
    CHECK(readTensorsRaw(dir + "/clean/model.safetensors") == readTensorsRaw(dir + "/killed/model.safetensors"));
  }
}

TEST_CASE("a resume with other compression settings starts the hook fresh and says why") {
  // PowerSGD rank 1 -> rank 2 changes Q's shape (rank columns per matrix): that used to fail the resume with exit 8
  // ("tensor 'powersgd.q' has shape [22], expected [12]"). Another type starts fresh too, naming the saved one.
  std::string dir = tempDir("compressresume");
  json job = smallJob();
  job["train"]["max_steps"] = 6;
  job["parallel"]["compression"] = json::parse(R"({"type": "powersgd", "rank": 1})");
  writeFile(dir + "/job.json", job.dump());
  auto first = run(twoRanks(dir + "/job.json", dir + "/out"), {.timeout = 60s});
  REQUIRE_MESSAGE(first.exitCode == 0, first.err);
  REQUIRE(std::filesystem::exists(dir + "/out/checkpoints/step-000000006/comm_hook-rank-0.safetensors"));
  struct Case {
    const char* compression;
    int maxSteps;
    const char* message;
  };
  for (const Case& c :
       {Case{R"({"type": "powersgd", "rank": 2})", 9,
             "gradient compression: powersgd rank 2, fresh state (the checkpoint's powersgd.q has shape [22], this "
             "job's [12]: written with other settings)"},
        Case{R"({"type": "topk", "ratio": 0.5})", 12, "gradient compression: topk ratio 0.5, fresh state (the "
                                                      "checkpoint holds powersgd's)"},
        Case{R"({"type": "topk", "ratio": 0.25})", 15, "gradient compression: topk ratio 0.25, state resumed"}}) {
    CAPTURE(c.compression);
    job["train"]["max_steps"] = c.maxSteps;
    job["parallel"]["compression"] = json::parse(c.compression);
    writeFile(dir + "/job.json", job.dump());
    auto r = run(twoRanks(dir + "/job.json", dir + "/out"), {.timeout = 60s});
    INFO(r.out, r.err);
    CHECK(r.exitCode == 0);
    CHECK(r.out.find("resumed from") != std::string::npos);
    CHECK(r.out.find(c.message) != std::string::npos);
    CHECK(r.out.find("restarting") == std::string::npos);
  }
}

TEST_CASE("bad compression settings are rejected by run with exit 2 before any worker starts") {
  std::string dir = tempDir("compressbad");
  struct Case {
    const char* compression;
    const char* message;
  };
  for (const Case& c : {Case{R"({"type": "gzip"})", "/parallel/compression/type: unknown compression type 'gzip'"},
                        Case{R"({"type": "powersgd", "rank": 0})", "/parallel/compression/rank: expected an integer >= 1"},
                        Case{R"({"type": "powersgd", "rank": 7})", "/parallel/compression/rank: 7 is larger than the matrix"},
                        Case{R"({"type": "topk", "ratio": 2})", "/parallel/compression/ratio: expected a number in (0, 1]"},
                        Case{R"({"type": "topk", "local_adam": true, "momentum_correction": true})",
                             "/parallel/compression/local_adam: cannot be combined"}}) {
    CAPTURE(c.compression);
    json job = smallJob();
    job["parallel"]["compression"] = json::parse(c.compression);
    writeFile(dir + "/job.json", job.dump());
    auto r = run(twoRanks(dir + "/job.json", dir + "/out"), {.timeout = 30s});
    CHECK(r.exitCode == 2);
    CHECK(r.err.find(c.message) != std::string::npos);
    CHECK(r.out.find("[n0 r0]") == std::string::npos);  // no worker said anything: none started
  }
}

TEST_CASE("compression with one rank warns and trains without it") {
  std::string dir = tempDir("compressone");
  json job = smallJob();
  job["parallel"]["compression"] = json::parse(R"({"type": "powersgd", "rank": 1})");
  job["checkpoint"] = false;
  writeFile(dir + "/job.json", job.dump());
  auto r = run({dtrainBinary(), "train", dir + "/job.json", "--output-dir", dir + "/out"}, {.timeout = 60s});
  INFO(r.out, r.err);
  REQUIRE(r.exitCode == 0);
  CHECK(r.err.find("/parallel/compression: ignored with a world of 1 rank") != std::string::npos);
}

TEST_CASE("compression runs on the data-parallel dimension of pipeline and tensor layouts") {
  // 4 ranks: 2 replicas of (2 pipeline stages | 2 tensor shards). Each replica group's all-reduce goes through the
  // hook: the progress lines record a compressed ratio, and training still works.
  std::string dir = tempDir("compressmp");
  json job = smallJob(192, 8, 3);
  job["checkpoint"] = false;
  job["optimizer"] = json::parse(R"({"type": "sgd", "lr": 0.1, "momentum": 0.9})");
  for (const char* layout : {R"({"pipeline": {"stages": 2}})", R"({"tensor": 2})"}) {
    CAPTURE(layout);
    job["parallel"] = json::parse(layout);
    writeFile(dir + "/plain.json", job.dump());
    auto plain = run(runArgs({"--standalone", "--nproc-per-node", "4", dir + "/plain.json", "--output-dir",
                              dir + "/plain"}),
                     {.timeout = 90s});
    REQUIRE_MESSAGE(plain.exitCode == 0, plain.err);
    const double plainAcc = lastEvalAccuracy(dir + "/plain/metrics.jsonl");
    job["parallel"]["compression"] = json::parse(R"({"type": "topk", "ratio": 0.25, "momentum_correction": true})");
    writeFile(dir + "/job.json", job.dump());
    auto r = run(runArgs({"--standalone", "--nproc-per-node", "4", dir + "/job.json", "--output-dir", dir + "/out"}),
                 {.timeout = 90s});
    INFO(r.out, r.err);
    REQUIRE(r.exitCode == 0);
    CHECK(r.out.find("gradient compression: topk") != std::string::npos);
    CHECK(lastEvalAccuracy(dir + "/out/metrics.jsonl") >= plainAcc - 0.1);
    int lines = 0;
    for (const auto& line : readJsonLines(dir + "/out/metrics.jsonl")) {
      if (!line.contains("compression_ratio")) continue;
      ++lines;
      CHECK(line["compression_ratio"].get<double>() > 1.2);
    }
    CHECK(lines > 0);
    job["parallel"].erase("compression");
  }
}

TEST_CASE("compression with one replica of a model-parallel layout warns and trains exactly as without it") {
  // 2 pipeline stages and no data parallelism: no gradient is all-reduced. momentum_correction would move SGD's
  // momentum into a hook that never runs; the run must instead be the uncompressed one, bit for bit.
  std::string dir = tempDir("compressonerep");
  json job = smallJob(96, 8, 2);
  job["checkpoint"] = false;
  job["optimizer"] = json::parse(R"({"type": "sgd", "lr": 0.1, "momentum": 0.9})");
  job["parallel"] = json::parse(R"({"pipeline": {"stages": 2}})");
  writeFile(dir + "/plain.json", job.dump());
  job["parallel"]["compression"] = json::parse(R"({"type": "topk", "ratio": 0.1, "momentum_correction": true})");
  writeFile(dir + "/job.json", job.dump());
  auto plain = run(twoRanks(dir + "/plain.json", dir + "/plain"), {.timeout = 60s});
  REQUIRE_MESSAGE(plain.exitCode == 0, plain.err);
  auto r = run(twoRanks(dir + "/job.json", dir + "/out"), {.timeout = 60s});
  INFO(r.out, r.err);
  REQUIRE(r.exitCode == 0);
  CHECK(r.err.find("/parallel/compression: ignored with a data-parallel size of 1") != std::string::npos);
  CHECK(r.out.find("gradient compression:") == std::string::npos);
  CHECK(readFile(dir + "/out/model.safetensors") == readFile(dir + "/plain/model.safetensors"));
}

TEST_CASE("dtrain check prints the expected compression ratio") {
  std::string dir = tempDir("compresscheck");
  json job = smallJob();
  job["parallel"]["compression"] = json::parse(R"({"type": "fp16"})");
  writeFile(dir + "/job.json", job.dump());
  auto r = run({dtrainBinary(), "check", dir + "/job.json"}, {.timeout = 30s});
  INFO(r.out, r.err);
  REQUIRE(r.exitCode == 0);
  CHECK(r.out.find("compression: fp16: ") != std::string::npos);
  CHECK(r.out.find("(expected ratio 2.0x)") != std::string::npos);
}
