// Behaviour around the collectives: asynchronous submission and ordering, sub-groups, the registry and
// `auto`, timeouts (a rank that never joins or never calls), and the broken state after a failure; and the shm
// backend's sweep of segments whose creator died.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>

#include "lib/comm/hier/hier_backend.h"
#include "lib/comm/shm/segment.h"
#include "lib/common/config.h"
#include "lib/common/error.h"
#if DTRAIN_WITH_CUDA
#include "lib/gpu/device.h"
#endif
#include "rendezvous/prefix_store.h"
#include "tests/comm/comm_test_util.h"

using namespace dtrain;
using namespace dtrain::comm;
using namespace dtrain::comm::testing;
using namespace std::chrono_literals;

TEST_CASE("async allreduces on buckets complete in submission order while the caller keeps working") {
  for (const char* backend : {"tcp", "shm", "hier"}) {
    const int n = 3;
    auto store = rendezvous::MemoryStore::create();
    auto errors = onRanks(n, [&](int r) {
      auto b = createBackend(backend, rankOptions(r, n, store, nodesFor(backend)));
      // A gradient arena cut into buckets, reduced asynchronously, as the trainer does during backward.
      const size_t total = 200000, bucket = 30000;
      std::vector<float> arena(total);
      for (size_t i = 0; i < total; ++i) arena[i] = static_cast<float>(inputValue(r, i));
      std::vector<WorkPtr> works;
      for (size_t off = 0; off < total; off += bucket)
        works.push_back(b->allreduceAsync(TensorView::flat(arena.data() + off, std::min(bucket, total - off)),
                                          ReduceOp::kAvg));
      // The same buffer twice in a row: only correct if the second runs after the first.
      std::vector<int64_t> twice(1000, r + 1);
      works.push_back(b->allreduceAsync(TensorView::flat(twice.data(), twice.size()), ReduceOp::kSum));
      works.push_back(b->allreduceAsync(TensorView::flat(twice.data(), twice.size()), ReduceOp::kSum));
      double busy = 0;  // "backward" keeps the main thread busy meanwhile
      for (int i = 0; i < 100000; ++i) busy += i * 1e-9;
      for (auto& w : works) w->wait();
      for (auto& w : works) expect(w->done(), "done() false after wait()");
      for (size_t i = 0; i < total; ++i)
        expect(arena[i] == static_cast<float>(expectedValue(n, i, ReduceOp::kAvg, DType::kFloat32)),
               fmt::format("bucketed average wrong at {}", i));
      const int64_t sum = n * (n + 1) / 2;
      for (int64_t v : twice) expect(v == sum * n, fmt::format("ordering broken: {} != {}", v, sum * n));
      // A synchronous call after async ones runs after them.
      std::vector<float> x(10, 1.0f);
      auto w = b->allreduceAsync(TensorView::flat(x.data(), x.size()), ReduceOp::kSum);
      b->allreduce(TensorView::flat(x.data(), x.size()), ReduceOp::kSum);
      w->wait();
      expect(x[0] == static_cast<float>(n * n), "sync call overtook an async one");
      expect(busy > 0, "");
    });
    CHECK_MESSAGE(firstError(errors).empty(), (std::string(backend) + ": " + firstError(errors)));
  }
}

TEST_CASE("newGroup builds sub-communicators from the same store") {
  for (const char* backend : {"tcp", "shm", "hier"}) {
    const int n = 4;
    auto store = rendezvous::MemoryStore::create();
    auto errors = onRanks(n, [&](int r) {
      auto world = createBackend(backend, rankOptions(r, n, store, nodesFor(backend)));
      // Pipeline x data parallel: stages {0,1} {2,3}; data-parallel groups {0,2} {1,3}.
      auto even = world->newGroup({0, 2});
      auto odd = world->newGroup({1, 3});
      auto mine = r % 2 == 0 ? even : odd;
      expect(mine != nullptr && (r % 2 == 0 ? odd : even) == nullptr, "membership wrong");
      expect(mine->size() == 2 && mine->rank() == r / 2, "sub-group rank wrong");
      expect(mine->name() == world->name(), "sub-group of another kind");
      int64_t v = r;
      mine->allreduce(TensorView::flat(&v, 1), ReduceOp::kSum);
      expect(v == (r % 2 == 0 ? 2 : 4), fmt::format("sub-group sum {}", v));
      // The same list again is a different communicator; an unordered list ranks by position.
      auto reversed = world->newGroup({3, 2, 1, 0});
      expect(reversed->rank() == 3 - r, "position in the list is the new rank");
      int64_t w = reversed->rank() == 0 ? 42 : 0;
      reversed->broadcast(TensorView::flat(&w, 1), 0);
      expect(w == 42, "broadcast in reversed group");
      world->barrier();
    });
    CHECK_MESSAGE(firstError(errors).empty(), (std::string(backend) + ": " + firstError(errors)));
  }
  CHECK_THROWS_AS(createBackend("tcp", rankOptions(0, 1, nullptr))->newGroup({0, 0}), UsageError);
  CHECK_THROWS_AS(createBackend("tcp", rankOptions(0, 1, nullptr))->newGroup({1}), UsageError);
}

