// `dtrain run`: CLI parsing for the launcher. torchrun's flag names (with - or _) and semantics; every option
// can also come from DTRAIN_<NAME> in the environment. The work is lib/launch's Agent.
#include <fmt/ranges.h>

#include <algorithm>
#include <filesystem>
#include <optional>

#include "apps/dtrain/commands.h"
#include "apps/dtrain/job_hooks.h"
#include "lib/train/check.h"
#include "lib/train/checkpointing.h"
#include "lib/train/layout.h"
#include "lib/common/error.h"
#include "lib/common/net.h"
#include "lib/common/ps_placement.h"
#include "lib/common/parse.h"
#include "lib/launch/agent.h"
#include "lib/launch/cluster_env.h"
#include "lib/launch/launch_options.h"
#include "lib/launch/slurm.h"
#include "rendezvous/store.h"

namespace dtrain::app {

namespace {

struct RunArgs {
  launch::LaunchOptions opts;
  std::string rdzvTimeout = "900s", lastCall = "30s", shutdownTimeout = "30s";
  std::string heartbeatInterval = "1s", heartbeatTimeout = "5s";
  std::string redirects = "0", tee = "0", localRanksFilter;
  std::string masterAddr;
  std::string rdzvToken, rdzvTokenFile;
  int masterPort = 0;
  bool dryRun = false;
  bool afterDashes = false;
  bool noPython = false;        // torchrun's --no-python: accepted, no effect
  double monitorInterval = 0;   // torchrun's --monitor-interval: accepted, no effect
  std::string startMethod;      // torchrun's --start-method: accepted, no effect
  launch::GivenOptions given;  // which launch options the user set (the others may come from Slurm)
  std::vector<std::string> positional;
};

std::shared_ptr<RunArgs>& runArgs() {
  static std::shared_ptr<RunArgs> args;
  return args;
}

// The checks of a job against this launch (world, layout, memory, data, folders, checkpoint, GPUs), before any
// store or worker exists.
void checkJobForLaunch(const std::optional<train::Job>& job, launch::LaunchOptions& o) {
  if (job && job->parallel.ps) {
    // Parameter servers are ranks of the world: they must leave at least one rank to train (known here when the
    // node count is fixed and the nodes are alike; the trainer checks the world it gets in any case).
    o.psServers = job->parallel.ps->servers;
    o.psWorkersExpendable = job->parallel.ps->mode != "sync";
    const int world = o.minNodes * o.nproc;
    DTRAIN_CHECK_AS(ConfigError, o.minNodes != o.maxNodes || o.psServers < world,
                    "{}: /parallel/servers: {} server(s) but this launch makes {} rank(s) (--nnodes {} x "
                    "--nproc-per-node {}); expected servers < world size, so that at least one rank trains",
                    job->sourceFile, o.psServers, world, o.minNodes, o.nproc);
  }
  if (job) {
    for (const auto& w : job->parallel.warnings) fmt::print(stderr, "dtrain run: warning: {}\n", w);
    // The rank grid must divide the world (known here when the node count is fixed and nodes are alike).
    if (o.minNodes == o.maxNodes) train::resolveLayout(job->parallel, o.minNodes * o.nproc, job->sourceFile);
    // Elastic: node counts whose world the grid (or the servers) cannot use. None usable: refused now. Some: the
    // rendezvous never forms a round of such a count (it takes the largest usable one; the other nodes wait as
    // spares), and the launch says so before any node waits.
    if (o.minNodes < o.maxNodes) {
      const auto [checked, unusable] = train::unusableNodeCounts(job->parallel, o.minNodes, o.maxNodes, o.nproc,
                                                                 o.psServers, job->sourceFile);
      for (const auto& u : unusable) o.unusableNodes.push_back(u.first);
      if (!unusable.empty()) {
        std::vector<int> counts;
        for (const auto& u : unusable)
          if (counts.size() < 10) counts.push_back(u.first);
        const std::string more =
            unusable.size() > counts.size() ? fmt::format(", ... ({} of the {} counts)", unusable.size(), checked) : "";
        DTRAIN_CHECK_AS(ConfigError, static_cast<int>(unusable.size()) < checked,
                        "--nnodes {}: no node count in {}..{} gives a world this job can use (x --nproc-per-node "
                        "{}); e.g. {} node(s): {}",
                        o.nnodesText, o.minNodes, o.maxNodes, o.nproc, unusable.front().first, unusable.front().second);
        fmt::print(stderr,
                   "dtrain run: warning: --nnodes {}: the world of {} node(s) cannot run this job, so no round forms "
                   "with that many: a round takes the largest usable count of the nodes that joined and the others "
                   "wait as spares; e.g. {} node(s): {}\n",
                   o.nnodesText, fmt::format("{}{}", fmt::join(counts, ", "), more), unusable.front().first,
                   unusable.front().second);
      }
    }
    auto machine = train::readMachineMemory();
    // A batch holds at most a data set: its size, unknown for files until the probe, bounds the activations.
    train::checkJobFitsMemory(*job, o.nproc, machine, std::nullopt, o.minNodes, train::specSamples(*job).value_or(1));
    const train::DataCheck data = train::checkJobData(*job);
    train::checkJobFitsMemory(*job, o.nproc, machine, data.bytes, o.minNodes, data.samples, data.sharedBytes);
    // The output and checkpoint folders must be usable (exit 2), and the checkpoint the workers would resume from
    // must be this model's (exit 8): here, not in every worker after the rendezvous (or at the first checkpoint,
    // an epoch later), where each restart would fail the same way.
    train::checkOutputDirs(*job);
    train::checkResumeCheckpoint(*job);
    train::checkInitWeights(*job);
    // "device": "cuda": one visible GPU per local worker, checked here so the error comes before any worker. The
    // agent counts without starting CUDA (it forks workers later): CUDA_VISIBLE_DEVICES, else the driver's /proc.
    if (job->device.isCuda()) train::checkGpusForWorkers(*job, o.nproc, launch::visibleGpuCount());
  }
}

int runCommand(RunArgs& a, bool programAfterDashes) {
  auto& o = a.opts;
  // Inside a Slurm allocation, what the user did not give comes from Slurm (lib/launch/slurm.h).
  auto slurm = launch::detectSlurm(launch::processEnvironment());
  if (slurm.extraTask()) {
    fmt::print(stderr, "{}\n", slurm.extraTaskNote());
    return 0;
  }
  o.rdzvTimeout = parse::durationFlag("--rdzv-timeout", a.rdzvTimeout);
  o.rdzvToken = resolveRdzvToken(a.rdzvToken, a.rdzvTokenFile);
  if (!a.rdzvTokenFile.empty()) o.rdzvTokenFile = std::filesystem::absolute(a.rdzvTokenFile).lexically_normal().string();
  o.lastCall = parse::durationFlag("--rdzv-last-call", a.lastCall);
  o.shutdownTimeout = parse::durationFlag("--shutdown-timeout", a.shutdownTimeout);
  o.heartbeatInterval = parse::durationFlag("--heartbeat-interval", a.heartbeatInterval);
  o.heartbeatTimeout = parse::durationFlag("--heartbeat-timeout", a.heartbeatTimeout);
  o.redirects = launch::StreamChoice::parse("--redirects", a.redirects);
  o.tee = launch::StreamChoice::parse("--tee", a.tee);
  if (!a.localRanksFilter.empty()) o.localRanksFilter = launch::parseIntList("--local-ranks-filter", a.localRanksFilter);
  if (o.rdzvEndpoint.empty() && !a.masterAddr.empty())
    o.rdzvEndpoint = a.masterPort > 0 ? net::joinHostPort(a.masterAddr, a.masterPort) : a.masterAddr;
  DTRAIN_CHECK_AS(UsageError, !a.positional.empty(),
                  "dtrain run: nothing to launch; give a job file (dtrain run job.json) or a program after -- "
                  "(dtrain run -- python train.py)");
  std::optional<train::Job> job;
  bool isJob = !programAfterDashes && launch::isJobFileName(a.positional.front());
  if (isJob) {
    // The built-in trainer: workers are this binary's `train` subcommand. The job is validated here, before
    // any store or worker exists.
    std::vector<std::string> trainArgs(a.positional.begin(), a.positional.end());
    job = validateJobForLaunch(trainArgs);
    o.program = {selfExe(), "train"};
    o.trainerWorkers = true;
    o.program.insert(o.program.end(), trainArgs.begin(), trainArgs.end());
  } else {
    o.program = a.positional;
  }
  if (job) o.jobName = job->name;
  else o.jobName = std::filesystem::path(o.program.front()).filename().string();
  DTRAIN_CHECK_AS(UsageError, (o.redirects.all == 0 && o.redirects.perRank.empty()) || !o.logDir.empty(),
                  "--redirects sends worker output to files: it needs --log-dir");
  auto slurmLines = launch::applySlurm(slurm, a.given, o);
  for (const auto& note : slurm.notes) fmt::print(stderr, "dtrain run: {}\n", note);
  // Outside Slurm: an MPI launcher or a Kubernetes training operator (lib/launch/cluster_env.h).
  if (!slurm.inSlurm) {
    auto cluster = launch::detectCluster(launch::processEnvironment());
    auto clusterLines = launch::applyCluster(cluster, a.given, o);
    for (const auto& note : cluster.notes) fmt::print(stderr, "dtrain run: {}\n", note);
    slurmLines.insert(slurmLines.end(), clusterLines.begin(), clusterLines.end());
  }
  // --master-port alone: torchrun's --master-addr defaults to 127.0.0.1. It used to be ignored (the store took port
  // 29400, the one the user was avoiding). A cluster's derived endpoint, or --standalone's own, comes first.
  if (o.rdzvEndpoint.empty() && a.masterPort > 0 && !o.standalone)
    o.rdzvEndpoint = fmt::format("127.0.0.1:{}", a.masterPort);
  o.validate();
  // Every local worker builds the whole model and its batch: refuse a job that cannot fit before any starts.
  // ... and whose data is broken or does not fit the model: headers, sizes and labels are checked here, in
  // milliseconds, instead of in every worker after the rendezvous.
  try {
    checkJobForLaunch(job, o);
  } catch (const ConfigError& e) {
    if (!job) throw;
    throw train::withSetsNamed(e, job->sourceFile, job->sets);  // a --set behind a world, memory or data error
  }
  if (a.dryRun) {
    for (const auto& line : slurmLines) fmt::print("{}\n", line);
    fmt::print("{}\n", o.plan());
    if (o.psServers > 0 && o.minNodes == o.maxNodes)
      fmt::print("parameter servers: {} of {} ranks serve, ROLE_NAME=server|worker\n{}", o.psServers,
                 o.minNodes * o.nproc, psPlacement(std::vector<int>(static_cast<size_t>(o.minNodes), o.nproc),
                                                   o.psServers));
    if (o.hostsStore())
      fmt::print("store: this agent hosts it, listening on {} (--rdzv-bind)\n", o.storeBindHost());
    return 0;
  }
  launch::Agent agent(std::move(o));
  return agent.run();
}

}  // namespace

void addRunCommand(CLI::App& root, Action& action) {
  auto a = std::make_shared<RunArgs>();
  auto* sub = root.add_subcommand(
      "run", "Launch workers on this node (torchrun-compatible): dtrain run [options] JOB.json | -- PROGRAM [ARGS...]");
  auto& o = a->opts;
  sub->add_option("--nnodes", o.nnodesText, "Number of nodes, N or MIN:MAX (elastic)")->envname("DTRAIN_NNODES");
  sub->add_option("--nproc-per-node,--nproc_per_node,--nproc,-n", o.nprocText,
                  "Workers on this node: N, auto (GPUs, else CPUs), cpu or gpu")
      ->envname("DTRAIN_NPROC_PER_NODE");
  sub->add_option("--node-rank,--node_rank", o.nodeRank, "This node's rank (0 hosts the store with the static backend)")
      ->envname("DTRAIN_NODE_RANK");
  sub->add_option("--rdzv-endpoint,--rdzv_endpoint", o.rdzvEndpoint, fmt::format("Rendezvous store HOST[:PORT] (port {}); with --rdzv-backend etcd: HOST[:PORT][,HOST[:PORT]...] (port 2379)", rendezvous::kDefaultPort))
      ->envname("DTRAIN_RDZV_ENDPOINT");
  sub->add_option("--rdzv-backend,--rdzv_backend", o.rdzvBackend,
                  "static: node rank 0 hosts the store; store: a standalone `dtrain store` at the endpoint; etcd: an etcd v3 cluster at the endpoint(s)")
      ->envname("DTRAIN_RDZV_BACKEND");
  sub->add_option("--rdzv-id,--rdzv_id", o.rdzvId, "Job id shared by all nodes")->envname("DTRAIN_RDZV_ID");
  sub->add_option("--rdzv-token", a->rdzvToken,
                  "Shared secret of the rendezvous store (the same on every node and for `dtrain store`); "
                  "generated with --standalone")
      ->envname("DTRAIN_RDZV_TOKEN");
  sub->add_option("--rdzv-bind", o.rdzvBind,
                  "Address the store hosted by this agent listens on (default: the endpoint's host; "
                  "0.0.0.0 for every interface)")
      ->envname("DTRAIN_RDZV_BIND");
  sub->add_option("--rdzv-token-file", a->rdzvTokenFile, "Read the store's shared secret from this file's first line")
      ->envname("DTRAIN_RDZV_TOKEN_FILE");
  sub->add_option("--rdzv-conf,--rdzv_conf", o.rdzvConf,
                  "With --rdzv-backend etcd: KEY=VALUE,... of protocol=https, cacert=, cert=, key= (PEM files), "
                  "user=, password= (or DTRAIN_ETCD_PASSWORD)")
      ->envname("DTRAIN_RDZV_CONF");
  sub->add_option("--rdzv-timeout,--rdzv_timeout", a->rdzvTimeout, "How long to wait for all nodes (default 900s)")
      ->envname("DTRAIN_RDZV_TIMEOUT");
  sub->add_option("--rdzv-last-call", a->lastCall, "With --nnodes MIN:MAX, extra wait for nodes beyond MIN (30s)")
      ->envname("DTRAIN_RDZV_LAST_CALL");
  sub->add_flag("--standalone", o.standalone, "Single node: host a store on a free loopback port, random run id")
      ->envname("DTRAIN_STANDALONE");
  sub->add_option("--max-restarts,--max_restarts", o.maxRestarts, "Restarts of the group after a failure (0)")
      ->envname("DTRAIN_MAX_RESTARTS");
  sub->add_option("--max-reforms", o.maxReforms,
                  "Re-formations of an elastic group after nodes join or leave, which are not failures (100)")
      ->envname("DTRAIN_MAX_REFORMS");
  sub->add_option("--shutdown-timeout", a->shutdownTimeout, "Grace between SIGTERM and SIGKILL for workers (30s)")
      ->envname("DTRAIN_SHUTDOWN_TIMEOUT");
  sub->add_option("--heartbeat-interval", a->heartbeatInterval, "Agent heartbeat interval (1s)")
      ->envname("DTRAIN_HEARTBEAT_INTERVAL");
  sub->add_option("--heartbeat-timeout", a->heartbeatTimeout, "A node silent this long is lost (5s)")
      ->envname("DTRAIN_HEARTBEAT_TIMEOUT");
  sub->add_option("--local-addr,--local_addr", o.localAddr, "Address other nodes use to reach this one")
      ->envname("DTRAIN_LOCAL_ADDR");
  sub->add_option("--master-addr,--master_addr", a->masterAddr, "torchrun alias: rendezvous host when no endpoint")
      ->envname("DTRAIN_MASTER_ADDR");
  sub->add_option("--master-port,--master_port", a->masterPort,
                  "torchrun alias: rendezvous port when no endpoint (with --master-addr, else on 127.0.0.1)")
      ->check(CLI::Range(1, 65535))
      ->envname("DTRAIN_MASTER_PORT");
  sub->add_option("--log-dir,--log_dir", o.logDir, "Keep per-attempt, per-rank stdout/stderr files here")
      ->envname("DTRAIN_LOG_DIR");
  sub->add_option("--redirects,-r", a->redirects, "Streams sent to log files only: 0-3 or 0:1,1:2 per local rank")
      ->envname("DTRAIN_REDIRECTS");
  sub->add_option("--tee,-t", a->tee, "torchrun compatibility, no effect: with --log-dir every stream is always written to its file "
                  "(0-3 or per local rank as 0:1,1:2, checked)")
      ->envname("DTRAIN_TEE");
  // torchrun options with nothing to do here, accepted so that a torchrun command line runs unchanged (they were
  // "not expected", exit 3).
  sub->add_flag("--no-python,--no_python", a->noPython,
                "torchrun compatibility, no effect: dtrain never adds python (launch a script as -- python3 train.py)")
      ->envname("DTRAIN_NO_PYTHON");
  sub->add_option("--monitor-interval,--monitor_interval", a->monitorInterval,
                  "torchrun compatibility, no effect: worker exits are events (SIGCHLD), not polled")
      ->check(CLI::PositiveNumber)
      ->envname("DTRAIN_MONITOR_INTERVAL");
  sub->add_option("--start-method,--start_method", a->startMethod,
                  "torchrun compatibility, no effect: workers are always fork+exec'd (spawn, fork or forkserver)")
      ->check(CLI::IsMember({"spawn", "fork", "forkserver"}))
      ->envname("DTRAIN_START_METHOD");
  sub->add_option("--local-ranks-filter,--local_ranks_filter", a->localRanksFilter,
                  "Show only these local ranks' output on the console, e.g. 0 or 0,1")
      ->envname("DTRAIN_LOCAL_RANKS_FILTER");
  sub->add_option("--metrics-port", o.metricsPort,
                  "Serve Prometheus metrics of this node's workers and agent at http://HOST:PORT/metrics (0: a free "
                  "port, logged)")
      ->check(CLI::Range(0, 65535))
      ->envname("DTRAIN_METRICS_PORT");
  sub->add_option("--metrics-bind", o.metricsBind, "Address the metrics endpoint (and the dashboard) listens on")
      ->capture_default_str()
      ->envname("DTRAIN_METRICS_BIND");
  sub->add_option("--dashboard", o.dashboardPort,
                  "Serve a live page of the run (curves per rank, node state, restarts) at http://HOST:PORT/dashboard "
                  "(0: a free port, logged)")
      ->check(CLI::Range(0, 65535))
      ->envname("DTRAIN_DASHBOARD");
  sub->add_option("--timeline", o.timelineFile,
                  "Write a Chrome trace (chrome://tracing, Perfetto) of every rank's step phases and collectives to "
                  "this file when the job ends (give it to one agent; the others ship their part)")
      ->envname("DTRAIN_TIMELINE");
  sub->add_flag("--dry-run", a->dryRun, "Print the resolved launch plan and exit");
  sub->footer("Everything from JOB.json or PROGRAM on (or after --) is passed to the workers untouched.\n\n" +
              exitCodesHelp({{"0", "every worker succeeded"},
                             {"1", ""},
                             {"2", ""},
                             {"3", ""},
                             {"4", ""},
                             {"5", ""},
                             {"6", ""},
                             {"7", "a collective failed (peer lost, timeout): from dtrain's own workers"},
                             {"8", ""},
                             {"9", ""},
                             {"126 / 127", ""},
                             {"128+N", "the failing worker (or the agent itself) was killed by signal N"},
                             {"other", ""}}));
  runArgs() = a;
  sub->callback([&action, a, sub] {
    auto given = [sub](std::initializer_list<const char*> names) {
      for (const char* n : names)
        if (sub->get_option(n)->count() > 0) return true;
      return false;
    };
    a->given = {given({"--nnodes"}), given({"--nproc-per-node"}), given({"--node-rank"}),
                given({"--rdzv-endpoint", "--master-addr"}), given({"--rdzv-id"})};
    action = [a] { return runCommand(*a, a->afterDashes); };
  });
}

std::vector<std::string> splitWorkerArgs(CLI::App& root, std::vector<std::string>& args) {
  // torchrun's rule: launcher options come first; the first token that is neither an option nor an option's
  // value starts the worker's command line (or everything after `--`). CLI11 then parses only the options.
  auto* sub = root.get_subcommand("run");
  std::vector<std::string> worker;
  if (args.size() < 2 || args[1] != "run") return worker;
  for (size_t i = 2; i < args.size(); ++i) {
    const std::string& t = args[i];
    if (t == "--") {
      worker.assign(args.begin() + static_cast<long>(i) + 1, args.end());
      args.resize(i);
      runArgs()->afterDashes = true;
      break;
    }
    if (t.size() > 1 && t[0] == '-') {
      if (t.find('=') != std::string::npos) continue;
      const CLI::Option* opt = sub->get_option_no_throw(t);
      bool takesValue = opt == nullptr || opt->get_expected_min() > 0;
      if (takesValue) ++i;  // unknown options too: CLI11 reports them
      continue;
    }
    worker.assign(args.begin() + static_cast<long>(i), args.end());
    args.resize(i);
    break;
  }
  runArgs()->positional = worker;
  return worker;
}

}  // namespace dtrain::app
