#include "lib/ckpt/report.h"

#include <fmt/format.h>

#include <algorithm>

#include "lib/ckpt/checkpoint_names.h"
#include "lib/common/error.h"
#include "lib/common/parse.h"

namespace dtrain::ckpt {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string statusText(const CheckpointInfo& c) {
  std::string s = statusName(c.status);
  if (c.status == Status::kComplete && c.checksumsVerified) s += " (verified)";
  if (!c.reason.empty()) s += ": " + c.reason;
  return s;
}

json fileToJson(const FileRecord& r) { return {{"name", r.name}, {"size", r.size}, {"crc32", crcHex(r.crc32)}}; }

json infoToJson(const CheckpointInfo& c) {
  json j = {{"path", c.path.string()},  {"step", c.step},   {"status", statusName(c.status)},
            {"reason", c.reason},       {"bytes", c.bytes}, {"checksums_verified", c.checksumsVerified}};
  if (c.meta) j["meta"] = metaToJson(*c.meta);
  json files = json::array();
  for (const auto& f : c.files) files.push_back(fileToJson(f));
  j["files"] = files;
  return j;
}

// What inspect looks at: a step dir, or the best one under a root.
fs::path resolve(const fs::path& given) {
  const fs::path target = given.has_filename() ? given : given.parent_path();
  DTRAIN_CHECK_AS(CheckpointError, fs::exists(target), "{}: no such file or directory", target.string());
  if (parseDirName(target.filename().string())) return target;
  auto latest = findLatestValid(target);
  if (latest.checkpoint) return latest.checkpoint->path;
  auto all = listCheckpoints(target, false);
  DTRAIN_CHECK_AS(CheckpointError, !all.empty(), "{}: no checkpoints here (expected step-<N> directories)",
                  target.string());
  return all.front().path;
}

// One unit per table, the one parse::formatBytes (and so `ckpt list`'s SIZE) gives the table's total: rows in
// KiB beside rows in MiB read at a glance as the smaller ones being larger. Below 0.1 of the unit: "<0.1 MiB".
struct ByteUnit {
  uint64_t size = 1;
  const char* name = "B";
};

ByteUnit unitOf(uint64_t total) {
  if (total >= (1ull << 30)) return {1ull << 30, "GiB"};
  if (total >= (1ull << 20)) return {1ull << 20, "MiB"};
  if (total >= (1ull << 10)) return {1ull << 10, "KiB"};
  return {};
}

std::string bytesIn(uint64_t bytes, ByteUnit unit) {
  if (unit.size == 1) return fmt::format("{} B", bytes);
  const double value = static_cast<double>(bytes) / static_cast<double>(unit.size);
  if (bytes > 0 && value < 0.05) return fmt::format("<0.1 {}", unit.name);
  return fmt::format("{:.1f} {}", value, unit.name);
}

bool isSafetensors(const fs::path& p) { return fs::is_regular_file(p) && p.extension() == ".safetensors"; }

void appendTensors(std::string& out, const SafetensorsFile& f, const std::string& title) {
  uint64_t params = 0;
  size_t width = 4;
  for (const auto& t : f.tensors()) {
    uint64_t n = 1;
    for (auto d : t.shape) n *= static_cast<uint64_t>(d);
    params += n;
    width = std::max(width, t.name.size());
  }
  out += fmt::format("\n{}: {} tensors, {} elements, {}\n", title, f.tensors().size(), params,
                     parse::formatBytes(f.fileSize()));
  const ByteUnit unit = unitOf(f.fileSize());
  for (const auto& t : f.tensors())
    out += fmt::format("  {:<{}}  {:<4}  {:<18}  {:>10}\n", t.name, width, safetensorsName(t.dtype), t.shape.spaced(),
                       bytesIn(t.bytes(), unit));
  for (const auto& [k, v] : f.metadata()) out += fmt::format("  metadata {} = {}\n", k, v);
}

json tensorsToJson(const SafetensorsFile& f) {
  json tensors = json::array();
  for (const auto& t : f.tensors())
    tensors.push_back(
        {{"name", t.name}, {"dtype", safetensorsName(t.dtype)}, {"shape", t.shape.toVector()}, {"bytes", t.bytes()}});
  return {{"tensors", tensors}, {"metadata", f.metadata()}};
}

// A sharded model's index (model.safetensors.index.json, Hugging Face's name): "weight_map" (tensor -> file) and
// dtrain's "row_shards" (a table split by rows: its full shape and each file's first row and row count).
bool isIndex(const fs::path& p) {
  const std::string name = p.filename().string();
  return fs::is_regular_file(p) && name.size() > 11 && name.compare(name.size() - 11, 11, ".index.json") == 0;
}

json readIndex(const fs::path& p) {
  try {
    json j = json::parse(readWholeFile(p));
    DTRAIN_CHECK_AS(CheckpointError, j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(),
                    "{}: not a model index (expected an object with \"weight_map\")", p.string());
    return j;
  } catch (const json::exception& e) {
    DTRAIN_THROW(CheckpointError, "{}: not JSON ({})", p.string(), e.what());
  }
}

// The index's files in order of first mention, and what is wrong with its row shards ("" when they cover every
// table once, in row order, and every file exists).
std::vector<std::string> indexFiles(const json& index) {
  std::vector<std::string> files;
  auto add = [&](const std::string& f) {
    if (std::find(files.begin(), files.end(), f) == files.end()) files.push_back(f);
  };
  for (const auto& [name, f] : index["weight_map"].items())
    if (f.is_string()) add(f.get<std::string>());
  const json rows = index.value("row_shards", json::object());  // a named copy: items() must not outlive it
  for (const auto& [name, t] : rows.items())
    for (const auto& f : t.value("files", json::array())) add(f.value("file", ""));
  return files;
}

std::string indexProblem(const fs::path& dir, const json& index) {
  for (const auto& f : indexFiles(index))
    if (!fs::exists(dir / f)) return fmt::format("{} missing", f);
  const json rows = index.value("row_shards", json::object());
  for (const auto& [name, t] : rows.items()) {
    int64_t next = 0;
    for (const auto& f : t.value("files", json::array())) {
      if (f.value("start", int64_t{-1}) != next) return fmt::format("{}: the row shards are not contiguous", name);
      next += f.value("rows", int64_t{0});
    }
    if (!t.contains("shape") || !t["shape"].is_array() || t["shape"].empty() || t["shape"][0] != next)
      return fmt::format("{}: the row shards cover {} rows, not the table's", name, next);
  }
  return "";
}

std::string formatIndex(const fs::path& path, bool* complete) {
  const json index = readIndex(path);
  const std::string problem = indexProblem(path.parent_path(), index);
  if (complete) *complete = problem.empty();
  std::string out = fmt::format("model index  {}\nstatus       {}\n", path.string(),
                                problem.empty() ? "complete" : "incomplete: " + problem);
  const json rows = index.value("row_shards", json::object());
  out += fmt::format("tensors      {} whole (weight_map), {} split by rows (row_shards)\n", index["weight_map"].size(),
                     rows.size());
  for (const auto& [name, t] : rows.items()) {
    out += fmt::format("\n{} {} in {} row shard(s):\n", name, t.value("shape", json::array()).dump(),
                       t.value("files", json::array()).size());
    for (const auto& f : t.value("files", json::array()))
      out += fmt::format("  {:<36}  rows [{}, {})\n", f.value("file", ""), f.value("start", int64_t{0}),
                         f.value("start", int64_t{0}) + f.value("rows", int64_t{0}));
  }
  for (const auto& f : indexFiles(index)) {
    try {
      appendTensors(out, SafetensorsFile::open(path.parent_path() / f), f);
    } catch (const CheckpointError& e) {
      out += fmt::format("\n{}: unreadable: {}\n", f, e.what());
    }
  }
  return out;
}

}  // namespace

