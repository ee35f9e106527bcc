#include <doctest/doctest.h>

#include "lib/train/ddp.h"

using namespace dtrain;

TEST_CASE("buckets follow reverse layer order, never split a layer, and tile the gradient arena") {
  auto spec = nn::parseModelSpec(nlohmann::json::parse(R"({"input": [100], "layers": [
      {"type": "linear", "out": 50}, {"type": "relu"}, {"type": "linear", "out": 40}, {"type": "relu"},
      {"type": "linear", "out": 10}]})"),
                                 "t.json");
  auto model = nn::Model::build(spec, 4, 1);
  // layer 0: 100*50+50 = 5050, layer 2: 50*40+40 = 2040, layer 4: 40*10+10 = 410 floats
  auto buckets = train::planBuckets(model, /*first=*/500, /*others=*/6000);
  REQUIRE(buckets.size() == 3);
  CHECK(buckets[0].layers == std::vector<int>{4});
  CHECK(buckets[0].count == 410);
  CHECK(buckets[1].layers == std::vector<int>{2});  // 2040 + 5050 > 6000: layer 0 gets its own bucket
  CHECK(buckets[2].layers == std::vector<int>{0});
  size_t covered = 0;
  for (const auto& b : buckets) {
    CHECK(b.offset + b.count <= model.numParams());
    covered += b.count;
  }
  CHECK(covered == model.numParams());
  CHECK(buckets[2].offset == 0);
  CHECK(buckets[1].offset == 5050);
  CHECK(buckets[0].offset == 5050 + 2040);

  auto one = train::planBuckets(model, 1 << 20, 1 << 20);
  REQUIRE(one.size() == 1);
  CHECK(one[0].offset == 0);
  CHECK(one[0].count == model.numParams());
  CHECK(one[0].lowestLayer == 0);
}
