// File reading (plain or gzip) and the two binary formats, IDX and NPY. CSV lives in csv.cpp.
#include "lib/data/formats.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <climits>
#include <cstdlib>
#include <filesystem>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "lib/common/env.h"
#include "lib/common/error.h"
#include "lib/common/hash.h"
#include "lib/common/log.h"

namespace dtrain::data {

namespace {

constexpr size_t kReadChunk = 1 << 20;

// Closes an fd on scope exit unless released (gzdopen takes ownership).
struct FdGuard {
  int fd;
  ~FdGuard() {
    if (fd >= 0) ::close(fd);
  }
};

// Reads to EOF, never more than `maxBytes` + 1 bytes (one past the bound proves there is more). `prefix`: read
// at most `maxBytes` and stop there, more data being no error (readFilePrefix).
// The buffer is not zero-filled: read() writes every byte that is kept (out.truncate(used) drops the rest).
ByteBuffer readPlain(int fd, const std::string& path, size_t sizeHint, std::optional<size_t> maxBytes = std::nullopt,
                     bool prefix = false) {
  const size_t cap = maxBytes ? *maxBytes + (prefix ? 0 : 1) : SIZE_MAX;
  // +1 so the final read sees EOF without a resize
  ByteBuffer out = ByteBuffer::uninitialized(std::min(sizeHint + 1, cap));
  size_t used = 0;
  for (;;) {
    // Grow only when full: growing earlier would double a buffer that the size hint already made exact.
    if (used == out.size()) {
      if (used >= cap) break;
      out.resize(std::min(std::max(out.size() * 2, used + kReadChunk), cap));
    }
    ssize_t n = ::read(fd, out.mutableData() + used, out.size() - used);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) DTRAIN_THROW(ConfigError, "{}: read failed ({})", path, std::strerror(errno));
    if (n == 0) break;
    used += static_cast<size_t>(n);
  }
  DTRAIN_CHECK_AS(ConfigError, prefix || !maxBytes || used <= *maxBytes,
                  "{}: the file has more data than its header declares ({} bytes)", path, *maxBytes);
  out.truncate(used);
  return out;
}

// Inflates to EOF, never more than `maxBytes` + 1 bytes: a gzip bomb is stopped at what its header declared.
// `prefix`: inflate at most `maxBytes` and stop there, with no verdict on the rest of the stream.
// Not zero-filled either: gzread() writes every byte that is kept.
ByteBuffer readGzip(int fd, const std::string& path, size_t sizeHint, std::optional<size_t> maxBytes = std::nullopt,
                    bool prefix = false) {
  gzFile gz = ::gzdopen(fd, "rb");
  DTRAIN_CHECK_AS(ConfigError, gz != nullptr, "{}: cannot open gzip stream", path);
  ::gzbuffer(gz, 256 * 1024);
  const size_t cap = maxBytes ? *maxBytes + (prefix ? 0 : 1) : SIZE_MAX;
  // +1 so the final read sees EOF without a resize
  ByteBuffer out = ByteBuffer::uninitialized(std::min(sizeHint + 1, cap));
  size_t used = 0;
  for (;;) {
    if (used == out.size()) {
      if (used >= cap) break;
      out.resize(std::min(std::max(out.size() * 2, used + kReadChunk), cap));
    }
    auto want = static_cast<unsigned>(std::min<size_t>(out.size() - used, 1u << 30));
    int n = ::gzread(gz, out.mutableData() + used, want);
    if (n < 0) {
      int code = 0;
      std::string why = ::gzerror(gz, &code);
      ::gzclose(gz);
      DTRAIN_THROW(ConfigError, "{}: corrupt gzip data ({})", path, why);
    }
    if (n == 0) break;
    used += static_cast<size_t>(n);
  }
  if (prefix) {
    ::gzclose(gz);
    out.truncate(used);
    return out;
  }
  if (maxBytes && used > *maxBytes) {
    ::gzclose(gz);
    DTRAIN_THROW(ConfigError,
                 "{}: the gzip data inflates to more than the {} bytes its header declares (a corrupt file or a "
                 "gzip bomb); stopped there",
                 path, *maxBytes);
  }
  int code = 0;
  std::string why = ::gzerror(gz, &code);
  ::gzclose(gz);
  // zlib reports a truncated stream as Z_BUF_ERROR at the end instead of failing the read.
  DTRAIN_CHECK_AS(ConfigError, code == Z_OK || code == Z_STREAM_END, "{}: corrupt or truncated gzip data ({})",
                  path, why);
  out.truncate(used);
  return out;
}

// Deflate never expands more than 1032:1 (zlib's technical details), so a gzip file of N bytes holds at most
// about 1032 N bytes of data.
constexpr uint64_t kMaxDeflateRatio = 1032;

// What a file's size says before it is read: a plain file's length; a gzip file's compressed length and its
// trailer's ISIZE (RFC 1952: the uncompressed size mod 2^32, of the last member).
struct FileFacts {
  bool gzip = false;
  uint64_t fileBytes = 0;
  uint32_t isize = 0;
};

FileFacts factsOf(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  DTRAIN_CHECK_AS(ConfigError, fd >= 0, "{}: cannot open ({})", path, std::strerror(errno));
  FdGuard guard{fd};
  struct stat st {};
  DTRAIN_CHECK_AS(ConfigError, ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode), "{}: not a regular file", path);
  FileFacts f;
  f.fileBytes = static_cast<uint64_t>(st.st_size);
  unsigned char magic[2] = {0, 0};
  f.gzip = ::pread(fd, magic, 2, 0) == 2 && magic[0] == 0x1f && magic[1] == 0x8b;
  unsigned char t[4];
  if (f.gzip && st.st_size >= 18 && ::pread(fd, t, 4, st.st_size - 4) == 4)
    f.isize = t[0] | (t[1] << 8) | (t[2] << 16) | (static_cast<uint32_t>(t[3]) << 24);
  return f;
}

