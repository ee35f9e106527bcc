// The layer registry: every layer type dtrain knows, one entry each, and the factory that builds a layer for a
// device. The model spec parser, parameter counts, the `dtrain check` summary and Model::build all ask the
// registry; nothing else switches on a layer type.
//
// Adding a layer type is its implementation file plus its line in the registry's table (registry.cpp):
//
//   // lib/nn/layers_swish.cpp (and add it to lib/nn/CMakeLists.txt)
//   namespace {
//   class Swish final : public Layer { ... forward/backward over raw row-major floats ... };
//   void parseSwish(const JsonFields& f, LayerSpec& s) { f.allowOnly({"type"}); s.output = s.input; }
//   std::unique_ptr<Layer> makeSwish(const LayerSpec& s, const LayerBuild&) { return std::make_unique<Swish>(s); }
//   }  // namespace
//   const LayerKind& swishKind() {
//     static constexpr LayerKind kind{.name = "swish", .parse = parseSwish, .cpu = makeSwish,
//                                     .exampleLayer = R"({"type": "swish"})", .exampleInput = "[4]"};
//     return kind;
//   }
//   // lib/nn/registry.cpp: declare `const LayerKind& swishKind();` and add &swishKind() to the table.
//
// A layer with parameters also gives paramShapes (PyTorch's names and shapes, in PyTorch's order): it is the one
// source of every parameter count (spec, summary, arenas, checkpoints). Entries are constant data (constant-
// initialised, so usable at any time) and thread-safe to read.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "lib/common/aligned_buffer.h"
#include "lib/common/tensor.h"
#include "lib/nn/attention_kernel.h"
#include "lib/nn/device.h"
#include "lib/nn/spec.h"

namespace dtrain {
class JsonFields;  // lib/common/json_fields.h
}  // namespace dtrain

namespace dtrain::nn {

class Layer;
class TensorGroup;  // lib/nn/tensor_parallel.h

// Which layers a memory estimate is for: the CPU's, or the CUDA ones (whose attention keeps what its kernel choice
// needs: attention_kernel.h).
struct MemoryTarget {
  bool cuda = false;
  AttentionKernel attention = AttentionKernel::kAuto;
  // "precision": "bf16" on a GPU, with bf16 activation storage (storesBf16Between; setBf16Activations in device.h):
  // the outputs that only bf16 GEMMs read are 2-byte values, and so are the matmul attention's q, k, v and heads.
  bool bf16 = false;
};

// A named parameter of a layer: "weight" or "bias" (PyTorch's attribute name) and its shape. In a tensor-parallel
// (sharded) spec a parameter may be a slice of the full model's tensor: rows or columns [start, start +
// shape[dim]) along `dim` of `full`; a tensor may be held as several slices under one name (c_attn's q, k and v
// rows of one head group), consecutive in the arena. dim == -1: the whole tensor (full is then shape).
struct ParamShape {
  std::string suffix;
  Shape shape;
  Shape full{};
  int dim = -1;
  int64_t start = 0;
};

// Scratch that layers of one model share because only one layer runs at a time (one model per thread; on a GPU,
// every layer's work is also enqueued on one stream, so a layer's kernels that read a slot have run before the
// next layer's kernels overwrite it): a slot is sized by the largest request made while the model is built and
// allocated once, on the model's device, by allocate(), at the end of Model::build. data(slot) is valid after that
// (device memory for a GPU model); never during building. A slot holds nothing from one layer call to the next:
// whatever a layer must keep from forward to backward stays in its own buffers. Not thread-safe.
class SharedScratch {
 public:
  enum Slot {
    kGradA, kGradB,     // a block's ping-pong gradients (CPU)
    kAttention,         // attention's dqkv + datt, inside one backward (CPU and CUDA)
    kAttentionScores,   // the CUDA attention's one-sample scores/probabilities and their gradient [2, H, T, T]
    kSlots
  };
  explicit SharedScratch(Device device = Device::cpu()) : device_(device) {}
  void reserve(Slot slot, size_t floats) { size_[slot] = std::max(size_[slot], floats); }
  void allocate();
  float* data(Slot slot) { return slot_[slot]; }
  size_t size(Slot slot) const { return size_[slot]; }  // floats reserved
  Device device() const noexcept { return device_; }

