// The parameter server (lib/train/ps_*.h, lib/common/ps_placement.h): placement, partitions, the wire protocol's
// validation, the consistency modes, and sync training against DDP's arithmetic. Servers run as threads on
// 127.0.0.1:0, workers as threads with a tcp group over the in-memory store.
#include <doctest/doctest.h>

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <future>
#include <thread>

#include "lib/comm/registry.h"
#include "lib/common/error.h"
#include "lib/common/ps_placement.h"
#include "lib/nn/optimizer.h"
#include "lib/train/fault.h"
#include "lib/train/job.h"
#include "lib/train/ps_client.h"
#include "lib/train/ps_server.h"
#include "lib/train/ps_strategy.h"
#include "rendezvous/memory_store.h"
#include "tests/comm/comm_test_util.h"
#include "tests/support/process.h"

using namespace dtrain;
using namespace dtrain::train;

namespace {

constexpr int kBatch = 4;
constexpr int kIn = 100;
constexpr int kOut = 10;

nn::ModelSpec specOf() {  // 5050 + 2040 + 410 = 7500 parameters
  return nn::parseModelSpec(nlohmann::json::parse(R"({"input": [100], "layers": [
      {"type": "linear", "out": 50}, {"type": "relu"}, {"type": "linear", "out": 40}, {"type": "relu"},
      {"type": "linear", "out": 10}]})"),
                            "t.json");
}

struct StepData {
  std::vector<float> x, dy;
};
StepData dataOf(int rank, int step) {
  StepData d{std::vector<float>(kBatch * kIn), std::vector<float>(kBatch * kOut)};
  for (size_t i = 0; i < d.x.size(); ++i) d.x[i] = std::sin(0.1f * static_cast<float>(i) + static_cast<float>(rank + 3 * step));
  for (size_t i = 0; i < d.dy.size(); ++i) d.dy[i] = 0.01f * static_cast<float>((i * 7 + rank * 3 + step) % 11) - 0.05f;
  return d;
}

void forwardBackward(nn::Model& model, const StepData& d, nn::LayerGradReady onReady) {
  model.forward(d.x.data(), kBatch, true);
  model.backward(TensorView::f32(d.dy.data(), Shape{kBatch, kOut}), onReady, nn::GradMode::kOverwrite);
}

bool close(float got, float want) { return std::abs(got - want) <= 1e-5f + 1e-4f * std::abs(want); }

// `n` servers in threads; addresses() once they listen. Joined (after serving) on destruction.
struct Servers {
  std::vector<std::unique_ptr<ps::Server>> servers;
  std::vector<std::string> addrs;
  std::vector<std::future<void>> done;
  Servers(int n, int workers, ps::Mode mode, int staleness, nn::OptimizerSpec opt) {
    for (int s = 0; s < n; ++s) {
      servers.push_back(std::make_unique<ps::Server>(ps::ServerOptions{.serverRank = s,
                                                                      .servers = n,
                                                                      .workers = workers,
                                                                      .mode = mode,
                                                                      .staleness = staleness,
                                                                      .optimizer = opt,
                                                                      .timeout = std::chrono::seconds(60)}));
      addrs.push_back(servers.back()->listen());
    }
    for (auto& s : servers) done.push_back(std::async(std::launch::async, [p = s.get()] { p->serve(); }));
  }
  ~Servers() {
    for (auto& s : servers) s->stop();
    for (auto& d : done) d.wait();
  }
};

ProcessGroups groupsOf(int rank, int size, comm::BackendPtr backend) {
  return ProcessGroups{.rank = rank, .worldSize = size, .dataRank = rank, .dataSize = size, .world = backend,
                       .data = backend};
}

std::vector<uint8_t> initPayload(std::span<const float> params) {
  std::vector<uint8_t> p(12 + params.size_bytes(), 0);  // steps 0, no ranges, the params (plain SGD: no state)
  std::memcpy(p.data() + 12, params.data(), params.size_bytes());
  return p;
}

}  // namespace

TEST_CASE("placement: servers are the last local ranks, spread evenly over the nodes, node 0 last to get more") {
  WorkerContract c;
  c.worldSize = 4;
  c.localWorldSize = 4;
  std::vector<std::string> roles;
  for (int r = 0; r < 4; ++r) {
    c.rank = c.localRank = r;
    auto role = psRole(c, 2);
    roles.push_back(fmt::format("{}{}/{}", role.server ? "s" : "w", role.roleRank, role.roleWorldSize));
  }
  CHECK(roles == std::vector<std::string>{"w0/2", "w1/2", "s0/2", "s1/2"});
  // Two nodes of three ranks, three servers: node 0 gets one, node 1 two.
  CHECK(psServersOnNode(0, 2, 3) == 1);
  CHECK(psServersOnNode(1, 2, 3) == 2);
  c = WorkerContract{.rank = 3, .worldSize = 6, .localRank = 0, .localWorldSize = 3, .nodeRank = 1, .numNodes = 2};
  auto role = psRole(c, 3);  // node 1's first rank: the third worker
  CHECK(!role.server);
  CHECK(role.roleRank == 2);
  CHECK(role.roleWorldSize == 3);
  auto view = workerView(c, 3);
  CHECK(view.rank == 2);
  CHECK(view.worldSize == 3);
  CHECK(view.localWorldSize == 1);
  CHECK(view.localRank == 0);
  c.rank = 5;
  c.localRank = 2;
  role = psRole(c, 3);
  CHECK(role.server);
  CHECK(role.roleRank == 2);
  auto env = withPsRole(c, 3);
  CHECK(env.roleName == "server");
  CHECK(env.roleRank == 2);
  CHECK(env.roleWorldSize == 3);
  CHECK(withPsRole(c, 0).roleName == "default");
  CHECK(psPlacement({3, 3}, 3) == "node 0: ranks 0-1 workers 0-1, rank 2 server 0\n"
                                  "node 1: rank 3 worker 2, ranks 4-5 servers 1-2\n");
  CHECK_THROWS_WITH_AS(psRole(c, 6), doctest::Contains("1 <= parallel.servers < world size"), UsageError);
  CHECK_THROWS_AS(psPlacement({1, 1}, 2), UsageError);
}

