// TcpStoreClient's pipelined operations: multiSet, multiGet and batch write many requests before reading the
// replies (one round trip per chunk instead of one per request). Single requests are in tcp_store_client.cpp.
#include "rendezvous/tcp_store_client.h"

#include <unistd.h>

#include "lib/common/error.h"
#include "rendezvous/tcp_store_client_internal.h"

namespace dtrain::rendezvous {

using proto::Op;
using proto::Status;
using client_detail::capWait;
using client_detail::kServerGrace;
using client_detail::unexpected;

namespace {

// A pipelined batch is written in chunks of this many requests (or bytes), and each chunk's replies are read
// before the next is sent: bounded buffers on both ends, and the server's reply backpressure never meets a
// client that is still writing.
constexpr size_t kPipelineRequests = 512;
constexpr size_t kPipelineBytes = 1 << 20;

}  // namespace

void TcpStoreClient::pipeline(size_t count, const Encode& encode, const Decode& decode, Millis readTimeout,
                              std::string_view what) {
  std::lock_guard<std::mutex> lock(mu_);
  size_t next = 0;
  std::string error;  // the first kError reply's message; the other replies are still read
  while (next < count) {
    checkUsable();
    out_.clear();
    const size_t first = next;
    while (next < count && next - first < kPipelineRequests && out_.size() < kPipelineBytes) {
      size_t start = proto::beginFrame(out_);
      ByteWriter w(out_);
      encode(w, next);  // writes the op byte and the fields
      proto::finishFrame(out_, start);
      ++next;
    }
    Op firstOp = static_cast<Op>(out_[proto::kFrameHeaderBytes]);
    Deadline deadline(readTimeout);
    try {
      sendAll(deadline);
      readReplies(next - first, readTimeout, deadline, [&](size_t i, Status status, std::string_view fields) {
        if (status == Status::kError) {
          if (error.empty()) error = std::string(ByteReader(fields).getBytes());
        } else {
          decode(first + i, status, fields);
        }
      });
    } catch (Error& e) {
      if (broken_.empty()) {  // e.g. a reply of the wrong shape: the rest of the stream cannot be trusted
        broken_ = e.what();
        ::close(fd_);
        fd_ = -1;
      }
      auto message = fmt::format("{} (during a batch of {} requests starting with {}, {})", e.what(), count,
                                 proto::opName(firstOp), what);
      if (dynamic_cast<TimeoutError*>(&e)) DTRAIN_THROW(TimeoutError, "{}", message);
      DTRAIN_THROW(NetworkError, "{}", message);
    }
    roundTrips_.fetch_add(1, std::memory_order_relaxed);
    if (!error.empty()) break;  // later chunks are not sent
  }
  if (!error.empty()) DTRAIN_THROW(Error, "{}", error);
}

void TcpStoreClient::multiSet(const std::vector<std::pair<std::string, std::string>>& entries) {
  for (const auto& [key, value] : entries) {
    checkKey(key);
    checkValue(value);
  }
  pipeline(
      entries.size(),
      [&](ByteWriter& w, size_t i) {
        w.put<uint8_t>(static_cast<uint8_t>(Op::kSet));
        w.putBytes(entries[i].first);
        w.putBytes(entries[i].second);
      },
      [&](size_t, Status status, std::string_view) {
        if (status != Status::kOk) unexpected(address_, Op::kSet, status);
      },
      timeout_, entries.empty() ? std::string_view() : std::string_view(entries.front().first));
}

std::vector<std::optional<std::string>> TcpStoreClient::multiGet(const std::vector<std::string>& keys) {
  for (const auto& key : keys) checkKey(key);
  std::vector<std::optional<std::string>> values(keys.size());
  pipeline(
      keys.size(),
      [&](ByteWriter& w, size_t i) {
        w.put<uint8_t>(static_cast<uint8_t>(Op::kTryGet));
        w.putBytes(keys[i]);
      },
      [&](size_t i, Status status, std::string_view fields) {
        if (status == Status::kNotFound) return;
        if (status != Status::kOk) unexpected(address_, Op::kTryGet, status);
        values[i] = std::string(ByteReader(fields).getBytes());
      },
      timeout_, keys.empty() ? std::string_view() : std::string_view(keys.front()));
  return values;
}

namespace {
Op wireOp(StoreOp::Kind kind) {
  switch (kind) {
    case StoreOp::Kind::kSet: return Op::kSet;
    case StoreOp::Kind::kTryGet: return Op::kTryGet;
    case StoreOp::Kind::kGet: return Op::kGet;
    case StoreOp::Kind::kAdd: return Op::kAdd;
    case StoreOp::Kind::kCompareSet: return Op::kCompareSet;
    case StoreOp::Kind::kAppend: return Op::kAppend;
    case StoreOp::Kind::kRemove: return Op::kDelete;
  }
  return Op::kPing;
}
}  // namespace

std::vector<StoreResult> TcpStoreClient::batch(const std::vector<StoreOp>& ops) {
  // The server answers the ops in order, parking at a get whose key is missing: the batch may take the sum of
  // its gets' timeouts, plus the usual timeout for the rest.
  Millis readTimeout = timeout_;
  for (const auto& op : ops) {
    checkKey(op.key);
    checkValue(op.value);
    checkValue(op.expected);
    if (op.kind == StoreOp::Kind::kGet) readTimeout += capWait(op.timeout) + kServerGrace;
  }
  std::vector<StoreResult> results(ops.size());
  pipeline(
      ops.size(),
      [&](ByteWriter& w, size_t i) {
        const auto& op = ops[i];
        w.put<uint8_t>(static_cast<uint8_t>(wireOp(op.kind)));
        w.putBytes(op.key);
        switch (op.kind) {
          case StoreOp::Kind::kSet:
          case StoreOp::Kind::kAppend: w.putBytes(op.value); break;
          case StoreOp::Kind::kGet: w.put<uint64_t>(static_cast<uint64_t>(capWait(op.timeout).count())); break;
          case StoreOp::Kind::kAdd: w.put<int64_t>(op.delta); break;
          case StoreOp::Kind::kCompareSet:
            w.putBytes(op.expected);
            w.putBytes(op.value);
            break;
          case StoreOp::Kind::kTryGet:
          case StoreOp::Kind::kRemove: break;
        }
      },
      [&](size_t i, Status status, std::string_view fields) {
        const auto kind = ops[i].kind;
        auto& r = results[i];
        if (kind == StoreOp::Kind::kGet && status == Status::kTimeout) return;  // value stays nullopt
        if (kind == StoreOp::Kind::kTryGet && status == Status::kNotFound) return;
        if (status != Status::kOk) unexpected(address_, wireOp(kind), status);
        ByteReader reader(fields);
        switch (kind) {
          case StoreOp::Kind::kTryGet:
          case StoreOp::Kind::kGet:
          case StoreOp::Kind::kCompareSet: r.value = std::string(reader.getBytes()); break;
          case StoreOp::Kind::kAdd: r.number = reader.get<int64_t>(); break;
          case StoreOp::Kind::kRemove: r.number = reader.get<uint8_t>(); break;
          case StoreOp::Kind::kSet:
          case StoreOp::Kind::kAppend: break;
        }
      },
      readTimeout, ops.empty() ? std::string_view() : std::string_view(ops.front().key));
  return results;
}

}  // namespace dtrain::rendezvous
