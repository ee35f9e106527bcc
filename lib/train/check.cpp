#include "lib/train/check.h"

#include <fmt/format.h>
#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>
#include <vector>

#include "lib/ckpt/report.h"
#include "lib/common/cgroup.h"
#include "lib/common/dir_check.h"
#include "lib/common/error.h"
#include "lib/data/sequence.h"
#include "lib/nn/loss.h"
#include "lib/nn/model.h"
#include "lib/nn/registry.h"
#include "lib/train/checkpointing.h"
#include "lib/train/compression.h"
#include "lib/train/layout.h"
#include "lib/train/ps_sparse.h"
#include "lib/train/sparse_tables.h"

namespace dtrain::train {

std::string humanBytes(int64_t bytes) {
  constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double v = static_cast<double>(bytes);
  size_t u = 0;
  while (v >= 1024.0 && u + 1 < std::size(kUnits)) v /= 1024.0, ++u;
  return u == 0 ? fmt::format("{} B", bytes) : fmt::format("{:.1f} {}", v, kUnits[u]);
}

namespace {

// The model's first layer when it is an embedding fed by the data's features (its input ids), else null.
const nn::LayerSpec* firstEmbedding(const nn::ModelSpec& model) {
  if (model.layers.empty() || model.layers.front().kind == nullptr) return nullptr;
  return model.layers.front().kind->name == "embedding" ? &model.layers.front() : nullptr;
}

}  // namespace

void checkEmbeddingIds(const Job& job, const data::Dataset& ds, const std::string& which) {
  const nn::LayerSpec* emb = firstEmbedding(job.model);
  if (emb == nullptr || dynamic_cast<const data::SequenceDataset*>(&ds) != nullptr) return;
  const int64_t n = ds.size(), features = ds.featureSize();
  if (n == 0 || features == 0) return;
  constexpr int64_t kChunk = 4096;
  std::vector<int64_t> idx;
  std::vector<float> x;
  // Labels are int32 class ids or float targets: 4 bytes each.
  std::vector<float> labels;
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    const int64_t count = std::min(kChunk, n - begin);
    idx.resize(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) idx[static_cast<size_t>(i)] = begin + i;
    x.resize(static_cast<size_t>(count * features));
    labels.resize(static_cast<size_t>(count * std::max<int64_t>(1, ds.labelShape().numel())));
    ds.fetch(idx, x.data(), labels.data());
    for (int64_t i = 0; i < count * features; ++i) {
      const float v = x[static_cast<size_t>(i)];
      if (std::isfinite(v) && v == std::nearbyint(v) && v >= 0 && v < static_cast<float>(emb->vocab)) continue;
      DTRAIN_THROW(ConfigError,
                   "{}: {}: sample {} (of {}), feature {}: {} is not a token id of {} (an embedding: expected an "
                   "integer in [0, {}), its vocab_size)",
                   job.sourceFile, which, begin + i / features, ds.describe(), i % features, v, emb->path,
                   emb->vocab);
    }
  }
}

void checkSameVocabulary(const Job& job, const data::Dataset& train, const data::Dataset& eval) {
  const auto* t = dynamic_cast<const data::SequenceDataset*>(&train);
  const auto* e = dynamic_cast<const data::SequenceDataset*>(&eval);
  if (t == nullptr || e == nullptr) return;
  const auto& tc = t->stream().chars;
  const auto& ec = e->stream().chars;
  if (tc == ec) return;
  // A character of one table missing from the other, for the message (both are sorted by code point).
  std::string example;
  for (uint32_t c : ec)
    if (example.empty() && !std::binary_search(tc.begin(), tc.end(), c))
      example = fmt::format("'{}' (U+{:04X}) is only in the eval set", data::utf8(c), c);
  for (uint32_t c : tc)
    if (example.empty() && !std::binary_search(ec.begin(), ec.end(), c))
      example = fmt::format("'{}' (U+{:04X}) is only in the training set", data::utf8(c), c);
  if (example.empty()) example = "the same characters numbered differently";
  DTRAIN_THROW(ConfigError,
               "{}: /data/eval: its vocabulary ({}) is not the training set's ({}): {}, so a token id would mean "
               "another character in each (expected the same \"vocab\": use the training files with \"split\": "
               "\"val\", or \"vocab\": \"byte\")",
               job.sourceFile, e->describe(), t->describe(), example);
}

