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

namespace dtrain::ckpt {

enum class DType : uint8_t { kBool, kU8, kI8, kI16, kU16, kF16, kBF16, kI32, kU32, kF32, kI64, kU64, kF64 };
size_t dtypeSize(DType dtype);
const char* dtypeName(DType dtype);  // the safetensors spelling: "F32", "BF16", "U8", ...
std::optional<DType> parseDType(std::string_view name);

using Shape = std::vector<int64_t>;
std::string formatShape(const Shape& shape);  // "[256, 784]"

// A tensor to write: borrowed bytes, numElements(shape) * dtypeSize(dtype) of them, little-endian.
struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
  const void* data = nullptr;
};

using Metadata = std::map<std::string, std::string>;

// The header bytes (length prefix + padded JSON) for these tensors, laid out in the given order. Throws
// CheckpointError on duplicate or empty names, negative dimensions, or a null pointer with a non-empty shape.
std::string safetensorsHeader(std::span<const TensorView> tensors, const Metadata& metadata = {});
// Streams header and data into a sink (the checkpoint writer uses this).
void writeSafetensors(FileSink& sink, std::span<const TensorView> tensors, const Metadata& metadata = {});
// Writes a standalone file (e.g. the final model.safetensors) durably: temporary name, fsync, rename, dir fsync.
FileRecord writeSafetensorsFile(const std::filesystem::path& path, std::span<const TensorView> tensors,
                                const Metadata& metadata = {});

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
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
