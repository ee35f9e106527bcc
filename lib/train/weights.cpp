#include "lib/train/weights.h"

#include "lib/common/error.h"

namespace dtrain::train {

std::vector<ckpt::TensorView> parameterTensors(const nn::Model& model) {
  std::vector<ckpt::TensorView> out;
  auto params = model.params();
  for (const auto& p : model.paramTable())
    out.push_back({p.name, ckpt::DType::kF32, p.shape.toVector(), params.data() + p.offset});
  return out;
}

void saveWeights(const std::filesystem::path& path, const nn::Model& model) {
  auto tensors = parameterTensors(model);
  ckpt::writeSafetensorsFile(path, tensors, {{"format", "pt"}, {"producer", "dtrain"}});
}

void loadWeights(const std::filesystem::path& path, nn::Model& model) {
  auto file = ckpt::SafetensorsFile::open(path);
  auto params = model.params();
  for (const auto& p : model.paramTable()) {
    std::span<std::byte> dst(reinterpret_cast<std::byte*>(params.data() + p.offset), p.count * sizeof(float));
    file.readInto(p.name, ckpt::DType::kF32, p.shape.toVector(), dst);
  }
  DTRAIN_CHECK_AS(CheckpointError, file.tensors().size() == model.paramTable().size(),
                  "{}: holds {} tensors but the model has {} parameters (names such as {})", path.string(),
                  file.tensors().size(), model.paramTable().size(), model.paramTable().front().name);
}

}  // namespace dtrain::train