void checkDataFitsModel(const Job& job, const data::Dataset& ds, const nn::Loss& loss, const std::string& which) {
  int64_t features = ds.featureSize();
  int64_t input = job.model.input.numel();
  DTRAIN_CHECK_AS(ConfigError, features == input,
                  "{}: {}: samples have shape {} ({} values) but the model's input {} takes {} values", job.sourceFile,
                  which, ds.featureShape().spaced(), features, job.model.input.str(), input);
  try {
    loss.checkTargets(ds.labelShape(), data::labelDType(ds.labelKind()));
  } catch (const ConfigError& e) {
    DTRAIN_THROW(ConfigError, "{}: {}: {}", job.sourceFile, which, e.what());
  }
  if (const auto* seq = dynamic_cast<const data::SequenceDataset*>(&ds)) {
    // Token ids index the embedding: each must be below the model's vocabulary (its output's last dimension).
    const int64_t vocab = job.model.output().back();
    const auto [maxId, at] = seq->maxToken();
    DTRAIN_CHECK_AS(ConfigError, maxId < vocab,
                    "{}: {}: token id {} (at token {} of {}) is >= the model's vocab_size {}; set /model/vocab_size to "
                    "at least {}",
                    job.sourceFile, which, maxId, at, seq->describe(), vocab, seq->stream().vocabSize);
    return;
  }
  if (const nn::LayerSpec* emb = firstEmbedding(job.model)) {
    // A synthetic recommender's ids reach users + items - 1: known from the spec, so the agent and `dtrain check`
    // refuse it before any rank starts (other data is scanned by the workers once read: checkEmbeddingIds).
    const data::DataSpec* spec = which == "/data/eval" && job.data.eval ? &*job.data.eval : &job.data.train;
    const auto& syn = spec->synthetic;
    if (spec->format == data::Format::kSynthetic && syn.task == data::SyntheticOptions::Task::kRecsys)
      DTRAIN_CHECK_AS(ConfigError, syn.users + syn.items <= emb->vocab,
                      "{}: {}: the recsys ids reach {} (users {} + items {} - 1), but {}/vocab_size is {} (expected "
                      "vocab_size >= users + items = {})",
                      job.sourceFile, which, syn.users + syn.items - 1, syn.users, syn.items, emb->path, emb->vocab,
                      syn.users + syn.items);
  }
  if (auto classes = ds.numClasses(); classes && loss.type() == nn::LossType::kCrossEntropy) {
    int64_t logits = job.model.output().numel();
    DTRAIN_CHECK_AS(ConfigError, *classes <= logits,
                    "{}: {}: the data has {} classes but the model outputs {} logits (last layer's out)", job.sourceFile,
                    which, *classes, logits);
  }
}

namespace {

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

int64_t satMul(int64_t a, int64_t b) {
  int64_t r = 0;
  return __builtin_mul_overflow(a, b, &r) ? kInt64Max : r;
}

int64_t satAdd(int64_t a, int64_t b) {
  int64_t r = 0;
  return __builtin_add_overflow(a, b, &r) ? kInt64Max : r;
}

int64_t satNumel(const Shape& s) { return s.checkedNumel().value_or(kInt64Max); }

int64_t syntheticBytes(const data::DataSpec& d) {
  if (d.format != data::Format::kSynthetic) return 0;
  int64_t perSample = satAdd(d.synthetic.features, d.synthetic.outputs);
  int64_t samples = d.limit ? std::min(*d.limit, d.synthetic.samples) : d.synthetic.samples;
  return satMul(satMul(samples, perSample), 4);
}

// With "device": "cuda" and DTRAIN_COMPRESSION_HOST_STAGING=1, top-k and PowerSGD are staged through host memory.
bool hostStaged(const CompressionSettings& c) { return stagedThroughHost(c.type); }

// "compression: powersgd rank 2: 35.2 KiB per step per rank instead of 1.3 MiB at 2 ranks (expected ratio 37.9x)"
std::string compressionLine(const Job& job) {
  const CompressionSettings& c = *job.parallel.compression;
  std::string what = compressionTypeName(c.type);
  if (c.type == CompressionSettings::Type::kPowerSgd) what += fmt::format(" rank {}", c.rank);
  if (c.type == CompressionSettings::Type::kTopK) what += fmt::format(" ratio {}", c.ratio);
  const auto params = paramsOfSpec(job.model);
  std::string line = fmt::format("compression: {}", what);
  for (int world : {2, 4}) {
    const CompressionEstimate e = estimateCompression(c, params, world);
    line += fmt::format("{} {} per step per rank instead of {} at {} ranks (expected ratio {:.1f}x)",
                        world == 2 ? ":" : ";", humanBytes(static_cast<int64_t>(e.bytesSent)),
                        humanBytes(static_cast<int64_t>(e.bytesUncompressed)), world, e.ratio());
  }
  if (c.startStep > 0) line += fmt::format(", from step {}", c.startStep);
  if (job.device.isCuda() && hostStaged(c)) {
    // CompressionHook's host staging: each compressed step copies the gradient arena down and back.
    int64_t floats = 0;
    for (const auto& p : params) floats = satAdd(floats, static_cast<int64_t>(p.count));
    line += fmt::format("; on the GPU staged through host memory: {} down and {} up over PCIe per step",
                        humanBytes(satMul(floats, 4)), humanBytes(satMul(floats, 4)));
  } else if (job.device.isCuda() && (c.type == CompressionSettings::Type::kPowerSgd ||
                                     c.type == CompressionSettings::Type::kTopK)) {
    line += fmt::format("; on the GPU: kernels and NCCL on device buffers (no host copies; {}=1 stages them "
                        "through host memory instead)",
                        kHostStagingVariable);
  }
  return line + "; none with 1 rank\n";
}

}  // namespace

