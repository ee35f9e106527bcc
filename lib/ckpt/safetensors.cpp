#include "lib/ckpt/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <set>

#include "lib/common/error.h"

namespace dtrain::ckpt {

namespace {

// The reference implementation refuses headers above 100 MB; so do we, before allocating anything.
constexpr uint64_t kMaxHeader = 100'000'000;

// Byte count of a tensor, or nullopt on a negative dimension or overflow.
std::optional<uint64_t> byteCount(const Shape& shape, DType dtype) {
  uint64_t n = dtypeSize(dtype);
  for (auto d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return std::nullopt;
  }
  return n;
}

}  // namespace

std::string safetensorsHeader(std::span<const NamedTensor> tensors, const Metadata& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  std::set<std::string_view> names;
  for (const auto& t : tensors) {
    DTRAIN_CHECK_AS(CheckpointError, !t.name.empty() && t.name != "__metadata__",
                    "safetensors: invalid tensor name '{}'", t.name);
    DTRAIN_CHECK_AS(CheckpointError, names.insert(t.name).second, "safetensors: duplicate tensor name '{}'", t.name);
    const TensorView& v = t.tensor;
    DTRAIN_CHECK_AS(CheckpointError, v.device.isCpu(), "safetensors: tensor '{}' is on {}; copy it to the host first",
                    t.name, v.device.str());
    auto bytes = byteCount(v.shape, v.dtype);
    DTRAIN_CHECK_AS(CheckpointError, bytes.has_value(), "safetensors: tensor '{}' has invalid shape {}", t.name,
                    v.shape.spaced());
    DTRAIN_CHECK_AS(CheckpointError, v.data != nullptr || *bytes == 0, "safetensors: tensor '{}' has no data", t.name);
    v.requirePacked(fmt::format("safetensors: tensor '{}'", t.name));  // written as numel values from data
    header[t.name] = {{"dtype", safetensorsName(v.dtype)},
                      {"shape", v.shape.toVector()},
                      {"data_offsets", {offset, offset + *bytes}}};
    offset += *bytes;
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  const uint64_t n = json.size();
  std::memcpy(out.data(), &n, 8);  // little-endian (asserted in lib/common/bytes.h)
  return out + json;
}

void writeSafetensors(FileSink& sink, std::span<const NamedTensor> tensors, const Metadata& metadata) {
  sink.write(safetensorsHeader(tensors, metadata));
  for (const auto& t : tensors) sink.write(t.tensor.data, *byteCount(t.tensor.shape, t.tensor.dtype));
}

FileRecord writeSafetensorsFile(const std::filesystem::path& path, std::span<const NamedTensor> tensors,
                                const Metadata& metadata) {
  const auto dir = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  const auto tmp = dir / fmt::format(".{}.tmp-{}", path.filename().string(), ::getpid());
  FileRecord record;
  {
    FileSink sink(tmp);
    writeSafetensors(sink, tensors, metadata);
    record = sink.finish();
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    std::error_code ec;
    std::filesystem::remove(tmp, ec);
    DTRAIN_THROW(CheckpointError, "{}: rename failed ({})", path.string(), std::strerror(err));
  }
  syncDirectory(dir);
  record.name = path.filename().string();
  return record;
}

SafetensorsFile SafetensorsFile::open(const std::filesystem::path& path, Access access) {
  SafetensorsFile f;
  f.path_ = path.string();
  if (access == Access::kRead) {
    f.owned_ = readWholeFile(path);
    f.base_ = reinterpret_cast<const std::byte*>(f.owned_.data());
    f.size_ = f.owned_.size();
  } else {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    DTRAIN_CHECK_AS(CheckpointError, fd >= 0, "{}: cannot open ({})", f.path_, std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      DTRAIN_THROW(CheckpointError, "{}: fstat failed", f.path_);
    }
    f.size_ = static_cast<uint64_t>(st.st_size);
    if (f.size_ > 0) {
      void* m = ::mmap(nullptr, f.size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (m == MAP_FAILED) {
        int err = errno;
        ::close(fd);
        DTRAIN_THROW(CheckpointError, "{}: mmap failed ({})", f.path_, std::strerror(err));
      }
      f.map_ = m;
      f.base_ = static_cast<const std::byte*>(m);
    }
    ::close(fd);
  }
  f.parse();
  return f;
}

SafetensorsFile SafetensorsFile::fromBytes(std::string bytes, const std::string& name) {
  SafetensorsFile f;
  f.path_ = name;
  f.owned_ = std::move(bytes);
  f.base_ = reinterpret_cast<const std::byte*>(f.owned_.data());
  f.size_ = f.owned_.size();
  f.parse();
  return f;
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& o) noexcept { *this = std::move(o); }

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& o) noexcept {
  if (this == &o) return *this;
  if (map_ != nullptr) ::munmap(map_, size_);
  path_ = std::move(o.path_);
  size_ = o.size_;
  dataStart_ = o.dataStart_;
  map_ = o.map_;
  owned_ = std::move(o.owned_);
  // A moved std::string may have been copied (short-string buffer): re-point into our own copy.
  base_ = map_ != nullptr ? static_cast<const std::byte*>(map_) : reinterpret_cast<const std::byte*>(owned_.data());
  tensors_ = std::move(o.tensors_);
  metadata_ = std::move(o.metadata_);
  o.map_ = nullptr;
  o.base_ = nullptr;
  o.size_ = 0;
  return *this;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, size_);
}

void SafetensorsFile::parse() {
  const std::string& p = path_;
  DTRAIN_CHECK_AS(CheckpointError, size_ >= 8, "{}: {} bytes, too short for a safetensors file (expected >= 8)", p,
                  size_);
  uint64_t n = 0;
  std::memcpy(&n, base_, 8);
  DTRAIN_CHECK_AS(CheckpointError, n <= kMaxHeader, "{}: header length {} exceeds the 100 MB limit (corrupt file?)", p,
                  n);
  DTRAIN_CHECK_AS(CheckpointError, 8 + n <= size_, "{}: header length {} runs past the end of the {}-byte file", p,
                  n, size_);
  dataStart_ = 8 + n;
  std::string_view text(reinterpret_cast<const char*>(base_) + 8, n);
  DTRAIN_CHECK_AS(CheckpointError, !text.empty() && text.front() == '{', "{}: header does not start with '{{'", p);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    DTRAIN_THROW(CheckpointError, "{}: header is not valid JSON ({})", p, e.what());
  }
  DTRAIN_CHECK_AS(CheckpointError, header.is_object(), "{}: header is not a JSON object", p);
  tensors_.clear();
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      DTRAIN_CHECK_AS(CheckpointError, entry.is_object(), "{}: __metadata__ is not an object", p);
      for (const auto& [k, v] : entry.items()) {
        DTRAIN_CHECK_AS(CheckpointError, v.is_string(), "{}: __metadata__ value of '{}' is not a string", p, k);
        metadata_[k] = v.get<std::string>();
      }
      continue;
    }
    auto bad = [&](const std::string& what) {
      DTRAIN_THROW(CheckpointError, "{}: tensor '{}': {}", p, name, what);
    };
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") || !entry.contains("data_offsets"))
      bad("expected {\"dtype\", \"shape\", \"data_offsets\"}");
    TensorInfo t;
    t.name = name;
    const auto& dt = entry["dtype"];
    auto dtype = dt.is_string() ? parseSafetensorsDType(dt.get<std::string>()) : std::nullopt;
    if (!dtype) bad(fmt::format("unknown dtype {}", dt.dump()));
    t.dtype = *dtype;
    const auto& shape = entry["shape"];
    if (!shape.is_array()) bad("shape is not an array");
    if (shape.size() > static_cast<size_t>(kMaxRank))
      bad(fmt::format("shape {} has more than {} dimensions", shape.dump(), kMaxRank));
    for (const auto& d : shape) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) bad(fmt::format("bad shape {}", shape.dump()));
      t.shape.push_back(d.get<int64_t>());
    }
    const auto& off = entry["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      bad(fmt::format("bad data_offsets {}", off.dump()));
    t.begin = off[0].get<uint64_t>();
    t.end = off[1].get<uint64_t>();
    if (t.end < t.begin) bad(fmt::format("data_offsets [{}, {}] end before begin", t.begin, t.end));
    auto bytes = byteCount(t.shape, t.dtype);
    if (!bytes || *bytes != t.end - t.begin)
      bad(fmt::format("shape {} of {} needs {} bytes, data_offsets [{}, {}] hold {}", t.shape.spaced(),
                      safetensorsName(t.dtype), bytes ? std::to_string(*bytes) : "too many", t.begin, t.end,
                      t.end - t.begin));
    tensors_.push_back(std::move(t));
  }
  std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  // Tensors must tile the data section exactly: no gaps, no overlaps, nothing missing or left over.
  uint64_t expected = 0;
  for (const auto& t : tensors_) {
    DTRAIN_CHECK_AS(CheckpointError, t.begin == expected,
                    "{}: tensor '{}' starts at data offset {}, expected {} (overlapping or gapped offsets)", p, t.name,
                    t.begin, expected);
    expected = t.end;
  }
  const uint64_t dataBytes = size_ - dataStart_;
  DTRAIN_CHECK_AS(CheckpointError, expected == dataBytes,
                  "{}: tensors cover {} data bytes but the file holds {} (truncated or extended file)", p, expected,
                  dataBytes);
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  for (const auto& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

std::span<const std::byte> SafetensorsFile::data(const TensorInfo& t) const {
  return {base_ + dataStart_ + t.begin, static_cast<size_t>(t.bytes())};
}

void SafetensorsFile::readInto(const std::string& name, DType dtype, const Shape& shape,
                               std::span<std::byte> dst) const {
  const TensorInfo* t = find(name);
  DTRAIN_CHECK_AS(CheckpointError, t != nullptr, "{}: no tensor named '{}'", path_, name);
  DTRAIN_CHECK_AS(CheckpointError, t->dtype == dtype, "{}: tensor '{}' has dtype {}, expected {}", path_, name,
                  safetensorsName(t->dtype), safetensorsName(dtype));
  DTRAIN_CHECK_AS(CheckpointError, t->shape == shape, "{}: tensor '{}' has shape {}, expected {}", path_, name,
                  t->shape.spaced(), shape.spaced());
  DTRAIN_CHECK_AS(CheckpointError, dst.size() == t->bytes(), "{}: tensor '{}' has {} bytes, the destination {}",
                  path_, name, t->bytes(), dst.size());
  std::memcpy(dst.data(), base_ + dataStart_ + t->begin, dst.size());
}

void SafetensorsFile::readInto(const std::string& name, const TensorView& dst) const {
  DTRAIN_CHECK_AS(CheckpointError, dst.device.isCpu(), "{}: tensor '{}' cannot be read into {} memory", path_, name,
                  dst.device.str());
  dst.requirePacked(fmt::format("{}: reading tensor '{}'", path_, name));
  readInto(name, dst.dtype, dst.shape, {static_cast<std::byte*>(dst.data), dst.bytes()});
}

}  // namespace dtrain::ckpt
