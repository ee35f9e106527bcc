// Issue 10 §5, "job files that lie about their size or their numbers": every example is refused with exit 2 by
// `dtrain check`, `dtrain train` and `dtrain run` (before any worker starts), with a message naming the file and
// the field, never "internal error", a hang, an unbounded read or a wrapped-around size.
#include <doctest/doctest.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "tests/integration/launch_helpers.h"
#include "tests/integration/train_helpers.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;
using nlohmann::json;

namespace {

const char* kCnnJob = R"({
  "model": {"input": [1, 8, 8], "layers": [{"type": "conv2d", "out": 2, "kernel": 3}, {"type": "flatten"},
                                         {"type": "linear", "out": 2}]},
  "loss": {"type": "cross_entropy"},
  "optimizer": {"type": "sgd", "lr": 0.1},
  "data": {"train": {"format": "synthetic", "task": "classification", "samples": 32, "features": 64,
                     "num_classes": 2, "shape": [1, 8, 8]}, "batch_size": 8},
  "checkpoint": false
})";

struct BadJob {
  std::string name;
  std::string file;             // the job file given to dtrain
  std::vector<std::string> sets;
  std::string expected;         // a part of the error message
};

void expectRefused(const BadJob& b, const std::string& dir) {
  INFO(b.name);
  for (const char* cmd : {"check", "train", "run"}) {
    INFO(cmd);
    std::vector<std::string> argv{dtrainBinary(), cmd};
    if (std::string(cmd) == "run") argv.insert(argv.end(), {"--standalone", "--nproc-per-node", "2"});
    argv.push_back(b.file);
    for (const auto& s : b.sets) argv.insert(argv.end(), {"--set", s});
    argv.insert(argv.end(), {"--output-dir", dir + "/out"});
    auto r = run(argv, {.timeout = 30s});
    INFO(r.err);
    CHECK_FALSE(r.timedOut);
    CHECK(r.exitCode == 2);
    CHECK(r.err.find(b.expected) != std::string::npos);
    CHECK(r.err.find("internal error") == std::string::npos);
    CHECK(r.out.find("[n0 r") == std::string::npos);  // no worker was started
    CHECK_FALSE(std::filesystem::exists(dir + "/out"));
  }
}

}  // namespace

TEST_CASE("sizes and numbers that lie are config errors (exit 2) before any worker starts") {
  std::string dir = tempDir("job_limits");
  const std::string job = dir + "/cnn.json";
  writeFile(job, kCnnJob);
  REQUIRE(run({dtrainBinary(), "check", job}).exitCode == 0);

  std::string lr = kCnnJob;
  lr.replace(lr.find("\"lr\": 0.1"), 9, "\"lr\": 1e999");
  writeFile(dir + "/lr.json", lr);
  REQUIRE(::mkfifo((dir + "/fifo.json").c_str(), 0600) == 0);
  std::filesystem::create_symlink("/dev/zero", dir + "/zero.json");
  json fifoModel = json::parse(kCnnJob);
  fifoModel["model"] = "fifo.json";
  writeFile(dir + "/fifo_model.json", fifoModel.dump());

  const std::vector<BadJob> bad = {
      {"kernel 2^32", job, {"model.layers.0.kernel=4294967296"}, "/model/layers/0/kernel: 4294967296 is more than"},
      {"kernel and padding whose product overflows", job,
       {"model.layers.0.kernel=[1073741824,1]", "model.layers.0.padding=[536870912,0]", "model.layers.0.out=4"},
       "/model/layers/0: conv2d has"},
      {"linear out 2^30", job, {"model.layers.2.out=1073741824"}, "/model/layers/2: linear has 78383153152 parameters"},
      {"batch size 2^31", job, {"data.batch_size=2147483648"}, "/data/batch_size: 2147483648 is more than"},
      {"batch size 2^32 + 1", job, {"data.batch_size=4294967297"}, "/data/batch_size: 4294967297 is more than"},
      {"lr 1e999", dir + "/lr.json", {}, "lr.json: not valid JSON: number overflow parsing '1e999'"},
      {"job file that is /dev/zero", dir + "/zero.json", {}, "zero.json: job file is not a regular file (a character device)"},
      {"job file that is a FIFO", dir + "/fifo.json", {}, "fifo.json: job file is not a regular file (a fifo)"},
      {"model file that is a FIFO", dir + "/fifo_model.json", {}, "fifo.json: model file is not a regular file (a fifo)"},
  };
  for (const auto& b : bad) expectRefused(b, dir);
}

