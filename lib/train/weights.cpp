#include "lib/train/weights.h"

#include "lib/common/error.h"

namespace dtrain::train {

std::vector<ckpt::NamedTensor> parameterTensors(const nn::Model& model, std::span<const size_t> indices) {
  std::vector<ckpt::NamedTensor> out;
  for (size_t i : indices) {
    const auto& p = model.paramTable().at(i);
    out.push_back({p.name, model.paramTensor(p)});
  }
  return out;
}

std::vector<ckpt::NamedTensor> parameterTensors(const nn::Model& model) {
  std::vector<ckpt::NamedTensor> out;
  for (const auto& p : model.paramTable()) out.push_back({p.name, model.paramTensor(p)});
  return out;
}

void saveWeights(const std::filesystem::path& path, const nn::Model& model) {
  auto tensors = parameterTensors(model);
  ckpt::writeSafetensorsFile(path, tensors, {{"format", "pt"}, {"producer", "dtrain"}});
}

void loadWeights(const std::filesystem::path& path, nn::Model& model) {
  auto file = ckpt::SafetensorsFile::open(path);
  for (const auto& p : model.paramTable()) file.readInto(p.name, model.paramTensor(p));
  DTRAIN_CHECK_AS(CheckpointError, file.tensors().size() == model.paramTable().size(),
                  "{}: holds {} tensors but the model has {} parameters (names such as {})", path.string(),
                  file.tensors().size(), model.paramTable().size(), model.paramTable().front().name);
}

}  // namespace dtrain::train
