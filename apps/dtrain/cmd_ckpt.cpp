// `dtrain ckpt list|inspect|bench`: look at a checkpoint directory, and measure checkpoint writes. Parsing only;
// lib/ckpt/report.h and lib/ckpt/bench.h do the work.
#include <cstdio>
#include <filesystem>
#include <memory>

#include "apps/dtrain/commands.h"
#include "lib/ckpt/bench.h"
#include "lib/ckpt/checkpoint_names.h"
#include "lib/ckpt/report.h"
#include "lib/common/error.h"
#include "lib/common/parse.h"

namespace dtrain::app {

namespace {

struct CkptArgs {
  std::string path;
  bool noVerify = false;
  bool json = false;
  std::string size = "1G";
  int tensors = 8;
  int repeats = 3;
  bool buffered = false;
};

void requireExists(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) DTRAIN_THROW(UsageError, "{}: no such file or directory", path);
}

bool holdsCheckpoints(const std::filesystem::path& dir) {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec))
    if (ckpt::parseDirName(e.path().filename().string())) return true;
  return false;
}

// The folder a user names: a checkpoint folder, or a run's output folder (`runs/NAME`, what `--output-dir` names),
// whose checkpoints are in its `checkpoints/` (the default checkpoint.dir). `dtrain ckpt list runs/NAME` used to
// print "no checkpoints in runs/NAME" (exit 0) beside a checkpoints/ folder full of them.
std::string checkpointFolder(const std::string& path) {
  namespace fs = std::filesystem;
  const fs::path run = fs::path(path) / "checkpoints";
  std::error_code ec;
  if (fs::is_directory(path, ec) && !ckpt::parseDirName(fs::path(path).lexically_normal().filename().string()) &&
      !holdsCheckpoints(path) && fs::is_directory(run, ec) && holdsCheckpoints(run))
    return run.string();
  return path;
}

int runList(const CkptArgs& a) {
  requireExists(a.path);
  DTRAIN_CHECK_AS(UsageError, std::filesystem::is_directory(a.path),
                  "{}: not a folder (expected a checkpoint folder holding step-<N> folders, e.g. "
                  "runs/NAME/checkpoints; dtrain ckpt inspect reads a single file)",
                  a.path);
  const std::string dir = checkpointFolder(a.path);
  const auto list = ckpt::listCheckpoints(dir, !a.noVerify);
  const std::string out = a.json ? ckpt::listToJson(list).dump(2) + "\n" : ckpt::formatList(dir, list);
  std::fputs(out.c_str(), stdout);
  return 0;
}

int runInspect(const CkptArgs& a) {
  requireExists(a.path);
  bool complete = true;
  const std::string path = checkpointFolder(a.path);
  const std::string out = a.json ? ckpt::inspectToJson(path, !a.noVerify, &complete).dump(2) + "\n"
                                 : ckpt::formatInspect(path, !a.noVerify, &complete);
  std::fputs(out.c_str(), stdout);
  // A script can use inspect as a verifier: a partial or corrupt checkpoint (or an incomplete index) is the
  // README's checkpoint error, after the report that says why.
  return complete ? 0 : static_cast<int>(ExitCode::kCheckpoint);
}

int runBench(const CkptArgs& a) {
  const auto bytes = parse::bytesFlag("--size", a.size, true);
  ckpt::WriteBenchOptions o;
  o.dir = a.path;
  o.bytes = bytes;
  o.tensors = a.tensors;
  o.repeats = a.repeats;
  o.directIO = !a.buffered;
  const auto r = ckpt::runWriteBenchmark(o);
  std::printf("checkpoint write: %s safetensors file + manifest + marker in %s (%s I/O)\n",
              parse::formatBytes(r.fileBytes).c_str(), a.path.c_str(), r.directIO ? "O_DIRECT" : "buffered");
  for (size_t i = 0; i < r.runs.size(); ++i) {
    const auto& run = r.runs[i];
    std::printf("  run %zu: %.3f s (write+crc32+fsync %.3f s, commit %.3f s)  %.0f MB/s\n", i + 1, run.totalSeconds(),
                run.writeSeconds, run.commitSeconds, static_cast<double>(r.fileBytes) / run.totalSeconds() / 1e6);
  }
  std::printf("checkpoint write throughput (median): %.0f MB/s\n", r.medianBytesPerSecond() / 1e6);
  return 0;
}

}  // namespace

void addCkptCommand(CLI::App& root, Action& action) {
  auto args = std::make_shared<CkptArgs>();
  auto* sub = root.add_subcommand("ckpt", "Inspect checkpoint directories; measure checkpoint writes");
  sub->require_subcommand(1);

  auto* list = sub->add_subcommand("list", "List the checkpoints in DIR, newest first, with their status");
  list->add_option("DIR", args->path,
                   "Checkpoint directory (holding step-<N> directories), or a run's output folder (its checkpoints/)")
      ->required();
  list->add_flag("--no-verify", args->noVerify, "Check markers and sizes only, not crc32 checksums (faster)");
  list->add_flag("--json", args->json, "Print JSON");
  list->footer(exitCodesHelp({{"0", ""}, {"1", ""}, {"3", ""}, {"8", "the folder cannot be read as checkpoints"}}));
  list->callback([&action, args] { action = [args] { return runList(*args); }; });

  auto* inspect = sub->add_subcommand(
      "inspect", "Show a checkpoint's meta, files and tensors (DIR: its newest valid checkpoint; or a step-<N> "
                 "directory; a .safetensors file; or a sharded model's model.safetensors.index.json)");
  inspect->add_option("PATH", args->path, "Checkpoint directory, step-<N> directory, .safetensors file or model index")->required();
  inspect->add_flag("--no-verify", args->noVerify, "Do not verify crc32 checksums");
  inspect->add_flag("--json", args->json, "Print JSON");
  inspect->footer(exitCodesHelp({{"0", "the checkpoint is complete (and its checksums match)"},
                                 {"1", ""},
                                 {"3", ""},
                                 {"8", "the checkpoint is partial or corrupt, or cannot be read"}}));
  inspect->callback([&action, args] { action = [args] { return runInspect(*args); }; });

  auto* bench = sub->add_subcommand("bench", "Time checkpoint writes into DIR (compare with dd; see "
                                             "scripts/bench/ckpt_write)");
  bench->add_option("DIR", args->path, "Scratch directory on the disk to measure")->required();
  bench->add_option("--size", args->size, "Checkpoint size (default 1G)");
  bench->add_option("--tensors", args->tensors, "Number of tensors (default 8)")->check(atLeastOne());
  bench->add_option("--repeats", args->repeats, "Runs (default 3; the median is reported)")->check(atLeastOne());
  bench->add_flag("--buffered", args->buffered, "Use buffered writes + fdatasync instead of O_DIRECT");
  bench->footer(exitCodesHelp({{"0", ""}, {"1", ""}, {"3", ""}, {"8", "the checkpoint could not be written"}}));
  bench->callback([&action, args] { action = [args] { return runBench(*args); }; });
}

}  // namespace dtrain::app