TEST_CASE("a job that cannot fit in this machine's memory is refused by check and run, naming both sizes") {
  std::string dir = tempDir("job_memory");
  const std::string job = dir + "/huge.json";
  json doc = json::parse(kCnnJob);
  // 2^20 values per sample x 2^24 samples per batch: 2^44 floats of activations, more than any machine has.
  doc["model"] = json::parse(R"({"input": [1048576], "layers": [{"type": "relu"}, {"type": "linear", "out": 2}]})");
  doc["data"]["train"].erase("shape");
  doc["data"]["train"]["features"] = 1048576;
  doc["data"]["batch_size"] = 16777216;
  doc["data"]["train"]["samples"] = 16777216;  // a batch holds at most the data: as many samples as the batch
  writeFile(job, doc.dump());
  for (const char* cmd : {"check", "run"}) {
    INFO(cmd);
    std::vector<std::string> argv{dtrainBinary(), cmd};
    if (std::string(cmd) == "run") argv.insert(argv.end(), {"--standalone", "--nproc-per-node", "2"});
    argv.insert(argv.end(), {job, "--output-dir", dir + "/out"});
    auto r = run(argv, {.timeout = 30s});
    INFO(r.err);
    CHECK(r.exitCode == 2);
    CHECK(r.err.find("this job needs about ") != std::string::npos);
    CHECK(r.err.find(std::string(" local worker(s) = ")) != std::string::npos);
    CHECK(r.err.find("available (") != std::string::npos);
    CHECK(r.err.find(std::string(cmd) == "run" ? "x 2 local worker(s)" : "x 1 local worker(s)") != std::string::npos);
    CHECK(r.out.find("[n0 r") == std::string::npos);
    CHECK_FALSE(std::filesystem::exists(dir + "/out"));
  }
}

// A GPT far larger than the process may hold: `dtrain check` built the model to print its summary, which took 53 s
// and under `ulimit -v 4000000` died of std::bad_alloc (exit 1, "internal error"). n_layer 100000 expanded and
// built for minutes.
TEST_CASE("dtrain check of a big GPT under ulimit -v: exit 2 with the estimate and the limit, no allocation") {
  std::string dir = tempDir("gpt_limit");
  std::string text;
  for (int i = 0; i < 200; ++i) text += "the quick brown fox jumps over the lazy dog. ";
  writeFile(dir + "/text.txt", text);
  const json doc = json::parse(R"({
    "model": {"preset": "gpt", "vocab_size": 256, "block_size": 16, "n_layer": 1, "n_head": 8, "n_embd": 8000},
    "loss": {"type": "cross_entropy"},
    "optimizer": {"type": "adamw", "lr": 0.001},
    "data": {"train": {"format": "text", "path": "text.txt"}, "batch_size": 2},
    "checkpoint": false
  })");
  const std::string job = dir + "/gpt.json";
  writeFile(job, doc.dump());
  // 770M parameters: about 14 GiB with AdamW's state, in a process limited to 3.8 GiB of address space.
  auto r = run({"sh", "-c", "ulimit -v 4000000 && exec \"$0\" check \"$1\" --output-dir \"$2\"", dtrainBinary(), job,
                dir + "/out"},
               {.timeout = 30s});
  INFO(r.out, r.err);
  CHECK_FALSE(r.timedOut);
  CHECK(r.exitCode == 2);
  CHECK(r.err.find(job + ": this job needs about ") != std::string::npos);
  CHECK(r.err.find(" per worker, but a process here may use at most 3.8 GiB of memory (ulimit -v: RLIMIT_AS, which "
                   "the workers inherit)") != std::string::npos);
  CHECK(r.err.find("bad_alloc") == std::string::npos);
  CHECK(r.err.find("internal error") == std::string::npos);
  // n_layer is capped at load, before anything is expanded or built; the error names the field as written.
  auto deep = run({dtrainBinary(), "check", job, "--set", "model.n_layer=100000", "--output-dir", dir + "/out"},
                  {.timeout = 30s});
  INFO(deep.err);
  CHECK_FALSE(deep.timedOut);
  CHECK(deep.exitCode == 2);
  CHECK(deep.err.find(job + ": /model/n_layer: 100000 is more than the supported 1024 layers (from --set "
                            "model.n_layer=100000)") != std::string::npos);
}

