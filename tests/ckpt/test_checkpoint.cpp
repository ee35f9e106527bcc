#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <set>

#include "lib/ckpt/checkpoint.h"
#include "lib/common/error.h"
#include "tests/ckpt/ckpt_fixtures.h"

using namespace dtrain;
using namespace dtrain::ckpt;
using namespace dtrain::testing;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {
std::string messageOf(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const CheckpointError& e) {
    return e.what();
  }
  return "(no CheckpointError)";
}
}  // namespace

TEST_CASE("a two-rank checkpoint commits atomically and loads back by name") {
  const auto root = freshRoot("roundtrip");
  const auto path = writeCheckpoint(root, 200);
  CHECK(path == root / "step-000000200");
  CHECK(checkpointDirName(200) == "step-000000200");
  // Nothing but the committed dir is left, and inside it only the documented files.
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(root)) names.push_back(e.path().filename().string());
  CHECK(names == std::vector<std::string>{"step-000000200"});
  std::set<std::string> files;
  for (const auto& e : fs::directory_iterator(path)) files.insert(e.path().filename().string());
  CHECK(files == std::set<std::string>{"COMMITTED", "manifest.json", "meta.json", "model.safetensors", "rank-0.json",
                                       "rank-1.json"});

  auto latest = findLatestValid(root);
  REQUIRE(latest.checkpoint.has_value());
  CHECK(latest.skipped.empty());
  CHECK(latest.checkpoint->status == Status::kComplete);
  CHECK(latest.checkpoint->checksumsVerified);
  CHECK(latest.checkpoint->files.size() == 4);  // meta.json, model, rank-0, rank-1 (manifest and marker aside)

  auto ckpt = Checkpoint::open(latest.checkpoint->path);
  CHECK(ckpt.meta().step == 200);
  CHECK(ckpt.meta().epoch == 2);
  CHECK(ckpt.meta().samplesConsumed == 200 * 64 % 1000);
  CHECK(ckpt.meta().worldSize == 2);
  CHECK(ckpt.meta().formatVersion == kFormatVersion);
  CHECK(ckpt.meta().user == json{{"lr", 0.05}});
  CHECK(ckpt.meta().createdAt.size() == 20);  // 2026-11-25T04:29:48Z
  CHECK(ckpt.readJson("rank-1.json") == json{{"rng", 1200}});
  std::vector<float> w(3000);
  ckpt.loadTensor("model.safetensors", "0.weight", DType::kFloat32, {3, 1000}, std::as_writable_bytes(std::span(w)));
  CHECK(w == weightsOf(200));
  CHECK(messageOf([&] {
          ckpt.loadTensor("model.safetensors", "0.weight", DType::kFloat32, {1000, 3}, std::as_writable_bytes(std::span(w)));
        }).find("tensor '0.weight' has shape [3, 1000], expected [1000, 3]") != std::string::npos);
  CHECK(messageOf([&] { ckpt.readJson("rank-7.json"); }) == path.string() + ": checkpoint has no file 'rank-7.json'");
}

TEST_CASE("a staging dir without commit is never valid; the previous checkpoint is used") {
  const auto root = freshRoot("staging");
  writeCheckpoint(root, 100);
  CheckpointWriter crashed(root, 200, "deadbeef");
  std::vector<float> w = weightsOf(200);
  std::vector<NamedTensor> t = {{"0.weight", TensorView::of(w.data(), {3, 1000})}};
  crashed.writeTensors("model.safetensors", t);  // ... and the job died before commit
  auto list = listCheckpoints(root, true);
  REQUIRE(list.size() == 2);
  CHECK(list[0].step == 200);
  CHECK(list[0].status == Status::kStaging);
  CHECK(list[0].path.filename() == "step-000000200.tmp-deadbeef");
  CHECK(list[1].status == Status::kComplete);
  auto latest = findLatestValid(root);
  REQUIRE(latest.checkpoint.has_value());
  CHECK(latest.checkpoint->step == 100);
  CHECK(latest.skipped.empty());  // staging dirs are not reported as skipped checkpoints
}

