// Sparse embedding tables on disk, written and read by their holders (docs/checkpoints.md "Sparse tables"): each
// parameter server writes its own row range of every table straight into the checkpoint (or the exported model)
// and, on a resume, reads only the rows it now owns from whichever files cover them. So no process ever holds a
// whole table: not worker 0 at a checkpoint or at the end, not a server on a resume with another server count.
//
// A holder's file ("sparse-00001-of-00002.safetensors" in a checkpoint, "model-00001-of-00002.safetensors" beside
// the exported model.safetensors) stores each table's rows as a *piece* of the full tensor in the sharded-checkpoint
// form of lib/ckpt/sharded.h: under the table's parameter name ("0.wte.weight", shape [rows held, dim]) with its
// full shape and first row in the file's "dtrain.slices" metadata, so any reader (ckpt::TensorAssembler) assembles
// any row range from the pieces of any split. A checkpoint's file also holds the optimizer state rows as
// "<buffer>/<name>" ("exp_avg/0.wte.weight") and the table's optimizer step count in the metadata
// ("steps/<name>"). The older checkpoints' sparse.safetensors (every table whole, written by worker 0) and an older
// model.safetensors holding the table are read the same way (a whole tensor is a piece covering every row).
//
// The exported model's shards are listed in model.safetensors.index.json, the index file Hugging Face writes beside
// sharded checkpoints: "weight_map" maps every whole tensor (the dense parameters) to its file, and "row_shards"
// maps each sparse table to the files holding its rows, in row order, with each file's first row and row count
// (Hugging Face's format has no tensor split over files; a torch user concatenates the pieces along dim 0).
// Threading: none (the server calls these under its mutex). Errors: CheckpointError naming the file and tensor.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "lib/ckpt/sharded.h"
#include "lib/train/ps_sparse.h"

namespace dtrain::train {

inline constexpr const char* kModelIndexFile = "model.safetensors.index.json";

// Holder k's (0-based) file of `holders`: "sparse-0000<k+1>-of-0000<holders>.safetensors" in a checkpoint,
// "model-0000<k+1>-of-0000<holders>.safetensors" beside the exported model (Hugging Face's shard names).
std::string sparseShardName(int holder, int holders);
std::string modelShardName(int holder, int holders);
// A checkpoint file that holds sparse rows: sparse.safetensors (older checkpoints) or sparse-*-of-*.safetensors.
bool isSparseCheckpointFile(const std::string& name);

// One holder's rows of one table.
struct HeldTable {
  std::string name;               // the table's parameter name ("0.wte.weight")
  int64_t rows = 0;               // rows of the whole table
  ps::SparseShard* shard = nullptr;  // the holder's rows (shard->range()) with their optimizer state
};

// The file a holder writes: every table's rows as a slice along dim 0 of its full [rows, dim] tensor (tables with
// no rows on this holder are left out), with the optimizer state rows when `withState`; metadata "steps/<name>"
// (the table's optimizer steps), "dtrain.holder" ("1 of 2"). The views point into the shards (no copy).
ckpt::PieceFile heldPieces(std::span<const HeldTable> tables, int holder, int holders, bool withState);

// Fills each table's shard with its rows (shard->range()) from the pieces in `files`, and with `withState` its
// optimizer state rows and step count ("steps/<name>": the largest among the files holding the table); without,
// the state is left as it is (fresh) and the step count at 0. Only the held rows' pages of the files are read.
// CheckpointError when the files lack a table or do not cover its rows.
void loadHeldRows(std::span<const std::filesystem::path> files, std::span<const HeldTable> tables, bool withState);

// A sparse table of the exported model, for the index.
struct IndexedTable {
  std::string name;
  int64_t rows = 0;
  int dim = 0;
};
// model.safetensors.index.json for a model whose dense parameters `dense` are in model.safetensors and whose tables
// are split over `holders` model shards as ps::planRowRanges(rows, holders) cuts them. `totalBytes`: the files' sum.
nlohmann::json modelIndex(std::span<const std::string> dense, std::span<const IndexedTable> tables, int holders,
                          uint64_t totalBytes);
// The files of `index` (read from `indexPath`) that hold sparse rows, as paths beside it.
std::vector<std::filesystem::path> indexShardFiles(const std::filesystem::path& indexPath);

// What init.from names, for a model with sparse tables: the file of the dense parameters (model.safetensors beside
// an index file given as init.from, else the file itself) and the files holding the tables' rows (the index's
// shards, when init.from is an index or a model.safetensors with one beside it; else the file itself, as an older
// model.safetensors held the tables whole).
std::filesystem::path denseWeightsFile(const std::filesystem::path& initFrom);
std::vector<std::filesystem::path> sparseWeightFiles(const std::filesystem::path& initFrom);

}  // namespace dtrain::train
