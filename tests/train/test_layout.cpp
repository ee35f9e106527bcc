// The rank grid (lib/train/layout.h), stage partitioning, the parallel section of a job file and its errors.
#include <doctest/doctest.h>

#include <string>

#include "lib/common/error.h"
#include "lib/nn/spec.h"
#include "lib/nn/tensor_parallel.h"
#include "lib/train/check.h"
#include "lib/train/job.h"
#include "lib/train/layout.h"
#include "tests/support/process.h"

using namespace dtrain;
using namespace dtrain::train;
using nlohmann::json;

namespace {

json mlpJob() {
  return json::parse(R"({
    "model": {"input": [4], "layers": [{"type": "linear", "out": 8}, {"type": "relu"}, {"type": "linear", "out": 8},
                                       {"type": "relu"}, {"type": "linear", "out": 3}]},
    "loss": {"type": "cross_entropy"},
    "data": {"train": {"format": "synthetic", "task": "classification", "samples": 64, "features": 4,
                       "num_classes": 3}, "batch_size": 8},
    "optimizer": {"type": "sgd", "lr": 0.1}
  })");
}

Job load(const json& doc) {
  auto dir = testing::tempDir("layout");
  testing::writeFile(dir + "/job.json", doc.dump());
  return loadJob({dir + "/job.json"});
}

