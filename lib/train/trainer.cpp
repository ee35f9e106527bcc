#include "lib/train/trainer.h"

#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
#include <fstream>
#include <cmath>
#include <limits>
#include <future>
#include <thread>

#include "lib/comm/registry.h"
#include "lib/common/clock.h"
#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/common/timeline.h"
#include "lib/data/batch_loader.h"
#include "lib/data/sequence.h"
#include "lib/nn/device.h"
#include "lib/nn/loss.h"
#include "lib/nn/model.h"
#include "lib/train/baselines.h"
#include "lib/train/check.h"
#include "lib/train/checkpointing.h"
#include "lib/train/compression.h"
#include "lib/train/fault.h"
#include "lib/train/generate.h"
#include "lib/train/metrics_reporter.h"
#include "lib/train/pipeline.h"
#include "lib/train/tensorboard.h"
#include "lib/train/progress.h"
#include "lib/train/ps_strategy.h"
#include "lib/common/ps_placement.h"
#include "lib/train/strategy.h"
#include "lib/train/tensor_parallel.h"
#include "lib/train/weights.h"
#include "rendezvous/prefix_store.h"
#include "rendezvous/tcp_store_client.h"

namespace dtrain::train {

namespace {

std::atomic<int> gStopSignal{0};
extern "C" void onStopSignal(int sig) { gStopSignal.store(sig); }

void installStopHandlers() {
  struct sigaction sa {};
  sa.sa_handler = onStopSignal;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGTERM, SIGINT, SIGUSR1}) ::sigaction(sig, &sa, nullptr);
}

double peakRssMb() {
  struct rusage ru {};
  ::getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) / 1024.0;  // ru_maxrss is in KiB on Linux
}

// Dropout masks are a function of (seed, rank, step, micro-batch), so a resumed run draws the masks the
// uninterrupted run drew.
uint64_t dropoutSeed(uint64_t seed, int rank, int64_t step, int micro) {
  uint64_t h = seed ^ 0x9E3779B97F4A7C15ull;
  for (uint64_t v : {static_cast<uint64_t>(rank), static_cast<uint64_t>(step), static_cast<uint64_t>(micro)}) {
    h ^= v + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
    h *= 0xBF58476D1CE4E5B9ull;
  }
  return h;
}

// Views of a batch's labels in the form the loss expects.
TensorView targetsOf(const data::Batch& b, const data::Dataset& ds) {
  if (b.classLabels) return TensorView::i32(b.classLabels, ds.labelShape().withBatch(b.size));
  return TensorView::f32(b.targets, ds.labelShape().withBatch(b.size));
}

// `dtrain run --timeline`: this rank's clock minus rank 0's, in ns, so that the merged trace lines up across
// nodes. Rank 0 sends its clock right after a barrier; the smallest (receive time - rank 0's send time) over a few
// tries keeps the least transfer delay, which stays in the estimate (a bias of one broadcast's latency, tens of
// microseconds on a LAN). Ranks on rank 0's node share its clock: 0, no estimate. Every rank of `world` calls it.
int64_t measureClockOffset(comm::Backend& world, int nodeRank) {
  auto unixNs = [] {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  };
  int64_t best = std::numeric_limits<int64_t>::max();
  int64_t rootNode = 0;
  for (int i = 0; i < 5; ++i) {
    world.barrier();
    int64_t sent[2] = {world.rank() == 0 ? unixNs() : 0, nodeRank};  // rank 0's clock and node
    world.broadcast(TensorView::flat(sent, 2, DType::kInt64), 0);
    best = std::min(best, unixNs() - sent[0]);
    rootNode = sent[1];
  }
  return nodeRank == rootNode ? 0 : best;
}

class TrainLoop {
 public:
  // psServers > 0: this rank is a worker of the parameter-server strategy and `worker` its workers-only view
  // (lib/common/ps_placement.h); the servers publish their addresses in the round's store.
  TrainLoop(const Job& job, const WorkerInfo& worker, std::vector<TrainerCallbackPtr> extra, int psServers = 0)
      : job_(job), worker_(worker), start_(Clock::now()), extraCallbacks_(std::move(extra)), psServers_(psServers) {}
  TrainResult run();

 private:
  void setUp();    // data, group, model, optimizer, resume, sampler, plan
  void planRun();  // steps, schedule, log interval for this world
  ProcessGroups connect();
  void shardEpoch(int64_t epoch, int64_t startSample);  // padding or uneven shards, then sampler_->setEpoch
  void trainEpoch(int64_t epoch, int64_t startSample);
  [[noreturn]] void diverged(int64_t epoch, std::string_view what);
  void afterStep(int64_t epoch, int64_t position, bool epochEnd);  // log, stop, checkpoint, callbacks
  void saveCheckpoint(int64_t epoch, int64_t position);
  void evaluate(const StepStats& stats);
  void logInterval(StepStats& stats, bool force);
  void finish();   // final weights, the result over the ranks, onFinish
  void writeVocabulary();  // vocab.json beside the model, for `dtrain generate` (token datasets, rank 0)
  void setUpSparseTables();  // binds the model's sparse tables to their holder, restores them on resume
  // The rank dropout masks are drawn for: the ranks of a tensor group share masks (their replicated layers must
  // agree), so it is the world rank with the tensor coordinate taken out.
  int dropoutRank() const { return worker_.rank - strategy_->groups().coords.tensor; }
  Device workerDevice() const;  // cpu, or cuda:LOCAL_RANK after checking there are enough GPUs
  // A batch as the model's device sees it: the loader's buffers on the CPU; on a GPU, copies into the device
  // staging buffers through pinned host memory, asynchronous for the host and ordered before the forward on the
  // layers' stream (nn::HostStaging; prefetching on a separate copy stream is future work: docs/gpu.md).
  struct Staged {
    const float* features;
    TensorView targets;
  };
  Staged stage(const data::Batch& b, const data::Dataset& ds);
  // Whether every value of an arena is finite, agreed over the ranks that hold other parts of the model. On a GPU
  // (DDP only, lib/train/job.cpp) every rank holds the whole, all-reduced arena: a device reduction suffices.
  bool agreeFinite(std::span<const float> values) {
    return device_.isCuda() ? nn::allFinite(values, device_) : strategy_->agreeFinite(values);
  }

