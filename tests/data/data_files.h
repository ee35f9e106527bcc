// Writers for small dataset files in tests: IDX (plain or gzip), NPY, CSV. Independent of lib/data's readers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dtrain::testing {

// Writes `content` to path, gzip-compressed when gzip.
void writeBytes(const std::string& path, const std::string& content, bool gzip = false);
// IDX file: magic 0x0000TTDD, big-endian dims, then `data` (already big-endian for multi-byte types).
std::string idxBytes(uint8_t typeCode, const std::vector<uint32_t>& dims, const std::string& data);
// NPY v1 (or v2) file with the given descr ('<f4', '|u1', ...) and shape; data is raw little-endian.
std::string npyBytes(const std::string& descr, const std::vector<int64_t>& shape, const std::string& data,
                     int version = 1, bool fortran = false);
template <typename T>
std::string rawBytes(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

}  // namespace dtrain::testing