int64_t MemoryEstimate::total() const noexcept {
  return satAdd(satAdd(satAdd(parameters, optimizer), satAdd(activations, data)), satAdd(compression, sparse));
}

std::string MemoryEstimate::str() const {
  return fmt::format("{} (parameters {}, optimizer {}, activations {}, data {}{}{}{})", humanBytes(total()),
                     humanBytes(parameters), humanBytes(optimizer), humanBytes(activations), humanBytes(data),
                     sharedData > 0 ? fmt::format(" + {} mapped, shared by the node's workers", humanBytes(sharedData))
                                    : "",
                     compression > 0 ? fmt::format(", compression {}", humanBytes(compression)) : "",
                     sparse > 0 ? fmt::format(", sparse tables {}", humanBytes(sparse)) : "");
}

std::optional<int64_t> specSamples(const Job& job) {
  // Synthetic sets say their size in the spec; a file's is known once it is probed (checkJobData).
  const auto known = [](const data::DataSpec& d) -> std::optional<int64_t> {
    if (d.format != data::Format::kSynthetic) return std::nullopt;
    return d.limit ? std::min(*d.limit, d.synthetic.samples) : d.synthetic.samples;
  };
  const auto train = known(job.data.train);
  const auto eval = job.data.eval ? known(*job.data.eval) : std::optional<int64_t>(0);
  if (train && eval) return std::max(*train, *eval);
  return std::nullopt;
}

int64_t largestBatchOf(const Job& job, std::optional<int64_t> samples) {
  if (!samples) samples = specSamples(job);
  return samples ? std::clamp<int64_t>(*samples, 1, job.data.batchSize) : job.data.batchSize;
}

