// Sparse embedding tables on the parameter servers (lib/train/ps_sparse.h): row partitioning, id deduplication and
// gradient coalescing, and the sparse optimizers against the dense computation on the touched rows.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <future>
#include <vector>

#include "lib/common/error.h"
#include "lib/nn/optimizer.h"
#include "lib/train/ps_client.h"
#include "lib/train/ps_server.h"
#include "lib/train/ps_sparse.h"
#include "lib/train/sparse_tables.h"

using namespace dtrain;
using namespace dtrain::train::ps;

namespace {

constexpr int64_t kRows = 50;
constexpr int kDim = 3;

// The whole table as the servers hold it: one shard per server.
struct Table {
  std::vector<RowRange> plan;
  std::vector<SparseShard> shards;
  Table(int servers, SparseOptimizerSpec spec) : plan(planRowRanges(kRows, servers)) {
    for (const RowRange& r : plan) shards.emplace_back(r, kDim, spec, 1.0, 7);
  }
  std::vector<float> dense() {
    std::vector<float> out(static_cast<size_t>(kRows * kDim));
    for (auto& s : shards)
      std::copy(s.values().begin(), s.values().end(), out.begin() + s.range().begin * kDim);
    return out;
  }
  // What a worker does: pull the batch's rows, push their coalesced gradient (one push per server).
  std::vector<float> pullRows(const UniqueIds& u) {
    std::vector<float> rows(u.ids.size() * kDim);
    for (size_t i = 0; i < u.ids.size(); ++i)
      shards[static_cast<size_t>(rowServer(plan, u.ids[i]))].pull(
          std::span(&u.ids[i], 1), std::span(rows.data() + i * kDim, kDim));
    return rows;
  }
  void push(const UniqueIds& u, const std::vector<float>& grads, double lr) {
    for (auto& s : shards) {
      std::vector<int64_t> ids;
      std::vector<float> g;
      for (size_t i = 0; i < u.ids.size(); ++i)
        if (rowServer(plan, u.ids[i]) == s.range().server) {
          ids.push_back(u.ids[i]);
          for (int c = 0; c < kDim; ++c) g.push_back(grads[i * kDim + static_cast<size_t>(c)]);
        }
      s.apply(ids, g, lr);  // every shard steps, touched or not (one optimizer step of the table)
    }
  }
};

// The dense gradient of the table for a batch: scatter-add of every occurrence's gradient row.
std::vector<float> denseGrad(const std::vector<int64_t>& ids, const std::vector<float>& occ) {
  std::vector<float> g(kRows * kDim, 0.0f);
  for (size_t i = 0; i < ids.size(); ++i)
    for (int c = 0; c < kDim; ++c) g[static_cast<size_t>(ids[i] * kDim + c)] += occ[i * kDim + static_cast<size_t>(c)];
  return g;
}

std::vector<float> occurrenceGrads(size_t n, int salt) {
  std::vector<float> g(n * kDim);
  for (size_t i = 0; i < g.size(); ++i) g[i] = std::sin(static_cast<float>(i * 7 + static_cast<size_t>(salt)) * 0.37f);
  return g;
}

const std::vector<std::vector<int64_t>> kBatches = {{3, 17, 3, 49, 0, 17, 17}, {25, 3, 8}, {49, 49, 12, 3}};

}  // namespace

TEST_CASE("row ranges cover the table once, in server order") {
  auto plan = planRowRanges(10, 3);
  REQUIRE(plan.size() == 3);
  CHECK(plan[0].begin == 0);
  CHECK(plan[0].end == 4);
  CHECK(plan[1].rows() == 3);
  CHECK(plan[2].end == 10);
  CHECK(rowServer(plan, 0) == 0);
  CHECK(rowServer(plan, 4) == 1);
  CHECK(rowServer(plan, 9) == 2);
  CHECK_THROWS_AS(rowServer(plan, 10), Error);
  auto tiny = planRowRanges(1, 3);
  CHECK(tiny[0].rows() == 1);
  CHECK(tiny[2].rows() == 0);
  CHECK(rowServer(tiny, 0) == 0);
}

