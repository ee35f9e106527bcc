#include "lib/data/spec.h"

#include <fmt/ranges.h>

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <set>

#include "lib/common/error.h"
#include "lib/common/json_fields.h"
#include "lib/common/parse.h"

namespace dtrain::data {

const char* formatName(Format format) {
  switch (format) {
    case Format::kIdx: return "idx";
    case Format::kCsv: return "csv";
    case Format::kNpy: return "npy";
    case Format::kSynthetic: return "synthetic";
    case Format::kText: return "text";
    case Format::kTokens: return "tokens";
  }
  return "?";
}

namespace {

using nlohmann::json;

// Dataset specs keep the wording their users know: "<path>: <value> (expected ...)" (lib/common/json_fields.h).
constexpr auto kTerse = JsonFields::Wording::kTerse;

int64_t integerAtLeast(const JsonFields& f, std::string_view key, int64_t fallback, int64_t min) {
  return f.integer(key, fallback, fmt::format("an integer >= {}", min), [min](int64_t v) { return v >= min; });
}

double anyNumber(const JsonFields& f, std::string_view key, double fallback) {
  return f.number(key, fallback, "a number", [](double) { return true; });
}

// Why `p` is not a regular file a dataset can be read from: missing, a directory, or a fifo/device/socket (which
// a reader could block on or read without end).
std::string notAFile(const std::filesystem::path& p) {
  std::error_code ec;
  const auto st = std::filesystem::status(p, ec);
  if (!std::filesystem::exists(st)) return "no such file";
  if (std::filesystem::is_directory(st)) return "is a directory, not a file";
  return "not a regular file (a fifo, device or socket)";
}

// Resolves a file path against baseDir and checks the file exists.
std::string existingFile(const JsonFields& f, std::string_view key, const std::filesystem::path& baseDir,
                         const std::string& expected) {
  std::filesystem::path p = f.string(key);
  if (p.is_relative()) p = baseDir / p;
  std::error_code ec;
  if (!std::filesystem::is_regular_file(p, ec))
    f.failAt(key, fmt::format("{}: {} (expected {})", p.lexically_normal().string(), notAFile(p), expected));
  return p.lexically_normal().string();
}

double parseScale(const JsonFields& f) {
  if (!f.has("scale")) return 1.0;
  const auto& v = f.at("scale");
  if (v.is_number()) return v.get<double>();
  if (v.is_string()) {  // "1/255"
    auto parts = parse::split(v.get<std::string>(), '/');
    if (parts.size() == 2) {
      auto a = parse::toDouble(parts[0]), b = parse::toDouble(parts[1]);
      if (a && b && *b != 0) return *a / *b;
    }
    if (parts.size() == 1)
      if (auto a = parse::toDouble(parts[0])) return *a;
  }
  f.failAt("scale", fmt::format("{} (expected a number or a fraction like \"1/255\")", jsonSnippet(v)));
}

void parseSynthetic(const JsonFields& f, SyntheticOptions& s) {
  auto task = f.choice("task", {"classification", "regression", "recsys"}, "task", "regression");
  s.task = task == "regression"       ? SyntheticOptions::Task::kRegression
           : task == "classification" ? SyntheticOptions::Task::kClassification
                                      : SyntheticOptions::Task::kRecsys;
  s.users = integerAtLeast(f, "users", s.users, 1);
  s.items = integerAtLeast(f, "items", s.items, 1);
  s.factors = integerAtLeast(f, "factors", s.factors, 1);
  s.zipf = anyNumber(f, "zipf", s.zipf);
  s.rule = f.choice("rule", {"blobs", "linear"}, "rule", "blobs") == "blobs" ? SyntheticOptions::Rule::kBlobs
                                                                     : SyntheticOptions::Rule::kLinear;
  s.samples = integerAtLeast(f, "samples", s.samples, 1);
  s.features = integerAtLeast(f, "features", s.features, 1);
  s.outputs = integerAtLeast(f, "outputs", s.outputs, 1);
  s.numClasses = integerAtLeast(f, "num_classes", s.numClasses, 2);
  s.noise = anyNumber(f, "noise", s.noise);
  s.spread = anyNumber(f, "spread", s.spread);
  if (s.noise < 0) f.failAt("noise", fmt::format("{} (expected >= 0)", s.noise));
  s.seed = static_cast<uint64_t>(integerAtLeast(f, "seed", 0, 0));
  s.sampleSeed = static_cast<uint64_t>(integerAtLeast(f, "sample_seed", static_cast<int64_t>(s.seed), 0));
  if (s.task == SyntheticOptions::Task::kRecsys) {
    for (const char* field : {"features", "outputs", "rule", "num_classes", "noise", "spread"})
      if (f.has(field))
        f.failAt(field, "not a field of task recsys (its features are [user, users + item], its class a click)");
    s.features = 2;
  }
}

// text / tokens: their own small set of fields (no transforms: the features are token ids).
void parseSequence(const JsonFields& f, DataSpec& spec, const std::filesystem::path& baseDir, bool text) {
  spec.format = text ? Format::kText : Format::kTokens;
  SequenceOptions& s = spec.sequence;
  s.textFormat = text;
  if (text) f.allowOnly({"format", "path", "vocab", "split", "val_fraction", "block_size"});
  else f.allowOnly({"format", "path", "block_size"});
  const std::string expected = text ? "a text file (UTF-8 or bytes)" : "a uint16 token file (nanoGPT or llm.c .bin)";
  const auto& p = f.at("path");
  auto addFile = [&](const nlohmann::json& v, const std::string& key) {
    if (!v.is_string() || v.get<std::string>().empty())
      f.failAt("path", fmt::format("{} (expected a file name or a list of file names)", jsonSnippet(v)));
    std::filesystem::path file = v.get<std::string>();
    if (file.is_relative()) file = baseDir / file;
    std::error_code ec;
    if (!std::filesystem::is_regular_file(file, ec))
      f.failAt(key, fmt::format("{}: {} (expected {})", file.lexically_normal().string(), notAFile(file), expected));
    if (::access(file.c_str(), R_OK) != 0)
      f.failAt(key, fmt::format("{}: not readable ({})", file.lexically_normal().string(), std::strerror(errno)));
    s.paths.push_back(file.lexically_normal().string());
  };
  if (p.is_array()) {
    if (p.empty()) f.failAt("path", "empty list (expected at least one file)");
    for (size_t i = 0; i < p.size(); ++i) addFile(p[i], fmt::format("path/{}", i));
  } else {
    addFile(p, "path");
  }
  if (f.has("block_size")) s.blockSize = integerAtLeast(f, "block_size", 0, 1);
  if (!text) return;
  s.vocab = f.choice("vocab", {"byte", "char"}, "vocabulary", "byte") == "byte" ? Vocab::kByte : Vocab::kChar;
  s.valSplit = f.choice("split", {"train", "val"}, "split", "train") == "val";
  s.valFraction = f.number("val_fraction", 0.1, "a number in [0, 1)", [](double v) { return v >= 0 && v < 1; });
  if (s.valSplit && s.valFraction == 0) f.failAt("val_fraction", "0 leaves the val split empty (expected > 0)");
}

}  // namespace

DataSpec parseDataSpec(const json& j, const std::string& sourceFile, const std::string& jsonPath,
                       const std::filesystem::path& baseDir) {
  JsonFields f(j, sourceFile, jsonPath, "an object with a \"format\"", kTerse);
  DataSpec spec;
  spec.sourceFile = sourceFile;
  spec.jsonPath = jsonPath;
  const auto format = f.choice("format", {"csv", "idx", "npy", "synthetic", "text", "tokens"}, "format");
  if (format == "text" || format == "tokens") {
    parseSequence(f, spec, baseDir, format == "text");
    return spec;
  }
  std::set<std::string> allowed = {"format", "scale", "normalize", "shape", "limit", "label_kind", "num_classes"};
  if (format == "idx") {
    spec.format = Format::kIdx;
    allowed.insert({"images", "labels"});
    f.allowOnly({allowed.begin(), allowed.end()});
    spec.images = existingFile(f, "images", baseDir, "an IDX images file, e.g. train-images-idx3-ubyte.gz");
    spec.labels = existingFile(f, "labels", baseDir, "an IDX labels file, e.g. train-labels-idx1-ubyte.gz");
  } else if (format == "csv") {
    spec.format = Format::kCsv;
    allowed.insert({"path", "label", "header", "delimiter"});
    f.allowOnly({allowed.begin(), allowed.end()});
    spec.path = existingFile(f, "path", baseDir, "a CSV file");
    if (!f.has("label")) f.failAt("label", "missing (expected a column name, an index like -1, or an array of them)");
    auto addColumn = [&](const json& c) {
      if (c.is_string()) spec.csv.labelColumns.emplace_back(c.get<std::string>());
      else if (c.is_number_integer()) spec.csv.labelColumns.emplace_back(c.get<int64_t>());
      else f.failAt("label", fmt::format("{} (expected a column name or index)", jsonSnippet(c)));
    };
    if (f.at("label").is_array()) {
      for (const auto& c : f.at("label")) addColumn(c);
      if (spec.csv.labelColumns.empty()) f.failAt("label", "empty array (expected at least one column)");
    } else {
      addColumn(f.at("label"));
    }
    if (f.has("header")) spec.csv.header = f.boolean("header", true);
    if (f.has("delimiter")) {
      const auto d = f.string("delimiter");
      if (d != "\\t" && d.size() != 1) f.failAt("delimiter", fmt::format("'{}' (expected one character)", d));
      spec.csv.delimiter = d == "\\t" ? '\t' : d[0];
    }
  } else if (format == "npy") {
    spec.format = Format::kNpy;
    allowed.insert({"features", "labels"});
    f.allowOnly({allowed.begin(), allowed.end()});
    spec.features = existingFile(f, "features", baseDir, "an .npy file of features, samples first");
    spec.labels = existingFile(f, "labels", baseDir, "an .npy file of labels, samples first");
  } else {
    spec.format = Format::kSynthetic;
    allowed.insert({"task", "rule", "samples", "features", "outputs", "noise", "spread", "seed", "sample_seed", "users",
                    "items", "factors", "zipf"});
    f.allowOnly({allowed.begin(), allowed.end()});
    parseSynthetic(f, spec.synthetic);
  }

  spec.transform.scale = parseScale(f);
  if (f.has("normalize")) {
    const auto& n = f.at("normalize");
    if (!n.is_object() || !n.contains("mean") || !n.contains("std") || n.size() != 2)
      f.failAt("normalize", fmt::format("{} (expected {{\"mean\": m, \"std\": s}})", jsonSnippet(n)));
    const JsonFields normalize = f.object("normalize");
    spec.transform.mean = normalize.numbers("mean");
    spec.transform.std = normalize.numbers("std");
    for (double s : spec.transform.std)
      if (s <= 0) normalize.failAt("std", fmt::format("{} (expected every std > 0)", s));
  }
  if (f.has("shape")) {
    const auto& s = f.at("shape");
    // At most kMaxRank - 1 dimensions: the batch dimension goes in front.
    if (s.is_array() && s.size() >= static_cast<size_t>(kMaxRank))
      f.failAt("shape", fmt::format("{} (expected at most {} dimensions)", jsonSnippet(s), kMaxRank - 1));
    Shape shape;
    if (s.is_array())
      for (const auto& d : s)
        if (d.is_number_integer() && d.get<int64_t>() > 0) shape.push_back(d.get<int64_t>());
    if (!s.is_array() || s.empty() || shape.rank() != static_cast<int>(s.size()))
      f.failAt("shape", fmt::format("{} (expected an array of positive integers, e.g. [1, 28, 28])", jsonSnippet(s)));
    spec.shape = shape;
  }
  if (f.has("limit")) spec.limit = integerAtLeast(f, "limit", 0, 1);
  if (f.has("label_kind"))
    spec.labelKind = f.choice("label_kind", {"class", "target"}, "label kind") == "class" ? LabelKind::kClass : LabelKind::kTarget;
  if (f.has("num_classes") && spec.format != Format::kSynthetic) spec.numClasses = integerAtLeast(f, "num_classes", 0, 1);
  spec.csv.labelKind = spec.labelKind;
  if (spec.format == Format::kSynthetic && spec.labelKind) {
    bool regression = spec.synthetic.task == SyntheticOptions::Task::kRegression;
    if ((*spec.labelKind == LabelKind::kClass) == regression)
      f.failAt("label_kind", fmt::format("{} contradicts task {}", labelKindName(*spec.labelKind),
                                       regression ? "regression" : "classification"));
  }
  return spec;
}

namespace {

// Labels from an integer or float array read from a file (NPY or IDX).
Labels labelsFromArray(const RawArray& a, std::optional<LabelKind> kind, const std::string& file) {
  Labels l;
  const bool isFloat = isFloatingPoint(a.type);
  l.kind = kind.value_or(isFloat ? LabelKind::kTarget : LabelKind::kClass);
  const auto n = a.shape.numel();
  auto value = [&](int64_t i) -> double {
    const std::byte* p = a.bytes.data() + static_cast<size_t>(i) * dtypeSize(a.type);
    switch (a.type) {
      case DType::kUInt8: return static_cast<double>(*reinterpret_cast<const uint8_t*>(p));
      case DType::kInt8: return *reinterpret_cast<const int8_t*>(p);
      case DType::kInt16: return *reinterpret_cast<const int16_t*>(p);
      case DType::kUInt16: return *reinterpret_cast<const uint16_t*>(p);
      case DType::kInt32: return *reinterpret_cast<const int32_t*>(p);
      case DType::kInt64: return static_cast<double>(*reinterpret_cast<const int64_t*>(p));
      case DType::kFloat32: return *reinterpret_cast<const float*>(p);
      case DType::kFloat64: return *reinterpret_cast<const double*>(p);
      default: DTRAIN_THROW(Error, "labels of type {} cannot be read", dtypeName(a.type));
    }
  };
  if (l.kind == LabelKind::kClass) {
    DTRAIN_CHECK_AS(ConfigError, a.shape.rank() == 1, "{}: class labels of shape {} (expected one per sample: [N])",
                    file, a.shape.spaced());
    l.classes.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      double v = value(i);
      DTRAIN_CHECK_AS(ConfigError, v >= 0 && v == static_cast<double>(static_cast<int32_t>(v)),
                      "{}: label {} of sample {} is not a class index (expected an integer >= 0)", file, v, i);
      l.classes[static_cast<size_t>(i)] = static_cast<int32_t>(v);
    }
  } else {
    l.shape = a.shape.dropFirst();
    if (l.shape.empty()) l.shape = Shape{1};
    l.targets.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) l.targets[static_cast<size_t>(i)] = static_cast<float>(value(i));
  }
  return l;
}