TEST_CASE("a truncated newest checkpoint is skipped for the previous one, with the reason") {
  const auto root = freshRoot("truncate");
  writeCheckpoint(root, 100);
  const auto newest = writeCheckpoint(root, 200);
  const auto model = newest / "model.safetensors";
  const auto size = fs::file_size(model);
  fs::resize_file(model, size - 10);
  auto latest = findLatestValid(root);
  REQUIRE(latest.checkpoint.has_value());
  CHECK(latest.checkpoint->step == 100);
  REQUIRE(latest.skipped.size() == 1);
  CHECK(latest.skipped[0].step == 200);
  CHECK(latest.skipped[0].status == Status::kCorrupt);
  CHECK(latest.skipped[0].reason ==
        fmt::format("model.safetensors has {} bytes, the manifest says {} (truncated?)", size - 10, size));
  CHECK(messageOf([&] { Checkpoint::open(newest); }).find("not a complete checkpoint: model.safetensors has") !=
        std::string::npos);
}

TEST_CASE("a flipped byte in the newest checkpoint is caught by crc32") {
  const auto root = freshRoot("flip");
  writeCheckpoint(root, 100);
  const auto newest = writeCheckpoint(root, 200);
  flipByte(newest / "model.safetensors", 5000);
  // Sizes still match: only a checksum pass sees it.
  CHECK(inspectCheckpoint(newest, false).status == Status::kComplete);
  auto latest = findLatestValid(root);
  REQUIRE(latest.checkpoint.has_value());
  CHECK(latest.checkpoint->step == 100);
  REQUIRE(latest.skipped.size() == 1);
  CHECK(latest.skipped[0].reason.find("model.safetensors crc32 ") == 0);
  CHECK(latest.skipped[0].reason.find("does not match the manifest's") != std::string::npos);
}

TEST_CASE("a missing marker makes a checkpoint partial; a tampered manifest or meta makes it corrupt") {
  const auto root = freshRoot("marker");
  writeCheckpoint(root, 100);
  const auto a = writeCheckpoint(root, 200);
  const auto b = writeCheckpoint(root, 300);
  const auto c = writeCheckpoint(root, 400);
  fs::remove(c / "COMMITTED");
  flipByte(b / "manifest.json", 20);
  fs::remove(a / "meta.json");
  auto latest = findLatestValid(root);
  REQUIRE(latest.checkpoint.has_value());
  CHECK(latest.checkpoint->step == 100);
  REQUIRE(latest.skipped.size() == 3);
  CHECK(latest.skipped[0].status == Status::kPartial);
  CHECK(latest.skipped[0].reason == "no COMMITTED marker (the commit did not finish)");
  CHECK(latest.skipped[1].status == Status::kCorrupt);
  CHECK(latest.skipped[1].reason.find("manifest.json crc32") == 0);
  CHECK(latest.skipped[2].reason == "meta.json missing");
}

TEST_CASE("no checkpoints is a value, not an error") {
  auto latest = findLatestValid(freshRoot("none") / "never-created");
  CHECK_FALSE(latest.checkpoint.has_value());
  CHECK(latest.skipped.empty());
  CHECK(listCheckpoints(freshRoot("none2"), true).empty());
}