TEST_CASE("dedup + coalesce equals the dense scatter-add on the touched rows") {
  const std::vector<int64_t> ids = kBatches[0];
  UniqueIds u = dedupIds(ids, kRows);
  CHECK(u.ids == std::vector<int64_t>{0, 3, 17, 49});
  REQUIRE(u.slot.size() == ids.size());
  for (size_t i = 0; i < ids.size(); ++i) CHECK(u.ids[u.slot[i]] == ids[i]);
  auto occ = occurrenceGrads(ids.size(), 1);
  auto coalesced = coalesceRowGrads(u, occ, kDim);
  auto dense = denseGrad(ids, occ);
  for (size_t i = 0; i < u.ids.size(); ++i)
    for (int c = 0; c < kDim; ++c)
      CHECK(coalesced[i * kDim + static_cast<size_t>(c)] == dense[static_cast<size_t>(u.ids[i] * kDim + c)]);
  CHECK_THROWS_AS(dedupIds(std::vector<int64_t>{1, 50}, kRows), Error);
  CHECK_THROWS_AS(dedupIds(std::vector<int64_t>{-1}, kRows), Error);
}

TEST_CASE("a table's initial rows do not depend on the number of servers") {
  Table one(1, {}), three(3, {});
  CHECK(one.dense() == three.dense());
  UniqueIds u = dedupIds(kBatches[0], kRows);
  auto rows = three.pullRows(u);
  auto all = one.dense();
  for (size_t i = 0; i < u.ids.size(); ++i)
    for (int c = 0; c < kDim; ++c) CHECK(rows[i * kDim + static_cast<size_t>(c)] == all[static_cast<size_t>(u.ids[i] * kDim + c)]);
}

TEST_CASE("sparse SGD over 3 servers equals torch.optim.SGD on the dense gradient (up to float rounding)") {
  nn::OptimizerSpec job;
  job.type = nn::OptimizerType::kSgd;
  job.lr = 0.1;
  Table table(3, sparseOptimizerFor(job, false, "job.json"));
  std::vector<float> dense = table.dense();
  auto ref = nn::Optimizer::create(job, dense.size());
  for (size_t b = 0; b < kBatches.size(); ++b) {
    auto occ = occurrenceGrads(kBatches[b].size(), static_cast<int>(b));
    UniqueIds u = dedupIds(kBatches[b], kRows);
    table.push(u, coalesceRowGrads(u, occ, kDim), 0.1);
    ref->step(dense, denseGrad(kBatches[b], occ));
  }
  auto got = table.dense();
  for (size_t k = 0; k < dense.size(); ++k) CHECK_MESSAGE(got[k] == doctest::Approx(dense[k]).epsilon(1e-6), k);  // FMA contraction may differ
}

TEST_CASE("sparse Adagrad updates the touched rows as torch.optim.Adagrad does, and nothing else") {
  nn::OptimizerSpec job;
  job.type = nn::OptimizerType::kSgd;
  job.lr = 0.5;
  Table table(2, sparseOptimizerFor(job, true, "job.json"));
  const std::vector<float> start = table.dense();
  std::vector<double> p(start.begin(), start.end()), sum(p.size(), 0.0);
  for (size_t b = 0; b < kBatches.size(); ++b) {
    auto occ = occurrenceGrads(kBatches[b].size(), static_cast<int>(b));
    UniqueIds u = dedupIds(kBatches[b], kRows);
    table.push(u, coalesceRowGrads(u, occ, kDim), 0.5);
    auto g = denseGrad(kBatches[b], occ);
    for (int64_t id : u.ids)
      for (int c = 0; c < kDim; ++c) {
        const auto k = static_cast<size_t>(id * kDim + c);
        sum[k] += static_cast<double>(g[k]) * g[k];
        p[k] -= 0.5 * g[k] / (std::sqrt(sum[k]) + 1e-10);
      }
  }
  auto got = table.dense();
  for (size_t k = 0; k < p.size(); ++k) CHECK(got[k] == doctest::Approx(p[k]).epsilon(1e-5));
  CHECK(table.shards[0].steps() == 3);
}

