// CheckpointWriter (the commit protocol in checkpoint.h) and the meta/manifest JSON shared with the reader.
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/ranges.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <random>

#include "lib/ckpt/checkpoint.h"
#include "lib/ckpt/checkpoint_names.h"
#include "lib/common/error.h"
#include "lib/common/hash.h"

namespace dtrain::ckpt {

namespace fs = std::filesystem;
using nlohmann::json;

nlohmann::json metaToJson(const CheckpointMeta& m) {
  return json{{"format", kMetaFormat},
              {"format_version", m.formatVersion},
              {"step", m.step},
              {"epoch", m.epoch},
              {"samples_consumed", m.samplesConsumed},
              {"world_size", m.worldSize},
              {"spec_hash", m.specHash},
              {"created_at", m.createdAt},
              {"user", m.user}};
}

CheckpointMeta metaFromJson(const nlohmann::json& j, const std::string& source) {
  auto field = [&](const char* key, auto check, const char* expected) -> const json& {
    DTRAIN_CHECK_AS(CheckpointError, j.is_object() && j.contains(key) && check(j.at(key)), "{}: field '{}' {} (expected {})",
                    source, key, j.is_object() && j.contains(key) ? "is " + j.at(key).dump() : std::string("missing"),
                    expected);
    return j.at(key);
  };
  auto isInt = [](const json& v) { return v.is_number_integer(); };
  auto isString = [](const json& v) { return v.is_string(); };
  CheckpointMeta m;
  DTRAIN_CHECK_AS(CheckpointError, j.is_object() && j.value("format", "") == kMetaFormat,
                  "{}: not a dtrain checkpoint meta file (expected \"format\": \"{}\")", source, kMetaFormat);
  m.formatVersion = field("format_version", isInt, "an integer").get<int>();
  DTRAIN_CHECK_AS(CheckpointError, m.formatVersion <= kFormatVersion,
                  "{}: checkpoint format version {} is newer than this dtrain's {} (upgrade dtrain)", source,
                  m.formatVersion, kFormatVersion);
  m.step = field("step", isInt, "an integer").get<int64_t>();
  m.epoch = field("epoch", isInt, "an integer").get<int64_t>();
  m.samplesConsumed = field("samples_consumed", isInt, "an integer").get<int64_t>();
  m.worldSize = field("world_size", isInt, "an integer").get<int>();
  m.specHash = field("spec_hash", isString, "a string").get<std::string>();
  m.createdAt = j.value("created_at", "");
  if (j.contains("user")) m.user = j.at("user");
  return m;
}

std::string specHash(const nlohmann::json& modelSpec) {
  // nlohmann::json keeps object keys sorted, so dump() is canonical for equal specs.
  // FNV-1a 64 with the published basis: checkpoints store it, so its values never change (test_checkpoint pins one).
  return fnv1aHex(modelSpec.dump());
}

std::string checkpointDirName(int64_t step) { return fmt::format("step-{:09d}", step); }

std::string CheckpointWriter::newToken() {
  std::random_device rd;
  const uint64_t v = (static_cast<uint64_t>(rd()) << 32) ^ rd() ^
                     static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  return fmt::format("{:016x}", v);
}

CheckpointWriter::CheckpointWriter(fs::path root, int64_t step, std::string token)
    : CheckpointWriter(std::move(root), step, std::move(token), Options{}) {}

CheckpointWriter::CheckpointWriter(fs::path root, int64_t step, std::string token, Options options)
    : root_(std::move(root)), step_(step), token_(std::move(token)), options_(options) {
  DTRAIN_CHECK_AS(CheckpointError, step >= 0, "checkpoint step {} (expected >= 0)", step);
  DTRAIN_CHECK_AS(CheckpointError, !token_.empty() && token_.find('/') == std::string::npos,
                  "checkpoint token '{}' (expected a non-empty name)", token_);
  std::error_code ec;
  fs::create_directories(root_, ec);
  DTRAIN_CHECK_AS(CheckpointError, !ec, "{}: cannot create checkpoint directory ({})", root_.string(), ec.message());
  staging_ = root_ / stagingDirName(step, token_);
  if (::mkdir(staging_.c_str(), 0755) != 0 && errno != EEXIST)
    DTRAIN_THROW(CheckpointError, "{}: cannot create staging directory ({})", staging_.string(), std::strerror(errno));
}

void CheckpointWriter::checkName(const std::string& file) const {
  DTRAIN_CHECK_AS(CheckpointError,
                  !file.empty() && file.front() != '.' && file.find('/') == std::string::npos && file != kMetaFile &&
                      file != kManifestFile && file != kMarkerFile,
                  "checkpoint file name '{}' is reserved or invalid", file);
}

fs::path CheckpointWriter::tempPath(const std::string& file) const {
  return staging_ / fmt::format(".{}{}{}", file, kTempInfix, ::getpid());
}

// Renames the finished temporary file to its name and records size + crc32 beside it for commit().
FileRecord CheckpointWriter::publish(const std::string& file, const FileRecord& written) {
  const fs::path tmp = tempPath(file);
  const fs::path final = staging_ / file;
  if (::rename(tmp.c_str(), final.c_str()) != 0) {
    int err = errno;
    std::error_code ec;
    fs::remove(tmp, ec);
    DTRAIN_THROW(CheckpointError, "{}: rename failed ({})", final.string(), std::strerror(err));
  }
  FileRecord r{file, written.size, written.crc32};
  // The record needs no fsync: commit() reads it in this run and makes the manifest durable instead.
  const json rec = {{"size", r.size}, {"crc32", crcHex(r.crc32)}};
  const fs::path recPath = staging_ / recordName(file);
  const fs::path recTmp = staging_ / (recordName(file) + ".tmp");
  writeFileDurably(recTmp, rec.dump());
  guarded(final.string(), [&] { fs::rename(recTmp, recPath); });
  return r;
}

FileRecord CheckpointWriter::writeTensors(const std::string& file, std::span<const NamedTensor> tensors,
                                          const Metadata& metadata) {
  checkName(file);
  FileRecord written;
  {
    FileSink sink(tempPath(file), FileSink::Options{.direct = options_.directIO});
    writeSafetensors(sink, tensors, metadata);
    written = sink.finish();
  }
  return publish(file, written);
}

FileRecord CheckpointWriter::writeBytes(const std::string& file, std::span<const std::byte> bytes) {
  checkName(file);
  FileRecord written;
  if (bytes.size() < (size_t{1} << 20)) {
    written = writeFileDurably(tempPath(file), {reinterpret_cast<const char*>(bytes.data()), bytes.size()});
  } else {
    FileSink sink(tempPath(file), FileSink::Options{.direct = options_.directIO});
    sink.write(bytes.data(), bytes.size());
    written = sink.finish();
  }
  return publish(file, written);
}

FileRecord CheckpointWriter::writeJson(const std::string& file, const nlohmann::json& value) {
  const std::string text = value.dump(2) + "\n";
  return writeBytes(file, std::as_bytes(std::span<const char>(text.data(), text.size())));
}

fs::path CheckpointWriter::commit(CheckpointMeta meta, const CommitOptions& options) {
  return guarded(fmt::format("committing {}", staging_.string()), [&] { return commitStaged(meta, options); });
}

fs::path CheckpointWriter::commitStaged(CheckpointMeta& meta, const CommitOptions& options) {
  // 1. Collect the ranks' files and their records; anything half-written is an error.
  std::map<std::string, FileRecord> files;
  std::vector<std::string> pending;
  for (const auto& entry : fs::directory_iterator(staging_)) {
    const std::string name = entry.path().filename().string();
    if (name.front() == '.') {
      if (name.find(kTempInfix) != std::string::npos) pending.push_back(name);
      continue;
    }
    checkName(name);
    const fs::path rec = staging_ / recordName(name);
    DTRAIN_CHECK_AS(CheckpointError, fs::exists(rec), "{}: {} has no write record (written outside the writer?)",
                    staging_.string(), name);
    const json r = json::parse(readWholeFile(rec));
    const auto crc = parseCrcHex(r.at("crc32").get<std::string>());
    DTRAIN_CHECK_AS(CheckpointError, crc.has_value(), "{}: bad write record for {}", staging_.string(), name);
    FileRecord record{name, r.at("size").get<uint64_t>(), *crc};
    const uint64_t onDisk = fs::file_size(entry.path());
    DTRAIN_CHECK_AS(CheckpointError, onDisk == record.size, "{}: {} has {} bytes, its writer wrote {}",
                    staging_.string(), name, onDisk, record.size);
    files[name] = record;
  }
  DTRAIN_CHECK_AS(CheckpointError, pending.empty(), "{}: files still being written: {} (commit before every rank "
                  "finished?)", staging_.string(), fmt::join(pending, ", "));
  std::vector<std::string> missing;
  for (const auto& f : options.requiredFiles)
    if (!files.count(f)) missing.push_back(f);
  DTRAIN_CHECK_AS(CheckpointError, missing.empty(), "{}: missing checkpoint files: {}", staging_.string(),
                  fmt::join(missing, ", "));

  // 2. meta.json and manifest.json, durable.
  meta.step = step_;
  meta.formatVersion = kFormatVersion;
  char when[32];
  const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm utc{};
  ::gmtime_r(&now, &utc);
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &utc);
  meta.createdAt = when;
  files[kMetaFile] = writeFileDurably(staging_ / kMetaFile, metaToJson(meta).dump(2) + "\n");
  json list = json::array();
  for (const auto& [name, r] : files) list.push_back({{"name", name}, {"size", r.size}, {"crc32", crcHex(r.crc32)}});
  const json manifest = {{"format", kManifestFormat}, {"version", kFormatVersion}, {"step", step_}, {"files", list}};
  const FileRecord manifestRecord = writeFileDurably(staging_ / kManifestFile, manifest.dump(2) + "\n");
  for (const auto& [name, r] : files) {
    std::error_code ec;
    fs::remove(staging_ / recordName(name), ec);
  }
  syncDirectory(staging_);