TEST_CASE("registry: names, auto and the nccl backend") {
  auto names = backendNames();
  for (const char* name : {"auto", "hier", "nccl", "shm", "tcp"})
    CHECK(std::find(names.begin(), names.end(), name) != names.end());
  CHECK_THROWS_AS(createBackend("mpi", rankOptions(0, 1, nullptr)), UsageError);
  CHECK(createBackend("auto", rankOptions(0, 1, nullptr))->size() == 1);
  BackendOptions gpu = rankOptions(0, 1, nullptr);
  gpu.device = "cuda";
#if DTRAIN_WITH_CUDA
  // CUDA is built here but this machine may have no GPU: nccl must refuse cleanly, and auto never picks it
  // for CPU buffers.
  if (createBackend("auto", rankOptions(0, 1, nullptr))->name() == "nccl") FAIL("auto picked nccl for cpu");
  // "backend": "auto" with device cuda picks nccl (a GPU job's gradients); without a visible GPU it says so
  // instead of falling back to a CPU backend. (The nccl group itself is run by test_gpu_train's comm case.)
  if (gpu::visibleGpuCount() > 0) {
    CHECK(resolveAutoBackend(gpu) == "nccl");
  } else {
    CHECK_THROWS_WITH_AS(resolveAutoBackend(gpu), "device 'cuda' asked for, but no GPU is visible to this process",
                         UsageError);
    CHECK_THROWS_AS(createBackend("auto", gpu), UsageError);
    CHECK_THROWS_WITH_AS(createBackend("nccl", gpu), doctest::Contains("needs a GPU, but none is visible"), UsageError);
  }
#else
  CHECK_THROWS_WITH_AS(createBackend("nccl", gpu), doctest::Contains("backend 'nccl' was not built"), NotBuiltError);
  CHECK_THROWS_AS(createBackend("auto", gpu), NotBuiltError);
#endif
  // auto: one node -> shm; several ranks on some node -> hier; one rank per node -> tcp.
  for (auto [nodes, n, want] : {std::tuple{1, 3, "shm"}, std::tuple{2, 3, "hier"}, std::tuple{3, 3, "tcp"}}) {
    auto store = rendezvous::MemoryStore::create();
    std::vector<std::string> picked(static_cast<size_t>(n));
    auto errors = onRanks(n, [&](int r) {
      auto b = createBackend("auto", rankOptions(r, n, store, nodes));
      picked[static_cast<size_t>(r)] = b->name();
    });
    REQUIRE(firstError(errors).empty());
    for (const auto& p : picked) CHECK(p == want);
  }
}

TEST_CASE("shm refuses ranks on different nodes") {
  auto store = rendezvous::MemoryStore::create();
  auto errors = onRanks(2, [&](int r) { createBackend("shm", rankOptions(r, 2, store, 2)); });
  CHECK(errors[0].find("needs every rank on one node") != std::string::npos);
}

TEST_CASE("a rank that never joins makes creation fail within the timeout") {
  for (const char* backend : {"tcp", "shm", "hier"}) {
    auto store = rendezvous::MemoryStore::create();
    BackendOptions o = rankOptions(0, 2, store);
    o.timeout = 300ms;
    const auto start = std::chrono::steady_clock::now();
    CHECK_THROWS_AS(createBackend(backend, o), CommError);
    CHECK(std::chrono::steady_clock::now() - start < 10s);
  }
  CHECK(ownShmSegments().empty());
}

