// The column reductions' partial sums (kernels_reduce.cu, reduce_index.h): one device buffer per host thread and
// GPU, grown to the largest request and then kept, so a training step allocates nothing after its first one (the
// shapes repeat). Ordering: kernels on the legacy default stream use it one call after another, so a call's pass 2
// has read the partials before the next call's pass 1 overwrites them (stream order); growing frees the old buffer,
// which waits for the device first (cudaFree synchronises), so no kernel still reads it.
// Plain C++ header (no CUDA header): the .cu sources call it, workspace.cpp owns it.
// Errors: GpuError when the allocation fails.
#pragma once

#include <cstddef>

namespace dtrain::gpu {

// At least `floats` floats of device memory on the calling thread's current GPU; valid until the next call on this
// thread with a larger request. Sizes in use: at most kReduceMaxChunks x 2 x the widest reduced row (LayerNorm's
// two gradients), e.g. 128 x 3072 floats (1.5 MB) for a GPT-2-small fc bias.
float* reduceScratch(size_t floats);

}  // namespace dtrain::gpu
