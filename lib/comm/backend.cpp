#include "lib/comm/backend.h"

#include <unistd.h>

#include <algorithm>
#include <set>

#include "lib/common/bytes.h"
#include "lib/common/env.h"
#include "lib/common/error.h"
#include "lib/common/hash.h"
#include "lib/common/log.h"
#include "lib/common/net.h"
#include "lib/common/timeline.h"
#include "lib/common/worker_contract.h"
#include "lib/common/worker_metrics.h"

namespace dtrain::comm {

// A handle on an operation queued for the communication thread.
class Backend::QueuedWork : public Work {
 public:
  void wait() override {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return done_; });
    if (!error_.empty()) throw CommError(error_);
  }
  bool done() override {
    std::lock_guard<std::mutex> lock(mu_);
    return done_;
  }
  void finish(std::string error) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
      error_ = std::move(error);
    }
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::string error_;
};

namespace {

std::string encodePeer(const PeerInfo& p, int size) {
  std::string out;
  ByteWriter w(out);
  w.put<int32_t>(size);
  w.put<int32_t>(p.nodeRank);
  w.put<int32_t>(p.localRank);
  w.put<int64_t>(p.pid);
  w.putBytes(p.hostname);
  return out;
}

PeerInfo decodePeer(std::string_view bytes, int* size) {
  ByteReader r(bytes);
  PeerInfo p;
  *size = r.get<int32_t>();
  p.nodeRank = r.get<int32_t>();
  p.localRank = r.get<int32_t>();
  p.pid = r.get<int64_t>();
  p.hostname = std::string(r.getBytes());
  return p;
}

}  // namespace

BackendOptions optionsFromEnv() { return optionsFromContract(WorkerContract::fromEnv()); }

BackendOptions optionsFromContract(const WorkerContract& worker) {
  BackendOptions o;
  o.rank = worker.rank;
  o.size = worker.worldSize;
  o.localRank = worker.localRank;
  o.localSize = worker.localWorldSize;
  o.nodeRank = worker.nodeRank;
  o.token = worker.storeToken;
  o.timeout = env::getDuration("DTRAIN_COMM_TIMEOUT", o.timeout);
  return o;
}

Backend::Backend(BackendOptions options) : options_(std::move(options)) {
  const auto& o = options_;
  DTRAIN_CHECK_AS(UsageError, o.size >= 1 && o.rank >= 0 && o.rank < o.size, "rank {} is not in a group of {}",
                  o.rank, o.size);
  DTRAIN_CHECK_AS(UsageError, o.localSize >= 1 && o.localRank >= 0 && o.localRank < o.localSize,
                  "local rank {} is not in a node of {}", o.localRank, o.localSize);
  DTRAIN_CHECK_AS(UsageError, o.timeout.count() > 0, "the collective timeout must be positive");
  PeerInfo me{o.nodeRank, o.localRank, static_cast<int64_t>(::getpid()), net::hostname()};
  if (o.size == 1) {
    peers_ = {me};
    return;
  }
  DTRAIN_CHECK_AS(UsageError, o.store != nullptr, "a group of {} ranks needs a store to bootstrap through", o.size);
  o.store->set(key(fmt::format("peer/{}", o.rank)), encodePeer(me, o.size));
  Deadline deadline(o.timeout);
  peers_.resize(static_cast<size_t>(o.size));
  for (int r = 0; r < o.size; ++r) {
    std::string value;
    try {
      value = o.store->get(key(fmt::format("peer/{}", r)), deadline.remaining());
    } catch (const TimeoutError&) {
      DTRAIN_THROW(CommError, "rank {} did not join communicator '{}' within {} ms", r, o.groupName,
                   o.timeout.count());
    }
    int theirSize = 0;
    peers_[static_cast<size_t>(r)] = decodePeer(value, &theirSize);
    DTRAIN_CHECK_AS(CommError, theirSize == o.size,
                    "rank {} joined communicator '{}' with world size {}, this rank has {}", r, o.groupName,
                    theirSize, o.size);
    const auto& p = peers_[static_cast<size_t>(r)];
    DTRAIN_CHECK_AS(ConfigError, p.nodeRank != o.nodeRank || p.hostname == me.hostname,
                    "ranks {} and {} claim the same node rank {} but run on hosts '{}' and '{}'", r, o.rank,
                    o.nodeRank, p.hostname, me.hostname);
  }
}