// The data part of an IDX or NPY file whose header (`headerBytes` long) declared `out`'s shape and type
// (`format` and `shapeText` word the messages). The declared size is checked against the file before any data
// is read or allocated: a plain file's length; for gzip, what deflate could hold at most and - in
// ReadMode::kHeader, which reads nothing else - the trailer's size (a full read lets zlib tell a truncated stream,
// "corrupt or truncated gzip data", from short content, and stops at the declared size anyway). kHeader marks
// `out` probed; kAll fills out.bytes with the data (header stripped, file byte order). `mayMap`: the data is used
// as it is in the file (no byte swap), so a data cache hit may be mapped rather than read.
bool cacheMaps(uint64_t inflatedBytes);

void readDeclaredData(const std::string& path, const char* format, const std::string& shapeText, size_t headerBytes,
                      ReadMode mode, bool mayMap, RawArray& out) {
  std::optional<uint64_t> declared = dtypeSize(out.type);
  for (int d = 0; d < out.shape.rank() && declared; ++d) {
    uint64_t r = 0;
    if (__builtin_mul_overflow(*declared, static_cast<uint64_t>(out.shape[d]), &r)) declared.reset();
    else declared = r;
  }
  DTRAIN_CHECK_AS(ConfigError, declared && *declared <= (uint64_t{1} << 48),
                  "{}: {} header declares shape {} of {}, more than any dataset this machine can hold", path, format,
                  shapeText, dtypeName(out.type));
  const auto dataBytes = static_cast<size_t>(*declared);
  const uint64_t total = headerBytes + dataBytes;
  auto mismatch = [&](uint64_t have) {
    return fmt::format("{}: {} data has {} bytes, expected {} for shape {} of {}", path, format,
                       have < headerBytes ? 0 : have - headerBytes, dataBytes, out.shape.spaced(),
                       dtypeName(out.type));
  };
  FileFacts f = factsOf(path);
  if (!f.gzip) {
    if (f.fileBytes != total) throw ConfigError(mismatch(f.fileBytes));
  } else {
    DTRAIN_CHECK_AS(ConfigError, f.fileBytes > 0 && total / f.fileBytes <= kMaxDeflateRatio,
                    "{}: the header declares {} bytes but a gzip file of {} bytes holds at most about {} (deflate "
                    "expands at most {}:1): a wrong header, or a truncated file",
                    path, total, f.fileBytes, f.fileBytes * kMaxDeflateRatio, kMaxDeflateRatio);
    if (mode == ReadMode::kHeader && static_cast<uint32_t>(total) != f.isize)
      throw ConfigError(mismatch(f.isize) + " (by the gzip trailer's size; or the gzip file is truncated or corrupt)");
  }
  if (mode == ReadMode::kHeader) {
    out.probed = true;
    out.shared = mayMap && f.gzip && cacheMaps(total);
    return;
  }
  auto bytes = readFileBytes(path, total, mayMap);
  if (bytes.size() != total) throw ConfigError(mismatch(bytes.size()));
  out.shared = bytes.mapped();
  bytes.dropFront(headerBytes);  // no copy: the data stays where it was read
  out.bytes = std::move(bytes);
}

