#include "lib/train/ps_protocol.h"

#include <bit>
#include <cstring>
#include <limits>

#include <fmt/format.h>

#include "lib/common/error.h"
#include "lib/common/socket.h"

namespace dtrain::train::ps {

static_assert(std::endian::native == std::endian::little, "the parameter-server protocol is little-endian");

namespace {

template <typename T>
void put(uint8_t*& p, T v) {
  std::memcpy(p, &v, sizeof(T));
  p += sizeof(T);
}
template <typename T>
T take(const uint8_t*& p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  p += sizeof(T);
  return v;
}

void checkCommon(uint32_t magic, const uint8_t* reserved, uint64_t bytes, const char* what) {
  DTRAIN_CHECK_AS(ProtocolError, magic == kMagic, "parameter server: {} with bad magic {:#x} (expected {:#x})", what,
                  magic, kMagic);
  DTRAIN_CHECK_AS(ProtocolError, reserved[0] == 0 && reserved[1] == 0 && reserved[2] == 0,
                  "parameter server: {} with non-zero reserved bytes", what);
  DTRAIN_CHECK_AS(ProtocolError, bytes <= kMaxPayloadBytes,
                  "parameter server: {} announces a payload of {} bytes (at most {})", what, bytes, kMaxPayloadBytes);
}

}  // namespace

const char* opName(Op op) {
  switch (op) {
    case Op::kHello: return "hello";
    case Op::kInit: return "init";
    case Op::kPushPull: return "push-pull";
    case Op::kPull: return "pull";
    case Op::kFetch: return "fetch";
    case Op::kBye: return "bye";
    case Op::kSparsePull: return "sparse-pull";
    case Op::kSparsePush: return "sparse-push";
    case Op::kSparseFetch: return "sparse-fetch";
    case Op::kSparseInit: return "sparse-init";
    case Op::kBarrier: return "barrier";
    case Op::kSparseSave: return "sparse-save";
    case Op::kSparseLoad: return "sparse-load";
    case Op::kPushPullCounted: return "push-pull-counted";
    case Op::kTally: return "tally";
  }
  return "?";
}

bool validOp(uint8_t op) { return op >= 1 && op <= 15; }

void encode(const RequestHeader& h, uint8_t* out) {
  uint8_t* p = out;
  put(p, kMagic);
  put(p, static_cast<uint8_t>(h.op));
  put(p, uint8_t{0});
  put(p, uint8_t{0});
  put(p, uint8_t{0});
  put(p, h.partition);
  put(p, h.step);
  put(p, h.lr);
  put(p, h.bytes);
}

void encode(const ReplyHeader& h, uint8_t* out) {
  uint8_t* p = out;
  put(p, kMagic);
  put(p, static_cast<uint8_t>(h.ok ? 0 : 1));
  put(p, uint8_t{0});
  put(p, uint8_t{0});
  put(p, uint8_t{0});
  put(p, h.partition);
  put(p, h.version);
  put(p, h.minClock);
  put(p, h.bytes);
}

RequestHeader decodeRequest(const uint8_t* in) {
  const uint8_t* p = in;
  const auto magic = take<uint32_t>(p);
  const auto op = take<uint8_t>(p);
  const uint8_t* reserved = p;
  p += 3;
  RequestHeader h;
  h.partition = take<uint32_t>(p);
  h.step = take<int64_t>(p);
  h.lr = take<double>(p);
  h.bytes = take<uint64_t>(p);
  checkCommon(magic, reserved, h.bytes, "request");
  DTRAIN_CHECK_AS(ProtocolError, validOp(op), "parameter server: request with unknown op {}", op);
  h.op = static_cast<Op>(op);
  return h;
}

ReplyHeader decodeReply(const uint8_t* in) {
  const uint8_t* p = in;
  const auto magic = take<uint32_t>(p);
  const auto status = take<uint8_t>(p);
  const uint8_t* reserved = p;
  p += 3;
  ReplyHeader h;
  h.partition = take<uint32_t>(p);
  h.version = take<int64_t>(p);
  h.minClock = take<int64_t>(p);
  h.bytes = take<uint64_t>(p);
  checkCommon(magic, reserved, h.bytes, "reply");
  DTRAIN_CHECK_AS(ProtocolError, status <= 1, "parameter server: reply with unknown status {}", status);
  h.ok = status == 0;
  return h;
}

void sendFrame(int fd, const uint8_t* header, const void* payload, size_t payloadBytes, const std::string& peer,
               const void* trailer, size_t trailerBytes) {
  DTRAIN_CHECK_AS(CommError, net::sendAll(fd, header, kHeaderBytes), "parameter server: cannot send to {}: {}", peer,
                  std::strerror(errno));
  if (payloadBytes > 0)
    DTRAIN_CHECK_AS(CommError, net::sendAll(fd, payload, payloadBytes), "parameter server: cannot send to {}: {}",
                    peer, std::strerror(errno));
  if (trailerBytes > 0)
    DTRAIN_CHECK_AS(CommError, net::sendAll(fd, trailer, trailerBytes), "parameter server: cannot send to {}: {}",
                    peer, std::strerror(errno));
}

void recvBytes(int fd, void* into, size_t bytes, const Deadline& deadline, const std::string& peer) {
  if (into == nullptr) {  // discard, in bounded chunks
    uint8_t sink[64 * 1024];
    while (bytes > 0) {
      const size_t n = std::min(bytes, sizeof(sink));
      recvBytes(fd, sink, n, deadline, peer);
      bytes -= n;
    }
    return;
  }
  if (net::recvAll(fd, into, bytes, deadline)) return;
  const int err = errno;
  // `peer` names the server ("parameter server 0 (host:port)"): the message read "parameter server: parameter
  // server 0 (...) closed the connection", and "... (host:port) Connection reset by peer" without a colon.
  DTRAIN_THROW(CommError, "{}{}", peer,
               err == 0 ? std::string(" closed the connection")
                        : err == ETIMEDOUT ? std::string(" did not answer in time") : fmt::format(": {}", std::strerror(err)));
}

std::vector<uint8_t> encodeTallies(const std::vector<WorkerTally>& tallies) {
  std::vector<uint8_t> out(tallies.size() * kWorkerTallyBytes);
  uint8_t* p = out.data();
  for (const WorkerTally& t : tallies) {
    put(p, t.samples);
    put(p, t.steps);
    put(p, static_cast<int64_t>(t.state));
    put(p, t.partitions);
    put(p, t.partialPartitions);
    put(p, t.partialSamples);
  }
  return out;
}

std::vector<WorkerTally> decodeTallies(const void* data, size_t bytes) {
  DTRAIN_CHECK_AS(ProtocolError, bytes % kWorkerTallyBytes == 0,
                  "parameter server: tally of {} bytes (expected a multiple of {}: per worker samples, steps, "
                  "state, partitions, partial partitions, partial samples)", bytes, kWorkerTallyBytes);
  std::vector<WorkerTally> out(bytes / kWorkerTallyBytes);
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t w = 0; w < out.size(); ++w) {
    out[w].samples = take<int64_t>(p);
    out[w].steps = take<int64_t>(p);
    const auto state = take<int64_t>(p);
    DTRAIN_CHECK_AS(ProtocolError, state >= 0 && state <= 3,
                    "parameter server: barrier reply: worker {} in unknown state {} (expected 0..3)", w, state);
    out[w].state = static_cast<WorkerTally::State>(state);
    out[w].partitions = take<int64_t>(p);
    out[w].partialPartitions = take<int64_t>(p);
    out[w].partialSamples = take<int64_t>(p);
  }
  return out;
}