Backend::~Backend() { shutdown(); }

bool Backend::singleNode() const {
  return std::all_of(peers_.begin(), peers_.end(), [&](const PeerInfo& p) { return p.nodeRank == peers_[0].nodeRank; });
}

void Backend::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Backend::markBroken(const std::string& why) {
  std::lock_guard<std::mutex> lock(brokenMu_);
  if (broken_.empty()) broken_ = why;
  isBroken_.store(true);
}

void Backend::checkUsable() {
  if (!isBroken_.load()) return;
  std::lock_guard<std::mutex> lock(brokenMu_);
  DTRAIN_THROW(CommError, "{} communicator '{}' is unusable after an earlier failure: {}", name(),
               options_.groupName, broken_);
}

void Backend::checkPeer(int peer, const char* what) const {
  DTRAIN_CHECK_AS(UsageError, peer >= 0 && peer < size(), "{}: rank {} is not in this group of {}", what, peer,
                  size());
}

void Backend::checkView(const TensorView& view, Operation::Kind kind, const char* which) const {
  const Device mine = device();
  if (view.device != mine) [[unlikely]] {
    if (mine.isCpu())
      DTRAIN_THROW(UsageError, "{}: backend '{}' works on CPU buffers, but the {} is on {} (use backend 'nccl' for "
                               "GPU buffers)", operationName(kind), name(), which, view.device.str());
    DTRAIN_THROW(UsageError, "{}: backend '{}' works on {} buffers, but the {} is on {}{}", operationName(kind),
                 name(), mine.str(), which, view.device.str(),
                 view.device.isCpu() ? " (use tcp/shm/hier for CPU buffers)" : "");
  }
  DTRAIN_CHECK_AS(UsageError, view.data != nullptr || view.numel() == 0, "{}: the {} has no memory",
                  operationName(kind), which);
  // Every backend sends and receives bytes() contiguous bytes as numel values.
  view.requirePacked(fmt::format("{}'s {}", operationName(kind), which));
}

std::string_view operationName(Operation::Kind kind) {
  switch (kind) {
    case Operation::Kind::kNone: return "no-op";
    case Operation::Kind::kAllreduce: return "allreduce";
    case Operation::Kind::kBroadcast: return "broadcast";
    case Operation::Kind::kAllgather: return "allgather";
    case Operation::Kind::kReduceScatter: return "reduce_scatter";
    case Operation::Kind::kSend: return "send";
    case Operation::Kind::kRecv: return "recv";
    case Operation::Kind::kBarrier: return "barrier";
  }
  return "?";
}

void Backend::validate(const Operation& op) const {
  using K = Operation::Kind;
  switch (op.kind) {
    case K::kNone:
    case K::kBarrier: return;
    case K::kBroadcast: checkPeer(op.peer, "broadcast root"); break;
    case K::kSend:
    case K::kRecv: {
      const char* what = op.kind == K::kSend ? "send" : "recv";
      checkPeer(op.peer, what);
      DTRAIN_CHECK_AS(UsageError, op.peer != rank(), "{}: rank {} cannot {} itself", what, op.peer,
                      op.kind == K::kSend ? "send to" : "receive from");
      return checkView(op.buf, op.kind, "buffer");
    }
    case K::kAllreduce: break;
    case K::kAllgather:
    case K::kReduceScatter: {
      checkView(op.out, op.kind, "output");
      const bool gather = op.kind == K::kAllgather;
      const int64_t block = gather ? op.buf.numel() : op.out.numel();
      const int64_t whole = gather ? op.out.numel() : op.buf.numel();
      DTRAIN_CHECK_AS(UsageError, whole == block * size() && op.buf.dtype == op.out.dtype,
                      "{}: the {} must hold {} blocks of the {} ({} x {} {}), but holds {} {}", operationName(op.kind),
                      gather ? "output" : "input", size(), gather ? "input" : "output", size(), block,
                      dtypeName(op.buf.dtype), whole, dtypeName(op.out.dtype));
      break;
    }
  }
  checkView(op.buf, op.kind, op.kind == K::kAllgather || op.kind == K::kReduceScatter ? "input" : "buffer");
  checkSupported(op.buf.dtype, operationName(op.kind));
}

