// Reading side of checkpoint.h: status of checkpoint dirs, the newest valid one, retention, loading.
#include <fmt/ranges.h>

#include <algorithm>
#include <optional>

#include "lib/ckpt/checkpoint.h"
#include "lib/ckpt/checkpoint_names.h"
#include "lib/common/error.h"

namespace dtrain::ckpt {

namespace fs = std::filesystem;
using nlohmann::json;

const char* statusName(Status status) {
  switch (status) {
    case Status::kComplete: return "complete";
    case Status::kPartial: return "partial";
    case Status::kCorrupt: return "corrupt";
    case Status::kStaging: return "staging";
  }
  return "?";
}

namespace {

std::vector<FileRecord> listFiles(const fs::path& dir, uint64_t& bytes) {
  std::vector<FileRecord> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (!e.is_regular_file(ec)) continue;
    FileRecord r{e.path().filename().string(), e.file_size(ec), 0};
    bytes += r.size;
    if (r.name.front() != '.') out.push_back(r);
  }
  std::sort(out.begin(), out.end(), [](const FileRecord& a, const FileRecord& b) { return a.name < b.name; });
  return out;
}

// Fills info for a final step-<N> dir. Returns the reason it is not complete, or "" when it is.
std::string checkFinal(CheckpointInfo& info, bool verify) {
  const fs::path& dir = info.path;
  std::error_code ec;
  // meta.json first: list/inspect show it even for a damaged checkpoint.
  if (fs::exists(dir / kMetaFile, ec)) {
    try {
      info.meta = metaFromJson(json::parse(readWholeFile(dir / kMetaFile)), (dir / kMetaFile).string());
    } catch (const std::exception& e) {
      info.status = Status::kCorrupt;
      return fmt::format("meta.json unreadable: {}", e.what());
    }
  }
  if (!fs::exists(dir / kMarkerFile, ec)) {
    info.status = Status::kPartial;
    return "no COMMITTED marker (the commit did not finish)";
  }
  info.status = Status::kCorrupt;
  if (!fs::exists(dir / kManifestFile, ec)) return "manifest.json missing";
  const std::string manifestText = readWholeFile(dir / kManifestFile);
  json marker, manifest;
  try {
    marker = json::parse(readWholeFile(dir / kMarkerFile));
  } catch (const std::exception& e) {
    return fmt::format("COMMITTED marker unreadable: {}", e.what());
  }
  // The marker pins the manifest: any change to it (or a manifest from another commit) shows here.
  const uint32_t manifestCrc = crc32Of(manifestText);
  const std::string want = marker.is_object() ? marker.value("manifest_crc32", "") : "";
  if (want != crcHex(manifestCrc))
    return fmt::format("manifest.json crc32 {} does not match the COMMITTED marker's {}", crcHex(manifestCrc),
                       want.empty() ? "(none)" : want);
  try {
    manifest = json::parse(manifestText);
  } catch (const std::exception& e) {
    return fmt::format("manifest.json unreadable: {}", e.what());
  }
  if (!manifest.is_object() || !manifest.contains("files") || !manifest["files"].is_array())
    return "manifest.json has no file list";
  info.files.clear();
  info.bytes = 0;
  for (const auto& f : manifest["files"]) {
    auto crc = parseCrcHex(f.value("crc32", ""));
    const std::string name = f.value("name", "");
    if (!crc || name.empty() || name.find('/') != std::string::npos) return fmt::format("manifest entry {} is invalid", f.dump());
    info.files.push_back(FileRecord{name, f.value("size", uint64_t{0}), *crc});
  }
  for (const auto& r : info.files) {
    const fs::path p = dir / r.name;
    const auto size = fs::file_size(p, ec);
    if (ec) return fmt::format("{} missing", r.name);
    info.bytes += size;
    if (size != r.size) return fmt::format("{} has {} bytes, the manifest says {} (truncated?)", r.name, size, r.size);
  }
  if (!info.meta) return "meta.json missing";
  if (info.meta->step != info.step)
    return fmt::format("meta.json says step {}, the directory is step {}", info.meta->step, info.step);
  if (verify) {
    for (const auto& r : info.files) {
      const FileRecord actual = checksumFile(dir / r.name);
      if (actual.crc32 != r.crc32 || actual.size != r.size)
        return fmt::format("{} crc32 {} does not match the manifest's {} (corrupted)", r.name, crcHex(actual.crc32),
                           crcHex(r.crc32));
    }
    info.checksumsVerified = true;
  }
  info.status = Status::kComplete;
  return "";
}

}  // namespace

CheckpointInfo inspectCheckpoint(const fs::path& given, bool verifyChecksums) {
  // "runs/x/step-000000100/" (shell completion) names the same directory.
  const fs::path path = given.has_filename() ? given : given.parent_path();
  CheckpointInfo info;
  info.path = path;
  const auto parsed = parseDirName(path.filename().string());
  DTRAIN_CHECK_AS(CheckpointError, parsed.has_value(), "{}: not a checkpoint directory (expected step-<N>)",
                  path.string());
  DTRAIN_CHECK_AS(CheckpointError, fs::is_directory(path), "{}: no such checkpoint directory", path.string());
  info.step = parsed->step;
  if (parsed->kind != DirKind::kFinal) {
    info.status = Status::kStaging;
    info.files = listFiles(path, info.bytes);
    info.reason = parsed->kind == DirKind::kStaging ? "not committed (being written, or its writer died)"
                                                    : "leftover of a replaced checkpoint";
    return info;
  }
  try {
    info.reason = checkFinal(info, verifyChecksums);
  } catch (const std::exception& e) {  // unreadable files, malformed JSON fields: a value, not a throw
    info.status = Status::kCorrupt;
    info.reason = e.what();
  }
  if (info.files.empty()) info.files = listFiles(path, info.bytes);
  return info;
}

