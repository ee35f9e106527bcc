#include "lib/launch/cluster_env.h"

#include <climits>
#include <initializer_list>

#include "lib/common/error.h"
#include "lib/common/net.h"
#include "lib/common/parse.h"
#include "rendezvous/store.h"

namespace dtrain::launch {

namespace {

Derived<int> countFrom(const Environment& env, std::initializer_list<const char*> names, int min,
                       const std::string& why) {
  return launch::countFrom(env, names, min, {why, "DTRAIN_CLUSTER=none turns this detection off"});
}

void checkRank(const Derived<int>& rank, const Derived<int>& size) {
  if (rank.has() && size.has())
    DTRAIN_CHECK_AS(UsageError, *rank.value < *size.value, "environment variable {}={} is not below {}={}", rank.from,
                    *rank.value, size.from, *size.value);
}

// The digits of a job id ("2576089089", "prterun-host-1234@1" -> 1234...) folded into a port offset.
int portFor(const std::string& jobId) {
  uint64_t h = 0;
  for (char c : jobId) h = h * 131 + static_cast<unsigned char>(c);
  return rendezvous::kDefaultPort + static_cast<int>(h % 1000);
}

std::string firstLabel(const std::string& host) { return host.substr(0, host.find('.')); }

void detectMpi(const Environment& env, ClusterPlan& p) {
  const std::string why = "an MPI launcher started this process";
  p.nnodes = countFrom(env, {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"}, 1, why);
  p.nodeRank = countFrom(env, {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"}, 0, why);
  p.tasksOnHost = countFrom(env, {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"}, 1, why);
  checkRank(p.nodeRank, p.nnodes);
  if (!p.nnodes.has())
    p.notes.push_back(fmt::format("{} is set but no task count (OMPI_COMM_WORLD_SIZE, PMI_SIZE, PMIX_SIZE): give "
                                  "--nnodes",
                                  p.nodeRank.from));
  auto job = firstSet(env, {"OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE", "PMI_JOBID"});
  if (job) p.runId = {"mpi-" + job->value, job->name};
  int port = job ? portFor(job->value) : rendezvous::kDefaultPort;
  std::string portFrom = job ? fmt::format("port from {}", job->name) : "default port";
  if (auto mp = firstSet(env, {"MASTER_PORT"})) {
    port = countFrom(env, {"MASTER_PORT"}, 1, why).value.value_or(port);
    portFrom = "MASTER_PORT";
  }
  bool allHere = p.tasksOnHost.has() && p.nnodes.has() && *p.tasksOnHost.value == *p.nnodes.value;
  if (auto addr = firstSet(env, {"MASTER_ADDR"})) {
    p.rdzvEndpoint = {net::joinHostPort(addr->value, port), "MASTER_ADDR; " + portFrom};
  } else if (allHere || (p.nnodes.has() && *p.nnodes.value == 1)) {
    p.rdzvEndpoint = {fmt::format("127.0.0.1:{}", port),
                      fmt::format("every task on this host ({}={}); {}", p.tasksOnHost.has() ? p.tasksOnHost.from : p.nnodes.from,
                                  p.tasksOnHost.value.value_or(1), portFrom)};
  } else if (p.nnodes.has() && *p.nnodes.value > 1) {
    p.notes.push_back("the MPI launch does not say where task 0 runs: export MASTER_ADDR (mpirun -x "
                      "MASTER_ADDR=<host of task 0>) or give --rdzv-endpoint");
  }
  if (p.tasksOnHost.has() && *p.tasksOnHost.value > 1 && !allHere)
    p.notes.push_back(fmt::format("{} MPI tasks share this host ({}): each runs an agent with its own workers; "
                                  "launch one task per host (mpirun --map-by ppr:1:node) for one agent per node",
                                  *p.tasksOnHost.value, p.tasksOnHost.from));
}

void detectKubernetes(const Environment& env, ClusterPlan& p) {
  const std::string why = "this pod runs under Kubernetes";
  if (firstSet(env, {"PET_NNODES", "PET_NODE_RANK"})) {
    // The training operator's torchrun variables (PET_NNODES may be "N" or "MIN:MAX": the larger counts).
    if (auto nn = firstSet(env, {"PET_NNODES"})) {
      auto [lo, hi] = parseNnodes(nn->value);
      (void)lo;
      p.nnodes = {hi, nn->name};
    }
    p.nodeRank = countFrom(env, {"PET_NODE_RANK"}, 0, why);
    p.nproc = countFrom(env, {"PET_NPROC_PER_NODE"}, 1, why);
    auto addr = firstSet(env, {"PET_MASTER_ADDR", "MASTER_ADDR"});
    auto port = countFrom(env, {"PET_MASTER_PORT", "MASTER_PORT"}, 1, why);
    if (addr)
      p.rdzvEndpoint = {net::joinHostPort(addr->value, port.value.value_or(rendezvous::kDefaultPort)),
                        addr->name + (port.has() ? ", " + port.from : ", default port")};
  } else if (firstSet(env, {"WORLD_SIZE"}) && firstSet(env, {"RANK"})) {
    // PyTorchJob: WORLD_SIZE pods, this pod's RANK; one agent per pod.
    p.nnodes = countFrom(env, {"WORLD_SIZE"}, 1, why);
    p.nodeRank = countFrom(env, {"RANK"}, 0, why);
    auto addr = firstSet(env, {"MASTER_ADDR"});
    auto port = countFrom(env, {"MASTER_PORT"}, 1, why);
    if (addr)
      p.rdzvEndpoint = {net::joinHostPort(addr->value, port.value.value_or(rendezvous::kDefaultPort)),
                        "MASTER_ADDR" + std::string(port.has() ? ", MASTER_PORT" : ", default port")};
    else
      p.notes.push_back("WORLD_SIZE and RANK are set but MASTER_ADDR is not: give --rdzv-endpoint");
  } else if (auto hosts = firstSet(env, {"DTRAIN_HOSTS"})) {
    // An Indexed Job / JobSet behind a headless service: the pods' stable names, this pod's index.
    auto list = parse::split(hosts->value, ',');
    std::vector<std::string> names;
    for (auto& h : list)
      if (!parse::trim(h).empty()) names.emplace_back(parse::trim(h));
    DTRAIN_CHECK_AS(UsageError, !names.empty(), "environment variable DTRAIN_HOSTS='{}': expected a comma list of hosts",
                    hosts->value);
    p.nnodes = {static_cast<int>(names.size()), "DTRAIN_HOSTS"};
    p.nodeRank = countFrom(env, {"JOB_COMPLETION_INDEX"}, 0, why);
    if (!p.nodeRank.has()) {
      if (auto self = firstSet(env, {"HOSTNAME"}))
        for (size_t i = 0; i < names.size(); ++i)
          if (firstLabel(names[i]) == firstLabel(self->value))
            p.nodeRank = {static_cast<int>(i), fmt::format("HOSTNAME={} is entry {} of DTRAIN_HOSTS", self->value, i)};
      if (!p.nodeRank.has())
        p.notes.push_back("this pod is not in DTRAIN_HOSTS and JOB_COMPLETION_INDEX is not set: give --node-rank");
    }
    auto port = countFrom(env, {"MASTER_PORT"}, 1, why);
    p.rdzvEndpoint = {net::joinHostPort(names.front(), port.value.value_or(rendezvous::kDefaultPort)),
                      "first host of DTRAIN_HOSTS" + std::string(port.has() ? ", MASTER_PORT" : ", default port")};
  } else {
    p.status += "; no PET_NNODES, WORLD_SIZE/RANK or DTRAIN_HOSTS: nothing derived";
  }
  checkRank(p.nodeRank, p.nnodes);
  if (auto id = firstSet(env, {"PET_RDZV_ID", "JOB_NAME"})) p.runId = {id->value, id->name};
  else if (p.rdzvEndpoint.has())
    p.runId = {"k8s-" + firstLabel(p.rdzvEndpoint.value->substr(0, p.rdzvEndpoint.value->rfind(':'))), p.rdzvEndpoint.from};
}

}  // namespace

ClusterPlan detectCluster(const Environment& env) {
  ClusterPlan p;
  std::string forced;
  if (auto c = firstSet(env, {"DTRAIN_CLUSTER"})) {
    forced = c->value;
    DTRAIN_CHECK_AS(UsageError, forced == "none" || forced == "mpi" || forced == "kubernetes" || forced == "slurm",
                    "environment variable DTRAIN_CLUSTER={}: expected none, mpi, kubernetes or slurm", forced);
    if (forced == "none" || forced == "slurm") {
      p.status = fmt::format("detection off (DTRAIN_CLUSTER={})", forced);
      return p;
    }
  }
  auto mpi = firstSet(env, {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"});
  auto k8s = firstSet(env, {"KUBERNETES_SERVICE_HOST"});
  if (forced == "mpi" || (forced.empty() && mpi)) {
    p.kind = "mpi";
    p.status = mpi ? fmt::format("started by an MPI launcher ({}={})", mpi->name, mpi->value)
                   : "MPI (DTRAIN_CLUSTER=mpi)";
    detectMpi(env, p);
  } else if (forced == "kubernetes" || (forced.empty() && k8s)) {
    p.kind = "kubernetes";
    p.status = k8s ? fmt::format("in a Kubernetes pod (KUBERNETES_SERVICE_HOST={})", k8s->value)
                   : "Kubernetes (DTRAIN_CLUSTER=kubernetes)";
    detectKubernetes(env, p);
  } else {
    p.status = "no MPI launcher (OMPI_COMM_WORLD_RANK, PMI_RANK, PMIX_RANK) and not in Kubernetes";
  }
  return p;
}

std::string describe(const ClusterPlan& p) {
  std::string out = fmt::format("cluster: {}\n", p.status);
  if (!p.detected()) return out;
  describeLine(out, "nnodes", p.nnodes);
  describeLine(out, "node_rank", p.nodeRank);
  describeLine(out, "rdzv_id", p.runId);
  describeLine(out, "rdzv_endpoint", p.rdzvEndpoint);
  describeLine(out, "nproc_per_node", p.nproc);
  describeLine(out, "tasks_on_host", p.tasksOnHost);
  for (const auto& note : p.notes) out += fmt::format("note: {}\n", note);
  return out;
}

std::vector<std::string> applyCluster(const ClusterPlan& plan, const GivenOptions& given, LaunchOptions& o) {
  std::vector<std::string> lines;
  if (!plan.detected()) return lines;
  const std::string launch = plan.kind == "mpi" ? "the MPI launch" : "the Kubernetes job";
  lines.push_back("cluster: " + plan.status);
  applyPlacement({plan.nnodes, plan.nodeRank, plan.runId, plan.rdzvEndpoint},
                 {launch, launch, "drop --nnodes, or change the launch",
                  "every node's rank comes from the launcher; drop --node-rank"},
                 given, o, lines);
  if (given.nproc) {
    if (plan.nproc.has() && parse::toInt(o.nprocText))
      DTRAIN_CHECK_AS(UsageError, *parse::toInt(o.nprocText) == *plan.nproc.value,
                      "--nproc-per-node {} contradicts {}: {}={}", o.nprocText, launch, plan.nproc.from,
                      *plan.nproc.value);
    lines.push_back(fmt::format("nproc_per_node={} (--nproc-per-node)", o.nprocText));
  } else if (plan.nproc.has()) {
    o.nprocText = std::to_string(*plan.nproc.value);
    lines.push_back(fmt::format("nproc_per_node={} ({})", o.nprocText, plan.nproc.from));
  }
  for (const auto& note : plan.notes) lines.push_back("note: " + note);
  return lines;
}

}  // namespace dtrain::launch