std::string baseName(const std::string& path) { return std::filesystem::path(path).filename().string(); }

// A file that declares 0 samples is valid IDX/NPY, but no job can use it: training would take no step (the trainer
// refused it only after the rendezvous) and an evaluation would report a loss of 0 over nothing. Refused where the
// files are read, so `dtrain check` and the launcher say so before any worker starts.
void requireSamples(const std::string& key, const std::string& file, int64_t samples, std::string_view what) {
  DTRAIN_CHECK_AS(ConfigError, samples > 0, "{}: {}: 0 {} (expected at least one sample)", key, file, what);
}

std::shared_ptr<const Dataset> load(const DataSpec& spec, const std::string& where, ReadMode features) {
  std::unique_ptr<ArrayDataset> ds;
  auto at = [&](const std::string& key) { return where + "/" + key; };
  // Runs a reader, prefixing its message with the JSON path of the key that named the file.
  auto withKey = [&](const std::string& key, auto&& fn) -> decltype(fn()) {
    try {
      return fn();
    } catch (const ConfigError& e) {
      throw ConfigError(at(key) + ": " + e.what());
    }
  };
  switch (spec.format) {
    case Format::kIdx: {
      auto images = withKey("images", [&] { return readIdx(spec.images, 3, "images", features); });
      auto labelArray = withKey("labels", [&] { return readIdx(spec.labels, 1, "labels"); });
      requireSamples(at("images"), spec.images, images.shape[0], "images");
      DTRAIN_CHECK_AS(ConfigError, labelArray.shape[0] == images.shape[0],
                      "{}: {} has {} labels but {} has {} images (expected one label per image)", at("labels"),
                      spec.labels, labelArray.shape[0], spec.images, images.shape[0]);
      auto labels = withKey("labels", [&] { return labelsFromArray(labelArray, spec.labelKind, spec.labels); });
      labels.numClasses = spec.numClasses;
      auto what = fmt::format("idx {}: {} x {} {}", baseName(spec.images), images.shape[0],
                              images.shape.dropFirst().spaced(), dtypeName(images.type));
      ds = std::make_unique<ArrayDataset>(std::move(images), std::move(labels), spec.transform, what, where);
      break;
    }
    case Format::kNpy: {
      auto values = withKey("features", [&] { return readNpy(spec.features, features); });
      auto labelArray = withKey("labels", [&] { return readNpy(spec.labels); });
      requireSamples(at("features"), spec.features, values.shape[0], "samples");
      DTRAIN_CHECK_AS(ConfigError, labelArray.shape[0] == values.shape[0],
                      "{}: {} has {} labels but {} has {} samples (expected one label per sample)", at("labels"),
                      spec.labels, labelArray.shape[0], spec.features, values.shape[0]);
      auto labels = withKey("labels", [&] { return labelsFromArray(labelArray, spec.labelKind, spec.labels); });
      if (labels.kind == LabelKind::kClass) labels.numClasses = spec.numClasses;
      auto what = fmt::format("npy {}: {} x {} {}", baseName(spec.features), values.shape[0],
                              values.shape.dropFirst().spaced(), dtypeName(values.type));
      ds = std::make_unique<ArrayDataset>(std::move(values), std::move(labels), spec.transform, what, where);
      break;
    }
    case Format::kCsv: {
      auto table = withKey("path", [&] { return readCsv(spec.path, spec.csv); });
      if (table.labels.kind == LabelKind::kClass && spec.numClasses) table.labels.numClasses = spec.numClasses;
      auto what = fmt::format("csv {}: {} x [{}] float32", baseName(spec.path), table.features.shape[0],
                              table.features.shape[1]);
      ds = std::make_unique<ArrayDataset>(std::move(table.features), std::move(table.labels), spec.transform, what,
                                          where);
      break;
    }
    case Format::kSynthetic:
      ds = makeSynthetic(spec.synthetic, spec.transform);
      break;
    case Format::kText:
    case Format::kTokens: {
      auto stream = withKey("path", [&] { return std::make_shared<const TokenStream>(readTokenStream(spec.sequence)); });
      return withKey(spec.sequence.blockSize > 0 ? "path" : "block_size",
                     [&] { return std::make_shared<const SequenceDataset>(stream, spec.sequence); });
    }
  }
  if (spec.shape) ds->reshape(*spec.shape, at("shape"));
  if (spec.limit) ds->truncate(*spec.limit);
  return ds;
}

}  // namespace

std::shared_ptr<const Dataset> loadDataset(const DataSpec& spec, ReadMode features) {
  const std::string where = spec.sourceFile.empty() ? spec.jsonPath : spec.sourceFile + ": " + spec.jsonPath;
  try {
    return load(spec, where, features);
  } catch (const ConfigError& e) {
    // Messages from ArrayDataset already carry `where`; the rest get it here.
    std::string m = e.what();
    if (m.rfind(where, 0) == 0) throw;
    throw ConfigError(where + ": " + m);
  }
}

}  // namespace dtrain::data
