#include <doctest/doctest.h>

#include <zlib.h>

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>

#include "lib/ckpt/safetensors.h"
#include "lib/common/error.h"
#include "tests/support/process.h"

using namespace dtrain;
using namespace dtrain::ckpt;
using nlohmann::json;

namespace {

// A tensor to write from borrowed (possibly const) bytes of any dtype.
NamedTensor named(std::string name, DType dtype, Shape shape, const void* data) {
  return {std::move(name), {const_cast<void*>(data), shape, dtype}};
}

const std::string& dir() {
  static std::string d = dtrain::testing::tempDir("safetensors");
  return d;
}

// An independent minimal safetensors reader, written from the format description only: returns name -> (dtype,
// shape, bytes) and the metadata, checking the 8-byte alignment of the data section.
struct MiniTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};
std::map<std::string, MiniTensor> miniRead(const std::string& file, json* metadata = nullptr) {
  REQUIRE(file.size() >= 8);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = n << 8 | static_cast<unsigned char>(file[static_cast<size_t>(i)]);
  REQUIRE(8 + n <= file.size());
  CHECK((8 + n) % 8 == 0);
  const std::string header = file.substr(8, n);
  CHECK(header.find_last_not_of(' ') + 1 <= header.size());
  json h = json::parse(header);
  std::map<std::string, MiniTensor> out;
  for (auto& [k, v] : h.items()) {
    if (k == "__metadata__") {
      if (metadata) *metadata = v;
      continue;
    }
    uint64_t b = v["data_offsets"][0], e = v["data_offsets"][1];
    REQUIRE(8 + n + e <= file.size());
    out[k] = {v["dtype"], v["shape"].get<std::vector<int64_t>>(), file.substr(8 + n + b, e - b)};
  }
  return out;
}

std::string messageOf(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const CheckpointError& e) {
    return e.what();
  }
  return "(no CheckpointError)";
}

std::string patterned(size_t n, uint32_t seed) {
  std::string s(n, '\0');
  std::mt19937 rng(seed);
  for (auto& c : s) c = static_cast<char>(rng());
  return s;
}

}  // namespace

TEST_CASE("every dtype round-trips through writer, reader and an independent minimal reader") {
  struct Case {
    DType dtype;
    const char* name;
    size_t size;
  };
  const Case cases[] = {{DType::kFloat32, "F32", 4},   {DType::kFloat64, "F64", 8}, {DType::kInt32, "I32", 4},
                        {DType::kInt64, "I64", 8},   {DType::kBFloat16, "BF16", 2}, {DType::kFloat16, "F16", 2},
                        {DType::kUInt8, "U8", 1},     {DType::kInt8, "I8", 1},   {DType::kInt16, "I16", 2},
                        {DType::kUInt16, "U16", 2},   {DType::kUInt32, "U32", 4}, {DType::kUInt64, "U64", 8},
                        {DType::kBool, "BOOL", 1}};
  std::vector<std::string> payloads;
  std::vector<NamedTensor> views;
  uint32_t seed = 1;
  for (const auto& c : cases) {
    CHECK(dtypeSize(c.dtype) == c.size);
    CHECK(std::string(safetensorsName(c.dtype)) == c.name);
    CHECK(parseSafetensorsDType(c.name) == c.dtype);
    payloads.push_back(patterned(3 * 5 * c.size, seed++));
  }
  for (size_t i = 0; i < std::size(cases); ++i)
    views.push_back(named(std::string("t.") + cases[i].name, cases[i].dtype, {3, 5}, payloads[i].data()));
  views.push_back(named("scalar", DType::kFloat32, {}, payloads[0].data()));
  views.push_back(named("empty", DType::kFloat32, {0, 7}, nullptr));
  const std::string path = dir() + "/all.safetensors";
  auto rec = writeSafetensorsFile(path, views, {{"format", "pt"}, {"step", "12"}});
  const std::string bytes = dtrain::testing::readFile(path);
  CHECK(rec.size == bytes.size());
  CHECK(rec.crc32 == crc32(0, reinterpret_cast<const Bytef*>(bytes.data()), static_cast<uInt>(bytes.size())));
  CHECK(rec.name == "all.safetensors");
  CHECK_FALSE(std::filesystem::exists(dir() + "/.all.safetensors.tmp-" + std::to_string(::getpid())));

  json meta;
  auto mini = miniRead(bytes, &meta);
  CHECK(meta == json{{"format", "pt"}, {"step", "12"}});
  REQUIRE(mini.size() == views.size());
  for (size_t i = 0; i < std::size(cases); ++i) {
    const auto& t = mini.at(views[i].name);
    CHECK(t.dtype == cases[i].name);
    CHECK(t.shape == std::vector<int64_t>{3, 5});
    CHECK(t.bytes == payloads[i]);
  }
  CHECK(mini.at("scalar").bytes == payloads[0].substr(0, 4));
  CHECK(mini.at("empty").bytes.empty());

  for (auto access : {SafetensorsFile::Access::kMmap, SafetensorsFile::Access::kRead}) {
    auto f = SafetensorsFile::open(path, access);
    CHECK(f.metadata().at("step") == "12");
    CHECK(f.tensors().size() == views.size());
    CHECK(f.tensors().front().name == "t.F32");  // data order = write order
    for (size_t i = 0; i < std::size(cases); ++i) {
      const TensorInfo* t = f.find(views[i].name);
      REQUIRE(t != nullptr);
      CHECK(t->dtype == cases[i].dtype);
      auto span = f.data(*t);
      CHECK(std::string(reinterpret_cast<const char*>(span.data()), span.size()) == payloads[i]);
      std::string dst(payloads[i].size(), '\0');
      f.readInto(views[i].name, cases[i].dtype, {3, 5}, std::as_writable_bytes(std::span<char>(dst.data(), dst.size())));
      CHECK(dst == payloads[i]);
    }
    SafetensorsFile moved = std::move(f);
    CHECK(moved.find("scalar") != nullptr);
  }
}