  const Job& job_;
  const WorkerInfo& worker_;
  Clock::time_point start_;
  std::shared_ptr<const data::Dataset> train_, eval_;
  std::optional<nn::Model> model_;
  std::unique_ptr<nn::Loss> loss_;
  std::vector<TrainerCallbackPtr> extraCallbacks_;
  CallbackList callbacks_;              // progress, test aids, then the caller's; see callbacks.h
  std::shared_ptr<Progress> progress_;  // also in callbacks_; set-up lines go to it directly
  // interval accounting for progress lines
  double intervalLoss_ = 0;
  int64_t intervalBatches_ = 0;
  int64_t intervalSamples_ = 0;
  Clock::time_point intervalStart_;
  std::unique_ptr<nn::Optimizer> optimizer_;
  CommHookPtr commHook_;                // DDP's (null alone); its traffic goes to metrics.jsonl
  HookTraffic loggedTraffic_;           // commHook_'s counts at the last progress interval
  std::unique_ptr<Strategy> strategy_;
  // The model's sparse embedding tables: the strategy's (the parameter servers) or localSparse_ (one process).
  SparseTables* sparse_ = nullptr;
  std::unique_ptr<LocalSparseTables> localSparse_;
  PipelineStrategy* pipeline_ = nullptr;  // strategy_ when it is one: it runs forward/backward for the loop
  bool countsMetrics_ = true;             // this rank's losses and samples count (a pipeline's last stage,
                                          // tensor rank 0)
  bool tensorParallel_ = false;           // the model is split over a tensor group
  std::unique_ptr<Checkpointer> checkpointer_;  // uses strategy_
  std::unique_ptr<data::DistributedSampler> sampler_;
  int epochWorld_ = 0;  // the world whose padding the current epoch follows; 0: uneven (resized mid-epoch)
  nn::Schedule schedule_;
  std::optional<ResumePoint> resumed_;
  StepStats stats_;
  int64_t step_ = 0;  // optimizer steps done
  bool stop_ = false;
  int64_t logEvery_ = 1;
  int64_t stopCheckEvery_ = 1;
  bool hasDropout_ = false;
  bool stepLossFinite_ = true;  // every micro-batch loss of the current step on this rank was finite
  int64_t skippedSteps_ = 0;    // train.on_nonfinite = skip
  int64_t skippedInARow_ = 0;   // ... consecutive, bounded by train.max_skipped_steps
  TrainResult result_;
  bool prefetch_ = true;
  int psServers_ = 0;
  rendezvous::StorePtr roundStore_;  // this round's keys (parameter-server addresses); null alone
  Device device_;                       // where the model, loss and optimizer compute
  nn::DeviceFloats featuresDev_, labelsDev_;  // GPU staging (labelsDev_ holds int32 labels or float targets)
  nn::HostStaging featuresPinned_, labelsPinned_;  // their pinned host side
};

Device TrainLoop::workerDevice() const {
  if (!job_.device.isCuda()) return Device::cpu();
  // The agent checked its node before starting workers; a worker alone (or under another launcher) checks here.
  checkGpusForWorkers(job_, std::max(worker_.localWorldSize, worker_.localRank + 1), nn::visibleGpus());
  return Device::cuda(worker_.localRank);
}

TrainLoop::Staged TrainLoop::stage(const data::Batch& b, const data::Dataset& ds) {
  if (device_.isCpu()) return {b.features, targetsOf(b, ds)};
  const size_t features = static_cast<size_t>(b.size * ds.featureShape().numel());
  const size_t labels = static_cast<size_t>(b.size * ds.labelShape().numel());
  DTRAIN_CHECK(features <= featuresDev_.size() && labels <= labelsDev_.size(),
               "batch of {} samples does not fit the GPU staging buffers", b.size);
  featuresPinned_.toDevice(featuresDev_.data(), b.features, features * sizeof(float));
  const Shape shape = ds.labelShape().withBatch(b.size);
  if (b.classLabels != nullptr) {
    static_assert(sizeof(int32_t) == sizeof(float));
    auto* dst = reinterpret_cast<int32_t*>(labelsDev_.data());
    labelsPinned_.toDevice(dst, b.classLabels, labels * sizeof(int32_t));
    return {featuresDev_.data(), TensorView::of(dst, shape, device_)};
  }
  labelsPinned_.toDevice(labelsDev_.data(), b.targets, labels * sizeof(float));
  return {featuresDev_.data(), TensorView::of(labelsDev_.data(), shape, device_)};
}

