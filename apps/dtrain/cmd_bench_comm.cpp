// `dtrain bench allreduce|broadcast|allgather|reduce_scatter`: the collective benchmark (lib/comm/bench.h)
// as a worker program: under `dtrain run` it reads RANK/WORLD_SIZE/LOCAL_*/GROUP_RANK and DTRAIN_STORE like
// any worker; alone it is a one-rank job. Rank 0 prints an nccl-tests-like table, or JSON lines with --json.
#include <cstdio>
#include <memory>
#include <string>

#include "apps/dtrain/commands.h"
#include "lib/comm/bench.h"
#include "lib/comm/registry.h"
#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/common/parse.h"
#include "lib/common/worker_contract.h"
#include "rendezvous/memory_store.h"
#include "rendezvous/prefix_store.h"
#include "rendezvous/tcp_store_client.h"

namespace dtrain::app {
namespace {

struct BenchCommArgs {
  std::string backend = "auto";
  std::string minBytes = "1K";
  std::string maxBytes = "64M";
  double stepFactor = 2.0;
  std::string dtype = "float32";
  std::string op = "sum";
  int iters = 0;
  int warmup = 3;
  std::string budget = "250ms";
  std::string timeout = "5m";
  bool json = false;
  bool noCheck = false;
};

void printHeader(const comm::Backend& b, const comm::BenchOptions& o, const std::string& what) {
  std::printf("# dtrain bench %s: backend %s, %d rank(s), %d on this node, %s %s, timeout %lld ms\n", what.c_str(),
              b.name().c_str(), b.size(), b.options().localSize, std::string(dtypeName(o.dtype)).c_str(),
              what == "allreduce" || what == "reduce_scatter" ? std::string(comm::reduceOpName(o.op)).c_str() : "-",
              static_cast<long long>(b.options().timeout.count()));
  std::printf("# %12s %12s %9s %6s %8s %12s %12s %12s %8s\n", "bytes", "count", "type", "redop", "iters",
              "time(us)", "algbw(GB/s)", "busbw(GB/s)", "#wrong");
  std::fflush(stdout);
}

int runBenchComm(const std::string& what, const BenchCommArgs& a) {
  auto collective = comm::parseCollective(what);
  DTRAIN_CHECK(collective.has_value(), "unknown collective {}", what);
  comm::BenchOptions o;
  o.what = *collective;
  o.minBytes = static_cast<size_t>(parse::bytesFlag("--min-bytes", a.minBytes, true));
  o.maxBytes = static_cast<size_t>(parse::bytesFlag("--max-bytes", a.maxBytes, true));
  DTRAIN_CHECK_AS(UsageError, o.minBytes <= o.maxBytes, "--min-bytes {} is larger than --max-bytes {}", a.minBytes,
                  a.maxBytes);
  o.stepFactor = a.stepFactor;
  DTRAIN_CHECK_AS(UsageError, a.stepFactor > 1.0, "--step-factor {}: expected a number above 1", a.stepFactor);
  auto dtype = parseDType(a.dtype);
  DTRAIN_CHECK_AS(UsageError, dtype.has_value() && comm::isSupported(*dtype),
                  "--dtype {}: expected float32, float64, int32, int64, bfloat16 or float16", a.dtype);
  o.dtype = *dtype;
  auto op = comm::parseReduceOp(a.op);
  DTRAIN_CHECK_AS(UsageError, op.has_value(), "--op {}: expected sum, avg, min or max", a.op);
  o.op = *op;
  o.iters = a.iters;
  o.warmup = a.warmup;
  const auto budget = parse::durationFlag("--budget", a.budget, true);
  o.budgetSeconds = static_cast<double>(budget.count()) / 1000.0;
  o.check = !a.noCheck;
  const auto timeout = parse::durationFlag("--timeout", a.timeout, true);

  const auto worker = WorkerContract::fromEnv();
  comm::BackendOptions bo = comm::optionsFromContract(worker);
  bo.timeout = timeout;
  log::setTag(fmt::format("dtrain r{}", bo.rank));
  if (bo.size > 1) {
    DTRAIN_CHECK_AS(UsageError, !worker.store.empty(),
                    "WORLD_SIZE={} but DTRAIN_STORE is not set: run under `dtrain run`, or start a `dtrain store` "
                    "and export DTRAIN_STORE=host:port for every rank",
                    bo.size);
    // One namespace per run, attempt and benchmark, so a restarted round never reads a dead attempt's keys.
    const std::string prefix =
        fmt::format("{}bench-{}/{}/", rendezvous::runPrefix(worker.runId), what, worker.restartCount);
    bo.store = std::make_shared<rendezvous::PrefixStore>(prefix, rendezvous::connectStore(worker.store, timeout));
  } else {
    bo.store = rendezvous::MemoryStore::create();
  }
  bo.groupName = "bench";
  auto bench = comm::createBackend(a.backend, bo);
  comm::BackendPtr control = bench;
  if (bench->name() == "nccl") {  // timing agreement needs host buffers
    comm::BackendOptions co = bo;
    co.groupName = "bench-control";
    control = comm::createBackend("tcp", co);
  }
  // Tests (and people watching a hung job) learn from this line that the group is connected.
  log::info("bench {}: {} communicator ready, rank {} of {}", what, bench->name(), bench->rank(), bench->size());
  const bool printer = bench->rank() == 0;
  if (printer && !a.json) printHeader(*bench, o, what);
  const std::string type(dtypeName(o.dtype));
  const std::string redop = (o.what == comm::Collective::kAllreduce || o.what == comm::Collective::kReduceScatter)
                                ? std::string(comm::reduceOpName(o.op)) : "-";
  int64_t totalWrong = 0;
  comm::runBench(*bench, *control, o, [&](const comm::BenchRow& r) {
    totalWrong += std::max<int64_t>(0, r.wrong);
    if (!printer) return;
    if (a.json) {
      std::printf("{\"backend\": \"%s\", \"collective\": \"%s\", \"ranks\": %d, \"dtype\": \"%s\", \"op\": \"%s\", "
                  "\"bytes\": %zu, \"count\": %zu, \"iters\": %d, \"time_us\": %.3f, \"algbw_gbps\": %.4f, "
                  "\"busbw_gbps\": %.4f, \"wrong\": %lld}\n",
                  bench->name().c_str(), what.c_str(), bench->size(), type.c_str(), redop.c_str(), r.bytes, r.count,
                  r.iters, r.timeUs, r.algbwGBps, r.busbwGBps, static_cast<long long>(r.wrong));
    } else {
      std::printf("  %12zu %12zu %9s %6s %8d %12.2f %12.3f %12.3f %8s\n", r.bytes, r.count, type.c_str(), redop.c_str(),
                  r.iters, r.timeUs, r.algbwGBps, r.busbwGBps, r.wrong < 0 ? "-" : std::to_string(r.wrong).c_str());
    }
    std::fflush(stdout);
  });
  if (totalWrong > 0) {
    log::error("{} wrong element(s): the {} backend produced incorrect results", totalWrong, bench->name());
    return static_cast<int>(ExitCode::kComm);
  }
  return 0;
}

void addOne(CLI::App& bench, Action& action, const std::string& what, const std::string& help) {
  auto args = std::make_shared<BenchCommArgs>();
  auto* sub = bench.add_subcommand(what, help);
  sub->add_option("--backend", args->backend, "tcp, shm, hier, nccl or auto")->capture_default_str();
  sub->add_option("--min-bytes", args->minBytes, "smallest message (1K, 64M, ...)")->capture_default_str();
  sub->add_option("--max-bytes", args->maxBytes, "largest message")->capture_default_str();
  sub->add_option("--step-factor", args->stepFactor, "size multiplier between rows")->capture_default_str();
  sub->add_option("--dtype", args->dtype, "float32, float64, int32, int64, bfloat16, float16")->capture_default_str();
  sub->add_option("--op", args->op, "sum, avg, min, max")->capture_default_str();
  sub->add_option("--iters", args->iters, "timed iterations per size (0: from --budget)")->capture_default_str();
  sub->add_option("--warmup", args->warmup, "warm-up iterations per size")->capture_default_str();
  sub->add_option("--budget", args->budget, "target duration of each size's timed loop")->capture_default_str();
  sub->add_option("--timeout", args->timeout, "collective timeout (a dead peer fails sooner)")->capture_default_str();
  sub->add_flag("--json", args->json, "one JSON object per size instead of the table");
  sub->add_flag("--no-check", args->noCheck, "skip the correctness check");
  sub->footer(exitCodesHelp({{"0", ""},
                             {"1", ""},
                             {"3", ""},
                             {"4", ""},
                             {"5", "cannot listen for the collectives' connections"},
                             {"6", ""},
                             {"7", "a collective failed (peer lost, timeout) or gave wrong results"}}));
  sub->callback([&action, args, what] { action = [args, what] { return runBenchComm(what, *args); }; });
}

}  // namespace

void addBenchCollectives(CLI::App& bench, Action& action) {
  addOne(bench, action, "allreduce", "All-reduce bandwidth and latency (run under `dtrain run` for several ranks)");
  addOne(bench, action, "broadcast", "Broadcast from rank 0");
  addOne(bench, action, "allgather", "All-gather (size = gathered output)");
  addOne(bench, action, "reduce_scatter", "Reduce-scatter (size = full input)");
}

}  // namespace dtrain::app