uint32_t bigEndian32(const std::byte* p) {
  return (std::to_integer<uint32_t>(p[0]) << 24) | (std::to_integer<uint32_t>(p[1]) << 16) |
         (std::to_integer<uint32_t>(p[2]) << 8) | std::to_integer<uint32_t>(p[3]);
}

void byteSwapInPlace(ByteBuffer& bytes, size_t width) {
  if (width == 1) return;
  std::byte* p = bytes.mutableData();
  for (size_t i = 0; i + width <= bytes.size(); i += width) std::reverse(p + i, p + i + width);
}

// Inflating is the slowest part of starting a job (Fashion-MNIST's 47 MB take ~0.25 s, in every worker, at
// every start and restart), so gzip files of at least kCacheMinBytes are decompressed once into a cache file
// named by the source's path; later loads of IDX uint8 and NPY data map that plain file read-only
// (ByteBuffer::mapFile: the ranks on a node share its page-cache pages, nothing is copied; read() where mmap
// fails), other loads read it. The cache is written to a temporary file and renamed over the old one, never
// rewritten in place: a reader's mapping of the old file stays intact.
// A cache file starts with a CacheHeader recording the source it was inflated from: its size, its modification
// time (ns) and a sample of its content (FNV-1a 64 of its first and last 64 KiB: the last 8 bytes of a gzip file are
// the CRC-32 and size of everything it inflates to, so any change of the data shows there). A source that differs
// in any of them (replaced, rewritten, touched, restored with its old mtime) has its cache rebuilt, never used:
// two preads per start instead of hashing the whole file.
// DTRAIN_DATA_CACHE=DIR moves the cache (default $XDG_CACHE_HOME/dtrain/data, else ~/.cache/dtrain/data);
// DTRAIN_DATA_CACHE=0 turns it off. Cache problems never fail a load: they only cost the inflate.
constexpr size_t kCacheMinBytes = 4u << 20;
constexpr size_t kSampleBytes = 64u << 10;
constexpr char kCacheMagic[8] = {'D', 'T', 'R', 'N', 'C', 'A', 'C', '1'};

// Host byte order: a cache file is only read on the machine (the filesystem) that wrote it.
struct CacheHeader {
  char magic[8];
  uint64_t headerBytes;    // sizeof(CacheHeader): the data follows
  uint64_t sourceBytes;    // the .gz file's size
  int64_t sourceMtimeNs;   // its st_mtim in ns
  uint64_t sourceSample;   // FNV-1a 64 of its first and last kSampleBytes
  uint64_t dataBytes;      // the inflated bytes that follow the header
  uint64_t reserved[2];
};
static_assert(sizeof(CacheHeader) == 64);

std::string cacheDir() {
  auto v = env::getOr("DTRAIN_DATA_CACHE", "");
  if (v == "0" || v == "off" || v == "false") return "";
  if (!v.empty()) return v;
  if (auto xdg = env::get("XDG_CACHE_HOME"); xdg && !xdg->empty()) return *xdg + "/dtrain/data";
  if (auto home = env::get("HOME"); home && !home->empty()) return *home + "/.cache/dtrain/data";
  return "";
}

// A gzip file inflating to `inflatedBytes` is served from a mapping of its cache (when the format may map it).
bool cacheMaps(uint64_t inflatedBytes) { return inflatedBytes >= kCacheMinBytes && !cacheDir().empty(); }

// One file per source path: a changed source replaces its cache rather than leave the old one behind.
std::string cachePath(const std::string& path) {
  std::string dir = cacheDir();
  if (dir.empty()) return "";
  char resolved[PATH_MAX];
  std::string abs = ::realpath(path.c_str(), resolved) ? std::string(resolved) : path;
  std::string base = abs.substr(abs.rfind('/') + 1);
  return fmt::format("{}/{}-{}.raw", dir, base, fnv1aHex(abs));
}

