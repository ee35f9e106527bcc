#include <doctest/doctest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include "lib/common/error.h"
#include "lib/data/formats.h"
#include "tests/data/data_files.h"
#include "tests/support/process.h"

using namespace dtrain;
using namespace dtrain::data;
using dtrain::testing::idxBytes;
using dtrain::testing::npyBytes;
using dtrain::testing::rawBytes;
using dtrain::testing::writeBytes;

namespace {

std::string tmp(const std::string& name) {
  static std::string dir = dtrain::testing::tempDir("formats");
  return dir + "/" + name;
}

std::string messageOf(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no ConfigError)";
}

template <typename T>
std::vector<T> as(const RawArray& a) {
  std::vector<T> v(a.bytes.size() / sizeof(T));
  std::memcpy(v.data(), a.bytes.data(), a.bytes.size());
  return v;
}

}  // namespace

TEST_CASE("IDX images and labels read plain and gzipped, shapes from the header") {
  std::string pixels;
  for (int i = 0; i < 2 * 3 * 4; ++i) pixels.push_back(static_cast<char>(i * 10));
  for (bool gz : {false, true}) {
    CAPTURE(gz);
    const std::string images = tmp(gz ? "img.gz" : "img"), labels = tmp(gz ? "lab.gz" : "lab");
    writeBytes(images, idxBytes(0x08, {2, 3, 4}, pixels), gz);
    writeBytes(labels, idxBytes(0x08, {2}, std::string("\x07\x02", 2)), gz);
    auto a = readIdx(images, 3, "images");
    CHECK(a.type == DType::kUInt8);
    CHECK(a.shape == Shape{2, 3, 4});
    CHECK(a.bytes.size() == 24);
    CHECK(std::to_integer<int>(a.bytes[23]) == 230);
    auto l = readIdx(labels, 1, "labels");
    CHECK(l.shape == Shape{2});
    CHECK(std::to_integer<int>(l.bytes[0]) == 7);
  }
}

TEST_CASE("IDX multi-byte types are converted from big-endian") {
  std::string be = {0x00, 0x01, static_cast<char>(0xff), static_cast<char>(0xfe)};  // int16: 1, -2
  writeBytes(tmp("i16"), idxBytes(0x0B, {2}, be));
  auto a = readIdx(tmp("i16"), 1, "labels");
  CHECK(a.type == DType::kInt16);
  CHECK(as<int16_t>(a) == std::vector<int16_t>{1, -2});
  std::string f = {0x3f, static_cast<char>(0x80), 0, 0};  // 1.0f big-endian
  writeBytes(tmp("f32"), idxBytes(0x0D, {1, 1, 1}, f));
  CHECK(as<float>(readIdx(tmp("f32"), 3, "images")) == std::vector<float>{1.0f});
}

TEST_CASE("IDX errors name the file and what was expected") {
  const std::string p = tmp("bad.gz");
  writeBytes(p, std::string(8, '\0'), true);
  CHECK(messageOf([&] { readIdx(p, 1, "labels"); }) ==
        p + ": bad IDX magic 0x00000000 (expected 0x00000801 for labels)");
  writeBytes(p, idxBytes(0x08, {5}, "abcde"), true);  // a labels file given as images
  CHECK(messageOf([&] { readIdx(p, 3, "images"); }) ==
        p + ": bad IDX magic 0x00000801 (expected 0x00000803 for images)");
  writeBytes(p, idxBytes(0x08, {2, 2, 2}, "1234567"), true);
  CHECK(messageOf([&] { readIdx(p, 3, "images"); }) ==
        p + ": IDX data has 7 bytes, expected 8 for shape [2, 2, 2] of uint8");
  writeBytes(p, "ab");
  CHECK(messageOf([&] { readIdx(p, 3, "images"); }) == p + ": file too short for an IDX header (2 bytes)");
  CHECK(messageOf([&] { readIdx(tmp("missing"), 3, "images"); }) ==
        tmp("missing") + ": cannot open (No such file or directory)");
}

