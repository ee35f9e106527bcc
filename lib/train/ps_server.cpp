#include "lib/train/ps_server.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <csignal>
#include <cstring>
#include <limits>
#include <map>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "lib/comm/tcp/mesh.h"
#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/ckpt/checkpoint.h"
#include "lib/train/ps_server_state.h"
#include "lib/train/sparse_shards.h"

namespace dtrain::train::ps {

const char* modeName(Mode mode) {
  switch (mode) {
    case Mode::kSync: return "sync";
    case Mode::kAsync: return "async";
    case Mode::kSsp: return "ssp";
  }
  return "?";
}
using detail::Reader;

Server::Server(ServerOptions options) : options_(std::move(options)) {
  DTRAIN_CHECK(options_.workers >= 1 && options_.servers >= 1 && options_.serverRank < options_.servers,
               "ps server: workers {} servers {} rank {}", options_.workers, options_.servers, options_.serverRank);
  if (WorkerMetricsBlock* m = options_.metrics) {
    m->server.serverRank.store(options_.serverRank, std::memory_order_relaxed);
    m->server.workers.store(options_.workers, std::memory_order_relaxed);
  }
  clock_.assign(static_cast<size_t>(options_.workers), 0);
  barrier_.assign(static_cast<size_t>(options_.workers), 0);
  live_.assign(static_cast<size_t>(options_.workers), 0);
  seen_.assign(static_cast<size_t>(options_.workers), 0);
  lost_.assign(static_cast<size_t>(options_.workers), 0);
  tally_.assign(static_cast<size_t>(options_.workers), WorkerTally{});
  current_.assign(static_cast<size_t>(options_.workers), StepInProgress{});
  for (const SparseTableOptions& t : options_.tables) {
    auto state = std::make_unique<TableState>();
    const RowRange range = planRowRanges(t.rows, options_.servers)[static_cast<size_t>(options_.serverRank)];
    state->shard = std::make_unique<SparseShard>(range, t.dim, t.optimizer, t.initStd, t.seed);
    state->pushed.assign(static_cast<size_t>(options_.workers), 0);
    tables_.push_back(std::move(state));
  }
}

Server::~Server() {
  stop();
  for (auto& t : threads_)
    if (t.joinable()) t.join();
}

std::string Server::listen() {
  try {
    listener_ = net::listen(options_.host, 0, {.backlog = 1024, .reuseAddress = false});
  } catch (const net::ListenError& e) {
    // Port 0 is never in use: the address is not this machine's. The README's code for that is 5.
    throw Error(fmt::format("parameter server {}: cannot listen on {}{}: {}; expected an address of this machine",
                            options_.serverRank, options_.host, comm::tcp::hostOrigin(options_.host), e.reason()),
                ExitCode::kAddressInUse);
  }
  address_ = net::HostPort{options_.host, listener_.port}.str();
  return address_;
}

void Server::stop() {
  stopping_ = true;
  cv_.notify_all();
}

ServerStats Server::stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

void Server::serve() {
  DTRAIN_CHECK(listener_.socket.valid(), "ps server: serve() before listen()");
  std::vector<std::unique_ptr<Conn>> conns;
  const Deadline firstContact(options_.timeout);
  while (!stopping_) {
    {
      std::lock_guard lock(mu_);
      if (done_ >= options_.workers) break;
    }
    if (conns.empty() && firstContact.expired())
      DTRAIN_THROW(CommError, "parameter server {}: no worker connected within {} ms", options_.serverRank,
                   options_.timeout.count());
    pollfd pfd{listener_.socket.fd(), POLLIN, 0};
    int n = ::poll(&pfd, 1, 100);
    if (n <= 0) continue;
    int fd = ::accept4(listener_.socket.fd(), nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    auto conn = std::make_unique<Conn>();
    conn->socket = net::Socket(fd);
    Conn* c = conn.get();
    conns.push_back(std::move(conn));
    threads_.emplace_back([this, c] { handle(*c); });
  }
  // Every worker is done: unblock connections that are still open (a worker that said bye closes its own).
  for (auto& c : conns) ::shutdown(c->socket.fd(), SHUT_RDWR);
  for (auto& t : threads_)
    if (t.joinable()) t.join();
  threads_.clear();
}

void Server::handle(Conn& conn) {
  uint8_t header[kHeaderBytes];
  try {
    for (;;) {
      // Between requests a worker may be evaluating or checkpointing for a long time: no deadline but the
      // connection itself (a dead worker's socket closes; serve() shuts the rest down at the end).
      recvBytes(conn.socket.fd(), header, kHeaderBytes, Deadline(std::chrono::hours(24 * 365)), conn.peer);
      const RequestHeader h = decodeRequest(header);
      if (WorkerMetricsBlock* m = options_.metrics) {
        constexpr auto r = std::memory_order_relaxed;
        m->server.requestsTotal[static_cast<size_t>(h.op) % PsServerMetrics::kOps].fetch_add(1, r);
        m->server.receivedBytesTotal.fetch_add(kHeaderBytes + h.bytes, r);
      }
      dispatch(conn, h);
      std::lock_guard lock(mu_);
      publishLocked(true);
    }
  } catch (const Error& e) {
    if (!conn.bye && !stopping_) log::debug("parameter server {}: closing the connection of {}: {}",
                                            options_.serverRank, conn.peer, e.what());
  }
  if (conn.worker >= 0) workerGone(conn.worker, conn.bye);
}

void Server::workerGone(int worker, bool bye) {
  std::lock_guard lock(mu_);
  auto w = static_cast<size_t>(worker);
  if (!live_[w]) return;
  live_[w] = 0;
  lost_[w] = bye ? 0 : 1;
  ++done_;
  if (!bye && options_.mode == Mode::kSync && syncBroken_.empty())
    syncBroken_ = fmt::format("worker {} left (sync mode needs every worker's gradient; the group re-forms)", worker);
  if (!bye && options_.mode != Mode::kSync)
    log::warn("parameter server {}: worker {} left; training goes on with the others ({} mode)", options_.serverRank,
              worker, modeName(options_.mode));
  publishLocked(false);
  cv_.notify_all();
}

void Server::publishLocked(bool request) {
  WorkerMetricsBlock* m = options_.metrics;
  if (m == nullptr) return;
  constexpr auto r = std::memory_order_relaxed;
  PsServerMetrics& sv = m->server;
  int live = 0, lost = 0;
  for (size_t w = 0; w < live_.size(); ++w) {
    live += live_[w] ? 1 : 0;
    lost += lost_[w] ? 1 : 0;
  }
  sv.workersLive.store(live, r);
  sv.workersLost.store(lost, r);
  sv.updatesTotal.store(static_cast<uint64_t>(stats_.updates), r);
  sv.errorsTotal.store(static_cast<uint64_t>(stats_.errors), r);
  const auto now = std::chrono::steady_clock::now();
  if (request) ++rateRequests_;
  const double window = std::chrono::duration<double>(now - rateStart_).count();
  if (window >= 1.0) {
    sv.requestsPerSecond.store(static_cast<double>(rateRequests_) / window, r);
    rateRequests_ = 0;
    rateStart_ = now;
  }
  if (now - rssAt_ >= std::chrono::seconds(1)) {
    m->residentBytes.store(residentBytes(), r);
    rssAt_ = now;
  }
  m->updatedUnixSeconds.store(
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count(), r);
}

void Server::noteStalenessLocked(int64_t staleness) {
  WorkerMetricsBlock* m = options_.metrics;
  if (m == nullptr) return;
  constexpr auto r = std::memory_order_relaxed;
  PsServerMetrics& sv = m->server;
  sv.stalenessBucket[stalenessBucket(staleness)].fetch_add(1, r);
  sv.stalenessCount.fetch_add(1, r);
  sv.stalenessSum.store(sv.stalenessSum.load(r) + static_cast<double>(staleness), r);  // one writer: under mu_
  if (staleness > sv.stalenessMax.load(r)) sv.stalenessMax.store(staleness, r);
}

int64_t Server::partitionsLocked() const {
  int64_t n = 0;
  for (const auto& p : parts_) n += p ? 1 : 0;
  return n;
}

void Server::countApplied(size_t worker, int64_t step, int64_t samples) {
  // A worker pushes a step's partitions only after its previous step's were all answered: one step at a time.
  StepInProgress& c = current_[worker];
  if (c.step != step) c = StepInProgress{.step = step, .parts = 0, .samples = samples};
  if (++c.parts < partitionsLocked()) return;
  tally_[worker].samples += c.samples;
  ++tally_[worker].steps;
  c = StepInProgress{};
}

std::vector<WorkerTally> Server::tallies() const {
  std::lock_guard lock(mu_);
  std::vector<WorkerTally> out = tally_;
  const int64_t partitions = partitionsLocked();
  for (size_t w = 0; w < out.size(); ++w) {
    out[w].state = live_[w] ? WorkerTally::State::kLive
                   : lost_[w] ? WorkerTally::State::kLost
                   : seen_[w] ? WorkerTally::State::kFinished
                              : WorkerTally::State::kAbsent;
    out[w].partitions = partitions;
    out[w].partialPartitions = current_[w].parts;
    out[w].partialSamples = current_[w].parts > 0 ? current_[w].samples : 0;
  }
  return out;
}

int64_t Server::minClockLocked() const {
  int64_t m = std::numeric_limits<int64_t>::max();
  for (size_t w = 0; w < clock_.size(); ++w)
    if (live_[w]) m = std::min(m, clock_[w]);
  return m;
}

namespace {

std::string workerList(const std::vector<size_t>& workers) {
  return fmt::format("{} {}", workers.size() == 1 ? "worker" : "workers", fmt::join(workers, ", "));
}

}  // namespace

std::string Server::notPushedLocked(const std::vector<uint8_t>& pushed) const {
  std::vector<size_t> missing;
  for (size_t w = 0; w < pushed.size(); ++w)
    if (!pushed[w]) missing.push_back(w);
  return workerList(missing);
}

std::string Server::slowestLocked() const {
  const int64_t slowest = minClockLocked();
  std::vector<size_t> at;
  for (size_t w = 0; w < clock_.size(); ++w)
    if (live_[w] && clock_[w] == slowest) at.push_back(w);
  return fmt::format("{} (at {} step(s) pushed)", workerList(at), slowest);
}

void Server::reply(Conn& conn, const ReplyHeader& h, const void* payload, size_t bytes) {
  uint8_t header[kHeaderBytes];
  encode(h, header);
  // Counted as it goes out, so that a worker that got the reply reads it in the block.
  if (options_.metrics) options_.metrics->server.sentBytesTotal.fetch_add(kHeaderBytes + bytes, std::memory_order_relaxed);
  sendFrame(conn.socket.fd(), header, payload, bytes, conn.peer);
  std::lock_guard lock(mu_);
  stats_.bytesOut += static_cast<int64_t>(bytes);
}

void Server::replyError(Conn& conn, uint32_t partition, const std::string& message) {
  {
    std::lock_guard lock(mu_);
    ++stats_.errors;
  }
  log::debug("parameter server {}: error for {}: {}", options_.serverRank, conn.peer, message);
  reply(conn, ReplyHeader{.ok = false, .partition = partition, .bytes = message.size()}, message.data(),
        message.size());
}

std::string Server::hello(Conn& conn, const std::vector<uint8_t>& payload) {
  Reader r{payload};
  int32_t rank = 0, workers = 0;
  uint64_t params = 0, partFloats = 0;
  if (!r.take(rank) || !r.take(workers) || !r.take(params) || !r.take(partFloats) || r.pos != payload.size())
    return fmt::format("hello: payload of {} bytes (expected 24)", payload.size());
  if (workers != options_.workers)
    return fmt::format("hello: the worker counts {} workers, this server {}", workers, options_.workers);
  if (rank < 0 || rank >= workers) return fmt::format("hello: worker rank {} (expected 0..{})", rank, workers - 1);
  if (partFloats < 16 || partFloats > kMaxPartitionFloats || params == 0)
    return fmt::format("hello: {} parameters in partitions of {} floats (expected 16..{})", params, partFloats,
                       kMaxPartitionFloats);
  std::lock_guard lock(mu_);
  auto w = static_cast<size_t>(rank);
  if (seen_[w]) return fmt::format("hello: worker {} is already connected or was here before", rank);
  if (plan_.empty()) {
    numParams_ = params;
    plan_ = planPartitions(params, options_.servers, partFloats);
    parts_.resize(plan_.size());
    for (size_t i = 0; i < plan_.size(); ++i) {
      if (plan_[i].server != options_.serverRank) continue;
      auto p = std::make_unique<PartitionState>();
      p->where = plan_[i];
      p->pushed.assign(static_cast<size_t>(options_.workers), 0);
      p->pendingSamples.assign(static_cast<size_t>(options_.workers), -1);
      parts_[i] = std::move(p);
    }
  } else if (params != numParams_ || plan_.front().count != std::min<uint64_t>(partFloats, plan_.front().count)) {
    return fmt::format("hello: worker {} has {} parameters, worker(s) before it {}", rank, params, numParams_);
  }
  seen_[w] = live_[w] = 1;
  conn.worker = rank;
  conn.peer = fmt::format("worker {}", rank);
  return "";
}

std::string Server::init(PartitionState& p, const std::vector<uint8_t>& payload, size_t count, int64_t step) {
  auto optimizer = nn::Optimizer::create(options_.optimizer, count);
  const size_t buffers = optimizer->stateBuffers().size();
  Reader r{payload};
  uint64_t steps = 0;
  uint32_t ranges = 0;
  if (!r.take(steps) || !r.take(ranges) || ranges > count)
    return fmt::format("init of partition {}: truncated header", p.where.offset);
  std::vector<std::pair<size_t, size_t>> noDecay;
  for (uint32_t i = 0; i < ranges; ++i) {
    uint64_t off = 0, n = 0;
    if (!r.take(off) || !r.take(n) || off + n > count) return "init: truncated or out-of-range no-decay ranges";
    noDecay.emplace_back(off, n);
  }
  const size_t expected = r.pos + (1 + buffers) * count * sizeof(float);
  if (payload.size() != expected)
    return fmt::format("init: payload of {} bytes, expected {} ({} floats of parameters and {} optimizer state "
                       "buffer(s) of the same size)",
                       payload.size(), expected, count, buffers);
  const float* f = reinterpret_cast<const float*>(payload.data() + r.pos);  // NOLINT: bytes of floats
  std::lock_guard lock(mu_);
  p.params.assign(f, f + count);
  auto state = optimizer->stateBuffers();
  for (size_t b = 0; b < buffers; ++b) std::memcpy(state[b].data.data(), f + (b + 1) * count, count * sizeof(float));
  optimizer->setSteps(static_cast<int64_t>(steps));
  optimizer->setNoDecayRanges(std::move(noDecay));
  p.optimizer = std::move(optimizer);
  p.sum.assign(count, 0.0f);
  p.pushes = 0;
  std::fill(p.pushed.begin(), p.pushed.end(), 0);
  std::fill(p.pendingSamples.begin(), p.pendingSamples.end(), -1);
  p.version = step;
  p.initialised = true;
  cv_.notify_all();
  return "";
}

void Server::dispatch(Conn& conn, const RequestHeader& h) {
  conn.in.resize(h.bytes);
  recvBytes(conn.socket.fd(), conn.in.data(), h.bytes, Deadline(options_.timeout), conn.peer);
  {
    std::lock_guard lock(mu_);
    stats_.bytesIn += static_cast<int64_t>(h.bytes);
  }
  if (h.op == Op::kHello) {
    if (conn.worker >= 0) return replyError(conn, 0, "hello: this connection already said hello");
    std::string err = hello(conn, conn.in);
    if (!err.empty()) return replyError(conn, 0, err);
    return reply(conn, ReplyHeader{}, nullptr, 0);
  }
  if (conn.worker < 0) return replyError(conn, h.partition, fmt::format("{} before hello", opName(h.op)));
  if (h.op == Op::kBye) {
    conn.bye = true;
    workerGone(conn.worker, true);
    return reply(conn, ReplyHeader{}, nullptr, 0);
  }
  if (h.op == Op::kBarrier) {
    std::unique_lock lock(mu_);
    const auto w = static_cast<size_t>(conn.worker);
    barrier_[w] = std::max(barrier_[w], h.step);
    cv_.notify_all();
    const bool met = cv_.wait_until(lock, Deadline(options_.timeout).at(), [&] {
      if (stopping_) return true;
      for (size_t v = 0; v < barrier_.size(); ++v)
        if (live_[v] && barrier_[v] < h.step) return false;
      return true;
    });
    lock.unlock();
    if (!met || stopping_) return replyError(conn, 0, fmt::format("barrier {}: the other workers did not arrive in time",
                                                                  h.step));
    // Every live worker's pushes before this barrier were answered, so were applied: the tally is complete for
    // them (and final for the workers that left).
    const std::vector<uint8_t> tally = encodeTallies(tallies());
    return reply(conn, ReplyHeader{.version = h.step, .bytes = tally.size()}, tally.data(), tally.size());
  }
  if (h.op == Op::kTally) {
    // The workers server 0 found gone: once none is connected here, whatever they pushed that arrived is applied
    // and this tally is final for them.
    detail::Reader in{conn.in};
    uint32_t n = 0;
    std::vector<size_t> gone;
    bool ok = in.take(n) && conn.in.size() == sizeof(uint32_t) + size_t{n} * sizeof(int32_t);
    for (uint32_t i = 0; ok && i < n; ++i) {
      int32_t v = -1;
      ok = in.take(v) && v >= 0 && v < options_.workers;
      gone.push_back(static_cast<size_t>(v));
    }
    if (!ok)
      return replyError(conn, 0, fmt::format("tally: a payload of {} bytes (expected u32 n and n worker ranks below "
                                             "{})", conn.in.size(), options_.workers));
    std::unique_lock lock(mu_);
    const bool met = cv_.wait_until(lock, Deadline(options_.timeout).at(), [&] {
      if (stopping_) return true;
      for (size_t v : gone)
        if (live_[v]) return false;
      return true;
    });
    lock.unlock();
    if (!met || stopping_)
      return replyError(conn, 0, "tally: a worker that left server 0 is still connected to this server");
    const std::vector<uint8_t> tally = encodeTallies(tallies());
    return reply(conn, ReplyHeader{.version = h.step, .bytes = tally.size()}, tally.data(), tally.size());
  }
  if (h.op == Op::kSparseSave || h.op == Op::kSparseLoad) {
    std::string err = saveOrLoadTables(conn, h);
    if (!err.empty()) return replyError(conn, h.partition, err);
    return reply(conn, ReplyHeader{.version = h.step}, nullptr, 0);
  }
  if (h.op == Op::kSparsePull || h.op == Op::kSparsePush || h.op == Op::kSparseFetch || h.op == Op::kSparseInit) {
    std::string err = dispatchSparse(conn, h);
    if (!err.empty()) replyError(conn, h.partition, err);
    return;
  }
  if (h.partition >= plan_.size() || !parts_[h.partition])
    return replyError(conn, h.partition,
                      fmt::format("{}: partition {} is not on server {} ({} partitions)", opName(h.op), h.partition,
                                  options_.serverRank, plan_.size()));
  PartitionState& p = *parts_[h.partition];
  const size_t count = p.where.count;
  const auto w = static_cast<size_t>(conn.worker);
  if (h.op == Op::kInit) {
    std::string err = init(p, conn.in, count, h.step);
    if (!err.empty()) return replyError(conn, h.partition, err);
    return reply(conn, ReplyHeader{.partition = h.partition, .version = h.step}, nullptr, 0);
  }
  std::unique_lock lock(mu_);
  const Deadline deadline(options_.timeout);
  auto waitFor = [&](auto ready) {
    return cv_.wait_until(lock, deadline.at(), [&] { return stopping_ || ready(); }) && !stopping_;
  };
  if (!waitFor([&] { return p.initialised; })) {
    lock.unlock();
    return replyError(conn, h.partition, "partition not initialised in time (worker 0 sends it first)");
  }
  if (h.op == Op::kPushPull || h.op == Op::kPushPullCounted) {
    // kPushPullCounted: the step's training samples (u64) follow the gradient; counted once the push is applied.
    const bool counted = h.op == Op::kPushPullCounted;
    const size_t expected = count * sizeof(float) + (counted ? sizeof(uint64_t) : 0);
    if (h.bytes != expected) {
      lock.unlock();
      return replyError(conn, h.partition,
                        fmt::format("{} to partition {}: a payload of {} bytes, expected {} ({} floats of gradient{})",
                                    opName(h.op), h.partition, h.bytes, expected, count,
                                    counted ? " and a u64 sample count" : ""));
    }
    int64_t samples = 0;
    if (counted) {
      uint64_t n = 0;
      std::memcpy(&n, conn.in.data() + count * sizeof(float), sizeof(n));
      if (n > static_cast<uint64_t>(std::numeric_limits<int32_t>::max())) {
        lock.unlock();
        return replyError(conn, h.partition, fmt::format("{} to partition {}: a sample count of {} (expected at most "
                                                         "{})", opName(h.op), h.partition, n,
                                                         std::numeric_limits<int32_t>::max()));
      }
      samples = static_cast<int64_t>(n);
    }
    if (++stats_.pushes == options_.killAfterPushes) {
      log::warn("DTRAIN_FAULT: parameter server {} kills itself after {} pushes", options_.serverRank,
                stats_.pushes);
      ::raise(SIGKILL);
    }
    const auto* g = reinterpret_cast<const float*>(conn.in.data());  // NOLINT: bytes of floats
    std::string err;
    if (options_.mode == Mode::kSync) {
      if (!syncBroken_.empty()) err = syncBroken_;
      else if (h.step != p.version)
        err = fmt::format("push to partition {} for step {}, but the partition is at step {} (sync mode)",
                          h.partition, h.step, p.version);
      else if (p.pushed[w]) err = fmt::format("second push to partition {} for step {}", h.partition, h.step);
      if (err.empty()) {
        for (size_t i = 0; i < count; ++i) p.sum[i] += g[i];
        p.pushed[w] = 1;
        p.pendingSamples[w] = counted ? samples : -1;
        if (++p.pushes == options_.workers) {
          const float scale = 1.0f / static_cast<float>(options_.workers);
          for (float& v : p.sum) v *= scale;
          p.optimizer->setLr(h.lr);
          p.optimizer->step(p.params, p.sum);
          ++stats_.updates;
          // Every worker's gradient of the step is applied now: their counted samples with it.
          for (size_t v = 0; v < p.pendingSamples.size(); ++v)
            if (p.pendingSamples[v] >= 0) countApplied(v, h.step, p.pendingSamples[v]);
          std::fill(p.pendingSamples.begin(), p.pendingSamples.end(), -1);
          std::fill(p.sum.begin(), p.sum.end(), 0.0f);
          std::fill(p.pushed.begin(), p.pushed.end(), 0);
          p.pushes = 0;
          ++p.version;
          cv_.notify_all();
        } else if (!waitFor([&] { return p.version > h.step || !syncBroken_.empty(); })) {
          err = fmt::format("timed out after {} ms waiting for the other workers' gradients of step {}: {} pushed "
                            "none (stuck, hung or far behind; parallel.timeout bounds the wait)",
                            options_.timeout.count(), h.step, notPushedLocked(p.pushed));
        } else if (p.version <= h.step) {
          err = syncBroken_;
        }
      }
    } else {
      p.optimizer->setLr(h.lr);
      p.optimizer->step(p.params, std::span<const float>(g, count));
      ++stats_.updates;
      if (counted) countApplied(w, h.step, samples);  // applied: whatever happens to the reply (ssp's wait, the
                                                       // worker dying)
      ++p.version;
      clock_[w] = std::max(clock_[w], h.step + 1);
      cv_.notify_all();
      if (options_.mode == Mode::kSsp &&
          !waitFor([&] { return h.step + 1 - minClockLocked() <= options_.staleness; }))
        err = fmt::format("timed out after {} ms waiting for the slowest worker (ssp, staleness {}): {}",
                          options_.timeout.count(), options_.staleness, slowestLocked());
    }
    if (!err.empty()) {
      lock.unlock();
      return replyError(conn, h.partition, err);
    }
  } else if (h.op == Op::kPull) {
    if (options_.mode == Mode::kSync && !waitFor([&] { return p.version >= h.step; })) {
      lock.unlock();
      return replyError(conn, h.partition, fmt::format("pull of partition {}: step {} not reached in time",
                                                       h.partition, h.step));
    }
  } else if (h.op != Op::kFetch) {
    lock.unlock();
    return replyError(conn, h.partition, fmt::format("unexpected op {}", opName(h.op)));
  }
  // The reply: the parameters (and for a fetch the step count and optimizer state), copied under the lock.
  ReplyHeader r{.partition = h.partition, .version = p.version};
  const int64_t minClock = minClockLocked();
  r.minClock = minClock == std::numeric_limits<int64_t>::max() ? clock_[w] : minClock;
  // The staleness the worker will see in this answer (ps_client.h's takeStaleness), for the server's metrics.
  if ((h.op == Op::kPushPull || h.op == Op::kPushPullCounted) && options_.mode != Mode::kSync)
    noteStalenessLocked(std::max<int64_t>(0, h.step + 1 - r.minClock));
  conn.out.clear();
  if (h.op == Op::kFetch) {
    const int64_t steps = p.optimizer->steps();
    conn.out.resize(2);
    std::memcpy(conn.out.data(), &steps, sizeof(steps));
  }
  conn.out.insert(conn.out.end(), p.params.begin(), p.params.end());
  if (h.op == Op::kFetch)
    for (const auto& b : p.optimizer->stateBuffers()) conn.out.insert(conn.out.end(), b.data.begin(), b.data.end());
  lock.unlock();
  r.bytes = conn.out.size() * sizeof(float);
  reply(conn, r, conn.out.data(), r.bytes);
}

}  // namespace dtrain::train::ps
