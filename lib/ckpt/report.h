// What `dtrain ckpt list` and `dtrain ckpt inspect` print (apps/dtrain/cmd_ckpt.cpp only parses the command
// line). Text for people, JSON for scripts. Read-only; blocks on file I/O.
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>
#include <string>
#include <vector>

#include "lib/ckpt/checkpoint.h"

namespace dtrain::ckpt {

// Table: STEP EPOCH SAMPLES WORLD SIZE CREATED STATUS (with the reason when not complete). The text forms show
// the epoch counted from 1, as the trainer's progress lines and its "resumed from" line do (meta.json and the
// JSON forms keep CheckpointMeta::epoch, counted from 0).
//
// A checkpoint an epoch's end wrote is stored as the next epoch's start (epoch e + 1, 0 samples consumed: where a
// resume begins). The text forms say what it is, "end of epoch E" (EPOCH E, SAMPLES "all"), so that the last
// checkpoint of a 2-epoch run does not read as "epoch 3".
std::string formatList(const std::filesystem::path& root, const std::vector<CheckpointInfo>& checkpoints);
nlohmann::json listToJson(const std::vector<CheckpointInfo>& checkpoints);

// `target` may be a checkpoint root (its newest valid checkpoint, else its newest entry), a step-<N> dir, a
// .safetensors file, or a sharded model's index (model.safetensors.index.json: Hugging Face's "weight_map" and
// dtrain's "row_shards" for tables split by rows, docs/checkpoints.md): its status (every file present, every
// table's row shards contiguous and covering it) and every file's tensors. Throws CheckpointError when there is
// nothing to inspect. `complete` (optional) is set to whether what was inspected is usable as it is: a checkpoint
// whose status is complete, an index whose files are all there and whose row shards cover their tables, or a
// .safetensors file that opens (a partial, corrupt or staging checkpoint, or an incomplete index: false). Sizes:
// each total as `ckpt list` writes it (parse::formatBytes), the rows under it (files, tensors) in that total's unit
// with one decimal ("<0.1 MiB" below), so that a column is in one unit.
std::string formatInspect(const std::filesystem::path& target, bool verifyChecksums, bool* complete = nullptr);
nlohmann::json inspectToJson(const std::filesystem::path& target, bool verifyChecksums, bool* complete = nullptr);

// Where a checkpoint stands in the run, for people: "epoch 2, 400 samples of it done", or "end of epoch 1" for an
// epoch's end (stored as epoch 1 counted from 0 with 0 samples: the next epoch's start). `epoch` counted from 0, as
// in CheckpointMeta.
std::string positionText(int64_t epoch, int64_t samplesConsumed);
bool atEpochEnd(int64_t epoch, int64_t samplesConsumed);

}  // namespace dtrain::ckpt