bool atEpochEnd(int64_t epoch, int64_t samplesConsumed) { return epoch > 0 && samplesConsumed == 0; }

std::string positionText(int64_t epoch, int64_t samplesConsumed) {
  if (atEpochEnd(epoch, samplesConsumed)) return fmt::format("end of epoch {}", epoch);
  return fmt::format("epoch {}, {} samples of it done", epoch + 1, samplesConsumed);
}

std::string formatList(const fs::path& root, const std::vector<CheckpointInfo>& list) {
  if (list.empty()) return fmt::format("no checkpoints in {}\n", root.string());
  std::string out = fmt::format("{:>10}  {:>6}  {:>10}  {:>5}  {:>10}  {:<20}  {}\n", "STEP", "EPOCH", "SAMPLES",
                                "WORLD", "SIZE", "CREATED", "STATUS");
  for (const auto& c : list) {
    auto num = [&](auto get) { return c.meta ? fmt::format("{}", get(*c.meta)) : std::string("-"); };
    out += fmt::format("{:>10}  {:>6}  {:>10}  {:>5}  {:>10}  {:<20}  {}\n", c.step,
                       num([](const CheckpointMeta& m) { return atEpochEnd(m.epoch, m.samplesConsumed) ? m.epoch : m.epoch + 1; }),
                       c.meta && atEpochEnd(c.meta->epoch, c.meta->samplesConsumed)
                           ? std::string("all")
                           : num([](const CheckpointMeta& m) { return m.samplesConsumed; }),
                       num([](const CheckpointMeta& m) { return m.worldSize; }), parse::formatBytes(c.bytes),
                       c.meta && !c.meta->createdAt.empty() ? c.meta->createdAt : "-", statusText(c));
  }
  return out;
}