MemoryEstimate estimateMemory(const Job& job, int worldSize, std::optional<int64_t> samples) {
  MemoryEstimate e;
  int64_t params = 0;
  for (const auto& l : job.model.layers) params = satAdd(params, nn::checkedParamCountOf(l).value_or(kInt64Max));
  // Under model parallelism a worker holds its stage's part, 1/tensor of its split layers (layout.h).
  if (job.parallel.tensor > 1 || job.parallel.pipeline.stages > 1) params = largestRankParams(job);
  e.parameters = satMul(params, 3 * 4);
  int64_t slots = 0;
  if (job.optimizer.type == nn::OptimizerType::kSgd) slots = job.optimizer.momentum != 0 ? 1 : 0;
  else slots = job.optimizer.amsgrad ? 3 : 2;
  e.optimizer = satMul(params, slots * 4);
  // In 2-byte units: a float32 value is 2, a bf16-stored one 1 (bf16 activation storage on a GPU: the outputs only
  // bf16 GEMMs read, nn::storesBf16Between; their gradients stay float32).
  const bool bf16 = job.device.isCuda() && job.precision == Job::Precision::kBf16;
  const nn::MemoryTarget target{.cuda = job.device.isCuda(), .attention = job.attention, .bf16 = bf16};
  const std::vector<char> bf16Outputs =
      bf16 ? nn::bf16StoredOutputs(job.model.layers) : std::vector<char>(job.model.layers.size(), 0);
  // The model's output gradient is the loss's: bf16 when the last layer takes it so and the loss gives it
  // (nn::takesBf16OutputGrad, nn::givesBf16Gradient; a bf16 GPT's logits' gradient), and then written over the output
  // itself (kernels::crossEntropyGradBf16InPlace): no bytes of its own.
  const bool bf16OutputGrad = bf16 && !job.model.layers.empty() && nn::takesBf16OutputGrad(job.model.layers.back()) &&
                              nn::givesBf16Gradient(job.loss.type, job.device);
  int64_t halves = satMul(satNumel(job.model.input), 2);
  for (size_t i = 0; i < job.model.layers.size(); ++i) {
    const auto& l = job.model.layers[i];
    const bool last = i + 1 == job.model.layers.size();
    const int64_t gradHalves = last && bf16OutputGrad ? 0 : 2;
    const int64_t outputHalves = satMul(satNumel(l.output), (bf16Outputs[i] != 0 ? 1 : 2) + gradHalves);
    halves = satAdd(halves, satAdd(outputHalves, satMul(nn::keptFloatsOf(l, target), 2)));
  }
  e.activations = satMul(satMul(halves, largestBatchOf(job, samples)), 2);
  e.data = satAdd(syntheticBytes(job.data.train), job.data.eval ? syntheticBytes(*job.data.eval) : 0);
  if (job.parallel.compression && params < kInt64Max) {
    const uint64_t bytes = compressionBufferBytes(*job.parallel.compression, paramsOfSpec(job.model), worldSize);
    e.compression = bytes > static_cast<uint64_t>(kInt64Max) ? kInt64Max : static_cast<int64_t>(bytes);
    // On a GPU top-k and PowerSGD keep their state in host memory, plus a pinned host copy of the gradient arena.
    if (job.device.isCuda() && hostStaged(*job.parallel.compression)) e.compression = satAdd(e.compression, satMul(params, 4));
  }
  return e;
}

std::optional<MachineMemory> readMachineMemory(const std::string& meminfoPath, const std::string& procCgroupPath,
                                               const std::string& mountinfoPath) {
  std::ifstream in(meminfoPath);
  if (!in) return std::nullopt;
  MachineMemory m;
  bool haveAvailable = false, haveTotal = false;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string key;
    int64_t kib = 0;
    if (!(fields >> key >> kib)) continue;
    if (key == "MemAvailable:") m.available = satMul(kib, 1024), haveAvailable = true;
    if (key == "MemTotal:") m.total = satMul(kib, 1024), haveTotal = true;
  }
  if (!haveTotal) return std::nullopt;
  if (!haveAvailable) m.available = m.total;  // kernels before 3.14
  struct rlimit limit {};
  if (::getrlimit(RLIMIT_AS, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY)
    m.addressSpaceLimit = limit.rlim_cur > static_cast<rlim_t>(kInt64Max) ? 0 : static_cast<int64_t>(limit.rlim_cur);
  if (auto cg = readCgroupMemoryLimit(procCgroupPath, mountinfoPath)) {
    m.cgroupLimit = cg->bytes;
    m.cgroupLimitFile = cg->file;
  }
  return m;
}

std::string describeCgroupLimit(const MachineMemory& machine) {
  const std::string& f = machine.cgroupLimitFile;
  const size_t slash = f.rfind('/');
  return slash == std::string::npos
             ? fmt::format("cgroup {} = {}", f, humanBytes(machine.cgroupLimit))
             : fmt::format("cgroup {} {} = {}", f.substr(0, slash), f.substr(slash + 1),
                           humanBytes(machine.cgroupLimit));
}

int64_t psServerBytes(const Job& job, int servers) {
  if (!job.parallel.ps || servers < 1) return 0;
  int64_t bytes = 0;
  for (const auto& t : sparseTableOptions(job)) {
    const int64_t rows = (t.rows + servers - 1) / servers;
    const auto copies = static_cast<int64_t>(1 + sparseStateNames(t.optimizer.type).size());
    bytes = satAdd(bytes, satMul(satMul(satMul(rows, t.dim), 4), copies));
  }
  return bytes;
}