TEST_CASE("SparseAdam: moments and rows change only where touched; all rows touched is close to dense Adam") {
  nn::OptimizerSpec job;
  job.type = nn::OptimizerType::kAdam;
  job.lr = 0.01;
  Table table(3, sparseOptimizerFor(job, false, "job.json"));
  const std::vector<float> start = table.dense();
  std::vector<double> p(start.begin(), start.end()), m(p.size(), 0), v(p.size(), 0);
  for (size_t b = 0; b < kBatches.size(); ++b) {
    auto occ = occurrenceGrads(kBatches[b].size(), static_cast<int>(b));
    UniqueIds u = dedupIds(kBatches[b], kRows);
    table.push(u, coalesceRowGrads(u, occ, kDim), 0.01);
    auto g = denseGrad(kBatches[b], occ);
    const double t = static_cast<double>(b + 1);
    const double stepSize = 0.01 * std::sqrt(1 - std::pow(0.999, t)) / (1 - std::pow(0.9, t));
    for (int64_t id : u.ids)
      for (int c = 0; c < kDim; ++c) {
        const auto k = static_cast<size_t>(id * kDim + c);
        m[k] += 0.1 * (g[k] - m[k]);
        v[k] += 0.001 * (static_cast<double>(g[k]) * g[k] - v[k]);
        p[k] -= stepSize * m[k] / (std::sqrt(v[k]) + 1e-8);
      }
  }
  auto got = table.dense();
  for (size_t k = 0; k < p.size(); ++k) CHECK(got[k] == doctest::Approx(p[k]).epsilon(1e-5));
  // Row 30 was never touched: its moments are still zero.
  auto& shard = table.shards[static_cast<size_t>(rowServer(table.plan, 30))];
  auto state = shard.stateBuffers();
  REQUIRE(state.size() == 2);
  const auto at = static_cast<size_t>((30 - shard.range().begin) * kDim);
  CHECK(state[0].data[at] == 0.0f);
  CHECK(state[1].data[at] == 0.0f);

  // Every row touched every step: the dense Adam update (up to where eps is added).
  Table full(2, sparseOptimizerFor(job, false, "job.json"));
  std::vector<float> dense = full.dense();
  auto ref = nn::Optimizer::create(job, dense.size());
  std::vector<int64_t> all;
  for (int64_t r = 0; r < kRows; ++r) all.push_back(r);
  for (int s = 0; s < 3; ++s) {
    auto occ = occurrenceGrads(all.size(), s);
    UniqueIds u = dedupIds(all, kRows);
    full.push(u, coalesceRowGrads(u, occ, kDim), 0.01);
    ref->step(dense, denseGrad(all, occ));
  }
  auto sparse = full.dense();
  for (size_t k = 0; k < dense.size(); ++k) CHECK(sparse[k] == doctest::Approx(dense[k]).epsilon(1e-5));
}

TEST_CASE("sparse optimizers reject what torch rejects, shards reject foreign or repeated rows") {
  nn::OptimizerSpec job;
  job.type = nn::OptimizerType::kSgd;
  job.momentum = 0.9;
  CHECK_THROWS_AS(sparseOptimizerFor(job, false, "job.json"), ConfigError);
  job.momentum = 0;
  job.weightDecay = 0.01;
  CHECK_THROWS_AS(sparseOptimizerFor(job, false, "job.json"), ConfigError);
  // The message names the field under `where` and the table (`context`); adamw's default decay is named at
  // /optimizer/type by sparseTableOptions (tests/train/test_job.cpp).
  job.type = nn::OptimizerType::kAdamW;
  std::string message;
  try {
    sparseOptimizerFor(job, false, "job.json: /optimizer", " (for the sparse table of /model/layers/0)");
  } catch (const ConfigError& e) {
    message = e.what();
  }
  CHECK(message == "job.json: /optimizer/weight_decay: 0.01 with sparse embeddings (for the sparse table of "
                   "/model/layers/0) (expected 0: torch.optim does not decay sparse gradients)");
  job.weightDecay = 0;
  CHECK(sparseOptimizerFor(job, false, "job.json").type == SparseOptimizerType::kAdam);
  Table table(2, {});
  std::vector<float> g(2 * kDim, 1.0f);
  CHECK_THROWS_AS(table.shards[0].apply(std::vector<int64_t>{1, 1}, g, 0.1), Error);
  CHECK_THROWS_AS(table.shards[0].apply(std::vector<int64_t>{1, 40}, g, 0.1), Error);
  CHECK(table.shards[0].steps() == 0);
}