TEST_CASE("a truncated gzip file is an error, not short data") {
  const std::string whole = tmp("whole.gz");
  std::string pixels(5000, '\0');
  for (size_t i = 0; i < pixels.size(); ++i) pixels[i] = static_cast<char>(i * 7919 % 251);
  writeBytes(whole, idxBytes(0x08, {5, 10, 100}, pixels), true);
  auto gz = dtrain::testing::readFile(whole);
  const std::string cut = tmp("cut.gz");
  writeBytes(cut, gz.substr(0, gz.size() / 2));
  CHECK(messageOf([&] { readIdx(cut, 3, "images"); }).find("corrupt or truncated gzip data") != std::string::npos);
}

TEST_CASE("NPY v1/v2 arrays of every supported dtype") {
  writeBytes(tmp("f4.npy"), npyBytes("<f4", {2, 3}, rawBytes(std::vector<float>{1, 2, 3, 4, 5, 6.5f})));
  auto a = readNpy(tmp("f4.npy"));
  CHECK(a.type == DType::kFloat32);
  CHECK(a.shape == Shape{2, 3});
  CHECK(as<float>(a)[5] == 6.5f);

  writeBytes(tmp("f8.npy"), npyBytes("<f8", {3}, rawBytes(std::vector<double>{0.5, -1, 2}), 2));
  auto b = readNpy(tmp("f8.npy"));
  CHECK(b.type == DType::kFloat64);
  CHECK(b.shape == Shape{3});
  CHECK(as<double>(b)[1] == -1.0);

  writeBytes(tmp("u1.npy.gz"), npyBytes("|u1", {4, 1, 2}, std::string(8, '\x05')), true);
  auto c = readNpy(tmp("u1.npy.gz"));
  CHECK(c.type == DType::kUInt8);
  CHECK(c.shape == Shape{4, 1, 2});

  for (auto [descr, type, width] : {std::tuple{"<i8", DType::kInt64, 8}, std::tuple{"<i4", DType::kInt32, 4},
                                    std::tuple{"<i2", DType::kInt16, 2}, std::tuple{"|i1", DType::kInt8, 1},
                                    std::tuple{"<u2", DType::kUInt16, 2}, std::tuple{"|b1", DType::kUInt8, 1}}) {
    CAPTURE(descr);
    writeBytes(tmp("x.npy"), npyBytes(descr, {5}, std::string(5 * static_cast<size_t>(width), '\0')));
    auto x = readNpy(tmp("x.npy"));
    CHECK(x.type == type);
    CHECK(x.shape == Shape{5});
  }
}

TEST_CASE("NPY errors: Fortran order, big-endian, truncated data, not an NPY file") {
  const std::string p = tmp("e.npy");
  writeBytes(p, npyBytes("<f4", {2, 2}, std::string(16, '\0'), 1, /*fortran=*/true));
  CHECK(messageOf([&] { readNpy(p); }).find("Fortran-order array (expected C order") != std::string::npos);
  writeBytes(p, npyBytes(">f4", {2}, std::string(8, '\0')));
  CHECK(messageOf([&] { readNpy(p); }) ==
        p + ": NPY dtype '>f4' not supported (expected little-endian u1, i1, i2, u2, i4, i8, f4, f8 or b1)");
  writeBytes(p, npyBytes("<f4", {2, 2}, std::string(15, '\0')));
  CHECK(messageOf([&] { readNpy(p); }) == p + ": NPY data has 15 bytes, expected 16 for shape [2, 2] of float32");
  writeBytes(p, "hello world, not numpy");
  CHECK(messageOf([&] { readNpy(p); }) == p + ": not an NPY file (expected the magic \\x93NUMPY)");
}