void checkJobFitsMemory(const Job& job, int localWorkers, const std::optional<MachineMemory>& machine,
                        std::optional<int64_t> dataBytes, int nodes, std::optional<int64_t> samples,
                        int64_t sharedDataBytes) {
  if (!machine) return;
  MemoryEstimate e = estimateMemory(job, std::max(localWorkers, 2), samples);
  if (dataBytes) e.data = *dataBytes;
  e.sharedData = sharedDataBytes;
  const int64_t ranks = std::max(localWorkers, 1);
  // A launch of a parameter-server job: the node's servers hold their rows of the sparse tables (a 500M x 16 table
  // on one server, 91 GiB with SparseAdam, used to pass here as "2.9 MiB per worker" and die in the server).
  int64_t servers = 0, serverBytes = 0;
  if (nodes > 0 && job.parallel.ps && ranks > 1) {
    const int s = job.parallel.ps->servers;
    servers = std::min<int64_t>(ranks - 1, (s + nodes - 1) / nodes);
    serverBytes = psServerBytes(job, s);
  }
  const int64_t workers = ranks - (serverBytes > 0 ? servers : 0);
  // A dataset mapped from the data cache is one copy in the page cache, whatever the number of workers.
  const int64_t shared = workers > 0 ? e.sharedData : 0;
  const int64_t need =
      satAdd(satAdd(satMul(e.total(), workers), shared), serverBytes > 0 ? satMul(serverBytes, servers) : 0);
  const std::string serverPart =
      fmt::format("{}{}", shared > 0 ? fmt::format(" + {} of mapped data, once", humanBytes(shared)) : "",
                  serverBytes > 0 ? fmt::format(" + {} per parameter server x {} (its rows of the sparse tables with "
                                                "the optimizer's state; more servers or nodes share them)",
                                                humanBytes(serverBytes), servers)
                                  : "");
  // `ulimit -v` (RLIMIT_AS) bounds each process, and the workers inherit it: one worker (or a server with its
  // rows) must fit in it, or it dies of std::bad_alloc in its first allocation past the limit.
  // (A mapping takes address space in each process.)
  const int64_t perProcessWorker = satAdd(e.total(), e.sharedData);
  const int64_t perProcess = std::max(workers > 0 ? perProcessWorker : 0, serverBytes);
  DTRAIN_CHECK_AS(ConfigError, machine->addressSpaceLimit <= 0 || perProcess <= machine->addressSpaceLimit,
                  "{}: this job needs about {} per {}, but a process here may use at most {} of memory (ulimit -v: "
                  "RLIMIT_AS, which the workers inherit); raise the limit, or reduce the model or the batch size",
                  job.sourceFile, perProcess == serverBytes && serverBytes > perProcessWorker ? humanBytes(serverBytes)
                                                                                             : e.str(),
                  perProcess == serverBytes && serverBytes > perProcessWorker ? "parameter server" : "worker",
                  humanBytes(machine->addressSpaceLimit));
  // A cgroup's limit bounds this process and all its workers together, whatever the machine has free: past it
  // the kernel's OOM killer ends one of them (a 4 GiB container on a 64 GiB machine passed here and was killed).
  DTRAIN_CHECK_AS(ConfigError,
                  machine->cgroupLimit <= 0 || machine->cgroupLimit >= machine->available ||
                      need <= machine->cgroupLimit,
                  "{}: this job needs about {} per worker x {} local worker(s){} = {}, but this process's cgroup may "
                  "use at most {} ({}), which its workers share, and the kernel ends them past it; reduce the model, "
                  "the batch size or --nproc-per-node, or run it with a larger memory limit",
                  job.sourceFile, e.str(), workers, serverPart, humanBytes(need), humanBytes(machine->cgroupLimit),
                  describeCgroupLimit(*machine));
  DTRAIN_CHECK_AS(ConfigError, need <= machine->available,
                  "{}: this job needs about {} per worker x {} local worker(s){} = {}, but this machine has {} "
                  "available ({} total); reduce the model, the batch size or --nproc-per-node",
                  job.sourceFile, e.str(), workers, serverPart, humanBytes(need), humanBytes(machine->available),
                  humanBytes(machine->total));
}

std::optional<std::string> emptyEpochWarning(const Job& job, int64_t samples) {
  if (!job.data.dropLast) return std::nullopt;
  // DistributedSampler(drop_last) gives each of W ranks floor(N / W) samples, DataLoader(drop_last) floor(share / B)
  // batches: from W > N / B ranks on, every rank's share is below one batch and every epoch would take no step.
  const int64_t batch = job.data.batchSize, fullWorlds = samples / batch;  // worlds 1..fullWorlds take a step
  const char* unit = job.parallel.ps ? "worker" : job.parallel.pipeline.stages * job.parallel.tensor > 1
                                                      ? "data replica"
                                                      : "rank";
  if (fullWorlds == 0)
    return fmt::format("data.drop_last: the {} training samples make no batch of {} even on 1 {}: every epoch would "
                       "take 0 steps, and dtrain train refuses the job (exit 2); lower data.batch_size or turn "
                       "drop_last off",
                       samples, batch, unit);
  if (fullWorlds < 4)
    return fmt::format("data.drop_last: from {} {}s on, each one's share of the {} training samples ({} or fewer) is "
                       "smaller than one batch of {}: every epoch would take 0 steps, and dtrain train refuses such a "
                       "world (exit 2)",
                       fullWorlds + 1, unit, samples, samples / (fullWorlds + 1), batch);
  return std::nullopt;
}

