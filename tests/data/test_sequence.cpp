// The text and tokens formats: tokenisation (bytes, UTF-8 chars), the train/val split, windows shifted by one,
// nanoGPT and llm.c token files, and the errors a bad file gives; exact resume through the sampler holds for them
// like for any dataset.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "lib/common/error.h"
#include "lib/data/batch_loader.h"
#include "lib/data/sequence.h"
#include "lib/data/spec.h"
#include "tests/data/data_files.h"
#include "tests/support/process.h"

using namespace dtrain;
using namespace dtrain::data;
using dtrain::testing::rawBytes;
using dtrain::testing::writeBytes;
using nlohmann::json;

namespace {

std::string tmp(const std::string& name) {
  static std::string dir = dtrain::testing::tempDir("sequence");
  return dir + "/" + name;
}

std::shared_ptr<const Dataset> load(const json& j) { return loadDataset(parseDataSpec(j, "job.json", "/data/train", "/")); }

template <class F>
std::string messageOf(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("text, byte vocabulary: windows at i*T, targets shifted by one, train/val split by fraction") {
  std::string text;
  for (int i = 0; i < 100; ++i) text += static_cast<char>('a' + i % 26);
  writeBytes(tmp("a.txt"), text.substr(0, 60));
  writeBytes(tmp("b.txt"), text.substr(60));
  json j{{"format", "text"}, {"path", {tmp("a.txt"), tmp("b.txt")}}, {"block_size", 8}, {"val_fraction", 0.2}};
  auto train = load(j);
  // 80 train tokens: (80 - 1) / 8 = 9 windows.
  CHECK(train->size() == 9);
  CHECK(train->featureShape() == Shape{8});
  CHECK(train->labelShape() == Shape{8});
  CHECK(train->numClasses() == 256);
  std::vector<int64_t> idx = {2};
  std::vector<float> x(8);
  std::vector<int32_t> y(8);
  train->fetch(idx, x.data(), y.data());
  for (int k = 0; k < 8; ++k) {
    CHECK(x[static_cast<size_t>(k)] == static_cast<float>(static_cast<unsigned char>(text[static_cast<size_t>(16 + k)])));
    CHECK(y[static_cast<size_t>(k)] == static_cast<unsigned char>(text[static_cast<size_t>(17 + k)]));
  }
  j["split"] = "val";
  auto val = load(j);
  CHECK(val->size() == (20 - 1) / 8);
  val->fetch(std::vector<int64_t>{0}, x.data(), y.data());
  CHECK(x[0] == static_cast<float>(text[80]));
}

TEST_CASE("text, char vocabulary: distinct UTF-8 characters in code point order, and back") {
  writeBytes(tmp("u.txt"), "héllo wörld héllo wörld héllo");
  json j{{"format", "text"}, {"path", tmp("u.txt")}, {"block_size", 4}, {"vocab", "char"}, {"val_fraction", 0.0}};
  auto ds = std::dynamic_pointer_cast<const SequenceDataset>(load(j));
  REQUIRE(ds != nullptr);
  // ' ', d, h, l, o, r, w, é, ö
  CHECK(ds->numClasses() == 9);
  Vocabulary v = Vocabulary::fromJson(vocabularyJson(ds->stream()), "vocab.json");
  CHECK(v.size() == 9);
  auto ids = v.encode("wörld");
  std::string back;
  for (int32_t id : ids) back += v.decode(id);
  CHECK(back == "wörld");
  CHECK(messageOf([&] { v.encode("x"); }).find("'x' (U+0078) is not in the model's vocabulary") != std::string::npos);
}

TEST_CASE("tokens: raw uint16 (nanoGPT) and llm.c's header, detected by magic") {
  std::vector<uint16_t> tokens;
  for (int i = 0; i < 50; ++i) tokens.push_back(static_cast<uint16_t>(1000 + i));
  writeBytes(tmp("raw.bin"), rawBytes(tokens));
  std::vector<int32_t> header(256, 0);
  header[0] = 20240520, header[1] = 1, header[2] = 50;
  writeBytes(tmp("llmc.bin"), rawBytes(header) + rawBytes(tokens));
  for (const char* f : {"raw.bin", "llmc.bin"}) {
    CAPTURE(f);
    auto ds = load(json{{"format", "tokens"}, {"path", tmp(f)}, {"block_size", 7}});
    CHECK(ds->size() == 7);  // (50 - 1) / 7
    CHECK(ds->numClasses() == 1050);
    std::vector<float> x(7);
    std::vector<int32_t> y(7);
    ds->fetch(std::vector<int64_t>{6}, x.data(), y.data());
    CHECK(x[0] == 1042.0f);
    CHECK(y[6] == 1049);
  }
  header[2] = 51;
  writeBytes(tmp("short.bin"), rawBytes(header) + rawBytes(tokens));
  CHECK(messageOf([&] { load(json{{"format", "tokens"}, {"path", tmp("short.bin")}, {"block_size", 7}}); })
            .find("the llm.c header says 51 tokens but the file holds 100 bytes after its header") != std::string::npos);
  writeBytes(tmp("odd.bin"), "abc");
  CHECK(messageOf([&] { load(json{{"format", "tokens"}, {"path", tmp("odd.bin")}, {"block_size", 1}}); })
            .find("3 bytes is not a whole number of uint16 tokens") != std::string::npos);
}

TEST_CASE("bad sequence data names the file, field and value") {
  writeBytes(tmp("empty.txt"), "");
  CHECK(messageOf([&] { load(json{{"format", "text"}, {"path", tmp("empty.txt")}, {"block_size", 4}}); }) ==
        "job.json: /data/train/path: " + tmp("empty.txt") + ": the file is empty (expected text to train on)");
  writeBytes(tmp("small.txt"), "0123456789");
  CHECK(messageOf([&] { load(json{{"format", "text"}, {"path", tmp("small.txt")}, {"block_size", 16}}); }) ==
        "job.json: /data/train/path: " + tmp("small.txt") +
            ": 9 tokens in the train split (val_fraction 0.1) but block_size 16 needs at least 17 (one window of "
            "block_size + 1 tokens); use more data, another val_fraction or a smaller block_size");
  CHECK(messageOf([&] { parseDataSpec(json{{"format", "text"}, {"path", tmp("nope.txt")}}, "job.json", "/data/train", "/"); }) ==
        "job.json: /data/train/path: " + tmp("nope.txt") + ": no such file (expected a text file (UTF-8 or bytes))");
  CHECK(messageOf([&] {
          parseDataSpec(json{{"format", "text"}, {"path", tmp("small.txt")}, {"scale", 2}}, "job.json", "/data/train", "/");
        }).find("/data/train/scale") != std::string::npos);
}

TEST_CASE("token windows go through the sampler and loader like any dataset: a resumed epoch continues exactly") {
  std::string text;
  for (int i = 0; i < 2000; ++i) text += static_cast<char>(32 + (i * 7) % 90);
  writeBytes(tmp("r.txt"), text);
  auto ds = load(json{{"format", "text"}, {"path", tmp("r.txt")}, {"block_size", 10}, {"val_fraction", 0.0}});
  CHECK(ds->size() == 199);
  auto run = [&](int64_t start, int64_t stopAfter) {
    std::vector<int32_t> seen;
    DistributedSampler sampler({.datasetSize = ds->size(), .rank = 1, .worldSize = 2, .seed = 5});
    sampler.setEpoch(3, start);
    BatchLoader loader(*ds, sampler, {.batchSize = 4, .prefetch = false});
    int64_t pos = 0, n = 0;
    for (const Batch& b : loader) {
      seen.insert(seen.end(), b.classLabels, b.classLabels + b.size * 10);
      pos = b.position;
      if (++n == stopAfter) break;
    }
    return std::make_pair(seen, pos);
  };
  auto [all, end] = run(0, -1);
  auto [head, pos] = run(0, 5);
  auto [tail, end2] = run(pos, -1);
  head.insert(head.end(), tail.begin(), tail.end());
  CHECK(head == all);
  CHECK(end2 == end);
}