std::vector<WorkerTally> mergeTallies(const std::vector<std::vector<WorkerTally>>& byServer) {
  if (byServer.empty()) return {};
  const size_t workers = byServer[0].size();
  for (size_t k = 1; k < byServer.size(); ++k)
    DTRAIN_CHECK_AS(ProtocolError, byServer[k].size() == workers,
                    "parameter server {}: a tally of {} workers, server 0's has {}", k, byServer[k].size(), workers);
  std::vector<WorkerTally> out(workers);
  for (size_t w = 0; w < workers; ++w) {
    WorkerTally& m = out[w];
    m.state = byServer[0][w].state;
    m.steps = std::numeric_limits<int64_t>::max();
    for (const auto& server : byServer) {
      const WorkerTally& t = server[w];
      if (t.state == WorkerTally::State::kLost) m.state = WorkerTally::State::kLost;
      if (t.steps < m.steps) m.steps = t.steps, m.samples = t.samples;
      m.partitions += t.partitions;
    }
    // The step after the whole ones: a server that counted it whole applied all of its partitions, one that holds
    // it as partial some of them.
    for (const auto& server : byServer) {
      const WorkerTally& t = server[w];
      if (t.steps > m.steps) {
        m.partialPartitions += t.partitions;
        m.partialSamples = t.samples - m.samples;
      } else if (t.partialPartitions > 0) {
        m.partialPartitions += t.partialPartitions;
        m.partialSamples = t.partialSamples;
      }
    }
  }
  return out;
}

std::vector<Partition> planPartitions(size_t numParams, int servers, size_t maxFloats) {
  DTRAIN_CHECK(servers >= 1 && maxFloats >= 16, "planPartitions: servers {} maxFloats {}", servers, maxFloats);
  const size_t s = static_cast<size_t>(servers);
  size_t size = std::min(maxFloats, (numParams + s - 1) / s);
  size = std::max<size_t>(16, (size + 15) / 16 * 16);
  size = std::min(size, maxFloats);
  std::vector<Partition> out;
  for (size_t off = 0, i = 0; off < numParams; off += size, ++i)
    out.push_back({off, std::min(size, numParams - off), static_cast<int>(i % s)});
  return out;
}

std::string serverKey(int server) { return fmt::format("ps/server/{}", server); }

}  // namespace dtrain::train::ps
