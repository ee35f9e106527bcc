// Readers for the dataset file formats. Each reads a whole file into memory, in its raw element type, and
// throws ConfigError with a message that starts with the file's path and says what was expected, e.g.
// "data/train-labels.gz: bad IDX magic 0x00000000 (expected 0x00000801 for labels)". parseDataSpec() adds the
// job file and JSON path in front. Gzip-compressed files (detected by their magic bytes, not the name) are
// decompressed transparently through zlib, for every format. Blocking file I/O; thread-safe (no shared state).
#pragma once

#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "lib/data/dataset.h"

namespace dtrain::data {

// The whole (decompressed) content of a file. ConfigError "PATH: cannot open (No such file or directory)".
// `maxBytes`: the most the content may hold (what a format's header declares): a gzip stream that inflates to
// more is an error as soon as it passes the bound ("has more data than its header declares"), so a gzip bomb
// never costs more memory than the header admits to. `mapCache`: when a gzip file's content comes from the data
// cache (formats.cpp), map the cache file read-only instead of reading it (ByteBuffer::mapFile; read() where mmap
// fails): the result is then read-only (mutableData() throws) and shares the page cache's pages.
ByteBuffer readFileBytes(const std::string& path, std::optional<size_t> maxBytes = std::nullopt,
                         bool mapCache = false);

// The first `n` bytes of the (decompressed) content, or all of it when shorter. Reads only what it returns.
ByteBuffer readFilePrefix(const std::string& path, size_t n);

// How much of a file the IDX and NPY readers read.
enum class ReadMode {
  kAll,     // header and data
  kHeader,  // the header only (a few bytes, inflated when gzip): shape and type, and the file's size checked
            // against them without reading the data (a plain file's size; a gzip file's compressed size and
            // its trailer's uncompressed size, which a truncated file does not have). RawArray::probed is true.
};

// IDX (LeCun's MNIST format): 2 zero bytes, a type code (0x08 u8, 0x09 i8, 0x0B i16, 0x0C i32, 0x0D f32,
// 0x0E f64), the number of dimensions, big-endian u32 sizes, then big-endian data. The result is in native
// byte order. `expectedDims` (3 for idx3 images, 1 for idx1 labels) is checked against the magic, and `what`
// ("images"/"labels") names the role in the message. In both modes the declared size is checked against the
// file before any data is read or allocated.
RawArray readIdx(const std::string& path, int expectedDims, const std::string& what, ReadMode mode = ReadMode::kAll);

// NPY (numpy.save): versions 1, 2 and 3, C order, little-endian (or byte-order-free) dtypes
// u1 i1 i2 u2 i4 i8 f4 f8 and b1 (read as uint8). Sizes are checked as for readIdx.
RawArray readNpy(const std::string& path, ReadMode mode = ReadMode::kAll);

struct CsvOptions {
  char delimiter = ',';
  // true: the first row names the columns; false: it is data; nullopt: a header when any cell of the first
  // row is not a number.
  std::optional<bool> header;
  // Label column(s): a name (needs a header) or an index (negative counts from the end, -1 = last).
  // Several columns make a target vector.
  std::vector<std::variant<std::string, int64_t>> labelColumns;
  // kClass: integer cells are class ids, any other text is a class name (ids assigned in sorted name order).
  // nullopt: kClass when every label cell is a non-negative integer or text, kTarget when any is fractional.
  std::optional<LabelKind> labelKind;
};

struct CsvTable {
  RawArray features;  // float32, [rows, feature columns]
  Labels labels;
  std::vector<std::string> featureNames;  // from the header, else "col<i>"
};

// Quoted cells ("a,b", "say ""hi""") are supported; empty lines are skipped. A bad cell is an error naming
// its line and column: "x.csv:17: column 'petal_width' (4): cannot parse 'abc' as a number".
CsvTable readCsv(const std::string& path, const CsvOptions& options);

}  // namespace dtrain::data
