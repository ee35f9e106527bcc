// `dtrain sim`: N virtual nodes on this machine, each a real agent in its own network namespace, with a fault
// schedule and a report (docs/sim.md). CLI parsing only: the work is lib/launch/sim.h's runSim.
#include <algorithm>

#include "apps/dtrain/commands.h"
#include "apps/dtrain/job_hooks.h"
#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/common/parse.h"
#include "lib/launch/launch_options.h"
#include "lib/launch/sim.h"
#include "lib/train/layout.h"

namespace dtrain::app {

namespace {

struct SimArgs {
  launch::SimOptions opts;
  std::string faults, heartbeatTimeout = "3s", lastCall = "2s", shutdownTimeout = "3s", timeout = "10m";
  std::vector<std::string> positional;
  bool afterDashes = false;
};

std::shared_ptr<SimArgs>& simArgs() {
  static std::shared_ptr<SimArgs> args;
  return args;
}

// The agents' MIN (--nnodes MIN:TOTAL) for a job that cannot run on every node count (pipeline stages x tensor
// must divide the world; parameter servers must leave a rank to train). Survivors of the faults at a count the job
// cannot use would wait for a node that never comes, --rdzv-timeout (the sim's --timeout, 10 minutes), and fail
// with exit 4; so MIN drops to the largest usable count below it, and the rendezvous forms the survivors' round with
// that many and keeps the others as spares (docs/fault-tolerance.md, "Node counts the job cannot use"), as
// `dtrain run --nnodes MIN:MAX` does. Says so in `note`. Returns 0 (the default rule) when nothing needs lowering.
int usableMinNodes(const train::Job& job, const launch::SimOptions& o, std::string& note) {
  const int survivors = launch::simSurvivingNodes(o.faults, o.nodes);
  if (survivors >= o.nodes) return 0;  // no fault takes a node away: the first round is the initial nodes
  const int servers = job.parallel.ps ? job.parallel.ps->servers : 0;
  const auto [checked, unusable] =
      train::unusableNodeCounts(job.parallel, 1, survivors, o.nprocPerNode, servers, job.sourceFile);
  (void)checked;
  auto reason = [&unusable](int nodes) -> const std::string* {
    for (const auto& u : unusable)
      if (u.first == nodes) return &u.second;
    return nullptr;
  };
  const std::string* why = reason(survivors);
  if (why == nullptr) return 0;
  for (int n = survivors - 1; n >= 1; --n) {
    if (reason(n) != nullptr) continue;
    note = fmt::format(
        "the faults may leave {} node(s), a world this job cannot run ({}); the agents take --nnodes {}:{}, so the "
        "survivors form a round of {} node(s) and the others wait as spares",
        survivors, *why, n, launch::simTotalNodes(o.faults, o.nodes), n);
    return n;
  }
  log::warn("dtrain sim: the faults may leave {} node(s), and this job runs on none of 1..{} ({}); the survivors "
            "will wait for a node to join, up to --timeout",
            survivors, survivors, *why);
  return 0;
}

int simCommand(SimArgs& a) {
  auto& o = a.opts;
  DTRAIN_CHECK_AS(UsageError, !a.positional.empty(),
                  "dtrain sim: nothing to run; give a job file (dtrain sim --nodes 4 job.json) or a program after --");
  o.heartbeatTimeout = parse::durationFlag("--heartbeat-timeout", a.heartbeatTimeout, true);
  o.lastCall = parse::durationFlag("--rdzv-last-call", a.lastCall);
  o.shutdownTimeout = parse::durationFlag("--shutdown-timeout", a.shutdownTimeout, true);
  o.timeout = parse::durationFlag("--timeout", a.timeout, true);
  DTRAIN_CHECK_AS(UsageError, o.nodes >= 1 && o.nodes <= 250, "--nodes {}: expected 1 to 250", o.nodes);
  DTRAIN_CHECK_AS(UsageError, o.nprocPerNode >= 1, "--nproc-per-node {}: expected at least 1", o.nprocPerNode);
  if (!o.link.empty()) launch::checkTcRate(o.link, "--link");
  o.faults = launch::parseSimFaults(a.faults, o.nodes);
  DTRAIN_CHECK_AS(UsageError, launch::simTotalNodes(o.faults, o.nodes) <= 250,
                  "--faults: {} nodes with the joins (expected at most 250)", launch::simTotalNodes(o.faults, o.nodes));
  const std::string& first = a.positional.front();
  o.isJob = !a.afterDashes && launch::isJobFileName(first);
  o.program = a.positional;
  if (o.isJob) {
    // The job is validated here, before any namespace or agent exists (exit 2 for a bad job file).
    std::vector<std::string> trainArgs = a.positional;
    const train::Job job = validateJobForLaunch(trainArgs);
    o.minNodes = usableMinNodes(job, o, o.minNodesNote);
    // No round the agents may form (MIN..TOTAL nodes) can run the job: every agent would fail with exit 2 (or wait
    // out --timeout), after the namespaces and agents were set up. Refused here, as dtrain run refuses such --nnodes.
    const int minNodes = o.minNodes > 0 ? o.minNodes : launch::simSurvivingNodes(o.faults, o.nodes);
    const int total = launch::simTotalNodes(o.faults, o.nodes);
    const auto [checked, unusable] = train::unusableNodeCounts(
        job.parallel, minNodes, total, o.nprocPerNode, job.parallel.ps ? job.parallel.ps->servers : 0, job.sourceFile);
    DTRAIN_CHECK_AS(ConfigError, static_cast<int>(unusable.size()) < checked,
                    "dtrain sim --nodes {} --nproc-per-node {}{}: no round the sim may form ({} to {} node(s)) gives a "
                    "world this job can use; e.g. {} node(s): {}",
                    o.nodes, o.nprocPerNode, a.faults.empty() ? "" : fmt::format(" --faults {}", a.faults), minNodes,
                    total, unusable.front().first, unusable.front().second);
    // The first round forms from the initial nodes. When none of their counts can run the job only a join makes one,
    // and a join at a step (join:node3@step5) waits for a step that no round takes: the sim waited out --timeout.
    const auto first = train::unusableNodeCounts(job.parallel, std::min(minNodes, o.nodes), o.nodes, o.nprocPerNode,
                                                 job.parallel.ps ? job.parallel.ps->servers : 0, job.sourceFile);
    const bool timedJoin = std::any_of(o.faults.begin(), o.faults.end(), [](const launch::SimFault& f) {
      return f.kind == launch::SimFaultKind::kJoin && f.atStep < 0;
    });
    DTRAIN_CHECK_AS(ConfigError, static_cast<int>(first.unusable.size()) < first.checked || timedJoin,
                    "dtrain sim --nodes {} --nproc-per-node {} --faults {}: no count of the initial nodes can run "
                    "this job (e.g. {} node(s): {}), so the first round waits for a join, and the joins wait for a "
                    "training step that no round takes; give a join a time instead (join:node{}@5s)",
                    o.nodes, o.nprocPerNode, a.faults, first.unusable.front().first, first.unusable.front().second,
                    o.nodes);
  }
  if (o.outputDir.empty()) o.outputDir = fmt::format("dtrain-sim-{}", ::getpid());
  o.exe = selfExe();
  return launch::runSim(o);
}

}  // namespace

void addSimCommand(CLI::App& root, Action& action) {
  auto a = std::make_shared<SimArgs>();
  auto& o = a->opts;
  auto* sub = root.add_subcommand(
      "sim", "Rehearse a multi-node job on this machine: N virtual nodes (network namespaces, shaped links), a "
             "fault schedule, a report: dtrain sim --nodes N [options] JOB.json | -- PROGRAM [ARGS...]");
  sub->add_option("--nodes", o.nodes, "Virtual nodes at the start (node0..nodeN-1)")->required();
  sub->add_option("--nproc-per-node,--nproc_per_node,-n", o.nprocPerNode, "Workers per node (1)");
  sub->add_option("--link", o.link, "Every link's bandwidth, shaped with tc tbf: 100mbit, 1gbit (default: unshaped)");
  sub->add_option("--faults", a->faults,
                  "Fault schedule: kill:node3@5s, freeze:node2@10s+5s, partition:node1@8s+3s, slow:node4=10mbit[@T], "
                  "join:node5@12s, delay:node1=20ms, loss:node2=1%[@T] (comma-separated; a time may be stepN: "
                  "when the job completed step N)");
  sub->add_option("--report", o.report, "Also write the report as a chart: FILE.svg or FILE.html");
  sub->add_option("--output-dir", o.outputDir,
                  "Node logs, sample logs and the job's output (run/) go here (default: ./dtrain-sim-PID)");
  sub->add_option("--heartbeat-timeout", a->heartbeatTimeout, "The agents' --heartbeat-timeout (3s)");
  sub->add_option("--rdzv-last-call", a->lastCall, "The agents' --rdzv-last-call (2s)");
  sub->add_option("--shutdown-timeout", a->shutdownTimeout, "The agents' --shutdown-timeout (3s)");
  sub->add_option("--max-restarts", o.maxRestarts, "The agents' --max-restarts (3)");
  sub->add_option("--timeout", a->timeout, "Stop everything and fail (exit 4) after this long (10m)");
  sub->add_flag("--loopback", o.loopback, "Run on 127.0.0.x even as root (no namespaces, no shaping)");
  sub->add_flag("--verbose,-v", o.verbose, "Echo every agent's output, prefixed with its node");
  sub->footer("Everything from JOB.json on (or after --) is what each agent runs, as with dtrain run.\n\n" +
              exitCodesHelp({{"0", "the job finished, no agent outside a faulted node failed, no sample was repeated "
                                   "or skipped"},
                             {"1", "samples were repeated or skipped, or no agent finished the job"},
                             {"2", ""},
                             {"3", ""},
                             {"4", "--timeout passed"},
                             {"128+N", "stopped by signal N"},
                             {"other", "the first failing agent's exit code (dtrain run's)"}}));
  simArgs() = a;
  sub->callback([&action, a] { action = [a] { return simCommand(*a); }; });
}

void splitSimArgs(std::vector<std::string>& args) {
  // As for `dtrain run`: the first token that is neither an option nor an option's value starts what the agents
  // run (or everything after `--`).
  if (args.size() < 2 || args[1] != "sim" || !simArgs()) return;
  static const std::vector<std::string> kFlags = {"--loopback", "--verbose", "-v", "--help", "-h"};
  for (size_t i = 2; i < args.size(); ++i) {
    const std::string& t = args[i];
    if (t == "--") {
      simArgs()->positional.assign(args.begin() + static_cast<long>(i) + 1, args.end());
      simArgs()->afterDashes = true;
      args.resize(i);
      return;
    }
    if (t.size() > 1 && t[0] == '-') {
      if (t.find('=') == std::string::npos && std::find(kFlags.begin(), kFlags.end(), t) == kFlags.end()) ++i;
      continue;
    }
    simArgs()->positional.assign(args.begin() + static_cast<long>(i), args.end());
    args.resize(i);
    return;
  }
}

}  // namespace dtrain::app
