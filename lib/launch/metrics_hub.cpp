#include "lib/launch/metrics_hub.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "lib/common/error.h"
#include "rendezvous/tcp_store_server.h"

namespace dtrain::launch {

namespace {

constexpr auto kRelaxed = std::memory_order_relaxed;

// comm::Operation::Kind's names, in its order (lib/comm/backend.h; launch does not link comm).
constexpr const char* kCollectiveNames[WorkerMetricsBlock::kCollectiveKinds] = {
    "none", "allreduce", "broadcast", "allgather", "reduce_scatter", "send", "recv", "barrier"};

std::string formatValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (v == std::floor(v) && std::fabs(v) < 1e15) return fmt::format("{}", static_cast<int64_t>(v));
  return fmt::format("{}", v);
}

constexpr const char* kMetricsDirPrefix = "dtrain-metrics-";
constexpr const char* kOwnerLock = "owner.lock";

std::string shmBase() {
  if (std::filesystem::is_directory("/dev/shm") && ::access("/dev/shm", W_OK) == 0) return "/dev/shm";
  const char* tmp = std::getenv("TMPDIR");
  return tmp && *tmp ? tmp : "/tmp";
}

}  // namespace

std::string escapeLabelValue(const std::string& value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

void PromText::family(const std::string& name, const char* type, const std::string& help) {
  out_ += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
}

void PromText::sample(const std::string& name, const Labels& labels, double value) {
  out_ += name;
  if (!labels.empty()) {
    out_ += '{';
    for (size_t i = 0; i < labels.size(); ++i) {
      if (i) out_ += ',';
      out_ += fmt::format("{}=\"{}\"", labels[i].first, escapeLabelValue(labels[i].second));
    }
    out_ += '}';
  }
  out_ += ' ';
  out_ += formatValue(value);
  out_ += '\n';
}

size_t removeStaleMetricsDirs(const std::string& base) {
  DIR* d = ::opendir(base.c_str());
  if (d == nullptr) return 0;
  const std::string prefix = kMetricsDirPrefix;
  size_t removed = 0;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.rfind(prefix, 0) != 0) continue;
    const std::string dir = base + "/" + name;
    struct stat st {};
    if (::lstat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != ::geteuid()) continue;
    const int fd = ::open((dir + "/" + kOwnerLock).c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) continue;  // no lock published (yet): see the header
    // Held by a live hub: EWOULDBLOCK. Taken here: its owner is gone, and no hub ever locks it again.
    if (::flock(fd, LOCK_EX | LOCK_NB) == 0) {
      std::error_code ec;
      if (std::filesystem::remove_all(dir, ec) > 0 && !ec) ++removed;
    }
    ::close(fd);
  }
  ::closedir(d);
  return removed;
}