TEST_CASE("partitions: at most 4 MiB, every server gets work, the whole arena exactly once") {
  auto plan = ps::planPartitions(7500, 2, 1024);
  size_t next = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    CHECK(plan[i].offset == next);
    CHECK(plan[i].count <= 1024);
    CHECK(plan[i].server == static_cast<int>(i % 2));
    next += plan[i].count;
  }
  CHECK(next == 7500);
  plan = ps::planPartitions(100, 4);  // small: one slice per server, rounded to 16 floats
  CHECK(plan.size() == 4);
  CHECK(plan[0].count == 32);
  CHECK(plan[3].count == 4);
  plan = ps::planPartitions(size_t{3} << 20, 1);
  CHECK(plan.size() == 3);
  CHECK(plan[0].count == ps::kMaxPartitionFloats);
}

TEST_CASE("protocol: headers round-trip; a bad magic, op, reserved byte or oversized payload is refused") {
  uint8_t buf[ps::kHeaderBytes];
  ps::encode(ps::RequestHeader{.op = ps::Op::kPushPull, .partition = 7, .step = 42, .lr = 0.5, .bytes = 64}, buf);
  auto h = ps::decodeRequest(buf);
  CHECK(h.op == ps::Op::kPushPull);
  CHECK(h.partition == 7);
  CHECK(h.step == 42);
  CHECK(h.lr == 0.5);
  CHECK(h.bytes == 64);
  uint8_t bad[ps::kHeaderBytes];
  std::memcpy(bad, buf, sizeof(buf));
  bad[0] ^= 1;
  CHECK_THROWS_WITH_AS(ps::decodeRequest(bad), doctest::Contains("bad magic"), ProtocolError);
  std::memcpy(bad, buf, sizeof(buf));
  bad[4] = 99;
  CHECK_THROWS_WITH_AS(ps::decodeRequest(bad), doctest::Contains("unknown op"), ProtocolError);
  std::memcpy(bad, buf, sizeof(buf));
  bad[5] = 1;
  CHECK_THROWS_AS(ps::decodeRequest(bad), ProtocolError);
  ps::encode(ps::RequestHeader{.op = ps::Op::kPushPull, .bytes = ps::kMaxPayloadBytes + 1}, bad);
  CHECK_THROWS_WITH_AS(ps::decodeRequest(bad), doctest::Contains("payload"), ProtocolError);
  ps::encode(ps::ReplyHeader{.ok = false, .partition = 3, .version = 9, .minClock = 8, .bytes = 5}, buf);
  auto r = ps::decodeReply(buf);
  CHECK(!r.ok);
  CHECK(r.version == 9);
  CHECK(r.minClock == 8);
}

TEST_CASE("protocol: a server that closes the connection is named once, as the worker's error says it") {
  // It read "parameter server: parameter server 0 (127.0.0.1:55623) closed the connection".
  int fds[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0);
  ::close(fds[1]);
  uint8_t header[ps::kHeaderBytes];
  CHECK_THROWS_WITH_AS(ps::recvBytes(fds[0], header, sizeof(header), Deadline(std::chrono::seconds(5)),
                                     "parameter server 0 (127.0.0.1:55623)"),
                       "parameter server 0 (127.0.0.1:55623) closed the connection", CommError);
  ::close(fds[0]);
}

