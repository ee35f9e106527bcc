#include <doctest/doctest.h>

#include <algorithm>
#include <filesystem>

#include "lib/ckpt/checkpoint.h"
#include "lib/common/error.h"
#include "tests/ckpt/ckpt_fixtures.h"

using namespace dtrain;
using namespace dtrain::ckpt;
using namespace dtrain::testing;
namespace fs = std::filesystem;

namespace {
std::vector<std::string> entries(const fs::path& root) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(root)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}
}  // namespace

TEST_CASE("retention keeps exactly the newest `keep` complete checkpoints") {
  const auto root = freshRoot("keep");
  for (int64_t step : {100, 200, 300, 400, 500}) writeCheckpoint(root, step);
  auto r = applyRetention(root, 3);
  CHECK(r.removed.size() == 2);
  CHECK(entries(root) == std::vector<std::string>{"step-000000300", "step-000000400", "step-000000500"});
  CHECK(applyRetention(root, 3).removed.empty());
  applyRetention(root, 1);
  CHECK(entries(root) == std::vector<std::string>{"step-000000500"});
  CHECK_THROWS_AS(applyRetention(root, 0), CheckpointError);
}

TEST_CASE("retention removes stale staging dirs and old broken checkpoints, keeps newer broken ones and strangers") {
  const auto root = freshRoot("stale");
  writeCheckpoint(root, 100);
  const auto broken = writeCheckpoint(root, 150);
  writeCheckpoint(root, 200);
  const auto newer = writeCheckpoint(root, 300);
  fs::remove(broken / "COMMITTED");
  fs::remove(newer / "COMMITTED");                    // a newer partial one: kept, the next commit replaces it
  CheckpointWriter(root, 250, "stale").writeJson("rank-0.json", {});  // a crashed writer's staging dir
  fs::create_directories(root / "notes");             // not ours: never touched
  writeFileDurably(root / "README.txt", "mine");
  fs::create_directories(root / "step-000000120.replaced-xyz");
  applyRetention(root, 2);
  CHECK(entries(root) == std::vector<std::string>{"README.txt", "notes", "step-000000100", "step-000000200",
                                                  "step-000000300"});
  // step-100 and step-200 are the two complete ones kept; step-300 is partial and newer.
  auto latest = findLatestValid(root);
  REQUIRE(latest.checkpoint.has_value());
  CHECK(latest.checkpoint->step == 200);
}
