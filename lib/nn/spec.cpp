#include "lib/nn/spec.h"

#include <fmt/format.h>

#include <fstream>
#include <sstream>

#include "lib/common/error.h"
#include "lib/common/json_fields.h"

namespace dtrain::nn {
namespace {

// Per-sample tensors beyond this are certainly a typo, and int32 offsets stay safe inside layers.
constexpr int64_t kMaxSampleNumel = int64_t{1} << 30;

const std::vector<std::string_view> kLayerNames = {"linear",  "relu",      "gelu",    "tanh",   "sigmoid",
                                                   "dropout", "layernorm", "flatten", "conv2d", "maxpool2d"};

bool positive(int64_t v) { return v >= 1; }
bool nonNegative(int64_t v) { return v >= 0; }

void checkSize(const JsonFields& f, const LayerSpec& l) {
  if (l.output.numel() > kMaxSampleNumel) {
    f.fail(fmt::format("{} output {} has {} values per sample, more than the supported {}", layerTypeName(l.type),
                       l.output.batchStr(), l.output.numel(), kMaxSampleNumel));
  }
}

void parseLinear(const JsonFields& f, LayerSpec& l) {
  f.allowOnly({"type", "out", "bias", "in"});
  l.out = f.integer("out", "an integer >= 1", positive);
  l.bias = f.boolean("bias", true);
  if (l.input.rank() != 1) {
    f.fail(fmt::format("linear expects input [N, F] but gets {}; add a flatten layer", l.input.batchStr()));
  }
  if (f.has("in")) {
    int64_t in = f.integer("in", "an integer >= 1", positive);
    if (in != l.input[0]) {
      f.failAt("in", fmt::format("linear declares in {} but its input is {} ({} features)", in, l.input.batchStr(),
                                 l.input[0]));
    }
  }
  l.output = Shape{l.out};
}

void parseDropout(const JsonFields& f, LayerSpec& l) {
  f.allowOnly({"type", "p", "seed"});
  l.p = f.number("p", 0.5, "a probability in [0, 1]", [](double v) { return v >= 0.0 && v <= 1.0; });
  if (f.has("seed")) l.seed = static_cast<uint64_t>(f.integer("seed", "an integer >= 0", nonNegative));
  l.output = l.input;
}

void parseLayerNorm(const JsonFields& f, LayerSpec& l) {
  f.allowOnly({"type", "eps", "affine"});
  l.eps = f.number("eps", 1e-5, "a number > 0", [](double v) { return v > 0.0; });
  l.affine = f.boolean("affine", true);
  l.output = l.input;
}

// Reads kernel/stride/padding and checks the input is [C, H, W]; returns the output spatial size.
void parseWindow(const JsonFields& f, LayerSpec& l, const char* name, bool strideDefaultsToKernel) {
  if (l.input.rank() != 3) {
    std::string hint = l.input.rank() == 1 ? "; set the model input to [C, H, W] (e.g. [1, 28, 28])"
                                           : "";
    f.fail(fmt::format("{} expects input [N, C, H, W] but gets {}{}", name, l.input.batchStr(), hint));
  }
  auto k = f.integers("kernel", 2, {}, "an integer >= 1", positive);
  std::vector<int64_t> sDefault = strideDefaultsToKernel ? k : std::vector<int64_t>{1, 1};
  auto s = f.integers("stride", 2, sDefault, "an integer >= 1", positive);
  auto p = f.integers("padding", 2, {0, 0}, "an integer >= 0", nonNegative);
  l.kernelH = k[0], l.kernelW = k[1], l.strideH = s[0], l.strideW = s[1], l.padH = p[0], l.padW = p[1];
  int64_t h = l.input[1], w = l.input[2];
  int64_t oh = (h + 2 * l.padH - l.kernelH) / l.strideH + 1;
  int64_t ow = (w + 2 * l.padW - l.kernelW) / l.strideW + 1;
  if (h + 2 * l.padH < l.kernelH || w + 2 * l.padW < l.kernelW || oh < 1 || ow < 1) {
    f.fail(fmt::format("{} output would be empty: input {} with kernel {}x{}, stride {}x{}, padding {}x{}", name,
                       l.input.batchStr(), l.kernelH, l.kernelW, l.strideH, l.strideW, l.padH, l.padW));
  }
  l.output = Shape{l.out, oh, ow};
}

void parseConv2d(const JsonFields& f, LayerSpec& l) {
  f.allowOnly({"type", "out", "kernel", "stride", "padding", "bias", "in"});
  l.out = f.integer("out", "an integer >= 1 (output channels)", positive);
  l.bias = f.boolean("bias", true);
  parseWindow(f, l, "conv2d", false);
  if (f.has("in")) {
    int64_t in = f.integer("in", "an integer >= 1", positive);
    if (in != l.input[0]) {
      f.failAt("in", fmt::format("conv2d declares in {} channels but its input is {} ({} channels)", in,
                                 l.input.batchStr(), l.input[0]));
    }
  }
}

void parseMaxPool2d(const JsonFields& f, LayerSpec& l) {
  f.allowOnly({"type", "kernel", "stride", "padding"});
  l.out = l.input.rank() == 3 ? l.input[0] : 0;
  parseWindow(f, l, "maxpool2d", true);
  // PyTorch's rule: a window must always contain at least one real input value.
  if (2 * l.padH > l.kernelH || 2 * l.padW > l.kernelW) {
    f.failAt("padding", fmt::format("maxpool2d padding {}x{} must be at most half the kernel {}x{}", l.padH, l.padW,
                                    l.kernelH, l.kernelW));
  }
}

LayerSpec parseLayer(const nlohmann::json& j, const std::string& source, const std::string& path, int index,
                     const Shape& input) {
  JsonFields f(j, source, path, "a layer");
  LayerSpec l;
  l.index = index;
  l.path = path;
  l.input = input;
  std::string type = f.choice("type", kLayerNames, "layer type");
  if (type == "linear") {
    l.type = LayerType::kLinear;
    parseLinear(f, l);
  } else if (type == "dropout") {
    l.type = LayerType::kDropout;
    parseDropout(f, l);
  } else if (type == "layernorm") {
    l.type = LayerType::kLayerNorm;
    parseLayerNorm(f, l);
  } else if (type == "conv2d") {
    l.type = LayerType::kConv2d;
    parseConv2d(f, l);
  } else if (type == "maxpool2d") {
    l.type = LayerType::kMaxPool2d;
    parseMaxPool2d(f, l);
  } else {
    f.allowOnly({"type"});
    l.type = type == "relu"      ? LayerType::kRelu
             : type == "gelu"    ? LayerType::kGelu
             : type == "tanh"    ? LayerType::kTanh
             : type == "sigmoid" ? LayerType::kSigmoid
                                 : LayerType::kFlatten;
    l.output = l.type == LayerType::kFlatten ? Shape{input.numel()} : input;
  }
  checkSize(f, l);
  return l;
}

}  // namespace

const char* layerTypeName(LayerType type) {
  switch (type) {
    case LayerType::kLinear: return "linear";
    case LayerType::kRelu: return "relu";
    case LayerType::kGelu: return "gelu";
    case LayerType::kTanh: return "tanh";
    case LayerType::kSigmoid: return "sigmoid";
    case LayerType::kDropout: return "dropout";
    case LayerType::kLayerNorm: return "layernorm";
    case LayerType::kFlatten: return "flatten";
    case LayerType::kConv2d: return "conv2d";
    case LayerType::kMaxPool2d: return "maxpool2d";
  }
  return "?";
}

int64_t LayerSpec::paramCount() const {
  switch (type) {
    case LayerType::kLinear: return out * input[0] + (bias ? out : 0);
    case LayerType::kConv2d: return out * input[0] * kernelH * kernelW + (bias ? out : 0);
    case LayerType::kLayerNorm: return affine ? 2 * input.back() : 0;
    default: return 0;
  }
}

std::string LayerSpec::detail() const {
  auto window = [this] {
    return fmt::format("k{}x{} s{}x{} p{}x{}", kernelH, kernelW, strideH, strideW, padH, padW);
  };
  switch (type) {
    case LayerType::kLinear: return fmt::format("{} -> {}{}", input[0], out, bias ? "" : ", no bias");
    case LayerType::kConv2d:
      return fmt::format("{} -> {}, {}{}", input[0], out, window(), bias ? "" : ", no bias");
    case LayerType::kMaxPool2d: return window();
    case LayerType::kDropout: return fmt::format("p={}", p);
    case LayerType::kLayerNorm: return fmt::format("[{}], eps={}{}", input.back(), eps, affine ? "" : ", no affine");
    default: return "";
  }
}

int64_t ModelSpec::paramCount() const {
  int64_t n = 0;
  for (const auto& l : layers) n += l.paramCount();
  return n;
}

ModelSpec parseModelSpec(const nlohmann::json& model, const std::string& sourceFile,
                         const std::string& jsonPathPrefix) {
  JsonFields m(model, sourceFile, jsonPathPrefix, "the model");
  m.allowOnly({"input", "layers", "name"});
  ModelSpec spec;
  spec.source = sourceFile;
  spec.path = jsonPathPrefix;

  const auto& input = m.at("input");
  constexpr std::string_view kInputExpected = "a list of 1 to 5 integers >= 1 (the per-sample shape, e.g. [784])";
  if (!input.is_array() || input.empty() || input.size() > kMaxSampleRank) {
    m.failAt("input", fmt::format("expected {}, got {}", kInputExpected, jsonSnippet(input)));
  }
  std::vector<int64_t> dims;
  for (const auto& d : input) {
    if (!d.is_number_integer() || d.get<int64_t>() < 1) {
      m.failAt("input", fmt::format("expected {}, got {}", kInputExpected, jsonSnippet(input)));
    }
    dims.push_back(d.get<int64_t>());
  }
  spec.input = Shape::of(dims);
  if (spec.input.numel() > kMaxSampleNumel) {
    m.failAt("input", fmt::format("input {} has more than {} values per sample", spec.input.str(), kMaxSampleNumel));
  }

  const auto& layers = m.at("layers");
  if (!layers.is_array() || layers.empty()) {
    m.failAt("layers", fmt::format("expected a non-empty list of layer objects, got {}", jsonSnippet(layers)));
  }
  Shape current = spec.input;
  for (size_t i = 0; i < layers.size(); ++i) {
    std::string path = fmt::format("{}/layers/{}", jsonPathPrefix, i);
    spec.layers.push_back(parseLayer(layers[i], sourceFile, path, static_cast<int>(i), current));
    current = spec.layers.back().output;
  }
  return spec;
}

ModelSpec loadModelSpec(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) throwConfig(file.string(), "", "cannot open model file");
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text.str());
  } catch (const nlohmann::json::parse_error& e) {
    throwConfig(file.string(), "", fmt::format("invalid JSON: {}", e.what()));
  }
  if (j.is_object() && !j.contains("layers") && j.contains("model") && j["model"].is_object()) {
    return parseModelSpec(j["model"], file.string(), "/model");
  }
  return parseModelSpec(j, file.string(), "");
}

std::vector<SummaryRow> summarize(const ModelSpec& spec) {
  std::vector<SummaryRow> rows;
  for (const auto& l : spec.layers) {
    rows.push_back({l.index, layerTypeName(l.type), l.detail(), l.output, l.paramCount()});
  }
  return rows;
}

std::string formatSummary(const ModelSpec& spec) {
  auto rows = summarize(spec);
  std::string out = fmt::format("{:>3}  {:<10} {:<28} {:<16} {:>12}\n", "#", "layer", "detail", "output", "params");
  out += fmt::format("{:>3}  {:<10} {:<28} {:<16} {:>12}\n", "", "input", "", spec.input.batchStr(), "");
  for (const auto& r : rows) {
    out += fmt::format("{:>3}  {:<10} {:<28} {:<16} {:>12}\n", r.index, r.type, r.detail, r.output.batchStr(),
                       r.params);
  }
  int64_t total = spec.paramCount();
  out += fmt::format("total parameters: {} ({:.2f} MiB as float32)\n", total,
                     static_cast<double>(total) * 4.0 / (1024.0 * 1024.0));
  return out;
}

}  // namespace dtrain::nn
