#include "lib/ckpt/report.h"

#include <fmt/format.h>

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
  for (const auto& t : f.tensors())
    out += fmt::format("  {:<{}}  {:<4}  {:<18}  {}\n", t.name, width, safetensorsName(t.dtype), t.shape.spaced(),
                       parse::formatBytes(t.bytes()));
  for (const auto& [k, v] : f.metadata()) out += fmt::format("  metadata {} = {}\n", k, v);
}

json tensorsToJson(const SafetensorsFile& f) {
  json tensors = json::array();
  for (const auto& t : f.tensors())
    tensors.push_back(
        {{"name", t.name}, {"dtype", safetensorsName(t.dtype)}, {"shape", t.shape.toVector()}, {"bytes", t.bytes()}});
  return {{"tensors", tensors}, {"metadata", f.metadata()}};
}

}  // namespace

std::string formatList(const fs::path& root, const std::vector<CheckpointInfo>& list) {
  if (list.empty()) return fmt::format("no checkpoints in {}\n", root.string());
  std::string out = fmt::format("{:>10}  {:>6}  {:>10}  {:>5}  {:>10}  {:<20}  {}\n", "STEP", "EPOCH", "SAMPLES",
                                "WORLD", "SIZE", "CREATED", "STATUS");
  for (const auto& c : list) {
    auto num = [&](auto get) { return c.meta ? fmt::format("{}", get(*c.meta)) : std::string("-"); };
    out += fmt::format("{:>10}  {:>6}  {:>10}  {:>5}  {:>10}  {:<20}  {}\n", c.step,
                       num([](const CheckpointMeta& m) { return m.epoch + 1; }),
                       num([](const CheckpointMeta& m) { return m.samplesConsumed; }),
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

std::string formatInspect(const fs::path& target, bool verify) {
  if (isSafetensors(target)) {
    std::string out;
    appendTensors(out, SafetensorsFile::open(target), target.string());
    return out.substr(1);
  }
  const fs::path dir = resolve(target);
  const CheckpointInfo c = inspectCheckpoint(dir, verify);
  std::string out = fmt::format("checkpoint   {}\nstatus       {}\n", c.path.string(), statusText(c));
  if (c.meta) {
    const auto& m = *c.meta;
    out += fmt::format("step         {}\nepoch        {}\nsamples      {} of epoch {} consumed\nworld size   {}\n"
                       "spec hash    {}\ncreated      {}\nformat       {}\n",
                       m.step, m.epoch + 1, m.samplesConsumed, m.epoch + 1, m.worldSize, m.specHash, m.createdAt,
                       m.formatVersion);
    if (!m.user.empty()) out += fmt::format("user         {}\n", m.user.dump());
  }
  out += fmt::format("\nfiles ({})\n", parse::formatBytes(c.bytes));
  for (const auto& f : c.files)
    out += fmt::format("  {:<28}  {:>10}  crc32 {}\n", f.name, parse::formatBytes(f.size), crcHex(f.crc32));
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

json inspectToJson(const fs::path& target, bool verify) {
  if (isSafetensors(target)) return tensorsToJson(SafetensorsFile::open(target));
  const fs::path dir = resolve(target);
  const CheckpointInfo c = inspectCheckpoint(dir, verify);
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