json listToJson(const std::vector<CheckpointInfo>& list) {
  json out = json::array();
  for (const auto& c : list) out.push_back(infoToJson(c));
  return out;
}

std::string formatInspect(const fs::path& target, bool verify, bool* complete) {
  if (isIndex(target)) return formatIndex(target, complete);
  if (complete) *complete = true;  // a .safetensors file that opens; a checkpoint's status decides below
  if (isSafetensors(target)) {
    std::string out;
    appendTensors(out, SafetensorsFile::open(target), target.string());
    if (fs::exists(target.parent_path() / (target.filename().string() + ".index.json")))
      out += fmt::format("\n{}.index.json beside it lists the model's other shards (inspect the index)\n",
                         target.filename().string());
    return out.substr(1);
  }
  const fs::path dir = resolve(target);
  const CheckpointInfo c = inspectCheckpoint(dir, verify);
  if (complete) *complete = c.status == Status::kComplete;
  std::string out = fmt::format("checkpoint   {}\nstatus       {}\n", c.path.string(), statusText(c));
  if (c.meta) {
    const auto& m = *c.meta;
    const bool end = atEpochEnd(m.epoch, m.samplesConsumed);
    out += fmt::format("step         {}\nepoch        {}\nsamples      {}\nworld size   {}\n"
                       "spec hash    {}\ncreated      {}\nformat       {}\n",
                       m.step, end ? m.epoch : m.epoch + 1,
                       end ? fmt::format("all of epoch {} (saved at its end)", m.epoch)
                           : fmt::format("{} of epoch {} consumed", m.samplesConsumed, m.epoch + 1),
                       m.worldSize, m.specHash, m.createdAt, m.formatVersion);
    if (!m.user.empty()) out += fmt::format("user         {}\n", m.user.dump());
  }
  out += fmt::format("\nfiles ({})\n", parse::formatBytes(c.bytes));
  const ByteUnit unit = unitOf(c.bytes);
  for (const auto& f : c.files)
    out += fmt::format("  {:<28}  {:>10}  crc32 {}\n", f.name, bytesIn(f.size, unit), crcHex(f.crc32));
  for (const auto& f : c.files) {
    if (fs::path(f.name).extension() != ".safetensors") continue;
    try {
      appendTensors(out, SafetensorsFile::open(dir / f.name), f.name);
    } catch (const CheckpointError& e) {
      out += fmt::format("\n{}: unreadable: {}\n", f.name, e.what());
    }
  }
  return out;
}

json inspectToJson(const fs::path& target, bool verify, bool* complete) {
  if (complete) *complete = true;
  if (isIndex(target)) {
    json j = readIndex(target);
    const std::string problem = indexProblem(target.parent_path(), j);
    if (complete) *complete = problem.empty();
    json out = {{"path", target.string()}, {"status", problem.empty() ? "complete" : "incomplete"},
                {"reason", problem}, {"index", j}};
    for (const auto& f : indexFiles(j)) {
      try {
        out["safetensors"][f] = tensorsToJson(SafetensorsFile::open(target.parent_path() / f));
      } catch (const CheckpointError& e) {
        out["safetensors"][f] = {{"error", e.what()}};
      }
    }
    return out;
  }
  if (isSafetensors(target)) return tensorsToJson(SafetensorsFile::open(target));
  const fs::path dir = resolve(target);
  const CheckpointInfo c = inspectCheckpoint(dir, verify);
  if (complete) *complete = c.status == Status::kComplete;
  json j = infoToJson(c);
  json tensors = json::object();
  for (const auto& f : c.files) {
    if (fs::path(f.name).extension() != ".safetensors") continue;
    try {
      tensors[f.name] = tensorsToJson(SafetensorsFile::open(dir / f.name));
    } catch (const CheckpointError& e) {
      tensors[f.name] = {{"error", e.what()}};
    }
  }
  j["safetensors"] = tensors;
  return j;
}

}  // namespace dtrain::ckpt
