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
std::string formatList(const std::filesystem::path& root, const std::vector<CheckpointInfo>& checkpoints);
nlohmann::json listToJson(const std::vector<CheckpointInfo>& checkpoints);

// `target` may be a checkpoint root (its newest valid checkpoint, else its newest entry), a step-<N> dir, a
// .safetensors file, or a sharded model's index (model.safetensors.index.json: Hugging Face's "weight_map" and
// dtrain's "row_shards" for tables split by rows, docs/checkpoints.md): its status (every file present, every
// table's row shards contiguous and covering it) and every file's tensors. Throws CheckpointError when there is
// nothing to inspect. `complete` (optional) is set to whether what was inspected is usable as it is: a checkpoint
// whose status is complete, an index whose files are all there and whose row shards cover their tables, or a
// .safetensors file that opens (a partial, corrupt or staging checkpoint, or an incomplete index: false).
std::string formatInspect(const std::filesystem::path& target, bool verifyChecksums, bool* complete = nullptr);
nlohmann::json inspectToJson(const std::filesystem::path& target, bool verifyChecksums, bool* complete = nullptr);

}  // namespace dtrain::ckpt
