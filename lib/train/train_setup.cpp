// TrainLoop's set-up (train_loop.h): the worker's device, process groups and the clock offset for timelines,
// data, model, optimizer, checkpoint resume, sparse tables, the vocabulary file and the run's plan.
#include "lib/train/train_loop.h"

#include <algorithm>

#include "lib/ckpt/report.h"
#include "lib/train/check.h"

namespace dtrain::train::detail {

namespace {

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

}  // namespace

Device TrainLoop::workerDevice() const {
  if (!job_.device.isCuda()) return Device::cpu();
  // The agent checked its node before starting workers; a worker alone (or under another launcher) checks here.
  checkGpusForWorkers(job_, std::max(worker_.localWorldSize, worker_.localRank + 1), nn::visibleGpus());
  return Device::cuda(worker_.localRank);
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
    // job is data-parallel only (lib/train/job_device.cpp), so the data group spans the world.
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

void TrainLoop::setUp() {
  // A prefetch thread only pays when a core is free for it: with as many workers as cores on the node it
  // competes with the training threads (measured: 2 ranks on 2 cores run faster without it).
  const bool spareCores = std::thread::hardware_concurrency() > static_cast<unsigned>(worker_.localWorldSize);
  // A one-process `dtrain train` has had no agent to check them: an unusable folder fails now, not an epoch later.
  if (worker_.rank == 0) checkOutputDirs(job_);
  timeline::startFromEnv(worker_.rank, worker_.nodeRank);  // before connect(): the set-up's collectives show too
  prefetch_ = job_.data.prefetch.value_or(spareCores);
  device_ = workerDevice();
  nn::useDevice(device_);
  nn::setTf32(job_.tf32);
  nn::setAttentionKernel(job_.attention);  // before the model is built: each attention layer reads it then
  nn::setBf16(job_.precision == Job::Precision::kBf16);
  // The eval set loads in the background while the group forms and the training set loads.
  std::future<std::shared_ptr<const data::Dataset>> evalLoad;
  if (job_.data.eval) evalLoad = std::async(std::launch::async, [&] { return data::loadDataset(*job_.data.eval); });
  train_ = data::loadDataset(job_.data.train);
  // Compression applies to the data-parallel all-reduce: with one replica (one rank, or every rank a pipeline stage
  // or tensor shard) there is none, and the hook must not exist either: momentum_correction would take the
  // optimizer's momentum for a hook that never runs.
  const int replicas = worker_.worldSize == 1 ? 1 : resolveLayout(job_.parallel, worker_.worldSize, job_.sourceFile).data;
  if (job_.parallel.compression && replicas == 1) {
    if (worker_.rank == 0) {
      if (worker_.worldSize == 1)
        log::warn("{}: /parallel/compression: ignored with a world of 1 rank (nothing is communicated)", job_.sourceFile);
      else
        log::warn("{}: /parallel/compression: ignored with a data-parallel size of 1 (the {} ranks are pipeline "
                  "stages or tensor shards of one replica: no gradient is all-reduced)",
                  job_.sourceFile, worker_.worldSize);
    }
  } else if (worker_.worldSize > 1 && psServers_ == 0) {
    commHook_ = job_.parallel.compression ? makeCompressionHook(*job_.parallel.compression, job_.loop.seed)
                                          : std::make_shared<AllreduceAvgHook>();
  }
  ProcessGroups groups = connect();
  strategy_ = makeStrategy(job_, std::move(groups),
                           {.overlapDefault = spareCores, .commHook = commHook_, .roundStore = roundStore_});
  result_.ownSamples = strategy_->evaluatesAlone();
  if (evalLoad.valid()) eval_ = evalLoad.get();  // its size bounds the evaluation batches
  maxBatch_ = largestBatch();
  const int64_t batch = maxBatch_;
  // A GPU job is DDP only (lib/train/job_device.cpp): no pipeline stage and no tensor group on cuda.
  const Device device = device_;
  pipeline_ = dynamic_cast<PipelineStrategy*>(strategy_.get());
  const ProcessGroups& built = strategy_->groups();
  tensorParallel_ = built.layout.tensor > 1;
  if (pipeline_ != nullptr) {
    pipeline_->limitBatch(static_cast<int>(batch));
    model_.emplace(pipeline_->buildModel(job_.loop.seed));  // this rank's stage, for micro-batches
    countsMetrics_ = pipeline_->lastStage();
  } else {
    // Tensor parallel: this rank's slices of the split layers (lib/nn/tensor_parallel.h).
    model_.emplace(nn::Model::build(job_.model, static_cast<int>(batch), job_.loop.seed, device,
                                    tensorGroupOver(built.tensor, built.coords.tensor, built.layout.tensor)));
  }
  // The ranks of a tensor group compute the same losses: one of them counts.
  countsMetrics_ = countsMetrics_ && built.coords.tensor == 0;
  // A bf16 GPT's loss writes the logits' gradient in bf16 for lm_head's GEMMs (Model::outputGradType).
  loss_ = nn::Loss::create(job_.loss, job_.model.output(), static_cast<int>(batch), device, model_->outputGradType());
  checkDataFitsModel(job_, *train_, *loss_, "/data/train");
  checkEmbeddingIds(job_, *train_, "/data/train");
  if (device_.isCuda()) {
    // One staging for the training and the evaluation batches: sized for the larger of each part.
    int64_t features = train_->featureShape().numel(), labels = train_->labelShape().numel();
    if (eval_) {
      features = std::max(features, eval_->featureShape().numel());
      labels = std::max(labels, eval_->labelShape().numel());
    }
    // Labels are int32 class ids or float targets: 4 bytes either way.
    static_assert(sizeof(int32_t) == sizeof(float));
    staging_ = nn::BatchStaging(static_cast<size_t>(batch * features) * sizeof(float),
                                static_cast<size_t>(batch * labels) * sizeof(float), device_);
  }
  if (!job_.initFrom.empty()) {
    // An exported model with sparse tables: the dense parameters are in model.safetensors beside its index.
    const auto weights = denseWeightsFile(job_.initFrom);
    if (pipeline_ != nullptr || tensorParallel_) loadWeightsByName(weights, *model_);  // its own parts
    else loadWeights(weights, *model_);
  }
  // DGC's momentum correction: the compression hook applies the momentum, the optimizer only the step.
  // Top-k's local_adam: from start_step each rank's hook runs Adam and sends its update; the optimizer applies it.
  nn::OptimizerSpec optimizerSpec = job_.optimizer;
  if (commHook_ && job_.parallel.compression) {
    const CompressionSettings& c = *job_.parallel.compression;
    if (c.momentumCorrection) optimizerSpec.momentum = 0;
    if (c.localAdam) localAdamHook_ = std::dynamic_pointer_cast<CompressionHook>(commHook_);
  }
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
  std::string hookFresh;
  bool hookStateLoaded = resumed_ && checkpointer_->loadCommHookState(*resumed_, &hookFresh);
  const ProcessGroups& g = strategy_->groups();
  sampler_ = std::make_unique<data::DistributedSampler>(data::SamplerOptions{
      .datasetSize = train_->size(), .rank = g.dataRank, .worldSize = g.dataSize,
      .shuffle = job_.data.shuffle, .seed = job_.loop.seed, .dropLast = job_.data.dropLast});
  planRun();
  if (eval_) {
    checkDataFitsModel(job_, *eval_, *loss_, "/data/eval");
    checkSameVocabulary(job_, *train_, *eval_);
    checkEmbeddingIds(job_, *eval_, "/data/eval");
  }
  hasDropout_ = model_->hasRandomLayers();
  // One sample log per data replica: its stages and tensor ranks all read the same batches.
  // Its "world" is the launch's, servers included (a parameter-server worker's worker_ counts the workers only):
  // `dtrain sim` derives the node count from it.
  addTestAids(callbacks_, worker_.rank, worker_.worldSize + psServers_, worker_.restartCount, worker_.round,
              /*logsSamples=*/g.coords.stage == 0 && g.coords.tensor == 0);
  if (auto reporter = makeMetricsReporter(worker_.rank, /*countsSamples=*/g.coords.stage == 0 && g.coords.tensor == 0))
    callbacks_.add(std::move(reporter));
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
          : fmt::format("{} {}", worker_.worldSize, psServers_ > 0 ? "worker(s)" : "rank(s)");  // servers take no batch
  // The model's size, and under model parallelism what this rank (rank 0, which prints) holds of it: its stage's or
  // tensor shard's parameters alone read as the model's ("200960 parameters" for the 269322 of a 2-stage MLP).
  const std::string params =
      dims.modelParallel()
          ? fmt::format("{} parameters (rank 0 holds {})", job_.model.paramCount(), model_->numParams())
          : fmt::format("{} parameters", model_->numParams());
  // A batch_size above a rank's share of the data gives batches of the share (PyTorch's DataLoader): say so. A whole
  // epoch's share: after a resume the sampler holds the rest of the resumed epoch, and a rest of 1 sample per rank
  // read as "batch 1 (batch_size 16 is more than a rank's 1 samples)" for a run whose batches are 16.
  const int64_t share = epochShare_;
  const std::string batchText =
      job_.data.batchSize > share && share > 0
          ? fmt::format("{} (batch_size {} is more than a rank's {} samples)", share, job_.data.batchSize, share)
          : std::to_string(job_.data.batchSize);
  progress_->info(fmt::format("{}: {}, {} training samples, {} x batch {}, {} steps{}", job_.name, params,
                              train_->size(), readers, batchText, stats_.totalSteps,
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
    progress_->info(fmt::format("resumed from {} (step {}, {}, saved by {} rank(s))", resumed_->path.string(),
                                resumed_->step, ckpt::positionText(resumed_->epoch, resumed_->samplesConsumed),
                                resumed_->savedWorldSize));
  if (job_.parallel.compression && commHook_) {
    const auto& c = *job_.parallel.compression;
    progress_->info(fmt::format("gradient compression: {}{}{}{}{}{}", compressionTypeName(c.type),
                                c.type == CompressionSettings::Type::kPowerSgd ? fmt::format(" rank {}", c.rank) : "",
                                c.type == CompressionSettings::Type::kTopK ? fmt::format(" ratio {}", c.ratio) : "",
                                c.localAdam ? fmt::format(", local Adam from step {}", c.startStep) : "",
                                job_.device.isCuda() ? ", " + gpuCompressionPath(c.type) : "",
                                resumed_ ? (hookStateLoaded ? std::string(", state resumed")
                                                            : hookFresh.empty() ? std::string(", fresh state")
                                                                                : fmt::format(", fresh state ({})", hookFresh))
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
  if (!resumed_ && job_.initFrom.empty()) return;
  // Worker 0 has the servers read their rows (as it initialises the dense partitions) from the checkpoint, or from
  // init.from's model shards (values only, fresh optimizer state); nobody pulls a row before.
  if (worker_.rank == 0) {
    if (resumed_) checkpointer_->loadSparseTables(*resumed_);
    else sparse_->loadShards(sparseWeightFiles(job_.initFrom), /*withState=*/false, 0);
  }
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

// A batch holds at most batch_size samples, and at most what one rank gets of the data: PyTorch's DataLoader hands
// out a smaller batch when the data runs out, and so does BatchLoader. The model's activations, the loss and the
// GPU staging are sized for this, so a batch_size far above the data (2,000,000 over 96 samples) no longer
// allocates for the full batch (measured: 919 MiB per rank, 12 MiB now).
int64_t TrainLoop::largestBatch() const {
  const ProcessGroups& g = strategy_->groups();
  const auto share = [&](int64_t samples) { return (samples + g.dataSize - 1) / g.dataSize; };
  int64_t most = share(train_->size());
  if (eval_) most = std::max(most, strategy_->evaluatesAlone() ? eval_->size() : share(eval_->size()));
  return std::clamp<int64_t>(most, 1, job_.data.batchSize);
}

void TrainLoop::planRun() {
  const int64_t batch = job_.data.batchSize;
  auto stepsOf = [&](int64_t samplesPerRank) { return stepsForSamples(job_, samplesPerRank); };
  epochShare_ = sampler_->maxSamplesPerRank();  // a whole epoch's: the sampler is still at epoch 0's start
  const int64_t stepsPerEpoch = stepsOf(epochShare_);
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
  checkScheduleFitsRun(job_, totalSteps,
                       job_.loop.maxSteps > 0 && totalSteps == job_.loop.maxSteps
                           ? fmt::format("/train/max_steps {}", job_.loop.maxSteps)
                           : fmt::format("{} epoch(s) of {} step(s) on {} {}", job_.loop.epochs, stepsPerEpoch,
                                         worker_.worldSize, psServers_ > 0 ? "worker(s)" : "rank(s)"));
  schedule_ = nn::Schedule(job_.schedule, baseLr, totalSteps);
  logEvery_ = job_.loop.logEverySteps > 0 ? job_.loop.logEverySteps : std::max<int64_t>(1, stepsPerEpoch / 20);
  // The interval the checkpoint was saved in goes on here when its lines fall at the same steps.
  if (resumed_ && resumed_->interval.logEvery == logEvery_) {
    carriedLoss_ = resumed_->interval.lossSum;
    carriedBatches_ = resumed_->interval.batches;
  }
  // Where the run stands before its first step (what the summary reports when no step is left to take).
  stats_ = StepStats{.step = step_,
                     .totalSteps = totalSteps,
                     .startStep = step_,
                     .epoch = std::min<int64_t>(startEpoch, job_.loop.epochs - 1),
                     .epochs = job_.loop.epochs,
                     .stepsPerEpoch = stepsPerEpoch};
}

}  // namespace dtrain::train::detail
