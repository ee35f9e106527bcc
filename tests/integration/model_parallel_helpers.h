// Helpers shared by the model-parallel integration tests (test_pipeline, test_tensor_parallel): run a job alone or
// under `dtrain run` with --set overrides, compare two model.safetensors tensor by tensor, spell a parallel
// section, write a small text corpus, pick lines out of a metrics.jsonl.
#pragma once

#include <doctest/doctest.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "tests/integration/train_helpers.h"
#include "tests/support/process.h"

namespace dtrain::testing {

// `dtrain train JOB` (n == 1) or `dtrain run --standalone --nproc-per-node N [launch...] JOB`, with
// `--output-dir out` and one `--set` per entry of `sets`; the run must exit 0 (its output is shown otherwise).
inline RunResult trainJob(const std::string& job, const std::string& out, int n, const std::vector<std::string>& sets = {},
                          const std::map<std::string, std::string>& env = {},
                          const std::vector<std::string>& launch = {}) {
  std::vector<std::string> argv{dtrainBinary()};
  if (n == 1) {
    argv.insert(argv.end(), {"train", job});
  } else {
    argv.insert(argv.end(), {"run", "--standalone", "--nproc-per-node", std::to_string(n)});
    argv.insert(argv.end(), launch.begin(), launch.end());
    argv.push_back(job);
  }
  argv.insert(argv.end(), {"--output-dir", out});
  for (const auto& s : sets) argv.insert(argv.end(), {"--set", s});
  // Generous: 8 processes on 2 busy cores; nothing here measures time.
  auto r = run(argv, {.timeout = std::chrono::seconds(180), .env = env});
  INFO(r.out);
  INFO(r.err);
  REQUIRE(r.exitCode == 0);
  return r;
}

// Every tensor of `gotFile` equals `wantFile`'s within `rel` of the wanted tensor's largest magnitude (the
// max-norm of the difference over the max-norm of the tensor); both files hold the same names and sizes.
inline void checkSameWeights(const std::string& gotFile, const std::string& wantFile, double rel = 1e-5) {
  auto got = readTensorsF32(gotFile);
  auto want = readTensorsF32(wantFile);
  REQUIRE(!want.empty());
  REQUIRE(got.size() == want.size());
  for (const auto& [name, w] : want) {
    CAPTURE(name);
    REQUIRE(got.count(name) == 1);
    const auto& g = got[name];
    REQUIRE(g.size() == w.size());
    double scale = 1e-12, worst = 0;
    for (size_t i = 0; i < w.size(); ++i) {
      scale = std::max(scale, static_cast<double>(std::fabs(w[i])));
      worst = std::max(worst, std::fabs(static_cast<double>(g[i]) - w[i]));
    }
    CHECK_MESSAGE(worst < rel * scale, name, ": max difference ", worst, " of max ", scale);
  }
}

// A --set value for the parallel section: `stages` pipeline stages (none when 1) and `tensor` ranks per group.
inline std::string parallelSet(int stages, const std::string& schedule, int micro, int tensor = 1) {
  std::string pipeline =
      stages > 1 ? fmt::format(R"("pipeline": {{"stages": {}, "schedule": "{}", "micro_batches": {}}})", stages,
                               schedule, micro)
                 : "";
  std::string t = tensor > 1 ? fmt::format(R"("tensor": {})", tensor) : "";
  return fmt::format("parallel={{{}{}{}}}", pipeline, !pipeline.empty() && !t.empty() ? ", " : "", t);
}

// `dir`/text.txt holding `line` `times` times, a "#" in it replaced by the line's number mod 7; returns its path.
inline std::string writeCorpus(const std::string& dir, const std::string& line, int times) {
  std::string text;
  for (int i = 0; i < times; ++i) {
    std::string l = line;
    if (auto at = l.find('#'); at != std::string::npos) l.replace(at, 1, std::to_string(i % 7));
    text += l;
  }
  writeFile(dir + "/text.txt", text);
  return dir + "/text.txt";
}

// The first training line and the last evaluation line of a metrics.jsonl.
inline nlohmann::json firstTrainLine(const std::vector<nlohmann::json>& lines) {
  for (const auto& l : lines)
    if (l.contains("loss") && !l.contains("eval_loss")) return l;
  FAIL("no training line");
  return {};
}
inline nlohmann::json lastEvalLine(const std::vector<nlohmann::json>& lines) {
  for (auto it = lines.rbegin(); it != lines.rend(); ++it)
    if (it->contains("eval_loss")) return *it;
  FAIL("no evaluation line");
  return {};
}

}  // namespace dtrain::testing