void checkOneProcessFitsMemory(const Job& job, const std::optional<MachineMemory>& machine) {
  if (!machine || !job.parallel.ps) return;
  const int64_t tables = psServerBytes(job, 1);
  if (tables == 0) return;
  MemoryEstimate e = estimateMemory(job, 1, specSamples(job));
  e.sparse = tables;
  DTRAIN_CHECK_AS(ConfigError,
                  machine->cgroupLimit <= 0 || machine->cgroupLimit >= machine->available ||
                      e.total() <= machine->cgroupLimit,
                  "{}: this one-process run holds the sparse tables itself (a parameter-server job in a world of 1 "
                  "rank): it needs about {}, but this process's cgroup may use at most {} ({}); launch it with dtrain "
                  "run and parameter servers (parallel.servers), which share the tables' rows, or shrink the tables",
                  job.sourceFile, e.str(), humanBytes(machine->cgroupLimit), describeCgroupLimit(*machine));
  DTRAIN_CHECK_AS(ConfigError, e.total() <= machine->available,
                  "{}: this one-process run holds the sparse tables itself (a parameter-server job in a world of 1 "
                  "rank): it needs about {}, but this machine has {} available ({} total); launch it with dtrain run "
                  "and parameter servers (parallel.servers), which share the tables' rows, or shrink the tables",
                  job.sourceFile, e.str(), humanBytes(machine->available), humanBytes(machine->total));
}

std::string describeSparseMemory(const Job& job, int64_t workerBytes) {
  const auto tables = sparseTableOptions(job);
  if (tables.empty()) return "";
  const int servers = job.parallel.ps ? std::max(job.parallel.ps->servers, 1) : 1;
  std::string out;
  std::vector<int64_t> held(static_cast<size_t>(servers), 0);
  std::vector<std::string> ranges(static_cast<size_t>(servers));
  for (const auto& t : tables) {
    const auto state = sparseStateNames(t.optimizer.type);
    const int64_t copies = 1 + static_cast<int64_t>(state.size()), rowBytes = satMul(satMul(t.dim, 4), copies);
    out += fmt::format("sparse table {}: {} x {} float32 ({}), with {}'s state {} per element: {} in all\n", t.name,
                       t.rows, t.dim, humanBytes(satMul(satMul(t.rows, t.dim), 4)),
                       ps::sparseOptimizerName(t.optimizer.type),
                       state.empty() ? std::string("(none): 1 float") : fmt::format("({}): {} floats", fmt::join(state, ", "), copies),
                       humanBytes(satMul(t.rows, rowBytes)));
    for (const ps::RowRange& r : ps::planRowRanges(t.rows, servers)) {
      auto& i = held[static_cast<size_t>(r.server)];
      i = satAdd(i, satMul(r.rows(), rowBytes));
      auto& text = ranges[static_cast<size_t>(r.server)];
      text += fmt::format("{}rows [{}, {}) of {}", text.empty() ? "" : ", ", r.begin, r.end, t.name);
    }
  }
  for (int k = 0; k < servers; ++k)
    out += fmt::format("  parameter server {} of {}: {} ({} with the optimizer's state)\n", k, servers,
                       humanBytes(held[static_cast<size_t>(k)]), ranges[static_cast<size_t>(k)]);
  out += fmt::format("  one process (dtrain train alone, a world of 1): all of it, about {} with the worker's {}\n",
                     humanBytes(satAdd(psServerBytes(job, 1), workerBytes)), humanBytes(workerBytes));
  return out;
}

