#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <functional>

#include "lib/common/error.h"
#include "lib/data/spec.h"
#include "tests/data/data_files.h"
#include "tests/support/process.h"

using namespace dtrain;
using namespace dtrain::data;
using nlohmann::json;
using dtrain::testing::idxBytes;
using dtrain::testing::npyBytes;
using dtrain::testing::rawBytes;
using dtrain::testing::writeBytes;

namespace {

const std::string& dir() {
  static std::string d = dtrain::testing::tempDir("spec");
  return d;
}

std::string messageOf(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no ConfigError)";
}

std::shared_ptr<const Dataset> load(const json& j) { return loadDataset(parseDataSpec(j, "job.json", "/data/train", dir())); }

// 4 images of 2x3 pixels, pixel value = 10 * image + position; labels 0..3.
void writeTinyIdx() {
  std::string pixels;
  for (int i = 0; i < 4; ++i)
    for (int p = 0; p < 6; ++p) pixels.push_back(static_cast<char>(10 * i + p));
  writeBytes(dir() + "/img.gz", idxBytes(0x08, {4, 2, 3}, pixels), true);
  writeBytes(dir() + "/lab", idxBytes(0x08, {4}, std::string("\x00\x01\x02\x03", 4)));
  writeBytes(dir() + "/lab3", idxBytes(0x08, {3}, std::string("\x00\x01\x02", 3)));
}

}  // namespace

TEST_CASE("an IDX spec with relative paths, scale and normalize converts pixels per batch") {
  writeTinyIdx();
  auto ds = load({{"format", "idx"}, {"images", "img.gz"}, {"labels", "lab"}, {"scale", "1/255"},
                  {"normalize", {{"mean", 0.5}, {"std", 0.25}}}});
  CHECK(ds->size() == 4);
  CHECK(ds->featureShape() == Shape{2, 3});
  CHECK(ds->labelKind() == LabelKind::kClass);
  CHECK(*ds->numClasses() == 4);
  std::vector<int64_t> idx = {3, 1};
  std::vector<float> f(12);
  std::vector<int32_t> l(2);
  ds->fetch(idx, f.data(), l.data());
  CHECK(l == std::vector<int32_t>{3, 1});
  CHECK(f[0] == doctest::Approx((30 / 255.0 - 0.5) / 0.25).epsilon(1e-6));
  CHECK(f[11] == doctest::Approx((15 / 255.0 - 0.5) / 0.25).epsilon(1e-6));
  CHECK(ds->describe() == "idx img.gz: 4 x [2, 3] uint8");
}

TEST_CASE("shape reshapes features and per-channel normalisation follows the first dimension; limit truncates") {
  writeTinyIdx();
  auto ds = load({{"format", "idx"}, {"images", "img.gz"}, {"labels", "lab"}, {"shape", {2, 3}},
                  {"normalize", {{"mean", {0.0, 100.0}}, {"std", {1.0, 2.0}}}}, {"limit", 2}});
  CHECK(ds->size() == 2);
  std::vector<int64_t> idx = {1};
  std::vector<float> f(6);
  int32_t l = -1;
  ds->fetch(idx, f.data(), &l);
  CHECK(f[0] == 10.0f);                 // channel 0: (10 - 0) / 1
  CHECK(f[3] == (13.0f - 100) / 2.0f);  // channel 1
  CHECK_THROWS_AS(ds->fetch(std::vector<int64_t>{2}, f.data(), &l), std::out_of_range);
  auto flat = load({{"format", "idx"}, {"images", "img.gz"}, {"labels", "lab"}, {"shape", {6}}});
  CHECK(flat->featureShape() == Shape{6});
}

