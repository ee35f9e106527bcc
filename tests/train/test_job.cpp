#include <doctest/doctest.h>

#include <filesystem>

#include "lib/common/error.h"
#include "lib/train/job.h"
#include "tests/support/process.h"

using namespace dtrain;
using namespace dtrain::train;
using nlohmann::json;

namespace {

const char* kJob = R"({
  "model": {"input": [4], "layers": [{"type": "linear", "out": 8}, {"type": "relu"}, {"type": "linear", "out": 3}]},
  "loss": {"type": "cross_entropy"},
  "data": {"train": {"format": "synthetic", "task": "classification", "samples": 64, "features": 4, "num_classes": 3},
           "batch_size": 8},
  "optimizer": {"type": "sgd", "lr": 0.1},
  "train": {"epochs": 2, "seed": 3}
})";

std::string writeJob(const std::string& dir, const std::string& text, const std::string& name = "job.json") {
  std::string path = dir + "/" + name;
  testing::writeFile(path, text);
  return path;
}

std::string configErrorOf(const JobArgs& args) {
  try {
    loadJob(args);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("a job loads with defaults: name from the file, output under runs/<name>") {
  auto dir = testing::tempDir("job");
  auto job = loadJob({writeJob(dir, kJob, "tiny.json")});
  CHECK(job.name == "tiny");
  CHECK(job.outputDir == std::filesystem::path("runs/tiny"));
  CHECK(job.checkpoint.dir == std::filesystem::path("runs/tiny/checkpoints"));
  CHECK(job.data.batchSize == 8);
  CHECK(job.loop.epochs == 2);
  CHECK(job.parallel.backend == "auto");
  CHECK(job.parallel.strategy == "ddp");
  CHECK(job.modelHash.size() == 16);
}

TEST_CASE("--set overrides any field, parsing JSON values, and creates missing objects") {
  json doc = json::parse(kJob);
  applySet(doc, "train.epochs=1", "job.json");
  applySet(doc, "optimizer.lr=0.5", "job.json");
  applySet(doc, "model.layers.0.out=16", "job.json");
  applySet(doc, "checkpoint.every_steps=10", "job.json");
  applySet(doc, "name=fast run", "job.json");
  CHECK(doc["train"]["epochs"] == 1);
  CHECK(doc["optimizer"]["lr"] == 0.5);
  CHECK(doc["model"]["layers"][0]["out"] == 16);
  CHECK(doc["checkpoint"]["every_steps"] == 10);
  CHECK(doc["name"] == "fast run");
  CHECK_THROWS_WITH_AS(applySet(doc, "train.epochs", "job.json"), doctest::Contains("expected PATH=VALUE"), ConfigError);
  CHECK_THROWS_WITH_AS(applySet(doc, "model.layers.7.out=1", "job.json"), doctest::Contains("array of 3"), ConfigError);
  CHECK_THROWS_WITH_AS(applySet(doc, "train.epochs.x=1", "job.json"), doctest::Contains("not an object"), ConfigError);
}

TEST_CASE("--set changes what loadJob validates") {
  auto dir = testing::tempDir("job");
  auto path = writeJob(dir, kJob);
  auto job = loadJob({path, {"train.epochs=5", "data.batch_size=4"}, "out"});
  CHECK(job.loop.epochs == 5);
  CHECK(job.data.batchSize == 4);
  CHECK(job.outputDir == std::filesystem::path("out"));
  CHECK(configErrorOf({path, {"train.epochs=0"}}).find("/train/epochs") != std::string::npos);
}

TEST_CASE("job errors name the file, the JSON path and what was expected") {
  auto dir = testing::tempDir("job");
  SUBCASE("missing file") {
    CHECK(configErrorOf({dir + "/nope.json"}).find("nope.json does not exist") != std::string::npos);
  }
  SUBCASE("not JSON") {
    auto msg = configErrorOf({writeJob(dir, "{ not json")});
    CHECK(msg.find("not valid JSON") != std::string::npos);
  }
  SUBCASE("unknown top-level field (a typo)") {
    json doc = json::parse(kJob);
    doc["optimiser"] = json::object();
    auto msg = configErrorOf({writeJob(dir, doc.dump())});
    CHECK(msg.find("job.json") != std::string::npos);
    CHECK(msg.find("optimiser") != std::string::npos);
  }
  SUBCASE("unknown layer type, with the layer's path") {
    json doc = json::parse(kJob);
    doc["model"]["layers"][1]["type"] = "relux";
    auto msg = configErrorOf({writeJob(dir, doc.dump())});
    CHECK(msg.find("/model/layers/1") != std::string::npos);
    CHECK(msg.find("relux") != std::string::npos);
  }
  SUBCASE("bad parallel backend") {
    json doc = json::parse(kJob);
    doc["parallel"] = {{"backend", "mpi"}};
    auto msg = configErrorOf({writeJob(dir, doc.dump())});
    CHECK(msg.find("/parallel/backend") != std::string::npos);
    CHECK(msg.find("mpi") != std::string::npos);
  }
  SUBCASE("a parallel strategy that does not exist yet") {
    for (const char* strategy : {"pipeline", "parameter_server"}) {
      json doc = json::parse(kJob);
      doc["parallel"] = {{"strategy", strategy}};
      auto msg = configErrorOf({writeJob(dir, doc.dump())});
      CHECK(msg.find("job.json") != std::string::npos);
      CHECK(msg.find("/parallel/strategy") != std::string::npos);
      CHECK(msg.find(strategy) != std::string::npos);
      CHECK(msg.find("expected ddp") != std::string::npos);
    }
  }
  SUBCASE("missing model file") {
    json doc = json::parse(kJob);
    doc["model"] = "models/none.json";
    auto msg = configErrorOf({writeJob(dir, doc.dump())});
    CHECK(msg.find("model file") != std::string::npos);
    CHECK(msg.find("models/none.json") != std::string::npos);
  }
}

TEST_CASE("the model may live in its own file, resolved against the job's folder") {
  auto dir = testing::tempDir("job");
  std::filesystem::create_directories(dir + "/models");
  json doc = json::parse(kJob);
  testing::writeFile(dir + "/models/mlp.json", doc["model"].dump());
  doc["model"] = "models/mlp.json";
  auto job = loadJob({writeJob(dir, doc.dump())});
  CHECK(job.model.layers.size() == 3);
  auto inline_ = loadJob({writeJob(dir, kJob, "inline.json")});
  CHECK(job.modelHash == inline_.modelHash);
}
