// The `tcp` backend: collectives over a full mesh of TCP connections (works within and across nodes).
//
// Algorithms (each chosen per call from the message size; thresholds measured on a 2-core machine, see
// docs/collectives.md and TcpOptions):
//  - allreduce, small: recursive doubling. log2(n) rounds, each a full-buffer exchange with rank ^ 2^k and a
//    local combine; latency-optimal. A non-power-of-two world first folds the extra ranks into partners and
//    hands them the result at the end. Pairs combine the same two operands, so results stay bitwise equal.
//  - allreduce, large: pipelined ring reduce-scatter + all-gather (ring.h), block by block (1 MiB blocks,
//    all streamed through one plan, so a block's all-gather re-sends data still in cache).
//  - broadcast: binomial tree for small messages, pipelined chain (root -> root+1 -> ...) for large ones.
//  - allgather: pipelined ring. reduce_scatter: pipelined ring (rank r ends with block r).
//  - barrier: dissemination (log2(n) rounds of one byte).
//  - send/recv: the pair's connection, in order.
// Thread-safety: as Backend (one operation at a time).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lib/comm/backend.h"
#include "lib/comm/tcp/mesh.h"
#include "lib/comm/tcp/ring.h"

namespace dtrain::comm::tcp {

// The tcp backend's knobs. A negative size keeps the environment variable named beside it, else the measured
// default (docs/collectives.md); an empty host the rule below. Read once, when the backend is created;
// malformed environment values are a UsageError. Sub-groups (newGroup) inherit them.
struct TcpOptions {
  int64_t smallBytes = -1;   // DTRAIN_TCP_SMALL_BYTES: allreduce up to this size uses recursive doubling
  int64_t chunkBytes = -1;   // DTRAIN_TCP_CHUNK_BYTES: ring pipeline unit (receive, reduce, forward)
  int64_t blockBytes = -1;   // DTRAIN_TCP_BLOCK_BYTES: ring all-reduce runs block by block (streamed)
  int64_t bufferBytes = -1;  // DTRAIN_TCP_BUFFER_BYTES: SO_SNDBUF/SO_RCVBUF; 0 = kernel autotuning
  int64_t spinMicros = -1;   // DTRAIN_COMM_SPIN_US: busy-wait this long before sleeping on a socket
  // The address to listen on and publish. Empty: DTRAIN_COMM_HOST, else 127.0.0.1 when every rank is on one
  // node, else the first non-loopback IPv4 address of this host.
  std::string host;
};

class TcpBackend : public Backend {
 public:
  // Blocks until every rank of the group connected (options.timeout). Throws CommError/ConfigError, and
  // UsageError on a malformed DTRAIN_TCP_* / DTRAIN_COMM_SPIN_US value.
  explicit TcpBackend(BackendOptions options, TcpOptions tcp = {});
  ~TcpBackend() override;
  std::string name() const override { return "tcp"; }

 protected:
  void doAllreduce(void* buf, size_t count, DType dtype, ReduceOp op, const Deadline& deadline) override;
  void doBroadcast(void* buf, size_t count, DType dtype, int root, const Deadline& deadline) override;
  void doAllgather(const void* in, void* out, size_t countPerRank, DType dtype, const Deadline& deadline) override;
  void doReduceScatter(const void* in, void* out, size_t countPerRank, DType dtype, ReduceOp op,
                       const Deadline& deadline) override;
  void doSend(const void* buf, size_t bytes, int peer, const Deadline& deadline) override;
  void doRecv(void* buf, size_t bytes, int peer, const Deadline& deadline) override;
  void doBarrier(const Deadline& deadline) override;
  std::shared_ptr<Backend> makeGroup(BackendOptions options) override;

 private:
  Waiter waiter(const Deadline& deadline) const;
  char* scratch(size_t bytes);  // grow-only, 64-byte aligned, reused across calls
  RingPlan ringPlan(DType dtype, ReduceOp op);
  void allreduceRecursiveDoubling(char* buf, size_t count, DType dtype, ReduceOp op, Waiter& w);
  void allreduceRing(char* buf, size_t count, DType dtype, ReduceOp op, Waiter& w);
  void broadcastTree(char* buf, size_t bytes, int root, Waiter& w);
  void broadcastChain(char* buf, size_t bytes, int root, Waiter& w);

  TcpOptions tcp_;  // as given (unresolved), for sub-groups
  std::unique_ptr<Mesh> mesh_;
  size_t smallBytes_;
  size_t chunkBytes_;
  size_t blockBytes_;
  std::chrono::microseconds spin_;
  std::vector<char> scratchStore_;
  char* staging_ = nullptr;  // chunkBytes_ for the ring engine
  std::vector<char> stagingStore_;
};

}  // namespace dtrain::comm::tcp
