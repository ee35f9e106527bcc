#include "lib/train/weights.h"

#include "lib/ckpt/sharded.h"
#include "lib/common/error.h"

#include <algorithm>
#include <string_view>

namespace dtrain::train {

// Host views: a GPU model's parameters are staged into host memory first (Model::hostParams).
std::vector<ckpt::NamedTensor> parameterTensors(const nn::Model& model, std::span<const size_t> indices) {
  std::vector<ckpt::NamedTensor> out;
  model.hostParams();
  for (size_t i : indices) {
    const auto& p = model.paramTable().at(i);
    out.push_back({p.name, model.hostParamTensor(p)});
  }
  return out;
}

std::vector<ckpt::NamedTensor> parameterTensors(const nn::Model& model) {
  std::vector<ckpt::NamedTensor> out;
  model.hostParams();
  for (const auto& p : model.paramTable()) out.push_back({p.name, model.hostParamTensor(p)});
  return out;
}

void saveWeights(const std::filesystem::path& path, const nn::Model& model, std::span<const ckpt::NamedTensor> extra) {
  auto tensors = parameterTensors(model);
  tensors.insert(tensors.end(), extra.begin(), extra.end());
  ckpt::writeSafetensorsFile(path, tensors, {{"format", "pt"}, {"producer", "dtrain"}});
}

namespace {

bool endsWith(const std::string& s, std::string_view tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// A Hugging Face GPT-2 checkpoint (transformers' GPT2Model / GPT2LMHeadModel model.safetensors): names without
// nanoGPT's "transformer." prefix (or with it, from the LM-head model) and Conv1D weights stored [in, out].
// Recognised when the model is a gpt preset (it has transformer.h.0.attn.c_attn.weight [3C, C]) and the file's
// first block's c_attn weight is [C, 3C].
const ckpt::TensorInfo* hfTensor(const ckpt::SafetensorsFile& file, const std::string& ourName) {
  const std::string bare = ourName.substr(std::string_view("transformer.").size());
  if (const auto* t = file.find(bare)) return t;
  return file.find(ourName);
}

bool isHfGpt2(const ckpt::SafetensorsFile& file, const nn::Model& model) {
  const nn::ParamEntry* ours = nullptr;
  for (const auto& p : model.paramTable())
    if (p.name == "transformer.h.0.attn.c_attn.weight") ours = &p;
  if (ours == nullptr) return false;
  const auto* t = hfTensor(file, ours->name);
  return t != nullptr && t->shape.rank() == 2 && t->shape[0] == ours->shape[1] && t->shape[1] == ours->shape[0] &&
         t->shape[0] != t->shape[1];
}

void loadHfGpt2(const ckpt::SafetensorsFile& file, nn::Model& model, const std::string& path) {
  for (const auto& p : model.paramTable()) {
    const auto* t = p.name.rfind("transformer.", 0) == 0 ? hfTensor(file, p.name) : nullptr;
    DTRAIN_CHECK_AS(CheckpointError, t != nullptr,
                    "{}: a Hugging Face GPT-2 file without tensor '{}' (or '{}'), needed for the model's '{}'", path,
                    p.name.substr(12), p.name, p.name);
    DTRAIN_CHECK_AS(CheckpointError, t->dtype == DType::kFloat32, "{}: tensor '{}' is {}, expected F32", path, t->name,
                    dtypeName(t->dtype));
    const auto* src = reinterpret_cast<const float*>(file.data(*t).data());
    float* dst = static_cast<float*>(model.hostParamTensor(p).data);  // loadWeights staged the host copy
    const bool conv1d = endsWith(p.name, "attn.c_attn.weight") || endsWith(p.name, "attn.c_proj.weight") ||
                        endsWith(p.name, "mlp.c_fc.weight") || endsWith(p.name, "mlp.c_proj.weight");
    if (conv1d) {
      // Conv1D holds [in, out]; nn.Linear (ours) [out, in].
      const int64_t out = p.shape[0], in = p.shape[1];
      DTRAIN_CHECK_AS(CheckpointError, t->shape == Shape({in, out}),
                      "{}: tensor '{}' has shape {}, expected the Conv1D layout [{}, {}] of the model's '{}'", path,
                      t->name, t->shape.spaced(), in, out, p.name);
      for (int64_t i = 0; i < in; ++i)
        for (int64_t o = 0; o < out; ++o) dst[o * in + i] = src[i * out + o];
    } else if (endsWith(p.name, "wpe.weight") && t->shape.rank() == 2 && t->shape[1] == p.shape[1] &&
               t->shape[0] >= p.shape[0]) {
      // A shorter block_size takes the first positions (nanoGPT's crop_block_size).
      std::copy(src, src + p.count, dst);
    } else {
      DTRAIN_CHECK_AS(CheckpointError, t->shape == p.shape, "{}: tensor '{}' has shape {}, expected {} for '{}'", path,
                      t->name, t->shape.spaced(), p.shape.spaced(), p.name);
      std::copy(src, src + p.count, dst);
    }
  }
  // Buffers and the tied head carry no parameters of their own; anything else means another architecture.
  for (const auto& t : file.tensors()) {
    if (endsWith(t.name, ".attn.bias") || endsWith(t.name, ".attn.masked_bias") || t.name == "lm_head.weight") continue;
    bool known = false;
    for (const auto& p : model.paramTable())
      known = known || t.name == p.name || "transformer." + t.name == p.name;
    DTRAIN_CHECK_AS(CheckpointError, known, "{}: tensor '{}' has no place in this model (is it a GPT-2 with n_layer "
                    "and n_embd as in the job?)", path, t.name);
  }
}

}  // namespace

void loadWeights(const std::filesystem::path& path, nn::Model& model) {
  auto file = ckpt::SafetensorsFile::open(path);
  // Into host memory, then onto the model's device (nothing to copy on the CPU).
  model.hostParams();
  if (isHfGpt2(file, model)) {
    loadHfGpt2(file, model, path.string());
    model.uploadHostParams();
    return;
  }
  for (const auto& p : model.paramTable()) file.readInto(p.name, model.hostParamTensor(p));
  model.uploadHostParams();
  // An older export of a model with sparse tables held them here too: they are not parameters of the arena (the
  // tables' holders read them, sparse_shards.h).
  size_t tables = 0;
  for (const auto& t : model.sparseTables()) tables += file.find(t.name) != nullptr ? 1 : 0;
  DTRAIN_CHECK_AS(CheckpointError, file.tensors().size() - tables == model.paramTable().size(),
                  "{}: holds {} tensors but the model has {} parameters (names such as {})", path.string(),
                  file.tensors().size(), model.paramTable().size(), model.paramTable().front().name);
}

void loadWeightsByName(const std::filesystem::path& path, nn::Model& model) {
  ckpt::TensorAssembler file;
  file.addFile(path);
  const std::span<float> host = model.hostParams();  // the arena itself on the CPU
  for (const auto& p : model.paramTable()) {
    // Named as loadWeights does: the file, and the tensor the model needs from it (another model's weights).
    DTRAIN_CHECK_AS(CheckpointError, file.has(p.name), "{}: no tensor named '{}'", path.string(), p.name);
    const ckpt::Slice slice =
        p.sliceDim < 0 ? ckpt::Slice{} : ckpt::Slice{.dim = p.sliceDim, .start = p.sliceStart, .length = p.shape[p.sliceDim]};
    file.load(p.name, p.fullShape.empty() ? p.shape : p.fullShape, slice, host.subspan(p.offset, p.count));
  }
  model.uploadHostParams();
}

}  // namespace dtrain::train