TEST_CASE("CSV: header detection, label by name, index or negative index, quoted cells") {
  const std::string p = tmp("a.csv");
  writeBytes(p, "x1,\"x,2\",label\n1.5,2,0\n\n-3,4e-1,2\r\n");
  CsvOptions o;
  o.labelColumns = {std::string("label")};
  auto t = readCsv(p, o);
  CHECK(t.features.shape == Shape{2, 2});
  CHECK(as<float>(t.features) == std::vector<float>{1.5f, 2, -3, 0.4f});
  CHECK(t.featureNames == std::vector<std::string>{"x1", "x,2"});
  CHECK(t.labels.kind == LabelKind::kClass);
  CHECK(t.labels.classes == std::vector<int32_t>{0, 2});

  o.labelColumns = {int64_t{0}};
  auto u = readCsv(p, o);
  CHECK(as<float>(u.features) == std::vector<float>{2, 0, 0.4f, 2});
  CHECK(u.labels.kind == LabelKind::kTarget);  // 1.5 is fractional
  CHECK(u.labels.targets == std::vector<float>{1.5f, -3});
  CHECK(u.labels.shape == Shape{1});

  writeBytes(p, "1,2,3\n4,5,6\n");  // no header: first row is data
  o.labelColumns = {int64_t{-1}};
  auto v = readCsv(p, o);
  CHECK(v.features.shape == Shape{2, 2});
  CHECK(v.labels.classes == std::vector<int32_t>{3, 6});
  o.labelKind = LabelKind::kTarget;
  o.labelColumns = {int64_t{1}, int64_t{2}};
  auto w = readCsv(p, o);
  CHECK(w.labels.shape == Shape{2});
  CHECK(w.labels.targets == std::vector<float>{2, 3, 5, 6});
}

TEST_CASE("CSV: text class labels become sorted class ids with names") {
  const std::string p = tmp("iris.csv");
  writeBytes(p, "a,b,species\n1,2,virginica\n3,4,setosa\n5,6,virginica\n");
  CsvOptions o;
  o.labelColumns = {std::string("species")};
  auto t = readCsv(p, o);
  CHECK(t.labels.classNames == std::vector<std::string>{"setosa", "virginica"});
  CHECK(t.labels.classes == std::vector<int32_t>{1, 0, 1});
  CHECK(*t.labels.numClasses == 2);
}

TEST_CASE("CSV errors name the line, the column and the bad cell") {
  const std::string p = tmp("bad.csv");
  writeBytes(p, "a,b,y\n1,2,0\n3,abc,1\n");
  CsvOptions o;
  o.labelColumns = {std::string("y")};
  CHECK(messageOf([&] { readCsv(p, o); }) == p + ":3: column 'b' (1): cannot parse 'abc' as a number");
  writeBytes(p, "a,b,y\n1,2,0\n3,1\n");
  CHECK(messageOf([&] { readCsv(p, o); }) == p + ":3: 2 cells, expected 3 (as in the header)");
  writeBytes(p, "a,b,y\n1,2,0\n");
  o.labelColumns = {std::string("z")};
  CHECK(messageOf([&] { readCsv(p, o); }) == p + ": no column named 'z' (columns: a, b, y)");
  o.labelColumns = {int64_t{3}};
  CHECK(messageOf([&] { readCsv(p, o); }) == p + ": label column index 3 out of range (the file has 3 columns)");
  writeBytes(p, "1,2,0\n");
  o.labelColumns = {std::string("y")};
  CHECK(messageOf([&] { readCsv(p, o); }) ==
        p + ": label column 'y' given by name, but the file has no header row");
  writeBytes(p, "a,y\n1,-1\n");
  o.labelColumns = {std::string("y")};
  o.labelKind = LabelKind::kClass;
  CHECK(messageOf([&] { readCsv(p, o); }) ==
        p + ":2: label column 'y' (1): '-1' is not a class index (expected an integer >= 0)");
  writeBytes(p, "");
  CHECK(messageOf([&] { readCsv(p, o); }) == p + ": empty CSV file");
}

