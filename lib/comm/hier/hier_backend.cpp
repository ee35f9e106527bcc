#include "lib/comm/hier/hier_backend.h"

#include <algorithm>

#include "lib/comm/reduce.h"
#include "lib/common/error.h"

namespace dtrain::comm::hier {

HierBackend::HierBackend(BackendOptions options, HierOptions hier)
    : Backend(std::move(options)), hier_(std::move(hier)) {
  const int n = size();
  int localSize = 0;
  for (int r = 0; r < n; ++r) {
    const auto node = peers_[static_cast<size_t>(r)].nodeRank;
    if (node == options_.nodeRank) ++localSize;
    if (localIndex(r) == 0) leaders_.push_back(r);
  }
  BackendOptions local = options_;
  local.groupName = key(fmt::format("hier/node{}", options_.nodeRank));
  local.rank = localIndex(rank());
  local.size = localSize;
  local.localRank = local.rank;
  local.localSize = localSize;
  local.worldRanks.clear();  // its ranks are this node's, not this communicator's
  local_ = std::make_shared<shm::ShmBackend>(local, hier_.shm);
  if (leaders_.size() == 1) return;
  auto leader = std::find(leaders_.begin(), leaders_.end(), rank());
  if (leader != leaders_.end()) {
    BackendOptions across = options_;
    across.groupName = key("hier/leaders");
    across.rank = static_cast<int>(leader - leaders_.begin());
    across.size = static_cast<int>(leaders_.size());
    across.localRank = 0;
    across.localSize = 1;
    across.worldRanks.clear();  // its ranks are the leaders', not this communicator's
    leaderGroup_ = std::make_shared<tcp::TcpBackend>(across, hier_.tcp);
  }
  BackendOptions all = options_;
  all.groupName = key("hier/all");
  all_ = std::make_shared<tcp::TcpBackend>(all, hier_.tcp);
}

HierBackend::~HierBackend() { shutdown(); }

std::shared_ptr<Backend> HierBackend::makeGroup(BackendOptions options) {
  return std::make_shared<HierBackend>(std::move(options), hier_);
}

int HierBackend::localIndex(int globalRank) const {
  const auto node = peers_[static_cast<size_t>(globalRank)].nodeRank;
  int index = 0;
  for (int r = 0; r < globalRank; ++r)
    if (peers_[static_cast<size_t>(r)].nodeRank == node) ++index;
  return index;
}

// The inner communicators are driven directly on this backend's thread (Backend::runInline): they are used
// by nobody else, and their own queues stay idle.
void HierBackend::doAllreduce(void* buf, size_t count, DType dtype, ReduceOp op, const Deadline& deadline) {
  const TensorView view = TensorView::flat(buf, count, dtype);
  if (!all_) return local_->runInline(Operation::allreduce(view, op), deadline);
  // Sum everywhere and divide once at the end: an average over nodes of different sizes must weight ranks,
  // not nodes.
  const ReduceOp cop = combiningOp(op);
  local_->reduceToRoot(buf, count, dtype, cop, 0, deadline);
  if (leaderGroup_) {
    leaderGroup_->runInline(Operation::allreduce(view, cop), deadline);
    if (op == ReduceOp::kAvg) divide(buf, count, dtype, size());
  }
  local_->runInline(Operation::broadcast(view, 0), deadline);
}

void HierBackend::doBroadcast(void* buf, size_t count, DType dtype, int root, const Deadline& deadline) {
  const TensorView view = TensorView::flat(buf, count, dtype);
  if (!all_) return local_->runInline(Operation::broadcast(view, root), deadline);
  const int rootNode = peers_[static_cast<size_t>(root)].nodeRank;
  const bool onRootNode = options_.nodeRank == rootNode;
  if (onRootNode) local_->runInline(Operation::broadcast(view, localIndex(root)), deadline);
  if (leaderGroup_) {
    const int rootLeader = static_cast<int>(std::find_if(leaders_.begin(), leaders_.end(), [&](int r) {
                                              return peers_[static_cast<size_t>(r)].nodeRank == rootNode;
                                            }) - leaders_.begin());
    leaderGroup_->runInline(Operation::broadcast(view, rootLeader), deadline);
  }
  if (!onRootNode) local_->runInline(Operation::broadcast(view, 0), deadline);
}

void HierBackend::doAllgather(const void* in, void* out, size_t countPerRank, DType dtype,
                              const Deadline& deadline) {
  const auto n = static_cast<size_t>(size());
  const Operation op = Operation::allgather(TensorView::flat(in, countPerRank, dtype),
                                            TensorView::flat(out, countPerRank * n, dtype));
  (all_ ? *all_ : static_cast<Backend&>(*local_)).runInline(op, deadline);
}

void HierBackend::doReduceScatter(const void* in, void* out, size_t countPerRank, DType dtype, ReduceOp op,
                                  const Deadline& deadline) {
  const auto n = static_cast<size_t>(size());
  const Operation rs = Operation::reduceScatter(TensorView::flat(in, countPerRank * n, dtype),
                                                TensorView::flat(out, countPerRank, dtype), op);
  (all_ ? *all_ : static_cast<Backend&>(*local_)).runInline(rs, deadline);
}

void HierBackend::doSend(const void* buf, size_t bytes, int peer, const Deadline& deadline) {
  const TensorView view = TensorView::flat(buf, bytes, DType::kUInt8);
  if (peers_[static_cast<size_t>(peer)].nodeRank == options_.nodeRank)
    return local_->runInline(Operation::send(view, localIndex(peer)), deadline);
  all_->runInline(Operation::send(view, peer), deadline);
}

void HierBackend::doRecv(void* buf, size_t bytes, int peer, const Deadline& deadline) {
  const TensorView view = TensorView::flat(buf, bytes, DType::kUInt8);
  if (peers_[static_cast<size_t>(peer)].nodeRank == options_.nodeRank)
    return local_->runInline(Operation::recv(view, localIndex(peer)), deadline);
  all_->runInline(Operation::recv(view, peer), deadline);
}

void HierBackend::doBarrier(const Deadline& deadline) {
  local_->runInline(Operation::barrier(), deadline);
  if (!all_) return;
  if (leaderGroup_) leaderGroup_->runInline(Operation::barrier(), deadline);
  local_->runInline(Operation::barrier(), deadline);
}

}  // namespace dtrain::comm::hier
