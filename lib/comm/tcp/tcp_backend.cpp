#include "lib/comm/tcp/tcp_backend.h"

#include <cstring>

#include "lib/comm/reduce.h"
#include "lib/comm/tuning.h"
#include "lib/common/error.h"

namespace dtrain::comm::tcp {

namespace {
// Measured on the reference 2-core machine over loopback (docs/collectives.md). With 2 ranks recursive
// doubling moves the same bytes as the ring in one dependent exchange instead of two and wins up to ~256 KiB;
// with more ranks it moves log2(n) x the buffer against the ring's 2(n-1)/n, so the crossover drops (64 KiB).
// 256 KiB ring pieces keep a piece in L2 while it is combined.
constexpr int64_t kDefaultSmallBytesTwoRanks = 256 << 10;
constexpr int64_t kDefaultSmallBytes = 64 << 10;
constexpr int64_t kDefaultChunkBytes = 256 << 10;
// Blocks of 0.5-2 MiB measured alike and ~1.2x faster than one ring over the whole buffer at 64 MiB.
constexpr int64_t kDefaultBlockBytes = 1 << 20;
constexpr int64_t kDefaultSpinMicros = 50;
// Kernel autotuning: fixed 4 MiB buffers measured better once, then markedly worse at 16-32 MiB (queues that
// outgrow the caches) in repeated A/B runs.
constexpr int64_t kDefaultBufferBytes = 0;

size_t roundUp64(int64_t v) { return static_cast<size_t>(std::max<int64_t>(64, (v + 63) / 64 * 64)); }
}  // namespace

TcpBackend::TcpBackend(BackendOptions options, TcpOptions tcp) : Backend(std::move(options)), tcp_(std::move(tcp)) {
  const TcpOptions& t = tcp_;
  smallBytes_ = static_cast<size_t>(tuned(t.smallBytes, "DTRAIN_TCP_SMALL_BYTES",
                                          size() == 2 ? kDefaultSmallBytesTwoRanks : kDefaultSmallBytes));
  chunkBytes_ = roundUp64(tuned(t.chunkBytes, "DTRAIN_TCP_CHUNK_BYTES", kDefaultChunkBytes));
  blockBytes_ = roundUp64(tuned(t.blockBytes, "DTRAIN_TCP_BLOCK_BYTES", kDefaultBlockBytes));
  spin_ = std::chrono::microseconds(tuned(t.spinMicros, "DTRAIN_COMM_SPIN_US", kDefaultSpinMicros));
  stagingStore_.resize(chunkBytes_ + 64);
  staging_ = stagingStore_.data() + (64 - reinterpret_cast<uintptr_t>(stagingStore_.data()) % 64) % 64;
  if (size() > 1) {
    const auto buffers = static_cast<int>(tuned(t.bufferBytes, "DTRAIN_TCP_BUFFER_BYTES", kDefaultBufferBytes));
    mesh_ = std::make_unique<Mesh>(*options_.store, key("tcp/"), rank(), size(),
                                   chooseHost(t.host, singleNode()), buffers, newDeadline(), options_.token);
  }
}

TcpBackend::~TcpBackend() { shutdown(); }

std::shared_ptr<Backend> TcpBackend::makeGroup(BackendOptions options) {
  return std::make_shared<TcpBackend>(std::move(options), tcp_);
}

Waiter TcpBackend::waiter(const Deadline& deadline) const { return Waiter(deadline, options_.timeout, spin_); }

char* TcpBackend::scratch(size_t bytes) {
  if (scratchStore_.size() < bytes + 64) scratchStore_.resize(bytes + 64);
  char* p = scratchStore_.data();
  return p + (64 - reinterpret_cast<uintptr_t>(p) % 64) % 64;
}

RingPlan TcpBackend::ringPlan(DType dtype, ReduceOp op) {
  RingPlan plan;
  plan.right = &mesh_->peer((rank() + 1) % size());
  plan.left = &mesh_->peer((rank() + size() - 1) % size());
  plan.dtype = dtype;
  plan.op = combiningOp(op);
  plan.chunkBytes = chunkBytes_;
  plan.staging = staging_;
  return plan;
}

void TcpBackend::doAllreduce(void* buf, size_t count, DType dtype, ReduceOp op, const Deadline& deadline) {
  if (size() == 1) return;
  Waiter w = waiter(deadline);
  if (count * dtypeSize(dtype) <= smallBytes_ || count < static_cast<size_t>(size())) {
    allreduceRecursiveDoubling(static_cast<char*>(buf), count, dtype, op, w);
  } else {
    allreduceRing(static_cast<char*>(buf), count, dtype, op, w);
  }
}

void TcpBackend::allreduceRecursiveDoubling(char* buf, size_t count, DType dtype, ReduceOp op, Waiter& w) {
  const int n = size(), r = rank();
  const size_t bytes = count * dtypeSize(dtype);
  char* tmp = scratch(bytes);
  const ReduceOp cop = combiningOp(op);
  int p2 = 1;
  while (p2 * 2 <= n) p2 *= 2;
  const int extra = n - p2;
  // Fold: among the first 2*extra ranks, each even rank hands its data to the odd one above it and sits out.
  int vr;
  if (r < 2 * extra) {
    if (r % 2 == 0) {
      sendAll(mesh_->peer(r + 1), buf, bytes, w);
      vr = -1;
    } else {
      recvAll(mesh_->peer(r - 1), tmp, bytes, w);
      reduce2(buf, tmp, buf, count, dtype, cop);  // lower rank's operand first, as everywhere
      vr = r / 2;
    }
  } else {
    vr = r - extra;
  }
  if (vr >= 0) {
    for (int mask = 1; mask < p2; mask <<= 1) {
      const int pv = vr ^ mask;
      const int peer = pv < extra ? pv * 2 + 1 : pv + extra;
      exchange(mesh_->peer(peer), buf, bytes, mesh_->peer(peer), tmp, bytes, w);
      // Both partners combine (lower, higher) in that order, so they hold identical bits even for -0/NaN.
      if (r < peer) {
        reduce2(buf, buf, tmp, count, dtype, cop);
      } else {
        reduce2(buf, tmp, buf, count, dtype, cop);
      }
    }
    if (op == ReduceOp::kAvg) divide(buf, count, dtype, n);
  }
  if (r < 2 * extra) {
    if (r % 2 == 1) {
      sendAll(mesh_->peer(r - 1), buf, bytes, w);
    } else {
      recvAll(mesh_->peer(r + 1), buf, bytes, w);
    }
  }
}

void TcpBackend::allreduceRing(char* buf, size_t count, DType dtype, ReduceOp op, Waiter& w) {
  // Large buffers run as consecutive ring all-reduces over blocks, all streamed through one plan: a block's
  // all-gather re-sends what was combined a moment ago (still in cache) instead of tens of MiB later, and the
  // next block's reduce-scatter needs nothing from the previous one, so the link never drains between blocks.
  const int n = size(), r = rank();
  const size_t esz = dtypeSize(dtype);
  const size_t blockCount = std::max<size_t>(static_cast<size_t>(n), blockBytes_ / esz);
  RingPlan plan = ringPlan(dtype, op);
  plan.steps.reserve(static_cast<size_t>(2 * (n - 1)) * ((count + blockCount - 1) / blockCount));
  for (size_t first = 0; first < count; first += blockCount) {
    char* block = buf + first * esz;
    const auto segs = splitEvenly(std::min(blockCount, count - first), n);
    auto at = [&](int s) { return block + segs[static_cast<size_t>(s)].offset * esz; };
    auto len = [&](int s) { return segs[static_cast<size_t>(s)].count * esz; };
    const int base = static_cast<int>(plan.steps.size());
    for (int t = 0; t < n - 1; ++t) {  // reduce-scatter: rank r ends owning segment r+1
      const int sendSeg = ((r - t) % n + n) % n;
      const int recvSeg = ((r - t - 1) % n + n) % n;
      RingStep st;
      st.send = at(sendSeg);
      st.sendLen = len(sendSeg);
      st.sendAfter = t == 0 ? -1 : base + t - 1;
      st.recvLen = len(recvSeg);
      st.combineWith = at(recvSeg);
      st.combineOut = at(recvSeg);
      st.divisor = (t == n - 2 && op == ReduceOp::kAvg) ? n : 1;
      plan.steps.push_back(st);
    }
    for (int t = 0; t < n - 1; ++t) {  // all-gather the owned segments
      const int sendSeg = ((r + 1 - t) % n + n) % n;
      const int recvSeg = ((r - t) % n + n) % n;
      RingStep st;
      st.send = at(sendSeg);
      st.sendLen = len(sendSeg);
      st.sendAfter = base + n - 2 + t;
      st.recvLen = len(recvSeg);
      st.recvInto = at(recvSeg);
      plan.steps.push_back(st);
    }
  }
  runRing(plan, w);
}

void TcpBackend::doBroadcast(void* buf, size_t count, DType dtype, int root, const Deadline& deadline) {
  Waiter w = waiter(deadline);
  const size_t bytes = count * dtypeSize(dtype);
  if (bytes <= smallBytes_) {
    broadcastTree(static_cast<char*>(buf), bytes, root, w);
  } else {
    broadcastChain(static_cast<char*>(buf), bytes, root, w);
  }
}

void TcpBackend::broadcastTree(char* buf, size_t bytes, int root, Waiter& w) {
  const int n = size();
  const int v = (rank() - root + n) % n;  // position in the tree, root = 0
  int mask = 1;
  while (mask < n) {
    if ((v & mask) != 0) {
      recvAll(mesh_->peer((v - mask + root) % n), buf, bytes, w);
      break;
    }
    mask <<= 1;
  }
  for (mask >>= 1; mask > 0; mask >>= 1) {
    if (v + mask < n) sendAll(mesh_->peer((v + mask + root) % n), buf, bytes, w);
  }
}

void TcpBackend::broadcastChain(char* buf, size_t bytes, int root, Waiter& w) {
  const int n = size();
  const int v = (rank() - root + n) % n;
  RingPlan plan = ringPlan(DType::kFloat32, ReduceOp::kSum);
  RingStep st;
  if (v > 0) {  // receive straight into place; forward each byte as soon as it arrived
    st.recvLen = bytes;
    st.recvInto = buf;
  }
  if (v < n - 1) {
    st.send = buf;
    st.sendLen = bytes;
    st.sendAfter = v > 0 ? 0 : -1;
  }
  if (v == 0) plan.left = plan.right;  // nothing to receive; keep the waiter's first socket valid
  if (v == n - 1) plan.right = plan.left;
  plan.steps.push_back(st);
  runRing(plan, w);
}

void TcpBackend::doAllgather(const void* in, void* out, size_t countPerRank, DType dtype,
                             const Deadline& deadline) {
  const int n = size(), r = rank();
  const size_t blk = countPerRank * dtypeSize(dtype);
  auto* o = static_cast<char*>(out);
  if (in != o + static_cast<size_t>(r) * blk) std::memcpy(o + static_cast<size_t>(r) * blk, in, blk);
  if (n == 1) return;
  Waiter w = waiter(deadline);
  RingPlan plan = ringPlan(dtype, ReduceOp::kSum);
  for (int t = 0; t < n - 1; ++t) {
    const int sendBlk = ((r - t) % n + n) % n;
    const int recvBlk = ((r - t - 1) % n + n) % n;
    RingStep st;
    st.send = o + static_cast<size_t>(sendBlk) * blk;
    st.sendLen = blk;
    st.sendAfter = t - 1;
    st.recvLen = blk;
    st.recvInto = o + static_cast<size_t>(recvBlk) * blk;
    plan.steps.push_back(st);
  }
  runRing(plan, w);
}

void TcpBackend::doReduceScatter(const void* in, void* out, size_t countPerRank, DType dtype, ReduceOp op,
                                 const Deadline& deadline) {
  const int n = size(), r = rank();
  const size_t blk = countPerRank * dtypeSize(dtype);
  const auto* i = static_cast<const char*>(in);
  if (n == 1) {
    if (out != in) std::memmove(out, in, blk);
    return;
  }
  Waiter w = waiter(deadline);
  // Partial sums travel through scratch blocks; the last step writes this rank's block straight to `out`.
  char* partial = scratch(static_cast<size_t>(n) * blk);
  RingPlan plan = ringPlan(dtype, op);
  for (int t = 0; t < n - 1; ++t) {
    const auto sendBlk = static_cast<size_t>(((r - t - 1) % n + n) % n);
    const auto recvBlk = static_cast<size_t>(((r - t - 2) % n + n) % n);
    RingStep st;
    st.send = (t == 0 ? i : partial) + sendBlk * blk;
    st.sendLen = blk;
    st.sendAfter = t - 1;
    st.recvLen = blk;
    st.combineWith = i + recvBlk * blk;
    st.combineOut = t == n - 2 ? static_cast<char*>(out) : partial + recvBlk * blk;
    st.divisor = (t == n - 2 && op == ReduceOp::kAvg) ? n : 1;
    plan.steps.push_back(st);
  }
  runRing(plan, w);
}

void TcpBackend::doSend(const void* buf, size_t bytes, int peer, const Deadline& deadline) {
  Waiter w = waiter(deadline);
  sendAll(mesh_->peer(peer), buf, bytes, w);
}

void TcpBackend::doRecv(void* buf, size_t bytes, int peer, const Deadline& deadline) {
  Waiter w = waiter(deadline);
  recvAll(mesh_->peer(peer), buf, bytes, w);
}

void TcpBackend::doBarrier(const Deadline& deadline) {
  const int n = size(), r = rank();
  Waiter w = waiter(deadline);
  char out = 1, in = 0;
  for (int k = 1; k < n; k <<= 1) {
    exchange(mesh_->peer((r + k) % n), &out, 1, mesh_->peer((r - k + n) % n), &in, 1, w);
  }
}

}  // namespace dtrain::comm::tcp