TEST_CASE("a gzip bomb is stopped at the size its header declares, in memory as in time") {
  const std::string bomb = tmp("bomb.gz");
  {
    std::string content = idxBytes(0x08, {2, 2, 2}, std::string(8, '\x01')) + std::string(96u << 20, '\0');
    writeBytes(bomb, content, true);
  }
  CHECK(std::filesystem::file_size(bomb) < (1u << 20));
  CHECK(messageOf([&] { readIdx(bomb, 3, "images"); }) ==
        bomb + ": the gzip data inflates to more than the 24 bytes its header declares (a corrupt file or a gzip "
               "bomb); stopped there");
  // The header-only read (what the launcher does) needs only the trailer to refuse it.
  CHECK(messageOf([&] { readIdx(bomb, 3, "images", ReadMode::kHeader); })
            .find(": IDX data has 100663304 bytes, expected 8 for shape [2, 2, 2] of uint8 (by the gzip trailer's size")
        != std::string::npos);
  // Peak memory of a child that reads it: far below the 96 MiB it inflates to (before the bound it took all of it).
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    struct rusage before {}, after {};
    ::getrusage(RUSAGE_SELF, &before);
    try {
      readIdx(bomb, 3, "images");
    } catch (...) {
    }
    ::getrusage(RUSAGE_SELF, &after);
    ::_exit(after.ru_maxrss - before.ru_maxrss < 16 * 1024 ? 0 : 1);  // KiB
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("header-only reads give shape and type without the data, and check sizes against the file") {
  std::string pixels(2 * 3 * 4, '\x05');
  for (bool gz : {false, true}) {
    CAPTURE(gz);
    const std::string images = tmp(gz ? "probe.gz" : "probe");
    writeBytes(images, idxBytes(0x08, {2, 3, 4}, pixels), gz);
    auto a = readIdx(images, 3, "images", ReadMode::kHeader);
    CHECK(a.probed);
    CHECK(a.shape == Shape{2, 3, 4});
    CHECK(a.bytes.empty());
    // One byte short: the plain file's size, or the gzip trailer, gives it away without reading the data.
    const std::string shortFile = tmp(gz ? "probe_short.gz" : "probe_short");
    writeBytes(shortFile, idxBytes(0x08, {2, 3, 4}, pixels.substr(1)), gz);
    CHECK(messageOf([&] { readIdx(shortFile, 3, "images", ReadMode::kHeader); })
              .find(shortFile + ": IDX data has 23 bytes, expected 24 for shape [2, 3, 4] of uint8") == 0);
  }
  const std::string npy = tmp("probe.npy");
  writeBytes(npy, npyBytes("<f4", {2, 2}, std::string(16, '\0')));
  auto n = readNpy(npy, ReadMode::kHeader);
  CHECK(n.probed);
  CHECK(n.shape == Shape{2, 2});
  CHECK(n.type == DType::kFloat32);
  // A header that declares more than the file could ever hold is refused before any allocation.
  const std::string huge = tmp("huge.gz");
  writeBytes(huge, idxBytes(0x08, {4000000, 1000, 1000}, std::string(16, '\0')), true);
  CHECK(messageOf([&] { readIdx(huge, 3, "images"); }).find("the header declares 4000000000016 bytes but a gzip file of") !=
        std::string::npos);
}

namespace {

bool sameBytes(const RawArray& a, const std::string& expected) {
  return a.bytes.size() == expected.size() && std::memcmp(a.bytes.data(), expected.data(), expected.size()) == 0;
}

}  // namespace

TEST_CASE("the data cache is mapped read-only; rewriting it leaves a mapped reader's bytes intact") {
  const std::string dir = tmp("cache");
  REQUIRE(::setenv("DTRAIN_DATA_CACHE", dir.c_str(), 1) == 0);
  // 5 MiB of uint8 pixels: over the 4 MiB from which .gz datasets are cached.
  std::string pixels(5 * 1024 * 1024, '\0');
  for (size_t i = 0; i < pixels.size(); ++i) pixels[i] = static_cast<char>((i * 131) % 251);
  const std::string images = tmp("cached.gz");
  writeBytes(images, idxBytes(0x08, {5 * 1024, 32, 32}, pixels), true);

  auto inflated = readIdx(images, 3, "images");  // inflates, writes the cache, and maps it rather than keep its copy
  CHECK(inflated.bytes.mapped());
  CHECK(sameBytes(inflated, pixels));
  std::vector<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.path().extension() == ".raw") files.push_back(e.path().string());  // (beside it: its lock file)
  REQUIRE(files.size() == 1);
  const std::string cache = files[0];
  const auto cacheBytes = static_cast<off_t>(64 + 16 + pixels.size());  // the cache's header, the IDX file

  auto a = readIdx(images, 3, "images");  // a cache hit: mapped, not read
  CHECK(a.bytes.mapped());
  CHECK(sameBytes(a, pixels));
  CHECK(a.shape == Shape{5 * 1024, 32, 32});
  struct stat before {};
  REQUIRE(::stat(cache.c_str(), &before) == 0);

  // One byte appended (in place: the mapped range stays as it was): the size no longer matches, so the next
  // load inflates again and rewrites the cache - as a new file renamed over the old one, never in place (a
  // mapping of a file truncated underneath it would die of SIGBUS).
  {
    std::FILE* f = std::fopen(cache.c_str(), "ab");
    REQUIRE(f != nullptr);
    std::fputc('x', f);
    std::fclose(f);
  }
  auto b = readIdx(images, 3, "images");
  CHECK(b.bytes.mapped());  // the rewritten cache
  CHECK(sameBytes(b, pixels));
  struct stat after {};
  REQUIRE(::stat(cache.c_str(), &after) == 0);
  CHECK(after.st_ino != before.st_ino);
  CHECK(after.st_size == cacheBytes);
  CHECK(sameBytes(a, pixels));  // the mapping still reads the old file

  // A truncated cache file is no error and no crash: the .gz is inflated again and the cache rewritten whole.
  REQUIRE(::truncate(cache.c_str(), 100) == 0);
  auto c = readIdx(images, 3, "images");
  CHECK(c.bytes.mapped());
  CHECK(sameBytes(c, pixels));
  REQUIRE(::stat(cache.c_str(), &after) == 0);
  CHECK(after.st_size == cacheBytes);
  auto d = readIdx(images, 3, "images");
  CHECK(d.bytes.mapped());
  CHECK(sameBytes(d, pixels));
  CHECK(sameBytes(a, pixels));

  // Wider IDX types are byte-swapped in memory, so their cache is read, not mapped.
  std::string shorts(5 * 1024 * 1024, '\x01');
  const std::string wide = tmp("cached16.gz");
  writeBytes(wide, idxBytes(0x0B, {5 * 1024 * 512}, shorts), true);
  readIdx(wide, 1, "labels");
  auto w = readIdx(wide, 1, "labels");
  CHECK_FALSE(w.bytes.mapped());
  CHECK(w.bytes.size() == shorts.size());
  ::unsetenv("DTRAIN_DATA_CACHE");
}

