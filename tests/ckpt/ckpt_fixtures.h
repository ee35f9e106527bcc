// Shared helpers for the checkpoint tests: a fresh root per test and a two-rank checkpoint writer.
#pragma once

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "lib/ckpt/checkpoint.h"
#include "tests/support/process.h"

namespace dtrain::testing {

inline std::filesystem::path freshRoot(const std::string& tag) {
  return std::filesystem::path(tempDir("ckpt-" + tag)) / "checkpoints";
}

// Model weights of a step: w[i] = step + i / 1000.
inline std::vector<float> weightsOf(int64_t step, size_t n = 3000) {
  std::vector<float> w(n);
  for (size_t i = 0; i < n; ++i) w[i] = static_cast<float>(step) + static_cast<float>(i) / 1000.0f;
  return w;
}

// Writes a complete checkpoint the way a 2-rank job does: rank 0 writes the model, both ranks their rank-<r>.json
// (from two threads into one staging dir), then rank 0 commits.
inline std::filesystem::path writeCheckpoint(const std::filesystem::path& root, int64_t step,
                                             const std::string& specHash = "spec") {
  const std::string token = ckpt::CheckpointWriter::newToken();
  const auto w = weightsOf(step);
  std::thread rank1([&] {
    ckpt::CheckpointWriter writer(root, step, token);
    writer.writeJson("rank-1.json", {{"rng", 1000 + step}});
  });
  ckpt::CheckpointWriter writer(root, step, token);
  std::vector<ckpt::NamedTensor> tensors = {{"0.weight", TensorView::of(w.data(), {3, 1000})}};
  writer.writeTensors("model.safetensors", tensors);
  writer.writeJson("rank-0.json", {{"rng", step}});
  rank1.join();  // the trainer's barrier
  ckpt::CheckpointMeta meta;
  meta.epoch = step / 100;
  meta.samplesConsumed = step * 64 % 1000;
  meta.worldSize = 2;
  meta.specHash = specHash;
  meta.user = {{"lr", 0.05}};
  return writer.commit(meta, {.requiredFiles = {"model.safetensors", "rank-0.json", "rank-1.json"}});
}

inline void flipByte(const std::filesystem::path& file, uint64_t offset) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(offset));
  char c = 0;
  f.get(c);
  f.seekp(static_cast<std::streamoff>(offset));
  f.put(static_cast<char>(c ^ 0x5a));
}

}  // namespace dtrain::testing