bool Backend::isEmpty(const Operation& op) const {
  using K = Operation::Kind;
  switch (op.kind) {
    case K::kNone: return true;
    case K::kAllreduce:
    case K::kAllgather:
    case K::kSend:
    case K::kRecv: return op.buf.numel() == 0;
    case K::kReduceScatter: return op.out.numel() == 0;
    case K::kBroadcast: return op.buf.numel() == 0 || size() == 1;
    case K::kBarrier: return size() == 1;
  }
  return true;
}

void Backend::dispatch(const Operation& op, const Deadline& d) {
  using K = Operation::Kind;
  const auto count = static_cast<size_t>(op.buf.numel());
  switch (op.kind) {
    case K::kNone: return;
    case K::kAllreduce: return doAllreduce(op.buf.data, count, op.buf.dtype, op.op, d);
    case K::kBroadcast: return doBroadcast(op.buf.data, count, op.buf.dtype, op.peer, d);
    case K::kAllgather: return doAllgather(op.buf.data, op.out.data, count, op.buf.dtype, d);
    case K::kReduceScatter:
      return doReduceScatter(op.buf.data, op.out.data, static_cast<size_t>(op.out.numel()), op.buf.dtype, op.op, d);
    case K::kSend: return doSend(op.buf.data, op.buf.bytes(), op.peer, d);
    case K::kRecv: return doRecv(op.buf.data, op.buf.bytes(), op.peer, d);
    case K::kBarrier: return doBarrier(d);
  }
}

void Backend::runInline(const Operation& op, const Deadline& deadline) { dispatch(op, deadline); }

CommCounters& commCounters(Operation::Kind kind) {
  static CommCounters counters[kNumOperationKinds];
  return counters[static_cast<int>(kind) % kNumOperationKinds];
}

// `dtrain run --timeline`: one event per collective, on the thread that ran it (the communicator's own thread
// for asynchronous calls, so the trace shows how they overlap the backward).
void Backend::recordOnTimeline(const Operation& op, Clock::time_point start, Clock::time_point end) const {
  timeline::nameThread(fmt::format("collectives ({})", options_.groupName));
  char detail[64];
  const auto n = fmt::format_to_n(detail, sizeof(detail), R"("bytes":{},"group":"{}")",
                                  op.kind == Operation::Kind::kBarrier ? 0 : op.buf.bytes(), options_.groupName);
  timeline::record(operationName(op.kind).data(), "comm", start, end,
                   n.size <= sizeof(detail) ? std::string_view(detail, n.size) : std::string_view());
}

void Backend::runOp(const Operation& op) {
  try {
    const auto t0 = Clock::now();
    const uint64_t flight = flightBegin(static_cast<int>(op.kind), op.kind == Operation::Kind::kBarrier ? 0 : op.buf.bytes(),
                                        options_.groupName);
    dispatch(op, newDeadline());
    flightEnd(flight);
    const auto t1 = Clock::now();
    CommCounters& c = commCounters(op.kind);
    c.calls.fetch_add(1, std::memory_order_relaxed);
    if (op.kind != Operation::Kind::kBarrier) c.bytes.fetch_add(op.buf.bytes(), std::memory_order_relaxed);
    c.nanos.fetch_add(static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count()),
                      std::memory_order_relaxed);
    if (timeline::enabled()) recordOnTimeline(op, t0, t1);
  } catch (const CommError& e) {
    if (options_.worldRanks.empty()) {
      markBroken(e.what());
      throw;
    }
    const std::string why = withWorldRanks(e.what());
    markBroken(why);
    throw CommError(why);
  } catch (const std::exception& e) {
    const std::string why = withWorldRanks(fmt::format("{} collective failed: {}", name(), e.what()));
    markBroken(why);
    throw CommError(why);
  }
}

