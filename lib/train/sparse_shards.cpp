#include "lib/train/sparse_shards.h"

#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <regex>

#include "lib/ckpt/safetensors.h"
#include "lib/common/error.h"

namespace dtrain::train {

namespace {

std::string stateName(const std::string& buffer, const std::string& table) { return buffer + "/" + table; }
std::string stepsKey(const std::string& table) { return "steps/" + table; }

}  // namespace

std::string sparseShardName(int holder, int holders) {
  return fmt::format("sparse-{:05d}-of-{:05d}.safetensors", holder + 1, holders);
}

std::string modelShardName(int holder, int holders) {
  return fmt::format("model-{:05d}-of-{:05d}.safetensors", holder + 1, holders);
}

bool isSparseCheckpointFile(const std::string& name) {
  static const std::regex shard(R"(sparse-\d{5,}-of-\d{5,}\.safetensors)");
  return name == "sparse.safetensors" || std::regex_match(name, shard);
}

ckpt::PieceFile heldPieces(std::span<const HeldTable> tables, int holder, int holders, bool withState) {
  std::vector<ckpt::PieceTensor> pieces;
  ckpt::Metadata meta{{"format", "pt"}, {"dtrain.holder", fmt::format("{} of {}", holder + 1, holders)}};
  for (const HeldTable& t : tables) {
    ps::SparseShard& s = *t.shard;
    const ps::RowRange& r = s.range();
    if (withState) meta[stepsKey(t.name)] = std::to_string(s.steps());
    if (r.rows() == 0) continue;  // fewer rows than holders: nothing of this table here
    const Shape full{t.rows, s.dim()}, held{r.rows(), s.dim()};
    const ckpt::Slice slice{.dim = 0, .start = r.begin, .length = r.rows()};
    pieces.push_back({t.name, TensorView::of(s.values().data(), held), full, slice});
    if (!withState) continue;
    for (const nn::StateBuffer& b : s.stateBuffers())
      pieces.push_back({stateName(b.name, t.name), TensorView::of(b.data.data(), held), full, slice});
  }
  return ckpt::piecesToWrite(pieces, meta);
}

void loadHeldRows(std::span<const std::filesystem::path> files, std::span<const HeldTable> tables, bool withState) {
  ckpt::TensorAssembler pieces;
  std::vector<ckpt::Metadata> metadata;
  for (const auto& f : files) {
    pieces.addFile(f);
    metadata.push_back(ckpt::SafetensorsFile::open(f).metadata());
  }
  const std::string where = files.empty() ? std::string("no files") : files.front().parent_path().string();
  for (const HeldTable& t : tables) {
    ps::SparseShard& s = *t.shard;
    const ps::RowRange& r = s.range();
    DTRAIN_CHECK_AS(CheckpointError, pieces.has(t.name), "{}: no file holds the sparse table '{}'", where, t.name);
    if (withState) {
      int64_t steps = -1;
      for (const auto& m : metadata)
        if (auto it = m.find(stepsKey(t.name)); it != m.end()) steps = std::max<int64_t>(steps, std::stoll(it->second));
      DTRAIN_CHECK_AS(CheckpointError, steps >= 0, "{}: no step count for the sparse table '{}'", where, t.name);
      s.setSteps(steps);
    } else {
      s.setSteps(0);
    }
    if (r.rows() == 0) continue;
    const Shape full{t.rows, s.dim()};
    const ckpt::Slice slice{.dim = 0, .start = r.begin, .length = r.rows()};
    pieces.load(t.name, full, slice, s.values());
    if (!withState) continue;
    for (const nn::StateBuffer& b : s.stateBuffers()) pieces.load(stateName(b.name, t.name), full, slice, b.data);
  }
}

nlohmann::json modelIndex(std::span<const std::string> dense, std::span<const IndexedTable> tables, int holders,
                          uint64_t totalBytes) {
  nlohmann::json weightMap = nlohmann::json::object(), rowShards = nlohmann::json::object();
  for (const auto& name : dense) weightMap[name] = "model.safetensors";
  for (const IndexedTable& t : tables) {
    nlohmann::json files = nlohmann::json::array();
    for (const ps::RowRange& r : ps::planRowRanges(t.rows, holders))
      if (r.rows() > 0)
        files.push_back({{"file", modelShardName(r.server, holders)}, {"start", r.begin}, {"rows", r.rows()}});
    rowShards[t.name] = {{"shape", {t.rows, t.dim}}, {"dim", 0}, {"files", files}};
  }
  return {{"metadata", {{"total_size", totalBytes}, {"format", "pt"}, {"producer", "dtrain"}}},
          {"weight_map", weightMap},
          {"row_shards", rowShards}};
}

std::vector<std::filesystem::path> indexShardFiles(const std::filesystem::path& indexPath) {
  std::ifstream in(indexPath);
  DTRAIN_CHECK_AS(CheckpointError, in.good(), "{}: cannot read", indexPath.string());
  nlohmann::json index;
  try {
    index = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    DTRAIN_THROW(CheckpointError, "{}: not JSON ({})", indexPath.string(), e.what());
  }
  std::vector<std::filesystem::path> out;
  auto add = [&](const std::string& file) {
    const auto p = indexPath.parent_path() / file;
    if (std::find(out.begin(), out.end(), p) == out.end()) out.push_back(p);
  };
  if (index.contains("row_shards") && index["row_shards"].is_object())
    for (const auto& [name, t] : index["row_shards"].items())
      for (const auto& f : t.value("files", nlohmann::json::array())) {
        DTRAIN_CHECK_AS(CheckpointError, f.is_object() && f.contains("file") && f["file"].is_string(),
                        "{}: /row_shards/{}: an entry without \"file\"", indexPath.string(), name);
        add(f["file"].get<std::string>());
      }
  return out;
}

namespace {

bool isIndex(const std::filesystem::path& p) {
  const std::string name = p.filename().string();
  return name.size() > 11 && name.compare(name.size() - 11, 11, ".index.json") == 0;
}

}  // namespace

std::filesystem::path denseWeightsFile(const std::filesystem::path& initFrom) {
  return isIndex(initFrom) ? initFrom.parent_path() / "model.safetensors" : initFrom;
}

std::vector<std::filesystem::path> sparseWeightFiles(const std::filesystem::path& initFrom) {
  if (isIndex(initFrom)) return indexShardFiles(initFrom);
  const auto beside = initFrom.parent_path() / kModelIndexFile;
  if (initFrom.filename() == "model.safetensors" && std::filesystem::exists(beside)) {
    auto files = indexShardFiles(beside);
    if (!files.empty()) return files;
  }
  return {initFrom};
}

}  // namespace dtrain::train
