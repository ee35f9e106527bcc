#include "lib/launch/slurm.h"

#include <climits>
#include <initializer_list>

#include "lib/common/error.h"
#include "lib/common/net.h"
#include "lib/common/parse.h"
#include "lib/launch/hostlist.h"
#include "rendezvous/store.h"

namespace dtrain::launch {

namespace {

constexpr int kPortBase = rendezvous::kDefaultPort;
constexpr int kPortSpan = 1000;

const EnvReason kWhy{"SLURM_JOB_ID is set", "DTRAIN_SLURM=0 turns Slurm detection off"};

int toCount(const EnvVar& v, int min) { return launch::toCount(v, min, kWhy); }

Derived<int> countFrom(const Environment& env, std::initializer_list<const char*> names, int min) {
  return launch::countFrom(env, names, min, kWhy);
}

// Devices in a list such as CUDA_VISIBLE_DEVICES=0,1 or SLURM_JOB_GPUS=0-3,5 (UUIDs count one each).
int countDevices(const EnvVar& v) {
  if (v.value == "NoDevFiles" || v.value == "-1") return 0;
  int n = 0;
  for (const auto& item : parse::split(v.value, ',')) {
    auto dash = item.find('-');
    auto lo = dash == std::string::npos ? std::nullopt : parse::toInt(item.substr(0, dash));
    auto hi = dash == std::string::npos ? std::nullopt : parse::toInt(item.substr(dash + 1));
    if (lo && hi) {
      DTRAIN_CHECK_AS(UsageError, *lo >= 0 && *lo <= *hi && *hi - *lo < 65536,
                      "environment variable {}={}: bad device range '{}'", v.name, v.value, item);
      n += static_cast<int>(*hi - *lo + 1);
    } else if (!parse::trim(item).empty()) {
      ++n;
    }
  }
  return n;
}

void detectGpus(const Environment& env, SlurmPlan& p) {
  auto visible = firstSet(env, {"CUDA_VISIBLE_DEVICES"});
  if (auto onNode = firstSet(env, {"SLURM_GPUS_ON_NODE"})) {
    int n = toCount(*onNode, 0);
    p.gpus = {n, onNode->name};
    if (visible && countDevices(*visible) < n)
      p.gpus = {countDevices(*visible), fmt::format("CUDA_VISIBLE_DEVICES (this task sees fewer than {}={})",
                                                    onNode->name, onNode->value)};
    return;
  }
  for (const char* name : {"SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"}) {
    if (!p.inStep && std::string_view(name) == "SLURM_STEP_GPUS") continue;
    if (auto v = firstSet(env, {name})) {
      p.gpus = {countDevices(*v), v->name};
      return;
    }
  }
}

void detectNproc(SlurmPlan& p, const Derived<int>& totalTasks) {
  if (p.gpus.has() && *p.gpus.value > 0) {
    p.nproc = {*p.gpus.value, "GPUs: " + p.gpus.from};
  } else if (p.tasksOnNode.has() && totalTasks.has() && p.nnodes.has() && *totalTasks.value > *p.nnodes.value) {
    p.nproc = {*p.tasksOnNode.value,
               fmt::format("{}={} tasks on {} nodes: one worker per task on this node, {}", totalTasks.from,
                           *totalTasks.value, *p.nnodes.value, p.tasksOnNode.from)};
  } else if (p.cpus.has()) {
    p.nproc = {*p.cpus.value, "CPUs: " + p.cpus.from};
  }
}

int64_t numberOr(const std::string& s, int64_t fallback) {
  auto v = parse::toInt(s);
  return v && *v >= 0 ? *v : fallback;
}

}  // namespace

SlurmPlan detectSlurm(const Environment& env) {
  SlurmPlan p;
  if (auto off = firstSet(env, {"DTRAIN_SLURM"})) {
    auto on = parse::toBool(off->value);
    DTRAIN_CHECK_AS(UsageError, on.has_value(), "environment variable DTRAIN_SLURM={}: expected 1 or 0 (true/false)",
                    off->value);
    if (!*on) {
      p.status = fmt::format("detection off (DTRAIN_SLURM={})", off->value);
      return p;
    }
  }
  auto job = firstSet(env, {"SLURM_JOB_ID", "SLURM_JOBID"});
  if (!job) {
    p.status = "not in a Slurm job (no SLURM_JOB_ID)";
    return p;
  }
  p.inSlurm = true;
  p.jobId = job->value;
  auto step = firstSet(env, {"SLURM_STEP_ID", "SLURM_STEPID"});
  p.inStep = step.has_value();
  p.stepId = step ? step->value : "batch";
  if (auto name = firstSet(env, {"SLURMD_NODENAME"})) p.nodeName = name->value;

  auto nnodes = p.inStep ? countFrom(env, {"SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"}, 1)
                         : countFrom(env, {"SLURM_JOB_NUM_NODES", "SLURM_NNODES"}, 1);
  p.status = p.inStep ? fmt::format("job {} step {} ({}, {})", p.jobId, p.stepId, job->name, step->name)
                      : fmt::format("job {} outside any step: a batch script or salloc shell ({}, no SLURM_STEP_ID)",
                                    p.jobId, job->name);
  p.localId = countFrom(env, {"SLURM_LOCALID"}, 0);
  auto nodeRank = countFrom(env, {"SLURM_NODEID"}, 0);
  if (nodeRank.has() && nnodes.has())
    DTRAIN_CHECK_AS(UsageError, *nodeRank.value < *nnodes.value, "environment variable {}={} is out of range for {}={}",
                    nodeRank.from, *nodeRank.value, nnodes.from, *nnodes.value);

  // Tasks of this step on each node, to find this node's share.
  auto perNode = p.inStep ? firstSet(env, {"SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"})
                          : firstSet(env, {"SLURM_TASKS_PER_NODE"});
  if (perNode && nodeRank.has()) {
    auto counts = expandTasksPerNode(perNode->value);
    DTRAIN_CHECK_AS(UsageError, static_cast<size_t>(*nodeRank.value) < counts.size(),
                    "environment variable {}={} has no entry for node {} ({}={})", perNode->name, perNode->value,
                    *nodeRank.value, nodeRank.from, *nodeRank.value);
    p.tasksOnNode = {counts[static_cast<size_t>(*nodeRank.value)],
                     fmt::format("{}={} at {}={}", perNode->name, perNode->value, nodeRank.from, *nodeRank.value)};
  }
  auto totalTasks = p.inStep ? countFrom(env, {"SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"}, 1)
                             : countFrom(env, {"SLURM_NTASKS", "SLURM_NPROCS"}, 1);

  detectGpus(env, p);
  p.cpus = countFrom(env, {"SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"}, 1);

  auto restarts = countFrom(env, {"SLURM_RESTART_COUNT"}, 0);
  std::string runId = fmt::format("{}.{}", p.jobId, p.stepId);
  std::string runFrom = fmt::format("{}, {}", job->name, step ? step->name : "no step: batch");
  if (restarts.has() && *restarts.value > 0) {
    runId += fmt::format("-requeue{}", *restarts.value);
    runFrom += ", " + restarts.from;
  }
  p.runId = {runId, runFrom};

  bool multiNodeOutsideStep = !p.inStep && nnodes.has() && *nnodes.value > 1;
  if (multiNodeOutsideStep) {
    // A single agent here would wait forever for the other nodes: use this node only and say how to use all.
    p.notes.push_back(fmt::format(
        "outside srun in a {}-node allocation ({}={}) only this node takes part; to use every node, run dtrain "
        "as a step: srun --nodes={} --ntasks={} --ntasks-per-node=1 dtrain run ...",
        *nnodes.value, nnodes.from, *nnodes.value, *nnodes.value, *nnodes.value));
    nnodes = {};
    nodeRank = {};
  } else {
    auto nodes = p.inStep ? firstSet(env, {"SLURM_STEP_NODELIST"})
                          : firstSet(env, {"SLURM_JOB_NODELIST", "SLURM_NODELIST"});
    if (nodes) p.storeHost = {firstHost(nodes->value), fmt::format("first host of {}={}", nodes->name, nodes->value)};
  }
  p.nnodes = nnodes;
  p.nodeRank = nodeRank;

  int64_t port = kPortBase + (10 * numberOr(p.jobId, 0) + numberOr(p.stepId, 0)) % kPortSpan;
  std::string portFrom = fmt::format("port {} + (10 * {} + {}) % {}", kPortBase, job->name,
                                     step ? step->name : "0", kPortSpan);
  if (p.nnodes.has() && *p.nnodes.value == 1)
    p.rdzvEndpoint = {fmt::format("127.0.0.1:{}", port), "a single node; " + portFrom};
  else if (p.storeHost.has())
    p.rdzvEndpoint = {net::joinHostPort(*p.storeHost.value, static_cast<int>(port)), p.storeHost.from + "; " + portFrom};

  detectNproc(p, totalTasks);
  return p;
}

bool SlurmPlan::extraTask() const { return inStep && localId.has() && *localId.value > 0; }

std::string SlurmPlan::extraTaskNote() const {
  int n = nnodes.value.value_or(1);
  return fmt::format(
      "dtrain run: srun started {} tasks on node {}; only the first (SLURM_LOCALID=0) runs the agent{}, so task "
      "SLURM_LOCALID={} exits. Launch one task per node: srun --nodes={} --ntasks={} --ntasks-per-node=1 dtrain "
      "run ...",
      tasksOnNode.has() ? std::to_string(*tasksOnNode.value) : "several", nodeName.empty() ? "?" : nodeName,
      nproc.has() ? fmt::format(" with {} workers", *nproc.value) : "", localId.value.value_or(0), n, n);
}

std::string describe(const SlurmPlan& p) {
  std::string out = fmt::format("slurm: {}\n", p.status);
  if (!p.inSlurm) return out;
  describeLine(out, "nnodes", p.nnodes);
  describeLine(out, "node_rank", p.nodeRank);
  describeLine(out, "rdzv_id", p.runId);
  describeLine(out, "rdzv_endpoint", p.rdzvEndpoint);
  describeLine(out, "nproc_per_node", p.nproc);
  describeLine(out, "gpus", p.gpus);
  describeLine(out, "cpus", p.cpus);
  describeLine(out, "local_task", p.localId);
  describeLine(out, "tasks_on_node", p.tasksOnNode);
  for (const auto& note : p.notes) out += fmt::format("note: {}\n", note);
  return out;
}

std::vector<std::string> applySlurm(const SlurmPlan& plan, const GivenOptions& given, LaunchOptions& o) {
  std::vector<std::string> lines;
  if (!plan.inSlurm) return lines;
  lines.push_back("slurm: " + plan.status);
  applyPlacement({plan.nnodes, plan.nodeRank, plan.runId, plan.rdzvEndpoint},
                 {"the Slurm allocation", "the Slurm step", "drop --nnodes inside Slurm, or change the allocation",
                  "inside Slurm every node's rank comes from Slurm; drop --node-rank"},
                 given, o, lines);

  std::string kind = given.nproc ? o.nprocText : "auto";
  auto setNproc = [&](const Derived<int>& d, const std::string& how) {
    o.nprocText = std::to_string(*d.value);
    lines.push_back(fmt::format("nproc_per_node={} ({}: {})", o.nprocText, how, d.from));
  };
  if (kind == "auto" && plan.nproc.has()) {
    setNproc(plan.nproc, given.nproc ? "--nproc-per-node auto" : "auto, not given");
  } else if (kind == "gpu" && plan.gpus.has()) {
    DTRAIN_CHECK_AS(UsageError, *plan.gpus.value > 0,
                    "--nproc-per-node gpu: Slurm gave this task no GPU ({}); request some with --gpus-per-node",
                    plan.gpus.from);
    setNproc(plan.gpus, "--nproc-per-node gpu");
  } else if (kind == "cpu" && plan.cpus.has()) {
    setNproc(plan.cpus, "--nproc-per-node cpu");
  } else if (given.nproc) {
    lines.push_back(fmt::format("nproc_per_node={} (--nproc-per-node)", o.nprocText));
  }
  for (const auto& note : plan.notes) lines.push_back("note: " + note);
  return lines;
}

}  // namespace dtrain::launch
