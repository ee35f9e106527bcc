#include "lib/nn/spec.h"

#include <fmt/format.h>

#include <algorithm>

#include "lib/common/error.h"
#include "lib/common/json_fields.h"
#include "lib/nn/registry.h"

namespace dtrain::nn {
namespace {

// Per-sample tensors beyond kMaxSampleNumel are certainly a typo, and int32 offsets stay safe inside layers.
// Products are checked: a huge kernel or channel count must not wrap around to a small, valid-looking number.
void checkSize(const JsonFields& f, const LayerSpec& l) {
  auto n = l.output.checkedNumel();
  if (!n || *n > kMaxSampleNumel) {
    f.fail(fmt::format("{} output {} has {} values per sample, more than the supported {}", l.type(),
                       l.output.batchStr(), n ? fmt::format("{}", *n) : std::string("more than 2^63"),
                       kMaxSampleNumel));
  }
  auto params = checkedParamCountOf(l);
  if (!params || *params > kMaxParams) {
    f.fail(fmt::format("{} has {} parameters, more than the supported {} ({} GiB as float32)", l.type(),
                       params ? fmt::format("{}", *params) : std::string("more than 2^63"), kMaxParams,
                       (kMaxParams * 4) >> 30));
  }
}

// The gpt preset's lm_head shares the embedding's token table: find it and check the shapes agree.
void tieHeads(ModelSpec& spec) {
  for (auto& l : spec.layers) {
    if (l.type() != "lm_head" || !l.tied) continue;
    LayerSpec* emb = nullptr;
    for (auto& e : spec.layers)
      if (e.type() == "embedding") {
        emb = &e;
        break;
      }
    if (emb == nullptr || emb->index >= l.index)
      throwConfig(spec.source, l.path, "a tied lm_head needs an embedding layer before it (or set \"tied\": false)");
    if (emb->sparse)
      throwConfig(spec.source, l.path,
                  fmt::format("a tied lm_head cannot share the sparse table of the embedding at {} (it lives on the "
                              "parameter servers); set \"tied\": false",
                              emb->path));
    if (emb->vocab != l.vocab || emb->output.back() != l.input.back())
      throwConfig(spec.source, l.path,
                  fmt::format("a tied lm_head [{}, {}] does not match the embedding at {} ([{}, {}])", l.vocab,
                              l.input.back(), emb->path, emb->vocab, emb->output.back()));
    l.tiedTo = emb->index;
    emb->tied = true;
  }
}

}  // namespace

LayerSpec parseLayerSpec(const nlohmann::json& j, const std::string& source, const std::string& path, int index,
                         const Shape& input) {
  LayerSpec l;
  l.index = index;
  l.path = path;
  l.input = input;
  // "name" is common to every layer: taken off here so each type's allowOnly lists only its own fields.
  nlohmann::json rest = j;
  if (j.is_object() && j.contains("name")) {
    JsonFields named(j, source, path, "a layer");
    l.name = named.string("name");
    static constexpr std::string_view kNameChars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.";
    if (l.name.empty() || l.name.find_first_not_of(kNameChars) != std::string::npos || l.name.front() == '.' ||
        l.name.back() == '.')
      named.failAt("name", fmt::format("'{}' is not a parameter name prefix (expected letters, digits, _ and inner "
                                       "dots, e.g. \"transformer.h.0\")",
                                       l.name));
    rest.erase("name");
  }
  JsonFields f(rest, source, path, "a layer");
  l.kind = findLayerKind(f.choice("type", layerTypeNames(), "layer type"));
  l.kind->parse(f, l);
  checkSize(f, l);
  return l;
}

std::string_view LayerSpec::type() const { return kind != nullptr ? kind->name : std::string_view(); }

int64_t LayerSpec::paramCount() const { return paramCountOf(*this); }

std::string LayerSpec::detail() const { return kind != nullptr && kind->detail != nullptr ? kind->detail(*this) : ""; }

int64_t ModelSpec::paramCount() const {
  int64_t n = 0;
  for (const auto& l : layers) n += l.paramCount();
  return n;
}

ModelSpec parseModelSpec(const nlohmann::json& model, const std::string& sourceFile,
                         const std::string& jsonPathPrefix) {
  if (model.is_object() && model.contains("preset")) {
    nlohmann::json expanded = expandGptPreset(model, sourceFile, jsonPathPrefix);
    try {
      return parseModelSpec(expanded, sourceFile, jsonPathPrefix);
    } catch (const ConfigError& e) {
      // expandGptPreset checks what the expansion's layers would refuse, naming the preset's fields; a check it
      // does not know of fails on a layer the user never wrote: say so, and name the object the user wrote.
      const std::string inner = e.what();
      const std::string prefix = sourceFile + ": ";
      throw ConfigError(configMessage(sourceFile, jsonPathPrefix.empty() ? "/" : jsonPathPrefix,
                                      fmt::format("the gpt preset expands to layers that fail a check ({})",
                                                  inner.compare(0, prefix.size(), prefix) == 0
                                                      ? inner.substr(prefix.size())
                                                      : inner)),
                        e.code());
    }
  }
  JsonFields m(model, sourceFile, jsonPathPrefix, "the model");
  m.allowOnly({"input", "layers", "name"});
  if (m.has("name")) (void)m.string("name");  // a label nothing reads, but a label: "name": 5 is a mistake
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
  if (auto n = spec.input.checkedNumel(); !n || *n > kMaxSampleNumel) {
    m.failAt("input", fmt::format("input {} has more than {} values per sample", spec.input.str(), kMaxSampleNumel));
  }

  const auto& layers = m.at("layers");
  if (!layers.is_array() || layers.empty()) {
    m.failAt("layers", fmt::format("expected a non-empty list of layer objects, got {}", jsonSnippet(layers)));
  }
  Shape current = spec.input;
  for (size_t i = 0; i < layers.size(); ++i) {
    std::string path = fmt::format("{}/layers/{}", jsonPathPrefix, i);
    spec.layers.push_back(parseLayerSpec(layers[i], sourceFile, path, static_cast<int>(i), current));
    current = spec.layers.back().output;
  }
  tieHeads(spec);
  // Each layer is within kMaxParams, so the sum cannot overflow.
  if (spec.paramCount() > kMaxParams) {
    m.fail(fmt::format("the model has {} parameters, more than the supported {} ({} GiB as float32)",
                       spec.paramCount(), kMaxParams, (kMaxParams * 4) >> 30));
  }
  return spec;
}

ModelSpec loadModelSpec(const std::filesystem::path& file) {
  std::error_code ec;
  if (!std::filesystem::exists(file, ec)) throwConfig(file.string(), "", "cannot open model file");
  // A regular file of a config file's size, checked before reading (a FIFO or /dev/zero is refused).
  nlohmann::json j = parseConfigJson(readConfigText(file, "model file"), file.string(), "invalid JSON");
  if (j.is_object() && !j.contains("layers") && j.contains("model") && j["model"].is_object()) {
    return parseModelSpec(j["model"], file.string(), "/model");
  }
  return parseModelSpec(j, file.string(), "");
}

std::vector<SummaryRow> summarize(const ModelSpec& spec) {
  std::vector<SummaryRow> rows;
  for (const auto& l : spec.layers) {
    rows.push_back({l.index, std::string(l.type()), l.detail(), l.output, l.paramCount()});
  }
  return rows;
}

std::string formatSummary(const ModelSpec& spec) {
  auto rows = summarize(spec);
  // Columns as wide as their widest cell (at least the usual widths), so long details ("vocab 256 -> 128,
  // +position, tied") do not push their row's output and parameters out of line.
  size_t type = 10, detail = 28, output = 16;
  for (const auto& r : rows) {
    type = std::max(type, r.type.size());
    detail = std::max(detail, r.detail.size());
    output = std::max(output, r.output.batchStr().size());
  }
  auto row = [&](const auto& index, const std::string& t, const std::string& d, const std::string& o,
                 const auto& params) {
    return fmt::format("{:>3}  {:<{}} {:<{}} {:<{}} {:>12}\n", index, t, type, d, detail, o, output, params);
  };
  std::string out = row("#", "layer", "detail", "output", "params");
  out += row("", "input", "", spec.input.batchStr(), "");
  for (const auto& r : rows) out += row(r.index, r.type, r.detail, r.output.batchStr(), r.params);
  int64_t total = spec.paramCount();
  out += fmt::format("total parameters: {} ({:.2f} MiB as float32)\n", total,
                     static_cast<double>(total) * 4.0 / (1024.0 * 1024.0));
  int64_t sparse = 0;
  for (const auto& l : spec.layers)
    if (l.sparse) sparse += l.vocab * l.output.back();
  if (sparse > 0)
    out += fmt::format("sparse tables: {} parameters ({:.2f} MiB) on the parameter servers, not in the workers\n",
                       sparse, static_cast<double>(sparse) * 4.0 / (1024.0 * 1024.0));
  return out;
}

}  // namespace dtrain::nn