// What the cache of `fd` (the source, `st` its stat) inflating to `dataBytes` must record.
CacheHeader cacheHeaderOf(int fd, const struct stat& st, size_t dataBytes) {
  CacheHeader h{};
  std::memcpy(h.magic, kCacheMagic, sizeof h.magic);
  h.headerBytes = sizeof(CacheHeader);
  h.sourceBytes = static_cast<uint64_t>(st.st_size);
  h.sourceMtimeNs = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  h.dataBytes = dataBytes;
  const size_t size = static_cast<size_t>(st.st_size), head = std::min(size, kSampleBytes);
  const size_t tail = std::min(size - head, kSampleBytes);
  std::string sample(head + tail, '\0');
  if (::pread(fd, sample.data(), head, 0) != static_cast<ssize_t>(head) ||
      ::pread(fd, sample.data() + head, tail, static_cast<off_t>(size - tail)) != static_cast<ssize_t>(tail))
    sample.clear();  // an unreadable sample records nothing that a later one could match by chance
  h.sourceSample = sample.empty() ? 0 : fnv1a64(sample);
  return h;
}

// Why the open cache file `cfd` is not the inflated `want` describes ("" when it is). `sourceChanged`: the file is
// a good cache of another version of the source.
std::string cacheMismatch(int cfd, const CacheHeader& want, bool& sourceChanged) {
  sourceChanged = false;
  struct stat cst {};
  if (::fstat(cfd, &cst) != 0) return fmt::format("cannot stat it ({})", std::strerror(errno));
  CacheHeader have{};
  if (::pread(cfd, &have, sizeof have, 0) != static_cast<ssize_t>(sizeof have) ||
      std::memcmp(have.magic, kCacheMagic, sizeof have.magic) != 0 || have.headerBytes != sizeof have)
    return "has no cache header of this version";
  if (have.sourceBytes != want.sourceBytes || have.sourceMtimeNs != want.sourceMtimeNs ||
      have.sourceSample != want.sourceSample || have.dataBytes != want.dataBytes) {
    sourceChanged = true;
    std::string what = have.sourceBytes != want.sourceBytes
                           ? fmt::format("its size changed: {} -> {} bytes", have.sourceBytes, want.sourceBytes)
                       : have.sourceMtimeNs != want.sourceMtimeNs ? std::string("its modification time changed")
                       : have.sourceSample != want.sourceSample
                           ? std::string("its content changed, same size and modification time")
                           : std::string("its inflated size changed");
    return fmt::format("was built from another version of the source ({})", what);
  }
  const uint64_t expected = sizeof have + want.dataBytes;
  if (static_cast<uint64_t>(cst.st_size) != expected)
    return fmt::format("has {} bytes, expected {}", cst.st_size, expected);
  return "";
}

void writeCache(const std::string& cache, const CacheHeader& header, const ByteBuffer& bytes) {
  std::string dir = cache.substr(0, cache.rfind('/'));
  std::string tmp = fmt::format("{}.tmp-{}", cache, ::getpid());
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    log::debug("data cache: cannot write {}: {}", tmp, std::strerror(errno));
    return;
  }
  bool ok = ::write(fd, &header, sizeof header) == static_cast<ssize_t>(sizeof header);
  size_t done = 0;
  while (ok && done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  // Readers check the size, so a half-written file never passes for the cache; rename publishes it whole.
  if (!ok || done != bytes.size() || ::rename(tmp.c_str(), cache.c_str()) != 0) ::unlink(tmp.c_str());
}

