// The `hier` backend: shared memory inside each node, TCP between nodes.
//
// Ranks are grouped by node (BackendOptions::nodeRank); the lowest global rank of each node is its leader.
// It composes three communicators, created together through the same store:
//   local   — shm over the ranks of this node;
//   leaders — tcp over the node leaders (only on leaders, only with several nodes);
//   all     — tcp over every rank (only with several nodes), for operations that have no hierarchical form.
// allreduce = shm reduce to the leader, tcp allreduce among leaders (ring or recursive doubling), shm
// broadcast back; only one process per node touches the network and the node's cores share the reduction.
// broadcast = shm inside the root's node, tcp among leaders, shm inside the other nodes. barrier = local,
// leaders, local. allgather and reduce_scatter run on `all`; send/recv use shm inside a node, else `all`.
// On a single node every operation is the shm one.
// Thread-safety: as Backend; the inner communicators are driven only from this backend's operations.
#pragma once

#include <memory>
#include <vector>

#include "lib/comm/backend.h"
#include "lib/comm/shm/shm_backend.h"
#include "lib/comm/tcp/tcp_backend.h"

namespace dtrain::comm::hier {

// The knobs of the inner communicators (their environment variables apply as for shm and tcp alone).
struct HierOptions {
  tcp::TcpOptions tcp;
  shm::ShmOptions shm;
};

class HierBackend : public Backend {
 public:
  explicit HierBackend(BackendOptions options, HierOptions hier = {});
  ~HierBackend() override;
  std::string name() const override { return "hier"; }

  int nodeCount() const { return static_cast<int>(leaders_.size()); }

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
  int localIndex(int globalRank) const;  // position among its node's ranks

  HierOptions hier_;
  std::vector<int> leaders_;  // global rank of each node's leader, ascending
  std::shared_ptr<shm::ShmBackend> local_;
  std::shared_ptr<tcp::TcpBackend> leaderGroup_;  // null unless leader with several nodes
  std::shared_ptr<tcp::TcpBackend> all_;          // null on a single node
};

}  // namespace dtrain::comm::hier
