// Model: a built sequential model with its parameters and gradients in two flat float32 arenas.
//
//   ModelSpec spec = parseModelSpec(job["model"], "job.json", "/model");
//   Model model = Model::build(spec, /*maxBatch=*/64, /*seed=*/42, Device::cpu());
//   TensorView out = model.forward(x, batch, /*train=*/true);       // x: batch * input.numel() floats
//   float l = loss->forward(out, targets);
//   model.zeroGrad();
//   model.backward(loss->backward(), [&](int layer) { /* layer's gradients are final */ });
//   optimizer->step(model.params(), model.grads());
//
// Arenas: every parameter lives in params() and its gradient at the same offset in grads(), in layer order and
// PyTorch's order inside a layer (weight, then bias), contiguous, without padding. paramTable() names each one
// exactly as torch.nn.Sequential does ("0.weight" [out, in], "0.bias", conv "k.weight" [out, in, kh, kw]), so a
// checkpoint is the arena plus that table and weights are interchangeable with PyTorch.
//
// Backward runs the layers in reverse and calls onLayerGradReady(k) right after layer k's parameter gradients
// are final (only for layers that own parameters), so a data-parallel trainer can start all-reducing the
// slice [layerParamRange(k).offset, end of arena) while layers < k are still back-propagating: backward never
// touches that slice again. The callback runs on the calling thread; it may read grads() and hand slices to
// another thread, but must not call forward/backward or write below layerParamRange(k).offset.
//
// Devices: on cuda:N (Model::build with Device::cuda(N)) the arenas, activations and layers live on that GPU:
// forward's x, the returned view, backward's gradOutput and the params()/grads() spans are device memory, which
// host code must never dereference (lib/nn/device.h has the arena operations; hostParams() gives a host copy).
// Initial weights are drawn on the host by the CPU layers and copied over, so a CPU and a GPU model built with
// the same seed start bit-identical. A GPU model built while nn::bf16ActivationsOn() stores as bf16 the outputs
// that only the next layer's bf16 GEMMs read (registry.h storesBf16Between; the model's output never is), and, when
// its last layer reads its output's gradient only as a bf16 GEMM operand (lm_head; registry.h takesBf16OutputGrad),
// takes that gradient as bf16 (outputGradType(); create the loss with it: Loss::create's gradType), which a GPU
// cross_entropy writes over the model's output (the logits) rather than into a buffer of its own.
//
// Memory: activations, gradients between layers and each layer's scratch are allocated once at build for
// maxBatch samples, and forward/backward never allocate: a smaller batch (the last one of an epoch) uses the
// front of the same buffers, and Eigen's GEMM scratch is placed on the stack (at most 512 KiB per buffer; see
// lib/nn/CMakeLists.txt). The input x and the returned output view stay valid (and x must stay unchanged)
// until the next forward, since backward reads them.
// Pipeline stages (lib/train/pipeline.h): build(..., StageOptions{first, last}) builds the top-level layers
// [first, last) of the spec under the full model's parameter names, with the initial values the whole model
// would get (the init stream is drawn through the earlier layers), and, with inputGrad, backward computes the
// gradient of the stage's input (inputGrad()). A tied lm_head whose embedding lies in an earlier stage gets a copy
// of the token table in its own arena slot (ParamEntry::replica, the embedding's name and values), and an
// embedding whose lm_head lies in a later stage is built untied; the pipeline keeps the two copies equal by
// summing their gradients. replica() builds another instance of the same layers over the same arenas, with its
// own activations and layer state: the pipeline keeps one per micro-batch in flight.
// Not thread-safe: one thread drives a model. Movable, not copyable; moving keeps the arenas in place.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <algorithm>
#include <vector>

#include "lib/common/aligned_buffer.h"
#include "lib/nn/device.h"
#include "lib/nn/layer.h"
#include "lib/nn/spec.h"
#include "lib/common/tensor.h"

