// `dtrain ckpt list|inspect` as a user runs them: output, JSON and exit codes.
#include <doctest/doctest.h>

#include <filesystem>

#include "lib/ckpt/checkpoint_names.h"
#include "tests/ckpt/ckpt_fixtures.h"

using namespace dtrain;
using namespace dtrain::testing;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {
RunResult dtrainCkpt(const std::vector<std::string>& args) {
  std::vector<std::string> argv = {dtrainBinary(), "ckpt"};
  argv.insert(argv.end(), args.begin(), args.end());
  return run(argv, {.timeout = std::chrono::seconds(30)});
}

// A checkpoint root with one checkpoint of each status: step 100 complete, step 200 corrupt (rank-1.json cut to 3
// bytes), step 300 staging (never committed).
struct MixedRoot {
  fs::path root, corrupt, staging;
};
MixedRoot writeMixedRoot(const std::string& tag) {
  MixedRoot m{.root = freshRoot(tag)};
  writeCheckpoint(m.root, 100);
  m.corrupt = writeCheckpoint(m.root, 200);
  fs::resize_file(m.corrupt / "rank-1.json", 3);
  ckpt::CheckpointWriter(m.root, 300, "abc").writeJson("rank-0.json", {});
  m.staging = m.root / ckpt::stagingDirName(300, "abc");
  return m;
}
}  // namespace

TEST_CASE("dtrain ckpt list shows every checkpoint newest first with its status") {
  const auto root = writeMixedRoot("cli-list").root;

  auto r = dtrainCkpt({"list", root.string()});
  CHECK(r.exitCode == 0);
  INFO(r.out);
  INFO(r.err);
  const auto header = r.out.find("STEP");
  const auto s300 = r.out.find("300");
  const auto s200 = r.out.find("200");
  const auto s100 = r.out.find("100");
  REQUIRE(header != std::string::npos);
  CHECK(header < s300);
  CHECK(s300 < s200);
  CHECK(s200 < s100);
  CHECK(r.out.find("staging: not committed (being written") != std::string::npos);
  CHECK(r.out.find("corrupt: rank-1.json has 3 bytes, the manifest says") != std::string::npos);
  CHECK(r.out.find("complete (verified)") != std::string::npos);

  auto j = dtrainCkpt({"list", root.string(), "--json", "--no-verify"});
  CHECK(j.exitCode == 0);
  auto list = json::parse(j.out);
  REQUIRE(list.size() == 3);
  CHECK(list[2]["status"] == "complete");
  CHECK(list[2]["meta"]["world_size"] == 2);
  CHECK(list[2]["checksums_verified"] == false);
}

TEST_CASE("dtrain ckpt inspect shows meta, files and tensors of the newest valid checkpoint") {
  const auto root = freshRoot("cli-inspect");
  writeCheckpoint(root, 100, "feedface");
  auto r = dtrainCkpt({"inspect", root.string()});
  CHECK(r.exitCode == 0);
  INFO(r.out);
  CHECK(r.out.find("step-000000100") != std::string::npos);
  CHECK(r.out.find("status       complete (verified)") != std::string::npos);
  CHECK(r.out.find("spec hash    feedface") != std::string::npos);
  CHECK(r.out.find("world size   2") != std::string::npos);
  CHECK(r.out.find("model.safetensors: 1 tensors, 3000 elements") != std::string::npos);
  CHECK(r.out.find("0.weight  F32   [3, 1000]") != std::string::npos);

  auto file = dtrainCkpt({"inspect", (root / "step-000000100" / "model.safetensors").string()});
  CHECK(file.exitCode == 0);
  CHECK(file.out.find("0.weight  F32   [3, 1000]") != std::string::npos);

  auto slash = dtrainCkpt({"inspect", (root / "step-000000100").string() + "/"});
  CHECK(slash.exitCode == 0);
  CHECK(slash.out == r.out);
  auto j = dtrainCkpt({"inspect", (root / "step-000000100").string(), "--json"});
  CHECK(j.exitCode == 0);
  auto info = json::parse(j.out);
  CHECK(info["meta"]["step"] == 100);
  CHECK(info["safetensors"]["model.safetensors"]["tensors"][0]["shape"] == json::array({3, 1000}));
}

