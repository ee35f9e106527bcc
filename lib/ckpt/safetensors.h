// safetensors (https://github.com/huggingface/safetensors), the format PyTorch, numpy and Hugging Face read:
//
//   u64 little-endian N | N bytes of JSON header | data
//   header: {"<name>": {"dtype": "F32", "shape": [out, in], "data_offsets": [begin, end]}, ...,
//            "__metadata__": {"<key>": "<string value>"}}      (offsets relative to the start of the data)
//
// Like the reference writer, the header is padded with spaces to a multiple of 8 bytes so the data starts
// 8-byte aligned, and tensors are laid out back to back with no gaps. The reader validates everything the
// reference implementation validates (header size bound, JSON shape, known dtypes, offsets contiguous from 0 and
// covering the data exactly, byte counts matching shape x dtype), so a corrupt or truncated file is a
// CheckpointError naming the file, never an out-of-bounds read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "lib/ckpt/file_io.h"
#include "lib/common/tensor.h"

namespace dtrain::ckpt {

// Element types, shapes and views are lib/common's (tensor.h); the safetensors spelling of a dtype is
// dtrain::safetensorsName / dtrain::parseSafetensorsDType. A file's tensor of rank above dtrain::kMaxRank is
// rejected as corrupt (no dtrain model or optimizer state comes near it).

// A tensor to write: a name and a view of borrowed CPU memory, tensor.bytes() bytes, little-endian, row-major.
struct NamedTensor {
  std::string name;
  TensorView tensor;
};

using Metadata = std::map<std::string, std::string>;

// The header bytes (length prefix + padded JSON) for these tensors, laid out in the given order. Throws
// CheckpointError on duplicate or empty names, negative dimensions, a null pointer with a non-empty shape, or a
// tensor that is not in CPU memory.
std::string safetensorsHeader(std::span<const NamedTensor> tensors, const Metadata& metadata = {});
// Streams header and data into a sink (the checkpoint writer uses this).
void writeSafetensors(FileSink& sink, std::span<const NamedTensor> tensors, const Metadata& metadata = {});
// Writes a standalone file (e.g. the final model.safetensors) durably: temporary name, fsync, rename, dir fsync.
FileRecord writeSafetensorsFile(const std::filesystem::path& path, std::span<const NamedTensor> tensors,
                                const Metadata& metadata = {});

struct TensorInfo {
  std::string name;
  DType dtype = DType::kFloat32;
  Shape shape;
  uint64_t begin = 0;  // offsets into the data section
  uint64_t end = 0;
  uint64_t bytes() const { return end - begin; }
};

// A validated safetensors file, memory-mapped or read into memory. Move-only; immutable once open, so const
// methods are safe from several threads.
class SafetensorsFile {
 public:
  enum class Access { kMmap, kRead };
  static SafetensorsFile open(const std::filesystem::path& path, Access access = Access::kMmap);
  // Validates bytes already in memory (copied); `name` is used in messages.
  static SafetensorsFile fromBytes(std::string bytes, const std::string& name);

  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in data order
  const Metadata& metadata() const { return metadata_; }
  const TensorInfo* find(const std::string& name) const;
  std::span<const std::byte> data(const TensorInfo& tensor) const;
  // Copies tensor `name` into dst after checking that it exists and its dtype, shape and dst's size match:
  // CheckpointError "model.safetensors: tensor '0.weight' has shape [256, 784], expected [128, 784]".
  void readInto(const std::string& name, DType dtype, const Shape& shape, std::span<std::byte> dst) const;
  // The same into a CPU view, whose dtype and shape are the expected ones.
  void readInto(const std::string& name, const TensorView& dst) const;
  uint64_t fileSize() const { return size_; }

 private:
  SafetensorsFile() = default;
  void parse();

  std::string path_;
  const std::byte* base_ = nullptr;  // whole file
  uint64_t size_ = 0;
  uint64_t dataStart_ = 0;
  void* map_ = nullptr;  // mmap'ed region, or nullptr
  std::string owned_;    // Access::kRead / fromBytes
  std::vector<TensorInfo> tensors_;
  Metadata metadata_;
};

}  // namespace dtrain::ckpt