std::string Backend::withWorldRanks(const std::string& message) const {
  if (options_.worldRanks.empty()) return message;
  std::string map;
  for (size_t i = 0; i < options_.worldRanks.size(); ++i)
    map += fmt::format("{}{}={}", i == 0 ? "" : ", ", i, options_.worldRanks[i]);
  return fmt::format("{} (in communicator '{}', whose ranks are world ranks: {})", message, options_.groupName, map);
}

WorkPtr Backend::start(const Operation& op, const CallOptions& call) {
  validate(op);
  return issue(op, call, false);
}

void Backend::run(const Operation& op, const CallOptions& call) {
  validate(op);
  issue(op, call, true);
}

WorkPtr Backend::issue(const Operation& op, const CallOptions&, bool sync) {
  checkUsable();
  const bool empty = isEmpty(op);
  if (sync && empty) return nullptr;
  if (sync && outstanding_.load(std::memory_order_acquire) == 0) {
    runOp(op);
    return nullptr;
  }
  auto work = std::make_shared<QueuedWork>();
  {
    std::lock_guard<std::mutex> lock(mu_);
    DTRAIN_CHECK(!stopping_, "operation submitted to a communicator that is shutting down");
    if (!thread_.joinable()) thread_ = std::thread([this] { threadMain(); });
    // An empty asynchronous operation still completes in submission order, after the ones before it.
    queue_.emplace_back(empty ? Operation{} : op, work);
    outstanding_.fetch_add(1, std::memory_order_acq_rel);
  }
  cv_.notify_one();
  if (sync) work->wait();
  return work;
}

void Backend::threadMain() {
  for (;;) {
    std::pair<Operation, std::shared_ptr<QueuedWork>> item;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping and drained
      item = std::move(queue_.front());
      queue_.pop_front();
    }
    std::string error;
    try {
      checkUsable();
      runOp(item.first);
    } catch (const std::exception& e) {
      error = e.what();
    }
    // Decrement before waking the waiter: a sync call made right after wait() returns may then run inline.
    outstanding_.fetch_sub(1, std::memory_order_acq_rel);
    item.second->finish(std::move(error));
  }
}

std::shared_ptr<Backend> Backend::newGroup(const std::vector<int>& ranks) {
  DTRAIN_CHECK_AS(UsageError, !ranks.empty(), "newGroup: the rank list is empty");
  std::set<int> seen;
  std::string list;
  for (int r : ranks) {
    checkPeer(r, "newGroup");
    DTRAIN_CHECK_AS(UsageError, seen.insert(r).second, "newGroup: rank {} is listed twice", r);
    list += (list.empty() ? "" : ",") + std::to_string(r);
  }
  // The store prefix names the rank list and how often this list was made, so repeated and overlapping
  // groups never share keys. Long lists are hashed to stay under the store's key limit.
  if (list.size() > 200) list = fmt::format("{}r-{}", ranks.size(), fnv1aHex(list));
  const int serial = groupsMade_[list]++;
  auto mine = std::find(ranks.begin(), ranks.end(), rank());
  if (mine == ranks.end()) return nullptr;
  BackendOptions sub = options_;
  sub.groupName = fmt::format("{}/sub[{}]#{}", options_.groupName, list, serial);
  sub.worldRanks.clear();
  for (int r : ranks)
    sub.worldRanks.push_back(options_.worldRanks.empty() ? r : options_.worldRanks[static_cast<size_t>(r)]);
  sub.rank = static_cast<int>(mine - ranks.begin());
  sub.size = static_cast<int>(ranks.size());
  sub.localRank = 0;
  sub.localSize = 0;
  for (int r : ranks) {
    if (peers_[static_cast<size_t>(r)].nodeRank != options_.nodeRank) continue;
    if (r == rank()) sub.localRank = sub.localSize;
    ++sub.localSize;
  }
  return makeGroup(std::move(sub));
}

}  // namespace dtrain::comm