TEST_CASE("dtrain ckpt: missing and empty directories") {
  auto missing = dtrainCkpt({"list", "/nonexistent/dtrain-ckpt"});
  CHECK(missing.exitCode == 3);
  CHECK(missing.err.find("/nonexistent/dtrain-ckpt: no such file or directory") != std::string::npos);
  const auto empty = fs::path(tempDir("cli-empty"));
  auto none = dtrainCkpt({"list", empty.string()});
  CHECK(none.exitCode == 0);
  CHECK(none.out == "no checkpoints in " + empty.string() + "\n");
  auto inspect = dtrainCkpt({"inspect", empty.string()});
  CHECK(inspect.exitCode == 8);
  CHECK(inspect.err.find("no checkpoints here") != std::string::npos);
}

TEST_CASE("dtrain ckpt list and inspect of a run's output folder read its checkpoints/; a file is not a folder") {
  const auto run = fs::path(tempDir("cli-run"));
  writeCheckpoint(run / "checkpoints", 100);
  // What --output-dir names (runs/NAME) holds the checkpoints in checkpoints/: "no checkpoints in runs/NAME" (exit 0)
  // used to answer as if the run had saved none.
  auto list = dtrainCkpt({"list", run.string()});
  INFO(list.out, list.err);
  CHECK(list.exitCode == 0);
  CHECK(list.out.find("       100       2 ") != std::string::npos);
  auto inspect = dtrainCkpt({"inspect", run.string()});
  CHECK(inspect.exitCode == 0);
  CHECK(inspect.out.find("checkpoint   " + (run / "checkpoints" / "step-000000100").string()) != std::string::npos);
  // A file is a usage error naming it (it was "no checkpoints in FILE", exit 0).
  auto file = dtrainCkpt({"list", (run / "checkpoints" / "step-000000100" / "meta.json").string()});
  CHECK(file.exitCode == 3);
  CHECK(file.err.find("meta.json: not a folder (expected a checkpoint folder") != std::string::npos);
}

TEST_CASE("dtrain ckpt bench: counts of 0 are usage errors that say what is expected") {
  for (const char* flag : {"--repeats", "--tensors"}) {
    auto r = dtrainCkpt({"bench", tempDir("cli-bench"), "--size", "64K", flag, "0"});
    CHECK(r.exitCode == 3);
    CHECK_MESSAGE(r.err.find(std::string(flag) + ": expected an integer >= 1, got 0") != std::string::npos, r.err);
  }
}

TEST_CASE("dtrain ckpt list and inspect count epochs from 1, as the trainer's progress does; JSON keeps meta.json's") {
  const auto root = freshRoot("cli-epoch");
  writeCheckpoint(root, 100);  // meta.json: "epoch": 1 (counted from 0: the trainer's "epoch 2/N")
  auto inspect = dtrainCkpt({"inspect", root.string()});
  INFO(inspect.out);
  CHECK(inspect.exitCode == 0);
  CHECK(inspect.out.find("epoch        2\n") != std::string::npos);
  CHECK(inspect.out.find("of epoch 2 consumed") != std::string::npos);
  auto list = dtrainCkpt({"list", root.string()});
  CHECK(list.out.find("       100       2 ") != std::string::npos);
  auto asJson = dtrainCkpt({"list", root.string(), "--json"});
  CHECK(json::parse(asJson.out).at(0).at("meta").at("epoch") == 1);

  // An epoch's end is stored as the next epoch's start (epoch 1 counted from 0, 0 samples): the last checkpoint of
  // a 1-epoch run read "epoch 2, 0 samples" (a 2-epoch run's, "epoch 3"). It is the end of epoch 1.
  writeCheckpoint(root, 125);  // meta.json: "epoch": 1, "samples_consumed": 0
  auto end = dtrainCkpt({"inspect", root.string()});
  INFO(end.out);
  CHECK(end.out.find("step         125\nepoch        1\nsamples      all of epoch 1 (saved at its end)\n") !=
        std::string::npos);
  auto endList = dtrainCkpt({"list", root.string()});
  INFO(endList.out);
  CHECK(endList.out.find("       125       1         all ") != std::string::npos);
  CHECK(endList.out.find("       100       2         400 ") != std::string::npos);
}

