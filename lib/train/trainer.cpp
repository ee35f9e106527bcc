#include "lib/train/trainer.h"

#include <algorithm>

#include "lib/train/train_loop.h"

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

// A dropout layer with a pinned "seed" is keyed from it and (step, micro-batch) alone, so every rank draws the
// same masks and a resumed run the masks of the run it continues (lib/nn/dropout_mask.h DropoutStream).
uint64_t dropoutPosition(int64_t step, int micro) { return dropoutSeed(0, 0, step, micro); }

// Views of a batch's labels in the form the loss expects.
TensorView targetsOf(const data::Batch& b, const data::Dataset& ds) {
  if (b.classLabels) return TensorView::i32(b.classLabels, ds.labelShape().withBatch(b.size));
  return TensorView::f32(b.targets, ds.labelShape().withBatch(b.size));
}
// The same on the batch's device: a GPU batch from BatchLookahead holds device pointers.
TensorView targetsOn(const data::Batch& b, const data::Dataset& ds, Device device) {
  if (device.isCpu()) return targetsOf(b, ds);
  const Shape shape = ds.labelShape().withBatch(b.size);
  return b.classLabels ? TensorView::of(b.classLabels, shape, device) : TensorView::of(b.targets, shape, device);
}

}  // namespace

namespace detail {

std::unique_ptr<BatchStager> TrainLoop::stagerFor(const data::Dataset& ds) {
  if (device_.isCpu()) return nullptr;  // the CPU reads the loader's buffers: no look-ahead
  return std::make_unique<DeviceBatchStager>(staging_, ds, maxBatch_);
}

void TrainLoop::logInterval(StepStats& stats, bool force, bool keepLoss) {
  // Not intervalBatches_: a rank whose interval held only empty batches (its share of an epoch resumed at a larger
  // world ran out) skipped the reduction the others entered, and the ranks' collectives fell out of step (a hang
  // until parallel.timeout, or mismatched calls).
  if (intervalSteps_ == 0 && !force) return;
  // Under pipeline parallelism only the last stage sees the loss: the other stages add nothing.
  double sums[3] = {countsMetrics_ ? intervalLoss_ : 0.0, countsMetrics_ ? static_cast<double>(intervalBatches_) : 0.0,
                    countsMetrics_ ? static_cast<double>(intervalSamples_) : 0.0};
  strategy_->reduceMetrics(sums, comm::ReduceOp::kSum);
  if (!keepLoss) sums[0] += carriedLoss_, sums[1] += static_cast<double>(carriedBatches_);
  double secs = std::max(1e-9, secondsSince(intervalStart_));
  stats.loss = sums[1] > 0 ? sums[0] / sums[1] : 0;
  stats.samplesPerSec = sums[2] / secs;
  stats.elapsedSec = secondsSince(start_);
  stats.trainSec = secondsSince(trainStart_);
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
  if (!keepLoss) {
    intervalLoss_ = carriedLoss_ = 0;
    intervalBatches_ = carriedBatches_ = 0;
  }
  intervalSamples_ = intervalSteps_ = 0;
  intervalStart_ = Clock::now();
}

void TrainLoop::evaluate(const StepStats& stats) {
  if (!eval_) return;
  const auto evalStart = Clock::now();
  // Every sample exactly once: no padding, uneven shards; sums are reduced over the group. A strategy whose ranks
  // do not reduce metrics (async/ssp parameter servers) has data rank 0 evaluate the whole set alone: it reported
  // its own shard, "(1000 samples)" of a 2000-sample set, and a dead worker's shard was never evaluated.
  const ProcessGroups& g = strategy_->groups();
  const bool alone = strategy_->evaluatesAlone();
  if (alone && g.dataRank != 0) return;
  data::DistributedSampler sampler({.datasetSize = eval_->size(), .rank = alone ? 0 : g.dataRank,
                                    .worldSize = alone ? 1 : g.dataSize, .shuffle = false, .pad = false});
  data::BatchLoader loader(*eval_, sampler, {.batchSize = job_.data.batchSize, .prefetch = prefetch_});
  nn::EvalSums sums;
  // On a GPU, batch n+1's copy runs while batch n's forward computes (evaluate() reads its sums back).
  const std::unique_ptr<BatchStager> stager = stagerFor(*eval_);
  BatchLookahead ahead([&loader] { return loader.next(); }, stager.get());
  while (const data::Batch* batch = ahead.next()) {
    const data::Batch& b = *batch;
    if (pipeline_ != nullptr) {
      sums += pipeline_->evalBatch(b.features, targetsOf(b, *eval_), static_cast<int>(b.size));
      continue;
    }
    TensorView out = model_->forward(b.features, static_cast<int>(b.size), false);
    ahead.prefetch();
    sums += loss_->evaluate(out, targetsOn(b, *eval_, device_));
  }
  std::vector<double> v = {sums.lossSum, static_cast<double>(sums.lossCount), static_cast<double>(sums.correct),
                           static_cast<double>(sums.samples)};
  // bce_with_logits: the AUC histograms add up over the ranks (every rank sends them, also without samples).
  if (loss_->hasAuc()) {
    sums.aucHist.resize(2 * nn::kAucBins, 0.0);
    v.insert(v.end(), sums.aucHist.begin(), sums.aucHist.end());
  }
  // The ranks of a tensor group evaluate the same samples (and pipeline stages before the last see no loss): one
  // of them counts, as in logInterval. Counted by every tensor rank, a 1x1x2 run reported "(100 samples)" of 50.
  if (!countsMetrics_) std::fill(v.begin(), v.end(), 0.0);
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

void TrainLoop::saveCheckpoint(int64_t epoch, int64_t position) {
  if (!checkpointer_->enabled()) return;
  const auto t0 = Clock::now();
  strategy_->syncForSave();
  // At an epoch's start (position 0) the next epoch follows this world's padding; mid-epoch, the current one's.
  const int epochWorld = position == 0 ? strategy_->groups().dataSize : epochWorld_;
  // The regular interval's loss so far over the ranks (every rank saves at this step), for a run resumed here.
  double interval[2] = {countsMetrics_ ? intervalLoss_ : 0.0, countsMetrics_ ? static_cast<double>(intervalBatches_) : 0.0};
  strategy_->reduceMetrics(interval, comm::ReduceOp::kSum);
  const IntervalLoss loss{.lossSum = interval[0] + carriedLoss_,
                          .batches = static_cast<int64_t>(interval[1]) + carriedBatches_,
                          .logEvery = logEvery_};
  auto dir = checkpointer_->save(*model_, *optimizer_, step_, epoch, position, epochWorld, loss);
  if (!dir.empty()) result_.checkpoint = dir;  // rank 0 commits, and names it in the summary of a stopped run
  CheckpointEvent saved{.step = step_, .seconds = secondsSince(t0)};
  std::error_code ec;
  for (auto it = std::filesystem::recursive_directory_iterator(dir, ec);
       !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec))
    if (it->is_regular_file(ec)) saved.bytes += it->file_size(ec);
  callbacks_.checkpoint(saved);
  if (timeline::enabled()) timeline::record("checkpoint", "checkpoint", t0, Clock::now(), fmt::format(R"("step":{})", step_));
  if (worker_.rank == 0) log::debug("checkpoint {} committed", dir.string());
  // Saving is not training, as evaluation is not: the progress interval and the run's training time leave it out.
  // A run stopped at max_steps logged its last interval with the save in it (2254 samples/s against 25000 on the
  // main job: a dip at the end of every such curve); a checkpoint every N steps slowed the interval after it.
  const auto spent = Clock::now() - t0;
  intervalStart_ += spent;
  checkpointSecInEpoch_ += std::chrono::duration<double>(spent).count();
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

int64_t TrainLoop::groupSamplesOfBatch(int64_t index, int64_t own) const {
  const int64_t world = strategy_->groups().dataSize;
  if (sampler_->pad() || job_.data.dropLast) return own * world;  // equal shares: every rank's batch is as large
  // Uneven shards (sampler.h): rank r takes rest[r::world], so the first total % world ranks hold one more.
  const int64_t total = sampler_->totalSize(), batch = job_.data.batchSize, at = index * batch;
  int64_t sum = 0;
  for (int64_t r = 0; r < world; ++r) {
    const int64_t share = total / world + (r < total % world ? 1 : 0);
    sum += std::clamp<int64_t>(share - at, 0, batch);
  }
  return sum;
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
  if (numBatches == 0) {
    reportEmptyEpoch(epoch, loader.dropped());
    return;
  }
  // An epoch resumed mid-way counts its steps from where the full epoch (in this world) would be, not from 1.
  const int64_t stepsBefore = std::max<int64_t>(0, stats_.stepsPerEpoch - (numBatches + accum - 1) / accum);
  const float gradScale = 1.0f / static_cast<float>(accum);
  auto params = model_->params();
  auto grads = model_->grads();
  stats_.epoch = epoch;
  Clock::time_point epochStart = Clock::now();
  checkpointSecInEpoch_ = 0;
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
  // The loader's batches, then empty ones for a rank whose uneven share ran out before the group's last step. On a
  // GPU the look-ahead stages batch n+1 once batch n's forward and backward are enqueued (batch_lookahead.h).
  EpochBatches epochBatches(loader, numBatches, sampler_->position(sampler_->numSamplesThisRank()));
  const std::unique_ptr<BatchStager> stager = pipeline_ == nullptr ? stagerFor(*train_) : nullptr;
  BatchLookahead ahead([&epochBatches] { return epochBatches.next(); }, stager.get());
  while (const data::Batch* batch = ahead.next()) {
    const data::Batch& b = *batch;
    ++batchIndex;
    ++intervalSteps_;
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
      if (lastMicro && sparse_ != nullptr) sparse_->flushStep();  // the earlier micro-batches' rows, or none
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
                                   dropoutSeed(job_.loop.seed, dropoutRank(), step_, micro),
                                   dropoutPosition(step_, micro));
    } else {
      if (hasDropout_)
        model_->reseedDropout(dropoutSeed(job_.loop.seed, dropoutRank(), step_, micro), dropoutPosition(step_, micro));
      TensorView out = model_->forward(b.features, static_cast<int>(b.size), true);
      loss = loss_->forward(out, targetsOn(b, *train_, device_));
    }
    lap(event.times.forward, "forward");
    stepLoss += loss;
    event.samples += b.size;
    strategy_->countSamples(b.size);
    intervalLoss_ += loss;
    const bool lossFinite = std::isfinite(loss);
    stepLossFinite_ = (micro == 0 || stepLossFinite_) && lossFinite;
    ++intervalBatches_;
    intervalSamples_ += b.size;
    // Every micro-batch of the step (grad_accum > 1 has several), of every data rank: they all take this step. Not
    // where the ranks run decoupled (async/ssp parameter servers: a worker may have died or be steps behind): then
    // this rank's own, as its progress lines are.
    result_.samples += result_.ownSamples ? b.size : groupSamplesOfBatch(batchIndex - 1, b.size);
    callbacks_.batch(b);
    const nn::LayerGradReady hook = lastMicro ? strategy_->gradReadyHook() : nn::LayerGradReady{};
    // Sparse tables sum the row gradients of a step's micro-batches and push once, with the last.
    if (sparse_ != nullptr) sparse_->setLastMicroBatch(lastMicro);
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
    // GPU: the micro-batch's device work is enqueued; the next batch's copy overlaps it (and the step's all-reduce).
    if (stager) {
      ahead.prefetch();
      lap(event.times.data, "data");
    }
    if (!lastMicro) {
      ++micro;
      continue;
    }
    event.loss = event.samples > 0 ? stepLoss / (micro + 1) : 0;
    event.hasLoss = pipeline_ == nullptr || pipeline_->lastStage();
    micro = 0;
    strategy_->finishStep();
    lap(event.times.commWait, "comm_wait");
    const bool gradsFinite = agreeFinite(grads);
    if (gradsFinite || job_.loop.onNonFinite == LoopSettings::OnNonFinite::kStop) {
      skippedInARow_ = 0;
      if (!gradsFinite)
        diverged(epoch, stepLossFinite_ ? std::string("gradient") : fmt::format("loss on rank {}", worker_.rank));
      optimizer_->setLr(schedule_.lr(step_));
      // local_adam: from the hook's start_step on, what it averaged is Adam's update, not a gradient.
      if (localAdamHook_) optimizer_->setUpdateGiven(localAdamHook_->lastStepCompressed());
      if (!strategy_->updatesParameters()) {  // the parameter server updated params() already
        // (Not an update direction that a compression hook's local Adam computed: that was clipped as gradients.)
        if (job_.optimizer.clipGradNorm > 0 && !optimizer_->updateGiven()) {
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
    if (stop_ && batchIndex != numBatches) {
      ahead.cancel();  // a batch staged ahead frees its slot
      break;
    }
  }
  logInterval(stats_, false);
  result_.trainSec += secondsSince(epochStart) - checkpointSecInEpoch_;  // the epoch-end save comes after
  if (batchIndex == numBatches) {  // the epoch ran to its end
    if (job_.loop.evalEachEpoch && !result_.stoppedBySignal) evaluate(stats_);
    saveCheckpoint(epoch + 1, 0);
  }
  intervalStart_ = Clock::now();  // evaluation time is not training throughput
}

void TrainLoop::reportEmptyEpoch(int64_t epoch, std::span<const int64_t> dropped) {
  // Every rank sees the same numbers (the sampler's shares are a function of the epoch, its start and the world), so
  // every rank gets here and none waits in a collective for the others. PyTorch's DataLoader(drop_last=True) over
  // a share smaller than a batch yields nothing: the epoch takes no step, and this says so instead of moving on.
  const int64_t rest = sampler_->remaining(), most = sampler_->maxSamplesPerRank();
  stats_.epoch = epoch;
  if (worker_.rank == 0)
    log::warn("{}: epoch {}/{}: 0 steps: the rest of the epoch, {} sample(s) over {} rank(s) (at most {} per rank), "
              "makes no batch of {} (data.drop_last drops them, as PyTorch's DataLoader does)",
              job_.sourceFile, epoch + 1, job_.loop.epochs, rest, strategy_->groups().dataSize, most,
              job_.data.batchSize);
  callbacks_.emptyEpoch(epoch, step_, dropped);
  // The epoch ended: as after its last step, the next epoch starts from a checkpoint at its beginning.
  if (job_.loop.evalEachEpoch && !result_.stoppedBySignal) evaluate(stats_);
  saveCheckpoint(epoch + 1, 0);
  intervalStart_ = Clock::now();
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
  // This process's first step is always logged (step 1, or the first after a resume): its wall_time tells how long
  // the start took, and a resumed run with a sparse log_every shows at once that it trains, not log_every steps on.
  // That line is the step's own loss and does not end the regular interval: the lines at multiples of log_every (and
  // at an epoch's end) cover the same steps in a resumed run as in an uninterrupted one (the steps before the
  // checkpoint come with it: IntervalLoss). The line after a resume at step 7 with log_every 5 averaged steps 9-10.
  if (step_ % logEvery_ == 0 || epochEnd) logInterval(stats_, false);
  else if (step_ == stats_.startStep + 1) logInterval(stats_, false, /*keepLoss=*/true);
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
  result_.workerSamples = strategy_->workerSamples();
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
    saveWeights(job_.outputDir / "model.safetensors", *model_);
    // Sparse tables: their holders (the servers) write their rows as model-<k>-of-<S>.safetensors beside it, listed
    // in model.safetensors.index.json (sparse_shards.h); no process holds a whole table.
    if (sparse_ != nullptr) exportSparseModel(*sparse_, *model_, job_.outputDir);
  }
  strategy_->finishRun();
  result_.wallSec = secondsSince(start_);
  result_.samplesPerSec = result_.trainSec > 0 ? static_cast<double>(result_.samples) / result_.trainSec : 0;
  // Peak memory of every rank (the largest is what a user sizes a machine by).
  double peaks[2] = {peakRssMb(), static_cast<double>(nn::peakDeviceBytes()) / (1024.0 * 1024.0)};
  strategy_->reduceMetrics(peaks, comm::ReduceOp::kMax);
  result_.peakRssMb = peaks[0];
  if (job_.device.isCuda()) result_.peakGpuMb = peaks[1];
  callbacks_.finish(stats_, result_);
  timeline::flush();
}

TrainResult TrainLoop::run() {
  installStopHandlers();
  setUp();
  intervalStart_ = trainStart_ = Clock::now();
  const int64_t startEpoch = resumed_ ? resumed_->epoch : 0;
  stop_ = job_.loop.maxSteps > 0 && step_ >= job_.loop.maxSteps;
  // A finished run started again resumes at its end: say so, instead of a summary of 0 samples at 0 samples/s.
  // (Past it when the limit was lowered since: "at step 938, the end of this run (train.max_steps 500)" contradicted
  // itself.)
  if (resumed_ && (stop_ || startEpoch >= job_.loop.epochs)) {
    const bool past = stop_ ? step_ > job_.loop.maxSteps
                            : startEpoch > job_.loop.epochs || resumed_->samplesConsumed > 0;
    progress_->info(fmt::format("nothing left to train: {} is at step {}, {} of this run ({}); raise it to "
                                "train on, or give a new run its own --output-dir",
                                resumed_->path.string(), step_, past ? "past the end" : "the end",
                                stop_ ? fmt::format("train.max_steps {}", job_.loop.maxSteps)
                                      : fmt::format("train.epochs {}", job_.loop.epochs)));
  }
  for (int64_t epoch = startEpoch; epoch < job_.loop.epochs && !stop_; ++epoch)
    trainEpoch(epoch, epoch == startEpoch && resumed_ ? resumed_->samplesConsumed : 0);
  finish();
  return result_;
}

}  // namespace detail

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
                  worker.restartCount, worker.rank);
      return TrainResult{};
    }
    const WorkerInfo view = workerView(worker, servers);
    detail::TrainLoop loop(job, view, std::move(callbacks), servers);
    return loop.run();
  }
  if (job.parallel.ps && worker.rank == 0) {
    // This process holds the sparse tables the servers would have held: refused before they are allocated.
    checkOneProcessFitsMemory(job, readMachineMemory());
    const int64_t tables = psServerBytes(job, 1);
    log::info("{}: parameter-server job in a world of 1 rank: training alone, without servers{}", job.sourceFile,
              tables > 0 ? fmt::format(" (this process holds the sparse tables: {} with the optimizer's state)",
                                       humanBytes(tables))
                         : "");
  }
  detail::TrainLoop loop(job, worker, std::move(callbacks));
  return loop.run();
}

}  // namespace dtrain::train