// The process groups of this world: none alone (LocalStrategy needs no communicator).
ProcessGroups TrainLoop::connect() {
  const LayoutDims layout = resolveLayout(job_.parallel, worker_.worldSize, job_.sourceFile);
  ProcessGroups groups = makeProcessGroups(layout, worker_.rank, nullptr);
  if (worker_.worldSize == 1 && psServers_ == 0) return groups;
  auto store = rendezvous::connectStore(worker_.store, job_.parallel.timeout);
  roundStore_ = std::make_shared<rendezvous::PrefixStore>(
      fmt::format("{}r{}/", rendezvous::runPrefix(worker_.runId), worker_.round), store);
  if (worker_.worldSize == 1) return groups;
  // Each round of the launcher gets fresh keys, so a restarted group never meets a stale address.
  auto prefixed = std::make_shared<rendezvous::PrefixStore>(
      fmt::format("{}r{}/w/", rendezvous::runPrefix(worker_.runId), worker_.round), store);
  comm::BackendOptions opts = comm::optionsFromContract(worker_);
  opts.store = prefixed;
  opts.timeout = job_.parallel.timeout;
  if (device_.isCuda()) {
    // Gradients and parameters travel between GPUs (nccl) in the data group; the metrics, stop votes and barriers
    // are host values, so the world group stays a CPU backend (as PyTorch keeps a gloo group beside nccl). A GPU
    // job is data-parallel only (lib/train/job.cpp), so the data group spans the world.
    groups = makeProcessGroups(layout, worker_.rank, comm::createBackend("auto", opts));
    comm::BackendOptions gpu = opts;
    gpu.device = device_.str();
    gpu.groupName = "gpu";
    groups.data = comm::createBackend(job_.parallel.backend, gpu);
    if (timeline::enabled()) timeline::setClockOffset(measureClockOffset(*groups.world, worker_.nodeRank));
    return groups;
  }
  auto world = comm::createBackend(job_.parallel.backend, opts);
  if (timeline::enabled()) timeline::setClockOffset(measureClockOffset(*world, worker_.nodeRank));
  // One replica per rank without model parallelism (the data group is the world); else the grid's groups.
  return makeProcessGroups(layout, worker_.rank, std::move(world));
}

void TrainLoop::logInterval(StepStats& stats, bool force) {
  if (intervalBatches_ == 0 && !force) return;
  // Under pipeline parallelism only the last stage sees the loss: the other stages add nothing.
  double sums[3] = {countsMetrics_ ? intervalLoss_ : 0.0, countsMetrics_ ? static_cast<double>(intervalBatches_) : 0.0,
                    countsMetrics_ ? static_cast<double>(intervalSamples_) : 0.0};
  strategy_->reduceMetrics(sums, comm::ReduceOp::kSum);
  double secs = std::max(1e-9, secondsSince(intervalStart_));
  stats.loss = sums[1] > 0 ? sums[0] / sums[1] : 0;
  stats.samplesPerSec = sums[2] / secs;
  stats.elapsedSec = secondsSince(start_);
  if (job_.logging.tensorboard) stats.gradNorm = static_cast<float>(strategy_->gradNorm(*model_));
  strategy_->fillStats(stats);
  if (auto t = commHook_ ? commHook_->traffic() : std::nullopt; t && t->steps > loggedTraffic_.steps) {
    const double sent = static_cast<double>(t->bytesSent - loggedTraffic_.bytesSent);
    const double dense = static_cast<double>(t->bytesUncompressed - loggedTraffic_.bytesUncompressed);
    stats.commBytesPerStep = sent / static_cast<double>(t->steps - loggedTraffic_.steps);
    stats.compressionRatio = sent > 0 ? dense / sent : 1.0;
    loggedTraffic_ = *t;
  }
  callbacks_.log(stats);
  intervalLoss_ = 0;
  intervalBatches_ = intervalSamples_ = 0;
  intervalStart_ = Clock::now();
}

void TrainLoop::evaluate(const StepStats& stats) {
  if (!eval_) return;
  const auto evalStart = Clock::now();
  // Every sample exactly once: no padding, uneven shards; sums are reduced over the group.
  const ProcessGroups& g = strategy_->groups();
  data::DistributedSampler sampler(
      {.datasetSize = eval_->size(), .rank = g.dataRank, .worldSize = g.dataSize, .shuffle = false, .pad = false});
  data::BatchLoader loader(*eval_, sampler, {.batchSize = job_.data.batchSize, .prefetch = prefetch_});
  nn::EvalSums sums;
  for (const data::Batch& b : loader) {
    if (pipeline_ != nullptr) {
      sums += pipeline_->evalBatch(b.features, targetsOf(b, *eval_), static_cast<int>(b.size));
      continue;
    }
    const Staged in = stage(b, *eval_);
    TensorView out = model_->forward(in.features, static_cast<int>(b.size), false);
    sums += loss_->evaluate(out, in.targets);
  }
  std::vector<double> v = {sums.lossSum, static_cast<double>(sums.lossCount), static_cast<double>(sums.correct),
                           static_cast<double>(sums.samples)};
  // bce_with_logits: the AUC histograms add up over the ranks (every rank sends them, also without samples).
  if (loss_->hasAuc()) {
    sums.aucHist.resize(2 * nn::kAucBins, 0.0);
    v.insert(v.end(), sums.aucHist.begin(), sums.aucHist.end());
  }
  strategy_->reduceMetrics(v, comm::ReduceOp::kSum);
  double evalLoss = v[1] > 0 ? v[0] / v[1] : 0;
  std::optional<double> acc;
  if (loss_->hasAccuracy() && v[3] > 0) acc = v[2] / v[3];
  result_.evalLoss = evalLoss;
  result_.evalAccuracy = acc;
  if (timeline::enabled()) timeline::record("eval", "eval", evalStart, Clock::now());
  std::optional<double> auc;
  if (loss_->hasAuc()) auc = nn::aucFromHistogram(std::span<const double>(v).subspan(4));
  result_.evalAuc = auc;
  callbacks_.eval(stats, EvalResult{evalLoss, acc, static_cast<int64_t>(v[3]), auc, result_.baselineAuc});
}

