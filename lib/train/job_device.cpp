// A job on a GPU ("device": "cuda"): what this build runs there, checked before any worker starts (docs/gpu.md).
// Split from job.cpp.
#include <cstdlib>
#include <functional>

#include "lib/common/error.h"
#include "lib/nn/device.h"
#include "lib/nn/registry.h"
#include "lib/train/compression.h"
#include "lib/train/job_fields.h"

namespace dtrain::train {

namespace detail {

// What the CUDA path supports today (docs/gpu.md "What runs on a GPU"): DDP over nccl (data parallelism only), with
// every gradient compression. The model-parallel and parameter-server strategies move host buffers (pipeline
// activations, tensor-group all-reduces inside the layers, push/pull frames), so they stay on the CPU for now.
void checkCudaJob(const Job& job, const std::string& src) {
  DTRAIN_CHECK_AS(ConfigError, job.parallel.backend == "auto" || job.parallel.backend == "nccl",
                  "{}: /parallel/backend: '{}' cannot carry GPU gradients; with \"device\": \"cuda\" use \"auto\" or "
                  "\"nccl\"",
                  src, job.parallel.backend);
  DTRAIN_CHECK_AS(ConfigError, job.parallel.strategy == "ddp",
                  "{}: /parallel/strategy: '{}' runs on the CPU only in this build; \"device\": \"cuda\" supports "
                  "\"ddp\"",
                  src, job.parallel.strategy);
  DTRAIN_CHECK_AS(ConfigError, job.parallel.pipeline.stages == 1,
                  "{}: /parallel/pipeline/stages: {} pipeline stages run on the CPU only in this build; \"device\": "
                  "\"cuda\" supports data parallelism (stages 1) or use \"device\": \"cpu\"",
                  src, job.parallel.pipeline.stages);
  DTRAIN_CHECK_AS(ConfigError, job.parallel.tensor == 1,
                  "{}: /parallel/tensor: tensor parallelism ({} ranks) runs on the CPU only in this build; \"device\": "
                  "\"cuda\" supports \"tensor\": 1, or use \"device\": \"cpu\"",
                  src, job.parallel.tensor);
  // Every compression runs with cuda, on the device: fp16/bf16 (CastHook), PowerSGD (nn::PowerSgdOps), top-k
  // (nn::TopKOps); DTRAIN_COMPRESSION_HOST_STAGING=1 stages top-k and PowerSGD through host memory instead
  // (CompressionHook's host staging; stagedThroughHost in compression.h).
  // A value of that variable other than 0/1/true/false/yes/no/on/off: exit 3 here, before any worker starts.
  if (job.parallel.compression) (void)stagedThroughHost(job.parallel.compression->type);
  // Every loss (cross_entropy, mse, bce_with_logits) and optimizer (sgd, adam, adamw, adagrad) has a CUDA
  // implementation (lib/nn/cuda); a type added later without one fails in its device factory (NotBuiltError).
  // Every layer needs a CUDA implementation: name the first that has none, before any worker starts.
  std::function<void(const nn::LayerSpec&)> check = [&](const nn::LayerSpec& l) {
    DTRAIN_CHECK_AS(ConfigError, l.kind != nullptr && l.kind->cuda != nullptr,
                    "{}: {}: layer '{}' has no CUDA implementation yet (\"device\": \"cuda\"); see docs/gpu.md for "
                    "the layers that have one",
                    job.modelSource, l.path, l.type());
    for (const auto& c : l.children) check(c);
  };
  for (const auto& l : job.model.layers) check(l);
}

// "attention": "fused" on a GPU: every causal_self_attention layer must be one the fused kernels cover ("auto"
// would quietly run the matmul path for the others; asking for "fused" means asking to know).
void checkFusedAttention(const Job& job, const std::string& src) {
  std::function<void(const nn::LayerSpec&)> check = [&](const nn::LayerSpec& l) {
    if (l.type() == "causal_self_attention") {
      const std::string gap = nn::fusedAttentionGap(l);
      DTRAIN_CHECK_AS(ConfigError, gap.empty(),
                      "{}: /attention: \"fused\" cannot run {} ({}: {}); use \"auto\" (the fused kernels where they "
                      "cover a layer, the matmul path elsewhere) or \"matmul\"",
                      src, l.path, l.type(), gap);
    }
    for (const auto& c : l.children) check(c);
  };
  for (const auto& l : job.model.layers) check(l);
}

}  // namespace detail

void checkGpusForWorkers(const Job& job, int localWorkers, int visibleGpus) {
  if (!job.device.isCuda() || localWorkers <= visibleGpus) return;
  const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
  DTRAIN_THROW(ConfigError,
               "{}: /device: \"cuda\" needs one GPU per local worker: {} local worker(s) but {} GPU(s) visible ({}); "
               "lower --nproc-per-node (or use --nproc-per-node gpu), or set \"device\": \"cpu\"",
               job.sourceFile, localWorkers, visibleGpus,
               visible != nullptr ? fmt::format("CUDA_VISIBLE_DEVICES={}", visible)
                                  : std::string(visibleGpus == 0 ? "no CUDA driver or device found"
                                                                 : "CUDA_VISIBLE_DEVICES is not set"));
}

}  // namespace dtrain::train