std::string configErrorOf(const json& doc) {
  try {
    load(doc);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("layout: tensor fastest, then stage, then data; groups in coordinate order") {
  const LayoutDims d{.data = 2, .stages = 2, .tensor = 2};
  CHECK(d.world() == 8);
  const RankCoords c = coordsOf(d, 6);  // (1 * 2 + 1) * 2 + 0
  CHECK(c.data == 1);
  CHECK(c.stage == 1);
  CHECK(c.tensor == 0);
  for (int r = 0; r < 8; ++r) CHECK(rankOf(d, coordsOf(d, r)) == r);
  CHECK(tensorGroupRanks(d, 6) == std::vector<int>{6, 7});
  CHECK(pipelineGroupRanks(d, 6) == std::vector<int>{4, 6});
  CHECK(dataGroupRanks(d, 6) == std::vector<int>{2, 6});
}

TEST_CASE("layout: data defaults to world / (stages x tensor); a world that does not divide is an error") {
  ParallelSettings p;
  p.pipeline.stages = 2;
  CHECK(resolveLayout(p, 4, "job.json").data == 2);
  CHECK_THROWS_WITH_AS(resolveLayout(p, 3, "job.json"),
                       doctest::Contains("a world of 3 rank(s) is not divisible by pipeline stages 2 x tensor 1 = 2"),
                       ConfigError);
  p.data = 3;
  CHECK_THROWS_WITH_AS(resolveLayout(p, 4, "job.json"),
                       doctest::Contains("data 3 x pipeline stages 2 x tensor 1 = 6 ranks, but the world has 4"),
                       ConfigError);
}

TEST_CASE("elastic --nnodes MIN:MAX: the node counts whose world the grid or the servers cannot use, with why") {
  ParallelSettings p;
  p.pipeline.stages = 2;
  // 1 rank per node: odd node counts make odd worlds.
  auto bad = unusableNodeCounts(p, 1, 4, 1, 0, "job.json").unusable;
  REQUIRE(bad.size() == 2);
  CHECK(bad[0].first == 1);
  CHECK(bad[1].first == 3);
  CHECK(bad[0].second.find("job.json: /parallel: a world of 1 rank(s) is not divisible") == 0);
  CHECK(unusableNodeCounts(p, 1, 4, 2, 0, "job.json").unusable.empty());  // 2 ranks per node: every world is even
  // Parameter servers must leave a rank to train.
  ParallelSettings ps;
  bad = unusableNodeCounts(ps, 1, 3, 2, 2, "job.json").unusable;
  REQUIRE(bad.size() == 1);
  CHECK(bad[0].first == 1);
  CHECK(bad[0].second.find("2 server(s) leave no rank of a world of 2 to train") != std::string::npos);
  // An explicit data degree fits one world only.
  p.data = 2;
  bad = unusableNodeCounts(p, 1, 6, 1, 0, "job.json").unusable;
  CHECK(bad.size() == 5);
  for (const auto& b : bad) CHECK(b.first != 4);
  // The work is bounded whatever MAX says.
  const NodeCountCheck huge = unusableNodeCounts(ParallelSettings{}, 1, 1 << 30, 1, 0, "job.json");
  CHECK(huge.unusable.empty());
  CHECK(huge.checked == 4097);
}

TEST_CASE("stages: balanced by parameters, parameterless layers stay with the layer before; balance as given") {
  const Job job = load(mlpJob());
  // costs: 40+1, 1, 72+1, 1, 27+1
  auto two = partitionStages(job.model, 2, {});
  REQUIRE(two.size() == 2);
  CHECK(two[0].first == 0);
  CHECK(two[0].last == 2);
  CHECK(two[1].last == 5);
  CHECK(two[0].params + two[1].params == job.model.paramCount());
  auto given = partitionStages(job.model, 2, {1, 4});
  CHECK(given[0].numLayers() == 1);
  CHECK(given[1].numLayers() == 4);
  auto five = partitionStages(job.model, 5, {});
  for (const auto& s : five) CHECK(s.numLayers() == 1);
}

TEST_CASE("parallel section: parsed with defaults, bad values rejected naming the field") {
  json doc = mlpJob();
  doc["parallel"] = {{"pipeline", {{"stages", 2}, {"schedule", "gpipe"}}}};
  const Job job = load(doc);
  CHECK(job.parallel.pipeline.stages == 2);
  CHECK(job.parallel.pipeline.microBatches == 8);
  CHECK(job.parallel.pipeline.schedule == PipelineSettings::Schedule::kGpipe);
  CHECK(job.parallel.data == 0);
  CHECK(job.parallel.warnings.empty());

  doc["parallel"] = {{"pipeline", {{"stages", 6}}}};
  CHECK(configErrorOf(doc).ends_with("job.json: /parallel/pipeline/stages: 6 stages but the model has 5 layers (a stage "
                                     "holds at least one top-level layer)"));
  doc["parallel"] = {{"pipeline", {{"stages", 2}, {"balance", {2, 2}}}}};
  CHECK(configErrorOf(doc).find("/parallel/pipeline/balance: [2,2] gives 2 stage(s) holding 4 layers in all; expected "
                                "2 stage(s) holding the model's 5 layers") != std::string::npos);
  doc["parallel"] = {{"pipeline", {{"stages", 2}, {"schedule", "zigzag"}}}};
  CHECK(configErrorOf(doc).find("/parallel/pipeline/schedule") != std::string::npos);
  doc["parallel"] = {{"data", 0}};
  CHECK(configErrorOf(doc).find("/parallel/data") != std::string::npos);
  // A degree above the limit says the limit: "expected an integer >= 1, got 1000000" read as a contradiction.
  doc["parallel"] = {{"tensor", 1000000}};
  CHECK(configErrorOf(doc).ends_with("job.json: /parallel/tensor: expected an integer between 1 and 65536 (ranks per "
                                     "tensor-parallel group), got 1000000"));
  doc["parallel"] = {{"data", 70000}};
  CHECK(configErrorOf(doc).find("/parallel/data: expected an integer between 1 and 65536 (data-parallel replicas), "
                                "got 70000") != std::string::npos);
  doc["parallel"] = {{"pipeline", {{"stages", 100000}}}};
  CHECK(configErrorOf(doc).find("/parallel/pipeline/stages: expected an integer between 1 and 65536 (pipeline "
                                "stages), got 100000") != std::string::npos);
  doc["parallel"] = {{"pipeline", {{"stages", 2}, {"balance", {100000, 1}}}}};
  CHECK(configErrorOf(doc).find("/parallel/pipeline/balance: expected a list of layer counts, each between 1 and "
                                "65536, got [100000,1]") != std::string::npos);

  doc["parallel"] = {{"pipeline", {{"stages", 3}, {"micro_batches", 2}}}};
  const Job warned = load(doc);
  REQUIRE(warned.parallel.warnings.size() == 1);
  CHECK(warned.parallel.warnings[0].find("2 micro-batches for 3 stages") != std::string::npos);
}

TEST_CASE("describeLayout: each rank's coordinates, layers and parameter count") {
  json doc = mlpJob();
  doc["parallel"] = {{"pipeline", {{"stages", 2}, {"micro_batches", 4}}}};
  const Job job = load(doc);
  const std::string text = describeLayout(job, 4);
  CHECK(text.find("layout: 4 rank(s) = data 2 x pipeline 2 x tensor 1") != std::string::npos);
  CHECK(text.find("    3     1      1       0           99 ") != std::string::npos);
  CHECK(text.find("%  2..4 (3 layers: 2 linear .. 4 linear)") != std::string::npos);
  // Memory in a unit that suits it: 99 parameters and their gradients (plain SGD) are 792 B, not "0.0 MiB".
  CHECK(text.find("    3     1      1       0           99        792 B ") != std::string::npos);
  CHECK(text.find("0.0 MiB") == std::string::npos);
  CHECK_THROWS_AS(describeLayout(job, 3), ConfigError);
  // dtrain check's run line counts steps per data replica (2 ranks here), not per rank.
  const std::string summary = checkJob(job);
  CHECK(summary.find("batch 8 per data replica (pipeline 2 x tensor 1 = 2 ranks): 8 steps per epoch on 1 replica, "
                     "4 on 2, 2 on 4") != std::string::npos);
  CHECK(checkJob(load(mlpJob())).find("batch 8 per rank: 8 steps per epoch on 1 rank") != std::string::npos);
  // A parameter-server job shares the data over its workers: its servers' ranks take no batches, so the steps are
  // counted per worker ("on 2 ranks" read as 2 workers, half the steps of 1 server + 1 worker).
  json ps = mlpJob();
  ps["parallel"] = {{"strategy", "parameter_server"}, {"servers", 2}};
  const std::string psSummary = checkJob(load(ps));
  CHECK_MESSAGE(psSummary.find("run:   1 epoch(s), batch 8 per worker: 8 steps per epoch on 1 worker, 4 on 2, 2 on 4 "
                               "(workers: the ranks besides the 2 parameter server(s), which take no batches)\n") !=
                    std::string::npos,
                psSummary);
  CHECK(psSummary.find(" rank: ") == std::string::npos);
  // drop_last over 20 samples with batch 8: 1 or 2 ranks take a step, 3 and more none (6 or fewer samples each).
  json dropLast = mlpJob();
  dropLast["data"]["train"]["samples"] = 20;
  dropLast["data"]["drop_last"] = true;
  const std::string dropSummary = checkJob(load(dropLast));
  CHECK_MESSAGE(dropSummary.find("2 steps per epoch on 1 rank, 1 on 2, 0 on 4\nwarning: data.drop_last: from 3 ranks "
                                 "on, each one's share of the 20 training samples (6 or fewer) is smaller than one batch "
                                 "of 8: every epoch would take 0 steps, and dtrain train refuses such a world (exit 2)\n") !=
                    std::string::npos,
                dropSummary);
  dropLast["data"]["drop_last"] = false;
  CHECK(checkJob(load(dropLast)).find("warning: data.drop_last") == std::string::npos);  // the last batch is partial
  dropLast["data"]["drop_last"] = true;
  dropLast["data"]["train"]["samples"] = 5;
  CHECK(checkJob(load(dropLast)).find("warning: data.drop_last: the 5 training samples make no batch of 8 even on 1 "
                                      "rank: every epoch would take 0 steps") != std::string::npos);
  dropLast["data"]["train"]["samples"] = 64;  // 8 ranks of 8: every listed world takes steps
  CHECK(checkJob(load(dropLast)).find("warning: data.drop_last") == std::string::npos);
  // More micro-batches than samples: a batch of 8 becomes 8 micro-batches of 1, and the bubble is theirs.
  doc["parallel"] = {{"pipeline", {{"stages", 2}, {"micro_batches", 64}}}};
  const std::string capped = describeLayout(load(doc), 2);
  CHECK_MESSAGE(capped.find("pipeline: 2 stages, 8 micro-batches of about 1 samples, 1f1b schedule, bubble "
                            "(K-1)/(M+K-1) = 11.1%") != std::string::npos,
                capped);
}

TEST_CASE("describeLayout with tensor parallelism: each rank's slices plus the replicated parameters") {
  // 4 -> 16 -> relu -> 3: one column/row pair; tensor 2 holds half of each weight, half of the first bias and the
  // whole second bias: 32 + 8 + 24 + 3 = 67 of the model's 131.
  json doc = mlpJob();
  doc["model"]["layers"] = json::parse(R"([{"type": "linear", "out": 16}, {"type": "relu"},
                                           {"type": "linear", "out": 3}])");
  doc["parallel"] = {{"tensor", 2}};
  const Job job = load(doc);
  const std::string text = describeLayout(job, 2);
  CHECK(text.find("    1     0      0       1           67 ") != std::string::npos);
  CHECK(text.find("whole model: 131 parameters") != std::string::npos);
  CHECK(text.find("the largest rank holds 51.1% (1/(pipeline x tensor) = 50.0%)") != std::string::npos);
  doc["parallel"] = {{"tensor", 3}};
  CHECK(configErrorOf(doc).find("/parallel/tensor: 3 ranks cannot split the model: /model/layers/0/out: 16 is not "
                                "divisible by parallel.tensor 3") != std::string::npos);
  CHECK(job.parallel.warnings.empty());
  // A dropout between the linears: no pair, nothing splits, and the job says so.
  doc["model"]["layers"] = json::parse(R"([{"type": "linear", "out": 16}, {"type": "dropout", "p": 0.5},
                                           {"type": "linear", "out": 3}])");
  doc["parallel"] = {{"tensor", 2}};
  const Job whole = load(doc);
  REQUIRE(whole.parallel.warnings.size() == 1);
  CHECK(whole.parallel.warnings[0].find("/parallel/tensor: 2 ranks split no layer of this model") != std::string::npos);
}