TEST_CASE("sync mode equals DDP's averaged step (Adam, 2 workers, 2 servers, several partitions)") {
  constexpr int kWorkers = 2;
  constexpr int kSteps = 3;
  nn::OptimizerSpec opt{.type = nn::OptimizerType::kAdam, .lr = 0.01};
  Servers servers(2, kWorkers, ps::Mode::kSync, 0, opt);
  // The reference: one model, one optimizer, the average of both workers' gradients per step (what DDP does).
  auto spec = specOf();
  nn::Model reference = nn::Model::build(spec, kBatch, 1);
  auto refOpt = nn::Optimizer::create(opt, reference.numParams());
  for (int step = 0; step < kSteps; ++step) {
    std::vector<float> avg(reference.numParams(), 0.0f);
    for (int w = 0; w < kWorkers; ++w) {
      forwardBackward(reference, dataOf(w, step), {});
      auto g = reference.grads();
      for (size_t i = 0; i < avg.size(); ++i) avg[i] += g[i] / kWorkers;
    }
    refOpt->step(reference.params(), avg);
  }
  auto store = rendezvous::MemoryStore::create();
  std::vector<std::string> mismatch(kWorkers);
  auto errors = comm::testing::onRanks(kWorkers, [&](int rank) {
    auto backend = comm::createBackend("tcp", comm::testing::rankOptions(rank, kWorkers, store));
    PsSettings settings{.servers = 2, .mode = "sync"};
    PsStrategy strategy(groupsOf(rank, kWorkers, backend),
                        {.settings = settings, .serverAddresses = servers.addrs, .partitionFloats = 1024});
    CHECK(strategy.updatesParameters());
    // Different seeds: only worker 0's init makes them equal.
    nn::Model model = nn::Model::build(spec, kBatch, rank == 0 ? 1 : 77);
    auto optimizer = nn::Optimizer::create(opt, model.numParams());
    strategy.bindOptimizer(*optimizer, 0);
    strategy.prepare(model);
    for (int step = 0; step < kSteps; ++step) {
      strategy.beginStep(step, 0.01);
      forwardBackward(model, dataOf(rank, step), strategy.gradReadyHook());
      strategy.finishStep();
    }
    auto p = model.params();
    auto ref = reference.params();
    for (size_t i = 0; i < p.size() && mismatch[static_cast<size_t>(rank)].empty(); ++i)
      if (!close(p[i], ref[i])) mismatch[static_cast<size_t>(rank)] = fmt::format("param[{}] = {}, want {}", i, p[i], ref[i]);
    // Worker 0 fetches the servers' optimizer state for a checkpoint: it matches the reference's.
    if (rank == 0) {
      strategy.syncForSave();
      CHECK(optimizer->steps() == kSteps);
      auto got = optimizer->stateBuffers();
      auto want = refOpt->stateBuffers();
      REQUIRE(got.size() == want.size());
      for (size_t b = 0; b < got.size(); ++b)
        for (size_t i = 0; i < got[b].data.size(); i += 97) CHECK(close(got[b].data[i], want[b].data[i]));
    }
    strategy.finishRun();
  });
  REQUIRE(comm::testing::firstError(errors) == "");
  for (const auto& m : mismatch) CHECK(m == "");
}

// One request on a raw connection: the reply header and its payload.
std::pair<ps::ReplyHeader, std::string> rawRequest(int fd, const ps::RequestHeader& req, const void* payload) {
  uint8_t h[ps::kHeaderBytes];
  ps::encode(req, h);
  ps::sendFrame(fd, h, payload, req.bytes, "server");
  ps::recvBytes(fd, h, ps::kHeaderBytes, Deadline(std::chrono::seconds(30)), "server");
  auto r = ps::decodeReply(h);
  std::string body(r.bytes, '\0');
  ps::recvBytes(fd, body.data(), body.size(), Deadline(std::chrono::seconds(30)), "server");
  return {r, body};
}

TEST_CASE("a wrong-size push gets an error; the server keeps serving that worker and the others") {
  nn::OptimizerSpec sgd{.type = nn::OptimizerType::kSgd, .lr = 0.1};
  Servers servers(1, 3, ps::Mode::kAsync, 0, sgd);
  std::vector<float> params(64, 1.0f), grad(64, 1.0f), out(64, 0.0f);
  ps::Client w0({.workerRank = 0, .workers = 3, .numParams = 64, .partitionFloats = 64, .servers = servers.addrs});
  ps::Client w1({.workerRank = 1, .workers = 3, .numParams = 64, .partitionFloats = 64, .servers = servers.addrs});
  w0.init(0, 0, initPayload(params));
  auto hp = net::parseHostPort(servers.addrs[0], 0);
  // A connection speaking garbage is closed; nobody else notices.
  {
    net::Socket raw = net::connect(*hp, Deadline(std::chrono::seconds(30)));
    uint8_t junk[ps::kHeaderBytes] = {1, 2, 3};
    REQUIRE(net::sendAll(raw.fd(), junk, sizeof(junk)));
    uint8_t reply[1];
    CHECK(!net::recvAll(raw.fd(), reply, 1, Deadline(std::chrono::seconds(30))));  // closed by the server
  }
  // Worker 2 on a raw connection: a push before hello, then a push of 63 floats to a 64-float partition.
  net::Socket raw = net::connect(*hp, Deadline(std::chrono::seconds(30)));
  auto [r0, m0] = rawRequest(raw.fd(), {.op = ps::Op::kPushPull, .partition = 0, .bytes = 256}, grad.data());
  CHECK(!r0.ok);
  CHECK(m0.find("before hello") != std::string::npos);
  std::vector<uint8_t> hello(24, 0);
  const int32_t rank = 2, workers = 3;
  const uint64_t n = 64;
  std::memcpy(hello.data(), &rank, 4);
  std::memcpy(hello.data() + 4, &workers, 4);
  std::memcpy(hello.data() + 8, &n, 8);
  std::memcpy(hello.data() + 16, &n, 8);
  CHECK(rawRequest(raw.fd(), {.op = ps::Op::kHello, .bytes = 24}, hello.data()).first.ok);
  auto [r1, m1] = rawRequest(raw.fd(), {.op = ps::Op::kPushPull, .partition = 0, .lr = 0.1, .bytes = 63 * 4},
                             grad.data());
  CHECK(!r1.ok);
  CHECK(m1.find("252 bytes, expected 256") != std::string::npos);
  auto [r2, m2] = rawRequest(raw.fd(), {.op = ps::Op::kPushPull, .partition = 5, .lr = 0.1, .bytes = 256},
                             grad.data());
  CHECK(!r2.ok);
  CHECK(m2.find("partition 5") != std::string::npos);
  // The others are served, and so is worker 2's next, correct push.
  w1.pushPullAsync(0, 0, 0.1, grad.data(), out.data());
  w1.wait();
  CHECK(out[0] == doctest::Approx(0.9));
  auto [r3, m3] = rawRequest(raw.fd(), {.op = ps::Op::kPushPull, .partition = 0, .lr = 0.1, .bytes = 256},
                             grad.data());
  REQUIRE(r3.ok);
  float first = 0;
  std::memcpy(&first, m3.data(), 4);
  CHECK(first == doctest::Approx(0.8));
  w0.pushPullAsync(0, 0, 0.1, grad.data(), out.data());
  w0.wait();
  CHECK(out[0] == doctest::Approx(0.7));
  // The client refuses a partition outside its plan before sending anything.
  CHECK_THROWS_AS(w0.pushPullAsync(9, 0, 0.1, grad.data(), out.data()), std::out_of_range);
  CHECK(servers.servers[0]->stats().errors >= 3);
  rawRequest(raw.fd(), {.op = ps::Op::kBye}, nullptr);
  w0.bye();
  w1.bye();
}