MetricsHub::MetricsHub(std::string job, std::string runId) : job_(std::move(job)), runId_(std::move(runId)) {
  const std::string base = shmBase();
  removeStaleMetricsDirs(base);
  std::string templ = base + "/" + kMetricsDirPrefix + "XXXXXX";
  DTRAIN_CHECK(::mkdtemp(templ.data()) != nullptr, "--metrics-port: cannot create a directory like {}: {}", templ,
               std::strerror(errno));
  dir_ = templ;
  // Locked under a private name, then renamed: `owner.lock` is never seen unlocked while this hub lives.
  const std::string pending = dir_ + "/owner.lock.pending";
  lockFd_ = ::open(pending.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  const int err = errno;
  if (lockFd_ < 0 || ::flock(lockFd_, LOCK_EX | LOCK_NB) != 0 ||
      ::rename(pending.c_str(), (dir_ + "/" + kOwnerLock).c_str()) != 0) {
    const int e = lockFd_ < 0 ? err : errno;
    if (lockFd_ >= 0) ::close(lockFd_);
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
    DTRAIN_THROW(Error, "--metrics-port: cannot create and lock {}/{}: {}", dir_, kOwnerLock, std::strerror(e));
  }
}

MetricsHub::~MetricsHub() {
  std::lock_guard lock(mu_);
  slots_.clear();
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
  ::close(lockFd_);  // after the removal: a sweep that takes the lock finds nothing left to remove
}

std::string MetricsHub::prepareSlot(int localRank) {
  std::string path = fmt::format("{}/local_rank_{}", dir_, localRank);
  std::lock_guard lock(mu_);
  while (static_cast<int>(slots_.size()) <= localRank)
    slots_.push_back(WorkerMetricsMapping::create(fmt::format("{}/local_rank_{}", dir_, slots_.size())));
  slots_[static_cast<size_t>(localRank)].reset();
  return path;
}

void MetricsHub::setRound(int round, int restartCount, int nodeRank, int numNodes, int worldSize) {
  std::lock_guard lock(mu_);
  state_.round = round;
  state_.restartCount = restartCount;
  state_.nodeRank = nodeRank;
  state_.numNodes = numNodes;
  state_.worldSize = worldSize;
  state_.heartbeatAges.clear();
}

void MetricsHub::workerStarted() {
  std::lock_guard lock(mu_);
  ++state_.running;
}

void MetricsHub::workerExited(int exitCode, int localRank) {
  std::lock_guard lock(mu_);
  --state_.running;
  ++state_.exitsByCode[exitCode];
  if (localRank >= 0 && localRank < static_cast<int>(slots_.size())) {
    // The worker is gone, so nothing else writes its block now.
    WorkerMetricsBlock& b = slots_[static_cast<size_t>(localRank)].block();
    b.samplesPerSecond.store(0, kRelaxed);
    b.server.requestsPerSecond.store(0, kRelaxed);
  }
}

MetricsHub::AgentState MetricsHub::agentState() const {
  std::lock_guard lock(mu_);
  return state_;
}

void MetricsHub::noteEvent(std::string text) {
  const double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  std::lock_guard lock(mu_);
  state_.events.emplace_back(now, std::move(text));
  if (state_.events.size() > kMaxEvents) state_.events.erase(state_.events.begin());
}

std::vector<const WorkerMetricsBlock*> MetricsHub::stampedBlocks() const {
  std::vector<const WorkerMetricsBlock*> blocks;
  std::lock_guard lock(mu_);
  for (const auto& m : slots_)
    if (m.block().magic.load(std::memory_order_acquire) == WorkerMetricsBlock::kMagic) blocks.push_back(&m.block());
  return blocks;
}

std::vector<MetricsHub::RankState> MetricsHub::rankStates() const {
  std::vector<RankState> out;
  for (const WorkerMetricsBlock* b : stampedBlocks()) {
    RankState r;
    r.rank = b->rank.load(kRelaxed);
    if (r.rank < 0 || b->role.load(kRelaxed) == WorkerMetricsBlock::kServer) continue;  // servers: serverStates()
    r.step = b->step.load(kRelaxed);
    r.epoch = b->epoch.load(kRelaxed);
    r.loss = b->loss.load(kRelaxed);
    r.hasLoss = b->noLoss.load(kRelaxed) == 0;
    r.learningRate = b->learningRate.load(kRelaxed);
    r.samplesPerSecond = b->samplesPerSecond.load(kRelaxed);
    r.hasSamples = b->noSamples.load(kRelaxed) == 0;
    r.updatedUnixSeconds = b->updatedUnixSeconds.load(kRelaxed);
    out.push_back(r);
  }
  return out;
}

std::vector<MetricsHub::ServerState> MetricsHub::serverStates() const {
  std::vector<ServerState> out;
  for (const WorkerMetricsBlock* b : stampedBlocks()) {
    ServerState s;
    s.rank = b->rank.load(kRelaxed);
    if (s.rank < 0 || b->role.load(kRelaxed) != WorkerMetricsBlock::kServer) continue;
    const PsServerMetrics& m = b->server;
    s.server = m.serverRank.load(kRelaxed);
    for (int op = 1; op < PsServerMetrics::kOps; ++op)
      if (const uint64_t n = m.requestsTotal[op].load(kRelaxed); n > 0) s.requestsByOp[psOpLabel(op)] += n;
    s.errors = m.errorsTotal.load(kRelaxed);
    s.updates = m.updatesTotal.load(kRelaxed);
    s.receivedBytes = m.receivedBytesTotal.load(kRelaxed);
    s.sentBytes = m.sentBytesTotal.load(kRelaxed);
    s.requestsPerSecond = m.requestsPerSecond.load(kRelaxed);
    s.workers = m.workers.load(kRelaxed);
    s.workersLive = m.workersLive.load(kRelaxed);
    s.workersLost = m.workersLost.load(kRelaxed);
    s.stalenessMax = m.stalenessMax.load(kRelaxed);
    s.stalenessSum = m.stalenessSum.load(kRelaxed);
    for (int k = 0; k < PsServerMetrics::kStalenessBuckets; ++k)
      s.stalenessBuckets.push_back(m.stalenessBucket[k].load(kRelaxed));
    out.push_back(std::move(s));
  }
  return out;
}

void MetricsHub::setHeartbeatAges(std::vector<double> secondsByNode) {
  std::lock_guard lock(mu_);
  state_.heartbeatAges = std::move(secondsByNode);
}

std::string MetricsHub::render() const {
  AgentState s;
  std::vector<const WorkerMetricsBlock*> blocks;
  {
    std::lock_guard lock(mu_);
    s = state_;
    for (const auto& m : slots_) blocks.push_back(&m.block());
  }
  PromText out;
  const std::string node = std::to_string(s.nodeRank);
  const PromText::Labels agent = {{"job", job_}, {"run_id", runId_}, {"node", node}};
  auto one = [&](const std::string& name, const char* type, const std::string& help, double v) {
    out.family(name, type, help);
    out.sample(name, agent, v);
  };
  one("dtrain_round", "gauge", "Rendezvous round this agent's workers run in (-1 before the first).", s.round);
  one("dtrain_rounds_total", "counter", "Rendezvous rounds the run has formed (restarts and re-forms included).",
      s.round + 1);
  one("dtrain_restarts_total", "counter", "Restarts of the worker group after failures (--max-restarts counts these).",
      s.restartCount);
  one("dtrain_nodes", "gauge", "Nodes in the current round.", s.numNodes);
  one("dtrain_world_size", "gauge", "Worker ranks in the current round.", s.worldSize);
  one("dtrain_workers_running", "gauge", "Local worker processes running now.", s.running);
  out.family("dtrain_worker_exits_total", "counter", "Local worker exits by exit code (128+N: killed by signal N).");
  for (const auto& [code, n] : s.exitsByCode) {
    auto l = agent;
    l.emplace_back("code", std::to_string(code));
    out.sample("dtrain_worker_exits_total", l, static_cast<double>(n));
  }
  out.family("dtrain_heartbeat_age_seconds", "gauge",
             "Seconds since each other node's heartbeat last changed, as this agent saw it (multi-node rounds).");
  for (size_t n = 0; n < s.heartbeatAges.size(); ++n) {
    if (s.heartbeatAges[n] < 0) continue;
    auto l = agent;
    l.emplace_back("peer_node", std::to_string(n));
    out.sample("dtrain_heartbeat_age_seconds", l, s.heartbeatAges[n]);
  }
  renderWorkers(out, blocks, s.nodeRank);
  renderServers(out, blocks, s.nodeRank);
  return out.take();
}

void MetricsHub::renderServers(PromText& out, const std::vector<const WorkerMetricsBlock*>& all, int nodeRank) const {
  std::vector<const WorkerMetricsBlock*> blocks;
  std::vector<PromText::Labels> labels;
  for (const auto* b : all) {
    const int rank = b->rank.load(kRelaxed);
    if (rank < 0 || b->role.load(kRelaxed) != WorkerMetricsBlock::kServer) continue;
    blocks.push_back(b);
    labels.push_back({{"job", job_}, {"run_id", runId_}, {"node", std::to_string(nodeRank)},
                      {"rank", std::to_string(rank)}, {"role", "server"},
                      {"server", std::to_string(b->server.serverRank.load(kRelaxed))}});
  }
  if (blocks.empty()) return;  // no parameter server on this node: no empty families
  auto each = [&](const std::string& name, const char* type, const std::string& help, auto value) {
    out.family(name, type, help);
    for (size_t i = 0; i < blocks.size(); ++i)
      out.sample(name, labels[i], static_cast<double>(value(blocks[i]->server)));
  };
  out.family("dtrain_ps_server_requests_total", "counter",
             "Requests a parameter server received, by op (push: push-pull with or without a sample count).");
  for (size_t i = 0; i < blocks.size(); ++i) {
    std::map<std::string, uint64_t> byLabel;  // ops that share a label (push) are summed
    for (int op = 1; op < PsServerMetrics::kOps; ++op)
      if (const uint64_t n = blocks[i]->server.requestsTotal[op].load(kRelaxed); n > 0) byLabel[psOpLabel(op)] += n;
    for (const auto& [op, n] : byLabel) {
      auto l = labels[i];
      l.emplace_back("op", op);
      out.sample("dtrain_ps_server_requests_total", l, static_cast<double>(n));
    }
  }
  each("dtrain_ps_server_errors_total", "counter", "Requests a parameter server answered with an error.",
       [](const PsServerMetrics& m) { return m.errorsTotal.load(kRelaxed); });
  each("dtrain_ps_server_updates_total", "counter",
       "Optimizer steps a parameter server applied (over its partitions and sparse tables).",
       [](const PsServerMetrics& m) { return m.updatesTotal.load(kRelaxed); });
  each("dtrain_ps_server_received_bytes_total", "counter",
       "Bytes a parameter server received from the workers (request headers and payloads).",
       [](const PsServerMetrics& m) { return m.receivedBytesTotal.load(kRelaxed); });
  each("dtrain_ps_server_sent_bytes_total", "counter",
       "Bytes a parameter server sent to the workers (reply headers and payloads).",
       [](const PsServerMetrics& m) { return m.sentBytesTotal.load(kRelaxed); });
  each("dtrain_ps_server_requests_per_second", "gauge", "Requests a parameter server received per second, over "
       "about the last second of requests.", [](const PsServerMetrics& m) { return m.requestsPerSecond.load(kRelaxed); });
  each("dtrain_ps_workers_live", "gauge", "Workers connected to this parameter server and not done.",
       [](const PsServerMetrics& m) { return m.workersLive.load(kRelaxed); });
  each("dtrain_ps_workers_lost", "gauge",
       "Workers that left this parameter server without saying bye (async/ssp training goes on without them).",
       [](const PsServerMetrics& m) { return m.workersLost.load(kRelaxed); });
  each("dtrain_ps_staleness_max", "gauge",
       "Largest staleness of a push a parameter server answered: steps the worker was ahead of the slowest live "
       "worker (async/ssp; 0 in sync).", [](const PsServerMetrics& m) { return m.stalenessMax.load(kRelaxed); });
  out.family("dtrain_ps_staleness", "histogram",
             "Staleness of the pushes a parameter server answered (async/ssp): steps the worker was ahead of the "
             "slowest live worker.");
  for (size_t i = 0; i < blocks.size(); ++i) {
    const PsServerMetrics& m = blocks[i]->server;
    uint64_t cumulative = 0;
    for (int k = 0; k < PsServerMetrics::kStalenessBuckets; ++k) {
      cumulative += m.stalenessBucket[k].load(kRelaxed);
      auto l = labels[i];
      l.emplace_back("le", k + 1 < PsServerMetrics::kStalenessBuckets
                               ? std::to_string(PsServerMetrics::kStalenessBounds[k])
                               : std::string("+Inf"));
      out.sample("dtrain_ps_staleness_bucket", l, static_cast<double>(cumulative));
    }
    // The count is the buckets' total (read once), so the exposition stays consistent while the server writes.
    out.sample("dtrain_ps_staleness_sum", labels[i], m.stalenessSum.load(kRelaxed));
    out.sample("dtrain_ps_staleness_count", labels[i], static_cast<double>(cumulative));
  }
}

void MetricsHub::renderWorkers(PromText& out, const std::vector<const WorkerMetricsBlock*>& all, int nodeRank) const {
  std::vector<const WorkerMetricsBlock*> blocks;
  std::vector<PromText::Labels> labels;
  for (const auto* b : all) {
    int rank = b->rank.load(kRelaxed);
    if (rank < 0) continue;  // no worker attached yet
    if (b->role.load(kRelaxed) == WorkerMetricsBlock::kServer) continue;  // renderServers
    blocks.push_back(b);
    labels.push_back({{"job", job_}, {"run_id", runId_}, {"node", std::to_string(nodeRank)}, {"rank", std::to_string(rank)}});
  }
  auto each = [&](const std::string& name, const char* type, const std::string& help, auto value) {
    out.family(name, type, help);
    for (size_t i = 0; i < blocks.size(); ++i) out.sample(name, labels[i], static_cast<double>(value(*blocks[i])));
  };
  each("dtrain_step", "gauge", "Optimizer steps done (a resumed run counts from its checkpoint).",
       [](const auto& b) { return b.step.load(kRelaxed); });
  each("dtrain_epoch", "gauge", "Current epoch, 0-based.", [](const auto& b) { return b.epoch.load(kRelaxed); });
  // The ranks a value means nothing on get no sample (rather than a 0 that reads as a value).
  auto shown = [&](const std::string& name, const char* type, const std::string& help, auto hidden, auto value) {
    out.family(name, type, help);
    for (size_t i = 0; i < blocks.size(); ++i)
      if (hidden(*blocks[i]) == 0) out.sample(name, labels[i], static_cast<double>(value(*blocks[i])));
  };
  // A pipeline stage before the last computes no loss (a 0 read as a perfect loss).
  shown("dtrain_loss", "gauge", "Training loss of this rank's last step (mean over its micro-batches).",
        [](const auto& b) { return b.noLoss.load(kRelaxed); }, [](const auto& b) { return b.loss.load(kRelaxed); });
  each("dtrain_learning_rate", "gauge", "Learning rate of the last update.",
       [](const auto& b) { return b.learningRate.load(kRelaxed); });
  // Under model parallelism one rank per data replica counts its samples (noSamples): a sum over ranks is then the
  // job's throughput, as under data parallelism.
  auto noSamples = [](const auto& b) { return b.noSamples.load(kRelaxed); };
  shown("dtrain_samples_per_second", "gauge",
        "Training samples per second of this rank's data replica over the last second (on one rank per replica).",
        noSamples, [](const auto& b) { return b.samplesPerSecond.load(kRelaxed); });
  shown("dtrain_samples_total", "counter",
        "Training samples this rank's process consumed (on one rank per data replica: stage 0, tensor rank 0).",
        noSamples, [](const auto& b) { return b.samplesTotal.load(kRelaxed); });
  each("dtrain_steps_total", "counter", "Optimizer steps this rank's process ran.",
       [](const auto& b) { return b.stepsTotal.load(kRelaxed); });
  out.family("dtrain_step_phase_seconds_total", "counter",
             "Time of the optimizer steps by phase: data (loader wait), forward, backward, comm_wait (gradient "
             "communication not hidden by the backward), optimizer.");
  for (size_t i = 0; i < blocks.size(); ++i)
    for (int p = 0; p < static_cast<int>(StepPhase::kCount); ++p) {
      auto l = labels[i];
      l.emplace_back("phase", stepPhaseName(static_cast<StepPhase>(p)));
      out.sample("dtrain_step_phase_seconds_total", l, blocks[i]->phaseSecondsTotal[p].load(kRelaxed));
    }
  auto perCollective = [&](const std::string& name, const std::string& help, auto value) {
    out.family(name, "counter", help);
    for (size_t i = 0; i < blocks.size(); ++i)
      for (int k = 1; k < WorkerMetricsBlock::kCollectiveKinds; ++k) {
        if (blocks[i]->collectiveCallsTotal[k].load(kRelaxed) == 0) continue;
        auto l = labels[i];
        l.emplace_back("op", kCollectiveNames[k]);
        out.sample(name, l, static_cast<double>(value(*blocks[i], k)));
      }
  };
  perCollective("dtrain_collective_calls_total", "Collective operations this rank ran, by operation.",
                [](const auto& b, int k) { return b.collectiveCallsTotal[k].load(kRelaxed); });
  perCollective("dtrain_collective_bytes_total",
                "Payload bytes this rank handed to collectives (the buffer's size, not the bytes on the wire).",
                [](const auto& b, int k) { return b.collectiveBytesTotal[k].load(kRelaxed); });
  perCollective("dtrain_collective_seconds_total", "Time inside collective operations, waiting for peers included.",
                [](const auto& b, int k) { return b.collectiveSecondsTotal[k].load(kRelaxed); });
  each("dtrain_checkpoints_total", "counter", "Checkpoints this rank's process took part in.",
       [](const auto& b) { return b.checkpointsTotal.load(kRelaxed); });
  each("dtrain_checkpoint_seconds_total", "counter", "Time this rank spent saving checkpoints.",
       [](const auto& b) { return b.checkpointSecondsTotal.load(kRelaxed); });
  each("dtrain_checkpoint_size_bytes", "gauge", "Size on disk of the last checkpoint (reported by rank 0, which commits it; 0 elsewhere).",
       [](const auto& b) { return b.checkpointSizeBytes.load(kRelaxed); });
  each("dtrain_resident_memory_bytes", "gauge", "Resident set size of the worker process.",
       [](const auto& b) { return b.residentBytes.load(kRelaxed); });
  each("dtrain_worker_last_update_timestamp_seconds", "gauge",
       "Unix time of the worker's last report (a frozen worker stops moving it).",
       [](const auto& b) { return b.updatedUnixSeconds.load(kRelaxed); });
}

std::vector<RankFlight> MetricsHub::flightRecords() const {
  std::vector<const WorkerMetricsBlock*> blocks;
  int node = 0;
  {
    std::lock_guard lock(mu_);
    node = state_.nodeRank;
    for (const auto& m : slots_) blocks.push_back(&m.block());
  }
  std::vector<RankFlight> out;
  // Parameter servers run no collectives: a record of 0 calls would read as a rank that is behind.
  for (const auto* b : blocks)
    if (b->rank.load(kRelaxed) >= 0 && b->role.load(kRelaxed) != WorkerMetricsBlock::kServer)
      out.push_back(readFlight(*b, node));
  return out;
}

std::string renderStoreMetrics(const rendezvous::TcpStoreServerStats& st) {
  PromText out;
  auto one = [&](const char* name, const char* type, const char* help, uint64_t v) {
    out.family(name, type, help);
    out.sample(name, {}, static_cast<double>(v));
  };
  one("dtrain_store_connections_accepted_total", "counter", "Client connections accepted.", st.connectionsAccepted);
  one("dtrain_store_connections_open", "gauge", "Client connections open now.", st.connectionsOpen);
  one("dtrain_store_connections_refused_total", "counter", "Connections closed at once: over --max-connections.",
      st.connectionsRefused);
  one("dtrain_store_connections_timed_out_total", "counter", "Connections closed by the handshake or idle timeout.",
      st.connectionsTimedOut);
  one("dtrain_store_requests_total", "counter", "Requests served.", st.requests);
  one("dtrain_store_protocol_errors_total", "counter", "Connections closed for a malformed frame or handshake.",
      st.protocolErrors);
  one("dtrain_store_auth_failures_total", "counter", "Connections closed for a wrong or missing token.",
      st.authFailures);
  one("dtrain_store_waiters", "gauge", "GET/WAIT requests parked now.", st.waiters);
  one("dtrain_store_buffered_bytes", "gauge", "Input buffers and queued replies of all connections.",
      st.bufferedBytes);
  one("dtrain_store_keys", "gauge", "Keys stored.", st.keys);
  one("dtrain_store_stored_bytes", "gauge", "Bytes of keys and values stored (as the quota counts them).",
      st.storedBytes);
  return out.take();
}

}  // namespace dtrain::launch