 private:
  Device device_;
  size_t size_[kSlots] = {};
  float* slot_[kSlots] = {};
  DeviceFloats memory_;
};

// What a layer implementation is built with besides its spec.
struct LayerBuild {
  Device device;
  int maxBatch = 1;   // scratch is sized for up to this many samples
  uint64_t seed = 0;  // seeds random layers (dropout) unless the spec fixes a seed
  // Where layers that support it take their backward scratch from; null: their own buffers.
  SharedScratch* scratch = nullptr;
  // The tensor group a sharded spec's layers all-reduce in (tensor_parallel.h); null: the spec is not sharded.
  TensorGroup* tensor = nullptr;
  // bf16 activation storage is on (a CUDA model built while bf16ActivationsOn(), device.h): a sequence (Model, a
  // block) pairs its layers by storesBf16Between, and a layer may keep its own activations in bf16 (the matmul
  // attention's q, k, v and heads).
  bool bf16 = false;
};

using LayerFactory = std::unique_ptr<Layer> (*)(const LayerSpec& spec, const LayerBuild& build);

struct LayerKind {
  std::string_view name;  // the JSON "type"
  // Reads the layer's fields (f.allowOnly first, so typos are errors), checks them against spec.input (the
  // per-sample input shape, already set) and sets spec.output. Errors: f.fail / f.failAt (ConfigError naming
  // the file and the JSON path).
  void (*parse)(const JsonFields& f, LayerSpec& spec) = nullptr;
  // The parameters of a parsed spec; nullptr: none.
  std::vector<ParamShape> (*paramShapes)(const LayerSpec& spec) = nullptr;
  // The summary's detail column ("784 -> 256"); nullptr: empty.
  std::string (*detail)(const LayerSpec& spec) = nullptr;
  // The implementation per device type; nullptr where there is none. Only CPU implementations exist so far.
  LayerFactory cpu = nullptr;
  LayerFactory cuda = nullptr;
  // Draws random numbers in training (dropout): Model::reseedDropout reaches it.
  bool random = false;
  // bf16 activation storage on a GPU ("precision": "bf16", docs/gpu.md "bf16"; storesBf16Between). bf16Input: the
  // CUDA layer reads its input only as a GEMM operand, in forward and in backward's weight gradient (linear,
  // causal_self_attention's qkv projection, lm_head), so the input may be stored as bf16: the GEMM multiplies bf16
  // anyway. bf16Output: the CUDA layer can write its output rounded to bf16 and never reads it back in backward
  // (layernorm, gelu: its derivative is taken from its input). Such a CUDA layer implements Layer::setBf16Storage.
  bool bf16Input = false;
  bool bf16Output = false;
  // The layer's backward never reads its output y, on any device (linear, gelu, layernorm, attention, dropout...;
  // not relu, tanh or sigmoid, whose derivatives are taken from y): a sequence may overwrite y once the next layer
  // has read it (a block adds its residual into its last child's output: blockAddsInPlace).
  bool backwardIgnoresOutput = false;
  // bf16OutputGrad: the CUDA layer reads the gradient of its output (backward's dy) only as a bf16 GEMM operand, at
  // any leading dimension (lm_head: dW = dy^T x and dx = dy W), so as the model's last layer it may take that gradient
  // in bf16 straight from the loss, written over its output when backwardIgnoresOutput is set too
  // (takesBf16OutputGrad; Model::outputGradType). Such a CUDA layer implements Layer::setBf16OutputGrad.
  bool bf16OutputGrad = false;
  // A valid layer object and per-sample input shape (JSON text), so tests cover every registered type.
  std::string_view exampleLayer;
  std::string_view exampleInput;
  // Floats per sample the layer keeps from forward to backward besides its output, on `target`'s layers
  // (attention: q, k, v, the heads and, on the CPU, the probabilities [H, T, T]); nullptr: none. Memory estimates
  // only (dtrain check, the agent).
  int64_t (*keptFloats)(const LayerSpec& spec, const MemoryTarget& target) = nullptr;
};

// Every registered type, in the order error messages list them.
std::span<const LayerKind* const> layerKinds();
// The registered type named `name`, or nullptr.
const LayerKind* findLayerKind(std::string_view name);
// The names of layerKinds(), in order.
std::vector<std::string_view> layerTypeNames();

// The parameters of spec's layer (empty when it has none) and their total element count.
std::vector<ParamShape> paramShapesOf(const LayerSpec& spec);
int64_t paramCountOf(const LayerSpec& spec);
// The same count with overflow checks (nullopt past INT64_MAX): the parser's guard for untrusted specs.
std::optional<int64_t> checkedParamCountOf(const LayerSpec& spec);

// keptFloats of spec's layer on `target`, saturating at INT64_MAX; 0 when its type keeps nothing beyond its output.
int64_t keptFloatsOf(const LayerSpec& spec, const MemoryTarget& target = {});

// bf16 activation storage (docs/gpu.md "bf16"): whether a GPU model with it on stores `producer`'s output as bf16,
// `consumer` being the next layer of the same sequence (Model's layers, a block's children), which alone reads that
// output: producer's kind has bf16Output and consumer's bf16Input. The rule of the CUDA models' pairing and of the
// memory estimate (MemoryTarget::bf16), so both count the same buffers.
bool storesBf16Between(const LayerSpec& producer, const LayerSpec& consumer);
// For each layer of a sequence: 1 when its output is stored as bf16 (storesBf16Between with the next one), else 0.
std::vector<char> bf16StoredOutputs(std::span<const LayerSpec> sequence);
// bf16 gradient of a model's output (docs/gpu.md "bf16"): whether a GPU model with bf16 activation storage on, whose
// last layer is `last`, takes the gradient of its output from the loss as bf16 (Model::outputGradType): last's kind
// has bf16OutputGrad and backwardIgnoresOutput (the loss writes the gradient over the output, which the layer's
// backward then must not read). The rule of the CUDA model and of the memory estimate (with nn::givesBf16Gradient
// for the loss's side), so both count the same buffers (none for the gradient: it lives in the output's).
bool takesBf16OutputGrad(const LayerSpec& last);
// Tells each layer of a built sequence what bf16StoredOutputs(specs) decided (Layer::setBf16Storage: its input
// when the previous output is bf16, its output when its own is), for the layers concerned only.
void applyBf16Storage(std::span<const std::unique_ptr<Layer>> layers, const std::vector<char>& storedOutputs);

// Whether a block (`block`'s kind is "block") has its last child write straight into the block's output y and
// adds the residual x there in place (y = x + y: the same float addition as x + f(x) into a separate y, so the same
// bits), instead of keeping the child's output in a buffer of its own: true when that child's backward never reads
// its output (LayerKind::backwardIgnoresOutput; never for a child that aliases its input). The rule of the CPU and
// CUDA blocks and of the memory estimate (the block's keptFloats), so both count the same buffers. At GPT-2's shape
// this drops attention's and c_proj's outputs: 2 x [rows, C] floats per layer.
bool blockAddsInPlace(const LayerSpec& block);

// The fused residual + LayerNorm of GPU models (docs/gpu.md "Fused residual + LayerNorm"): whether `producer`'s
// residual add is handed to `consumer`, the next layer of the same sequence (a model's layers): producer is a block
// that adds in place (blockAddsInPlace: its forward can leave f in its output) and consumer either a layernorm or a
// block whose first child is a layernorm (that child reads the consumer block's input, producer's output, before
// anything else does, and takes the add: cuda::ResidualAddTaker). The rule of the CUDA blocks' pairing
// (Layer::fuseWithNext, with nn::residualLayerNormFusionOn); pure, no device needed. A GPT (gpt_preset.cpp) pairs
// every one of its 2 n_layer blocks: with the next block's ln_1 / ln_2, the last with ln_f.
bool residualAddFusesInto(const LayerSpec& producer, const LayerSpec& consumer);
// How many consecutive pairs of `sequence` (a model's layers) residualAddFusesInto fuses: the residual adds a GPU
// model with the fusion on does inside a LayerNorm's kernel per forward.
int residualLayerNormPairs(std::span<const LayerSpec> sequence);

// Whether spec's layer, or a layer inside it (a block's children), draws random numbers in training (dropout).
bool drawsRandom(const LayerSpec& spec);

// The implementation of spec's layer for build.device, with scratch for up to build.maxBatch samples.
// Throws NotBuiltError "device cuda:0: layer 'linear' has no CUDA implementation in this build" when the type has
// none for that device, dtrain::Error for a maxBatch < 1 or a spec that was not parsed.
std::unique_ptr<Layer> makeLayer(const LayerSpec& spec, const LayerBuild& build);

// Throws NotBuiltError "device cuda:0: <what> has no CUDA implementation in this build" unless device is the CPU:
// for the parts of lib/nn (model arenas, losses, optimizers) that exist for the CPU only.
void requireCpu(Device device, std::string_view what);

}  // namespace dtrain::nn
