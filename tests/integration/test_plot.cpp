// `dtrain plot`: the curves of real runs, several overlaid, as SVG and HTML that an XML parser accepts, with one
// line per run and panel and as many points as metrics.jsonl has, and as a PNG of the chart's size (rsvg-convert);
// bad input, and PNG without the converter, are refused with exit 3.
#include <doctest/doctest.h>

#include <unistd.h>

#include <filesystem>

#include "tests/integration/launch_helpers.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;

namespace {

void trainRun(const std::string& dir, const std::string& name, double lr, int epochs = 3) {
  writeFile(dir + "/" + name + ".json", fmt::format(R"({{
    "name": "{}",
    "model": {{"input": [4], "layers": [{{"type": "linear", "out": 8}}, {{"type": "relu"}}, {{"type": "linear", "out": 3}}]}},
    "loss": {{"type": "cross_entropy"}},
    "data": {{"train": {{"format": "synthetic", "task": "classification", "samples": 256, "features": 4, "num_classes": 3}},
             "eval": {{"format": "synthetic", "task": "classification", "samples": 64, "features": 4, "num_classes": 3,
                      "sample_seed": 1}},
             "batch_size": 16}},
    "optimizer": {{"type": "sgd", "lr": {}}},
    "train": {{"epochs": {}, "seed": 1, "log_every": 2}},
    "checkpoint": false,
    "output_dir": "{}/{}"
  }})",
                                                    name, lr, epochs, dir, name));
  auto r = run({dtrainBinary(), "train", dir + "/" + name + ".json"}, {.timeout = 60s});
  REQUIRE_MESSAGE(r.exitCode == 0, r.err);
}

// What an XML parser finds in the SVG: polylines per class and the number of points of each, the legend texts.
RunResult inspect(const std::string& file) {
  return run({"/usr/bin/python3", "-c", R"(
import sys, xml.etree.ElementTree as ET
text = open(sys.argv[1]).read()
if sys.argv[1].endswith('.html'):
    text = text[text.index('<svg'):text.index('</svg>') + 6]
root = ET.fromstring(text)
ns = '{http://www.w3.org/2000/svg}'
for p in root.iter(ns + 'polyline'):
    print(p.get('class'), len(p.get('points').split()))
for c in root.iter(ns + 'circle'):
    print('marker-' + c.get('class'))
for t in root.iter(ns + 'text'):
    if t.get('class') == 'legend':
        print('legend', t.text)
)",
              file});
}

}  // namespace

TEST_CASE("dtrain plot marks a curve of one point: a one-epoch run's evaluation is not an empty panel") {
  std::string dir = tempDir("plot-once");
  trainRun(dir, "once", 0.1, 1);
  auto r = run({dtrainBinary(), "plot", dir + "/once", "--out", dir + "/curves.svg"});
  REQUIRE_MESSAGE(r.exitCode == 0, r.err);
  auto svg = inspect(dir + "/curves.svg");
  REQUIRE_MESSAGE(svg.exitCode == 0, svg.err);
  INFO(svg.out);
  // The evaluation panel's line has one point (a polyline of one point draws nothing): it gets a marker, and the
  // other curves, with many points, none.
  CHECK(linesWith(svg.out, "run0 1").size() == 1);
  CHECK(linesWith(svg.out, "marker-run0").size() == 1);
}

