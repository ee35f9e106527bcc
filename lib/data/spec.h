// The JSON description of one dataset (a job's /data/train or /data/eval) and loading it.
//
//   {"format": "idx", "images": "train-images-idx3-ubyte.gz", "labels": "train-labels-idx1-ubyte.gz"}
//   {"format": "csv", "path": "iris.csv", "label": "species", "header": true, "delimiter": ","}
//   {"format": "npy", "features": "x.npy", "labels": "y.npy"}
//   {"format": "synthetic", "task": "regression", "samples": 1000, "features": 10, "outputs": 1, "noise": 0.01,
//    "seed": 0, "sample_seed": 0}
//   {"format": "synthetic", "task": "classification", "rule": "blobs"|"linear", "num_classes": 3, ...}
//   {"format": "text", "path": "input.txt" or [...], "vocab": "byte"|"char", "split": "train"|"val",
//    "val_fraction": 0.1, "block_size": 128}          (lib/data/sequence.h)
//   {"format": "tokens", "path": "train.bin" or [...], "block_size": 1024}
// and for every format: "scale": 0.00392156862745098 (or "1/255"), "normalize": {"mean": m, "std": s}
// (numbers or arrays: per channel or per feature), "shape": [1, 28, 28] (reshape the features), "limit": N (first
// N samples), "label_kind": "class"|"target", "num_classes": K.
//
// Parsing checks the spec and that its files exist; loading reads and checks the content. Both throw ConfigError
// "<job file>: <JSON path>: <what is wrong and what was expected>", e.g.
// "job.json: /data/train/labels: /data/t10k-labels-idx1-ubyte.gz: bad IDX magic 0x00000803 (expected 0x00000801
// for labels)". Unknown keys are errors too (a typo must not be ignored). Thread-safe; loading blocks on file I/O.
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "lib/data/dataset.h"
#include "lib/data/formats.h"
#include "lib/data/sequence.h"
#include "lib/data/synthetic.h"

namespace dtrain::data {

enum class Format : uint8_t { kIdx, kCsv, kNpy, kSynthetic, kText, kTokens };
const char* formatName(Format format);

struct DataSpec {
  Format format = Format::kSynthetic;
  std::string sourceFile;  // the job file, for messages
  std::string jsonPath;    // e.g. "/data/train"
  // Resolved file paths: idx uses images+labels, csv uses path, npy uses features+labels.
  std::string images, labels, path, features;
  CsvOptions csv;
  SyntheticOptions synthetic;
  SequenceOptions sequence;  // text, tokens (lib/data/sequence.h); blockSize 0 = the model's input length
  Transform transform;
  std::optional<Shape> shape;
  std::optional<int64_t> limit;
  std::optional<LabelKind> labelKind;
  std::optional<int64_t> numClasses;
};

// `baseDir` resolves relative paths (the job file's folder). Checks types, ranges and that files exist.
DataSpec parseDataSpec(const nlohmann::json& spec, const std::string& sourceFile, const std::string& jsonPath,
                       const std::filesystem::path& baseDir);

// Reads the files and builds the dataset (shared: the trainer and an evaluation pass may both hold it).
// `features`: ReadMode::kHeader reads only the headers of IDX/NPY feature files (their sizes checked against the
// files) and builds a dataset that answers size, shapes, labels and classes but cannot fetch(): what the launcher
// and `dtrain check` validate before any worker starts, in milliseconds. Labels are always read in full (they are
// small, and their values are what is checked). CSV is always read in full (text has no declared size).
std::shared_ptr<const Dataset> loadDataset(const DataSpec& spec, ReadMode features = ReadMode::kAll);

}  // namespace dtrain::data
