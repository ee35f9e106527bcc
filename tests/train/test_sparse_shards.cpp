// Sparse tables written and read by their holders (lib/train/sparse_shards.h): each server writes its own rows into
// the checkpoint's staging dir, the commit requires every server's file, and servers of another count read only the
// rows they hold from whichever files cover them (resharding without any process holding the whole table).
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <future>
#include <memory>
#include <vector>

#include "lib/ckpt/checkpoint.h"
#include "lib/common/error.h"
#include "lib/train/ps_client.h"
#include "lib/train/ps_server.h"
#include "lib/train/sparse_shards.h"
#include "lib/train/sparse_tables.h"

using namespace dtrain;
using namespace dtrain::train::ps;
namespace fs = std::filesystem;

namespace {

constexpr int64_t kRows = 50;
constexpr int kDim = 3;

SparseTableOptions tableOptions() {
  nn::OptimizerSpec job;
  job.type = nn::OptimizerType::kAdam;
  job.lr = 0.01;
  return {.rows = kRows, .dim = kDim, .optimizer = sparseOptimizerFor(job, false, "job.json"), .initStd = 1.0,
          .seed = 7, .name = "0.wte.weight"};
}

// `count` servers in this process for one async worker.
struct Servers {
  std::vector<std::unique_ptr<Server>> servers;
  std::vector<std::string> addrs;
  std::vector<std::future<void>> done;
  explicit Servers(int count) {
    for (int s = 0; s < count; ++s) {
      servers.push_back(std::make_unique<Server>(ServerOptions{.serverRank = s, .servers = count, .workers = 1,
                                                               .mode = Mode::kAsync,
                                                               .timeout = std::chrono::seconds(60),
                                                               .tables = {tableOptions()}}));
      addrs.push_back(servers.back()->listen());
    }
    for (auto& s : servers) done.push_back(std::async(std::launch::async, [p = s.get()] { p->serve(); }));
  }
  ~Servers() {
    for (auto& s : servers) s->stop();
    for (auto& d : done) d.wait();
  }
  std::unique_ptr<Client> client() const {
    return std::make_unique<Client>(ClientOptions{.workerRank = 0, .workers = 1, .numParams = 16,
                                                  .partitionFloats = 16, .servers = addrs,
                                                  .timeout = std::chrono::seconds(60)});
  }
};

fs::path freshDir(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / fmt::format("dtrain-{}-{}", name, ::getpid());
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// Three SparseAdam steps on a few rows of the table, through `tables`.
void train3(train::SparseTables& tables, Client* c) {
  const std::vector<std::vector<int64_t>> batches = {{0, 3, 17, 49}, {3, 8, 25}, {12, 26, 49}};  // sorted, distinct
  for (int step = 0; step < 3; ++step) {
    tables.beginStep(step, 0.01);
    const auto& ids = batches[static_cast<size_t>(step)];
    std::vector<float> g(ids.size() * kDim);
    for (size_t i = 0; i < g.size(); ++i) g[i] = 0.1f * static_cast<float>(i % 7) - 0.3f;
    tables.push(0, ids, g);
    if (c) c->wait();
  }
}

}  // namespace

TEST_CASE("shard file names follow Hugging Face's; checkpoint sparse files are recognised") {
  CHECK(train::sparseShardName(0, 2) == "sparse-00001-of-00002.safetensors");
  CHECK(train::modelShardName(1, 2) == "model-00002-of-00002.safetensors");
  CHECK(train::isSparseCheckpointFile("sparse-00002-of-00002.safetensors"));
  CHECK(train::isSparseCheckpointFile("sparse.safetensors"));
  CHECK(!train::isSparseCheckpointFile("model.safetensors"));
  CHECK(!train::isSparseCheckpointFile("sparse-1-of-2.safetensors"));
}

TEST_CASE("servers write their own rows into the checkpoint; 2 -> 3 and 2 -> 1 holders read them back exactly") {
  const fs::path root = freshDir("sparseshards");
  train::SparseTableState want;
  std::vector<std::string> files;
  {
    Servers two(2);
    auto c = two.client();
    train::PsSparseTables remote({tableOptions()}, *c, 2, 0);
    train3(remote, c.get());
    want = remote.readTable(0);
    ckpt::CheckpointWriter writer(root, 3, "tok");
    files = remote.saveShards(root, 3, "tok");
    CHECK(files == std::vector<std::string>{"sparse-00001-of-00002.safetensors", "sparse-00002-of-00002.safetensors"});
    writer.writeJson("rank-0.json", {{"rank", 0}});
    ckpt::CommitOptions options{.requiredFiles = files};
    options.requiredFiles.push_back("rank-0.json");
    writer.commit(ckpt::CheckpointMeta{.step = 3}, options);
    // A checkpoint one of whose servers' files is missing is never committed.
    ckpt::CheckpointWriter later(root, 4, "tok2");
    remote.saveShards(root, 4, "tok2");
    fs::remove(later.stagingDir() / files[1]);
    CHECK_THROWS_WITH_AS(later.commit(ckpt::CheckpointMeta{.step = 4}, ckpt::CommitOptions{.requiredFiles = files}),
                         doctest::Contains("sparse-00002-of-00002.safetensors"), CheckpointError);
    c->bye();
  }
  const fs::path cp = root / ckpt::checkpointDirName(3);
  // Server 1's file holds only its rows: a [25, 3] slice starting at row 25 of the [50, 3] table, with Adam's state.
  const auto second = ckpt::SafetensorsFile::open(cp / files[1]);
  REQUIRE(second.find("0.wte.weight") != nullptr);
  CHECK(second.find("0.wte.weight")->shape == Shape({25, 3}));
  CHECK(second.find("exp_avg_sq/0.wte.weight") != nullptr);
  CHECK(second.metadata().at("dtrain.slices").find("\"start\":25") != std::string::npos);
  CHECK(second.metadata().at("steps/0.wte.weight") == "3");
  // The checkpoint is complete (every server's file in the manifest, checksums verified).
  const auto latest = ckpt::findLatestValid(root);
  REQUIRE(latest.checkpoint);
  CHECK(latest.checkpoint->path == cp);
  const std::vector<fs::path> paths{cp / files[0], cp / files[1]};
  {
    Servers three(3);
    auto c = three.client();
    train::PsSparseTables remote({tableOptions()}, *c, 3, 3);
    remote.loadShards(paths, /*withState=*/true, 3);
    const train::SparseTableState got = remote.readTable(0);
    CHECK(got.steps == want.steps);
    CHECK(got.values == want.values);
    CHECK(got.state == want.state);
    // Files that do not cover a server's rows: an error naming the table, from the server that lacks them.
    try {
      remote.loadShards({paths[0]}, true, 3);
      FAIL("expected an error");
    } catch (const CommError& e) {
      CHECK(std::string(e.what()).find("0.wte.weight") != std::string::npos);
      CHECK(std::string(e.what()).find("cover") != std::string::npos);
    }
    c->bye();
  }
  train::LocalSparseTables local({tableOptions()});
  local.loadShards(paths, true, 3);
  const train::SparseTableState one = local.readTable(0);
  CHECK(one.values == want.values);
  CHECK(one.state == want.state);
  // Values only (init.from): the rows, a fresh optimizer.
  train::LocalSparseTables fresh({tableOptions()});
  fresh.loadShards(paths, false, 0);
  const train::SparseTableState f = fresh.readTable(0);
  CHECK(f.values == want.values);
  CHECK(f.steps == 0);
  CHECK(f.state == std::vector<std::vector<float>>(2, std::vector<float>(kRows * kDim, 0.0f)));
  fs::remove_all(root);
}

TEST_CASE("the exported model's index lists the dense tensors and each table's row shards in row order") {
  const std::vector<std::string> dense{"2.weight", "2.bias"};
  const std::vector<train::IndexedTable> tables{{"0.wte.weight", 5, 4}};
  const auto index = train::modelIndex(dense, tables, 3, 1234);
  CHECK(index["metadata"]["total_size"] == 1234);
  CHECK(index["weight_map"]["2.weight"] == "model.safetensors");
  const auto& files = index["row_shards"]["0.wte.weight"]["files"];
  REQUIRE(files.size() == 3);
  CHECK(files[0]["file"] == "model-00001-of-00003.safetensors");
  CHECK(files[1]["start"] == 2);
  CHECK(files[2]["rows"] == 1);
  const fs::path dir = freshDir("sparseindex");
  {
    std::ofstream(dir / train::kModelIndexFile) << index.dump();
  }
  const auto shards = train::sparseWeightFiles(dir / "model.safetensors");
  REQUIRE(shards.size() == 3);
  CHECK(shards[2] == dir / "model-00003-of-00003.safetensors");
  CHECK(train::sparseWeightFiles(dir / train::kModelIndexFile) == shards);
  CHECK(train::denseWeightsFile(dir / train::kModelIndexFile) == dir / "model.safetensors");
  CHECK(train::sparseWeightFiles(dir / "other.safetensors") == std::vector<fs::path>{dir / "other.safetensors"});
  fs::remove_all(dir);
}