// The cache's bytes when `cache` holds the data `want` describes (mapped when `mapCache`), else nullopt, having
// said why when `say`.
std::optional<ByteBuffer> readCache(const std::string& cache, const CacheHeader& want, const std::string& path,
                                    std::optional<size_t> maxBytes, bool mapCache, bool say) {
  int cfd = ::open(cache.c_str(), O_RDONLY | O_CLOEXEC);
  if (cfd < 0) return std::nullopt;
  FdGuard cguard{cfd};
  bool sourceChanged = false;
  const std::string mismatch = cacheMismatch(cfd, want, sourceChanged);
  const size_t hint = want.dataBytes;
  if (mismatch.empty()) {
    // The cache is only ever replaced by rename (writeCache), never rewritten in place, so a mapping of it
    // stays valid for as long as the dataset lives (byte_buffer.h says why that matters: SIGBUS).
    if (mapCache) {
      if (auto mapped = ByteBuffer::mapFile(cfd, sizeof want + hint)) {
        mapped->dropFront(sizeof want);
        return mapped;
      }
      log::debug("data cache: cannot map {} ({}); reading it instead", cache, std::strerror(errno));
    }
    if (::lseek(cfd, sizeof want, SEEK_SET) == static_cast<off_t>(sizeof want))
      return readPlain(cfd, cache, hint, maxBytes);
    log::debug("data cache: cannot seek in {} ({}); inflating {} again", cache, std::strerror(errno), path);
  } else if (say && sourceChanged) {
    // A changed source is worth a line (its data is read anew); a broken cache file only costs the inflate.
    log::info("data cache: {} {}; inflating {} again", cache, mismatch, path);
  } else if (say) {
    log::debug("data cache: {} {}; inflating {} again", cache, mismatch, path);
  }
  return std::nullopt;
}

}  // namespace

