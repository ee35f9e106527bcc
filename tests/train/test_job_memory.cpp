// The job's memory figures (lib/train/check.h): the estimate from the spec and what a job that cannot fit is told,
// per device and precision, with the parameter servers' sparse tables; the machine's memory from /proc/meminfo.
// Split from test_job.cpp (loading and validating job files).
#include <doctest/doctest.h>

#include <sys/stat.h>
#include <zlib.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "lib/common/error.h"
#include "lib/nn/device.h"
#include "lib/nn/registry.h"
#include "lib/train/check.h"
#include "lib/train/compression.h"
#include "lib/train/job.h"
#include "tests/support/process.h"
#include "tests/train/job_fixture.h"

using namespace dtrain;
using namespace dtrain::train;
using nlohmann::json;

using namespace dtrain::train::test_job;

TEST_CASE("memory is estimated from the spec, saturating, and a job that cannot fit is refused") {
  auto dir = testing::tempDir("job_memory");
  auto path = writeJob(dir, kJob);
  auto job = loadJob({path});
  auto e = estimateMemory(job);
  // linear 4->8 (40) + linear 8->3 (27) = 67 parameters: weights, gradients, DDP copy.
  CHECK(e.parameters == 67 * 12);
  CHECK(e.optimizer == 0);  // plain SGD
  CHECK(e.activations == (4 + 2 * (8 + 8 + 3)) * 8 * 4);
  CHECK(e.data == 64 * (4 + 1) * 4);
  CHECK(estimateMemory(loadJob({path, {"optimizer.type=adam"}})).optimizer == 67 * 8);
  CHECK(estimateMemory(loadJob({path, {"optimizer.momentum=0.9"}})).optimizer == 67 * 4);
  // Gradient compression's buffers: fp16 keeps a 16-bit copy of the gradients; shown in the summary.
  CHECK(e.compression == 0);
  auto fp16 = estimateMemory(loadJob({path, {R"(parallel.compression={"type": "fp16"})"}}));
  CHECK(fp16.compression == 67 * 2);
  CHECK(fp16.total() == e.total() + 67 * 2);
  CHECK(fp16.str().find(", compression 134 B)") != std::string::npos);
  // Attention keeps q, k, v, its heads and the probabilities [H, T, T] per sample: counted beyond the outputs
  // (input 8 tokens; embedding, 2 blocks and ln_f [8, 4]; logits [8, 16]; each with its gradient).
  auto gpt = loadJob({path, {R"(model={"preset": "gpt", "vocab_size": 16, "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 4})"}});
  const int64_t probs = 2 * 8 * 8;
  CHECK(estimateMemory(gpt).activations >= (8 + 2 * (8 * 4 * 4 + 8 * 16) + probs) * 8 * 4);
  CHECK(estimateMemory(gpt).activations == (8 + 2 * (8 * 4 * 4 + 8 * 16) + nn::keptFloatsOf(gpt.model.layers[1]) +
                                            nn::keptFloatsOf(gpt.model.layers[2])) * 8 * 4);
  // A CUDA job counts what the CUDA attention keeps: with the fused kernels the log-sum-exp rows [H, T] instead of
  // the probabilities; on the matmul path ("auto" at this size) neither (its score square is one sample's, shared).
  Job gpuGpt = gpt;
  gpuGpt.device = Device::cuda(0);
  CHECK(estimateMemory(gpt).activations - estimateMemory(gpuGpt).activations == probs * 8 * 4);
  gpuGpt.attention = nn::AttentionKernel::kFused;
  CHECK(estimateMemory(gpt).activations - estimateMemory(gpuGpt).activations == (probs - 2 * 8) * 8 * 4);
  gpuGpt.attention = nn::AttentionKernel::kMatmul;
  CHECK(estimateMemory(gpt).activations - estimateMemory(gpuGpt).activations == probs * 8 * 4);
  // "precision": "bf16" on a GPU stores in 2 bytes what only bf16 GEMMs read (their gradients stay float32):
  // ln_1, ln_2 and ln_f outputs [8, 4] each, gelu's [8, 16], and on the matmul path attention's qkv and heads
  // [8, 16]: 2 bytes less per value, batch 8. The logits'
  // gradient [8, 16] is bf16 too (cross_entropy writes it so for lm_head) and lives in the logits' own bytes (written
  // over them): 4 bytes less per value; not with mse, which gives a float32 gradient of its own.
  Job bf16Gpt = gpuGpt;
  bf16Gpt.precision = Job::Precision::kBf16;
  REQUIRE(bf16Gpt.loss.type == nn::LossType::kCrossEntropy);
  CHECK(estimateMemory(gpuGpt).activations - estimateMemory(bf16Gpt).activations ==
        (3 * 8 * 4 + 8 * 16 + 8 * 16 + 2 * 8 * 16) * 2 * 8);
  Job mseGpt = bf16Gpt;
  mseGpt.loss.type = nn::LossType::kMse;
  CHECK(estimateMemory(gpuGpt).activations - estimateMemory(mseGpt).activations ==
        (3 * 8 * 4 + 8 * 16 + 8 * 16) * 2 * 8);
  // With the fused kernels qkv [8, 12] is bf16 as well, the heads stay float32; the logits' gradient as above.
  gpuGpt.attention = bf16Gpt.attention = nn::AttentionKernel::kFused;
  CHECK(estimateMemory(gpuGpt).activations - estimateMemory(bf16Gpt).activations ==
        (3 * 8 * 4 + 8 * 16 + 8 * 12 + 2 * 8 * 16) * 2 * 8);

  const MachineMemory small{.available = 1 << 20, .total = 2 << 20};
  CHECK_NOTHROW(checkJobFitsMemory(job, 4, small));
  CHECK_NOTHROW(checkJobFitsMemory(job, 4, std::nullopt));  // unknown machine: no check
  // 2^20 features x 2^24 samples per batch: far beyond any machine, whatever the worker count.
  auto huge = loadJob({path, {"model.input=[1048576]", "data.batch_size=16777216", "data.train.features=1048576",
                              "data.train.samples=16777216"}});
  CHECK(estimateMemory(huge).activations > (int64_t{1} << 46));
  std::string msg;
  try {
    checkJobFitsMemory(huge, 2, MachineMemory{.available = int64_t{12} << 30, .total = int64_t{16} << 30});
  } catch (const ConfigError& err) {
    CHECK(err.exitCode() == 2);
    msg = err.what();
  }
  CHECK(msg.find(path + ": this job needs about ") == 0);
  CHECK(msg.find("per worker x 2 local worker(s) = ") != std::string::npos);
  CHECK(msg.find("but this machine has 12.0 GiB available (16.0 GiB total)") != std::string::npos);
  // A batch holds at most what a rank gets of the data (PyTorch's DataLoader): batch_size 2^24 over the 64
  // synthetic samples counts 64 samples' activations, and so does a probed set's size.
  auto absurd = loadJob({path, {"data.batch_size=16777216"}});
  const auto at64 = loadJob({path, {"data.batch_size=64"}});
  CHECK(largestBatchOf(absurd) == 64);
  CHECK(estimateMemory(absurd).activations == estimateMemory(at64).activations);
  CHECK(estimateMemory(absurd, 2, 10).activations * 64 == estimateMemory(at64).activations * 10);
  CHECK_NOTHROW(checkJobFitsMemory(absurd, 2, MachineMemory{.available = int64_t{1} << 30, .total = int64_t{2} << 30}));
  // The local worker count multiplies: fits once, not eight times.
  const MachineMemory tight{.available = e.total() * 4, .total = e.total() * 8};
  CHECK_NOTHROW(checkJobFitsMemory(job, 4, tight));
  CHECK_THROWS_AS(checkJobFitsMemory(job, 8, tight), ConfigError);
}

TEST_CASE("a cgroup memory limit below the available memory bounds all local workers together, named in the error") {
  auto dir = testing::tempDir("job_cgroup");
  auto path = writeJob(dir, kJob);
  auto job = loadJob({path});
  const int64_t one = estimateMemory(job, 4).total();
  // 4 workers fit the machine, and 4 x the estimate is over the cgroup's limit of 3 workers' worth.
  MachineMemory m{.available = one * 100, .total = one * 200, .cgroupLimit = one * 3,
                  .cgroupLimitFile = "/sys/fs/cgroup/job/memory.max"};
  CHECK_NOTHROW(checkJobFitsMemory(job, 3, m));
  std::string msg;
  try {
    checkJobFitsMemory(job, 4, m);
  } catch (const ConfigError& err) {
    CHECK(err.exitCode() == 2);
    msg = err.what();
  }
  CHECK_MESSAGE(msg.find(path + ": this job needs about ") == 0, msg);
  CHECK(msg.find(" per worker x 4 local worker(s) = " + humanBytes(one * 4) +
                 ", but this process's cgroup may use at most " + humanBytes(one * 3) +
                 " (cgroup /sys/fs/cgroup/job memory.max = " + humanBytes(one * 3) + ")") != std::string::npos);
  CHECK(describeCgroupLimit(m) == "cgroup /sys/fs/cgroup/job memory.max = " + humanBytes(one * 3));
  // A cgroup limit above the available memory: the machine's memory is the bound and is what the error names.
  m.cgroupLimit = one * 1000;
  m.available = one * 3;
  msg.clear();
  try {
    checkJobFitsMemory(job, 4, m);
  } catch (const ConfigError& err) {
    msg = err.what();
  }
  CHECK_MESSAGE(msg.find("available (") != std::string::npos, msg);
  CHECK(msg.find("this process's cgroup") == std::string::npos);
}

TEST_CASE("dtrain run's memory check counts the parameter servers' rows of the sparse tables on the node") {
  // A 500M x 16 table on one server (89.4 GiB with SparseAdam's moments) passed the check as "2.9 MiB per worker"
  // and was left to fail in the server after the rendezvous.
  auto dir = testing::tempDir("ps_memory");
  const std::string job = R"({
  "model": {"input": [2], "layers": [
    {"type": "embedding", "vocab_size": 500000000, "n_embd": 16, "position": false, "sparse": true},
    {"type": "flatten"}, {"type": "linear", "out": 1}]},
  "loss": {"type": "bce_with_logits"},
  "data": {"train": {"format": "synthetic", "task": "recsys", "users": 600, "items": 400, "samples": 100}, "batch_size": 8},
  "optimizer": {"type": "adam", "lr": 0.01},
  "parallel": {"strategy": "parameter_server", "servers": 2, "mode": "async"}
})";
  const auto path = writeJob(dir, job, "ps.json");
  const Job ps = loadJob({path});
  const int64_t perServer = (int64_t{500000000} / 2) * 16 * 4 * 3;  // rows, dim, float32, the table + 2 moments
  CHECK(psServerBytes(ps, 2) == perServer);
  CHECK(psServerBytes(ps, 1) == 2 * perServer);
  CHECK(psServerBytes(loadJob({path, {"optimizer.type=sgd"}}), 2) == perServer / 3);
  const MachineMemory machine{.available = int64_t{20} << 30, .total = int64_t{24} << 30};
  // dtrain check (no launch): a worker's estimate only, as before.
  CHECK_NOTHROW(checkJobFitsMemory(ps, 1, machine));
  CHECK_NOTHROW(checkJobFitsMemory(ps, 3, machine));
  // A one-process dtrain train holds the whole table (89.4 GiB): refused, naming the tables' share.
  std::string one;
  try {
    checkOneProcessFitsMemory(ps, machine);
  } catch (const ConfigError& err) {
    CHECK(err.exitCode() == 2);
    one = err.what();
  }
  CHECK_MESSAGE(one.find("this one-process run holds the sparse tables itself") != std::string::npos, one);
  CHECK_MESSAGE(one.find(", sparse tables 89.4 GiB)") != std::string::npos, one);
  CHECK_NOTHROW(checkOneProcessFitsMemory(ps, MachineMemory{.available = int64_t{100} << 30, .total = int64_t{128} << 30}));
  // The same machine in a 64 GiB cgroup: refused, naming the cgroup's file.
  one.clear();
  try {
    checkOneProcessFitsMemory(ps, MachineMemory{.available = int64_t{100} << 30, .total = int64_t{128} << 30,
                                                .cgroupLimit = int64_t{64} << 30,
                                                .cgroupLimitFile = "/sys/fs/cgroup/job/memory.max"});
  } catch (const ConfigError& err) {
    CHECK(err.exitCode() == 2);
    one = err.what();
  }
  CHECK_MESSAGE(one.find("but this process's cgroup may use at most 64.0 GiB (cgroup /sys/fs/cgroup/job memory.max = "
                         "64.0 GiB)") != std::string::npos,
                one);
  // dtrain run -n 3 on 1 node: both servers are local (2 x 44.7 GiB); on 2 nodes one per node, still too much.
  std::string msg;
  try {
    checkJobFitsMemory(ps, 3, machine, std::nullopt, 1);
  } catch (const ConfigError& err) {
    CHECK(err.exitCode() == 2);
    msg = err.what();
  }
  CHECK_MESSAGE(msg.find("per worker x 1 local worker(s) + 44.7 GiB per parameter server x 2 (its rows of the sparse "
                         "tables with the optimizer's state; more servers or nodes share them) = ") != std::string::npos,
                msg);
  CHECK_THROWS_AS(checkJobFitsMemory(ps, 2, machine, std::nullopt, 2), ConfigError);
  // 8 servers over 8 nodes: one per node, 11.2 GiB: fits; over 4 nodes two per node do not.
  const Job eight = loadJob({path, {"parallel.servers=8"}});
  CHECK_NOTHROW(checkJobFitsMemory(eight, 3, machine, std::nullopt, 8));
  CHECK_THROWS_AS(checkJobFitsMemory(eight, 3, machine, std::nullopt, 4), ConfigError);
}

