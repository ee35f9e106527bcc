// Checkpoint write benchmark (`dtrain ckpt bench DIR`, scripts/bench/ckpt_write): writes a checkpoint of one
// safetensors file of `bytes` through the full protocol (staging dir, crc32, fsync, rename, manifest, marker) and
// times it, so the figure compares directly with the disk's sequential write speed (dd). Blocking.
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

namespace dtrain::ckpt {

struct WriteBenchOptions {
  std::filesystem::path dir;  // a scratch checkpoint root on the disk to measure; its bench checkpoints are removed
  uint64_t bytes = uint64_t{1} << 30;
  int tensors = 8;            // the payload is split into this many F32 tensors
  int repeats = 3;
  bool directIO = true;
};

struct WriteBenchRun {
  double writeSeconds = 0;   // writeTensors: header + data + crc32 + fdatasync + rename
  double commitSeconds = 0;  // commit: manifest, meta, renames, directory fsyncs, marker
  double totalSeconds() const { return writeSeconds + commitSeconds; }
};

struct WriteBenchResult {
  uint64_t fileBytes = 0;  // size of the safetensors file written per run
  bool directIO = false;   // whether O_DIRECT was in effect
  std::vector<WriteBenchRun> runs;
  double medianBytesPerSecond() const;  // fileBytes / median total time
};

WriteBenchResult runWriteBenchmark(const WriteBenchOptions& options);

}  // namespace dtrain::ckpt
