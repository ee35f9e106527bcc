// Every collective of every CPU backend against a reference, one thread per rank over a MemoryStore:
// world sizes 1..8, sizes 0/1/odd/not divisible by the world size, every dtype and op, and each algorithm
// path forced through the tuning knobs (recursive doubling vs ring, one-shot vs split, tiny pipeline pieces
// and slots so large messages take many rounds).
#include <doctest/doctest.h>

#include <cstring>
#include <random>

#include "lib/comm/hier/hier_backend.h"
#include "tests/comm/comm_test_util.h"

using namespace dtrain;
using namespace dtrain::comm;
using namespace dtrain::comm::testing;

namespace {

// The per-backend knobs of a configuration (hier takes both).
using Tuning = hier::HierOptions;

struct Config {
  const char* label;
  const char* backend;
  int nodes;
  Tuning tuning;
  bool allSizes = false;  // world sizes 1..8; else 2, 3, 5, 8 (keeps the file's runtime modest)
};

Tuning tuning(int64_t tcpSmall, int64_t tcpChunk, int64_t shmSmall, int64_t shmSlot) {
  Tuning t;
  t.tcp.blockBytes = tcpChunk > 0 ? 3 * tcpChunk : -1;  // forced pieces come with many ring blocks
  t.tcp.smallBytes = tcpSmall;
  t.tcp.chunkBytes = tcpChunk;
  t.shm.smallBytes = shmSmall;
  t.shm.slotBytes = shmSlot;
  return t;
}

// The named backend, built directly so that it gets these knobs (createBackend uses the defaults).
BackendPtr makeBackend(const std::string& name, const BackendOptions& o, const Tuning& t) {
  if (name == "tcp") return std::make_shared<tcp::TcpBackend>(o, t.tcp);
  if (name == "shm") return std::make_shared<shm::ShmBackend>(o, t.shm);
  if (name == "hier") return std::make_shared<hier::HierBackend>(o, t);
  throw std::runtime_error("no such backend: " + name);
}

const Config kConfigs[] = {
    {"tcp defaults", "tcp", 1, {}, true},
    {"tcp ring only, 4 KiB pieces, 12 KiB blocks", "tcp", 1, tuning(0, 4096, -1, -1)},
    {"tcp recursive doubling only", "tcp", 1, tuning(1 << 30, -1, -1, -1)},
    {"shm defaults", "shm", 1, {}, true},
    {"shm split only, 4 KiB slots", "shm", 1, tuning(-1, -1, 0, 4096)},
    {"shm one-shot up to 4 KiB, then 4 KiB slots", "shm", 1, tuning(-1, -1, 4096, 4096)},
    {"hier over 2 nodes", "hier", 2, {}, true},
    {"hier over 3 nodes, ring and split forced", "hier", 3, tuning(0, 4096, 0, 4096)},
};

void checkAllreduce(Backend& b, DType t, ReduceOp op, size_t count) {
  const size_t esz = dtypeSize(t);
  std::vector<char> buf(count * esz + 1);
  for (size_t i = 0; i < count; ++i) storeAs(t, buf.data(), i, inputValue(b.rank(), i));
  buf[count * esz] = 0x5a;  // guard byte: nothing past the buffer is written
  b.allreduce(TensorView::flat(buf.data(), count, t), op);
  for (size_t i = 0; i < count; ++i) {
    const double want = expectedValue(b.size(), i, op, t);
    const double got = loadAs(t, buf.data(), i);
    expect(closeEnough(t, got, want),
           fmt::format("allreduce {} {} count {}: element {} is {}, expected {}", dtypeName(t), reduceOpName(op),
                       count, i, got, want));
  }
  expect(buf[count * esz] == 0x5a, "allreduce wrote past the end of the buffer");
}

void checkBroadcast(Backend& b, size_t count) {
  for (int root = 0; root < b.size(); ++root) {
    std::vector<float> buf(count);
    for (size_t i = 0; i < count; ++i) buf[i] = b.rank() == root ? static_cast<float>(i * 3 + root) : -1.0f;
    b.broadcast(TensorView::flat(buf.data(), count), root);
    for (size_t i = 0; i < count; ++i)
      expect(buf[i] == static_cast<float>(i * 3 + root),
             fmt::format("broadcast from {} count {}: element {} is {}", root, count, i, buf[i]));
  }
}

void checkAllgather(Backend& b, DType t, size_t perRank) {
  const size_t esz = dtypeSize(t);
  const auto n = static_cast<size_t>(b.size());
  std::vector<char> in(perRank * esz), out(n * perRank * esz);
  for (size_t i = 0; i < perRank; ++i) storeAs(t, in.data(), i, inputValue(b.rank(), i));
  b.allgather(TensorView::flat(in.data(), perRank, t), TensorView::flat(out.data(), n * perRank, t));
  for (size_t r = 0; r < n; ++r)
    for (size_t i = 0; i < perRank; ++i)
      expect(loadAs(t, out.data(), r * perRank + i) == inputValue(static_cast<int>(r), i),
             fmt::format("allgather {} per rank {}: block {} element {} wrong", dtypeName(t), perRank, r, i));
  // In place: this rank's block of `out` is the input.
  std::vector<char> inplace(n * perRank * esz);
  for (size_t i = 0; i < perRank; ++i)
    storeAs(t, inplace.data(), static_cast<size_t>(b.rank()) * perRank + i, inputValue(b.rank(), i));
  b.allgather(TensorView::flat(inplace.data() + static_cast<size_t>(b.rank()) * perRank * esz, perRank, t),
              TensorView::flat(inplace.data(), n * perRank, t));
  expect(inplace == out, "in-place allgather differs from out-of-place");
}

void checkReduceScatter(Backend& b, DType t, ReduceOp op, size_t perRank) {
  const size_t esz = dtypeSize(t);
  const auto n = static_cast<size_t>(b.size());
  std::vector<char> in(n * perRank * esz), out(perRank * esz);
  for (size_t i = 0; i < n * perRank; ++i) storeAs(t, in.data(), i, inputValue(b.rank(), i));
  const std::vector<char> original = in;
  b.reduceScatter(TensorView::flat(in.data(), n * perRank, t), TensorView::flat(out.data(), perRank, t), op);
  const size_t base = static_cast<size_t>(b.rank()) * perRank;
  for (size_t i = 0; i < perRank; ++i) {
    const double want = expectedValue(b.size(), base + i, op, t);
    const double got = loadAs(t, out.data(), i);
    expect(closeEnough(t, got, want), fmt::format("reduce_scatter {} {} per rank {}: element {} is {}, expected {}",
                                                  dtypeName(t), reduceOpName(op), perRank, i, got, want));
  }
  expect(in == original, "reduce_scatter modified its input");
}

void checkSendRecv(Backend& b, size_t bytes) {
  const int n = b.size(), r = b.rank();
  if (n == 1) return;
  std::vector<unsigned char> out(bytes), in(bytes, 0);
  for (size_t i = 0; i < bytes; ++i) out[i] = static_cast<unsigned char>(i * 13 + static_cast<size_t>(r));
  const int right = (r + 1) % n, left = (r + n - 1) % n;
  // Even ranks send first: a ring of blocking sends larger than the transport's buffers would otherwise wait
  // on each other (documented send semantics). An odd world's last rank is even and sends to even rank 0,
  // which has already sent by then.
  if (r % 2 == 0) {
    b.send(TensorView::flat(out.data(), bytes), right);
    b.recv(TensorView::flat(in.data(), bytes), left);
  } else {
    b.recv(TensorView::flat(in.data(), bytes), left);
    b.send(TensorView::flat(out.data(), bytes), right);
  }
  for (size_t i = 0; i < bytes; ++i)
    expect(in[i] == static_cast<unsigned char>(i * 13 + static_cast<size_t>(left)),
           fmt::format("recv of {} bytes from rank {}: byte {} wrong", bytes, left, i));
}

void runConfig(const Config& c, int n) {
  auto store = rendezvous::MemoryStore::create();
  auto errors = onRanks(n, [&](int r) {
    auto b = makeBackend(c.backend, rankOptions(r, n, store, c.nodes), c.tuning);
    expect(b->rank() == r && b->size() == n, "rank/size mismatch");
    // 1, 7: fewer elements than ranks (empty segments and slices); 20001: above every small-message
    // threshold, not divisible by any world size, many pieces/rounds with the forced 4 KiB units.
    for (size_t count : {size_t{1}, size_t{7}, size_t{20001}})
      for (DType t : kSupportedDTypes)
        for (ReduceOp op : kAllReduceOps) checkAllreduce(*b, t, op, count);
    for (size_t count : {size_t{0}, size_t{1003}, size_t{4096}}) checkAllreduce(*b, DType::kFloat32, ReduceOp::kSum, count);
    checkBroadcast(*b, 1);
    checkBroadcast(*b, 30001);  // 120 KB: the tcp chain, several shm rounds
    for (size_t per : {size_t{1}, size_t{333}, size_t{5000}}) {
      checkAllgather(*b, DType::kFloat32, per);
      checkAllgather(*b, DType::kBFloat16, per);
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax}) {
        checkReduceScatter(*b, DType::kFloat32, op, per);
        checkReduceScatter(*b, DType::kInt64, op, per);
      }
      checkReduceScatter(*b, DType::kFloat16, ReduceOp::kSum, per);
    }
    for (size_t bytes : {size_t{1}, size_t{10000}, size_t{300000}}) checkSendRecv(*b, bytes);  // > shm ring
    for (int i = 0; i < 3; ++i) b->barrier();
  });
  CHECK_MESSAGE(firstError(errors).empty(), (std::string(c.label) + " with " + std::to_string(n) + " ranks: " + firstError(errors)));
}

}  // namespace