namespace {

// A memory cgroup made for one test case and removed when the case ends, also when a check fails: a child of this
// process's cgroup with memory.max (cgroup v2, when its hierarchy has the memory controller here), else with
// memory.limit_in_bytes (v1's memory hierarchy at /sys/fs/cgroup/memory). Located from /proc/self/cgroup and the
// usual mount points, independently of lib/common/cgroup.h. `dir` is empty, and `why` says why, when neither can
// be made (not root, a read-only or absent cgroup file system, no memory controller).
struct TestMemoryCgroup {
  std::string dir, file, why;
  explicit TestMemoryCgroup(int64_t limit) {
    const std::string name = fmt::format("dtrain-test-{}", ::getpid());
    std::string v2Path, v1Path;
    std::istringstream lines(readFile("/proc/self/cgroup"));
    for (std::string line; std::getline(lines, line);) {
      if (line.rfind("0::", 0) == 0) v2Path = line.substr(3);
      const size_t a = line.find(':'), b = line.find(':', a + 1);
      if (a != std::string::npos && b != std::string::npos && line.substr(a + 1, b - a - 1) == "memory")
        v1Path = line.substr(b + 1);
    }
    std::vector<std::pair<std::string, std::string>> tries;  // (parent folder, limit file)
    if (!v2Path.empty()) {
      for (const char* mount : {"/sys/fs/cgroup", "/sys/fs/cgroup/unified"})
        if (std::filesystem::exists(std::string(mount) + "/cgroup.controllers"))
          tries.emplace_back(mount + (v2Path == "/" ? "" : v2Path), "memory.max");
    }
    if (!v1Path.empty())
      tries.emplace_back("/sys/fs/cgroup/memory" + (v1Path == "/" ? "" : v1Path), "memory.limit_in_bytes");
    for (const auto& [parent, limitFile] : tries) {
      const std::string d = parent + "/" + name;
      if (::mkdir(d.c_str(), 0755) != 0) {
        why += fmt::format("mkdir {}: {}; ", d, std::strerror(errno));
        continue;
      }
      std::ofstream out(d + "/" + limitFile);
      out << limit << "\n";
      out.close();
      if (out && readFile(d + "/" + limitFile) == fmt::format("{}\n", limit)) {
        dir = d, file = limitFile;
        return;
      }
      why += fmt::format("{}: no {} or it does not take {}; ", d, limitFile, limit);
      ::rmdir(d.c_str());
    }
    if (tries.empty()) why = "no cgroup v2 or v1 memory hierarchy found from /proc/self/cgroup";
  }
  ~TestMemoryCgroup() {
    if (!dir.empty() && ::rmdir(dir.c_str()) != 0)
      MESSAGE("could not remove the test cgroup " << dir << ": " << std::strerror(errno));
  }
  TestMemoryCgroup(const TestMemoryCgroup&) = delete;
  TestMemoryCgroup& operator=(const TestMemoryCgroup&) = delete;
};

}  // namespace