TEST_CASE("dtrain check counts the sparse tables: per parameter server its rows, and all of them in one process") {
  auto dir = testing::tempDir("ps_check_memory");
  const std::string job = R"({
  "model": {"input": [2], "layers": [
    {"type": "embedding", "vocab_size": 1000, "n_embd": 16, "position": false, "sparse": true},
    {"type": "flatten"}, {"type": "linear", "out": 1}]},
  "loss": {"type": "bce_with_logits"},
  "data": {"train": {"format": "synthetic", "task": "recsys", "users": 600, "items": 400, "samples": 100}, "batch_size": 8},
  "optimizer": {"type": "adam", "lr": 0.01},
  "parallel": {"strategy": "parameter_server", "servers": 3, "mode": "async"},
  "checkpoint": {"dir": "ckpt"}
})";
  const Job ps = loadJob({writeJob(dir, job, "ps.json")});
  const std::string summary = checkJob(ps);
  // 1000 rows over 3 servers: 334, 333, 333 rows of 16 float32 values, each with SparseAdam's two moments.
  const int64_t rowBytes = 16 * 4 * 3;
  CHECK(psServerBytes(ps, 1) == 1000 * rowBytes);
  CHECK_MESSAGE(summary.find("sparse table 0.wte.weight: 1000 x 16 float32 (62.5 KiB), with sparse_adam's state "
                             "(exp_avg, exp_avg_sq): 3 floats per element: " + humanBytes(1000 * rowBytes) + " in all") !=
                    std::string::npos,
                summary);
  CHECK_MESSAGE(summary.find("parameter server 0 of 3: " + humanBytes(334 * rowBytes) +
                             " (rows [0, 334) of 0.wte.weight with the optimizer's state)") != std::string::npos,
                summary);
  CHECK(summary.find("parameter server 2 of 3: " + humanBytes(333 * rowBytes) +
                     " (rows [667, 1000) of 0.wte.weight with the optimizer's state)") != std::string::npos);
  MemoryEstimate worker = estimateMemory(ps, 2, 100);
  CHECK(worker.sparse == 0);  // a worker's tables are on the servers
  worker.data = checkJobData(ps).bytes;
  CHECK_MESSAGE(summary.find("one process (dtrain train alone, a world of 1): all of it, about " +
                             humanBytes(1000 * rowBytes + worker.total())) != std::string::npos,
                summary);
  // Without sparse tables nothing is added.
  CHECK(describeSparseMemory(loadJob({writeJob(dir, kJob)}), 0).empty());
}