std::vector<CheckpointInfo> listCheckpoints(const fs::path& root, bool verifyChecksums) {
  std::vector<CheckpointInfo> out;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return out;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    if (!e.is_directory(ec) || !parseDirName(e.path().filename().string())) continue;
    // The folder may be a running job's: its retention can remove a checkpoint while it is looked at here. One that
    // is gone afterwards was never there (whatever inspecting it half-way said); any other error is real.
    try {
      CheckpointInfo info = inspectCheckpoint(e.path(), verifyChecksums);
      if (fs::exists(e.path(), ec)) out.push_back(std::move(info));
    } catch (const std::exception&) {
      if (fs::exists(e.path(), ec)) throw;
    }
  }
  std::sort(out.begin(), out.end(), [](const CheckpointInfo& a, const CheckpointInfo& b) {
    if (a.step != b.step) return a.step > b.step;
    if ((a.status == Status::kStaging) != (b.status == Status::kStaging)) return b.status == Status::kStaging;
    return a.path < b.path;
  });
  return out;
}

LatestValid findLatestValid(const fs::path& root) {
  LatestValid result;
  // Cheap pass first (marker, manifest, sizes), then checksums only for the candidate that would be used.
  for (auto& info : listCheckpoints(root, /*verifyChecksums=*/false)) {
    if (info.status == Status::kStaging) continue;
    if (info.status == Status::kComplete) {
      std::error_code ec;
      std::optional<CheckpointInfo> found;
      try {  // removed by a running job's retention since it was listed: skipped like in listCheckpoints
        found = inspectCheckpoint(info.path, /*verifyChecksums=*/true);
      } catch (const std::exception&) {
        if (fs::exists(info.path, ec)) throw;
      }
      if (!found || !fs::exists(info.path, ec)) continue;
      CheckpointInfo verified = std::move(*found);
      if (verified.status == Status::kComplete) {
        result.checkpoint = std::move(verified);
        return result;
      }
      info = std::move(verified);
    }
    result.skipped.push_back(std::move(info));
  }
  return result;
}

RetentionResult applyRetention(const fs::path& root, int keep) {
  DTRAIN_CHECK_AS(CheckpointError, keep >= 1, "checkpoint keep {} (expected >= 1)", keep);
  RetentionResult result;
  const auto all = listCheckpoints(root, /*verifyChecksums=*/false);
  int kept = 0;
  int64_t newestComplete = -1;
  for (const auto& info : all) {
    bool remove = false;
    if (info.status == Status::kStaging) {
      remove = true;
    } else if (info.status == Status::kComplete) {
      if (newestComplete < 0) newestComplete = info.step;
      remove = ++kept > keep;
    } else {
      remove = newestComplete >= 0 && info.step < newestComplete;
    }
    if (!remove) continue;
    std::error_code ec;
    fs::remove_all(info.path, ec);
    if (!ec) result.removed.push_back(info.path);
  }
  return result;
}

RetentionResult removeStagingDirs(const fs::path& root, const std::function<std::string(int64_t step)>& tokenFor) {
  RetentionResult result;
  std::error_code ec;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const auto parsed = parseDirName(name);
    if (!parsed || parsed->kind != DirKind::kStaging || name != stagingDirName(parsed->step, tokenFor(parsed->step)))
      continue;
    std::error_code removeError;
    fs::remove_all(it->path(), removeError);
    if (!removeError) result.removed.push_back(it->path());
  }
  return result;
}

Checkpoint Checkpoint::open(const fs::path& given) {
  const CheckpointInfo info = inspectCheckpoint(given, /*verifyChecksums=*/false);
  const fs::path& path = info.path;
  DTRAIN_CHECK_AS(CheckpointError, info.status == Status::kComplete, "{}: not a complete checkpoint: {}",
                  path.string(), info.reason);
  Checkpoint c;
  c.path_ = path;
  c.meta_ = *info.meta;
  c.files_ = info.files;
  return c;
}

bool Checkpoint::hasFile(const std::string& file) const {
  return std::any_of(files_.begin(), files_.end(), [&](const FileRecord& r) { return r.name == file; });
}

std::string Checkpoint::readBytes(const std::string& file) const {
  DTRAIN_CHECK_AS(CheckpointError, hasFile(file), "{}: checkpoint has no file '{}'", path_.string(), file);
  return readWholeFile(path_ / file);
}

nlohmann::json Checkpoint::readJson(const std::string& file) const {
  const std::string text = readBytes(file);
  return guarded((path_ / file).string(), [&] { return json::parse(text); });
}

const SafetensorsFile& Checkpoint::tensors(const std::string& file) {
  auto it = open_.find(file);
  if (it != open_.end()) return it->second;
  DTRAIN_CHECK_AS(CheckpointError, hasFile(file), "{}: checkpoint has no file '{}'", path_.string(), file);
  return open_.emplace(file, SafetensorsFile::open(path_ / file)).first->second;
}

void Checkpoint::loadTensor(const std::string& file, const std::string& name, DType dtype, const Shape& shape,
                            std::span<std::byte> dst) {
  tensors(file).readInto(name, dtype, shape, dst);
}

void Checkpoint::loadTensor(const std::string& file, const std::string& name, const TensorView& dst) {
  tensors(file).readInto(name, dst);
}

void Checkpoint::checkSpecHash(const std::string& expected) const {
  DTRAIN_CHECK_AS(CheckpointError, meta_.specHash == expected,
                  "{}: checkpoint was written for another model (spec hash {}, this job's model hashes to {}); "
                  "refusing to load it: resume with the original model spec, or start a fresh run in another "
                  "output directory",
                  path_.string(), meta_.specHash, expected);
}

}  // namespace dtrain::ckpt
