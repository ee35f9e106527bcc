// "logging": {"tensorboard": true} end to end: a real 2-rank run writes event files that an independent reader
// (tests/integration/read_tfevents.py: its own CRC-32C, python3-protobuf with the public field numbers) accepts
// record by record, with the same losses as metrics.jsonl; a flipped byte is caught by the reader's CRC check.
// Skips with a message only when python3-protobuf is not installed (scripts/setup installs it).
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "tests/integration/launch_helpers.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;

namespace {

bool havePythonProtobuf() { return run({"/usr/bin/python3", "-c", "import google.protobuf"}).exitCode == 0; }

RunResult readEvents(const std::string& dir) {
  return run({"/usr/bin/python3", sourceDir() + "/tests/integration/read_tfevents.py", dir}, {.timeout = 120s});
}

}  // namespace

TEST_CASE("TensorBoard event files of a 2-rank run pass an independent reader and match metrics.jsonl") {
  if (!havePythonProtobuf()) {
    MESSAGE("python3-protobuf not installed (scripts/setup installs it): skipped");
    return;
  }
  std::string dir = tempDir("tensorboard");
  writeFile(dir + "/job.json", fmt::format(R"({{
    "name": "tb",
    "model": {{"input": [10], "layers": [{{"type": "linear", "out": 1}}]}},
    "loss": {{"type": "mse"}},
    "data": {{"train": {{"format": "synthetic", "task": "regression", "samples": 512, "features": 10, "outputs": 1,
                        "noise": 0.01, "seed": 7}},
             "eval": {{"format": "synthetic", "task": "regression", "samples": 128, "features": 10, "outputs": 1,
                       "seed": 7, "sample_seed": 1}},
             "batch_size": 16}},
    "optimizer": {{"type": "sgd", "lr": 0.01}},
    "train": {{"epochs": 2, "seed": 0, "log_every": 4}},
    "checkpoint": false,
    "logging": {{"tensorboard": true}},
    "output_dir": "{}/out"
  }})",
                                           dir));
  auto r = run(runArgs({"--standalone", "-n", "2", dir + "/job.json"}), {.timeout = 120s});
  REQUIRE_MESSAGE(r.exitCode == 0, r.err);

  auto read = readEvents(dir + "/out/tensorboard");
  REQUIRE_MESSAGE(read.exitCode == 0, read.err);
  auto events = nlohmann::json::parse(read.out);
  CHECK(events["files"] == 1);  // rank 0 writes; the other rank does not
  CHECK(events["file_versions"] == nlohmann::json::array({"brain.Event:2"}));
  auto& scalars = events["scalars"];
  for (const char* tag : {"train/loss", "train/learning_rate", "train/samples_per_second", "train/grad_norm",
                          "eval/loss"})
    CHECK_MESSAGE(scalars.contains(tag), tag);
  CHECK(scalars["eval/loss"].size() == 2);  // one evaluation per epoch

  // The same (step, loss) pairs as metrics.jsonl's progress lines, to float precision.
  std::vector<std::pair<int64_t, double>> jsonl;
  std::istringstream lines(readFile(dir + "/out/metrics.jsonl"));
  std::string line;
  while (std::getline(lines, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("loss") && !j.contains("eval_loss") && !j.contains("final")) jsonl.emplace_back(j["step"], j["loss"]);
  }
  const auto& tb = scalars["train/loss"];
  REQUIRE(tb.size() == jsonl.size());
  for (size_t i = 0; i < jsonl.size(); ++i) {
    CHECK(tb[i][0].get<int64_t>() == jsonl[i].first);
    CHECK(tb[i][1].get<double>() == doctest::Approx(jsonl[i].second).epsilon(1e-6));
  }
  for (const auto& g : scalars["train/grad_norm"]) CHECK(g[1].get<double>() > 0);

  // The reader really checks: one flipped payload byte in a copy is reported as a bad CRC.
  std::string bad = dir + "/corrupt";
  std::filesystem::create_directories(bad);
  auto file = std::filesystem::directory_iterator(dir + "/out/tensorboard")->path();
  std::string data = readFile(file.string());
  data[data.size() - 8] ^= 0x01;  // inside the last record's payload
  writeFile(bad + "/" + file.filename().string(), data);
  auto badRead = readEvents(bad);
  CHECK(badRead.exitCode == 1);
  CHECK(badRead.err.find("bad payload CRC") != std::string::npos);
}