// In a 4 GB container (a cgroup's memory limit) on a larger machine, the memory check passed a job the kernel's
// OOM killer then ended: it compared with /proc/meminfo and `ulimit -v` only. Here the limit is real: a cgroup
// of 256 MiB, with dtrain check and dtrain run started inside it.
TEST_CASE("a job over this process's cgroup memory limit is refused by check and run (exit 2), naming the file") {
  constexpr int64_t kLimit = int64_t{256} << 20;
  TestMemoryCgroup cgroup(kLimit);
  if (cgroup.dir.empty()) {
    MESSAGE("skipped: cannot create a memory cgroup here (" << cgroup.why << ")");
    return;
  }
  std::string dir = tempDir("cgroup_limit");
  // 4096 x 32768 weights with their gradient and DDP copy: about 1.5 GiB per worker, far below this machine's
  // available memory and far above the cgroup's 256 MiB.
  json doc = json::parse(kCnnJob);
  doc["model"] = json::parse(R"({"input": [4096], "layers": [{"type": "linear", "out": 32768}]})");
  doc["data"]["train"] = json::parse(
      R"({"format": "synthetic", "task": "classification", "samples": 16, "features": 4096, "num_classes": 4})");
  const std::string big = dir + "/big.json", small = dir + "/small.json";
  writeFile(big, doc.dump());
  writeFile(small, kCnnJob);
  // The command moves itself into the cgroup, then becomes dtrain: dtrain and its workers are in it from the start.
  auto inCgroup = [&](std::vector<std::string> args) {
    std::vector<std::string> argv{"sh", "-c", "echo $$ > \"$0/cgroup.procs\" && shift && exec \"$@\"", cgroup.dir, "_",
                                  dtrainBinary()};
    argv.insert(argv.end(), args.begin(), args.end());
    return run(argv, {.timeout = 30s});
  };
  for (const char* cmd : {"check", "run"}) {
    INFO(cmd);
    std::vector<std::string> args{cmd};
    if (std::string(cmd) == "run") args.insert(args.end(), {"--standalone", "--nproc-per-node", "2"});
    args.insert(args.end(), {big, "--output-dir", dir + "/out"});
    auto r = inCgroup(args);
    INFO(r.out, r.err);
    CHECK_FALSE(r.timedOut);
    CHECK(r.exitCode == 2);
    CHECK(r.err.find(big + ": this job needs about ") != std::string::npos);
    CHECK(r.err.find(std::string(cmd) == "run" ? "x 2 local worker(s)" : "x 1 local worker(s)") != std::string::npos);
    CHECK(r.err.find(fmt::format("but this process's cgroup may use at most 256.0 MiB (cgroup {} {} = 256.0 MiB)",
                                 cgroup.dir, cgroup.file)) != std::string::npos);
    CHECK(r.out.find("[n0 r") == std::string::npos);
    CHECK_FALSE(std::filesystem::exists(dir + "/out"));
  }
  // The same cgroup takes a job that fits: the refusal is the estimate against the limit, not the cgroup.
  auto ok = inCgroup({"check", small, "--output-dir", dir + "/out"});
  INFO(ok.out, ok.err);
  CHECK(ok.exitCode == 0);
}

// A parameter-server job run as one process keeps its sparse tables itself: a table no machine holds is refused
// naming the tables' share (it used to reach the table's allocation, which failed or took the machine's memory).
TEST_CASE("a one-process dtrain train of a parameter-server job counts its sparse tables in the memory check") {
  std::string dir = tempDir("ps_one_process_memory");
  const std::string job = dir + "/ps.json";
  writeFile(job, R"({
  "model": {"input": [2], "layers": [
    {"type": "embedding", "vocab_size": 1073741824, "n_embd": 65536, "position": false, "sparse": true},
    {"type": "flatten"}, {"type": "linear", "out": 1}]},
  "loss": {"type": "bce_with_logits"},
  "data": {"train": {"format": "synthetic", "task": "recsys", "users": 600, "items": 400, "samples": 100}, "batch_size": 8},
  "optimizer": {"type": "adam", "lr": 0.01},
  "parallel": {"strategy": "parameter_server", "servers": 2, "mode": "async"},
  "checkpoint": false
})");
  auto r = run({dtrainBinary(), "train", job, "--output-dir", dir + "/out"}, {.timeout = 30s});
  INFO(r.err);
  CHECK(r.exitCode == 2);
  // 2^30 rows x 2^16 float32 (the largest table a spec may have) with SparseAdam's two moments: 768 TiB.
  CHECK(r.err.find("this one-process run holds the sparse tables itself") != std::string::npos);
  CHECK(r.err.find(", sparse tables 768.0 TiB)") != std::string::npos);
  CHECK(r.err.find("internal error") == std::string::npos);
  // dtrain check says what each server would hold (2^29 rows each) instead of refusing a job meant for servers.
  auto c = run({dtrainBinary(), "check", job, "--output-dir", dir + "/out"}, {.timeout = 30s});
  INFO(c.err);
  CHECK(c.exitCode == 0);
  CHECK(c.out.find("parameter server 1 of 2: 384.0 TiB (rows [536870912, 1073741824) of 0.wte.weight") !=
        std::string::npos);
}

