// `dtrain run` started by cluster launchers other than Slurm (lib/launch/cluster_env.h): a real OpenMPI
// `mpirun -np 2` starting two agents on this machine that train together with no launch flag, and the
// environments of mpirun, MPICH/Hydra and a Kubernetes PyTorchJob set by hand: `--dry-run` shows every value
// and its source, and a flag that contradicts the launcher is a usage error (exit 3) naming both.
#include <doctest/doctest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "tests/integration/launch_helpers.h"
#include "tests/integration/train_helpers.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;

namespace {

std::string mpirun() {
  for (const char* p : {"/usr/bin/mpirun", "/usr/local/bin/mpirun"})
    if (::access(p, X_OK) == 0) return p;
  return {};
}

// Environment variables of another launcher or dtrain itself that must not leak into these cases.
const std::vector<std::string> kForeign = {"SLURM_JOB_ID", "SLURM_JOBID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                           "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "KUBERNETES_SERVICE_HOST",
                                           "DTRAIN_CLUSTER", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"};

RunOptions withEnv(std::map<std::string, std::string> env) {
  RunOptions o;
  o.timeout = 60s;
  o.env = std::move(env);
  for (const auto& k : kForeign)
    if (!o.env.count(k)) o.unsetEnv.push_back(k);
  return o;
}

}  // namespace

TEST_CASE("mpirun -np 2 starts two agents that find their ranks and endpoint and train together") {
  if (mpirun().empty()) {
    MESSAGE("skipped: mpirun is not installed (scripts/setup installs openmpi-bin)");
    return;
  }
  auto dir = std::filesystem::temp_directory_path() / uniqueRunId("mpi");
  std::filesystem::create_directories(dir);
  auto job = smallJob(64, 8, 1);
  job["checkpoint"] = false;
  std::ofstream((dir / "job.json").string()) << job.dump();
  auto o = withEnv({{"OMPI_ALLOW_RUN_AS_ROOT", "1"}, {"OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"},
                    {"OMPI_MCA_btl_vader_single_copy_mechanism", "none"}});
  o.timeout = 180s;
  o.cwd = dir.string();
  auto r = run({mpirun(), "--oversubscribe", "-np", "2", dtrainBinary(), "run", "--nproc-per-node", "1",
                (dir / "job.json").string()},
               o);
  INFO(r.out << r.err);
  CHECK(r.exitCode == 0);
  CHECK(r.out.find("2 rank(s)") != std::string::npos);
  CHECK(r.out.find("[n0 r0] done:") != std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST_CASE("--dry-run under mpirun's environment shows each value and its source") {
  auto r = run(runArgs({"--dry-run", "--", "true"}),
               withEnv({{"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "2"},
                        {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}, {"OMPI_MCA_ess_base_jobid", "42"}}));
  INFO(r.out << r.err);
  CHECK(r.exitCode == 0);
  CHECK(r.out.find("cluster: started by an MPI launcher (OMPI_COMM_WORLD_RANK=1)") != std::string::npos);
  CHECK(r.out.find("nnodes=2 (OMPI_COMM_WORLD_SIZE)") != std::string::npos);
  CHECK(r.out.find("node_rank=1 (OMPI_COMM_WORLD_RANK)") != std::string::npos);
  CHECK(r.out.find("rdzv_id=mpi-42 (OMPI_MCA_ess_base_jobid)") != std::string::npos);
  CHECK(r.out.find("rdzv_endpoint=127.0.0.1:") != std::string::npos);
}

TEST_CASE("a flag contradicting the launcher is a usage error naming both values") {
  auto r = run(runArgs({"--dry-run", "--node-rank", "0", "--", "true"}),
               withEnv({{"PMI_RANK", "1"}, {"PMI_SIZE", "2"}, {"MPI_LOCALNRANKS", "2"}}));
  CHECK(r.exitCode == 3);
  CHECK(r.err.find("--node-rank 0 contradicts the MPI launch: PMI_RANK=1") != std::string::npos);
}

TEST_CASE("a PyTorchJob pod: WORLD_SIZE pods, RANK, MASTER_ADDR:MASTER_PORT, with no flag") {
  auto r = run(runArgs({"--dry-run", "--", "true"}),
               withEnv({{"KUBERNETES_SERVICE_HOST", "10.96.0.1"}, {"MASTER_ADDR", "mnist-master-0"},
                        {"MASTER_PORT", "23456"}, {"WORLD_SIZE", "3"}, {"RANK", "2"}}));
  INFO(r.out << r.err);
  CHECK(r.exitCode == 0);
  CHECK(r.out.find("nnodes=3 (WORLD_SIZE)") != std::string::npos);
  CHECK(r.out.find("node_rank=2 (RANK)") != std::string::npos);
  CHECK(r.out.find("rdzv_endpoint=mnist-master-0:23456 (MASTER_ADDR, MASTER_PORT)") != std::string::npos);
  auto bad = run(runArgs({"--dry-run", "--nnodes", "4", "--", "true"}),
                 withEnv({{"KUBERNETES_SERVICE_HOST", "10.96.0.1"}, {"MASTER_ADDR", "m"}, {"WORLD_SIZE", "3"},
                          {"RANK", "2"}}));
  CHECK(bad.exitCode == 3);
  CHECK(bad.err.find("--nnodes 4 contradicts the Kubernetes job: WORLD_SIZE=3") != std::string::npos);
}
