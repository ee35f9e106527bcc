// Atomic, self-describing, multi-rank checkpoints over named byte buffers.
//
// Layout of a checkpoint root (e.g. runs/fmnist/checkpoints):
//
//   step-000000200/                      a complete checkpoint
//     model.safetensors                  files written by the ranks (any names: optimizer.safetensors,
//     optimizer.safetensors              rank-3.json, ...)
//     rank-0.json
//     meta.json                          CheckpointMeta (step, epoch, samples consumed, world size, spec hash, user)
//     manifest.json                      every file above with its size and crc32
//     COMMITTED                          the marker: {"step": 200, "manifest_crc32": "..."}
//   step-000000300.tmp-<token>/          a staging dir: the ranks are writing step 300
//
// Protocol (CheckpointWriter):
//   1. Every rank constructs a writer for (root, step, token) with the same token (rank 0 makes it with
//      newToken() and the trainer shares it); the staging dir step-<N>.tmp-<token> is created by whoever is first.
//   2. Each rank writes its files: each goes to a hidden temporary name, is fsynced, renamed to its name, and
//      its size + crc32 recorded beside it (computed while writing, never re-read).
//   3. After every rank has finished (the trainer's barrier), rank 0 calls commit(meta): it checks that every
//      file is whole, writes meta.json and manifest.json (fsynced), fsyncs the staging dir, renames it to
//      step-<N> (an older step-<N> is replaced), fsyncs the root, and last writes COMMITTED (temp name, fsync,
//      rename, fsync of the checkpoint dir).
// The rule: a checkpoint is complete if and only if step-<N>/COMMITTED exists, names the manifest's crc32, and
// every file in the manifest has its size (and, when verified, its crc32). A crash at any moment leaves either a
// staging dir, or a step-<N> without COMMITTED ("partial"): both are skipped on resume and removed by retention.
//
// Reading: listCheckpoints() reports every checkpoint and staging dir newest first with its status;
// findLatestValid() returns the newest complete one and, as values, the ones it skipped and why. A checkpoint
// written for another model spec is refused by Checkpoint::checkSpecHash().
//
// Thread-safety: a writer is used by one thread; writers of different ranks (threads or processes) may write
// different files of the same step concurrently. Readers are independent. All calls block on file I/O.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "lib/ckpt/file_io.h"
#include "lib/ckpt/safetensors.h"

namespace dtrain::ckpt {

inline constexpr int kFormatVersion = 1;

struct CheckpointMeta {
  int formatVersion = kFormatVersion;
  int64_t step = 0;
  int64_t epoch = 0;            // counted from 0 (the text of `dtrain ckpt list|inspect` counts from 1)
  int64_t samplesConsumed = 0;  // entries of this epoch's order consumed by the group (the sampler position)
  int worldSize = 1;
  std::string specHash;         // specHash() of the job's model spec
  std::string createdAt;        // UTC, ISO 8601; filled in by commit()
  nlohmann::json user = nlohmann::json::object();  // the trainer's own state (lr schedule, RNG, ...)
};
nlohmann::json metaToJson(const CheckpointMeta& meta);
// Throws CheckpointError naming `source` when a field is missing or has the wrong type.
CheckpointMeta metaFromJson(const nlohmann::json& j, const std::string& source);

// A fingerprint of a model spec: 64-bit FNV-1a of its canonical JSON (sorted keys), 16 hex digits. Equal specs
// hash equal regardless of key order or whitespace in the job file.
std::string specHash(const nlohmann::json& modelSpec);

std::string checkpointDirName(int64_t step);  // "step-000000123"

struct CommitOptions {
  // Files that must be present (e.g. one rank-<r>.json per rank): commit fails naming the missing ones.
  std::vector<std::string> requiredFiles;
};

class CheckpointWriter {
 public:
  struct Options {
    bool directIO = true;  // see file_io.h
  };
  // A fresh random token for a staging dir name (16 hex digits).
  static std::string newToken();
  // Creates (or joins) the staging dir for `step` under `root` (created if needed).
  CheckpointWriter(std::filesystem::path root, int64_t step, std::string token);
  CheckpointWriter(std::filesystem::path root, int64_t step, std::string token, Options options);
  static CheckpointWriter begin(const std::filesystem::path& root, int64_t step,
                                const std::string& token = newToken()) {
    return CheckpointWriter(root, step, token);
  }

  const std::filesystem::path& stagingDir() const { return staging_; }
  int64_t step() const { return step_; }

  // Each writes one file of the checkpoint (names: no '/', not hidden, not meta.json/manifest.json/COMMITTED).
  FileRecord writeTensors(const std::string& file, std::span<const NamedTensor> tensors, const Metadata& metadata = {});
  FileRecord writeJson(const std::string& file, const nlohmann::json& value);
  FileRecord writeBytes(const std::string& file, std::span<const std::byte> bytes);

