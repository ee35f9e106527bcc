#include "lib/comm/backend.h"

#include <unistd.h>

#include <algorithm>
#include <set>

#include "lib/comm/tuning.h"
#include "lib/common/bytes.h"
#include "lib/common/env.h"
#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/common/net.h"

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

class CompletedWork : public Work {
 public:
  void wait() override {}
  bool done() override { return true; }
};

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

BackendOptions optionsFromEnv() {
  BackendOptions o;
  o.rank = static_cast<int>(env::getInt("RANK", 0));
  o.size = static_cast<int>(env::getInt("WORLD_SIZE", 1));
  // Started by hand without the launcher's node variables: assume one node.
  o.localRank = static_cast<int>(env::getInt("LOCAL_RANK", o.rank));
  o.localSize = static_cast<int>(env::getInt("LOCAL_WORLD_SIZE", o.size));
  o.nodeRank = static_cast<int>(env::getInt("GROUP_RANK", 0));
  o.timeout = env::getDuration("DTRAIN_COMM_TIMEOUT", o.timeout);
  DTRAIN_CHECK_AS(UsageError, o.size >= 1 && o.rank >= 0 && o.rank < o.size,
                  "RANK={} and WORLD_SIZE={} do not describe a rank of the job", o.rank, o.size);
  DTRAIN_CHECK_AS(UsageError, o.localSize >= 1 && o.localRank >= 0 && o.localRank < o.localSize,
                  "LOCAL_RANK={} and LOCAL_WORLD_SIZE={} do not describe a rank on this node", o.localRank,
                  o.localSize);
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

void Backend::runOp(const Op& op) {
  try {
    op(newDeadline());
  } catch (const CommError& e) {
    markBroken(e.what());
    throw;
  } catch (const std::exception& e) {
    markBroken(e.what());
    throw CommError(fmt::format("{} collective failed: {}", name(), e.what()));
  }
}

WorkPtr Backend::submit(Op op, bool sync) {
  checkUsable();
  if (sync && outstanding_.load(std::memory_order_acquire) == 0) {
    runOp(op);
    return std::make_shared<CompletedWork>();
  }
  auto work = std::make_shared<QueuedWork>();
  {
    std::lock_guard<std::mutex> lock(mu_);
    DTRAIN_CHECK(!stopping_, "operation submitted to a communicator that is shutting down");
    if (!thread_.joinable()) thread_ = std::thread([this] { threadMain(); });
    queue_.emplace_back(std::move(op), work);
    outstanding_.fetch_add(1, std::memory_order_acq_rel);
  }
  cv_.notify_one();
  if (sync) work->wait();
  return work;
}

void Backend::threadMain() {
  for (;;) {
    std::pair<Op, std::shared_ptr<QueuedWork>> item;
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

WorkPtr Backend::allreduceAsync(void* buf, size_t count, DType dtype, ReduceOp op) {
  if (count == 0) return submit([](const Deadline&) {}, false);
  return submit([=, this](const Deadline& d) { doAllreduce(buf, count, dtype, op, d); }, false);
}

WorkPtr Backend::broadcastAsync(void* buf, size_t count, DType dtype, int root) {
  checkPeer(root, "broadcast root");
  if (count == 0 || size() == 1) return submit([](const Deadline&) {}, false);
  return submit([=, this](const Deadline& d) { doBroadcast(buf, count, dtype, root, d); }, false);
}

WorkPtr Backend::allgatherAsync(const void* in, void* out, size_t countPerRank, DType dtype) {
  if (countPerRank == 0) return submit([](const Deadline&) {}, false);
  return submit([=, this](const Deadline& d) { doAllgather(in, out, countPerRank, dtype, d); }, false);
}

WorkPtr Backend::reduceScatterAsync(const void* in, void* out, size_t countPerRank, DType dtype, ReduceOp op) {
  if (countPerRank == 0) return submit([](const Deadline&) {}, false);
  return submit([=, this](const Deadline& d) { doReduceScatter(in, out, countPerRank, dtype, op, d); }, false);
}

WorkPtr Backend::sendAsync(const void* buf, size_t bytes, int peer) {
  checkPeer(peer, "send");
  DTRAIN_CHECK_AS(UsageError, peer != rank(), "send: rank {} cannot send to itself", peer);
  if (bytes == 0) return submit([](const Deadline&) {}, false);
  return submit([=, this](const Deadline& d) { doSend(buf, bytes, peer, d); }, false);
}

WorkPtr Backend::recvAsync(void* buf, size_t bytes, int peer) {
  checkPeer(peer, "recv");
  DTRAIN_CHECK_AS(UsageError, peer != rank(), "recv: rank {} cannot receive from itself", peer);
  if (bytes == 0) return submit([](const Deadline&) {}, false);
  return submit([=, this](const Deadline& d) { doRecv(buf, bytes, peer, d); }, false);
}

WorkPtr Backend::barrierAsync() {
  if (size() == 1) return submit([](const Deadline&) {}, false);
  return submit([this](const Deadline& d) { doBarrier(d); }, false);
}

void Backend::allreduce(void* buf, size_t count, DType dtype, ReduceOp op) {
  if (count == 0) return checkUsable();
  submit([=, this](const Deadline& d) { doAllreduce(buf, count, dtype, op, d); }, true);
}

void Backend::broadcast(void* buf, size_t count, DType dtype, int root) {
  checkPeer(root, "broadcast root");
  if (count == 0 || size() == 1) return checkUsable();
  submit([=, this](const Deadline& d) { doBroadcast(buf, count, dtype, root, d); }, true);
}

void Backend::allgather(const void* in, void* out, size_t countPerRank, DType dtype) {
  if (countPerRank == 0) return checkUsable();
  submit([=, this](const Deadline& d) { doAllgather(in, out, countPerRank, dtype, d); }, true);
}

void Backend::reduceScatter(const void* in, void* out, size_t countPerRank, DType dtype, ReduceOp op) {
  if (countPerRank == 0) return checkUsable();
  submit([=, this](const Deadline& d) { doReduceScatter(in, out, countPerRank, dtype, op, d); }, true);
}

void Backend::send(const void* buf, size_t bytes, int peer) {
  checkPeer(peer, "send");
  DTRAIN_CHECK_AS(UsageError, peer != rank(), "send: rank {} cannot send to itself", peer);
  if (bytes == 0) return checkUsable();
  submit([=, this](const Deadline& d) { doSend(buf, bytes, peer, d); }, true);
}

void Backend::recv(void* buf, size_t bytes, int peer) {
  checkPeer(peer, "recv");
  DTRAIN_CHECK_AS(UsageError, peer != rank(), "recv: rank {} cannot receive from itself", peer);
  if (bytes == 0) return checkUsable();
  submit([=, this](const Deadline& d) { doRecv(buf, bytes, peer, d); }, true);
}

void Backend::barrier() {
  if (size() == 1) return checkUsable();
  submit([this](const Deadline& d) { doBarrier(d); }, true);
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
  if (list.size() > 200) {
    uint64_t h = 1469598103934665603ull;  // FNV-1a
    for (char c : list) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
    list = fmt::format("{}r-{:016x}", ranks.size(), h);
  }
  const int serial = groupsMade_[list]++;
  auto mine = std::find(ranks.begin(), ranks.end(), rank());
  if (mine == ranks.end()) return nullptr;
  BackendOptions sub = options_;
  sub.groupName = fmt::format("{}/sub[{}]#{}", options_.groupName, list, serial);
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