namespace {

// Adds what `ds` takes once read to `c`: in each worker (bytes), or mapped from the data cache (sharedBytes).
void addDatasetBytes(DataCheck& c, const data::Dataset& ds, const data::DataSpec& spec) {
  // Token sequences keep their uint16 stream (text and tokens formats read it whole, also for the check).
  if (const auto* seq = dynamic_cast<const data::SequenceDataset*>(&ds)) {
    c.bytes = satAdd(c.bytes, satMul(static_cast<int64_t>(seq->stream().tokens.size()), 2));
    return;
  }
  const auto* array = dynamic_cast<const data::ArrayDataset*>(&ds);
  if (!array) {
    c.bytes = satAdd(c.bytes, syntheticBytes(spec));
    return;
  }
  int64_t labels = satMul(ds.size(), satMul(ds.labelKind() == data::LabelKind::kClass ? 1 : ds.labelShape().numel(), 4));
  c.bytes = satAdd(c.bytes, labels);
  int64_t& features = array->rawShared() ? c.sharedBytes : c.bytes;
  features = satAdd(features, static_cast<int64_t>(array->rawBytes()));
}

}  // namespace

void checkScheduleFitsRun(const Job& job, int64_t totalSteps, const std::string& how) {
  const auto& s = job.schedule;
  if (s.type != nn::ScheduleType::kCosine || s.tMax > 0) return;
  DTRAIN_CHECK_AS(ConfigError, totalSteps > s.warmupSteps,
                  "{}: {}/warmup_steps: {} warm-up step(s), but the run has only {} step(s) ({}); a cosine schedule "
                  "without T_max decays over the steps after the warm-up (expected warmup_steps below the run's "
                  "steps: lower it, give T_max, or train longer)",
                  job.sourceFile, job.doc.contains("lr_schedule") ? "/lr_schedule" : "/schedule", s.warmupSteps,
                  totalSteps, how);
}

DataCheck checkJobData(const Job& job) {
  DataCheck c;
  // Only its targets' rules are checked: a loss for one sample, not for an absurd batch_size (the memory check
  // follows the probe, with the sets' sizes).
  auto loss = nn::Loss::create(job.loss, job.model.output(), 1, Device::cpu());
  c.train = data::loadDataset(job.data.train, data::ReadMode::kHeader);
  c.samples = c.train->size();
  checkDataFitsModel(job, *c.train, *loss, "/data/train");
  {
    // One rank runs the most steps (a larger world shares the epoch): a warm-up too long there is too long anywhere.
    const int64_t perEpoch = stepsForSamples(job, c.train->size());
    int64_t total = perEpoch * job.loop.epochs;
    std::string how = fmt::format("{} epoch(s) of {} step(s) on 1 rank", job.loop.epochs, perEpoch);
    if (job.loop.maxSteps > 0 && job.loop.maxSteps < total) {
      total = job.loop.maxSteps;
      how = fmt::format("/train/max_steps {}", job.loop.maxSteps);
    }
    checkScheduleFitsRun(job, total, how);
  }
  addDatasetBytes(c, *c.train, job.data.train);
  if (job.data.eval) {
    c.eval = data::loadDataset(*job.data.eval, data::ReadMode::kHeader);
    checkDataFitsModel(job, *c.eval, *loss, "/data/eval");
    checkSameVocabulary(job, *c.train, *c.eval);
    addDatasetBytes(c, *c.eval, *job.data.eval);
    c.samples = std::max(c.samples, c.eval->size());
  }
  return c;
}

namespace {

// `dir` is a writable directory, or does not exist and its nearest existing ancestor is one.
void checkWritableDir(const Job& job, const std::filesystem::path& dir, std::string_view what) {
  const auto problem = findDirProblem(dir);
  if (!problem) return;
  DTRAIN_CHECK_AS(ConfigError, !problem->notDirectory, "{}: {} {}: {} exists and is not a directory", job.sourceFile,
                  what, dir.string(), problem->at.string());
  DTRAIN_THROW(ConfigError, "{}: {} {}: {} is not writable ({})", job.sourceFile, what, dir.string(),
               problem->at.string(), problem->error);
}

}  // namespace

void checkOutputDirs(const Job& job) {
  checkWritableDir(job, job.outputDir, "output folder (--output-dir, /output_dir or runs/<name>)");
  if (job.checkpoint.enabled) checkWritableDir(job, job.checkpoint.dir, "checkpoint folder (/checkpoint/dir)");
}

