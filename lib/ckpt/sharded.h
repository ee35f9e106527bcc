// Layout-free checkpoints: tensors stored in pieces by the ranks that own them, assembled into whatever piece a
// reader's layout needs (docs/checkpoints.md "Sharded checkpoints").
//
// A piece is a float32 tensor stored under the FULL model's name ("transformer.h.0.attn.c_attn.weight", or
// "exp_avg/transformer.h.0.attn.c_attn.weight" for optimizer state) in a safetensors file. Whole tensors need no
// description. A piece that is a slice of its tensor along one dimension (tensor parallelism splits matrices by
// rows or columns) is described in the file's __metadata__ under kSlicesKey, as JSON:
//
//   "dtrain.slices": "{\"transformer.h.0.mlp.c_fc.weight\": {\"shape\": [256, 64], \"dim\": 0, \"start\": 128}}"
//
// shape: the full tensor's shape; dim: the sliced dimension; start: where the piece starts along it; the piece's
// length along `dim` is its stored shape[dim] (every other dimension is whole). So every file states exactly
// which box of which full tensor it holds. Several slices of one tensor in one file (tensor parallelism keeps
// attention's q, k and v rows of a head group as three slices of c_attn) are stored under "<name>@<dim>:<start>",
// their entry naming the tensor: {"name": "<name>", "shape": ..., "dim": ..., "start": ...}. A reader assembles any box (the whole tensor, or another slice)
// from pieces written under any other layout. Files of the older unsharded format (optimizer state as flat arenas
// in the full model's parameter order) are described to the assembler with addFlatPiece.
//
// Thread-compatible (one loading thread). Files are memory-mapped while the assembler lives. Errors:
// CheckpointError naming the file and tensor (corrupt metadata, dtype not F32, a box the pieces do not cover).
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "lib/ckpt/safetensors.h"

namespace dtrain::ckpt {

inline constexpr const char* kSlicesKey = "dtrain.slices";

// Which part of a full tensor a buffer holds: dim < 0 the whole tensor, else [start, start + length) along dim.
struct Slice {
  int dim = -1;
  int64_t start = 0;
  int64_t length = 0;
  bool whole() const { return dim < 0; }
};

// A tensor to write as a piece: its full name, a view of the piece, and the full shape and slice when it is one.
struct PieceTensor {
  std::string name;
  TensorView piece;
  Shape fullShape;  // == piece.shape when whole
  Slice slice;
};

// The NamedTensors and metadata (kSlicesKey) that store `pieces` in one safetensors file; `extra` is merged in.
// CheckpointError when a slice does not fit its full shape or disagrees with the piece's shape.
struct PieceFile {
  std::vector<NamedTensor> tensors;
  Metadata metadata;
};
PieceFile piecesToWrite(std::span<const PieceTensor> pieces, const Metadata& extra = {});

class TensorAssembler {
 public:
  TensorAssembler() = default;
  TensorAssembler(TensorAssembler&&) noexcept = default;
  TensorAssembler& operator=(TensorAssembler&&) noexcept = default;

  // Indexes every tensor of a safetensors file (whole, or a slice described in its metadata).
  void addFile(const std::filesystem::path& path);
  // A piece inside a flat tensor of an added file: `fullShape` elements starting at element `offset` of tensor
  // `stored` (the unsharded optimizer.safetensors: one [N] arena per state buffer), indexed as `name`.
  void addFlatPiece(const std::filesystem::path& path, const std::string& stored, const std::string& name,
                    int64_t offset, const Shape& fullShape);

  bool has(const std::string& name) const { return pieces_.count(name) != 0; }
  // The full shape of tensor `name` as the pieces describe it; CheckpointError when unknown.
  Shape fullShape(const std::string& name) const;
  // Copies the part `slice` of full tensor `name` (full shape `fullShape`, checked against the pieces') into
  // dst (row-major, slice.length along slice.dim). CheckpointError when the pieces do not cover it.
  void load(const std::string& name, const Shape& fullShape, const Slice& slice, std::span<float> dst) const;

 private:
  struct Piece {
    const SafetensorsFile* file = nullptr;
    const TensorInfo* info = nullptr;
    int64_t offset = 0;  // elements into the stored tensor
    Shape fullShape;
    Slice slice;
  };
  const SafetensorsFile& open(const std::filesystem::path& path);

  std::map<std::string, std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::vector<Piece>> pieces_;
};

}  // namespace dtrain::ckpt