TEST_CASE("a rank that stops calling collectives fails the others within the timeout, then the group is broken") {
  for (const char* backend : {"tcp", "shm", "hier"}) {
    const int n = 3;
    auto store = rendezvous::MemoryStore::create();
    std::atomic<int> failed{0};
    std::vector<std::chrono::milliseconds> took(static_cast<size_t>(n));
    std::vector<BackendPtr> keep(static_cast<size_t>(n));
    auto errors = onRanks(n, [&](int r) {
      BackendOptions o = rankOptions(r, n, store, nodesFor(backend));
      o.timeout = 500ms;
      auto b = createBackend(backend, o);
      keep[static_cast<size_t>(r)] = b;  // rank 2 stays connected but silent (a stalled peer)
      std::vector<float> x(100000, 1.0f);
      b->allreduce(TensorView::flat(x.data(), x.size()), ReduceOp::kSum);
      if (r == 2) return;
      const auto start = std::chrono::steady_clock::now();
      try {
        b->allreduce(TensorView::flat(x.data(), x.size()), ReduceOp::kSum);
      } catch (const CommError& e) {
        ++failed;
        took[static_cast<size_t>(r)] = std::chrono::duration_cast<std::chrono::milliseconds>(
            std::chrono::steady_clock::now() - start);
        // Broken for good: later calls fail at once, naming the first failure.
        try {
          b->barrier();
        } catch (const CommError& again) {
          expect(std::string(again.what()).find("unusable after an earlier failure") != std::string::npos,
                 std::string("second failure: ") + again.what());
          return;
        }
        throw std::runtime_error("barrier succeeded on a broken communicator");
      }
      throw std::runtime_error("allreduce succeeded without rank 2");
    });
    CHECK_MESSAGE(firstError(errors).empty(), (std::string(backend) + ": " + firstError(errors)));
    CHECK(failed == n - 1);
    for (int r = 0; r < n - 1; ++r) CHECK(took[static_cast<size_t>(r)] < 5s);
    keep.clear();
  }
  CHECK(ownShmSegments().empty());
}

TEST_CASE("async failures surface in wait() and fail the queued operations behind them") {
  auto store = rendezvous::MemoryStore::create();
  std::vector<BackendPtr> keep(2);
  auto errors = onRanks(2, [&](int r) {
    BackendOptions o = rankOptions(r, 2, store);
    o.timeout = 300ms;
    auto b = createBackend("tcp", o);
    keep[static_cast<size_t>(r)] = b;
    if (r == 1) return;
    std::vector<float> x(10, 1.0f);
    auto first = b->allreduceAsync(TensorView::flat(x.data(), x.size()), ReduceOp::kSum);
    auto second = b->allreduceAsync(TensorView::flat(x.data(), x.size()), ReduceOp::kSum);
    int thrown = 0;
    for (auto* w : {&first, &second}) {
      try {
        (*w)->wait();
      } catch (const CommError&) {
        ++thrown;
      }
    }
    expect(thrown == 2, fmt::format("{} of 2 waits threw", thrown));
  });
  CHECK_MESSAGE(firstError(errors).empty(), firstError(errors));
}

TEST_CASE("usage errors are reported before anything is sent") {
  auto b = createBackend("tcp", rankOptions(0, 1, nullptr));
  float x = 1;
  CHECK_THROWS_AS(b->broadcast(TensorView::flat(&x, 1), 1), UsageError);
  CHECK_THROWS_AS(b->send(TensorView::flat(&x, 1), 0), UsageError);
  CHECK_THROWS_AS(createBackend("tcp", rankOptions(0, 2, nullptr)), UsageError);  // no store
  BackendOptions bad = rankOptions(0, 1, nullptr);
  bad.rank = 1;
  CHECK_THROWS_AS(createBackend("tcp", bad), UsageError);
  // World size 1: every operation works without a peer.
  b->allreduce(TensorView::flat(&x, 1), ReduceOp::kAvg);
  CHECK(x == 1.0f);
  float out[1];
  b->allgather(TensorView::flat(&x, 1), TensorView::flat(out, 1));
  CHECK(out[0] == 1.0f);
  b->reduceScatter(TensorView::flat(&x, 1), TensorView::flat(out, 1), ReduceOp::kSum);
  b->barrier();
}