TEST_CASE("ssp bounds how far a worker runs ahead; async does not") {
  nn::OptimizerSpec sgd{.type = nn::OptimizerType::kSgd, .lr = 0.01};
  constexpr int kSteps = 6;
  for (auto mode : {ps::Mode::kSsp, ps::Mode::kAsync}) {
    CAPTURE(ps::modeName(mode));
    Servers servers(1, 2, mode, 1, sgd);
    std::vector<float> params(32, 0.0f);
    ps::Client w0({.workerRank = 0, .workers = 2, .numParams = 32, .partitionFloats = 32, .servers = servers.addrs});
    ps::Client w1({.workerRank = 1, .workers = 2, .numParams = 32, .partitionFloats = 32, .servers = servers.addrs});
    w0.init(0, 0, initPayload(params));
    // Worker 0 runs all its steps on a thread while worker 1 starts only when told to.
    std::promise<void> started1;
    auto run = [&](ps::Client& c, int64_t steps) {
      std::vector<float> g(32, 1.0f), p(32);
      for (int64_t s = 0; s < steps; ++s) {
        c.pushPullAsync(0, s, 0.01, g.data(), p.data());
        c.wait();
      }
      return c.takeStaleness();
    };
    auto fast = std::async(std::launch::async, [&] { return run(w0, kSteps); });
    if (mode == ps::Mode::kAsync) fast.wait();  // async: worker 0 finishes alone, 6 steps ahead of worker 1
    auto slow = run(w1, kSteps);
    auto f = fast.get();
    if (mode == ps::Mode::kSsp) {
      CHECK(f.max <= 1);
      CHECK(slow.max <= 1);
    } else {
      CHECK(f.max == kSteps);
    }
    w0.bye();
    w1.bye();
  }
}

TEST_CASE("sync: a worker that leaves mid-step fails the others' step instead of hanging them") {
  nn::OptimizerSpec sgd{.type = nn::OptimizerType::kSgd, .lr = 0.1};
  Servers servers(1, 2, ps::Mode::kSync, 0, sgd);
  std::vector<float> params(32, 0.0f), g(32, 1.0f), p(32);
  ps::Client w0({.workerRank = 0, .workers = 2, .numParams = 32, .partitionFloats = 32, .servers = servers.addrs});
  {
    ps::Client w1({.workerRank = 1, .workers = 2, .numParams = 32, .partitionFloats = 32, .servers = servers.addrs});
    w0.init(0, 0, initPayload(params));
  }  // worker 1's connection closes without bye
  w0.pushPullAsync(0, 0, 0.1, g.data(), p.data());
  CHECK_THROWS_WITH_AS(w0.wait(), doctest::Contains("worker 1 left"), CommError);
}

TEST_CASE("job: parameter-server fields are validated before any rank starts") {
  auto dir = testing::tempDir("psjob");
  auto load = [&](const std::string& parallel) {
    auto path = dir + "/job.json";
    testing::writeFile(path, std::string(R"({
      "model": {"input": [4], "layers": [{"type": "linear", "out": 3}]},
      "loss": {"type": "cross_entropy"},
      "data": {"train": {"format": "synthetic", "task": "classification", "samples": 64, "features": 4,
               "num_classes": 3}, "batch_size": 8},
      "optimizer": {"type": "sgd", "lr": 0.1},
      "parallel": )") + parallel + "}");
    return loadJob({path});
  };
  auto job = load(R"({"strategy": "parameter_server", "servers": 2, "mode": "ssp", "staleness": 3})");
  REQUIRE(job.parallel.ps);
  CHECK(job.parallel.ps->servers == 2);
  CHECK(job.parallel.ps->mode == "ssp");
  CHECK(job.parallel.ps->staleness == 3);
  CHECK(load(R"({"strategy": "parameter_server"})").parallel.ps->mode == "sync");
  CHECK(!load(R"({"strategy": "ddp"})").parallel.ps);
  CHECK_THROWS_WITH_AS(load(R"({"strategy": "parameter_server", "mode": "ssp", "staleness": -1})"),
                       doctest::Contains("/parallel/staleness"), ConfigError);
  CHECK_THROWS_WITH_AS(load(R"({"strategy": "parameter_server", "servers": 0})"),
                       doctest::Contains("/parallel/servers"), ConfigError);
  CHECK_THROWS_WITH_AS(load(R"({"strategy": "parameter_server", "mode": "hogwild"})"),
                       doctest::Contains("/parallel/mode"), ConfigError);
  CHECK_THROWS_WITH_AS(load(R"({"strategy": "parameter_server", "staleness": 2})"),
                       doctest::Contains("only with \"mode\": \"ssp\""), ConfigError);
  CHECK_THROWS_WITH_AS(load(R"({"servers": 2})"), doctest::Contains("only for the parameter-server strategy"),
                       ConfigError);
  CHECK_THROWS_WITH_AS(load(R"({"strategy": "parameter_server", "compression": {"type": "fp16"}})"),
                       doctest::Contains("/parallel/compression"), ConfigError);
}

