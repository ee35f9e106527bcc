// LaunchOptions' plan, as `dtrain run --dry-run` prints it (scripts and the Slurm tier read these lines).
#include <doctest/doctest.h>

#include "lib/launch/launch_options.h"

using namespace dtrain::launch;

TEST_CASE("launch plan: defaults, then every field resolved") {
  LaunchOptions o;
  o.program = {"python", "train.py", "--lr", "0.1"};
  CHECK(o.plan() ==
        "nnodes=1 nproc_per_node=1 node_rank=-1 rdzv_backend=static rdzv_endpoint=- rdzv_id=none max_restarts=0 max_reforms=100\n"
        "program=python train.py --lr 0.1");
  o.nnodesText = "2:4";
  o.nproc = 8;
  o.nodeRank = 1;
  o.rdzvBackend = "store";
  o.rdzvEndpoint = "node0:29400";
  o.rdzvId = "job42";
  o.maxRestarts = 3;
  CHECK(o.plan() ==
        "nnodes=2:4 nproc_per_node=8 node_rank=1 rdzv_backend=store rdzv_endpoint=node0:29400 rdzv_id=job42 "
        "max_restarts=3 max_reforms=100\nprogram=python train.py --lr 0.1");
}
