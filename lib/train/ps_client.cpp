#include "lib/train/ps_client.h"

#include <sys/socket.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include <fmt/format.h>

#include "lib/common/error.h"
#include "lib/common/net.h"

namespace dtrain::train::ps {

struct Client::Lane {
  int server = 0;
  std::string peer;
  net::Socket socket;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void(Lane&)>> tasks;
  bool stop = false;
  std::thread thread;
};

Client::Client(ClientOptions options) : options_(std::move(options)) {
  const int servers = static_cast<int>(options_.servers.size());
  DTRAIN_CHECK(servers >= 1 && options_.numParams > 0, "ps client: {} servers, {} parameters", servers,
               options_.numParams);
  plan_ = planPartitions(options_.numParams, servers, options_.partitionFloats);
  const Deadline deadline(options_.timeout);
  for (int s = 0; s < servers; ++s) {
    auto lane = std::make_unique<Lane>();
    lane->server = s;
    lane->peer = fmt::format("parameter server {} ({})", s, options_.servers[static_cast<size_t>(s)]);
    auto hp = net::parseHostPort(options_.servers[static_cast<size_t>(s)], 0);
    DTRAIN_CHECK_AS(CommError, hp && hp->port != 0, "{}: not a host:port address", lane->peer);
    try {
      lane->socket = net::connect(*hp, deadline);
    } catch (const net::ConnectError& e) {
      DTRAIN_THROW(CommError, "cannot reach {}: {}", lane->peer, e.what());
    }
    std::vector<uint8_t> hello(24);
    const auto rank = static_cast<int32_t>(options_.workerRank), workers = static_cast<int32_t>(options_.workers);
    const auto params = static_cast<uint64_t>(options_.numParams), part = static_cast<uint64_t>(options_.partitionFloats);
    std::memcpy(hello.data(), &rank, 4);
    std::memcpy(hello.data() + 4, &workers, 4);
    std::memcpy(hello.data() + 8, &params, 8);
    std::memcpy(hello.data() + 16, &part, 8);
    roundTrip(*lane, RequestHeader{.op = Op::kHello, .bytes = hello.size()}, hello.data(), nullptr, 0);
    Lane* l = lane.get();
    lane->thread = std::thread([l] {
      for (;;) {
        std::function<void(Lane&)> task;
        {
          std::unique_lock lock(l->mu);
          l->cv.wait(lock, [&] { return l->stop || !l->tasks.empty(); });
          if (l->tasks.empty()) return;
          task = std::move(l->tasks.front());
          l->tasks.pop_front();
        }
        task(*l);
      }
    });
    lanes_.push_back(std::move(lane));
  }
}

Client::~Client() {
  for (auto& l : lanes_) {
    {
      std::lock_guard lock(l->mu);
      l->stop = true;
    }
    l->cv.notify_all();
  }
  for (auto& l : lanes_)
    if (l->thread.joinable()) l->thread.join();
}

ReplyHeader Client::roundTrip(Lane& lane, const RequestHeader& h, const void* payload, void* into, size_t intoBytes,
                              const void* trailer, size_t trailerBytes) {
  uint8_t header[kHeaderBytes];
  encode(h, header);
  sendFrame(lane.socket.fd(), header, payload, h.bytes - trailerBytes, lane.peer, trailer, trailerBytes);
  // A sync push waits for the slowest worker's gradient: the server's own timeout bounds it; ours is a little longer.
  const Deadline deadline(options_.timeout + options_.timeout / 2);
  recvBytes(lane.socket.fd(), header, kHeaderBytes, deadline, lane.peer);
  ReplyHeader r = decodeReply(header);
  {
    std::lock_guard lock(mu_);
    traffic_.bytesSent += kHeaderBytes + h.bytes;
    traffic_.bytesReceived += kHeaderBytes + r.bytes;
    ++traffic_.requests;
  }
  if (!r.ok) {
    std::string message(std::min<uint64_t>(r.bytes, 4096), '\0');
    recvBytes(lane.socket.fd(), message.data(), message.size(), deadline, lane.peer);
    recvBytes(lane.socket.fd(), nullptr, r.bytes - message.size(), deadline, lane.peer);
    DTRAIN_THROW(CommError, "{} refused {} of partition {}: {}", lane.peer, opName(h.op), h.partition, message);
  }
  DTRAIN_CHECK_AS(ProtocolError, r.bytes == intoBytes, "{} answered {} of partition {} with {} bytes (expected {})",
                  lane.peer, opName(h.op), h.partition, r.bytes, intoBytes);
  if (intoBytes > 0) recvBytes(lane.socket.fd(), into, intoBytes, deadline, lane.peer);
  return r;
}

void Client::enqueue(int server, std::function<void(Lane&)> task) {
  {
    std::lock_guard lock(mu_);
    ++pending_;
  }
  Lane& lane = *lanes_.at(static_cast<size_t>(server));
  auto wrapped = [this, task = std::move(task)](Lane& l) {
    std::string failed;
    bool skip = false;
    {
      std::lock_guard lock(mu_);
      skip = !failure_.empty();  // after a failure the step is lost: do not talk further
    }
    if (!skip) {
      try {
        task(l);
      } catch (const std::exception& e) {
        failed = e.what();
      }
    }
    std::lock_guard lock(mu_);
    if (!failed.empty() && failure_.empty()) failure_ = failed;
    --pending_;
    cv_.notify_all();
  };
  {
    std::lock_guard lock(lane.mu);
    lane.tasks.push_back(std::move(wrapped));
  }
  lane.cv.notify_one();
}

void Client::pushPullAsync(uint32_t partition, int64_t step, double lr, const float* grad, float* params,
                           int64_t samples) {
  const Partition& p = plan_.at(partition);
  const size_t bytes = p.count * sizeof(float);
  enqueue(p.server, [this, partition, step, lr, grad, params, bytes, samples](Lane& lane) {
    const bool counted = samples >= 0;
    const auto trailer = static_cast<uint64_t>(counted ? samples : 0);
    const size_t trailerBytes = counted ? sizeof(trailer) : 0;
    ReplyHeader r = roundTrip(lane, RequestHeader{.op = counted ? Op::kPushPullCounted : Op::kPushPull,
                                                  .partition = partition, .step = step, .lr = lr,
                                                  .bytes = bytes + trailerBytes},
                              grad, params, bytes, &trailer, trailerBytes);
    std::lock_guard lock(mu_);
    const int64_t s = std::max<int64_t>(0, step + 1 - r.minClock);
    if (staleness_.count == 0) staleness_.min = staleness_.max = s;
    staleness_.min = std::min(staleness_.min, s);
    staleness_.max = std::max(staleness_.max, s);
    staleness_.sum += static_cast<double>(s);
    ++staleness_.count;
  });
}

void Client::pullAsync(uint32_t partition, int64_t step, float* params) {
  const Partition& p = plan_.at(partition);
  const size_t bytes = p.count * sizeof(float);
  enqueue(p.server, [this, partition, step, params, bytes](Lane& lane) {
    roundTrip(lane, RequestHeader{.op = Op::kPull, .partition = partition, .step = step}, nullptr, params, bytes);
  });
}

void Client::init(uint32_t partition, int64_t step, const std::vector<uint8_t>& payload) {
  const Partition& p = plan_.at(partition);
  enqueue(p.server, [this, partition, step, &payload](Lane& lane) {
    roundTrip(lane, RequestHeader{.op = Op::kInit, .partition = partition, .step = step, .bytes = payload.size()},
              payload.data(), nullptr, 0);
  });
  wait();
}

std::vector<float> Client::fetch(uint32_t partition) {
  const Partition& p = plan_.at(partition);
  // The reply's size depends on the optimizer's state buffers: read the header, then as many bytes as it says.
  std::vector<float> out;
  enqueue(p.server, [this, partition, &out](Lane& lane) {
    uint8_t header[kHeaderBytes];
    encode(RequestHeader{.op = Op::kFetch, .partition = partition}, header);
    sendFrame(lane.socket.fd(), header, nullptr, 0, lane.peer);
    const Deadline deadline(options_.timeout);
    recvBytes(lane.socket.fd(), header, kHeaderBytes, deadline, lane.peer);
    ReplyHeader r = decodeReply(header);
    if (!r.ok) {
      std::string message(r.bytes, '\0');
      recvBytes(lane.socket.fd(), message.data(), message.size(), deadline, lane.peer);
      DTRAIN_THROW(CommError, "{} refused fetch of partition {}: {}", lane.peer, partition, message);
    }
    DTRAIN_CHECK_AS(ProtocolError, r.bytes % sizeof(float) == 0, "{}: fetch reply of {} bytes", lane.peer, r.bytes);
    out.resize(r.bytes / sizeof(float));
    recvBytes(lane.socket.fd(), out.data(), r.bytes, deadline, lane.peer);
    std::lock_guard lock(mu_);
    traffic_.bytesSent += kHeaderBytes;
    traffic_.bytesReceived += kHeaderBytes + r.bytes;
  });
  wait();
  return out;
}

std::vector<float> Client::exchange(Lane& lane, const RequestHeader& h, const std::vector<uint8_t>& payload) {
  uint8_t header[kHeaderBytes];
  encode(h, header);
  sendFrame(lane.socket.fd(), header, payload.data(), payload.size(), lane.peer);
  const Deadline deadline(options_.timeout + options_.timeout / 2);
  recvBytes(lane.socket.fd(), header, kHeaderBytes, deadline, lane.peer);
  ReplyHeader r = decodeReply(header);
  {
    std::lock_guard lock(mu_);
    traffic_.bytesSent += kHeaderBytes + payload.size();
    traffic_.bytesReceived += kHeaderBytes + r.bytes;
    ++traffic_.requests;
  }
  if (!r.ok) {
    std::string message(r.bytes, '\0');
    recvBytes(lane.socket.fd(), message.data(), message.size(), deadline, lane.peer);
    DTRAIN_THROW(CommError, "{} refused {} of table {}: {}", lane.peer, opName(h.op), h.partition, message);
  }
  DTRAIN_CHECK_AS(ProtocolError, r.bytes % sizeof(float) == 0, "{}: {} reply of {} bytes", lane.peer, opName(h.op),
                  r.bytes);
  std::vector<float> out(r.bytes / sizeof(float));
  recvBytes(lane.socket.fd(), out.data(), r.bytes, deadline, lane.peer);
  return out;
}

namespace {

template <typename T>
void appendRaw(std::vector<uint8_t>& out, const T* p, size_t n) {
  const size_t at = out.size();
  out.resize(at + n * sizeof(T));
  if (n > 0) std::memcpy(out.data() + at, p, n * sizeof(T));
}

std::vector<uint8_t> rowsPayload(const std::vector<int64_t>& ids, const std::vector<float>* floats) {
  std::vector<uint8_t> out;
  const auto n = static_cast<uint64_t>(ids.size());
  appendRaw(out, &n, 1);
  appendRaw(out, ids.data(), ids.size());
  if (floats) appendRaw(out, floats->data(), floats->size());
  return out;
}

}  // namespace

void Client::sparsePullAsync(uint32_t table, int server, int64_t step, std::vector<int64_t> ids, float* out) {
  enqueue(server, [this, table, step, ids = std::move(ids), out](Lane& lane) {
    std::vector<uint8_t> payload = rowsPayload(ids, nullptr);
    std::vector<float> rows = exchange(
        lane, RequestHeader{.op = Op::kSparsePull, .partition = table, .step = step, .bytes = payload.size()}, payload);
    DTRAIN_CHECK_AS(ProtocolError, ids.empty() || rows.size() % ids.size() == 0,
                    "{}: sparse pull of {} rows answered with {} floats", lane.peer, ids.size(), rows.size());
    std::copy(rows.begin(), rows.end(), out);
  });
}

void Client::sparsePushAsync(uint32_t table, int server, int64_t step, double lr, std::vector<int64_t> ids,
                             std::vector<float> grads) {
  enqueue(server, [this, table, step, lr, ids = std::move(ids), grads = std::move(grads)](Lane& lane) {
    std::vector<uint8_t> payload = rowsPayload(ids, &grads);
    exchange(lane,
             RequestHeader{.op = Op::kSparsePush, .partition = table, .step = step, .lr = lr, .bytes = payload.size()},
             payload);
  });
}

std::vector<float> Client::sparseFetch(uint32_t table, int server, int64_t firstRow, int64_t rows) {
  std::vector<float> out;
  enqueue(server, [this, table, firstRow, rows, &out](Lane& lane) {
    std::vector<uint8_t> payload;
    appendRaw(payload, &firstRow, 1);
    appendRaw(payload, &rows, 1);
    out = exchange(lane, RequestHeader{.op = Op::kSparseFetch, .partition = table, .bytes = payload.size()}, payload);
  });
  wait();
  return out;
}

void Client::sparseInit(uint32_t table, int server, int64_t step, int64_t firstRow, int64_t rows, int64_t steps,
                        std::span<const float> floats) {
  enqueue(server, [this, table, step, firstRow, rows, steps, floats](Lane& lane) {
    std::vector<uint8_t> payload;
    appendRaw(payload, &firstRow, 1);
    appendRaw(payload, &rows, 1);
    appendRaw(payload, &steps, 1);
    appendRaw(payload, floats.data(), floats.size());
    exchange(lane, RequestHeader{.op = Op::kSparseInit, .partition = table, .step = step, .bytes = payload.size()},
             payload);
  });
  wait();
}

namespace {

void appendString(std::vector<uint8_t>& out, const std::string& s) {
  const auto n = static_cast<uint32_t>(s.size());
  appendRaw(out, &n, 1);
  appendRaw(out, s.data(), s.size());
}

}  // namespace

void Client::sparseSave(bool exported, const std::string& dir, int64_t step, const std::string& token) {
  std::vector<uint8_t> payload;
  const uint8_t kind = exported ? 1 : 0;
  appendRaw(payload, &kind, 1);
  appendString(payload, dir);
  appendString(payload, token);
  for (auto& l : lanes_)
    enqueue(l->server, [this, step, payload](Lane& lane) {
      exchange(lane, RequestHeader{.op = Op::kSparseSave, .step = step, .bytes = payload.size()}, payload);
    });
  wait();
}

void Client::sparseLoad(const std::vector<std::string>& files, bool withState, int64_t step) {
  std::vector<uint8_t> payload;
  const uint8_t state = withState ? 1 : 0;
  appendRaw(payload, &state, 1);
  const auto count = static_cast<uint32_t>(files.size());
  appendRaw(payload, &count, 1);
  for (const auto& f : files) appendString(payload, f);
  for (auto& l : lanes_)
    enqueue(l->server, [this, step, payload](Lane& lane) {
      exchange(lane, RequestHeader{.op = Op::kSparseLoad, .step = step, .bytes = payload.size()}, payload);
    });
  wait();
}

void Client::wait() {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return pending_ == 0; });
  if (!failure_.empty()) DTRAIN_THROW(CommError, "{}", failure_);
}

