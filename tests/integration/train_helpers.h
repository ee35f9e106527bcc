// Helpers for trainer integration tests: a small synthetic job, an independent safetensors reader, metrics.
#pragma once

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "tests/support/process.h"

namespace dtrain::testing {

// A classification job on synthetic data, small enough for a test, with dropout (so exact resume has to
// reproduce the masks too).
inline nlohmann::json smallJob(int samples = 96, int batch = 8, int epochs = 2) {
  return nlohmann::json::parse(fmt::format(R"({{
  "model": {{"input": [6], "layers": [{{"type": "linear", "out": 16}}, {{"type": "tanh"}}, {{"type": "dropout", "p": 0.2}},
                                     {{"type": "linear", "out": 3}}]}},
  "loss": {{"type": "cross_entropy"}},
  "data": {{"train": {{"format": "synthetic", "task": "classification", "samples": {}, "features": 6, "num_classes": 3,
                      "seed": 5}},
           "eval": {{"format": "synthetic", "task": "classification", "samples": 50, "features": 6, "num_classes": 3,
                    "seed": 5, "sample_seed": 9}},
           "batch_size": {}, "shuffle": true}},
  "optimizer": {{"type": "adam", "lr": 0.01}},
  "train": {{"epochs": {}, "seed": 11, "log_every": 1}},
  "checkpoint": {{"every_steps": 3, "keep": 2}}
}})",
                                           samples, batch, epochs));
}

// A minimal safetensors reader, independent of lib/ckpt: name -> raw little-endian bytes. With `dtype`, every
// tensor must have it.
inline std::map<std::string, std::string> readTensorsRaw(const std::string& path, const char* dtype = nullptr) {
  std::string bytes = readFile(path);
  REQUIRE(bytes.size() >= 8);
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  REQUIRE(8 + n <= bytes.size());
  auto header = nlohmann::json::parse(bytes.substr(8, n));
  std::map<std::string, std::string> out;
  for (auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    if (dtype != nullptr) REQUIRE(info["dtype"] == dtype);
    auto begin = info["data_offsets"][0].get<size_t>(), end = info["data_offsets"][1].get<size_t>();
    out[name] = bytes.substr(8 + n + begin, end - begin);
  }
  return out;
}

// readTensorsRaw for F32 tensors, as float values.
inline std::map<std::string, std::vector<float>> readTensorsF32(const std::string& path) {
  std::map<std::string, std::vector<float>> out;
  for (auto& [name, bytes] : readTensorsRaw(path, "F32")) {
    std::vector<float> v(bytes.size() / sizeof(float));
    std::memcpy(v.data(), bytes.data(), v.size() * sizeof(float));
    out[name] = std::move(v);
  }
  return out;
}

// An exported model (docs/checkpoints.md "Sparse tables"): model.safetensors, and each sparse table assembled from
// the row shards model.safetensors.index.json lists (the pieces in row order, each checked to start where the last
// ended and to cover the table).
inline std::map<std::string, std::vector<float>> readExportedModel(const std::string& dir) {
  auto out = readTensorsF32(dir + "/model.safetensors");
  if (!std::filesystem::exists(dir + "/model.safetensors.index.json")) return out;
  const auto index = nlohmann::json::parse(readFile(dir + "/model.safetensors.index.json"));
  for (const auto& [name, file] : index.at("weight_map").items())
    if (!out.count(name)) throw std::runtime_error("index names " + name + " in " + file.dump() + ", not found");
  for (const auto& [name, t] : index.at("row_shards").items()) {
    const int64_t rows = t.at("shape")[0].get<int64_t>(), dim = t.at("shape")[1].get<int64_t>();
    std::vector<float> table;
    for (const auto& f : t.at("files")) {
      if (f.at("start").get<int64_t>() * dim != static_cast<int64_t>(table.size()))
        throw std::runtime_error("row shards of " + name + " out of order");
      auto piece = readTensorsF32(dir + "/" + f.at("file").get<std::string>()).at(name);
      if (static_cast<int64_t>(piece.size()) != f.at("rows").get<int64_t>() * dim)
        throw std::runtime_error("row shard of " + name + " has the wrong size");
      table.insert(table.end(), piece.begin(), piece.end());
    }
    if (static_cast<int64_t>(table.size()) != rows * dim) throw std::runtime_error("row shards do not cover " + name);
    out[name] = std::move(table);
  }
  return out;
}

inline std::vector<nlohmann::json> readJsonLines(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::istringstream in(readFile(path));
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  return out;
}

}  // namespace dtrain::testing
