// The trainer's side of tensor parallelism (lib/nn/tensor_parallel.h has the layers and the split): the layers'
// TensorGroup over the rank's tensor communicator, the gradient norm of a model held in parts, and which
// parameters a rank writes to checkpoints. docs/parallelism.md describes the whole.
// Thread-compatible: the trainer's thread only. Collective functions must be called by every rank of the named
// group in the same order; errors are the communicator's (comm::CommError).
#pragma once

#include <filesystem>
#include <memory>
#include <span>
#include <vector>

#include "lib/comm/backend.h"
#include "lib/nn/model.h"
#include "lib/nn/tensor_parallel.h"

namespace dtrain::train {

// The layers' all-reduce over `tensor` (a float32 sum, in place, blocking with the communicator's timeout).
std::shared_ptr<nn::TensorGroup> tensorGroupOver(comm::BackendPtr tensor, int rank, int size);

// The model's global L2 gradient norm (each parameter of the whole model once, as torch's clip_grad_norm_ over
// the unsplit model): this rank's sliced parameters plus, on tensor rank 0 only, the replicated ones, summed over
// `groups` in turn (the tensor group, then the pipeline group when stages hold parts; null groups are skipped).
// Collective over those groups. Replicas of the data group hold the same gradients after their all-reduce, so it
// is not summed over.
double partsGradNorm(const nn::Model& model, bool countReplicated, std::span<const comm::BackendPtr> groups);

// The parameters (indices into paramTable()) a tensor rank writes to a sharded checkpoint: its slices, and the
// replicated parameters only on tensor rank 0, so every element of the full model is written exactly once.
std::vector<size_t> tensorSaveParams(const nn::Model& model, int tensorRank);

// Collective over `tensor`: writes the full, unsplit model to `path` as safetensors (torch.nn names and shapes,
// as saveWeights), from the tensor ranks' slices, gathered one entry at a time so no rank ever holds more than
// the largest full tensor twice. Only `writer` (a tensor rank, normally 0) writes; the file appears atomically
// (temporary name, fsync, rename). The model must be this group's (same table on every rank, splits even).
void exportTensorParallel(const nn::Model& model, comm::Backend& tensor, bool writer,
                          const std::filesystem::path& path);

}  // namespace dtrain::train
