// Internal to lib/nn: the loss checks the CPU and CUDA losses share (loss.cpp), so both reject the same inputs with
// the same ConfigError text.
#pragma once

#include "lib/common/tensor.h"

namespace dtrain::nn::detail {

// cross_entropy needs per-sample logits [C] or [T, C].
void checkCrossEntropyOutput(const Shape& outputShape);
// One int32/int64 label per sample ([C] logits) or per position ([T, C] logits).
void checkCrossEntropyTargets(const Shape& outputShape, const Shape& perSample, DType dtype);
// float32 targets with as many values per sample as the output.
void checkMseTargets(const Shape& outputShape, const Shape& perSample, DType dtype);
// bce_with_logits needs one logit per sample ([N, 1] output).
void checkBceOutput(const Shape& outputShape);
// One 0/1 label (int32/int64) or float32 target per sample.
void checkBceTargets(const Shape& perSample, DType dtype);

}  // namespace dtrain::nn::detail