TEST_CASE("the header matches the reference implementation's bytes for a simple file") {
  // safetensors (Rust/Python) writes {"a": tensor([1., 2.])} as this header, padded with spaces to 8 bytes.
  const float data[2] = {1.0f, 2.0f};
  NamedTensor v = named("a", DType::kFloat32, {2}, data);
  const std::string header = safetensorsHeader(std::span<const NamedTensor>(&v, 1));
  const std::string json = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  std::string expected(8, '\0');
  expected[0] = 56;
  expected += json + "  ";
  CHECK(header == expected);
  // ... and a file in that layout, as another tool would write it, reads back.
  auto f = SafetensorsFile::fromBytes(expected + std::string(reinterpret_cast<const char*>(data), 8), "ref");
  float out[2];
  f.readInto("a", DType::kFloat32, {2}, std::as_writable_bytes(std::span<float>(out, 2)));
  CHECK(out[1] == 2.0f);
}

TEST_CASE("writer refuses duplicate names, bad shapes and missing data") {
  float x = 0;
  std::vector<NamedTensor> dup = {named("w", DType::kFloat32, {1}, &x), named("w", DType::kFloat32, {1}, &x)};
  CHECK(messageOf([&] { safetensorsHeader(dup); }) == "safetensors: duplicate tensor name 'w'");
  std::vector<NamedTensor> neg = {named("w", DType::kFloat32, {-1}, &x)};
  CHECK(messageOf([&] { safetensorsHeader(neg); }) == "safetensors: tensor 'w' has invalid shape [-1]");
  std::vector<NamedTensor> null = {named("w", DType::kFloat32, {2}, nullptr)};
  CHECK(messageOf([&] { safetensorsHeader(null); }) == "safetensors: tensor 'w' has no data");
}

// A strided view (TensorView::ld) would be written and read as numel contiguous values from its data, the wrong ones:
// refused as an internal error (before: written silently, rows 1.. taken from the gaps).
TEST_CASE("writer and readInto refuse a strided view") {
  float x[2 * 4] = {1, 2, 3, 4, 5, 6, 7, 8};
  TensorView strided = TensorView::of(x, Shape{2, 2});
  strided.ld = 4;
  const std::vector<NamedTensor> v = {{"w", strided}};
  auto internal = [](const std::function<void()>& fn) -> std::string {
    try {
      fn();
    } catch (const CheckpointError&) {
      return "(CheckpointError)";
    } catch (const Error& e) {
      return e.code() == ExitCode::kInternal ? e.what() : "(another error)";
    }
    return "(no error)";
  };
  CHECK(internal([&] { safetensorsHeader(v); }) ==
        "internal error: safetensors: tensor 'w' needs a packed tensor, but got a strided view: float32 [2, 2] with rows 4 "
        "elements apart (ld), not 2");
  const float packed[4] = {1, 2, 5, 6};
  std::vector<NamedTensor> good = {named("w", DType::kFloat32, {2, 2}, packed)};
  auto f = SafetensorsFile::fromBytes(safetensorsHeader(good) + std::string(reinterpret_cast<const char*>(packed), 16),
                                      "m.safetensors");
  CHECK(internal([&] { f.readInto("w", strided); }).starts_with(
      "internal error: m.safetensors: reading tensor 'w' needs a packed tensor"));
}