  // 3. The staging dir takes the final name; an older dir of the same step (a partial one, or one from before a
  //    rollback) is moved aside first and removed after.
  const fs::path final = root_ / checkpointDirName(step_);
  fs::path replaced;
  if (fs::exists(final)) {
    replaced = root_ / replacedDirName(step_, token_);
    fs::rename(final, replaced);
  }
  if (::rename(staging_.c_str(), final.c_str()) != 0)
    DTRAIN_THROW(CheckpointError, "{}: rename to {} failed ({})", staging_.string(), final.string(),
                 std::strerror(errno));
  syncDirectory(root_);
  if (!replaced.empty()) {
    std::error_code ec;
    fs::remove_all(replaced, ec);
  }

  // 4. The marker, last: only now is the checkpoint complete.
  const json marker = {{"step", step_}, {"manifest_crc32", crcHex(manifestRecord.crc32)}};
  writeFileDurably(final / (std::string(".") + kMarkerFile + ".tmp"), marker.dump() + "\n");
  fs::rename(final / (std::string(".") + kMarkerFile + ".tmp"), final / kMarkerFile);
  syncDirectory(final);
  staging_ = final;
  return final;
}

void CheckpointWriter::abandon() {
  std::error_code ec;
  if (staging_.filename().string().find(kStagingInfix) != std::string::npos) fs::remove_all(staging_, ec);
}

}  // namespace dtrain::ckpt