namespace {

// Two servers in threads holding one table (SparseAdam); joined on destruction.
struct SparseServers {
  std::vector<std::unique_ptr<Server>> servers;
  std::vector<std::string> addrs;
  std::vector<std::future<void>> done;
  SparseServers(int workers, Mode mode, SparseOptimizerSpec spec) {
    for (int s = 0; s < 2; ++s) {
      servers.push_back(std::make_unique<Server>(ServerOptions{
          .serverRank = s, .servers = 2, .workers = workers, .mode = mode, .timeout = std::chrono::seconds(60),
          .tables = {SparseTableOptions{.rows = kRows, .dim = kDim, .optimizer = spec, .initStd = 1.0, .seed = 7}}}));
      addrs.push_back(servers.back()->listen());
    }
    for (auto& s : servers) done.push_back(std::async(std::launch::async, [p = s.get()] { p->serve(); }));
  }
  ~SparseServers() {
    for (auto& s : servers) s->stop();
    for (auto& d : done) d.wait();
  }
};

std::unique_ptr<Client> clientOf(int rank, int workers, const SparseServers& s) {
  return std::make_unique<Client>(ClientOptions{.workerRank = rank, .workers = workers, .numParams = 16,
                                                .partitionFloats = 16, .servers = s.addrs,
                                                .timeout = std::chrono::seconds(60)});
}

// A worker's step: pull the batch's distinct rows from their servers (sorted ids: one contiguous run per server),
// then push their coalesced gradient to the same servers.
std::vector<float> workerStep(Client& c, const std::vector<RowRange>& plan, const std::vector<int64_t>& batch,
                              int64_t step, int salt) {
  UniqueIds u = dedupIds(batch, kRows);
  std::vector<float> rows(u.ids.size() * kDim);
  auto grads = coalesceRowGrads(u, occurrenceGrads(batch.size(), salt), kDim);
  for (const RowRange& r : plan) {
    auto lo = std::lower_bound(u.ids.begin(), u.ids.end(), r.begin) - u.ids.begin();
    auto hi = std::lower_bound(u.ids.begin(), u.ids.end(), r.end) - u.ids.begin();
    c.sparsePullAsync(0, r.server, step, std::vector<int64_t>(u.ids.begin() + lo, u.ids.begin() + hi),
                      rows.data() + lo * kDim);
  }
  c.wait();
  for (const RowRange& r : plan) {
    auto lo = std::lower_bound(u.ids.begin(), u.ids.end(), r.begin) - u.ids.begin();
    auto hi = std::lower_bound(u.ids.begin(), u.ids.end(), r.end) - u.ids.begin();
    c.sparsePushAsync(0, r.server, step, 0.01, std::vector<int64_t>(u.ids.begin() + lo, u.ids.begin() + hi),
                      std::vector<float>(grads.begin() + lo * kDim, grads.begin() + hi * kDim));
  }
  c.wait();
  return rows;
}

}  // namespace