// "lr": 1e38 used to train on NaN, exit 0 and write a NaN model.
TEST_CASE("a diverging run stops with exit 9 naming the step and never saves non-finite weights") {
  std::string dir = tempDir("job_diverge");
  const std::string job = dir + "/cnn.json";
  json doc = json::parse(kCnnJob);
  doc["checkpoint"] = json{{"every_steps", 1}, {"keep", 10}};
  doc["train"] = json{{"epochs", 3}};
  writeFile(job, doc.dump());
  auto finiteWeights = [](const std::string& file) {
    for (const auto& [name, values] : readTensorsF32(file))
      for (float v : values)
        if (!std::isfinite(v)) return false;
    return true;
  };
  // One process.
  auto t = run({dtrainBinary(), "train", job, "--set", "optimizer.lr=1e38", "--output-dir", dir + "/one"},
               {.timeout = 60s});
  INFO(t.err);
  CHECK(t.exitCode == 9);
  CHECK(t.err.find("training diverged at step 2 (epoch 1): non-finite loss on rank 0") != std::string::npos);
  CHECK_FALSE(std::filesystem::exists(dir + "/one/model.safetensors"));
  int checkpoints = 0;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir + "/one/checkpoints")) {
    if (e.path().filename() != "model.safetensors") continue;
    ++checkpoints;
    CHECK(finiteWeights(e.path().string()));
  }
  CHECK(checkpoints >= 1);  // step 1's checkpoint (its weights are huge but finite) is kept

  // Two ranks stop at the same step: the agent reports exit 9 and no rank hangs in a collective.
  auto r = run({dtrainBinary(), "run", "--standalone", "--nproc-per-node", "2", job, "--set", "optimizer.lr=1e38",
                "--output-dir", dir + "/two"},
               {.timeout = 120s});
  INFO(r.err);
  CHECK_FALSE(r.timedOut);
  CHECK(r.exitCode == 9);
  CHECK(r.err.find("training diverged at step 2 (epoch 1)") != std::string::npos);
  CHECK_FALSE(std::filesystem::exists(dir + "/two/model.safetensors"));

  // on_nonfinite = skip: the steps are dropped, the run ends normally with finite weights.
  auto s = run({dtrainBinary(), "train", job, "--set", "optimizer.lr=1e38", "--set", "train.on_nonfinite=skip",
                "--set", "checkpoint=false", "--output-dir", dir + "/skip"},
               {.timeout = 60s});
  INFO(s.out);
  CHECK(s.exitCode == 0);
  CHECK(s.out.find("update skipped (train.on_nonfinite=skip") != std::string::npos);
  REQUIRE(std::filesystem::exists(dir + "/skip/model.safetensors"));
  CHECK(finiteWeights(dir + "/skip/model.safetensors"));
  // ... but not forever: train.max_skipped_steps in a row end the run as diverged.
  auto bounded = run({dtrainBinary(), "train", job, "--set", "optimizer.lr=1e38", "--set", "train.on_nonfinite=skip",
                      "--set", "train.max_skipped_steps=5", "--set", "checkpoint=false", "--output-dir",
                      dir + "/bounded"},
                     {.timeout = 60s});
  INFO(bounded.err);
  CHECK(bounded.exitCode == 9);
  CHECK(bounded.err.find("on 5 consecutive steps (train.max_skipped_steps 5)") != std::string::npos);
  CHECK_FALSE(std::filesystem::exists(dir + "/bounded/model.safetensors"));
  // A bad value is a config error.
  auto bad = run({dtrainBinary(), "check", job, "--set", "train.on_nonfinite=ignore"});
  CHECK(bad.exitCode == 2);
  CHECK(bad.err.find("/train/on_nonfinite: unknown on_nonfinite value 'ignore' (expected stop, skip)") !=
        std::string::npos);
}

