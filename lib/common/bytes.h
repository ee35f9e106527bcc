// Little-endian byte coding for wire frames and file headers. ByteWriter appends to a std::string;
// ByteReader consumes a view and throws ProtocolError when the input is too short (a truncated frame).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>

#include "lib/common/error.h"

namespace dtrain {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "dtrain's wire and file formats assume little-endian");

class ByteWriter {
 public:
  explicit ByteWriter(std::string& out) : out_(out) {}
  template <typename T>
  void put(T v) {
    static_assert(std::is_trivially_copyable_v<T>);
    out_.append(reinterpret_cast<const char*>(&v), sizeof(T));
  }
  // u32 length + bytes.
  void putBytes(std::string_view s) {
    put<uint32_t>(static_cast<uint32_t>(s.size()));
    out_.append(s);
  }
  void putRaw(std::string_view s) { out_.append(s); }

 private:
  std::string& out_;
};

class ByteReader {
 public:
  explicit ByteReader(std::string_view in) : in_(in) {}
  template <typename T>
  T get() {
    static_assert(std::is_trivially_copyable_v<T>);
    need(sizeof(T));
    T v;
    std::memcpy(&v, in_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string_view getBytes() {
    auto n = get<uint32_t>();
    return getRaw(n);
  }
  std::string_view getRaw(size_t n) {
    need(n);
    auto v = in_.substr(pos_, n);
    pos_ += n;
    return v;
  }
  size_t remaining() const { return in_.size() - pos_; }
  bool done() const { return pos_ == in_.size(); }

 private:
  void need(size_t n) const {
    if (in_.size() - pos_ < n)
      throw ProtocolError(fmt::format("truncated frame: needed {} more bytes, {} left", n, in_.size() - pos_));
  }
  std::string_view in_;
  size_t pos_ = 0;
};

}  // namespace dtrain
