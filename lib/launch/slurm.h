// Slurm detection for `dtrain run`: what an allocation says about the launch (node count, this node's rank, a
// run id, the store's host, how many workers), as pure functions of an environment map, so that every rule is
// unit-tested without Slurm. `srun dtrain run job.json` inside an allocation then needs no other flag.
//
// Rules (docs/slurm.md has the user-facing version):
// - In Slurm when SLURM_JOB_ID is set, unless DTRAIN_SLURM is 0/false/off. In a step when SLURM_STEP_ID (or
//   SLURM_STEPID) is set too; a batch script or an salloc shell is a job outside any step.
// - nnodes: SLURM_STEP_NUM_NODES, else SLURM_NNODES, else SLURM_JOB_NUM_NODES (a step may use fewer nodes than
//   its job: `srun -N1` in a 2-node job is a 1-node launch). node rank: SLURM_NODEID (relative to the step).
// - Outside a step in a multi-node job only this node can take part, so nothing multi-node is derived and a
//   note says to use srun; a 1-node job outside a step is derived like a step.
// - run id: "<SLURM_JOB_ID>.<SLURM_STEP_ID>" ("<job>.batch" outside a step), plus "-requeue<N>" when
//   SLURM_RESTART_COUNT=N > 0, so a requeued job never meets the keys of its earlier attempt in a lasting store.
// - store endpoint: the first host of SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST, SLURM_NODELIST), i.e. the
//   node with SLURM_NODEID 0, which hosts the store with the static backend; port 29400 + (10 * job + step) %
//   1000, so that jobs sharing a node rarely collide (--rdzv-endpoint / --master-port override it). A 1-node
//   launch uses 127.0.0.1 with that port.
// - GPUs of this task: SLURM_GPUS_ON_NODE, but no more than CUDA_VISIBLE_DEVICES lists when that is set (what
//   the workers can really open); else SLURM_STEP_GPUS / SLURM_JOB_GPUS / CUDA_VISIBLE_DEVICES counted.
//   CPUs of this task: SLURM_CPUS_PER_TASK, else SLURM_CPUS_ON_NODE.
// - nproc "auto": the GPUs when there are any; else, when the step has more tasks than nodes (`srun -n 8` on 2
//   nodes), the step's tasks on this node (one worker per task the user asked for); else the CPUs.
// - One agent per node: when a step puts several tasks on one node, the task with SLURM_LOCALID 0 runs the agent
//   (with nproc as above) and every other task exits 0 at once after a one-line note that names the right
//   `srun --ntasks-per-node=1` form (see extraTask()).
// Malformed SLURM_* values (not numbers, bad host lists) are UsageErrors naming the variable and the value.
#pragma once

#include <string>
#include <vector>

#include "lib/launch/launch_options.h"
#include "lib/launch/launcher_env.h"

namespace dtrain::launch {

struct SlurmPlan {
  bool inSlurm = false;  // inside a Slurm job and detection not disabled
  bool inStep = false;   // inside an srun step (false in a batch script or salloc shell)
  std::string status;    // one line: how inSlurm/inStep were decided
  std::string jobId;
  std::string stepId;    // "batch" outside a step
  Derived<int> nnodes;
  Derived<int> nodeRank;
  Derived<std::string> runId;
  Derived<std::string> storeHost;  // first host of the step's node list
  Derived<std::string> rdzvEndpoint;
  Derived<int> gpus;
  Derived<int> cpus;
  Derived<int> nproc;        // the `--nproc-per-node auto` rule
  Derived<int> localId;      // SLURM_LOCALID
  Derived<int> tasksOnNode;  // tasks of the step (or job) on this node
  std::string nodeName;      // SLURMD_NODENAME, for messages
  std::vector<std::string> notes;  // warnings for the user (printed by the caller)

  // True for a task other than the first of its step on this node: it must not start an agent.
  bool extraTask() const;
  // The one-line note such a task prints before it exits 0.
  std::string extraTaskNote() const;
};

// Pure: reads only `env`. Throws UsageError for malformed SLURM_* values.
SlurmPlan detectSlurm(const Environment& env);

// Lines for `dtrain run --dry-run`, one value each with its source: "nnodes=2 (SLURM_STEP_NUM_NODES)".
std::string describe(const SlurmPlan& plan);

// Merges a plan into `options` before options.validate(): fills in nnodesText, nodeRank, rdzvId, rdzvEndpoint
// and nprocText where the user gave none (an explicit nproc of auto/gpu/cpu resolves through Slurm's counts),
// and leaves explicit values alone unless they contradict the allocation, which is a UsageError naming both
// ("--nnodes 4 contradicts the Slurm allocation: SLURM_STEP_NUM_NODES=2"): --nnodes outside the step's node count,
// --node-rank other than SLURM_NODEID, --standalone in a multi-node step, --nproc-per-node gpu without GPUs.
// With --rdzv-backend store/c10d/etcd the endpoint is never derived (it is where that store runs).
// The shared part (nnodes, node rank, run id, endpoint) is applyPlacement (launcher_env.h).
// Returns the --dry-run lines "name=value (source)" for every value it decided or checked; empty and no change
// when the plan is not in Slurm.
std::vector<std::string> applySlurm(const SlurmPlan& plan, const GivenOptions& given, LaunchOptions& options);

}  // namespace dtrain::launch
