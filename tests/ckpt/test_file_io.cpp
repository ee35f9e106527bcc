#include <doctest/doctest.h>

#include <zlib.h>

#include <filesystem>
#include <random>

#include "lib/ckpt/file_io.h"
#include "lib/common/error.h"
#include "tests/support/process.h"

using namespace dtrain;
using namespace dtrain::ckpt;

namespace {
const std::string& dir() {
  static std::string d = dtrain::testing::tempDir("fileio");
  return d;
}
}  // namespace

TEST_CASE("FileSink writes exact bytes and crc32 across chunk boundaries, direct and buffered") {
  const size_t chunk = 4 * 4096;
  std::mt19937 rng(1);
  std::string content(3 * chunk + 4099, '\0');
  for (auto& c : content) c = static_cast<char>(rng());
  for (bool direct : {true, false}) {
    for (size_t size : {size_t{0}, size_t{1}, size_t{4095}, size_t{4096}, size_t{4097}, chunk - 1, chunk, chunk + 1,
                        content.size()}) {
      CAPTURE(direct);
      CAPTURE(size);
      const std::string path = dir() + "/sink";
      FileSink sink(path, {.direct = direct, .chunkBytes = chunk});
      // Uneven pieces, so copies straddle chunk edges.
      size_t off = 0, piece = 1;
      while (off < size) {
        size_t n = std::min(piece, size - off);
        sink.write(content.data() + off, n);
        off += n;
        piece = piece * 3 + 7;
      }
      CHECK(sink.bytesWritten() == size);
      FileRecord r = sink.finish();
      CHECK(r.size == size);
      CHECK(r.name == "sink");
      CHECK(r.crc32 == crc32(0, reinterpret_cast<const Bytef*>(content.data()), static_cast<uInt>(size)));
      CHECK(dtrain::testing::readFile(path) == content.substr(0, size));
      CHECK(checksumFile(path).crc32 == r.crc32);
      CHECK(checksumFile(path).size == size);
    }
  }
}

TEST_CASE("an unfinished sink removes its file; open errors name the path") {
  const std::string path = dir() + "/abandoned";
  {
    FileSink sink(path);
    sink.write("hello", 5);
  }
  CHECK_FALSE(std::filesystem::exists(path));
  CHECK_THROWS_WITH_AS(FileSink(dir() + "/no/such/dir/f"), doctest::Contains("open failed (No such file or directory)"),
                       CheckpointError);
}

TEST_CASE("small durable writes, crc helpers") {
  const std::string path = dir() + "/small";
  auto r = writeFileDurably(path, "abc");
  CHECK(r.size == 3);
  CHECK(r.crc32 == 0x352441c2u);  // crc32("abc")
  CHECK(crcHex(r.crc32) == "352441c2");
  CHECK(parseCrcHex("352441c2") == 0x352441c2u);
  CHECK_FALSE(parseCrcHex("352441c").has_value());
  CHECK_FALSE(parseCrcHex("35244XYZ").has_value());
  CHECK(crc32Of("abc") == 0x352441c2u);
  CHECK(readWholeFile(path) == "abc");
  CHECK_NOTHROW(syncDirectory(dir()));
  CHECK_THROWS_AS(checksumFile(dir() + "/missing"), CheckpointError);
}