namespace {

// An IDX file (LeCun's format): magic 0x0000 0x08 ndims, big-endian sizes, then bytes.
std::string idx(const std::vector<uint32_t>& dims, const std::string& data) {
  std::string out{'\0', '\0', '\x08', static_cast<char>(dims.size())};
  for (uint32_t d : dims)
    for (int shift : {24, 16, 8, 0}) out.push_back(static_cast<char>((d >> shift) & 0xff));
  return out + data;
}

void gzipFile(const std::string& plain, const std::string& gz) {
  REQUIRE(run({"sh", "-c", "gzip -c -n '" + plain + "' > '" + gz + "'"}).exitCode == 0);
}

}  // namespace

TEST_CASE("data that lies (bad magic, truncated gzip, labels out of range, a gzip bomb) is refused before any worker starts") {
  std::string dir = tempDir("job_data");
  const std::string pixels(4 * 2 * 2, '\x10');
  writeFile(dir + "/img", idx({4, 2, 2}, pixels));
  writeFile(dir + "/lab", idx({4}, std::string("\x00\x01\x02\x01", 4)));
  writeFile(dir + "/lab_range", idx({4}, std::string("\x00\x01\x05\x01", 4)));
  writeFile(dir + "/lab_short", idx({3}, std::string("\x00\x01\x02", 3)));
  std::string badMagic = idx({4}, std::string("\x00\x01\x02\x01", 4));
  badMagic[3] = '\x03';
  writeFile(dir + "/lab_magic", badMagic);
  // Incompressible pixels, so that cutting the gzip file in half loses data and its trailer.
  std::string noise(4000 * 4, '\0');
  for (size_t i = 0; i < noise.size(); ++i) noise[i] = static_cast<char>(i * 7919 % 251);
  writeFile(dir + "/big", idx({1000, 4, 4}, noise));
  gzipFile(dir + "/big", dir + "/big.gz");
  std::string gz = readFile(dir + "/big.gz");
  writeFile(dir + "/cut.gz", gz.substr(0, gz.size() / 2));
  // A gzip bomb: the header declares 4 images of 2x2, the stream inflates to 64 MiB more.
  writeFile(dir + "/bomb", idx({4, 2, 2}, pixels) + std::string(64u << 20, '\0'));
  gzipFile(dir + "/bomb", dir + "/bomb.gz");
  std::filesystem::remove(dir + "/bomb");

  auto jobWith = [&](const std::string& name, const std::string& images, const std::string& labels,
                     std::optional<int> numClasses) {
    json job = {{"model", {{"input", {2, 2}}, {"layers", {{{"type", "flatten"}}, {{"type", "linear"}, {"out", 3}}}}}},
                {"loss", {{"type", "cross_entropy"}}},
                {"optimizer", {{"type", "sgd"}, {"lr", 0.1}}},
                {"data", {{"train", {{"format", "idx"}, {"images", images}, {"labels", labels}}}, {"batch_size", 2}}},
                {"checkpoint", false}};
    if (numClasses) job["data"]["train"]["num_classes"] = *numClasses;
    writeFile(dir + "/" + name + ".json", job.dump());
    return dir + "/" + name + ".json";
  };
  REQUIRE(run({dtrainBinary(), "check", jobWith("good", "img", "lab", std::nullopt)}).exitCode == 0);

  const std::vector<BadJob> bad = {
      {"labels with a bad IDX magic", jobWith("magic", "img", "lab_magic", std::nullopt), {},
       "/data/train/labels: " + dir + "/lab_magic: bad IDX magic 0x00000803 (expected 0x00000801 for labels)"},
      {"labels out of range for num_classes", jobWith("range", "img", "lab_range", 3), {},
       "sample 2 has class label 5 (expected < num_classes 3)"},
      {"more classes in the labels than the model has logits", jobWith("logits", "img", "lab_range", std::nullopt), {},
       "the data has 6 classes but the model outputs 3 logits"},
      {"fewer labels than images", jobWith("count", "img", "lab_short", std::nullopt), {},
       "has 3 labels but " + dir + "/img has 4 images"},
      // `run` and `check` read only the header and the trailer; `train` inflates and finds the cut.
      {"truncated gzip images", jobWith("cut", "cut.gz", "lab", std::nullopt), {},
       "/data/train/images: " + dir + "/cut.gz: "},
      {"a gzip bomb", jobWith("bomb", "bomb.gz", "lab", std::nullopt), {}, "/data/train/images: " + dir + "/bomb.gz: "},
  };
  for (const auto& b : bad) expectRefused(b, dir);

  // What each reader says: the launcher before any worker, from the header and the gzip trailer alone...
  auto r = run({dtrainBinary(), "run", "--standalone", dir + "/bomb.json"}, {.timeout = 30s});
  CHECK(r.err.find("IDX data has 67108880 bytes, expected 16 for shape [4, 2, 2] of uint8 (by the gzip trailer's size") !=
        std::string::npos);
  r = run({dtrainBinary(), "check", dir + "/cut.json"}, {.timeout = 30s});
  CHECK(r.err.find("(by the gzip trailer's size; or the gzip file is truncated or corrupt)") != std::string::npos);
  // ... and a full read stops inflating at the declared size instead of taking the whole 64 MiB.
  r = run({dtrainBinary(), "train", dir + "/bomb.json", "--output-dir", dir + "/out"}, {.timeout = 30s});
  CHECK(r.err.find("inflates to more than the 32 bytes its header declares") != std::string::npos);
}

