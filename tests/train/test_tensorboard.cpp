// TensorBoard event files (lib/train/tensorboard.h): CRC-32C and its mask, TFRecord framing, the Event encoding
// byte by byte, the writer, and the job's "logging" section. tests/integration/test_tensorboard.cpp reads what a
// real run writes with an independent reader (python3-protobuf).
#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>

#include "lib/common/error.h"
#include "lib/train/job.h"
#include "lib/train/tensorboard.h"
#include "tests/support/process.h"

using namespace dtrain;
using namespace dtrain::train;

namespace {

std::string bytes(std::initializer_list<int> list) {
  std::string s;
  for (int b : list) s += static_cast<char>(b);
  return s;
}

uint32_t le32(const std::string& s, size_t at) {
  uint32_t v;
  std::memcpy(&v, s.data() + at, 4);
  return v;
}

}  // namespace

TEST_CASE("CRC-32C matches the Castagnoli check value, and the mask is TensorFlow's") {
  CHECK(crc32c("123456789") == 0xE3069283u);  // the standard check value of CRC-32C
  CHECK(crc32c("") == 0u);
  const uint32_t c = crc32c("abc");
  CHECK(maskedCrc32c("abc") == static_cast<uint32_t>(((c >> 15) | (c << 17)) + 0xa282ead8u));
}

TEST_CASE("a TFRecord is length, its masked CRC, the payload, the payload's masked CRC") {
  std::string r = tfRecord("hello");
  REQUIRE(r.size() == 8 + 4 + 5 + 4);
  CHECK(r.substr(0, 8) == bytes({5, 0, 0, 0, 0, 0, 0, 0}));
  CHECK(le32(r, 8) == maskedCrc32c(r.substr(0, 8)));
  CHECK(r.substr(12, 5) == "hello");
  CHECK(le32(r, 17) == maskedCrc32c("hello"));
}

TEST_CASE("a scalar Event is encoded with the public field numbers") {
  // Event{wall_time: 1.5 (field 1, fixed64), step: 3 (field 2, varint),
  //       summary (field 5): Summary{value (field 1): Value{tag: "a" (field 1), simple_value: 2.0f (field 2, fixed32)}}}
  std::string expected = bytes({0x09, 0, 0, 0, 0, 0, 0, 0xF8, 0x3F, 0x10, 0x03, 0x2A, 0x0A, 0x0A, 0x08, 0x0A, 0x01,
                                'a', 0x15, 0, 0, 0, 0x40});
  CHECK(scalarEvent(1.5, 3, "a", 2.0f) == expected);
  // Step 0 is proto3's default and left out; file_version is field 3.
  CHECK(scalarEvent(1.5, 0, "a", 2.0f).substr(9, 1) == bytes({0x2A}));
  std::string version = fileVersionEvent(1.5);
  CHECK(version.substr(9) == std::string("\x1a\x0d") + "brain.Event:2");
  // A large step is a multi-byte varint.
  CHECK(scalarEvent(0, 300, "a", 0).substr(9, 3) == bytes({0x10, 0xAC, 0x02}));
}

TEST_CASE("the writer creates its folder and starts the file with the file version record") {
  std::string dir = testing::tempDir("tb") + "/a/b";
  std::filesystem::path path;
  {
    EventFileWriter w(dir);
    path = w.path();
    w.scalar("train/loss", 0.5, 10);
    w.flush();
  }
  CHECK(path.filename().string().rfind("events.out.tfevents.", 0) == 0);
  std::string data = testing::readFile(path.string());
  std::string first = tfRecord(fileVersionEvent(0)).substr(0, 8);  // same length, whatever the wall time
  REQUIRE(data.size() > 16);
  CHECK(data.substr(0, 8) == first);
  CHECK(data.find("train/loss") != std::string::npos);
  std::string blocker = testing::tempDir("tb") + "/file";
  testing::writeFile(blocker, "x");
  CHECK_THROWS_WITH_AS(EventFileWriter(blocker + "/sub"), doctest::Contains("logging.tensorboard"), Error);
}

TEST_CASE("the job's logging section: tensorboard on, unknown keys refused with exit code 2") {
  std::string dir = testing::tempDir("tbjob");
  const char* base = R"({
    "model": {"input": [4], "layers": [{"type": "linear", "out": 1}]}, "loss": {"type": "mse"},
    "data": {"train": {"format": "synthetic", "task": "regression", "samples": 16, "features": 4, "outputs": 1},
             "batch_size": 4},
    "optimizer": {"type": "sgd", "lr": 0.1}, %s})";
  auto load = [&](const std::string& logging) {
    char text[2048];
    std::snprintf(text, sizeof(text), base, logging.c_str());
    testing::writeFile(dir + "/job.json", text);
    return loadJob({.path = dir + "/job.json"});
  };
  CHECK_FALSE(load(R"("name": "x")").logging.tensorboard);
  CHECK(load(R"("logging": {"tensorboard": true})").logging.tensorboard);
  try {
    load(R"("logging": {"tensorbord": true})");
    FAIL("an unknown logging key was accepted");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("/logging") != std::string::npos);
    CHECK(std::string(e.what()).find("tensorbord") != std::string::npos);
    CHECK(e.exitCode() == 2);
  }
}