TEST_CASE("stages under tensor parallelism keep a column/row pair in one stage; a balance that splits one warns") {
  const Job job = load(mlpJob());
  // costs 41, 1, 73, 1, 28: alone, the best cut is before layer 2, between the pair (0, 2).
  CHECK(partitionStages(job.model, 2, {})[1].first == 2);
  CHECK(nn::topLevelPairs(job.model) == std::vector<std::pair<int, int>>{{0, 2}});
  auto kept = partitionStages(job.model, 2, {}, "job.json", 2);
  REQUIRE(kept.size() == 2);
  CHECK(kept[0].last == 3);  // linear, relu, linear | relu, linear
  CHECK(stagesSplittingPairs(job.model, kept).empty());
  // Four stages cannot keep the pair whole (only two cuts avoid it): the plain balance, and a warning.
  auto four = partitionStages(job.model, 4, {}, "job.json", 2);
  CHECK(four.size() == 4);
  CHECK(stagesSplittingPairs(job.model, four) == std::vector<std::pair<int, int>>{{0, 2}});

  json doc = mlpJob();
  doc["parallel"] = {{"tensor", 2}, {"pipeline", {{"stages", 2}}}};
  CHECK(load(doc).parallel.warnings.empty());
  doc["parallel"] = {{"tensor", 2}, {"pipeline", {{"stages", 2}, {"balance", {2, 3}}}}};
  const Job split = load(doc);
  REQUIRE(split.parallel.warnings.size() == 1);
  CHECK(split.parallel.warnings[0].find("/parallel/pipeline/balance: the stage boundary between layers 0 and 2 "
                                        "splits a column/row linear pair: layer 0 stay(s) whole") != std::string::npos);
  doc["parallel"] = {{"tensor", 2}, {"pipeline", {{"stages", 4}, {"micro_batches", 8}}}};
  const Job many = load(doc);
  REQUIRE(many.parallel.warnings.size() == 1);
  CHECK(many.parallel.warnings[0].find("/parallel/pipeline/stages: the stage boundary between layers 0 and 2") !=
        std::string::npos);
  // dtrain check's parameter counts follow the pairs: with 2 stages x tensor 2 each rank holds half of each weight.
  doc["parallel"] = {{"tensor", 2}, {"pipeline", {{"stages", 2}}}};
  const std::string text = describeLayout(load(doc), 4);
  CHECK(text.find("%  0..2 (3 layers: 0 linear .. 2 linear)") != std::string::npos);
}