void TrainLoop::setUp() {
  // A prefetch thread only pays when a core is free for it: with as many workers as cores on the node it
  // competes with the training threads (measured: 2 ranks on 2 cores run faster without it).
  const bool spareCores = std::thread::hardware_concurrency() > static_cast<unsigned>(worker_.localWorldSize);
  timeline::startFromEnv(worker_.rank, worker_.nodeRank);  // before connect(): the set-up's collectives show too
  prefetch_ = job_.data.prefetch.value_or(spareCores);
  device_ = workerDevice();
  nn::useDevice(device_);
  nn::setTf32(job_.tf32);
  nn::setBf16(job_.precision == Job::Precision::kBf16);
  // The eval set loads in the background while the group forms and the training set loads.
  std::future<std::shared_ptr<const data::Dataset>> evalLoad;
  if (job_.data.eval) evalLoad = std::async(std::launch::async, [&] { return data::loadDataset(*job_.data.eval); });
  train_ = data::loadDataset(job_.data.train);
  if (job_.parallel.compression && worker_.worldSize == 1) {
    if (worker_.rank == 0)
      log::warn("{}: /parallel/compression: ignored with a world of 1 rank (nothing is communicated)", job_.sourceFile);
  } else if (worker_.worldSize > 1 && psServers_ == 0) {
    commHook_ = job_.parallel.compression ? makeCompressionHook(*job_.parallel.compression, job_.loop.seed)
                                          : std::make_shared<AllreduceAvgHook>();
  }
  ProcessGroups groups = connect();
  strategy_ = makeStrategy(job_, std::move(groups),
                           {.overlapDefault = spareCores, .commHook = commHook_, .roundStore = roundStore_});
  const int64_t batch = job_.data.batchSize;
  // A GPU job is DDP only (lib/train/job.cpp): no pipeline stage and no tensor group on cuda.
  const Device device = device_;
  pipeline_ = dynamic_cast<PipelineStrategy*>(strategy_.get());
  const ProcessGroups& built = strategy_->groups();
  tensorParallel_ = built.layout.tensor > 1;
  if (pipeline_ != nullptr) {
    model_.emplace(pipeline_->buildModel(job_.loop.seed));  // this rank's stage, for micro-batches
    countsMetrics_ = pipeline_->lastStage();
  } else {
    // Tensor parallel: this rank's slices of the split layers (lib/nn/tensor_parallel.h).
    model_.emplace(nn::Model::build(job_.model, static_cast<int>(batch), job_.loop.seed, device,
                                    tensorGroupOver(built.tensor, built.coords.tensor, built.layout.tensor)));
  }
  // The ranks of a tensor group compute the same losses: one of them counts.
  countsMetrics_ = countsMetrics_ && built.coords.tensor == 0;
  loss_ = nn::Loss::create(job_.loss, job_.model.output(), static_cast<int>(batch), device);
  checkDataFitsModel(job_, *train_, *loss_, "/data/train");
  if (device_.isCuda()) {
    featuresDev_ = nn::DeviceFloats(static_cast<size_t>(batch * train_->featureShape().numel()), device_);
    labelsDev_ = nn::DeviceFloats(static_cast<size_t>(batch * train_->labelShape().numel()), device_);
    featuresPinned_ = nn::HostStaging(featuresDev_.size() * sizeof(float), device_);
    labelsPinned_ = nn::HostStaging(labelsDev_.size() * sizeof(float), device_);
  }
  if (!job_.initFrom.empty()) {
    if (pipeline_ != nullptr || tensorParallel_) loadWeightsByName(job_.initFrom, *model_);  // its own parts
    else loadWeights(job_.initFrom, *model_);
  }
  // DGC's momentum correction: the compression hook applies the momentum, the optimizer only the step.
  nn::OptimizerSpec optimizerSpec = job_.optimizer;
  if (commHook_ && job_.parallel.compression && job_.parallel.compression->momentumCorrection)
    optimizerSpec.momentum = 0;
  optimizer_ = nn::Optimizer::create(optimizerSpec, model_->numParams(), device);
  if (job_.optimizer.decayMatricesOnly) {
    // nanoGPT's groups: only parameters with >= 2 dimensions decay.
    std::vector<std::pair<size_t, size_t>> noDecay;
    for (const auto& e : model_->paramTable())
      if (e.shape.rank() < 2) noDecay.emplace_back(e.offset, e.count);
    optimizer_->setNoDecayRanges(std::move(noDecay));
  }
  writeVocabulary();
  checkpointer_ = std::make_unique<Checkpointer>(
      job_, *strategy_, fmt::format("{}/{}/{}", worker_.runId, worker_.round, worker_.restartCount));
  resumed_ = checkpointer_->resume(*model_, *optimizer_);
  strategy_->bindOptimizer(*optimizer_, resumed_ ? resumed_->step : 0);
  strategy_->prepare(*model_);  // binds commHook_: its state exists from here
  setUpSparseTables();
  checkpointer_->setCommHook(commHook_);
  bool hookStateLoaded = resumed_ && checkpointer_->loadCommHookState(*resumed_);
  const ProcessGroups& g = strategy_->groups();
  sampler_ = std::make_unique<data::DistributedSampler>(data::SamplerOptions{
      .datasetSize = train_->size(), .rank = g.dataRank, .worldSize = g.dataSize,
      .shuffle = job_.data.shuffle, .seed = job_.loop.seed, .dropLast = job_.data.dropLast});
  planRun();
  if (evalLoad.valid()) {
    eval_ = evalLoad.get();
    checkDataFitsModel(job_, *eval_, *loss_, "/data/eval");
  }
  hasDropout_ = model_->hasRandomLayers();
  addTestAids(callbacks_, worker_.rank, worker_.worldSize, worker_.restartCount, worker_.round);
  if (auto reporter = makeMetricsReporter(worker_.rank)) callbacks_.add(std::move(reporter));
  if (job_.logging.tensorboard)
    callbacks_.add(std::make_shared<TensorBoardLogger>(worker_.rank == 0, job_.outputDir));
  // Ranks agree on a stop (SIGTERM/SIGINT/SIGUSR1 on any of them) every few steps, so that they all checkpoint
  // at the same step.
  stopCheckEvery_ = strategy_->stopCheckEvery();
  // A resumed run, or any later round of the launcher (a restart that found no checkpoint yet), appends.
  progress_ = std::make_shared<Progress>(worker_.rank == 0, job_.outputDir / "metrics.jsonl",
                                         resumed_.has_value() || worker_.round > 0, job_.outputDir / "model.safetensors");
  callbacks_.add(progress_);
  for (auto& c : extraCallbacks_) callbacks_.add(std::move(c));
  // Under model parallelism a batch belongs to a data replica (its stages x tensor ranks all read it).
  const LayoutDims& dims = strategy_->groups().layout;
  const std::string readers =
      dims.modelParallel()
          ? fmt::format("{} data replica(s) of {} ranks", dims.data, dims.stages * dims.tensor)
          : fmt::format("{} rank(s)", worker_.worldSize);
  progress_->info(fmt::format("{}: {} parameters, {} training samples, {} x batch {}, {} steps{}", job_.name,
                              model_->numParams(), train_->size(), readers, batch, stats_.totalSteps,
                              strategy_->summary().empty() ? "" : ", " + strategy_->summary()));
  if (const auto* seqTrain = dynamic_cast<const data::SequenceDataset*>(train_.get()); seqTrain && worker_.rank == 0) {
    if (const auto* seqEval = dynamic_cast<const data::SequenceDataset*>(eval_.get())) {
      // The whole model's vocabulary: under pipeline parallelism model_ is this rank's stage, whose output is a
      // hidden state, not logits.
      const double bigram = data::bigramLoss(*seqTrain, *seqEval, job_.model.output().back());
      result_.baselineLoss = bigram;
      progress_->info(fmt::format("bigram baseline on the same split: eval loss {:.4f} (the model must get below it)",
                                  bigram));
    }
  }
  if (eval_ && worker_.rank == 0 && job_.data.train.format == data::Format::kSynthetic &&
      job_.data.train.synthetic.task == data::SyntheticOptions::Task::kRecsys) {
    result_.baselineAuc = popularityBaselineAuc(*train_, *eval_);
    if (result_.baselineAuc)
      progress_->info(fmt::format("popularity baseline (items ranked by their training click rate): eval AUC {:.4f} "
                                  "(the model must beat it)",
                                  *result_.baselineAuc));
  }
  if (resumed_)
    progress_->info(fmt::format("resumed from {} (step {}, epoch {}, {} samples of it done, saved by {} rank(s))",
                                resumed_->path.string(), resumed_->step, resumed_->epoch + 1,
                                resumed_->samplesConsumed, resumed_->savedWorldSize));
  if (job_.parallel.compression && commHook_) {
    const auto& c = *job_.parallel.compression;
    progress_->info(fmt::format("gradient compression: {}{}{}{}", compressionTypeName(c.type),
                                c.type == CompressionSettings::Type::kPowerSgd ? fmt::format(" rank {}", c.rank) : "",
                                c.type == CompressionSettings::Type::kTopK ? fmt::format(" ratio {}", c.ratio) : "",
                                resumed_ ? (hookStateLoaded ? ", state resumed" : ", fresh state (none in the checkpoint)")
                                         : ""));
  }
}

