#include "lib/ckpt/sharded.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

#include "lib/common/error.h"

namespace dtrain::ckpt {

using json = nlohmann::json;

namespace {

// A box inside a full tensor: [start, start + extent) along every dimension.
struct Box {
  std::vector<int64_t> start, extent;
  int64_t volume() const {
    int64_t v = 1;
    for (int64_t e : extent) v *= e;
    return v;
  }
};

Box boxOf(const Shape& full, const Slice& s) {
  Box b;
  for (int d = 0; d < full.rank(); ++d) {
    b.start.push_back(d == s.dim ? s.start : 0);
    b.extent.push_back(d == s.dim ? s.length : full[d]);
  }
  if (b.start.empty()) b.start = {0}, b.extent = {1};  // a scalar is a box of one element
  return b;
}

// Row-major offset of `idx` (full-tensor coordinates) inside box `b`.
int64_t offsetIn(const Box& b, const std::vector<int64_t>& idx) {
  int64_t off = 0;
  for (size_t d = 0; d < idx.size(); ++d) off = off * b.extent[d] + (idx[d] - b.start[d]);
  return off;
}

void checkSlice(const std::string& what, const Shape& full, const Slice& s, const Shape& piece) {
  if (s.whole()) {
    DTRAIN_CHECK_AS(CheckpointError, piece == full, "{}: shape {} but its full shape is {}", what, piece.str(),
                    full.str());
    return;
  }
  bool ok = s.dim < full.rank() && piece.rank() == full.rank() && s.start >= 0 && s.length >= 1 &&
            s.start + s.length <= full[s.dim];
  for (int d = 0; ok && d < full.rank(); ++d) ok = piece[d] == (d == s.dim ? s.length : full[d]);
  DTRAIN_CHECK_AS(CheckpointError, ok, "{}: piece {} is not the slice [dim {}, start {}, length {}] of {}", what,
                  piece.str(), s.dim, s.start, s.length, full.str());
}

}  // namespace

PieceFile piecesToWrite(std::span<const PieceTensor> pieces, const Metadata& extra) {
  PieceFile out;
  out.metadata = extra;
  json slices = json::object();
  std::map<std::string, int> uses;
  for (const auto& p : pieces) ++uses[p.name];
  for (const auto& p : pieces) {
    const Shape full = p.fullShape.empty() && p.slice.whole() ? p.piece.shape : p.fullShape;
    checkSlice(fmt::format("tensor '{}'", p.name), full, p.slice, p.piece.shape);
    // Several slices of one tensor in one file (attention's q, k and v rows) are stored as "<name>@<dim>:<start>".
    std::string stored = p.name;
    if (uses[p.name] > 1 && !p.slice.whole()) stored = fmt::format("{}@{}:{}", p.name, p.slice.dim, p.slice.start);
    if (!p.slice.whole()) {
      slices[stored] = {{"shape", full.toVector()}, {"dim", p.slice.dim}, {"start", p.slice.start}};
      if (stored != p.name) slices[stored]["name"] = p.name;
    }
    out.tensors.push_back({stored, p.piece});
  }
  if (!slices.empty()) out.metadata[kSlicesKey] = slices.dump();
  return out;
}

const SafetensorsFile& TensorAssembler::open(const std::filesystem::path& path) {
  auto& slot = files_[path.string()];
  if (!slot) slot = std::make_unique<SafetensorsFile>(SafetensorsFile::open(path));
  return *slot;
}

void TensorAssembler::addFile(const std::filesystem::path& path) {
  const SafetensorsFile& f = open(path);
  json slices = json::object();
  if (auto it = f.metadata().find(kSlicesKey); it != f.metadata().end()) {
    slices = json::parse(it->second, nullptr, false);
    DTRAIN_CHECK_AS(CheckpointError, slices.is_object(), "{}: __metadata__ {} is not a JSON object", path.string(),
                    kSlicesKey);
  }
  for (const auto& t : f.tensors()) {
    Piece p{.file = &f, .info = &t, .offset = 0, .fullShape = t.shape, .slice = {}};
    std::string name = t.name;
    if (slices.contains(t.name)) {
      const json& s = slices[t.name];
      try {
        if (s.contains("name")) name = s.at("name").get<std::string>();
        p.fullShape = Shape::of(s.at("shape").get<std::vector<int64_t>>());
        p.slice.dim = s.at("dim").get<int>();
        p.slice.start = s.at("start").get<int64_t>();
        p.slice.length = p.slice.dim >= 0 && p.slice.dim < t.shape.rank() ? t.shape[p.slice.dim] : 0;
      } catch (const json::exception& e) {
        DTRAIN_THROW(CheckpointError, "{}: {} entry of tensor '{}': {}", path.string(), kSlicesKey, t.name, e.what());
      }
      checkSlice(fmt::format("{}: tensor '{}'", path.string(), t.name), p.fullShape, p.slice, t.shape);
    }
    DTRAIN_CHECK_AS(CheckpointError, t.dtype == DType::kFloat32, "{}: tensor '{}' is {}, expected F32", path.string(),
                    t.name, dtypeName(t.dtype));
    pieces_[name].push_back(p);
  }
}

void TensorAssembler::addFlatPiece(const std::filesystem::path& path, const std::string& stored,
                                   const std::string& name, int64_t offset, const Shape& fullShape) {
  const SafetensorsFile& f = open(path);
  const TensorInfo* t = f.find(stored);
  DTRAIN_CHECK_AS(CheckpointError, t != nullptr, "{}: no tensor '{}'", path.string(), stored);
  DTRAIN_CHECK_AS(CheckpointError,
                  t->dtype == DType::kFloat32 && offset >= 0 && offset + fullShape.numel() <= t->shape.numel(),
                  "{}: tensor '{}' ({} {}) does not hold {} elements at {} for '{}'", path.string(), stored,
                  dtypeName(t->dtype), t->shape.str(), fullShape.numel(), offset, name);
  pieces_[name].push_back({.file = &f, .info = t, .offset = offset, .fullShape = fullShape, .slice = {}});
}

Shape TensorAssembler::fullShape(const std::string& name) const {
  auto it = pieces_.find(name);
  DTRAIN_CHECK_AS(CheckpointError, it != pieces_.end(), "the checkpoint has no tensor '{}'", name);
  return it->second.front().fullShape;
}

void TensorAssembler::load(const std::string& name, const Shape& fullShape, const Slice& slice,
                           std::span<float> dst) const {
  auto it = pieces_.find(name);
  DTRAIN_CHECK_AS(CheckpointError, it != pieces_.end(), "the checkpoint has no tensor '{}'", name);
  const Box want = boxOf(fullShape, slice);
  DTRAIN_CHECK_AS(CheckpointError, static_cast<int64_t>(dst.size()) == want.volume(),
                  "tensor '{}': {} values requested into a buffer of {}", name, want.volume(), dst.size());
  int64_t covered = 0;
  for (const Piece& p : it->second) {
    DTRAIN_CHECK_AS(CheckpointError, p.fullShape == fullShape, "{}: tensor '{}' has shape {}, expected {}",
                    p.file->path(), name, p.fullShape.str(), fullShape.str());
    const Box have = boxOf(p.fullShape, p.slice);
    Box cut;
    bool empty = false;
    for (size_t d = 0; d < want.start.size(); ++d) {
      const int64_t lo = std::max(want.start[d], have.start[d]);
      const int64_t hi = std::min(want.start[d] + want.extent[d], have.start[d] + have.extent[d]);
      empty = empty || hi <= lo;
      cut.start.push_back(lo);
      cut.extent.push_back(std::max<int64_t>(0, hi - lo));
    }
    if (empty) continue;
    covered += cut.volume();
    const auto* src = reinterpret_cast<const float*>(p.file->data(*p.info).data()) + p.offset;
    // Copy row by row along the last dimension: iterate the other dimensions of the cut like an odometer.
    const int rank = static_cast<int>(cut.start.size());
    const auto row = static_cast<size_t>(cut.extent.back());
    std::vector<int64_t> idx = cut.start;
    for (;;) {
      std::memcpy(dst.data() + offsetIn(want, idx), src + offsetIn(have, idx), row * sizeof(float));
      int d = rank - 2;
      for (; d >= 0; --d) {
        if (++idx[static_cast<size_t>(d)] < cut.start[static_cast<size_t>(d)] + cut.extent[static_cast<size_t>(d)]) break;
        idx[static_cast<size_t>(d)] = cut.start[static_cast<size_t>(d)];
      }
      if (d < 0) break;
    }
  }
  DTRAIN_CHECK_AS(CheckpointError, covered == want.volume(),
                  "tensor '{}': the checkpoint's pieces cover {} of the {} values needed (slice dim {} start {} "
                  "length {} of {})",
                  name, covered, want.volume(), slice.dim, slice.start, slice.length, fullShape.str());
}

}  // namespace dtrain::ckpt