TEST_CASE("an output or checkpoint folder that cannot be a directory is refused (exit 2) before any training") {
  std::string dir = tempDir("outdirs");
  writeFile(dir + "/job.json", smallJob().dump());
  writeFile(dir + "/afile", "not a folder");
  struct Case {
    std::vector<std::string> args;
    std::string expected;
  };
  // The checkpoint folder used to fail at the first checkpoint, after a whole epoch of training (exit 8).
  for (const Case& c : {Case{{"--output-dir", dir + "/afile"}, "output folder (--output-dir"},
                        Case{{"--output-dir", dir + "/afile/sub"}, "output folder (--output-dir"},
                        Case{{"--output-dir", dir + "/out", "--set", "checkpoint.dir=" + dir + "/afile"},
                             "checkpoint folder (/checkpoint/dir) " + dir + "/afile: " + dir +
                                 "/afile exists and is not a directory"},
                        // No folder can be made in /proc, although access(2) lets root write there: it passed and
                        // every worker failed writing metrics.jsonl (exit 1).
                        Case{{"--output-dir", "/proc/x"},
                             "output folder (--output-dir, /output_dir or runs/<name>) /proc/x: /proc is not writable "
                             "(cannot create a folder there: No such file or directory)"}}) {
    for (const char* cmd : {"check", "train", "run"}) {
      CAPTURE(cmd);
      CAPTURE(c.args.at(1));
      std::vector<std::string> argv{dtrainBinary(), cmd};
      if (std::string(cmd) == "run") argv.insert(argv.end(), {"--standalone", "--nproc-per-node", "2"});
      argv.push_back(dir + "/job.json");
      argv.insert(argv.end(), c.args.begin(), c.args.end());
      auto r = run(argv, {.timeout = 60s});
      INFO(r.out, r.err);
      CHECK(r.exitCode == 2);
      CHECK(r.err.find(c.expected) != std::string::npos);
      CHECK(r.out.find("[n0 r") == std::string::npos);  // no worker was started
      CHECK(r.out.find("step") == std::string::npos);   // nothing trained
    }
  }
}