void TrainLoop::setUpSparseTables() {
  const std::vector<nn::SparseTableInfo> tables = model_->sparseTables();
  if (tables.empty()) return;
  sparse_ = strategy_->sparseTables();
  if (sparse_ == nullptr) {  // one process: the tables live here
    localSparse_ = std::make_unique<LocalSparseTables>(sparseTableOptions(job_));
    sparse_ = localSparse_.get();
  }
  model_->bindSparseRows(sparse_);
  checkpointer_->setSparseTables(sparse_, tables);
  if (!resumed_) return;
  // Worker 0 restores the servers' rows (as it initialises the dense partitions); nobody pulls a row before.
  if (worker_.rank == 0) checkpointer_->loadSparseTables(*resumed_);
  strategy_->barrier();
}

void TrainLoop::writeVocabulary() {
  const auto* seq = dynamic_cast<const data::SequenceDataset*>(train_.get());
  if (seq == nullptr || worker_.rank != 0) return;
  std::filesystem::create_directories(job_.outputDir);
  const auto file = job_.outputDir / "vocab.json";
  const auto tmp = job_.outputDir / "vocab.json.tmp";
  {
    std::ofstream out(tmp);
    out << data::vocabularyJson(seq->stream());
    DTRAIN_CHECK(out.good(), "cannot write {}", tmp.string());
  }
  std::filesystem::rename(tmp, file);
  // The model spec beside the weights, so `dtrain generate RUN_DIR` can rebuild the model.
  const auto spec = job_.outputDir / kModelSpecFile;
  {
    std::ofstream out(tmp);
    out << job_.doc["model"].dump(2) << "\n";
    DTRAIN_CHECK(out.good(), "cannot write {}", tmp.string());
  }
  std::filesystem::rename(tmp, spec);
}

void TrainLoop::planRun() {
  const int64_t batch = job_.data.batchSize;
  auto stepsOf = [&](int64_t samplesPerRank) { return stepsForSamples(job_, samplesPerRank); };
  const int64_t stepsPerEpoch = stepsOf(sampler_->maxSamplesPerRank());
  DTRAIN_CHECK_AS(ConfigError, stepsPerEpoch > 0,
                  "{}: /data/batch_size: {} samples per rank ({} in all over {} rank(s)) make no batch of {}",
                  job_.sourceFile, sampler_->numSamplesThisRank(), train_->size(), worker_.worldSize, batch);
  step_ = resumed_ ? resumed_->step : 0;
  const int64_t startEpoch = resumed_ ? resumed_->epoch : 0;
  // Steps of the whole run as this world sees it: done + the rest of this epoch + the remaining epochs.
  shardEpoch(startEpoch, resumed_ ? resumed_->samplesConsumed : 0);
  int64_t totalSteps = step_ + (startEpoch < job_.loop.epochs ? stepsOf(sampler_->maxSamplesPerRank()) : 0) +
                       std::max<int64_t>(0, job_.loop.epochs - startEpoch - 1) * stepsPerEpoch;
  if (job_.loop.maxSteps > 0) totalSteps = std::min(totalSteps, job_.loop.maxSteps);
  double baseLr = job_.optimizer.lr;
  if (job_.parallel.lrScaling == "linear")
    baseLr *= static_cast<double>(worker_.worldSize) / job_.parallel.referenceWorldSize;
  schedule_ = nn::Schedule(job_.schedule, baseLr, totalSteps);
  logEvery_ = job_.loop.logEverySteps > 0 ? job_.loop.logEverySteps : std::max<int64_t>(1, stepsPerEpoch / 20);
  stats_ = StepStats{.totalSteps = totalSteps, .epochs = job_.loop.epochs, .stepsPerEpoch = stepsPerEpoch};
}