TEST_CASE("every collective matches the reference: all backends, paths, world sizes 1..8") {
  for (const Config& c : kConfigs) {
    for (int n = 1; n <= 8; ++n) {
      if (!c.allSizes && n != 2 && n != 3 && n != 5 && n != 8) continue;
      CAPTURE(c.label);
      CAPTURE(n);
      runConfig(c, n);
    }
  }
  CHECK(ownShmSegments().empty());
}

TEST_CASE("allreduce results are bitwise identical on every rank") {
  for (const char* backend : {"tcp", "shm", "hier"}) {
    for (int n : {2, 3, 5, 8}) {
      auto store = rendezvous::MemoryStore::create();
      std::vector<std::vector<float>> results(static_cast<size_t>(n));
      auto errors = onRanks(n, [&](int r) {
        auto b = createBackend(backend, rankOptions(r, n, store, nodesFor(backend)));
        for (size_t count : {size_t{5}, size_t{4099}, size_t{300001}}) {
          std::mt19937 rng(static_cast<unsigned>(r * 1000 + static_cast<int>(count)));
          std::uniform_real_distribution<float> val(-1.0f, 1.0f);
          std::vector<float> buf(count);
          for (auto& v : buf) v = val(rng) * 1e3f + val(rng) * 1e-3f;  // rounding depends on the order
          b->allreduce(TensorView::flat(buf.data(), count), ReduceOp::kSum);
          auto& mine = results[static_cast<size_t>(r)];
          mine.insert(mine.end(), buf.begin(), buf.end());
        }
      });
      REQUIRE_MESSAGE(firstError(errors).empty(), (std::string(backend) + " " + std::to_string(n) + ": " + firstError(errors)));
      for (int r = 1; r < n; ++r) {
        CAPTURE(backend);
        CAPTURE(r);
        CHECK(std::memcmp(results[0].data(), results[static_cast<size_t>(r)].data(), results[0].size() * 4) == 0);
      }
    }
  }
}
