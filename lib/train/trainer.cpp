#include "lib/train/trainer.h"

#include <csignal>
#include <cmath>
#include <future>

#include "lib/comm/registry.h"
#include "lib/common/clock.h"
#include "lib/common/env.h"
#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/data/batch_loader.h"
#include "lib/nn/loss.h"
#include "lib/nn/model.h"
#include "lib/train/check.h"
#include "lib/train/ddp.h"
#include "lib/train/progress.h"
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

int envInt(const char* name, int fallback) { return static_cast<int>(env::getInt(name, fallback)); }

// Views of a batch's labels in the form the loss expects.
nn::TensorView targetsOf(const data::Batch& b, const data::Dataset& ds) {
  if (b.classLabels) return nn::TensorView::i32(b.classLabels, nn::Shape{b.size});
  nn::Shape shape = nn::Shape::of(ds.labelShape()).withBatch(b.size);
  return nn::TensorView::f32(b.targets, shape);
}

}  // namespace

WorkerInfo WorkerInfo::fromEnv() {
  WorkerInfo w;
  w.rank = envInt("RANK", 0);
  w.worldSize = envInt("WORLD_SIZE", 1);
  w.localRank = envInt("LOCAL_RANK", 0);
  w.localWorldSize = envInt("LOCAL_WORLD_SIZE", 1);
  w.nodeRank = envInt("GROUP_RANK", 0);
  w.store = env::getOr("DTRAIN_STORE", "");
  w.runId = env::getOr("DTRAIN_RUN_ID", "none");
  w.round = envInt("DTRAIN_ROUND", 0);
  w.restartCount = envInt("DTRAIN_RESTART_COUNT", 0);
  DTRAIN_CHECK_AS(UsageError, w.worldSize >= 1 && w.rank >= 0 && w.rank < w.worldSize,
                  "RANK={} WORLD_SIZE={}: expected 0 <= RANK < WORLD_SIZE", w.rank, w.worldSize);
  DTRAIN_CHECK_AS(UsageError, w.worldSize == 1 || !w.store.empty(),
                  "WORLD_SIZE={} but DTRAIN_STORE is not set: start the workers with `dtrain run`", w.worldSize);
  return w;
}

namespace {

class TrainLoop {
 public:
  TrainLoop(const Job& job, const WorkerInfo& worker) : job_(job), worker_(worker), start_(Clock::now()) {}
  TrainResult run();

 private:
  void connect();
  void evaluate(const StepStats& stats);
  void logInterval(StepStats& stats, bool force);