void TrainLoop::saveCheckpoint(int64_t epoch, int64_t position) {
  if (!checkpointer_->enabled()) return;
  const auto t0 = Clock::now();
  strategy_->syncForSave();
  // At an epoch's start (position 0) the next epoch follows this world's padding; mid-epoch, the current one's.
  const int epochWorld = position == 0 ? strategy_->groups().dataSize : epochWorld_;
  auto dir = checkpointer_->save(*model_, *optimizer_, step_, epoch, position, epochWorld);
  CheckpointEvent saved{.step = step_, .seconds = secondsSince(t0)};
  std::error_code ec;
  for (auto it = std::filesystem::recursive_directory_iterator(dir, ec);
       !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec))
    if (it->is_regular_file(ec)) saved.bytes += it->file_size(ec);
  callbacks_.checkpoint(saved);
  if (timeline::enabled()) timeline::record("checkpoint", "checkpoint", t0, Clock::now(), fmt::format(R"("step":{})", step_));
  if (worker_.rank == 0) log::debug("checkpoint {} committed", dir.string());
}

void TrainLoop::shardEpoch(int64_t epoch, int64_t startSample) {
  // A fixed world pads the epoch to a multiple of itself (PyTorch's rule; a same-world resume gives the same
  // indices, bit for bit). The rest of an epoch resumed at another world than the one whose padding it followed
  // is shared out unevenly instead, so that a resize neither repeats nor skips a sample (sampler.h).
  const int world = strategy_->groups().dataSize;
  const bool resumedElsewhere = startSample > 0 && resumed_ && resumed_->epochWorld != world;
  epochWorld_ = resumedElsewhere ? 0 : world;
  sampler_->setPad(!resumedElsewhere);
  sampler_->setEpoch(epoch, startSample);
}