TEST_CASE("dtrain ckpt inspect of a corrupt or uncommitted checkpoint reports why and exits 8, so scripts can verify with it") {
  const auto [root, bad, staging] = writeMixedRoot("cli-inspect-corrupt");
  REQUIRE(fs::is_directory(staging));

  auto corrupt = dtrainCkpt({"inspect", bad.string()});
  INFO(corrupt.out, corrupt.err);
  CHECK(corrupt.exitCode == 8);
  CHECK(corrupt.out.find("corrupt: rank-1.json has 3 bytes, the manifest says") != std::string::npos);
  auto corruptJson = dtrainCkpt({"inspect", bad.string(), "--json"});
  CHECK(corruptJson.exitCode == 8);
  CHECK(json::parse(corruptJson.out)["status"] == "corrupt");
  CHECK(dtrainCkpt({"inspect", staging.string()}).exitCode == 8);
  // The root picks the newest valid checkpoint: step 100, complete.
  auto newest = dtrainCkpt({"inspect", root.string()});
  CHECK(newest.exitCode == 0);
  CHECK(newest.out.find("step-000000100") != std::string::npos);
  CHECK(dtrainCkpt({"inspect", (root / "step-000000100").string()}).exitCode == 0);
}

TEST_CASE("dtrain ckpt inspect writes each table's sizes in one unit, its total's (as ckpt list), labelled") {
  // A 1.1 MiB tensor beside a 12-byte one: the rows mixed "1.1 MiB", "11.7 KiB" and "12 B" under a total in MiB.
  const auto root = freshRoot("cli-units");
  const std::vector<float> big(300000, 1.0f), small(3, 2.0f);
  ckpt::CheckpointWriter writer(root, 7, ckpt::CheckpointWriter::newToken());
  std::vector<ckpt::NamedTensor> tensors = {{"0.weight", TensorView::of(big.data(), {1000, 300})},
                                            {"0.bias", TensorView::of(small.data(), {3})}};
  writer.writeTensors("model.safetensors", tensors);
  writer.writeJson("rank-0.json", {{"rng", 7}});
  ckpt::CheckpointMeta meta;
  meta.worldSize = 1;
  meta.specHash = "spec";
  const fs::path dir = writer.commit(meta, {.requiredFiles = {"model.safetensors", "rank-0.json"}});

  auto r = dtrainCkpt({"inspect", dir.string()});
  INFO(r.out, r.err);
  CHECK(r.exitCode == 0);
  auto list = dtrainCkpt({"list", root.string()});
  CHECK(list.out.find("    1.1 MiB  ") != std::string::npos);  // ckpt list's size of the checkpoint
  CHECK(r.out.find("\nfiles (1.1 MiB)\n") != std::string::npos);
  CHECK(r.out.find("  model.safetensors                1.1 MiB  crc32 ") != std::string::npos);
  CHECK(r.out.find("  rank-0.json                     <0.1 MiB  crc32 ") != std::string::npos);
  CHECK(r.out.find("  meta.json                       <0.1 MiB  crc32 ") != std::string::npos);
  CHECK(r.out.find("model.safetensors: 2 tensors, 300003 elements, 1.1 MiB\n") != std::string::npos);
  CHECK(r.out.find("  0.weight  F32   [1000, 300]            1.1 MiB\n") != std::string::npos);
  CHECK(r.out.find("  0.bias    F32   [3]                   <0.1 MiB\n") != std::string::npos);
  CHECK(r.out.find(" KiB") == std::string::npos);
  CHECK(r.out.find(" B  ") == std::string::npos);
  // A small checkpoint's table stays in its own total's unit.
  writeCheckpoint(root, 100);
  auto kib = dtrainCkpt({"inspect", (root / "step-000000100").string()});
  CHECK(kib.out.find("  0.weight  F32   [3, 1000]             11.7 KiB\n") != std::string::npos);
  CHECK(kib.out.find(" MiB") == std::string::npos);
}