TEST_CASE("sparse pull/push through 2 servers, 2 sync workers: the rows of the averaged dense computation") {
  nn::OptimizerSpec job;
  job.type = nn::OptimizerType::kAdam;
  job.lr = 0.01;
  const SparseOptimizerSpec spec = sparseOptimizerFor(job, false, "job.json");
  SparseServers servers(2, Mode::kSync, spec);
  const auto plan = planRowRanges(kRows, 2);
  constexpr int kSteps = 3;
  auto batchOf = [](int w, int step) { return kBatches[static_cast<size_t>((step + w) % 3)]; };
  std::vector<std::future<std::vector<std::vector<float>>>> workers;
  std::vector<std::vector<float>> fetched;  // worker 0: each server's rows and moments after the last step
  for (int w = 0; w < 2; ++w)
    workers.push_back(std::async(std::launch::async, [&, w] {
      auto c = clientOf(w, 2, servers);
      std::vector<std::vector<float>> pulled;
      for (int step = 0; step < kSteps; ++step) pulled.push_back(workerStep(*c, plan, batchOf(w, step), step, w + step));
      if (w == 0)  // a sync push returns once the step is applied: this is the final state
        for (const RowRange& r : plan) fetched.push_back(c->sparseFetch(0, r.server, r.begin, r.rows()));
      c->bye();
      return pulled;
    }));
  std::vector<std::vector<std::vector<float>>> pulled;
  for (auto& w : workers) pulled.push_back(w.get());

  // The reference: one table, the average of both workers' gradients per step (a row one worker did not touch
  // counts as zero for it).
  Table ref(2, spec);
  for (int step = 0; step < kSteps; ++step) {
    std::vector<float> sum(kRows * kDim, 0.0f);
    std::vector<uint8_t> touched(kRows, 0);
    for (int w = 0; w < 2; ++w) {
      UniqueIds u = dedupIds(batchOf(w, step), kRows);
      // What this worker pulled before the step is the reference's rows now.
      auto rows = ref.pullRows(u);
      CHECK(pulled[static_cast<size_t>(w)][static_cast<size_t>(step)] == rows);
      auto g = coalesceRowGrads(u, occurrenceGrads(batchOf(w, step).size(), w + step), kDim);
      for (size_t i = 0; i < u.ids.size(); ++i) {
        touched[static_cast<size_t>(u.ids[i])] = 1;
        for (int c = 0; c < kDim; ++c) sum[static_cast<size_t>(u.ids[i] * kDim + c)] += g[i * kDim + static_cast<size_t>(c)];
      }
    }
    UniqueIds all;
    std::vector<float> avg;
    for (int64_t r = 0; r < kRows; ++r)
      if (touched[static_cast<size_t>(r)]) {
        all.ids.push_back(r);
        for (int c = 0; c < kDim; ++c) avg.push_back(sum[static_cast<size_t>(r * kDim + c)] * 0.5f);
      }
    ref.push(all, avg, 0.01);
  }

  // The servers' state equals the reference's, values and moments (a fetch: what a checkpoint writes).
  REQUIRE(fetched.size() == 2);
  for (const RowRange& r : plan) {
    const auto& got = fetched[static_cast<size_t>(r.server)];
    auto& shard = ref.shards[static_cast<size_t>(r.server)];
    const size_t n = static_cast<size_t>(r.rows()) * kDim;
    REQUIRE(got.size() == 2 + 3 * n);
    CHECK(std::equal(shard.values().begin(), shard.values().end(), got.begin() + 2));
    auto state = shard.stateBuffers();
    CHECK(std::equal(state[1].data.begin(), state[1].data.end(), got.begin() + 2 + 2 * static_cast<long>(n)));
  }
  CHECK(servers.servers[0]->stats().updates == kSteps);
}