std::vector<WorkerTally> Client::barrier(int64_t count) {
  std::vector<WorkerTally> tallies;
  enqueue(0, [this, count, &tallies](Lane& lane) {
    const std::vector<float> reply = exchange(lane, RequestHeader{.op = Op::kBarrier, .step = count}, {});
    tallies = decodeTallies(reply.data(), reply.size() * sizeof(float));
  });
  wait();
  return tallies;
}

std::vector<std::vector<WorkerTally>> Client::otherTallies(const std::vector<int32_t>& gone) {
  std::vector<uint8_t> payload(sizeof(uint32_t) + gone.size() * sizeof(int32_t));
  const auto n = static_cast<uint32_t>(gone.size());
  std::memcpy(payload.data(), &n, sizeof(n));
  if (!gone.empty()) std::memcpy(payload.data() + sizeof(n), gone.data(), gone.size() * sizeof(int32_t));
  std::vector<std::vector<WorkerTally>> out(lanes_.size());
  for (auto& l : lanes_) {
    if (l->server == 0) continue;
    enqueue(l->server, [this, &payload, &out](Lane& lane) {
      const std::vector<float> reply =
          exchange(lane, RequestHeader{.op = Op::kTally, .bytes = payload.size()}, payload);
      out[static_cast<size_t>(lane.server)] = decodeTallies(reply.data(), reply.size() * sizeof(float));
    });
  }
  wait();
  return out;
}

void Client::bye() {
  for (auto& l : lanes_) {
    enqueue(l->server, [](Lane& lane) {
      uint8_t header[kHeaderBytes];
      encode(RequestHeader{.op = Op::kBye}, header);
      try {
        sendFrame(lane.socket.fd(), header, nullptr, 0, lane.peer);
        recvBytes(lane.socket.fd(), header, kHeaderBytes, Deadline(std::chrono::seconds(10)), lane.peer);
      } catch (const Error&) {  // the job is over either way
      }
      ::shutdown(lane.socket.fd(), SHUT_RDWR);
    });
  }
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return pending_ == 0; });
}

Client::Staleness Client::takeStaleness() {
  std::lock_guard lock(mu_);
  return std::exchange(staleness_, Staleness{});
}

ClientTraffic Client::traffic() const {
  std::lock_guard lock(mu_);
  return traffic_;
}

}  // namespace dtrain::train::ps