  const Job& job_;
  const WorkerInfo& worker_;
  Clock::time_point start_;
  std::shared_ptr<comm::Backend> backend_;
  std::shared_ptr<const data::Dataset> train_, eval_;
  std::optional<nn::Model> model_;
  std::unique_ptr<nn::Loss> loss_;
  std::unique_ptr<Progress> progress_;
  // interval accounting for progress lines
  double intervalLoss_ = 0;
  int64_t intervalBatches_ = 0;
  int64_t intervalSamples_ = 0;
  Clock::time_point intervalStart_;
  TrainResult result_;
};

void TrainLoop::connect() {
  if (worker_.worldSize == 1) return;
  auto store = rendezvous::connectStore(worker_.store, job_.parallel.timeout);
  // Each round of the launcher gets fresh keys, so a restarted group never meets a stale address.
  auto prefixed = std::make_shared<rendezvous::PrefixStore>(
      fmt::format("/dtrain/{}/r{}/w/", worker_.runId, worker_.round), store);
  comm::BackendOptions opts = comm::optionsFromEnv();
  opts.store = prefixed;
  opts.timeout = job_.parallel.timeout;
  backend_ = comm::createBackend(job_.parallel.backend, opts);
}

void TrainLoop::logInterval(StepStats& stats, bool force) {
  if (intervalBatches_ == 0 && !force) return;
  double sums[3] = {intervalLoss_, static_cast<double>(intervalBatches_), static_cast<double>(intervalSamples_)};
  if (backend_) backend_->allreduce(sums, 3, comm::DType::kFloat64, comm::ReduceOp::kSum);
  double secs = std::max(1e-9, secondsSince(intervalStart_));
  stats.loss = sums[1] > 0 ? sums[0] / sums[1] : 0;
  stats.samplesPerSec = sums[2] / secs;
  stats.elapsedSec = secondsSince(start_);
  progress_->step(stats);
  intervalLoss_ = 0;
  intervalBatches_ = intervalSamples_ = 0;
  intervalStart_ = Clock::now();
}

void TrainLoop::evaluate(const StepStats& stats) {
  if (!eval_) return;
  // Every sample exactly once: no padding, uneven shards; sums are reduced over the group.
  data::DistributedSampler sampler({.datasetSize = eval_->size(), .rank = worker_.rank, .worldSize = worker_.worldSize,
                                    .shuffle = false, .pad = false});
  data::BatchLoader loader(*eval_, sampler, {.batchSize = job_.data.batchSize, .prefetch = job_.data.prefetch});
  nn::EvalSums sums;
  for (const data::Batch& b : loader) {
    nn::TensorView out = model_->forward(b.features, static_cast<int>(b.size), false);
    sums += loss_->evaluate(out, targetsOf(b, *eval_));
  }
  double v[4] = {sums.lossSum, static_cast<double>(sums.lossCount), static_cast<double>(sums.correct),
                 static_cast<double>(sums.samples)};
  if (backend_) backend_->allreduce(v, 4, comm::DType::kFloat64, comm::ReduceOp::kSum);
  double evalLoss = v[1] > 0 ? v[0] / v[1] : 0;
  std::optional<double> acc;
  if (loss_->hasAccuracy() && v[3] > 0) acc = v[2] / v[3];
  result_.evalLoss = evalLoss;
  result_.evalAccuracy = acc;
  progress_->eval(stats, evalLoss, acc, static_cast<int64_t>(v[3]));
}

TrainResult TrainLoop::run() {
  installStopHandlers();
  const bool leader = worker_.rank == 0;
  // The eval set loads in the background while the group forms and the training set loads.
  std::future<std::shared_ptr<const data::Dataset>> evalLoad;
  if (job_.data.eval) evalLoad = std::async(std::launch::async, [&] { return data::loadDataset(*job_.data.eval); });
  train_ = data::loadDataset(job_.data.train);
  connect();
  const int64_t batch = job_.data.batchSize;
  model_.emplace(nn::Model::build(job_.model, static_cast<int>(batch), job_.loop.seed));
  // Different dropout masks per rank (the same masks on every rank would waste data parallelism).
  model_->reseedDropout(job_.loop.seed + 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(worker_.rank + 1));
  loss_ = nn::Loss::create(job_.loss, job_.model.output(), static_cast<int>(batch));
  checkDataFitsModel(job_, *train_, *loss_, "/data/train");
  if (!job_.initFrom.empty()) loadWeights(job_.initFrom, *model_);
  auto params = model_->params();
  auto grads = model_->grads();
  // Rank 0's initial parameters for everyone: replicas start identical whatever each rank built.
  if (backend_) backend_->broadcast(params.data(), params.size(), comm::DType::kFloat32, 0);
  auto optimizer = nn::Optimizer::create(job_.optimizer, model_->numParams());
  GradientSync sync(*model_, backend_, job_.parallel.firstBucketMb, job_.parallel.bucketMb);

  data::SamplerOptions so{.datasetSize = train_->size(), .rank = worker_.rank, .worldSize = worker_.worldSize,
                          .shuffle = job_.data.shuffle, .seed = job_.loop.seed, .dropLast = job_.data.dropLast};
  data::DistributedSampler sampler(so);
  const int64_t perRank = sampler.numSamplesThisRank();
  const int64_t batchesPerEpoch = job_.data.dropLast ? perRank / batch : (perRank + batch - 1) / batch;
  DTRAIN_CHECK_AS(ConfigError, batchesPerEpoch > 0,
                  "{}: /data/batch_size: {} samples per rank ({} in all over {} rank(s)) make no batch of {}",
                  job_.sourceFile, perRank, train_->size(), worker_.worldSize, batch);
  const int accum = job_.loop.gradAccum;
  const int64_t stepsPerEpoch = (batchesPerEpoch + accum - 1) / accum;
  int64_t totalSteps = stepsPerEpoch * job_.loop.epochs;
  if (job_.loop.maxSteps > 0) totalSteps = std::min(totalSteps, job_.loop.maxSteps);
  double baseLr = job_.optimizer.lr;
  if (job_.parallel.lrScaling == "linear")
    baseLr *= static_cast<double>(worker_.worldSize) / job_.parallel.referenceWorldSize;
  nn::Schedule schedule(job_.schedule, baseLr, totalSteps);
  const int64_t logEvery =
      job_.loop.logEverySteps > 0 ? job_.loop.logEverySteps : std::max<int64_t>(1, stepsPerEpoch / 20);

  if (evalLoad.valid()) {
    eval_ = evalLoad.get();
    checkDataFitsModel(job_, *eval_, *loss_, "/data/eval");
  }
  progress_ = std::make_unique<Progress>(leader, job_.outputDir / "metrics.jsonl", false);
  if (leader) {
    progress_->info(fmt::format("{}: {} parameters, {} training samples, {} rank(s) x batch {}, {} steps{}",
                                job_.name, model_->numParams(), train_->size(), worker_.worldSize, batch, totalSteps,
                                backend_ ? fmt::format(", {} backend", backend_->name()) : ""));
  }

  StepStats stats{.totalSteps = totalSteps, .epochs = job_.loop.epochs, .stepsPerEpoch = stepsPerEpoch};
  const float gradScale = 1.0f / static_cast<float>(accum);
  Clock::time_point firstStep{};
  intervalStart_ = Clock::now();
  int64_t step = 0;
  bool stop = false;
  for (int64_t epoch = 0; epoch < job_.loop.epochs && !stop; ++epoch) {
    sampler.setEpoch(epoch, 0);
    data::BatchLoader loader(*train_, sampler, {.batchSize = batch, .dropLast = job_.data.dropLast,
                                                .prefetch = job_.data.prefetch});
    stats.epoch = epoch;
    int micro = 0;
    int64_t batchIndex = 0;
    for (const data::Batch& b : loader) {
      ++batchIndex;
      bool lastMicro = micro + 1 == accum || batchIndex == batchesPerEpoch;
      nn::TensorView out = model_->forward(b.features, static_cast<int>(b.size), true);
      float l = loss_->forward(out, targetsOf(b, *train_));
      intervalLoss_ += l;
      ++intervalBatches_;
      intervalSamples_ += b.size;
      model_->backward(loss_->backward(gradScale), lastMicro ? sync.hook() : nn::LayerGradReady{},
                       micro == 0 ? nn::GradMode::kOverwrite : nn::GradMode::kAccumulate);
      if (!lastMicro) {
        ++micro;
        continue;
      }
      micro = 0;
      sync.finish();
      if (job_.optimizer.clipGradNorm > 0) nn::clipGradNorm(grads, job_.optimizer.clipGradNorm);
      optimizer->setLr(schedule.lr(step));
      optimizer->step(params, grads);
      if (step == 0) firstStep = Clock::now();
      ++step;
      stats.step = step;
      stats.stepInEpoch = (batchIndex + accum - 1) / accum;
      stats.lr = optimizer->lr();
      result_.samples += b.size * worker_.worldSize;
      if (step % logEvery == 0 || batchIndex == batchesPerEpoch) logInterval(stats, false);
      if (job_.loop.maxSteps > 0 && step >= job_.loop.maxSteps) stop = true;
      if (gStopSignal.load() != 0) {
        result_.stoppedBySignal = gStopSignal.load();
        stop = true;
      }
      if (stop) break;
    }
    logInterval(stats, false);
    if (job_.loop.evalEachEpoch && !result_.stoppedBySignal) evaluate(stats);
  }
  result_.steps = step;
  result_.trainSec = step > 0 ? secondsSince(firstStep) : 0;
  if (leader && !result_.stoppedBySignal) {
    std::filesystem::create_directories(job_.outputDir);
    saveWeights(job_.outputDir / "model.safetensors", *model_);
  }
  result_.wallSec = secondsSince(start_);
  result_.samplesPerSec = result_.wallSec > 0 ? static_cast<double>(result_.samples) / result_.wallSec : 0;
  if (leader) {
    std::string eval;
    if (result_.evalAccuracy) eval = fmt::format(", eval accuracy {:.2f}%", *result_.evalAccuracy * 100);
    else if (result_.evalLoss) eval = fmt::format(", eval loss {:.6f}", *result_.evalLoss);
    progress_->summary(fmt::format("done: {} steps, {} samples in {} ({:.0f} samples/s overall){}; wrote {}", step,
                                   result_.samples, formatDuration(result_.wallSec), result_.samplesPerSec, eval,
                                   (job_.outputDir / "model.safetensors").string()));
  }
  return result_;
}

}  // namespace

TrainResult runTraining(const Job& job, const WorkerInfo& worker) {
  TrainLoop loop(job, worker);
  return loop.run();
}

}  // namespace dtrain::train