TEST_CASE("DTRAIN_FAULT action=slow: a straggler switch with its delay") {
  auto faults = parseFaults("rank=1,step=2,action=slow,ms=50");
  REQUIRE(faults.size() == 1);
  CHECK(faults[0].action == "slow");
  CHECK(faults[0].ms == 50);
  CHECK_THROWS_WITH_AS(parseFaults("rank=1,step=2,action=slow"), doctest::Contains("ms=M goes with action=slow"),
                       UsageError);
  CHECK_THROWS_AS(parseFaults("rank=1,step=2,action=kill,ms=5"), UsageError);
}

TEST_CASE("counted pushes: server 0 tallies each worker's applied samples; a refused or cut-off push counts nothing") {
  nn::OptimizerSpec sgd{.type = nn::OptimizerType::kSgd, .lr = 0.1};
  Servers servers(1, 3, ps::Mode::kAsync, 0, sgd);
  std::vector<float> params(64, 1.0f), grad(64, 1.0f), out(64, 0.0f);
  ps::Client w0({.workerRank = 0, .workers = 3, .numParams = 64, .partitionFloats = 64, .servers = servers.addrs});
  w0.init(0, 0, initPayload(params));
  // Two counted steps of 8 samples and one plain push (not counted) by worker 0.
  w0.pushPullAsync(0, 0, 0.1, grad.data(), out.data(), 8);
  w0.pushPullAsync(0, 1, 0.1, grad.data(), out.data(), 8);
  w0.pushPullAsync(0, 2, 0.1, grad.data(), out.data());
  w0.wait();
  CHECK(out[0] == doctest::Approx(0.7));
  // Worker 1 on a raw connection: a counted push of the wrong size (refused), a good one of 5 samples, then one
  // whose payload is cut off by the connection closing (a worker killed mid-send): never applied, never counted.
  auto hp = net::parseHostPort(servers.addrs[0], 0);
  {
    net::Socket raw = net::connect(*hp, Deadline(std::chrono::seconds(30)));
    std::vector<uint8_t> hello(24, 0);
    const int32_t rank = 1, workers = 3;
    const uint64_t n = 64;
    std::memcpy(hello.data(), &rank, 4);
    std::memcpy(hello.data() + 4, &workers, 4);
    std::memcpy(hello.data() + 8, &n, 8);
    std::memcpy(hello.data() + 16, &n, 8);
    REQUIRE(rawRequest(raw.fd(), {.op = ps::Op::kHello, .bytes = 24}, hello.data()).first.ok);
    std::vector<uint8_t> counted(64 * 4 + 8, 0);
    std::memcpy(counted.data(), grad.data(), 64 * 4);
    const uint64_t five = 5;
    std::memcpy(counted.data() + 64 * 4, &five, 8);
    auto [bad, why] = rawRequest(raw.fd(), {.op = ps::Op::kPushPullCounted, .partition = 0, .lr = 0.1,
                                            .bytes = 64 * 4}, counted.data());
    CHECK(!bad.ok);
    CHECK(why.find("a payload of 256 bytes, expected 264 (64 floats of gradient and a u64 sample count)") !=
          std::string::npos);
    auto [good, body] = rawRequest(raw.fd(), {.op = ps::Op::kPushPullCounted, .partition = 0, .step = 3, .lr = 0.1,
                                              .bytes = counted.size()}, counted.data());
    REQUIRE(good.ok);
    CHECK(body.size() == 64 * 4);  // the parameters, as for a plain push
    uint8_t h[ps::kHeaderBytes];
    ps::encode(ps::RequestHeader{.op = ps::Op::kPushPullCounted, .partition = 0, .step = 4, .lr = 0.1,
                                 .bytes = counted.size()}, h);
    REQUIRE(net::sendAll(raw.fd(), h, sizeof(h)));
    REQUIRE(net::sendAll(raw.fd(), counted.data(), 100));
  }  // closed without bye: worker 1 is lost
  // Worker 2 never comes. The barrier waits for the live workers only (worker 0) and answers the tally.
  const std::vector<ps::WorkerTally> t = w0.barrier(1);
  REQUIRE(t.size() == 3);
  CHECK(t[0].samples == 16);
  CHECK(t[0].steps == 2);
  CHECK(t[0].state == ps::WorkerTally::State::kLive);
  CHECK(t[1].samples == 5);
  CHECK(t[1].steps == 1);
  CHECK(t[1].state == ps::WorkerTally::State::kLost);
  CHECK(t[2].samples == 0);
  CHECK(t[2].state == ps::WorkerTally::State::kAbsent);
  CHECK(servers.servers[0]->stats().updates == 4);  // w0's three and w1's good one: the cut-off push was not applied
  w0.bye();
  CHECK(servers.servers[0]->tallies()[0].state == ps::WorkerTally::State::kFinished);
  // The tally's wire form round-trips, and a reply that is not whole entries is refused.
  const auto bytes = ps::encodeTallies(t);
  CHECK(bytes.size() == 3 * ps::kWorkerTallyBytes);
  CHECK(ps::decodeTallies(bytes.data(), bytes.size())[1].samples == 5);
  CHECK_THROWS_WITH_AS(ps::decodeTallies(bytes.data(), 20), doctest::Contains("multiple of 48"), ProtocolError);
}