TEST_CASE("corrupt headers and truncated data are errors naming the file, never crashes") {
  const float data[4] = {1, 2, 3, 4};
  std::vector<NamedTensor> v = {named("a", DType::kFloat32, {2}, data), named("b", DType::kFloat32, {2}, data + 2)};
  const std::string good = safetensorsHeader(v) + std::string(reinterpret_cast<const char*>(data), 16);
  auto parse = [](const std::string& bytes) { return messageOf([&] { SafetensorsFile::fromBytes(bytes, "f"); }); };

  CHECK(parse(good.substr(0, good.size() - 1)) ==
        "f: tensors cover 16 data bytes but the file holds 15 (truncated or extended file)");
  CHECK(parse(good + "x") == "f: tensors cover 16 data bytes but the file holds 17 (truncated or extended file)");
  CHECK(parse("abc") == "f: 3 bytes, too short for a safetensors file (expected >= 8)");
  std::string huge = good;
  huge[5] = 1;  // header length ~ 2^40
  CHECK(parse(huge).find("exceeds the 100 MB limit") != std::string::npos);
  std::string past = good;
  past[0] = static_cast<char>(200);
  CHECK(parse(past).find("runs past the end") != std::string::npos);

  auto withHeader = [&](const std::string& json, const std::string& payload) {
    std::string h = json;
    while ((8 + h.size()) % 8) h += ' ';
    std::string s(8, '\0');
    uint64_t n = h.size();
    std::memcpy(s.data(), &n, 8);
    return s + h + payload;
  };
  CHECK(parse(withHeader("[1,2]", "")) == "f: header does not start with '{'");
  CHECK(parse(withHeader("{\"a\": ", "")).find("f: header is not valid JSON") == 0);
  CHECK(parse(withHeader(R"({"a":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}})", "abcd")) ==
        "f: tensor 'a': unknown dtype \"F99\"");
  CHECK(parse(withHeader(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", "abcd")) ==
        "f: tensor 'a': shape [2] of F32 needs 8 bytes, data_offsets [0, 4] hold 4");
  CHECK(parse(withHeader(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", "abcd")) ==
        "f: tensor 'a': data_offsets [4, 0] end before begin");
  CHECK(parse(withHeader(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                         R"("b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                         "abcd")) == "f: tensor 'b' starts at data offset 0, expected 4 (overlapping or gapped offsets)");
  CHECK(parse(withHeader(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", "abcd")) ==
        "f: tensor 'a': bad shape [-1]");
  CHECK(parse(withHeader(R"({"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,4]}})", "abcd"))
            .find("needs too many bytes") != std::string::npos);
  CHECK(parse(withHeader(R"({"__metadata__":{"k":1}})", "")) == "f: __metadata__ value of 'k' is not a string");
  CHECK(parse(withHeader(R"({"a":[]})", "")) ==
        R"(f: tensor 'a': expected {"dtype", "shape", "data_offsets"})");
}

TEST_CASE("every truncation and many byte flips of a valid file are rejected or read within bounds") {
  const double data[3] = {1.5, -2.5, 3.25};
  std::vector<NamedTensor> v = {named("x", DType::kFloat64, {3}, data), named("y", DType::kUInt8, {1}, "z")};
  const std::string good = safetensorsHeader(v, {{"k", "v"}}) + std::string(reinterpret_cast<const char*>(data), 24) + "z";
  CHECK_NOTHROW(SafetensorsFile::fromBytes(good, "good"));
  for (size_t cut = 0; cut < good.size(); ++cut) {
    CAPTURE(cut);
    CHECK_THROWS_AS(SafetensorsFile::fromBytes(good.substr(0, cut), "cut"), CheckpointError);
  }
  std::mt19937 rng(5);
  int rejected = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string bad = good;
    bad[rng() % bad.size()] ^= static_cast<char>(1 + rng() % 255);
    try {
      auto f = SafetensorsFile::fromBytes(bad, "flip");
      for (const auto& t : f.tensors()) {  // accepted: every span must lie inside the file
        auto s = f.data(t);
        volatile unsigned char sink = 0;
        for (auto b : s) sink = sink ^ static_cast<unsigned char>(b);
        (void)sink;
      }
    } catch (const CheckpointError&) {
      ++rejected;
    }
  }
  CHECK(rejected > 100);
}

TEST_CASE("readInto checks name, dtype, shape and destination size") {
  const int32_t data[6] = {1, 2, 3, 4, 5, 6};
  std::vector<NamedTensor> v = {named("0.weight", DType::kInt32, {2, 3}, data)};
  auto f = SafetensorsFile::fromBytes(safetensorsHeader(v) + std::string(reinterpret_cast<const char*>(data), 24),
                                      "model.safetensors");
  std::vector<std::byte> dst(24);
  CHECK(messageOf([&] { f.readInto("1.weight", DType::kInt32, {2, 3}, dst); }) ==
        "model.safetensors: no tensor named '1.weight'");
  CHECK(messageOf([&] { f.readInto("0.weight", DType::kFloat32, {2, 3}, dst); }) ==
        "model.safetensors: tensor '0.weight' has dtype I32, expected F32");
  CHECK(messageOf([&] { f.readInto("0.weight", DType::kInt32, {3, 2}, dst); }) ==
        "model.safetensors: tensor '0.weight' has shape [2, 3], expected [3, 2]");
  std::vector<std::byte> small(20);
  CHECK(messageOf([&] { f.readInto("0.weight", DType::kInt32, {2, 3}, small); }) ==
        "model.safetensors: tensor '0.weight' has 24 bytes, the destination 20");
  f.readInto("0.weight", DType::kInt32, {2, 3}, dst);
  CHECK(std::memcmp(dst.data(), data, 24) == 0);
  CHECK(messageOf([] { SafetensorsFile::open("/nonexistent/x.safetensors"); }) ==
        "/nonexistent/x.safetensors: cannot open (No such file or directory)");
}
