// Cluster detection besides Slurm (slurm.h) for `dtrain run`: MPI launchers (mpirun/mpiexec of OpenMPI, MPICH's
// Hydra, PMIx launchers) and Kubernetes training operators, as pure functions of an environment map, so that
// every rule is unit-tested without a cluster. `mpirun -np 4 --map-by ppr:1:node dtrain run job.json` or a
// PyTorchJob's pods then need no flag. Slurm wins when both apply (srun --mpi=pmi2/pmix sets PMI_* as well).
//
// Rules (docs/cluster.md has the user-facing version):
// - MPI: every MPI task is one agent (one "node"): nnodes = OMPI_COMM_WORLD_SIZE, else PMI_SIZE, else
//   PMIX_SIZE; node rank = OMPI_COMM_WORLD_RANK, else PMI_RANK, else PMIX_RANK. Launch one task per host
//   (`--map-by ppr:1:node`, `-npernode 1`, `-ppn 1`); tasks sharing a host (OMPI_COMM_WORLD_LOCAL_SIZE,
//   MPI_LOCALNRANKS > 1) each run an agent with their own workers, and a note says so.
//   Endpoint (node rank 0 hosts the store with the static backend): MASTER_ADDR[:MASTER_PORT] when the launch
//   exports them (`mpirun -x MASTER_ADDR=...`); else 127.0.0.1 when every task is on this host (local size ==
//   size); else none (the user gives --rdzv-endpoint; the dry run says so). Port: MASTER_PORT, else
//   29400 + (job id % 1000). Run id: "mpi-<job id>" from OMPI_MCA_ess_base_jobid, PMIX_NAMESPACE or
//   PMI_JOBID (whatever the launcher sets), so every task of one launch agrees and two launches do not.
// - Kubernetes (KUBERNETES_SERVICE_HOST set, or DTRAIN_CLUSTER=kubernetes): the training operator's torchrun
//   variables PET_NNODES / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT / PET_NPROC_PER_NODE when set;
//   else PyTorchJob's per-pod MASTER_ADDR / MASTER_PORT / WORLD_SIZE / RANK, where WORLD_SIZE and RANK count
//   pods (one agent per pod); else an Indexed Job / JobSet: DTRAIN_HOSTS (comma list of the pods' stable
//   headless-service names) with node rank JOB_COMPLETION_INDEX, else this pod's hostname's position in the
//   list (its first label against each name's first label). Endpoint: the master address (the list's first
//   host) and MASTER_PORT, else 29400. Run id: the job's name when the operator gives one (PET_RDZV_ID,
//   JOB_NAME, else the master address).
// - DTRAIN_CLUSTER=none turns this detection off; =mpi or =kubernetes forces one kind.
// Malformed values (not numbers, a rank outside the size) are UsageErrors naming the variable and the value.
#pragma once

#include <string>
#include <vector>

#include "lib/launch/launch_options.h"
#include "lib/launch/slurm.h"

namespace dtrain::launch {

struct ClusterPlan {
  std::string kind;    // "mpi", "kubernetes", or "" when neither applies
  std::string status;  // one line: how the kind was decided
  Derived<int> nnodes;
  Derived<int> nodeRank;
  Derived<std::string> runId;
  Derived<std::string> rdzvEndpoint;
  Derived<int> nproc;           // PET_NPROC_PER_NODE
  Derived<int> tasksOnHost;     // MPI tasks on this host (local size)
  std::vector<std::string> notes;
  bool detected() const { return !kind.empty(); }
};

// Pure: reads only `env`. Throws UsageError for malformed values.
ClusterPlan detectCluster(const Environment& env);

// Lines for `dtrain run --dry-run`: "cluster: ..." and one "name=value (source)" per derived value.
std::string describe(const ClusterPlan& plan);

// As applySlurm (slurm.h): fills in what the user did not give, refuses explicit values that contradict the
// launcher ("--node-rank 1 contradicts the MPI launch: OMPI_COMM_WORLD_RANK=0"), and returns the --dry-run lines.
// No change and no lines when nothing was detected.
std::vector<std::string> applyCluster(const ClusterPlan& plan, const GivenOptions& given, LaunchOptions& options);

}  // namespace dtrain::launch