TEST_CASE("sparse fetch and init round-trip a window; rows on the wrong server are refused") {
  nn::OptimizerSpec job;
  job.type = nn::OptimizerType::kAdam;
  job.lr = 0.01;
  const SparseOptimizerSpec spec = sparseOptimizerFor(job, false, "job.json");
  SparseServers servers(1, Mode::kAsync, spec);
  const auto plan = planRowRanges(kRows, 2);
  auto c = clientOf(0, 1, servers);
  workerStep(*c, plan, kBatches[0], 0, 0);
  Table ref(2, spec);
  UniqueIds u = dedupIds(kBatches[0], kRows);
  ref.push(u, coalesceRowGrads(u, occurrenceGrads(kBatches[0].size(), 0), kDim), 0.01);
  for (const RowRange& r : plan) {
    auto got = c->sparseFetch(0, r.server, r.begin, r.rows());
    auto& shard = ref.shards[static_cast<size_t>(r.server)];
    const size_t n = static_cast<size_t>(r.rows()) * kDim;
    REQUIRE(got.size() == 2 + 3 * n);
    int64_t steps = 0;
    std::memcpy(&steps, got.data(), sizeof(steps));
    CHECK(steps == 1);
    CHECK(std::equal(shard.values().begin(), shard.values().end(), got.begin() + 2));
    auto state = shard.stateBuffers();
    CHECK(std::equal(state[0].data.begin(), state[0].data.end(), got.begin() + 2 + static_cast<long>(n)));
    CHECK(std::equal(state[1].data.begin(), state[1].data.end(), got.begin() + 2 + 2 * static_cast<long>(n)));
  }
  // Init rows 25..26 of server 1 with new values; a pull reads them back.
  std::vector<float> window(3 * 2 * kDim, 0.5f);
  c->sparseInit(0, 1, 1, 25, 2, 4, window);
  std::vector<float> rows(2 * kDim);
  c->sparsePullAsync(0, 1, 1, {25, 26}, rows.data());
  c->wait();
  CHECK(rows == std::vector<float>(2 * kDim, 0.5f));
  // Row 3 lives on server 0: server 1 refuses it with a message naming its range.
  c->sparsePullAsync(0, 1, 1, {3}, rows.data());
  try {
    c->wait();
    FAIL("expected a CommError");
  } catch (const CommError& e) {
    CHECK(std::string(e.what()).find("holds rows [25, 50)") != std::string::npos);
  }
}

TEST_CASE("PsSparseTables over 2 servers equals LocalSparseTables; readTable/writeTable round-trip every shard") {
  nn::OptimizerSpec job;
  job.type = nn::OptimizerType::kAdam;
  job.lr = 0.01;
  const SparseOptimizerSpec spec = sparseOptimizerFor(job, false, "job.json");
  const SparseTableOptions table{.rows = kRows, .dim = kDim, .optimizer = spec, .initStd = 1.0, .seed = 7};
  SparseServers servers(1, Mode::kAsync, spec);
  auto c = clientOf(0, 1, servers);
  train::PsSparseTables remote({table}, *c, 2, 0);
  train::LocalSparseTables local({table});
  for (int step = 0; step < 3; ++step) {
    remote.beginStep(step, 0.01);
    local.beginStep(step, 0.01);
    UniqueIds u = dedupIds(kBatches[static_cast<size_t>(step)], kRows);
    std::vector<float> a(u.ids.size() * kDim), b(a.size());
    remote.pull(0, u.ids, a);
    local.pull(0, u.ids, b);
    CHECK(a == b);
    auto g = coalesceRowGrads(u, occurrenceGrads(kBatches[static_cast<size_t>(step)].size(), step), kDim);
    remote.push(0, u.ids, g);
    local.push(0, u.ids, g);
    c->wait();
  }
  train::SparseTableState got = remote.readTable(0), want = local.readTable(0);
  CHECK(got.steps == 3);  // every server stepped once per push (touched or not)
  CHECK(got.steps == want.steps);
  CHECK(got.values == want.values);
  REQUIRE(got.state.size() == 2);
  CHECK(got.state == want.state);
  // Write a changed table back through the servers (as a resume does) and read it again.
  for (float& v : got.values) v += 1;
  remote.writeTable(0, 3, got);
  train::SparseTableState again = remote.readTable(0);
  CHECK(again.values == got.values);
  CHECK(again.state == got.state);
  c->bye();
}

