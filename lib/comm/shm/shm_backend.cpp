#include "lib/comm/shm/shm_backend.h"

#include <algorithm>
#include <cstring>

#include "lib/comm/reduce.h"
#include "lib/comm/tuning.h"
#include "lib/common/error.h"

namespace dtrain::comm::shm {
namespace {

// Defaults measured on the reference 2-core machine, 2 ranks (docs/collectives.md).
constexpr int64_t kDefaultSmallBytes = 32 << 10;
constexpr int64_t kDefaultSlotBytes = 1 << 20;
constexpr int64_t kDefaultSpinMicros = 100;
constexpr size_t kP2pBytes = 256 << 10;  // per ordered pair; power of two (ring positions wrap by masking)

}  // namespace

ShmBackend::ShmBackend(BackendOptions options, ShmOptions shm) : Backend(std::move(options)), shm_(shm) {
  const ShmOptions& t = shm_;
  spin_ = std::chrono::microseconds(tuned(t.spinMicros, "DTRAIN_COMM_SPIN_US", kDefaultSpinMicros));
  const auto slot = static_cast<size_t>(std::max<int64_t>(4096, tuned(t.slotBytes, "DTRAIN_SHM_SLOT_BYTES",
                                                                      kDefaultSlotBytes)));
  if (!singleNode()) {
    for (int r = 0; r < size(); ++r)
      if (peers_[static_cast<size_t>(r)].nodeRank != options_.nodeRank)
        DTRAIN_THROW(ConfigError, "backend 'shm' needs every rank on one node, but rank {} is on node {} and rank "
                                  "{} on node {}: use 'hier' (or 'auto')", rank(), options_.nodeRank, r,
                     peers_[static_cast<size_t>(r)].nodeRank);
  }
  const Layout layout(size(), slot, kP2pBytes);
  // The one-shot path stages the whole message in one slot.
  smallBytes_ = std::min(layout.slotBytes,
                         static_cast<size_t>(tuned(t.smallBytes, "DTRAIN_SHM_SMALL_BYTES", kDefaultSmallBytes)));
  peersAlive_ = std::make_unique<PeerWatch>(peers_);
  const Deadline deadline = newDeadline();
  if (rank() == 0) {
    removeStaleSegments();
    seg_ = Segment::create(newSegmentName(), layout);
    flags_ = seg_->allFlags();
    if (size() > 1) {
      options_.store->set(key("shm/segment"), seg_->name());
      Waiter w = waiter(deadline);
      Flag& attached = seg_->header().attached;
      w.until(attached, -1, [&] { return attached.load() == static_cast<uint32_t>(size() - 1); });
    }
    seg_->unlink();  // everybody has it mapped: from now on the kernel frees it with the last mapping
  } else {
    std::string name;
    try {
      name = options_.store->get(key("shm/segment"), deadline.remaining());
    } catch (const TimeoutError&) {
      DTRAIN_THROW(CommError, "rank 0 never published the shared-memory segment of '{}'", options_.groupName);
    }
    seg_ = Segment::attach(name, layout);
    flags_ = seg_->allFlags();
    seg_->header().attached.add(1);
  }
}

ShmBackend::~ShmBackend() { shutdown(); }

std::shared_ptr<Backend> ShmBackend::makeGroup(BackendOptions options) {
  return std::make_shared<ShmBackend>(std::move(options), shm_);
}

void ShmBackend::post() { seg_->phase(rank()).post(++phase_); }

void ShmBackend::waitRank(Waiter& w, int r, uint32_t p) {
  Flag& f = seg_->phase(r);
  w.until(f, r, [&] { return reached(f.load(), p); });
}

void ShmBackend::waitAll(Waiter& w, uint32_t p) {
  for (int r = 0; r < size(); ++r)
    if (r != rank()) waitRank(w, r, p);
}

int ShmBackend::beginRound(Waiter& w, bool writes) {
  const int slot = static_cast<int>(round_++ & 1u);
  if (writes) waitAll(w, slotFree_[slot]);
  return slot;
}

void ShmBackend::doAllreduce(void* buf, size_t count, DType dtype, ReduceOp op, const Deadline& deadline) {
  runAllreduce(buf, count, dtype, op, -1, deadline);
}

void ShmBackend::reduceToRoot(void* buf, size_t count, DType dtype, ReduceOp op, int root,
                              const Deadline& deadline) {
  runAllreduce(buf, count, dtype, op, root, deadline);
}

void ShmBackend::runAllreduce(void* buf, size_t count, DType dtype, ReduceOp op, int root,
                              const Deadline& deadline) {
  if (size() == 1 || count == 0) return;
  Waiter w = waiter(deadline);
  if (count * dtypeSize(dtype) <= smallBytes_) {
    allreduceOneShot(static_cast<char*>(buf), count, dtype, op, root, w);
  } else {
    allreduceSplit(static_cast<char*>(buf), count, dtype, op, root, w);
  }
}

void ShmBackend::allreduceOneShot(char* buf, size_t count, DType dtype, ReduceOp op, int root, Waiter& w) {
  const int n = size(), me = rank();
  const size_t bytes = count * dtypeSize(dtype);
  const int slot = beginRound(w, true);
  std::memcpy(seg_->in(me, slot), buf, bytes);
  post();
  const uint32_t p = phase_;
  if (root < 0 || root == me) {
    waitAll(w, p);
    const void* srcs[256];
    std::vector<const void*> many;
    const void** s = srcs;
    if (n > 256) {
      many.resize(static_cast<size_t>(n));
      s = many.data();
    }
    for (int j = 0; j < n; ++j) s[j] = seg_->in(j, slot);  // own copy too: `buf` is the output
    reduceMany(buf, nullptr, s, n, count, dtype, op, op == ReduceOp::kAvg ? n : 1);
  }
  endRound(slot, p + 1);  // readers are done before their next post
}

void ShmBackend::allreduceSplit(char* buf, size_t count, DType dtype, ReduceOp op, int root, Waiter& w) {
  const int n = size(), me = rank();
  const size_t esz = dtypeSize(dtype);
  const size_t perRound = seg_->layout().slotBytes / esz;
  const size_t lineElems = 64 / esz;
  std::vector<const void*> srcs(static_cast<size_t>(n));
  const bool wantAll = root < 0 || root == me;
  for (size_t base = 0; base < count; base += perRound) {
    const size_t e = std::min(perRound, count - base);
    // Slices on cache-line boundaries, so no two ranks write the same line of the result slot.
    const size_t per = ((e + static_cast<size_t>(n) - 1) / static_cast<size_t>(n) + lineElems - 1) / lineElems *
                       lineElems;
    auto off = [&](int j) { return std::min(static_cast<size_t>(j) * per, e); };
    auto len = [&](int j) { return std::min(static_cast<size_t>(j + 1) * per, e) - off(j); };
    char* b = buf + base * esz;
    const int slot = beginRound(w, true);
    char* mine = seg_->in(me, slot);
    for (int j = 0; j < n; ++j)
      if (j != me && len(j) > 0) std::memcpy(mine + off(j) * esz, b + off(j) * esz, len(j) * esz);
    post();
    waitAll(w, phase_);
    if (len(me) > 0) {
      const size_t o = off(me) * esz;
      for (int j = 0; j < n; ++j) srcs[static_cast<size_t>(j)] = j == me ? b + o : seg_->in(j, slot) + o;
      reduceMany(seg_->res(slot) + o, wantAll ? b + o : nullptr, srcs.data(), n, len(me), dtype, op,
                 op == ReduceOp::kAvg ? n : 1);
    }
    post();
    const uint32_t p2 = phase_;
    if (wantAll) {
      waitAll(w, p2);
      const char* res = seg_->res(slot);
      for (int j = 0; j < n; ++j)
        if (j != me && len(j) > 0) std::memcpy(b + off(j) * esz, res + off(j) * esz, len(j) * esz);
    }
    endRound(slot, p2 + 1);
  }
}

void ShmBackend::doBroadcast(void* buf, size_t count, DType dtype, int root, const Deadline& deadline) {
  if (size() == 1) return;
  Waiter w = waiter(deadline);
  const size_t bytes = count * dtypeSize(dtype);
  const size_t chunk = seg_->layout().slotBytes;
  auto* b = static_cast<char*>(buf);
  const bool isRoot = rank() == root;
  for (size_t off = 0; off < bytes; off += chunk) {
    const size_t len = std::min(chunk, bytes - off);
    const int slot = beginRound(w, isRoot);
    if (isRoot) {
      std::memcpy(seg_->in(root, slot), b + off, len);
    } else {
      waitRank(w, root, phase_ + 1);
      std::memcpy(b + off, seg_->in(root, slot), len);
    }
    post();
    endRound(slot, phase_);  // readers finish before they post this round
  }
}

void ShmBackend::doAllgather(const void* in, void* out, size_t countPerRank, DType dtype,
                             const Deadline& deadline) {
  const int n = size(), me = rank();
  const size_t blk = countPerRank * dtypeSize(dtype);
  auto* o = static_cast<char*>(out);
  const auto* i = static_cast<const char*>(in);
  if (i != o + static_cast<size_t>(me) * blk) std::memcpy(o + static_cast<size_t>(me) * blk, i, blk);
  if (n == 1) return;
  Waiter w = waiter(deadline);
  const size_t chunk = seg_->layout().slotBytes;
  for (size_t off = 0; off < blk; off += chunk) {
    const size_t len = std::min(chunk, blk - off);
    const int slot = beginRound(w, true);
    std::memcpy(seg_->in(me, slot), o + static_cast<size_t>(me) * blk + off, len);
    post();
    const uint32_t p = phase_;
    waitAll(w, p);
    for (int j = 0; j < n; ++j)
      if (j != me) std::memcpy(o + static_cast<size_t>(j) * blk + off, seg_->in(j, slot), len);
    endRound(slot, p + 1);
  }
}

void ShmBackend::doReduceScatter(const void* in, void* out, size_t countPerRank, DType dtype, ReduceOp op,
                                 const Deadline& deadline) {
  const int n = size(), me = rank();
  const size_t esz = dtypeSize(dtype);
  const auto* i = static_cast<const char*>(in);
  auto* o = static_cast<char*>(out);
  if (n == 1) {
    if (o != i) std::memmove(o, i, countPerRank * esz);
    return;
  }
  Waiter w = waiter(deadline);
  // A round stages, per peer block, `per` elements: n of them fit one slot.
  const size_t lineElems = 64 / esz;
  size_t per = seg_->layout().slotBytes / esz / static_cast<size_t>(n) / lineElems * lineElems;
  per = std::max(per, lineElems);
  DTRAIN_CHECK(per * static_cast<size_t>(n) * esz <= seg_->layout().slotBytes, "shm slot too small for {} ranks", n);
  std::vector<const void*> srcs(static_cast<size_t>(n));
  for (size_t base = 0; base < countPerRank; base += per) {
    const size_t len = std::min(per, countPerRank - base);
    const int slot = beginRound(w, true);
    char* mine = seg_->in(me, slot);
    for (int j = 0; j < n; ++j) {
      if (j == me) continue;
      std::memcpy(mine + static_cast<size_t>(j) * per * esz, i + (static_cast<size_t>(j) * countPerRank + base) * esz,
                  len * esz);
    }
    post();
    const uint32_t p = phase_;
    waitAll(w, p);
    // Own contribution first: `out` may be this rank's block of `in` (reduceMany allows out == srcs[0]).
    size_t k = 0;
    srcs[k++] = i + (static_cast<size_t>(me) * countPerRank + base) * esz;
    for (int j = 0; j < n; ++j)
      if (j != me) srcs[k++] = seg_->in(j, slot) + static_cast<size_t>(me) * per * esz;
    reduceMany(o + base * esz, nullptr, srcs.data(), n, len, dtype, op, op == ReduceOp::kAvg ? n : 1);
    endRound(slot, p + 1);
  }
}

void ShmBackend::doBarrier(const Deadline& deadline) {
  Waiter w = waiter(deadline);
  post();
  waitAll(w, phase_);
}

void ShmBackend::doSend(const void* buf, size_t bytes, int peer, const Deadline& deadline) {
  Waiter w = waiter(deadline);
  Flag& head = seg_->head(rank(), peer);
  Flag& tail = seg_->tail(rank(), peer);
  char* ring = seg_->ring(rank(), peer);
  const auto cap = static_cast<uint32_t>(seg_->layout().p2pBytes);
  uint32_t h = head.load();
  const auto* src = static_cast<const char*>(buf);
  while (bytes > 0) {
    w.until(tail, peer, [&] { return h - tail.load() < cap; });
    const uint32_t free = cap - (h - tail.load());
    const uint32_t pos = h & (cap - 1);
    const size_t n = std::min<size_t>({bytes, free, cap - pos});
    std::memcpy(ring + pos, src, n);
    h += static_cast<uint32_t>(n);
    head.post(h);
    src += n;
    bytes -= n;
  }
}

void ShmBackend::doRecv(void* buf, size_t bytes, int peer, const Deadline& deadline) {
  Waiter w = waiter(deadline);
  Flag& head = seg_->head(peer, rank());
  Flag& tail = seg_->tail(peer, rank());
  const char* ring = seg_->ring(peer, rank());
  const auto cap = static_cast<uint32_t>(seg_->layout().p2pBytes);
  uint32_t t = tail.load();
  auto* dst = static_cast<char*>(buf);
  while (bytes > 0) {
    w.until(head, peer, [&] { return head.load() != t; });
    const uint32_t avail = head.load() - t;
    const uint32_t pos = t & (cap - 1);
    const size_t n = std::min<size_t>({bytes, avail, cap - pos});
    std::memcpy(dst, ring + pos, n);
    t += static_cast<uint32_t>(n);
    tail.post(t);
    dst += n;
    bytes -= n;
  }
}

}  // namespace dtrain::comm::shm