namespace dtrain::nn {

struct ParamEntry {
  std::string name;  // "3.weight": the full model's name, whatever part of the model this one holds
  Shape shape;       // PyTorch's shape (of the part held here)
  size_t offset = 0; // first float in the arena
  size_t count = 0;  // floats
  int layer = 0;     // owning layer: its position in this model (== the spec index for a whole model)
  // The full tensor this entry is part of. A tensor-parallel layer (lib/nn/tensor_parallel.h) holds a slice along
  // one dimension: sliceDim >= 0, [sliceStart, sliceStart + shape[sliceDim]) of fullShape; one name may have
  // several slice entries (attention's q, k and v rows). sliceDim -1: whole (fullShape == shape), replicated over
  // the tensor group. Checkpoints record it (lib/ckpt/sharded.h).
  Shape fullShape;
  int sliceDim = -1;
  int64_t sliceStart = 0;
  bool sliced() const noexcept { return sliceDim >= 0; }
  // A copy of a parameter another pipeline stage owns (a tied lm_head's token table): loaded from checkpoints,
  // never written to them.
  bool replica = false;
};

// The parameter table of the whole model of `spec`, as Model::build would make it, without building anything
// (names, shapes, arena offsets): what a checkpoint written by any layout is indexed by.
std::vector<ParamEntry> paramTableOf(const ModelSpec& spec);

// Which part of a model to build (a pipeline stage); the default is the whole model.
struct StageOptions {
  int first = 0;        // top-level layers [first, last) of the spec
  int last = -1;        // -1: to the end
  bool inputGrad = false;  // backward also computes the gradient of the input (inputGrad())
};

struct ParamRange {
  size_t offset = 0;
  size_t count = 0;
};

// A non-owning reference to any callable `void(int layerIndex)`: it never allocates (a std::function holding a
// lambda with several captures would, on every step). The callable must outlive the backward() call, which a
// lambda written in the call's argument list does.
class LayerGradReady {
 public:
  LayerGradReady() = default;
  template <typename F>
    requires(!std::is_same_v<std::remove_cvref_t<F>, LayerGradReady> && std::is_invocable_v<F&, int>)
  LayerGradReady(F&& f) noexcept  // NOLINT(google-explicit-constructor): lambdas convert implicitly
      : object_(const_cast<void*>(static_cast<const void*>(std::addressof(f)))),
        call_([](void* o, int layer) { (*static_cast<std::remove_reference_t<F>*>(o))(layer); }) {}

  explicit operator bool() const noexcept { return call_ != nullptr; }
  void operator()(int layer) const { call_(object_, layer); }

 private:
  void* object_ = nullptr;
  void (*call_)(void*, int) = nullptr;
};

// kAccumulate adds to the gradients (PyTorch's .grad semantics: call zeroGrad() before each step, or not, to
// accumulate micro-batches); kOverwrite writes them, which saves the zeroGrad pass when not accumulating.
enum class GradMode { kAccumulate, kOverwrite };

class Model {
 public:
  // Builds layers and arenas on `device` for up to maxBatch samples and initialises parameters with PyTorch's
  // default schemes drawn from InitRng(seed) (docs/model-spec.md "Initialisation"); `seed` also seeds dropout.
  // Throws ConfigError for a maxBatch < 1, NotBuiltError for a layer without an implementation on the device
  // ("device cuda:0: layer 'conv2d' has no CUDA implementation in this build", or any cuda device in a build
  // without CUDA).
  // With a `tensor` group of more than one rank the model is this rank's tensor-parallel part
  // (lib/nn/tensor_parallel.h): the arenas hold its slices (paramTable() says which), forward/backward call the
  // group's all-reduce, and spec() stays the full model's. Throws ConfigError when the spec does not split.
  // With `stage`, the model is that pipeline stage (see above; both combine: a stage's tensor-parallel part).
  // Tensor parallelism is CPU-only so far: a GPU model with a tensor group is refused (NotBuiltError). A GPU model
  // may be a stage (its inputGrad() is then device memory), but the pipeline strategy runs on the CPU only
  // (lib/train/job_device.cpp refuses "device": "cuda" with pipeline stages before any worker starts).
  static Model build(const ModelSpec& spec, int maxBatch, uint64_t seed, Device device = Device::cpu(),
                     std::shared_ptr<TensorGroup> tensor = {}, const StageOptions& stage = {});
  // Another instance of this model's layers over the same parameter and gradient arenas, with its own
  // activations and layer state (see above). This model must outlive it and stay in place.
  Model replica() const;

  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;
  ~Model();