ByteBuffer readFileBytes(const std::string& path, std::optional<size_t> maxBytes, bool mapCache) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  DTRAIN_CHECK_AS(ConfigError, fd >= 0, "{}: cannot open ({})", path, std::strerror(errno));
  FdGuard guard{fd};
  struct stat st {};
  DTRAIN_CHECK_AS(ConfigError, ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode), "{}: not a regular file", path);
  unsigned char magic[2] = {0, 0};
  bool gzip = ::pread(fd, magic, 2, 0) == 2 && magic[0] == 0x1f && magic[1] == 0x8b;
  if (!gzip) return readPlain(fd, path, static_cast<size_t>(st.st_size), maxBytes);
  // The gzip trailer holds the uncompressed size mod 2^32: a good first allocation for datasets < 4 GB.
  size_t hint = 0;
  unsigned char trailer[4];
  if (st.st_size >= 18 && ::pread(fd, trailer, 4, st.st_size - 4) == 4)
    hint = trailer[0] | (trailer[1] << 8) | (trailer[2] << 16) | (static_cast<size_t>(trailer[3]) << 24);
  // A truncated file's last bytes are not a trailer: deflate never expands more than 1032:1, so cap there.
  hint = std::min(hint, static_cast<size_t>(st.st_size) * kMaxDeflateRatio);
  if (maxBytes) hint = std::min(hint, *maxBytes);
  std::string cache = hint >= kCacheMinBytes ? cachePath(path) : "";
  CacheHeader header{};
  FdGuard lock{-1};
  if (!cache.empty()) {
    header = cacheHeaderOf(fd, st, hint);
    if (auto hit = readCache(cache, header, path, maxBytes, mapCache, /*say=*/true)) return std::move(*hit);
    // A miss: the node's workers inflate one at a time (an flock on a file beside the cache), and the ones that
    // waited find the cache written and map it, so the node holds one copy of the data also at the first start
    // (the memory check counts a mapped dataset once per node: lib/train/check.h). A lock that cannot be had
    // costs only the wait's saving.
    lock.fd = ::open((cache + ".lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (lock.fd < 0) {
      std::error_code ec;
      std::filesystem::create_directories(cache.substr(0, cache.rfind('/')), ec);
      lock.fd = ::open((cache + ".lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    }
    int rc = -1;
    while (lock.fd >= 0 && (rc = ::flock(lock.fd, LOCK_EX)) != 0 && errno == EINTR) {
    }
    if (rc == 0)
      if (auto hit = readCache(cache, header, path, maxBytes, mapCache, /*say=*/false)) return std::move(*hit);
  }
  guard.fd = -1;  // gzdopen owns it now
  auto bytes = readGzip(fd, path, hint, maxBytes);
  if (!cache.empty() && bytes.size() == hint) {
    writeCache(cache, header, bytes);
    // This worker's copy gives way to the mapping the node's other workers share.
    if (mapCache)
      if (auto hit = readCache(cache, header, path, maxBytes, mapCache, /*say=*/false)) return std::move(*hit);
  }
  return bytes;
}

ByteBuffer readFilePrefix(const std::string& path, size_t n) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  DTRAIN_CHECK_AS(ConfigError, fd >= 0, "{}: cannot open ({})", path, std::strerror(errno));
  FdGuard guard{fd};
  struct stat st {};
  DTRAIN_CHECK_AS(ConfigError, ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode), "{}: not a regular file", path);
  unsigned char magic[2] = {0, 0};
  bool gzip = ::pread(fd, magic, 2, 0) == 2 && magic[0] == 0x1f && magic[1] == 0x8b;
  if (!gzip) return readPlain(fd, path, n, n, /*prefix=*/true);
  guard.fd = -1;  // gzdopen owns it now
  return readGzip(fd, path, n, n, /*prefix=*/true);
}

RawArray readIdx(const std::string& path, int expectedDims, const std::string& what, ReadMode mode) {
  // The header first (at most 4 + 4 x 255 bytes): the declared size is checked against the file before any
  // data is read or allocated.
  auto bytes = readFilePrefix(path, 4 + 4 * 255);
  const uint32_t expectedMagic = 0x0800u | static_cast<uint32_t>(expectedDims);
  DTRAIN_CHECK_AS(ConfigError, bytes.size() >= 4, "{}: file too short for an IDX header ({} bytes)", path,
                  bytes.size());
  const uint32_t magic = bigEndian32(bytes.data());
  const uint32_t typeCode = (magic >> 8) & 0xff;
  const auto dims = static_cast<int>(magic & 0xff);
  RawArray out;
  bool knownType = true;
  switch (typeCode) {
    case 0x08: out.type = DType::kUInt8; break;
    case 0x09: out.type = DType::kInt8; break;
    case 0x0B: out.type = DType::kInt16; break;
    case 0x0C: out.type = DType::kInt32; break;
    case 0x0D: out.type = DType::kFloat32; break;
    case 0x0E: out.type = DType::kFloat64; break;
    default: knownType = false;
  }
  DTRAIN_CHECK_AS(ConfigError, (magic >> 16) == 0 && knownType && dims == expectedDims,
                  "{}: bad IDX magic 0x{:08x} (expected 0x{:08x} for {})", path, magic, expectedMagic, what);
  const size_t headerBytes = 4 + 4 * static_cast<size_t>(dims);
  DTRAIN_CHECK_AS(ConfigError, bytes.size() >= headerBytes, "{}: truncated IDX header ({} bytes, expected {})", path,
                  bytes.size(), headerBytes);
  DTRAIN_CHECK_AS(ConfigError, dims <= kMaxRank, "{}: IDX header declares {} dimensions (at most {} supported)", path,
                  dims, kMaxRank);
  for (int d = 0; d < dims; ++d) out.shape.push_back(bigEndian32(bytes.data() + 4 + 4 * d));
  // Only single-byte IDX data can be mapped: wider types are byte-swapped in memory.
  readDeclaredData(path, "IDX", out.shape.spaced(), headerBytes, mode, dtypeSize(out.type) == 1, out);
  byteSwapInPlace(out.bytes, dtypeSize(out.type));  // IDX is big-endian (nothing to swap when probed)
  return out;
}

namespace {

// Value of `key` in numpy's header, a Python dict literal: {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
std::string npyField(const std::string& header, const std::string& key, const std::string& path) {
  auto k = header.find("'" + key + "'");
  DTRAIN_CHECK_AS(ConfigError, k != std::string::npos, "{}: NPY header has no '{}' ({})", path, key, header);
  auto colon = header.find(':', k);
  DTRAIN_CHECK_AS(ConfigError, colon != std::string::npos, "{}: malformed NPY header ({})", path, header);
  size_t b = header.find_first_not_of(' ', colon + 1);
  DTRAIN_CHECK_AS(ConfigError, b != std::string::npos, "{}: malformed NPY header ({})", path, header);
  size_t e;
  if (header[b] == '\'') e = header.find('\'', b + 1) + 1;
  else if (header[b] == '(') e = header.find(')', b) + 1;
  else e = header.find_first_of(",}", b);
  DTRAIN_CHECK_AS(ConfigError, e != std::string::npos && e > b, "{}: malformed NPY header ({})", path, header);
  return header.substr(b, e - b);
}

}  // namespace

RawArray readNpy(const std::string& path, ReadMode mode) {
  // numpy writes headers of a few hundred bytes; 64 KiB is far more than any real one.
  constexpr size_t kMaxHeader = 64 * 1024;
  auto bytes = readFilePrefix(path, kMaxHeader);
  static const char kMagic[] = "\x93NUMPY";
  DTRAIN_CHECK_AS(ConfigError, bytes.size() >= 10 && std::memcmp(bytes.data(), kMagic, 6) == 0,
                  "{}: not an NPY file (expected the magic \\x93NUMPY)", path);
  const auto major = std::to_integer<int>(bytes[6]);
  size_t headerLen = 0, offset = 0;
  if (major == 1) {
    headerLen = std::to_integer<size_t>(bytes[8]) | (std::to_integer<size_t>(bytes[9]) << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    DTRAIN_CHECK_AS(ConfigError, bytes.size() >= 12, "{}: truncated NPY header", path);
    for (int i = 0; i < 4; ++i) headerLen |= std::to_integer<size_t>(bytes[8 + i]) << (8 * i);
    offset = 12;
  } else {
    DTRAIN_THROW(ConfigError, "{}: NPY version {} (expected 1, 2 or 3)", path, major);
  }
  DTRAIN_CHECK_AS(ConfigError, headerLen <= kMaxHeader - offset, "{}: NPY header of {} bytes (at most {} supported)",
                  path, headerLen, kMaxHeader - offset);
  DTRAIN_CHECK_AS(ConfigError, bytes.size() >= offset + headerLen, "{}: truncated NPY header", path);
  std::string header(reinterpret_cast<const char*>(bytes.data()) + offset, headerLen);
  const std::string descr = npyField(header, "descr", path);
  const std::string fortran = npyField(header, "fortran_order", path);
  const std::string shapeText = npyField(header, "shape", path);
  DTRAIN_CHECK_AS(ConfigError, fortran == "False", "{}: Fortran-order array (expected C order; save with "
                  "np.ascontiguousarray)", path);
  RawArray out;
  static const std::pair<const char*, DType> kTypes[] = {
      {"u1", DType::kUInt8},  {"b1", DType::kUInt8},  {"i1", DType::kInt8},  {"i2", DType::kInt16},
      {"u2", DType::kUInt16}, {"i4", DType::kInt32}, {"i8", DType::kInt64}, {"f4", DType::kFloat32},
      {"f8", DType::kFloat64}};
  bool found = false;
  if (descr.size() == 5 && (descr[1] == '<' || descr[1] == '|')) {
    for (const auto& [code, type] : kTypes) {
      if (descr.compare(2, 2, code) == 0) {
        out.type = type;
        found = true;
      }
    }
  }
  DTRAIN_CHECK_AS(ConfigError, found, "{}: NPY dtype {} not supported (expected little-endian u1, i1, i2, u2, i4, "
                  "i8, f4, f8 or b1)", path, descr);
  // "(60000, 784)", "(60000,)", "()"
  std::string inner = shapeText.substr(1, shapeText.size() - 2);
  size_t pos = 0;
  while (pos < inner.size()) {
    size_t comma = inner.find(',', pos);
    std::string item = inner.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    item.erase(std::remove(item.begin(), item.end(), ' '), item.end());
    item.erase(std::remove(item.begin(), item.end(), 'L'), item.end());
    if (!item.empty()) {
      char* end = nullptr;
      long long v = std::strtoll(item.c_str(), &end, 10);
      DTRAIN_CHECK_AS(ConfigError, *end == '\0' && v >= 0, "{}: bad NPY shape {}", path, shapeText);
      DTRAIN_CHECK_AS(ConfigError, out.shape.rank() < kMaxRank, "{}: NPY shape {} has more than {} dimensions", path,
                      shapeText, kMaxRank);
      out.shape.push_back(v);
    }
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  DTRAIN_CHECK_AS(ConfigError, !out.shape.empty(), "{}: NPY array is a scalar (expected a sample dimension)", path);
  readDeclaredData(path, "NPY", shapeText, offset + headerLen, mode, /*mayMap=*/true, out);
  return out;
}

}  // namespace dtrain::data
