#include "tests/data/data_files.h"

#include <zlib.h>

#include <fstream>
#include <stdexcept>

namespace dtrain::testing {

void writeBytes(const std::string& path, const std::string& content, bool gzip) {
  if (gzip) {
    gzFile f = gzopen(path.c_str(), "wb");
    if (f == nullptr) throw std::runtime_error("gzopen " + path);
    if (!content.empty() && gzwrite(f, content.data(), static_cast<unsigned>(content.size())) <= 0)
      throw std::runtime_error("gzwrite " + path);
    gzclose(f);
    return;
  }
  std::ofstream out(path, std::ios::binary);
  out.write(content.data(), static_cast<std::streamsize>(content.size()));
}

std::string idxBytes(uint8_t typeCode, const std::vector<uint32_t>& dims, const std::string& data) {
  std::string s = {0, 0, static_cast<char>(typeCode), static_cast<char>(dims.size())};
  for (uint32_t d : dims)
    for (int shift = 24; shift >= 0; shift -= 8) s.push_back(static_cast<char>((d >> shift) & 0xff));
  return s + data;
}

std::string npyBytes(const std::string& descr, const std::vector<int64_t>& shape, const std::string& data,
                     int version, bool fortran) {
  std::string shapeText = "(";
  for (size_t i = 0; i < shape.size(); ++i) shapeText += std::to_string(shape[i]) + (shape.size() == 1 ? "," : i + 1 < shape.size() ? ", " : "");
  shapeText += ")";
  std::string header = "{'descr': '" + descr + "', 'fortran_order': " + (fortran ? "True" : "False") +
                       ", 'shape': " + shapeText + ", }";
  const size_t prefix = version == 1 ? 10 : 12;
  while ((prefix + header.size() + 1) % 64 != 0) header.push_back(' ');
  header.push_back('\n');
  std::string s = "\x93NUMPY";
  s.push_back(static_cast<char>(version));
  s.push_back(0);
  const auto len = static_cast<uint32_t>(header.size());
  s.push_back(static_cast<char>(len & 0xff));
  s.push_back(static_cast<char>((len >> 8) & 0xff));
  if (version != 1) {
    s.push_back(static_cast<char>((len >> 16) & 0xff));
    s.push_back(static_cast<char>((len >> 24) & 0xff));
  }
  return s + header + data;
}

}  // namespace dtrain::testing