TEST_CASE("the model spec hash is canonical, and a mismatch refuses to load") {
  const json a = json::parse(R"({"input": [784], "layers": [{"type": "linear", "out": 10}]})");
  const json b = json::parse(R"({"layers":[{"out":10,"type":"linear"}],   "input":[784]})");
  const json c = json::parse(R"({"input": [784], "layers": [{"type": "linear", "out": 11}]})");
  CHECK(specHash(a) == specHash(b));
  CHECK(specHash(a) != specHash(c));
  CHECK(specHash(a).size() == 16);
  // Checkpoints store it, so its value never changes (FNV-1a 64 of the canonical dump, leading zero kept).
  CHECK(specHash(a) == "07feb5c73a6fe0de");
  const auto root = freshRoot("spec");
  const auto path = writeCheckpoint(root, 10, specHash(a));
  auto ckpt = Checkpoint::open(path);
  CHECK_NOTHROW(ckpt.checkSpecHash(specHash(b)));
  const std::string m = messageOf([&] { ckpt.checkSpecHash(specHash(c)); });
  CHECK(m.find("checkpoint was written for another model (spec hash " + specHash(a) + ", this job's model hashes to " +
               specHash(c) + ")") != std::string::npos);
  try {
    ckpt.checkSpecHash(specHash(c));
  } catch (const CheckpointError& e) {
    CHECK(e.exitCode() == 8);
  }
}

TEST_CASE("commit refuses missing files and files still being written; names are checked") {
  const auto root = freshRoot("commit");
  CheckpointWriter w(root, 5, "tok");
  w.writeJson("rank-0.json", {{"a", 1}});
  CHECK(messageOf([&] { w.commit({}, {.requiredFiles = {"rank-0.json", "rank-1.json"}}); })
            .find("missing checkpoint files: rank-1.json") != std::string::npos);
  writeFileDurably(w.stagingDir() / ".rank-1.json.tmp-999", "{");  // another rank mid-write
  CHECK(messageOf([&] { w.commit({}); }).find("files still being written: .rank-1.json.tmp-999") != std::string::npos);
  CHECK(messageOf([&] { w.writeJson("meta.json", {}); }) == "checkpoint file name 'meta.json' is reserved or invalid");
  CHECK(messageOf([&] { w.writeJson("../x.json", {}); }) == "checkpoint file name '../x.json' is reserved or invalid");
  CHECK(messageOf([&] { w.writeJson(".hidden", {}); }) == "checkpoint file name '.hidden' is reserved or invalid");
  w.abandon();
  CHECK_FALSE(fs::exists(w.stagingDir()));
}

TEST_CASE("committing a step again (after a rollback) replaces the old directory") {
  const auto root = freshRoot("replace");
  const auto first = writeCheckpoint(root, 100);
  fs::resize_file(first / "model.safetensors", 100);  // the old step 100 went bad, the job rolled back
  CHECK(findLatestValid(root).checkpoint.has_value() == false);
  writeCheckpoint(root, 100);
  auto latest = findLatestValid(root);
  REQUIRE(latest.checkpoint.has_value());
  CHECK(latest.checkpoint->step == 100);
  size_t entries = 0;
  for (const auto& e : fs::directory_iterator(root)) entries += e.is_directory() ? 1 : 0;
  CHECK(entries == 1);
}

TEST_CASE("meta.json round trip and validation") {
  CheckpointMeta m;
  m.step = 7;
  m.epoch = 1;
  m.samplesConsumed = 640;
  m.worldSize = 3;
  m.specHash = "abc";
  m.user = {{"x", {1, 2}}};
  auto back = metaFromJson(metaToJson(m), "meta.json");
  CHECK(back.step == 7);
  CHECK(back.samplesConsumed == 640);
  CHECK(back.worldSize == 3);
  CHECK(back.user == m.user);
  auto j = metaToJson(m);
  j["format_version"] = kFormatVersion + 1;
  CHECK(messageOf([&] { metaFromJson(j, "m.json"); }) ==
        fmt::format("m.json: checkpoint format version {} is newer than this dtrain's {} (upgrade dtrain)",
                    kFormatVersion + 1, kFormatVersion));
  j = metaToJson(m);
  j.erase("epoch");
  CHECK(messageOf([&] { metaFromJson(j, "m.json"); }) == "m.json: field 'epoch' missing (expected an integer)");
  CHECK(messageOf([&] { metaFromJson(json{{"step", 1}}, "m.json"); }) ==
        "m.json: not a dtrain checkpoint meta file (expected \"format\": \"dtrain-checkpoint\")");
}