TEST_CASE("counted pushes with 2 servers: a step applied on one server only is partial in the merged tally, not "
          "counted and not lost") {
  nn::OptimizerSpec sgd{.type = nn::OptimizerType::kSgd, .lr = 0.1};
  Servers servers(2, 2, ps::Mode::kAsync, 0, sgd);
  std::vector<float> params(64, 1.0f), grad(128, 1.0f), out(128, 0.0f), out1(128, 0.0f);
  // 128 parameters in partitions of 64: partition 0 on server 0, partition 1 on server 1.
  ps::Client w0({.workerRank = 0, .workers = 2, .numParams = 128, .partitionFloats = 64, .servers = servers.addrs});
  w0.init(0, 0, initPayload(params));
  w0.init(1, 0, initPayload(params));
  w0.wait();
  {
    ps::Client w1({.workerRank = 1, .workers = 2, .numParams = 128, .partitionFloats = 64, .servers = servers.addrs});
    // Worker 1: step 0 whole (8 samples), then step 1's partition 1 only (6 samples): it dies before partition 0.
    w1.pushPullAsync(1, 0, 0.1, grad.data() + 64, out1.data() + 64, 8);
    w1.pushPullAsync(0, 0, 0.1, grad.data(), out1.data(), 8);
    w1.wait();
    w1.pushPullAsync(1, 1, 0.1, grad.data() + 64, out1.data() + 64, 6);
    w1.wait();
  }  // no bye: lost
  // Worker 0: two whole steps of 8.
  for (int64_t step : {0, 1}) {
    w0.pushPullAsync(1, step, 0.1, grad.data() + 64, out.data() + 64, 8);
    w0.pushPullAsync(0, step, 0.1, grad.data(), out.data(), 8);
    w0.wait();
  }
  const std::vector<ps::WorkerTally> t0 = w0.barrier(1);
  REQUIRE(t0.size() == 2);
  CHECK(t0[1].state == ps::WorkerTally::State::kLost);
  CHECK(t0[1].steps == 1);  // server 0 never saw worker 1's step 1
  CHECK(t0[1].partialPartitions == 0);
  CHECK(t0[1].partitions == 1);
  // Server 1's tally, once worker 1 left it too: worker 1's step 1 is whole there (its one partition).
  auto all = w0.otherTallies({1});
  REQUIRE(all.size() == 2);
  CHECK(all[0].empty());
  REQUIRE(all[1].size() == 2);
  CHECK(all[1][1].steps == 2);
  CHECK(all[1][1].samples == 14);
  CHECK(all[1][1].state == ps::WorkerTally::State::kLost);
  all[0] = t0;
  const auto merged = ps::mergeTallies(all);
  REQUIRE(merged.size() == 2);
  CHECK(merged[0].steps == 2);
  CHECK(merged[0].samples == 16);
  CHECK(merged[0].partitions == 2);
  CHECK(merged[0].partialPartitions == 0);
  CHECK(merged[0].state == ps::WorkerTally::State::kLive);
  CHECK(merged[1].steps == 1);  // applied on every server
  CHECK(merged[1].samples == 8);
  CHECK(merged[1].partialPartitions == 1);  // step 2 (index 1): 1 of the 2 partitions applied
  CHECK(merged[1].partitions == 2);
  CHECK(merged[1].partialSamples == 6);
  CHECK(merged[1].state == ps::WorkerTally::State::kLost);
  // The new fields travel.
  const auto back = ps::decodeTallies(ps::encodeTallies(merged).data(), 2 * ps::kWorkerTallyBytes);
  CHECK(back[1].partialPartitions == 1);
  CHECK(back[1].partialSamples == 6);
  CHECK(back[1].partitions == 2);
  // A server holding a step in part (2 partitions on one server, one applied) reports it as such.
  ps::WorkerTally a{.samples = 8, .steps = 1, .state = ps::WorkerTally::State::kLost, .partitions = 2,
                    .partialPartitions = 1, .partialSamples = 6};
  ps::WorkerTally b{.samples = 8, .steps = 1, .state = ps::WorkerTally::State::kFinished, .partitions = 1};
  const auto m = ps::mergeTallies({{a}, {b}});
  CHECK(m[0].steps == 1);
  CHECK(m[0].partialPartitions == 1);
  CHECK(m[0].partitions == 3);
  CHECK(m[0].state == ps::WorkerTally::State::kLost);
  CHECK_THROWS_AS(ps::mergeTallies({{a}, {}}), ProtocolError);
  w0.bye();
}