namespace {

// A gzip file of stored blocks (level 0): its size depends on the content's length alone, so two versions of the
// same length have the same size.
void writeStoredGzip(const std::string& path, const std::string& content) {
  gzFile gz = ::gzopen(path.c_str(), "wb0");
  REQUIRE(gz != nullptr);
  REQUIRE(::gzwrite(gz, content.data(), static_cast<unsigned>(content.size())) == static_cast<int>(content.size()));
  REQUIRE(::gzclose(gz) == Z_OK);
}

std::string pixelsOf(size_t n, int seed) {
  std::string p(n, '\0');
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<char>((i * 131 + static_cast<size_t>(seed)) % 251);
  return p;
}

}  // namespace

TEST_CASE("a data cache built from another version of its .gz is rebuilt, not used: content, mtime or size") {
  const std::string dir = tmp("cache-versions");
  REQUIRE(::setenv("DTRAIN_DATA_CACHE", dir.c_str(), 1) == 0);
  const std::string images = tmp("versions.gz");
  const size_t n = 5 * 1024 * 32 * 32;  // over the 4 MiB from which .gz datasets are cached
  writeStoredGzip(images, idxBytes(0x08, {5 * 1024, 32, 32}, pixelsOf(n, 0)));
  struct stat first {};
  REQUIRE(::stat(images.c_str(), &first) == 0);
  readIdx(images, 3, "images");  // inflates, writes the cache
  auto a = readIdx(images, 3, "images");
  CHECK(a.bytes.mapped());
  CHECK(sameBytes(a, pixelsOf(n, 0)));

  // Other pixels, same size, and the old mtime put back (cp -p, rsync -t, a restore): the cache held the old
  // pixels and was used silently.
  writeStoredGzip(images, idxBytes(0x08, {5 * 1024, 32, 32}, pixelsOf(n, 7)));
  const struct timespec times[2] = {first.st_atim, first.st_mtim};
  REQUIRE(::utimensat(AT_FDCWD, images.c_str(), times, 0) == 0);
  struct stat second {};
  REQUIRE(::stat(images.c_str(), &second) == 0);
  REQUIRE(second.st_size == first.st_size);
  REQUIRE(second.st_mtim.tv_nsec == first.st_mtim.tv_nsec);
  const auto inode = [&] {
    struct stat st {};
    for (const auto& e : std::filesystem::directory_iterator(dir))
      if (e.path().extension() == ".raw") REQUIRE(::stat(e.path().c_str(), &st) == 0);
    return st.st_ino;
  };
  const auto builtFirst = inode();
  auto b = readIdx(images, 3, "images");
  CHECK(inode() != builtFirst);  // inflated anew, the cache rewritten
  CHECK(sameBytes(b, pixelsOf(n, 7)));
  auto c = readIdx(images, 3, "images");
  CHECK(c.bytes.mapped());  // the rebuilt cache
  CHECK(sameBytes(c, pixelsOf(n, 7)));
  CHECK(sameBytes(a, pixelsOf(n, 0)));  // a reader of the old cache keeps its bytes (replaced by rename)

  // Only the mtime changes (touch): rebuilt too, as it always was.
  const struct timespec later[2] = {{0, UTIME_OMIT}, {first.st_mtim.tv_sec + 10, first.st_mtim.tv_nsec}};
  REQUIRE(::utimensat(AT_FDCWD, images.c_str(), later, 0) == 0);
  const auto builtSecond = inode();
  CHECK(readIdx(images, 3, "images").bytes.mapped());
  CHECK(inode() != builtSecond);

  // Another size: rebuilt, and it replaces the source's cache file rather than adding one per version.
  writeStoredGzip(images, idxBytes(0x08, {5 * 1024 + 1, 32, 32}, pixelsOf(n + 1024, 3)));
  auto d = readIdx(images, 3, "images");
  CHECK(sameBytes(d, pixelsOf(n + 1024, 3)));
  CHECK(d.shape == Shape{5 * 1024 + 1, 32, 32});
  CHECK(sameBytes(readIdx(images, 3, "images"), pixelsOf(n + 1024, 3)));
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) files += e.path().extension() == ".raw" ? 1 : 0;
  CHECK(files == 1);
  ::unsetenv("DTRAIN_DATA_CACHE");
}