TEST_CASE("spec errors name the job file, the JSON path and what was expected") {
  writeTinyIdx();
  auto absent = (std::filesystem::path(dir()) / "nope.gz").string();
  CHECK(messageOf([] { load({{"format", "idx"}, {"images", "nope.gz"}, {"labels", "lab"}}); }) ==
        "job.json: /data/train/images: " + absent +
            ": no such file (expected an IDX images file, e.g. train-images-idx3-ubyte.gz)");
  // A directory (or a fifo) is not called missing.
  CHECK(messageOf([] { load({{"format", "idx"}, {"images", dir()}, {"labels", "lab"}}); }) ==
        "job.json: /data/train/images: " + std::filesystem::path(dir()).lexically_normal().string() +
            ": is a directory, not a file (expected an IDX images file, e.g. train-images-idx3-ubyte.gz)");
  CHECK(messageOf([] { load({{"format", "idx"}, {"images", "img.gz"}, {"labels", "img.gz"}}); }) ==
        "job.json: /data/train/labels: " + dir() + "/img.gz: bad IDX magic 0x00000803 (expected 0x00000801 for labels)");
  CHECK(messageOf([] { load({{"format", "idx"}, {"images", "img.gz"}, {"labels", "lab3"}}); }) ==
        "job.json: /data/train/labels: " + dir() + "/lab3 has 3 labels but " + dir() +
            "/img.gz has 4 images (expected one label per image)");
  CHECK(messageOf([] { load({{"format", "idx"}, {"images", "img.gz"}, {"labels", "lab"}, {"imags", 1}}); }) ==
        "job.json: /data/train/imags: unknown key (expected one of: format, images, label_kind, labels, limit, "
        "normalize, num_classes, scale, shape)");
  CHECK(messageOf([] { load({{"format", "parquet"}}); }) ==
        "job.json: /data/train/format: 'parquet' (expected one of: csv, idx, npy, synthetic, text, tokens)");
  CHECK(messageOf([] { load(json::object()); }) ==
        "job.json: /data/train/format: missing (expected one of: csv, idx, npy, synthetic, text, tokens)");
  CHECK(messageOf([] { load({{"format", "synthetic"}, {"samples", 0}}); }) ==
        "job.json: /data/train/samples: 0 (expected an integer >= 1)");
  CHECK(messageOf([] { load({{"format", "synthetic"}, {"scale", "x/y"}}); }) ==
        "job.json: /data/train/scale: \"x/y\" (expected a number or a fraction like \"1/255\")");
  CHECK(messageOf([] { load({{"format", "synthetic"}, {"normalize", {{"mean", 0}}}}); }) ==
        "job.json: /data/train/normalize: {\"mean\":0} (expected {\"mean\": m, \"std\": s})");
  CHECK(messageOf([] { load({{"format", "synthetic"}, {"normalize", {{"mean", 0}, {"std", 0}}}}); }) ==
        "job.json: /data/train/normalize/std: 0 (expected every std > 0)");
  CHECK(messageOf([] {
          load({{"format", "synthetic"}, {"features", 6}, {"normalize", {{"mean", {1, 2}}, {"std", {1, 1}}}}});
        }) == "job.json: /data/train: normalize has 2 values for features of shape [6] (expected 1, 6 channels or 6 "
              "features)");
  CHECK(messageOf([] { load({{"format", "idx"}, {"images", "img.gz"}, {"labels", "lab"}, {"shape", {4}}}); }) ==
        "job.json: /data/train/shape: shape [4] has 4 elements, the samples have 6 ([2, 3])");
  CHECK(messageOf([] { load({{"format", "idx"}, {"images", "img.gz"}, {"labels", "lab"}, {"num_classes", 3}}); }) ==
        "job.json: /data/train: sample 3 has class label 3 (expected < num_classes 3)");
  CHECK(messageOf([] { load({{"format", "synthetic"}, {"label_kind", "class"}}); }) ==
        "job.json: /data/train/label_kind: class contradicts task regression");
  // recsys: two id features and a click class; the other tasks' fields are refused.
  auto recsys = load({{"format", "synthetic"}, {"task", "recsys"}, {"samples", 10}, {"users", 5}, {"items", 7}});
  CHECK(recsys->size() == 10);
  CHECK(recsys->featureSize() == 2);
  CHECK(recsys->labelKind() == LabelKind::kClass);
  CHECK(messageOf([] { load({{"format", "synthetic"}, {"task", "recsys"}, {"features", 3}}); }).find(
            "job.json: /data/train/features: not a field of task recsys") == 0);
}

TEST_CASE("CSV and NPY specs load, with errors prefixed by the JSON path") {
  writeBytes(dir() + "/t.csv", "a;b;y\n1;2;0.5\n3;4;1.5\n");
  auto csv = load({{"format", "csv"}, {"path", "t.csv"}, {"label", "y"}, {"delimiter", ";"}});
  CHECK(csv->size() == 2);
  CHECK(csv->labelKind() == LabelKind::kTarget);
  CHECK(csv->labelShape() == Shape{1});
  CHECK(!csv->numClasses());
  writeBytes(dir() + "/bad.csv", "a,y\nx,1\n");
  CHECK(messageOf([] { load({{"format", "csv"}, {"path", "bad.csv"}, {"label", "y"}}); }) ==
        "job.json: /data/train/path: " + dir() + "/bad.csv:2: column 'a' (0): cannot parse 'x' as a number");
  CHECK(messageOf([] { load({{"format", "csv"}, {"path", "bad.csv"}}); }) ==
        "job.json: /data/train/label: missing (expected a column name, an index like -1, or an array of them)");

  writeBytes(dir() + "/x.npy", npyBytes("|u1", {3, 2}, "abcdef"));
  writeBytes(dir() + "/y.npy", npyBytes("<i8", {3}, rawBytes(std::vector<int64_t>{2, 0, 1})));
  writeBytes(dir() + "/yf.npy", npyBytes("<f8", {3, 2}, rawBytes(std::vector<double>{1, 2, 3, 4, 5, 6})));
  writeBytes(dir() + "/y2.npy", npyBytes("<i8", {2}, rawBytes(std::vector<int64_t>{2, 0})));
  auto npy = load({{"format", "npy"}, {"features", "x.npy"}, {"labels", "y.npy"}});
  CHECK(npy->labelKind() == LabelKind::kClass);
  CHECK(*npy->numClasses() == 3);
  std::vector<float> f(2);
  int32_t l = -1;
  npy->fetch(std::vector<int64_t>{2}, f.data(), &l);
  CHECK(f == std::vector<float>{'e', 'f'});
  CHECK(l == 1);
  auto reg = load({{"format", "npy"}, {"features", "x.npy"}, {"labels", "yf.npy"}});
  CHECK(reg->labelKind() == LabelKind::kTarget);
  CHECK(reg->labelShape() == Shape{2});
  std::vector<float> t(2);
  reg->fetch(std::vector<int64_t>{1}, f.data(), t.data());
  CHECK(t == std::vector<float>{3, 4});
  CHECK(messageOf([] { load({{"format", "npy"}, {"features", "x.npy"}, {"labels", "y2.npy"}}); }) ==
        "job.json: /data/train/labels: " + dir() + "/y2.npy has 2 labels but " + dir() +
            "/x.npy has 3 samples (expected one label per sample)");
  CHECK(messageOf([] { load({{"format", "npy"}, {"features", "x.npy"}, {"labels", "yf.npy"}, {"label_kind", "class"}}); }) ==
        "job.json: /data/train/labels: " + dir() + "/yf.npy: class labels of shape [3, 2] (expected one per sample: [N])");
}