TEST_CASE("a buffer on a device the backend cannot serve, or of a dtype the collectives lack, is a UsageError") {
  for (const char* backend : {"tcp", "shm", "hier"}) {
    CAPTURE(backend);
    auto b = createBackend(backend, rankOptions(0, 1, nullptr));
    CHECK(b->device() == Device::cpu());
    float x = 1, out[1] = {0};
    const TensorView gpu = TensorView::flat(&x, 1, Device::cuda(0));
    CHECK_THROWS_WITH_AS(b->allreduce(gpu, ReduceOp::kSum),
                         doctest::Contains("works on CPU buffers, but the buffer is on cuda:0"), UsageError);
    CHECK_THROWS_WITH_AS(b->allreduceAsync(gpu, ReduceOp::kSum), doctest::Contains("cuda:0"), UsageError);
    CHECK_THROWS_WITH_AS(b->broadcast(TensorView::flat(&x, 0, Device::cuda(1)), 0), doctest::Contains("cuda:1"),
                         UsageError);  // even when empty: nothing would have been sent
    CHECK_THROWS_WITH_AS(b->allgather(TensorView::flat(&x, 1), TensorView::flat(out, 1, Device::cuda(0))),
                         doctest::Contains("the output is on cuda:0"), UsageError);
    CHECK_THROWS_WITH_AS(b->reduceScatter(gpu, TensorView::flat(out, 1), ReduceOp::kSum),
                         doctest::Contains("the input is on cuda:0"), UsageError);
    // Only the six reducible dtypes; the message names the one given.
    bool flag = true;
    uint8_t bytes[4] = {1, 2, 3, 4};
    CHECK_THROWS_WITH_AS(b->allreduce(TensorView::flat(&flag, 1), ReduceOp::kMax),
                         doctest::Contains("allreduce: dtype bool is not supported"), UsageError);
    CHECK_THROWS_WITH_AS(b->broadcast(TensorView::flat(bytes, 4), 0), doctest::Contains("dtype uint8"), UsageError);
    CHECK_THROWS_WITH_AS(b->allgather(TensorView::flat(bytes, 1), TensorView::flat(bytes, 1)),
                         doctest::Contains("dtype uint8"), UsageError);
    // allgather / reduce_scatter sizes must agree with the group size.
    float two[2] = {0, 0};
    CHECK_THROWS_WITH_AS(b->allgather(TensorView::flat(&x, 1), TensorView::flat(two, 2)),
                         doctest::Contains("allgather: the output must hold 1 blocks"), UsageError);
    CHECK_THROWS_AS(b->reduceScatter(TensorView::flat(two, 2), TensorView::flat(out, 1), ReduceOp::kSum), UsageError);
    CHECK_THROWS_AS(b->allgather(TensorView::flat(&x, 1), TensorView::flat(two, 1, DType::kInt32)), UsageError);
    // Usage errors leave the communicator usable.
    b->allreduce(TensorView::flat(&x, 1), ReduceOp::kSum);
    CHECK(x == 1.0f);
  }
}

TEST_CASE("an error in a sub-group maps its ranks to world ranks (group rank 1 of [1,3] is world rank 3)") {
  // A pipeline's data group of stage 1 is world ranks {1, 3}: its errors name rank 1 for world rank 3, which read
  // as "rank 1 died" on world rank 1 itself.
  for (const char* backend : {"tcp", "shm"}) {
    const int n = 4;
    auto store = rendezvous::MemoryStore::create();
    std::vector<BackendPtr> keep(static_cast<size_t>(n));
    std::string message;
    auto errors = onRanks(n, [&](int r) {
      BackendOptions o = rankOptions(r, n, store, nodesFor(backend));
      o.timeout = 500ms;
      auto world = createBackend(backend, o);
      keep[static_cast<size_t>(r)] = world;
      auto odd = world->newGroup({1, 3});
      if (r != 1) return;  // world rank 3 stays in the group but never calls: a stalled peer
      float x = 1;
      try {
        odd->allreduce(TensorView::flat(&x, 1), ReduceOp::kSum);
      } catch (const CommError& e) {
        message = e.what();
        return;
      }
      throw std::runtime_error("allreduce succeeded without world rank 3");
    });
    CHECK_MESSAGE(firstError(errors).empty(), (std::string(backend) + ": " + firstError(errors)));
    CHECK_MESSAGE(message.find("/sub[1,3]#0', whose ranks are world ranks: 0=1, 1=3)") != std::string::npos,
                  std::string(backend), ": ", message);
  }
}