TEST_CASE("the first load of a .gz maps the cache it wrote; concurrent first loads all map the one cache") {
  const std::string dir = tmp("cache-first");
  REQUIRE(::setenv("DTRAIN_DATA_CACHE", dir.c_str(), 1) == 0);
  const std::string images = tmp("first.gz");
  const size_t n = 5 * 1024 * 32 * 32;
  writeStoredGzip(images, idxBytes(0x08, {5 * 1024, 32, 32}, pixelsOf(n, 1)));
  // Four processes load it at once (as a node's workers do at their first start): each ends up with the mapping, no
  // private copy of the data stays (they inflated one at a time under the cache's lock; the later ones found it).
  std::vector<pid_t> pids;
  for (int i = 0; i < 4; ++i) {
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      int rc = 1;
      try {
        auto a = readIdx(images, 3, "images");
        rc = a.bytes.mapped() && sameBytes(a, pixelsOf(n, 1)) ? 0 : 2;
      } catch (...) {
        rc = 3;
      }
      ::_exit(rc);
    }
    pids.push_back(pid);
  }
  for (pid_t pid : pids) {
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
  }
  int raw = 0, tmpFiles = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    raw += e.path().extension() == ".raw" ? 1 : 0;
    tmpFiles += e.path().string().find(".tmp-") != std::string::npos ? 1 : 0;
  }
  CHECK(raw == 1);
  CHECK(tmpFiles == 0);
  ::unsetenv("DTRAIN_DATA_CACHE");
}