TEST_CASE("dtrain plot draws every run's curves, overlaid, as SVG and HTML") {
  std::string dir = tempDir("plot");
  trainRun(dir, "fast", 0.1);
  trainRun(dir, "slow", 0.01);
  auto r = run({dtrainBinary(), "plot", dir + "/fast", dir + "/slow", "--out", dir + "/curves.svg"});
  REQUIRE_MESSAGE(r.exitCode == 0, r.err);
  auto lines = [&](const std::string& text, const std::string& prefix) { return linesWith(text, prefix); };
  // metrics.jsonl: progress lines (log_every 2 of 16 steps per epoch, plus step 1 and epoch ends) and 3 evaluations.
  int progress = 0;
  for (const auto& l : linesWith(readFile(dir + "/fast/metrics.jsonl"), "\"step\""))
    if (l.find("eval_loss") == std::string::npos && l.find("\"final\"") == std::string::npos) ++progress;
  auto svg = inspect(dir + "/curves.svg");
  REQUIRE_MESSAGE(svg.exitCode == 0, svg.err);
  // 4 panels x 2 runs; the loss, lr and throughput lines have a point per progress line, accuracy one per epoch.
  CHECK(lines(svg.out, "run0 ").size() == 4);
  CHECK(lines(svg.out, "run1 ").size() == 4);
  CHECK(lines(svg.out, "run0 " + std::to_string(progress)).size() == 3);
  CHECK(lines(svg.out, "run0 3").size() >= 1);
  CHECK(svg.out.find("legend fast") != std::string::npos);
  CHECK(svg.out.find("legend slow") != std::string::npos);

  auto html = run({dtrainBinary(), "plot", dir + "/fast", "-o", dir + "/curves.html"});
  REQUIRE(html.exitCode == 0);
  CHECK(readFile(dir + "/curves.html").find("<!DOCTYPE html>") == 0);
  CHECK(lines(inspect(dir + "/curves.html").out, "run0 ").size() == 4);

  // PNG: the SVG rendered by rsvg-convert (Debian's librsvg2-bin, installed by scripts/setup).
  if (::access("/usr/bin/rsvg-convert", X_OK) == 0) {
    auto png = run({dtrainBinary(), "plot", dir + "/fast", dir + "/slow", "--out", dir + "/curves.png"});
    REQUIRE_MESSAGE(png.exitCode == 0, png.err);
    const std::string bytes = readFile(dir + "/curves.png");
    REQUIRE(bytes.size() > 24);
    CHECK(bytes.compare(0, 8, "\x89PNG\r\n\x1a\n") == 0);
    auto be32 = [&](size_t at) {
      return (uint32_t(uint8_t(bytes[at])) << 24) | (uint32_t(uint8_t(bytes[at + 1])) << 16) |
             (uint32_t(uint8_t(bytes[at + 2])) << 8) | uint32_t(uint8_t(bytes[at + 3]));
    };
    CHECK(be32(16) > 400);  // IHDR width and height: the chart's size, not an empty image
    CHECK(be32(20) > 200);
  } else {
    MESSAGE("rsvg-convert not installed (Debian package librsvg2-bin): the PNG rendering was not checked");
  }
  auto noConverter = run({dtrainBinary(), "plot", dir + "/fast", "--out", dir + "/other.png"},
                         {.env = {{"PATH", "/nonexistent"}}});
  CHECK(noConverter.exitCode == 3);
  CHECK(noConverter.err.find("librsvg2-bin") != std::string::npos);
  CHECK(run({dtrainBinary(), "plot", dir + "/fast", "--out", dir + "/curves.jpg"}).exitCode == 3);
  // An --out that cannot be written is a usage error naming the folder, before anything is drawn.
  for (const std::string ext : {".svg", ".png"}) {
    auto noFolder = run({dtrainBinary(), "plot", dir + "/fast", "--out", dir + "/no-such-folder/curves" + ext});
    CHECK(noFolder.exitCode == 3);
    CHECK(noFolder.err.find("--out " + dir + "/no-such-folder/curves" + ext + ": the folder " + dir +
                            "/no-such-folder does not exist") != std::string::npos);
  }
  std::filesystem::create_directories(dir + "/folder.svg");
  auto isFolder = run({dtrainBinary(), "plot", dir + "/fast", "--out", dir + "/folder.svg"});
  CHECK(isFolder.exitCode == 3);
  CHECK(isFolder.err.find("--out " + dir + "/folder.svg: is a folder") != std::string::npos);
  auto missing = run({dtrainBinary(), "plot", dir + "/nothing"});
  CHECK(missing.exitCode == 3);
  CHECK(missing.err.find(dir + "/nothing: no such file") != std::string::npos);
}