TEST_CASE("per-backend knobs: set options win over the environment, which is still read, and sub-groups inherit them") {
  const BackendOptions one = rankOptions(0, 1, nullptr);
  ::setenv("DTRAIN_TCP_CHUNK_BYTES", "lots", 1);
  CHECK_THROWS_WITH_AS(createBackend("tcp", one), doctest::Contains("DTRAIN_TCP_CHUNK_BYTES=lots"), UsageError);
  tcp::TcpOptions t;
  t.chunkBytes = 4096;
  auto tcpOne = std::make_shared<tcp::TcpBackend>(one, t);  // the variable is not consulted
  CHECK(tcpOne->newGroup({0}) != nullptr);                   // nor by the sub-group
  ::unsetenv("DTRAIN_TCP_CHUNK_BYTES");

  ::setenv("DTRAIN_SHM_SLOT_BYTES", "-", 1);
  CHECK_THROWS_WITH_AS(createBackend("shm", one), doctest::Contains("DTRAIN_SHM_SLOT_BYTES"), UsageError);
  shm::ShmOptions s;
  s.slotBytes = 1 << 16;
  CHECK(std::make_shared<shm::ShmBackend>(one, s)->newGroup({0}) != nullptr);
  ::unsetenv("DTRAIN_SHM_SLOT_BYTES");

  ::setenv("DTRAIN_COMM_SPIN_US", "x", 1);  // shared by tcp and shm, so hier's inner shm reads it
  CHECK_THROWS_WITH_AS(createBackend("hier", one), doctest::Contains("DTRAIN_COMM_SPIN_US"), UsageError);
  hier::HierOptions h;
  h.shm.spinMicros = 10;
  CHECK(std::make_shared<hier::HierBackend>(one, h)->newGroup({0}) != nullptr);
  ::unsetenv("DTRAIN_COMM_SPIN_US");
  CHECK(ownShmSegments().empty());
}

TEST_CASE("the stale-segment sweep goes by the creator's lock, not by the pid in the name") {
  // It went by the pid: a live creator in another pid namespace sharing /dev/shm (a pid this one cannot see) lost
  // its segment inside the setup window, and a dead creator whose pid was reused kept its name.
  const shm::Layout layout(2, 4096, 4096);
  auto exists = [](const std::string& name) {
    const int fd = ::shm_open(name.c_str(), O_RDONLY | O_CLOEXEC, 0);
    if (fd >= 0) ::close(fd);
    return fd >= 0;
  };
  const std::string fresh = shm::newSegmentName();
  const std::string suffix = fresh.substr(fresh.rfind('-'));
  // pid_max is at most 2^22: no process here has this pid.
  const std::string liveName = fmt::format("/dtrain-shm-{}{}a", (1 << 22) + 7, suffix);
  const std::string deadName = fmt::format("/dtrain-shm-{}{}b", ::getpid(), suffix);  // a pid that is alive here
  const std::string newName = fmt::format("/dtrain-shm-{}{}c", ::getpid(), suffix);   // not sized yet
  auto live = shm::Segment::create(liveName, layout);
  for (const auto& [name, bytes] : {std::pair{deadName, 4096}, std::pair{newName, 0}}) {
    const int fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
    REQUIRE(fd >= 0);
    REQUIRE(::ftruncate(fd, bytes) == 0);
    ::close(fd);  // no lock held: its creator is gone
  }
  shm::removeStaleSegments();
  CHECK(exists(liveName));
  CHECK_FALSE(exists(deadName));
  CHECK(exists(newName));
  ::shm_unlink(newName.c_str());
  ::shm_unlink(deadName.c_str());
  live.reset();  // unlinks its name
  CHECK_FALSE(exists(liveName));
}