TEST_CASE("DTRAIN_FAULT action=kill_mid_step parses (for workers only)") {
  auto faults = parseFaults("rank=1,step=7,action=kill_mid_step");
  REQUIRE(faults.size() == 1);
  CHECK(faults[0].action == "kill_mid_step");
  CHECK(faults[0].step == 7);
  CHECK_THROWS_AS(parseFaults("role=server,rank=1,step=7,action=kill_mid_step"), UsageError);
}

TEST_CASE("counted pushes in sync mode count when the step's average is applied, not when they arrive") {
  nn::OptimizerSpec sgd{.type = nn::OptimizerType::kSgd, .lr = 0.1};
  Servers servers(1, 2, ps::Mode::kSync, 0, sgd);
  std::vector<float> params(32, 0.0f), g(32, 1.0f), p0(32), p1(32);
  ps::Client w0({.workerRank = 0, .workers = 2, .numParams = 32, .partitionFloats = 32, .servers = servers.addrs});
  ps::Client w1({.workerRank = 1, .workers = 2, .numParams = 32, .partitionFloats = 32, .servers = servers.addrs});
  w0.init(0, 0, initPayload(params));
  w0.pushPullAsync(0, 0, 0.1, g.data(), p0.data(), 6);
  // Wait (bounded) until the server holds worker 0's push: the step is not complete, so nothing is counted yet.
  const Deadline deadline(std::chrono::seconds(30));
  while (servers.servers[0]->stats().pushes < 1 && !deadline.expired()) std::this_thread::yield();
  REQUIRE(servers.servers[0]->stats().pushes == 1);
  CHECK(servers.servers[0]->tallies()[0].samples == 0);
  w1.pushPullAsync(0, 0, 0.1, g.data(), p1.data(), 4);
  w0.wait();
  w1.wait();
  const auto t = servers.servers[0]->tallies();
  CHECK(t[0].samples == 6);
  CHECK(t[1].samples == 4);
  CHECK(t[0].steps == 1);
  w0.bye();
  w1.bye();
}

TEST_CASE("async strategy: each worker's samples as the servers applied them reach every worker at the barrier, a "
          "worker that left included") {
  constexpr int kWorkers = 2;
  nn::OptimizerSpec opt{.type = nn::OptimizerType::kSgd, .lr = 0.01};
  Servers servers(2, kWorkers, ps::Mode::kAsync, 0, opt);
  auto spec = specOf();
  auto store = rendezvous::MemoryStore::create();
  std::vector<std::vector<WorkerSamples>> seen(kWorkers);
  auto errors = comm::testing::onRanks(kWorkers, [&](int rank) {
    auto backend = comm::createBackend("tcp", comm::testing::rankOptions(rank, kWorkers, store));
    PsSettings settings{.servers = 2, .mode = "async"};
    PsStrategy strategy(groupsOf(rank, kWorkers, backend),
                        {.settings = settings, .serverAddresses = servers.addrs, .partitionFloats = 1024});
    nn::Model model = nn::Model::build(spec, kBatch, 1);
    auto optimizer = nn::Optimizer::create(opt, model.numParams());
    strategy.bindOptimizer(*optimizer, 0);
    strategy.prepare(model);
    // Worker 0: 5 steps of 2 micro-batches (4 + 3 samples); worker 1: 2 steps of 4, then it leaves without bye.
    const int steps = rank == 0 ? 5 : 2;
    for (int step = 0; step < steps; ++step) {
      strategy.beginStep(step, 0.01);
      if (rank == 0) strategy.countSamples(4);
      strategy.countSamples(rank == 0 ? 3 : 4);
      forwardBackward(model, dataOf(rank, step), strategy.gradReadyHook());
      strategy.finishStep();
    }
    if (rank == 1) return;  // the connections close without bye: a lost worker
    strategy.syncForSave();  // the final barrier
    seen[0] = strategy.workerSamples();
    strategy.finishRun();
  });
  REQUIRE(comm::testing::firstError(errors) == "");
  REQUIRE(seen[0].size() == 2);
  CHECK(seen[0][0].samples == 35);
  CHECK(seen[0][0].steps == 5);
  CHECK(seen[0][0].state == WorkerSamples::State::kLive);
  CHECK(seen[0][1].samples == 8);
  CHECK(seen[0][1].steps == 2);
  CHECK(seen[0][1].state == WorkerSamples::State::kLost);
}

TEST_CASE("monitoring: every protocol op has its /metrics label (the agent cannot link the protocol's names)") {
  for (int op = 1; op <= 15; ++op) {
    CAPTURE(op);
    REQUIRE(ps::validOp(static_cast<uint8_t>(op)));
    std::string name = ps::opName(static_cast<ps::Op>(op));
    std::replace(name.begin(), name.end(), '-', '_');
    if (name == "push_pull" || name == "push_pull_counted") name = "push";
    CHECK(std::string(psOpLabel(op)) == name);
  }
  CHECK(!ps::validOp(16));
  CHECK(std::string(psOpLabel(16)) == "other");
  CHECK(static_cast<int>(ps::Op::kTally) < PsServerMetrics::kOps);
}