TEST_CASE("machine memory is read from /proc/meminfo") {
  auto dir = testing::tempDir("meminfo");
  testing::writeFile(dir + "/meminfo", "MemTotal:       16384 kB\nMemFree:  100 kB\nMemAvailable:    8192 kB\n");
  auto m = readMachineMemory(dir + "/meminfo");
  REQUIRE(m);
  CHECK(m->total == 16384 * 1024);
  CHECK(m->available == 8192 * 1024);
  CHECK_FALSE(readMachineMemory(dir + "/missing"));
  CHECK(readMachineMemory()->total > 0);
  // With the cgroup files of lib/common/cgroup.h: the limit and the file it came from.
  std::filesystem::create_directories(dir + "/cg/job");
  testing::writeFile(dir + "/cgroup", "0::/job\n");
  testing::writeFile(dir + "/mountinfo", "35 24 0:30 / " + dir + "/cg rw - cgroup2 cgroup2 rw\n");
  testing::writeFile(dir + "/cg/job/memory.max", "4294967296\n");
  m = readMachineMemory(dir + "/meminfo", dir + "/cgroup", dir + "/mountinfo");
  REQUIRE(m);
  CHECK(m->cgroupLimit == int64_t{4} << 30);
  CHECK(m->cgroupLimitFile == dir + "/cg/job/memory.max");
  CHECK(describeCgroupLimit(*m) == "cgroup " + dir + "/cg/job memory.max = 4.0 GiB");
  testing::writeFile(dir + "/cg/job/memory.max", "max\n");
  CHECK(readMachineMemory(dir + "/meminfo", dir + "/cgroup", dir + "/mountinfo")->cgroupLimit == 0);
}