void TrainLoop::trainEpoch(int64_t epoch, int64_t startSample) {
  shardEpoch(epoch, startSample);
  data::BatchLoader loader(*train_, *sampler_,
                           {.batchSize = job_.data.batchSize, .dropLast = job_.data.dropLast, .prefetch = prefetch_});
  // Every rank takes as many steps as rank 0, which has the most samples: with uneven shards a rank whose
  // samples ran out joins the last step with an empty batch (zero gradients), as PyTorch's Join does.
  const int64_t batchSize = job_.data.batchSize, most = sampler_->maxSamplesPerRank();
  const int64_t numBatches =
      std::max(loader.numBatches(), job_.data.dropLast ? most / batchSize : (most + batchSize - 1) / batchSize);
  const int accum = job_.loop.gradAccum;
  // An epoch resumed mid-way counts its steps from where the full epoch (in this world) would be, not from 1.
  const int64_t stepsBefore = std::max<int64_t>(0, stats_.stepsPerEpoch - (numBatches + accum - 1) / accum);
  const float gradScale = 1.0f / static_cast<float>(accum);
  auto params = model_->params();
  auto grads = model_->grads();
  stats_.epoch = epoch;
  Clock::time_point epochStart = Clock::now();
  int micro = 0;
  int64_t batchIndex = 0;
  // Step-time breakdown for the callbacks (StepTimes): a handful of clock reads per micro-batch.
  StepEvent event;
  double stepLoss = 0;
  Clock::time_point mark = Clock::now();
  Clock::time_point stepStart = mark;
  auto lap = [&mark](double& into, const char* phase) {
    auto now = Clock::now();
    into += std::chrono::duration<double>(now - mark).count();
    if (timeline::enabled()) timeline::record(phase, "phase", mark, now);
    mark = now;
  };
  data::Batch none;  // the empty batch of a rank whose uneven share ran out before the group's last step
  auto nextBatch = [&]() -> const data::Batch* {
    if (const data::Batch* b = loader.next()) return b;
    if (batchIndex >= numBatches) return nullptr;
    none.position = sampler_->position(sampler_->numSamplesThisRank());
    return &none;
  };
  while (const data::Batch* batch = nextBatch()) {
    const data::Batch& b = *batch;
    ++batchIndex;
    if (micro == 0) {
      strategy_->beginStep(step_, schedule_.lr(step_));
      if (localSparse_) localSparse_->beginStep(step_, schedule_.lr(step_));
      event.times = {};
      event.samples = 0;
      stepLoss = 0;
      stepStart = mark;
    }
    lap(event.times.data, "data");
    bool lastMicro = micro + 1 == accum || batchIndex == numBatches;
    const nn::GradMode mode = micro == 0 ? nn::GradMode::kOverwrite : nn::GradMode::kAccumulate;
    if (b.size == 0) {
      // Nothing to learn from (a short shard after a mid-epoch resize): zero gradients (or what earlier
      // micro-batches accumulated) still take part in the step's all-reduce, layer by layer as backward would hand
      // them over. Every stage of a pipeline replica reads the same (empty) batch, so they all skip together.
      if (micro == 0) nn::zeroFloats(grads.data(), grads.size(), device_);
      if (lastMicro)
        if (const nn::LayerGradReady hook = strategy_->gradReadyHook())
          for (int k = model_->numLayers() - 1; k >= 0; --k)
            if (model_->layerParamRange(k).count > 0) hook(k);
      stepLossFinite_ = micro == 0 || stepLossFinite_;
      lap(event.times.backward, "backward");
    } else {
    float loss = 0;
    if (pipeline_ != nullptr) {
      // The schedule interleaves forwards and backwards: its whole time is booked as forward.
      loss = pipeline_->trainBatch(b.features, targetsOf(b, *train_), static_cast<int>(b.size), gradScale, mode,
                                   dropoutSeed(job_.loop.seed, dropoutRank(), step_, micro));
    } else {
      if (hasDropout_) model_->reseedDropout(dropoutSeed(job_.loop.seed, dropoutRank(), step_, micro));
      const Staged in = stage(b, *train_);
      TensorView out = model_->forward(in.features, static_cast<int>(b.size), true);
      loss = loss_->forward(out, in.targets);
    }
    lap(event.times.forward, "forward");
    stepLoss += loss;
    event.samples += b.size;
    intervalLoss_ += loss;
    const bool lossFinite = std::isfinite(loss);
    stepLossFinite_ = (micro == 0 || stepLossFinite_) && lossFinite;
    ++intervalBatches_;
    intervalSamples_ += b.size;
    result_.samples += b.size * strategy_->groups().dataSize;  // every micro-batch of the step (grad_accum > 1 has several)
    callbacks_.batch(b);
    const nn::LayerGradReady hook = lastMicro ? strategy_->gradReadyHook() : nn::LayerGradReady{};
    // A non-finite loss on this rank puts a NaN into every layer's gradient slice before that slice is handed to
    // the all-reduce, so the reduced gradients are non-finite on every rank: all ranks see the same thing below
    // and stop (or skip) at the same step without another collective per step.
    if (pipeline_ != nullptr) {
      if (!lossFinite && !grads.empty()) grads[0] = std::numeric_limits<float>::quiet_NaN();
    } else if (!lossFinite && hook) {
      auto poisoned = [&](int k) {
        nn::setFloat(grads.data() + model_->layerParamRange(k).offset, std::numeric_limits<float>::quiet_NaN(), device_);
        hook(k);
      };
      model_->backward(loss_->backward(gradScale), poisoned, mode);
    } else {
      model_->backward(loss_->backward(gradScale), hook, mode);
      // Not communicated yet (no hook: finishStep reduces the whole arena; or a micro-batch before the last,
      // whose NaN stays through accumulation).
      if (!lossFinite && !grads.empty()) nn::setFloat(grads.data(), std::numeric_limits<float>::quiet_NaN(), device_);
    }
    lap(event.times.backward, "backward");
    }
    if (!lastMicro) {
      ++micro;
      continue;
    }
    event.loss = event.samples > 0 ? stepLoss / (micro + 1) : 0;
    micro = 0;
    strategy_->finishStep();
    lap(event.times.commWait, "comm_wait");
    const bool gradsFinite = agreeFinite(grads);
    if (gradsFinite || job_.loop.onNonFinite == LoopSettings::OnNonFinite::kStop) {
      skippedInARow_ = 0;
      if (!gradsFinite)
        diverged(epoch, stepLossFinite_ ? std::string("gradient") : fmt::format("loss on rank {}", worker_.rank));
      optimizer_->setLr(schedule_.lr(step_));
      if (!strategy_->updatesParameters()) {  // the parameter server updated params() already
        if (job_.optimizer.clipGradNorm > 0) {
          if (pipeline_ == nullptr && !tensorParallel_) {
            nn::clipGradNorm(grads, job_.optimizer.clipGradNorm, device_);
          } else {
            // PyTorch's clip_grad_norm_ over the whole model's gradients, which the stages hold in parts.
            const double norm = strategy_->gradNorm(*model_);
            const auto coef = static_cast<float>(job_.optimizer.clipGradNorm / (norm + 1e-6));
            if (coef < 1.0f)
              for (float& g : grads) g *= coef;
          }
        }
        optimizer_->step(params, grads);
      }
      // The weights are identical on every rank, so every rank stops here together.
      if (!agreeFinite(params)) diverged(epoch, "weights after the update");
    } else {
      ++skippedSteps_;
      if (++skippedInARow_ >= job_.loop.maxSkippedSteps)
        diverged(epoch, fmt::format("{} on {} consecutive steps (train.max_skipped_steps {})",
                                    stepLossFinite_ ? "gradient" : "loss", skippedInARow_, job_.loop.maxSkippedSteps));
      progress_->info(fmt::format("step {}: non-finite {} on {}, update skipped (train.on_nonfinite=skip; {} "
                                  "skipped so far)",
                                  step_ + 1, stepLossFinite_ ? "gradient" : "loss",
                                  stepLossFinite_ ? "some rank" : fmt::format("rank {}", worker_.rank),
                                  skippedSteps_));
    }
    ++step_;
    lap(event.times.optimizer, "optimizer");
    event.epoch = epoch;
    event.step = step_;
    event.lr = optimizer_->lr();
    if (timeline::enabled()) timeline::record("step", "step", stepStart, mark, fmt::format(R"("step":{})", step_));
    callbacks_.optimizerStep(event);
    stats_.stepInEpoch = stepsBefore + (batchIndex + accum - 1) / accum;
    afterStep(epoch, b.position, batchIndex == numBatches);
    mark = Clock::now();  // logging and checkpoints are not the next step's data wait
    if (stop_ && batchIndex != numBatches) break;
  }
  logInterval(stats_, false);
  result_.trainSec += secondsSince(epochStart);
  if (batchIndex == numBatches) {  // the epoch ran to its end
    if (job_.loop.evalEachEpoch && !result_.stoppedBySignal) evaluate(stats_);
    saveCheckpoint(epoch + 1, 0);
  }
  intervalStart_ = Clock::now();  // evaluation time is not training throughput
}

void TrainLoop::diverged(int64_t epoch, std::string_view what) {
  DTRAIN_THROW(DivergedError,
               "{}: training diverged at step {} (epoch {}): non-finite {}; nothing was saved from this step (the "
               "last checkpoint and model.safetensors are kept); lower optimizer.lr, set optimizer.clip_grad_norm, "
               "or set train.on_nonfinite to \"skip\" to drop such steps",
               job_.sourceFile, step_ + 1, epoch + 1, what);
}

