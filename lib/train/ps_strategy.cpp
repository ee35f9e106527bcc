#include "lib/train/ps_strategy.h"

#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
#include <cstring>

#include <fmt/format.h>

#include "lib/comm/tcp/mesh.h"
#include "lib/common/error.h"
#include "lib/common/env.h"
#include "lib/common/log.h"
#include "lib/common/ps_placement.h"
#include "lib/common/worker_metrics.h"
#include "lib/train/fault.h"
#include "lib/train/sparse_tables.h"

namespace dtrain::train {

namespace {

ps::Mode modeOf(const std::string& mode) {
  if (mode == "async") return ps::Mode::kAsync;
  if (mode == "ssp") return ps::Mode::kSsp;
  return ps::Mode::kSync;
}

// resize + memcpy rather than insert(ptr, ptr): GCC 12 warns (stringop-overflow) about insert of a few bytes.
void appendBytes(std::vector<uint8_t>& out, const void* p, size_t n) {
  const size_t at = out.size();
  out.resize(at + n);
  if (n > 0) std::memcpy(out.data() + at, p, n);
}

template <typename T>
void append(std::vector<uint8_t>& out, const T& v) {
  appendBytes(out, &v, sizeof(T));
}

void appendFloats(std::vector<uint8_t>& out, std::span<const float> f) { appendBytes(out, f.data(), f.size_bytes()); }

}  // namespace

PsStrategy::PsStrategy(ProcessGroups groups, PsStrategyOptions options)
    : Strategy(std::move(groups)), options_(std::move(options)) {
  DTRAIN_CHECK(groups_.world != nullptr || groups_.worldSize == 1,
               "parameter-server strategy: needs the workers' process group");
  DTRAIN_CHECK(static_cast<int>(options_.serverAddresses.size()) == options_.settings.servers,
               "parameter-server strategy: {} server addresses for {} servers", options_.serverAddresses.size(),
               options_.settings.servers);
  for (const Fault& f : parseFaults(env::getOr("DTRAIN_FAULT", "")))
    if (f.role == "worker" && f.action == "kill_mid_step" && f.rank == groups_.rank &&
        f.attempt == env::getInt("DTRAIN_RESTART_COUNT", 0))
      killMidStep_ = f.step;
}

PsStrategy::~PsStrategy() = default;

std::string PsStrategy::summary() const {
  std::string mode = options_.settings.mode;
  if (mode == "ssp") mode += fmt::format(" staleness {}", options_.settings.staleness);
  return fmt::format("parameter server: {} server(s), {} worker(s), {}, {} backend among workers",
                     options_.settings.servers, groups_.worldSize, mode, groups_.world ? groups_.world->name() : "no");
}

void PsStrategy::bindOptimizer(nn::Optimizer& optimizer, int64_t startStep) {
  optimizer_ = &optimizer;
  startStep_ = startStep;
}

void PsStrategy::prepare(nn::Model& model) {
  DTRAIN_CHECK(optimizer_ != nullptr, "parameter-server strategy: prepare() before bindOptimizer()");
  model_ = &model;
  client_ = std::make_unique<ps::Client>(ps::ClientOptions{.workerRank = groups_.rank,
                                                           .workers = groups_.worldSize,
                                                           .numParams = model.numParams(),
                                                           .partitionFloats = options_.partitionFloats,
                                                           .servers = options_.serverAddresses,
                                                           .timeout = options_.timeout});
  plan_ = client_->partitions();
  auto params = model.params();
  if (groups_.rank == 0) {
    // Parameters without weight decay (nanoGPT's groups, as the trainer sets them on its own optimizer).
    std::vector<std::pair<size_t, size_t>> noDecay;
    if (optimizer_->spec().decayMatricesOnly)
      for (const auto& e : model.paramTable())
        if (e.shape.rank() < 2) noDecay.emplace_back(e.offset, e.count);
    auto state = optimizer_->stateBuffers();
    for (uint32_t i = 0; i < plan_.size(); ++i) {
      const ps::Partition& p = plan_[i];
      std::vector<uint8_t> payload;
      append(payload, static_cast<uint64_t>(optimizer_->steps()));
      std::vector<std::pair<uint64_t, uint64_t>> ranges;
      for (auto [off, n] : noDecay) {
        const size_t a = std::max(off, p.offset), b = std::min(off + n, p.offset + p.count);
        if (a < b) ranges.emplace_back(a - p.offset, b - a);
      }
      append(payload, static_cast<uint32_t>(ranges.size()));
      for (auto [off, n] : ranges) {
        append(payload, off);
        append(payload, n);
      }
      appendFloats(payload, params.subspan(p.offset, p.count));
      for (const auto& b : state) appendFloats(payload, b.data.subspan(p.offset, p.count));
      client_->init(i, startStep_, payload);
    }
  }
  for (uint32_t i = 0; i < plan_.size(); ++i) client_->pullAsync(i, startStep_, params.data() + plan_[i].offset);
  client_->wait();
  client_->takeStaleness();
  nextPush_ = plan_.size();
  DTRAIN_CHECK(model.sparseTables().size() == options_.sparseTables.size(),
               "parameter-server strategy: the model has {} sparse tables, the options {}", model.sparseTables().size(),
               options_.sparseTables.size());
  if (!options_.sparseTables.empty())
    sparse_ = std::make_unique<PsSparseTables>(options_.sparseTables, *client_, options_.settings.servers,
                                               startStep_);
}

SparseTables* PsStrategy::sparseTables() { return sparse_.get(); }

void PsStrategy::beginStep(int64_t step, double lr) {
  if (sparse_) sparse_->beginStep(step, lr);
  step_ = step;
  lr_ = lr;
  nextPush_ = plan_.size();
  stepSamples_ = 0;
}

void PsStrategy::operator()(int layer) { pushReady(model_->layerParamRange(layer).offset); }

void PsStrategy::pushReady(size_t readyFrom) {
  auto grads = model_->grads();
  auto params = model_->params();
  while (nextPush_ > 0 && plan_[nextPush_ - 1].offset >= readyFrom) {
    const ps::Partition& p = plan_[--nextPush_];
    // async/ssp: every partition carries the step's samples; each server counts a step once it applied all of its
    // partitions of it, and holds one it applied in part as partial: their tallies together are what each worker
    // trained, also one that died in the middle of a step (workerSamples()).
    const int64_t samples = decoupled() ? stepSamples_ : -1;
    client_->pushPullAsync(static_cast<uint32_t>(nextPush_), step_, lr_, grads.data() + p.offset,
                           params.data() + p.offset, samples);
    if (killMidStep_ >= 0 && step_ == killMidStep_ && nextPush_ + 1 == plan_.size()) {
      // DTRAIN_FAULT action=kill_mid_step (fault.h): the step's first push is answered (so applied), the others
      // are never sent.
      client_->wait();
      log::warn("DTRAIN_FAULT: worker {} kill_mid_step in step {}: partition {} of {} pushed and applied",
                groups_.rank, step_ + 1, nextPush_, plan_.size());
      ::raise(SIGKILL);
    }
  }
}

void PsStrategy::finishStep() {
  DTRAIN_CHECK(model_ != nullptr, "parameter-server strategy: finishStep() before prepare()");
  pushReady(0);
  client_->wait();
  ++stepsInInterval_;
}

void PsStrategy::syncForSave() {
  // async/ssp: every worker's pushes up to this point are in (they all call this at the same steps and at the end).
  if (decoupled()) barrier();
  if (groups_.rank != 0 || !client_) return;
  auto params = model_->params();
  auto state = optimizer_->stateBuffers();
  int64_t steps = 0;
  for (uint32_t i = 0; i < plan_.size(); ++i) {
    const ps::Partition& p = plan_[i];
    std::vector<float> got = client_->fetch(i);
    const size_t expected = 2 + (1 + state.size()) * p.count;
    DTRAIN_CHECK_AS(ProtocolError, got.size() == expected,
                    "parameter server {}: fetch of partition {} returned {} floats (expected {})", p.server, i,
                    got.size(), expected);
    std::memcpy(&steps, got.data(), sizeof(steps));
    std::memcpy(params.data() + p.offset, got.data() + 2, p.count * sizeof(float));
    for (size_t b = 0; b < state.size(); ++b)
      std::memcpy(state[b].data.data() + p.offset, got.data() + 2 + (1 + b) * p.count, p.count * sizeof(float));
  }
  optimizer_->setSteps(steps);
}

void PsStrategy::fillStats(StepStats& stats) {
  // Collective over the workers (every rank logs at the same steps).
  const auto t = client_ ? client_->traffic() : ps::ClientTraffic{};
  const double bytes = static_cast<double>(t.bytesSent - loggedTraffic_.bytesSent + t.bytesReceived -
                                           loggedTraffic_.bytesReceived);
  if (stepsInInterval_ > 0) stats.psBytesPerStep = bytes / static_cast<double>(stepsInInterval_);
  loggedTraffic_ = t;
  stepsInInterval_ = 0;
  if (options_.settings.mode == "sync") return;
  // This worker's own pushes (async/ssp do not make the workers meet to log).
  const auto s = client_ ? client_->takeStaleness() : ps::Client::Staleness{};
  if (s.count == 0) return;
  stats.stalenessMin = static_cast<double>(s.min);
  stats.stalenessMax = static_cast<double>(s.max);
  stats.stalenessMean = s.sum / static_cast<double>(s.count);
}

void PsStrategy::finishRun() {
  if (client_) client_->bye();
}

void PsStrategy::reduceMetrics(std::span<double> values, comm::ReduceOp op) {
  if (decoupled()) return;  // async/ssp: worker 0 reports its own figures rather than wait for the others
  if (groups_.world) groups_.world->allreduce(TensorView::flat(values.data(), values.size()), op);
}

int PsStrategy::agreeOnStop(int localSignal) {
  if (!groups_.world || decoupled()) return localSignal;  // every worker gets the launcher's signal itself
  double flag[1] = {static_cast<double>(localSignal)};
  groups_.world->allreduce(TensorView::flat(flag, 1), comm::ReduceOp::kMax);
  return static_cast<int>(flag[0]);
}

void PsStrategy::barrier() {
  // async/ssp: the workers meet through server 0, which counts only the live ones (a dead worker must not stop
  // the others); sync (and before the client exists): the workers' own group.
  if (decoupled() && client_) {
    tallies_ = client_->barrier(++barriers_);
    if (groups_.rank == 0 && options_.settings.servers > 1) {
      // Worker 0 reports what every worker trained: the other servers' tallies too, once the workers server 0 saw
      // leave have left them (a worker killed in the middle of a step may have had its partitions applied on some
      // servers only).
      std::vector<int32_t> gone;
      for (size_t w = 0; w < tallies_.size(); ++w)
        if (tallies_[w].state == ps::WorkerTally::State::kLost || tallies_[w].state == ps::WorkerTally::State::kFinished)
          gone.push_back(static_cast<int32_t>(w));
      auto all = client_->otherTallies(gone);
      all[0] = tallies_;
      tallies_ = ps::mergeTallies(all);
    }
    return;
  }
  if (groups_.world) groups_.world->barrier();
}

std::vector<WorkerSamples> PsStrategy::workerSamples() const {
  std::vector<WorkerSamples> out;
  for (const ps::WorkerTally& t : tallies_) {
    WorkerSamples w{.samples = t.samples,
                    .steps = t.steps,
                    .partitions = t.partitions,
                    .partialPartitions = t.partialPartitions,
                    .partialSamples = t.partialSamples};
    switch (t.state) {
      case ps::WorkerTally::State::kLive: w.state = WorkerSamples::State::kLive; break;
      case ps::WorkerTally::State::kFinished: w.state = WorkerSamples::State::kFinished; break;
      case ps::WorkerTally::State::kLost: w.state = WorkerSamples::State::kLost; break;
      case ps::WorkerTally::State::kAbsent: w.state = WorkerSamples::State::kAbsent; break;
    }
    out.push_back(w);
  }
  return out;
}

CheckpointShard PsStrategy::checkpointShard(const nn::Model& model) const {
  // Worker 0 fetched the servers' state (syncForSave) and writes it all; every worker restores everything, and
  // worker 0's copy becomes the servers' state at the next start.
  const bool writer = groups_.rank == 0;
  return {.loadParams = allParams(model),
          .loadOptimizer = true,
          .saveModel = writer,
          .saveParams = writer ? allParams(model) : std::vector<size_t>{},
          .saveOptimizer = writer,
          .everyRankFile = !decoupled()};
}

std::string describePsPlacement(const Job& job, int world) {
  if (!job.parallel.ps) return "";
  const int servers = job.parallel.ps->servers;
  DTRAIN_CHECK_AS(ConfigError, servers < world,
                  "{}: /parallel/servers: {} server(s) in a world of {} rank(s) (expected servers < world size, so "
                  "that at least one rank trains)",
                  job.sourceFile, servers, world);
  return fmt::format("parameter servers ({} mode): {} of {} ranks serve, ROLE_NAME=server|worker\n{}",
                     job.parallel.ps->mode, servers, world, psPlacement({world}, servers));
}

std::vector<std::string> psServerAddresses(rendezvous::Store& roundStore, int servers,
                                           std::chrono::milliseconds timeout) {
  std::vector<std::string> out;
  const Deadline deadline(timeout);
  for (int s = 0; s < servers; ++s) {
    try {
      out.push_back(roundStore.get(ps::serverKey(s), deadline.remaining()));
    } catch (const TimeoutError&) {
      DTRAIN_THROW(CommError, "parameter server {} never published its address (did it start?)", s);
    }
  }
  return out;
}

void runPsServer(const Job& job, int serverRank, int workers, rendezvous::Store& roundStore, bool singleNode,
                 int attempt, int globalRank) {
  const PsSettings& s = *job.parallel.ps;
  // The agent's monitoring block (--metrics-port): the server reports its requests, bytes, workers and staleness
  // there (role server). One that cannot be mapped turns monitoring off, as on a worker.
  std::unique_ptr<WorkerMetricsMapping> metrics;
  if (const auto path = env::get(kMetricsShmEnv); path && !path->empty()) {
    try {
      metrics = std::make_unique<WorkerMetricsMapping>(WorkerMetricsMapping::open(*path));
    } catch (const std::exception& e) {
      log::warn("monitoring is off for parameter server {} (rank {}): {}", serverRank, globalRank, e.what());
    }
  }
  int64_t killAfter = 0;
  for (const Fault& f : parseFaults(env::getOr("DTRAIN_FAULT", "")))
    if (f.role == "server" && f.rank == serverRank && f.attempt == attempt) killAfter = f.step;
  ps::Server server(ps::ServerOptions{.serverRank = serverRank,
                                      .servers = s.servers,
                                      .workers = workers,
                                      .mode = modeOf(s.mode),
                                      .staleness = s.staleness,
                                      .optimizer = job.optimizer,
                                      .timeout = job.parallel.timeout,
                                      .host = comm::tcp::chooseHost("", singleNode),
                                      .tables = sparseTableOptions(job),
                                      .killAfterPushes = killAfter,
                                      .metrics = metrics ? &metrics->block() : nullptr});
  if (metrics) {
    WorkerMetricsBlock& b = metrics->block();
    constexpr auto r = std::memory_order_relaxed;
    b.role.store(WorkerMetricsBlock::kServer, r);
    b.noLoss.store(1, r);
    b.noSamples.store(1, r);
    b.pid.store(static_cast<int32_t>(::getpid()), r);
    b.residentBytes.store(residentBytes(), r);
    b.updatedUnixSeconds.store(
        std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count(), r);
    b.rank.store(globalRank, std::memory_order_release);  // attached: the agent shows it from now on
  }
  const std::string address = server.listen();
  roundStore.set(ps::serverKey(serverRank), address);
  log::info("parameter server {} of {} listening on {} ({} mode, {} worker(s))", serverRank, s.servers, address,
            s.mode, workers);
  server.serve();
  const ps::ServerStats st = server.stats();
  struct rusage ru {};
  ::getrusage(RUSAGE_SELF, &ru);
  log::info("parameter server {} done: {} pushes, {} updates, {} refused, {:.1f} MB in, {:.1f} MB out, peak RSS {:.1f} "
            "MiB", serverRank, st.pushes, st.updates, st.errors, static_cast<double>(st.bytesIn) / 1e6,
            static_cast<double>(st.bytesOut) / 1e6, static_cast<double>(ru.ru_maxrss) / 1024.0);
}

}  // namespace dtrain::train