  // Rank 0, after every rank's writes returned. Returns the final checkpoint dir. Throws CheckpointError when a
  // file is incomplete or missing; the staging dir is then left for retention to remove.
  std::filesystem::path commit(CheckpointMeta meta, const CommitOptions& options = {});
  // Removes the staging dir (after a failure, instead of committing).
  void abandon();

 private:
  std::filesystem::path tempPath(const std::string& file) const;
  FileRecord publish(const std::string& file, const FileRecord& record);
  std::filesystem::path commitStaged(CheckpointMeta& meta, const CommitOptions& options);
  void checkName(const std::string& file) const;

  std::filesystem::path root_;
  int64_t step_;
  std::string token_;
  Options options_;
  std::filesystem::path staging_;
};

enum class Status : uint8_t { kComplete, kPartial, kCorrupt, kStaging };
const char* statusName(Status status);  // "complete", "partial", "corrupt", "staging"

struct CheckpointInfo {
  std::filesystem::path path;
  int64_t step = -1;
  Status status = Status::kCorrupt;
  std::string reason;                  // why it is not complete; empty when complete
  bool checksumsVerified = false;
  std::optional<CheckpointMeta> meta;  // when meta.json could be read
  std::vector<FileRecord> files;       // from the manifest (or the directory when there is none)
  uint64_t bytes = 0;                  // sum of the file sizes on disk
};

// Status of one checkpoint dir (or staging dir). With verifyChecksums every file is read and its crc32 checked.
CheckpointInfo inspectCheckpoint(const std::filesystem::path& path, bool verifyChecksums);
// Every checkpoint and staging dir under root, newest step first (for one step: the final dir first). A missing
// root is an empty list. A dir removed while it is inspected (a running job's retention) is left out.
std::vector<CheckpointInfo> listCheckpoints(const std::filesystem::path& root, bool verifyChecksums);

struct LatestValid {
  std::optional<CheckpointInfo> checkpoint;  // nullopt: nothing to resume from (not an error)
  std::vector<CheckpointInfo> skipped;       // newer ones that were partial or corrupt, newest first, with reasons
};
// The newest complete checkpoint with verified checksums. Staging dirs are neither returned nor reported, nor are
// checkpoints removed while they are inspected (a running job's retention).
LatestValid findLatestValid(const std::filesystem::path& root);

struct RetentionResult {
  std::vector<std::filesystem::path> removed;
};
// Keeps the newest `keep` (>= 1) complete checkpoints and removes older complete ones, partial/corrupt ones
// older than the newest complete one, every staging dir and leftovers of replaced checkpoints. Call it on rank 0
// right after commit(), when no staging dir is in use. Only names dtrain writes are ever touched.
RetentionResult applyRetention(const std::filesystem::path& root, int keep);

// Removes the staging dirs under `root` named step-<N>.tmp-<tokenFor(N)>: the ones a writer with these tokens
// would join. Writers derive their token from the run id, round, restart count and step, so the same command run
// again joins the staging dir a killed writer left at that step, and its commit failed on the dead writer's
// half-written file (exit 8 at that step on every rerun) or took in a stale file. Call it on rank 0 before any
// rank of the run can have started a checkpoint (at start-up, before the first step). Blocking (filesystem only).
RetentionResult removeStagingDirs(const std::filesystem::path& root,
                                  const std::function<std::string(int64_t step)>& tokenFor);

// A checkpoint opened for loading. Safetensors files are memory-mapped on first use and cached.
// Not thread-safe (the cache); one per loading thread.
class Checkpoint {
 public:
  // Opens a checkpoint dir; it must be complete (marker and sizes; checksums are findLatestValid's job).
  static Checkpoint open(const std::filesystem::path& path);
  const std::filesystem::path& path() const { return path_; }
  const CheckpointMeta& meta() const { return meta_; }
  const std::vector<FileRecord>& files() const { return files_; }
  bool hasFile(const std::string& file) const;

  nlohmann::json readJson(const std::string& file) const;
  std::string readBytes(const std::string& file) const;
  const SafetensorsFile& tensors(const std::string& file);
  // Copies one tensor into caller memory; CheckpointError on a missing tensor or a dtype/shape/size mismatch.
  void loadTensor(const std::string& file, const std::string& name, DType dtype, const Shape& shape,
                  std::span<std::byte> dst);
  // The same into a CPU view, whose dtype and shape are the expected ones.
  void loadTensor(const std::string& file, const std::string& name, const TensorView& dst);
  // CheckpointError unless the checkpoint was written for a model spec with this hash.
  void checkSpecHash(const std::string& expected) const;

 private:
  std::filesystem::path path_;
  CheckpointMeta meta_;
  std::vector<FileRecord> files_;
  std::map<std::string, SafetensorsFile> open_;
};

}  // namespace dtrain::ckpt