TEST_CASE("an IDX or NPY file of 0 samples is refused where it is read, naming the key and the file") {
  // Valid files that hold nothing: before, `dtrain check` said OK, training failed in every worker after the
  // rendezvous, and as an eval set it reported "eval loss 0.000000 (0 samples)".
  writeBytes(dir() + "/x0.npy", npyBytes("<f4", {0, 4}, ""));
  writeBytes(dir() + "/y0.npy", npyBytes("<i8", {0}, ""));
  CHECK(messageOf([] { load({{"format", "npy"}, {"features", "x0.npy"}, {"labels", "y0.npy"}}); }) ==
        "job.json: /data/train/features: " + dir() + "/x0.npy: 0 samples (expected at least one sample)");
  CHECK(messageOf([] {
          loadDataset(parseDataSpec({{"format", "npy"}, {"features", "x0.npy"}, {"labels", "y0.npy"}}, "job.json",
                                    "/data/train", dir()),
                      ReadMode::kHeader);
        }) == "job.json: /data/train/features: " + dir() + "/x0.npy: 0 samples (expected at least one sample)");
  writeBytes(dir() + "/img0", idxBytes(0x08, {0, 2, 3}, ""));
  writeBytes(dir() + "/lab0", idxBytes(0x08, {0}, ""));
  CHECK(messageOf([] { load({{"format", "idx"}, {"images", "img0"}, {"labels", "lab0"}}); }) ==
        "job.json: /data/train/images: " + dir() + "/img0: 0 images (expected at least one sample)");
}

TEST_CASE("Fashion-MNIST as installed loads with raw uint8 pixels") {
  const std::string base = "/usr/share/datasets/fashion-mnist";
  if (!std::filesystem::exists(base + "/train-images-idx3-ubyte.gz")) {
    MESSAGE("Fashion-MNIST not installed at " << base << ": skipped");
    return;
  }
  auto spec = parseDataSpec({{"format", "idx"}, {"images", "train-images-idx3-ubyte.gz"},
                             {"labels", "train-labels-idx1-ubyte.gz"}, {"scale", 1.0 / 255}},
                            "fmnist.json", "/data/train", base);
  auto ds = loadDataset(spec);
  CHECK(ds->size() == 60000);
  CHECK(ds->featureShape() == Shape{28, 28});
  CHECK(*ds->numClasses() == 10);
  auto* arr = dynamic_cast<const ArrayDataset*>(ds.get());
  REQUIRE(arr != nullptr);
  CHECK(arr->rawType() == DType::kUInt8);
  CHECK(arr->rawBytes() == 60000u * 784u);  // 47 MB, not 188 MB of floats
  std::vector<int64_t> idx(64);
  for (int i = 0; i < 64; ++i) idx[static_cast<size_t>(i)] = i * 900;
  std::vector<float> f(64 * 784);
  std::vector<int32_t> l(64);
  ds->fetch(idx, f.data(), l.data());
  float mx = 0, mn = 1;
  for (float v : f) mx = std::max(mx, v), mn = std::min(mn, v);
  CHECK(mn >= 0.0f);
  CHECK(mx <= 1.0f);
  CHECK(mx > 0.9f);
  CHECK(l[0] == 9);  // the first training image is an ankle boot
  auto test = loadDataset(parseDataSpec({{"format", "idx"}, {"images", "t10k-images-idx3-ubyte.gz"},
                                         {"labels", "t10k-labels-idx1-ubyte.gz"}},
                                        "fmnist.json", "/data/eval", base));
  CHECK(test->size() == 10000);
}