  // Runs the layers on `batch` samples (1..maxBatch). `train` enables dropout. The returned view points into
  // the model's buffers (or at x when the model is only flatten layers) and has shape [batch, output...]. It holds
  // the output until the next forward, or until a loss writes a bf16 gradient over it (outputGradType()).
  TensorView forward(const float* x, int batch, bool train);
  // Back-propagates gradOutput (shape [batch, output...] of the last forward; float32, packed; or bfloat16 when
  // outputGradType() is, packed or with rows further apart: TensorView::ld, the loss's gradient written over this
  // model's output, which the last layer's backward does not read) into grads().
  // Throws dtrain::Error when called without a forward or with a mismatching shape, dtype or stride.
  void backward(const TensorView& gradOutput, LayerGradReady onLayerGradReady = {},
                GradMode mode = GradMode::kAccumulate);

  // The dtype in which backward() would like gradOutput: kBFloat16 for a GPU model built with bf16 activation
  // storage on (device.h bf16ActivationsOn) whose last layer reads that gradient only as a bf16 GEMM operand
  // and whose backward ignores its output (registry.h takesBf16OutputGrad: lm_head), so the loss writes it rounded
  // (Loss::create's gradType), over the output itself (GPU cross_entropy), and no float32 copy, conversion or buffer
  // of its own of the [batch, output...] gradient exists; else kFloat32. backward() accepts float32 always.
  DType outputGradType() const noexcept { return bf16OutputGrad_ ? DType::kBFloat16 : DType::kFloat32; }

  // The gradient of the input of the last backward, shape [batch, input...]; only for a model built with
  // StageOptions::inputGrad (an empty view otherwise). Valid until the next forward/backward.
  TensorView inputGrad() const;

  std::span<float> params() noexcept { return params_; }
  std::span<const float> params() const noexcept { return params_; }
  std::span<float> grads() noexcept { return grads_; }
  std::span<const float> grads() const noexcept { return grads_; }
  size_t numParams() const noexcept { return params_.size(); }
  void zeroGrad();  // asynchronous on a GPU (ordered before the next kernel on the device's stream)

  // The parameters as host memory, for checkpoints and weight files: the arena itself on the CPU; on a GPU a host
  // copy made by this call (blocking), valid until the next. hostParamTensor(e) is entry e's view of that memory
  // (call hostParams() first on a GPU). After writing into it, uploadHostParams() copies it to the device
  // (nothing to do on the CPU). Logically const: the copy is a cache.
  std::span<float> hostParams() const;
  TensorView hostParamTensor(const ParamEntry& entry) const;
  void uploadHostParams();

  const std::vector<ParamEntry>& paramTable() const noexcept { return table_; }
  // One parameter of paramTable() as a float32 view of its slice of params() (PyTorch's shape), e.g. to save or
  // load it by name. Valid while the model lives; writable through the view even from a const model.
  TensorView paramTensor(const ParamEntry& entry) const {
    return TensorView::of(const_cast<float*>(params_.data()) + entry.offset, entry.shape, device_);
  }
  // The arena slice of layer k's parameters ({offset, 0} for parameterless layers).
  ParamRange layerParamRange(int layer) const;
  // Indices of the layers that own parameters, ascending.
  std::vector<int> paramLayers() const;

  const ModelSpec& spec() const noexcept { return spec_; }
  // Where the arenas, activations and layers live.
  Device device() const noexcept { return device_; }
  int numLayers() const noexcept { return static_cast<int>(layers_.size()); }
  Shape inputShape() const { return spec_.input; }    // per sample
  Shape outputShape() const { return spec_.output(); }  // per sample
  int maxBatch() const noexcept { return maxBatch_; }
  // The tensor group the model is split over (null when it is whole).
  const TensorGroup* tensorGroup() const noexcept { return tensor_.get(); }
  std::vector<SummaryRow> summary() const { return summarize(spec_); }
  std::string summaryTable() const { return formatSummary(spec_); }