TEST_CASE("server barrier (async workers): releases once every live worker arrived; a worker that left counts") {
  nn::OptimizerSpec job;
  job.type = nn::OptimizerType::kSgd;
  job.lr = 0.1;
  SparseServers servers(3, Mode::kAsync, sparseOptimizerFor(job, false, "job.json"));
  auto c0 = clientOf(0, 3, servers), c1 = clientOf(1, 3, servers), c2 = clientOf(2, 3, servers);
  auto w0 = std::async(std::launch::async, [&] { c0->barrier(1); });
  auto w1 = std::async(std::launch::async, [&] { c1->barrier(1); });
  // Worker 2 has not arrived, so neither may have passed (whenever this runs).
  CHECK(w0.wait_for(std::chrono::milliseconds(0)) == std::future_status::timeout);
  CHECK(w1.wait_for(std::chrono::milliseconds(0)) == std::future_status::timeout);
  c2.reset();  // worker 2 leaves: the barrier opens for the others
  w0.get();
  w1.get();
  w0 = std::async(std::launch::async, [&] { c0->barrier(2); });
  c1->barrier(2);
  w0.get();
  c0->bye();
  c1->bye();
}

TEST_CASE("the job's adagrad maps to sparse Adagrad with its lr, eps, lr_decay and initial accumulator") {
  nn::OptimizerSpec job = nn::parseOptimizerSpec(
      nlohmann::json{{"type", "adagrad"}, {"lr", 0.05}, {"lr_decay", 0.1}, {"initial_accumulator_value", 0.3}},
      "job.json");
  const SparseOptimizerSpec s = sparseOptimizerFor(job, false, "job.json");
  CHECK(s.type == SparseOptimizerType::kAdagrad);
  CHECK(s.lr == 0.05);
  CHECK(s.eps == 1e-10);
  CHECK(s.lrDecay == 0.1);
  CHECK(s.initialAccumulator == 0.3);
  job.weightDecay = 0.1;
  CHECK_THROWS_AS(sparseOptimizerFor(job, false, "job.json"), ConfigError);
}

TEST_CASE("grad_accum: micro-batches' row gradients are summed by row and pushed once, with the step's last") {
  std::vector<int64_t> ids{2, 7};
  std::vector<float> g{1, 1, 1, 2, 2, 2};
  const std::vector<int64_t> more{0, 7, 9};
  const std::vector<float> mg{5, 5, 5, 10, 10, 10, 3, 3, 3};
  accumulateRowGrads(ids, g, more, mg, 3);
  CHECK(ids == std::vector<int64_t>{0, 2, 7, 9});
  CHECK(g == std::vector<float>{5, 5, 5, 1, 1, 1, 12, 12, 12, 3, 3, 3});
  // Through the tables: two micro-batches equal one push of their sum (SGD: p -= lr * g).
  nn::OptimizerSpec sgd;
  sgd.lr = 0.5;
  const SparseTableOptions t{.rows = kRows, .dim = kDim, .optimizer = sparseOptimizerFor(sgd, false, "j"), .seed = 7};
  train::LocalSparseTables accumulated({t}), once({t});
  accumulated.beginStep(0, 0.5);
  accumulated.setLastMicroBatch(false);
  accumulated.push(0, {2, 7}, {1, 1, 1, 2, 2, 2});
  CHECK(accumulated.readTable(0).steps == 0);  // nothing applied before the step's last micro-batch
  accumulated.setLastMicroBatch(true);
  accumulated.push(0, {0, 7, 9}, {5, 5, 5, 10, 10, 10, 3, 3, 3});
  once.beginStep(0, 0.5);
  once.push(0, ids, g);
  CHECK(accumulated.readTable(0).steps == 1);
  CHECK(accumulated.readTable(0).values == once.readTable(0).values);
  // An empty last micro-batch: flushStep() pushes what the earlier ones summed.
  accumulated.beginStep(1, 0.5);
  once.beginStep(1, 0.5);
  accumulated.setLastMicroBatch(false);
  accumulated.push(0, {4}, {1, 2, 3});
  accumulated.flushStep();
  once.push(0, {4}, {1, 2, 3});
  CHECK(accumulated.readTable(0).values == once.readTable(0).values);
  CHECK(accumulated.readTable(0).steps == 2);
}
