// Model weights as safetensors, with torch.nn.Sequential's names ("0.weight" [out, in], ...), so PyTorch,
// numpy and the safetensors library read what dtrain writes and dtrain starts from what they wrote.
#pragma once

#include <filesystem>
#include <span>
#include <vector>

#include "lib/ckpt/safetensors.h"
#include "lib/nn/model.h"

namespace dtrain::train {

// The model's parameters as tensors to write, pointing into the arena (valid while the model lives).
std::vector<ckpt::NamedTensor> parameterTensors(const nn::Model& model);
// The same for the parameters at `indices` of paramTable() (in the order given).
std::vector<ckpt::NamedTensor> parameterTensors(const nn::Model& model, std::span<const size_t> indices);
// Writes model.safetensors durably (temporary name, fsync, rename): the parameters, then `extra` tensors (a sparse
// embedding's table, which is not in the arena).
void saveWeights(const std::filesystem::path& path, const nn::Model& model,
                 std::span<const ckpt::NamedTensor> extra = {});
// Loads every parameter by name with shape checks (CheckpointError naming the tensor); extra tensors in the
// file are an error too, so a weights file for another model is never half-loaded. For a gpt preset model it also
// reads a Hugging Face GPT-2 model.safetensors ("h.0.attn.c_attn.weight", Conv1D weights [in, out], transposed
// here; the attention mask buffers and lm_head.weight are skipped; a longer wpe is cropped to block_size).
void loadWeights(const std::filesystem::path& path, nn::Model& model);
// For a part of a model (a pipeline stage, a tensor-parallel slice): loads each parameter it holds, by full name
// and slice (ParamEntry), from a file of the whole model; the file's other tensors are not this part's and are
// ignored. CheckpointError on a missing tensor or a shape mismatch.
void loadWeightsByName(const std::filesystem::path& path, nn::Model& model);

}  // namespace dtrain::train