TEST_CASE("monitoring: a server writes its requests, bytes, workers and staleness into the agent's block") {
  const std::string dir = testing::tempDir("psmetrics");
  auto mapping = WorkerMetricsMapping::create(dir + "/block");
  WorkerMetricsBlock& b = mapping.block();
  nn::OptimizerSpec sgd{.type = nn::OptimizerType::kSgd, .lr = 0.1};
  ps::Server server(ps::ServerOptions{.serverRank = 0, .servers = 1, .workers = 2, .mode = ps::Mode::kAsync,
                                      .optimizer = sgd, .timeout = std::chrono::seconds(60), .metrics = &b});
  std::vector<std::string> addrs{server.listen()};
  auto serving = std::async(std::launch::async, [&] { server.serve(); });
  std::vector<float> params(32, 0.0f), g(32, 1.0f), p(32);
  {
    ps::Client w0({.workerRank = 0, .workers = 2, .numParams = 32, .partitionFloats = 32, .servers = addrs});
    {
      ps::Client w1({.workerRank = 1, .workers = 2, .numParams = 32, .partitionFloats = 32, .servers = addrs});
      w0.init(0, 0, initPayload(params));
      // Worker 0 runs 3 steps while worker 1 is at 0: staleness 1, 2, 3.
      for (int64_t s = 0; s < 3; ++s) {
        w0.pushPullAsync(0, s, 0.1, g.data(), p.data(), 4);
        w0.wait();
      }
      CHECK(b.server.workersLive.load() == 2);
    }  // worker 1 leaves without bye
    // The barrier is answered once worker 1 is gone (it counts live workers only).
    REQUIRE(w0.barrier(1).size() == 2);
    const PsServerMetrics& m = b.server;
    CHECK(m.workersLost.load() == 1);
    CHECK(m.workersLive.load() == 1);
    CHECK(m.workers.load() == 2);
    CHECK(m.requestsTotal[static_cast<int>(ps::Op::kHello)].load() == 2);
    CHECK(m.requestsTotal[static_cast<int>(ps::Op::kPushPullCounted)].load() == 3);
    CHECK(m.requestsTotal[static_cast<int>(ps::Op::kBarrier)].load() == 1);
    CHECK(m.updatesTotal.load() == 3);
    // In: 2 hellos (24 bytes), an init (12 + 128), 3 counted pushes (128 + 8) and a barrier; out: 3 x the
    // parameters and the barrier's tally (2 x 48); each with its 40-byte header.
    CHECK(m.receivedBytesTotal.load() == 7 * ps::kHeaderBytes + 2 * 24 + 140 + 3 * 136);
    CHECK(m.sentBytesTotal.load() == 7 * ps::kHeaderBytes + 3 * 128 + 2 * ps::kWorkerTallyBytes);
    CHECK(m.stalenessCount.load() == 3);
    CHECK(m.stalenessMax.load() == 3);
    CHECK(m.stalenessSum.load() == 6);
    CHECK(m.stalenessBucket[1].load() == 1);  // le 1
    CHECK(m.stalenessBucket[2].load() == 1);  // le 2
    CHECK(m.stalenessBucket[3].load() == 1);  // le 4
    CHECK(b.updatedUnixSeconds.load() > 0);
    w0.bye();
  }
  serving.get();
}

TEST_CASE("a wait that times out names the worker it waited for (sync: the one that pushed none; ssp: the slowest)") {
  // The error said "timed out waiting for the other workers' gradients of step 10" without naming the worker that
  // hung, which is what the user has to find (the launcher's report quotes this line).
  nn::OptimizerSpec sgd{.type = nn::OptimizerType::kSgd, .lr = 0.1};
  for (auto mode : {ps::Mode::kSync, ps::Mode::kSsp}) {
    CAPTURE(ps::modeName(mode));
    ps::Server server({.serverRank = 0, .servers = 1, .workers = 2, .mode = mode, .staleness = 1, .optimizer = sgd,
                       .timeout = std::chrono::milliseconds(300)});
    const std::vector<std::string> addrs{server.listen()};
    auto served = std::async(std::launch::async, [&] { server.serve(); });
    std::vector<float> params(32, 0.0f), g(32, 1.0f), p(32);
    ps::Client w0({.workerRank = 0, .workers = 2, .numParams = 32, .partitionFloats = 32, .servers = addrs});
    ps::Client w1({.workerRank = 1, .workers = 2, .numParams = 32, .partitionFloats = 32, .servers = addrs});
    w0.init(0, 0, initPayload(params));
    if (mode == ps::Mode::kSsp) {  // step 0 is within the bound; step 1 waits for worker 1's step 0
      w0.pushPullAsync(0, 0, 0.1, g.data(), p.data());
      w0.wait();
    }
    w0.pushPullAsync(0, mode == ps::Mode::kSync ? 0 : 1, 0.1, g.data(), p.data());
    if (mode == ps::Mode::kSync)
      CHECK_THROWS_WITH_AS(w0.wait(), doctest::Contains("timed out after 300 ms waiting for the other workers' "
                                                        "gradients of step 0: worker 1 pushed none"),
                           CommError);
    else
      CHECK_THROWS_WITH_AS(w0.wait(), doctest::Contains("timed out after 300 ms waiting for the slowest worker (ssp, "
                                                        "staleness 1): worker 1 (at 0 step(s) pushed)"),
                           CommError);
    w1.bye();
    server.stop();
    served.wait();
  }
}