void TrainLoop::afterStep(int64_t epoch, int64_t position, bool epochEnd) {
  stats_.step = step_;
  stats_.lr = optimizer_->lr();
  // Step 1 is always logged: its wall_time tells how long the start took.
  if (step_ == 1 || step_ % logEvery_ == 0 || epochEnd) logInterval(stats_, false);
  // A run that reaches max_steps is checkpointed there, so raising max_steps continues it.
  if (job_.loop.maxSteps > 0 && step_ >= job_.loop.maxSteps) stop_ = true;
  if (step_ % stopCheckEvery_ == 0 || stop_) {
    if (int sig = strategy_->agreeOnStop(gStopSignal.load()); sig != 0) {
      result_.stoppedBySignal = sig;
      stop_ = true;
    }
  }
  // The epoch's last step is saved after the evaluation, by trainEpoch, as the start of the next epoch.
  bool due = stop_ || (job_.checkpoint.everySteps > 0 && step_ % job_.checkpoint.everySteps == 0);
  if (due && !epochEnd) saveCheckpoint(epoch, position);
  callbacks_.stepEnd({.epoch = epoch, .step = step_});
}

void TrainLoop::finish() {
  const bool leader = worker_.rank == 0;
  result_.steps = step_;
  if (!result_.stoppedBySignal) strategy_->syncForSave();
  if (pipeline_ != nullptr && !result_.stoppedBySignal) {
    if (leader) std::filesystem::create_directories(job_.outputDir);
    // Training and checkpoints are done: the optimizer's state (Adam: twice the parameters) goes before rank 0
    // assembles the whole model, so a job split to fit a memory cap also exports under it.
    optimizer_.reset();
    pipeline_->exportModel(*model_, job_.outputDir / "model.safetensors");  // collective: the stages' parts
  } else if (tensorParallel_ && !result_.stoppedBySignal) {
    // The first replica's tensor group gathers the full tensors one at a time; its rank 0 (the world's) writes.
    const ProcessGroups& g = strategy_->groups();
    if (leader) std::filesystem::create_directories(job_.outputDir);
    if (g.coords.data == 0) exportTensorParallel(*model_, *g.tensor, leader, job_.outputDir / "model.safetensors");
  } else if (leader && !result_.stoppedBySignal) {
    std::filesystem::create_directories(job_.outputDir);
    // Sparse tables go in too, fetched from their holder, as torch's state_dict() holds an nn.Embedding(sparse=True).
    std::vector<SparseTableState> tables;
    std::vector<ckpt::NamedTensor> extra;
    if (sparse_ != nullptr)
      for (const nn::SparseTableInfo& t : model_->sparseTables()) {
        tables.push_back(sparse_->readTable(t.table));
        extra.push_back({t.name, TensorView::of(tables.back().values.data(), Shape{t.rows, t.dim})});
      }
    saveWeights(job_.outputDir / "model.safetensors", *model_, extra);
  }
  strategy_->finishRun();
  result_.wallSec = secondsSince(start_);
  result_.samplesPerSec = result_.trainSec > 0 ? static_cast<double>(result_.samples) / result_.trainSec : 0;
  // Peak memory of every rank (the largest is what a user sizes a machine by).
  double rss[1] = {peakRssMb()};
  strategy_->reduceMetrics(rss, comm::ReduceOp::kMax);
  result_.peakRssMb = rss[0];
  callbacks_.finish(stats_, result_);
  timeline::flush();
}

TrainResult TrainLoop::run() {
  installStopHandlers();
  setUp();
  intervalStart_ = Clock::now();
  const int64_t startEpoch = resumed_ ? resumed_->epoch : 0;
  stop_ = job_.loop.maxSteps > 0 && step_ >= job_.loop.maxSteps;
  for (int64_t epoch = startEpoch; epoch < job_.loop.epochs && !stop_; ++epoch)
    trainEpoch(epoch, epoch == startEpoch && resumed_ ? resumed_->samplesConsumed : 0);
  finish();
  return result_;
}

}  // namespace

TrainResult runTraining(const Job& job, const WorkerInfo& worker, std::vector<TrainerCallbackPtr> callbacks) {
  DTRAIN_CHECK_AS(UsageError, worker.worldSize == 1 || !worker.store.empty(),
                  "WORLD_SIZE={} but DTRAIN_STORE is not set: start the workers with `dtrain run`", worker.worldSize);
  if (job.parallel.ps && worker.worldSize > 1) {
    const int servers = job.parallel.ps->servers;
    DTRAIN_CHECK_AS(ConfigError, servers < worker.worldSize,
                    "{}: /parallel/servers: {} server(s) in a world of {} rank(s) (expected 1 <= servers < world "
                    "size, so that at least one rank trains)",
                    job.sourceFile, servers, worker.worldSize);
    const PsRole role = psRole(worker, servers);
    if (role.server) {
      // A stop signal (Ctrl-C, preemption) reaches every rank: the workers then fetch the servers' state for their
      // last checkpoint, so a server ignores it and exits once every worker is done (or by the agent's SIGKILL).
      for (int sig : {SIGTERM, SIGINT, SIGUSR1}) ::signal(sig, SIG_IGN);
      auto store = rendezvous::connectStore(worker.store, job.parallel.timeout);
      rendezvous::PrefixStore roundStore(fmt::format("{}r{}/", rendezvous::runPrefix(worker.runId), worker.round),
                                         store);
      runPsServer(job, role.roleRank, worker.worldSize - servers, roundStore, worker.numNodes == 1,
                  worker.restartCount);
      return TrainResult{};
    }
    const WorkerInfo view = workerView(worker, servers);
    TrainLoop loop(job, view, std::move(callbacks), servers);
    return loop.run();
  }
  if (job.parallel.ps && worker.rank == 0)
    log::info("{}: parameter-server job in a world of 1 rank: training alone, without servers", job.sourceFile);
  TrainLoop loop(job, worker, std::move(callbacks));
  return loop.run();
}

}  // namespace dtrain::train