namespace {

// An IDX file (big-endian header), gzipped: the data cache's kind of source.
void writeIdxGz(const std::string& path, const std::vector<uint32_t>& dims, const std::string& data) {
  std::string bytes = {0, 0, 0x08, static_cast<char>(dims.size())};
  for (uint32_t d : dims)
    for (int shift : {24, 16, 8, 0}) bytes.push_back(static_cast<char>((d >> shift) & 0xff));
  bytes += data;
  gzFile gz = ::gzopen(path.c_str(), "wb1");
  REQUIRE(gz != nullptr);
  REQUIRE(::gzwrite(gz, bytes.data(), static_cast<unsigned>(bytes.size())) == static_cast<int>(bytes.size()));
  REQUIRE(::gzclose(gz) == Z_OK);
}

}  // namespace

TEST_CASE("a dataset mapped from the data cache is counted once per node, not once per worker") {
  const std::string dir = testing::tempDir("job_memory_shared");
  REQUIRE(::setenv("DTRAIN_DATA_CACHE", (dir + "/cache").c_str(), 1) == 0);
  // 5120 images of 32 x 32 uint8: 5 MiB, over the 4 MiB from which .gz datasets are cached (and then mapped).
  const int64_t samples = 5120, pixels = samples * 1024;
  writeIdxGz(dir + "/images.gz", {5120, 32, 32}, std::string(static_cast<size_t>(pixels), '\x07'));
  writeIdxGz(dir + "/labels.gz", {5120}, std::string(5120, '\x01'));
  testing::writeFile(dir + "/job.json", R"({
    "model": {"input": [1024], "layers": [{"type": "linear", "out": 10}]},
    "loss": {"type": "cross_entropy"},
    "data": {"train": {"format": "idx", "images": "images.gz", "labels": "labels.gz"}, "batch_size": 8},
    "optimizer": {"type": "sgd", "lr": 0.1}, "train": {"epochs": 1}})");
  const Job job = loadJob({dir + "/job.json"});
  const DataCheck data = checkJobData(job);
  CHECK(data.sharedBytes == pixels);
  CHECK(data.bytes == samples * 4);  // the labels, int32 in each worker

  // 8 workers on a machine with room for one copy of the images and not for 8: it fits (it was refused as
  // 8 x (estimate + 5 MiB)).
  MemoryEstimate e = estimateMemory(job, 8, data.samples);
  e.data = data.bytes;
  const int64_t workers = 8 * e.total();
  const MachineMemory roomy{.available = workers + pixels, .total = int64_t{1} << 40};
  CHECK_NOTHROW(checkJobFitsMemory(job, 8, roomy, data.bytes, 0, data.samples, data.sharedBytes));
  const MachineMemory tight{.available = workers + pixels - 1, .total = int64_t{1} << 40};
  try {
    checkJobFitsMemory(job, 8, tight, data.bytes, 0, data.samples, data.sharedBytes);
    FAIL("expected ConfigError");
  } catch (const ConfigError& err) {
    const std::string m = err.what();
    CHECK_MESSAGE(m.find("data 20.0 KiB + 5.0 MiB mapped, shared by the node's workers) per worker x 8 local "
                         "worker(s) + 5.0 MiB of mapped data, once = ") != std::string::npos,
                  m);
  }
  // `ulimit -v` bounds each process, and each maps the images: counted in every one.
  MachineMemory limited = roomy;
  limited.addressSpaceLimit = e.total() + pixels - 1;
  CHECK_THROWS_AS(checkJobFitsMemory(job, 8, limited, data.bytes, 0, data.samples, data.sharedBytes), ConfigError);

  // With the cache off every worker inflates its own copy: counted per worker.
  REQUIRE(::setenv("DTRAIN_DATA_CACHE", "0", 1) == 0);
  const DataCheck own = checkJobData(job);
  CHECK(own.sharedBytes == 0);
  CHECK(own.bytes == pixels + samples * 4);
  CHECK_THROWS_AS(checkJobFitsMemory(job, 8, roomy, own.bytes, 0, own.samples, own.sharedBytes), ConfigError);
  ::unsetenv("DTRAIN_DATA_CACHE");
}