std::string checkJob(const Job& job) {
  // Before anything is loaded or built: a job that cannot fit fails here, not in an allocation. The batch is
  // bounded by the data's size, known from a synthetic spec, else counted as 1 sample until the probe tells.
  checkJobFitsMemory(job, 1, readMachineMemory(), std::nullopt, 0, specSamples(job).value_or(1));
  checkOutputDirs(job);
  checkInitWeights(job);
  auto data = checkJobData(job);
  checkJobFitsMemory(job, 1, readMachineMemory(), data.bytes, 0, data.samples, data.sharedBytes);
  auto train = data.train;
  std::string evalLine = data.eval ? fmt::format("eval:  {}", data.eval->describe()) : "eval:  (none)";
  // The summary comes from the spec: building the model only to print it allocated and initialised every
  // parameter (a GPT with n_embd 8000 took 53 s, and under `ulimit -v 4000000` died of std::bad_alloc, exit 1).
  std::string out = fmt::format("{}: OK\n\n{}\n", job.sourceFile, nn::formatSummary(job.model));
  out += fmt::format("loss:  {}\noptimizer: {} lr {}\n", nn::lossTypeName(job.loss.type),
                     nn::optimizerTypeName(job.optimizer.type), job.optimizer.lr);
  out += fmt::format("train: {}\n{}\n", train->describe(), evalLine);
  auto stepsPerEpoch = [&](int64_t world) {
    // DistributedSampler's share: padded up to a multiple of the world, or cut down with drop_last.
    int64_t perRank = job.data.dropLast ? train->size() / world : (train->size() + world - 1) / world;
    return stepsForSamples(job, perRank);
  };
  // Under model parallelism a batch belongs to a data replica of stages x tensor ranks, which all read it.
  const int group = job.parallel.pipeline.stages * job.parallel.tensor;
  const std::string maxSteps = job.loop.maxSteps > 0 ? fmt::format(" (max_steps {})", job.loop.maxSteps) : "";
  if (group > 1)
    out += fmt::format("run:   {} epoch(s), batch {} per data replica (pipeline {} x tensor {} = {} ranks): {} steps "
                       "per epoch on 1 replica, {} on 2, {} on 4{}\n",
                       job.loop.epochs, job.data.batchSize, job.parallel.pipeline.stages, job.parallel.tensor, group,
                       stepsPerEpoch(1), stepsPerEpoch(2), stepsPerEpoch(4), maxSteps);
  else if (job.parallel.ps)
    // The servers' ranks take no batches: the data is shared out over the workers alone (a world of 2 ranks with 1
    // server is 1 worker; "on 2 ranks" read as half the steps it runs).
    out += fmt::format("run:   {} epoch(s), batch {} per worker: {} steps per epoch on 1 worker, {} on 2, {} on 4{} "
                       "(workers: the ranks besides the {} parameter server(s), which take no batches)\n",
                       job.loop.epochs, job.data.batchSize, stepsPerEpoch(1), stepsPerEpoch(2), stepsPerEpoch(4),
                       maxSteps, job.parallel.ps->servers);
  else
    out += fmt::format("run:   {} epoch(s), batch {} per rank: {} steps per epoch on 1 rank, {} on 2, {} on 4{}\n",
                       job.loop.epochs, job.data.batchSize, stepsPerEpoch(1), stepsPerEpoch(2), stepsPerEpoch(4),
                       maxSteps);
  if (job.parallel.compression) out += compressionLine(job);
  if (auto warning = emptyEpochWarning(job, train->size())) out += "warning: " + *warning + "\n";
  MemoryEstimate memory = estimateMemory(job, 2, data.samples);
  memory.data = data.bytes;
  memory.sharedData = data.sharedBytes;
  out += fmt::format("memory: about {} per worker{}\n", memory.str(),
                     psServerBytes(job, 1) > 0 ? " (its sparse tables are on the parameter servers: below)" : "");
  out += describeSparseMemory(job, memory.total());
  out += fmt::format("output: {}\n", job.outputDir.string());
  // A run would resume from this checkpoint: another model's is refused here (CheckpointError, exit 8).
  if (!job.checkpoint.enabled) out += "resume: off (checkpoints are off)\n";
  else if (!job.checkpoint.resume) {
    out += "resume: off (checkpoint.resume is false): starts at step 0\n";
    if (auto warning = resumeOffWarning(job)) out += "warning: " + *warning + "\n";
  } else {
    // Newer checkpoints passed over (partial, corrupt): the trainer warns of them when it resumes; so does check.
    std::vector<std::string> skipped;
    if (auto from = checkResumeCheckpoint(job, &skipped))
      out += fmt::format("resume: from {} (step {}, {}, saved by {} rank(s))\n", from->path.string(), from->step,
                         ckpt::positionText(from->epoch, from->samplesConsumed), from->savedWorldSize);
    else out += fmt::format("resume: no valid checkpoint in {}: starts at step 0\n", job.checkpoint.dir.string());
    for (const auto& s : skipped) out += fmt::format("warning: a run would skip checkpoint {}\n", s);
  }
  return out;
}

}  // namespace dtrain::train