  // Bytes of this instance's activations and inter-layer gradients (not the arenas): what each micro-batch in
  // flight costs a pipeline stage (layers' own state, e.g. attention probabilities, comes on top).
  size_t activationBytes() const noexcept {
    return (activations_.size() + gradA_.size() + gradB_.size()) * sizeof(float);
  }
  // The sparse embedding tables (layers with "sparse": true, lib/nn/sparse_rows.h), in layer order: not in the
  // arenas or paramTable(); their rows come from the SparseRows bound with bindSparseRows(), which must outlive the
  // model's forward/backward calls (a forward without one throws).
  std::vector<SparseTableInfo> sparseTables() const;
  void bindSparseRows(SparseRows* rows);
  // Reseeds the dropout layers and restarts their streams: those without a "seed" in their spec are keyed from
  // `seed` (e.g. a mix of the job seed, rank, step and micro-batch, so ranks draw different masks); those whose
  // spec fixes a "seed" from it and `position` (e.g. a mix of step and micro-batch: the same masks on every rank,
  // whatever `seed`). The same (seed, position) repeats the same masks, so a resumed run continues bit for bit.
  void reseedDropout(uint64_t seed, uint64_t position);
  // Whether any layer draws random numbers in training (a registry entry marked `random`, e.g. dropout).
  bool hasRandomLayers() const noexcept { return hasRandomLayers_; }

 private:
  Model() = default;
  void makeLayers(uint64_t seed);      // layers_ and the scratch, from parts_
  void allocateActivations();          // activations_, ownOutput_, gradA_/gradB_, in_/out_
  void bindArenas();                   // layers onto params_/grads_ at layerRanges_ (and tied tables)
  void initParams(const ModelSpec& full, int first, uint64_t seed);  // the init stream, on the host

  ModelSpec spec_;   // this model's layers with the full model's shapes (a stage's layers for a stage)
  ModelSpec parts_;  // the layers as built: spec_ sharded over the tensor group (== spec_ without one)
  uint64_t seed_ = 0;
  int tiedReplica_ = -1;  // position of a tied lm_head whose table is a replica slot in this model (else -1)
  Device device_;
  int maxBatch_ = 0;
  bool hasRandomLayers_ = false;
  std::vector<std::unique_ptr<Layer>> layers_;
  DeviceFloats paramArena_, gradArena_;  // on device_; empty in a replica()
  std::span<float> params_, grads_;      // the arenas (a replica's point at its original's)
  mutable AlignedBuffer<float> hostParams_;  // GPU models: hostParams()' copy
  std::vector<ParamEntry> table_;
  std::vector<ParamRange> layerRanges_;
  std::vector<bool> needsInputGrad_;  // some earlier layer has parameters
  DeviceFloats activations_;  // every non-aliasing layer's output, maxBatch samples each
  std::vector<float*> ownOutput_;     // per layer: its slice of activations_ (null when aliasing)
  std::vector<char> bf16Outputs_;     // per layer: 1 when its output is stored as bf16 (registry.h storesBf16Between)
  bool bf16OutputGrad_ = false;       // the last layer takes its dy as bf16 (registry.h takesBf16OutputGrad)
  DeviceFloats gradA_, gradB_;  // ping-pong buffers for gradients between layers
  std::unique_ptr<SharedScratch> scratch_;  // scratch the blocks and attention layers share, on the model's device
  std::shared_ptr<TensorGroup> tensor_;     // the layers' tensor group (null: not tensor-parallel)
  std::vector<const float*> in_;      // per layer: its input in the last forward
  std::vector<float*> out_;           // per layer: its output in the last forward
  int lastBatch_ = 0;
  bool inputGradWanted_ = false;
  const float* inputGrad_ = nullptr;
};

}  // namespace dtrain::nn
