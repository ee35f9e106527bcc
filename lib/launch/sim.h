// `dtrain sim`: a multi-node job rehearsed on one machine (docs/sim.md).
//
// N virtual nodes, each a real `dtrain run` agent (elastic: --nnodes 1:TOTAL, --rdzv-backend store) with its own
// workers, in its own network namespace on a shaped link (sim_net.h), around one standalone `dtrain store` in the
// hub namespace, so that any node may die without taking the rendezvous with it. A fault schedule
// (sim_faults.h) kills, freezes, partitions, slows and adds nodes at given times. When the job ends (or fails, or
// --timeout passes, or Ctrl-C), everything the sim started is stopped and every namespace is gone: the agents
// and the store carry the marker of this process's ProcessTree (its watchdog stops them even if the sim is
// SIGKILLed; each agent's own watchdog then stops its workers), the namespace holders die with the sim.
//
// What it measures (sim_report.h): every worker logs the samples of each optimizer step (DTRAIN_SAMPLE_LOG,
// with a wall-clock time), every agent's output is timestamped as it arrives; from these come throughput per
// node count, each fault's detection and recovery time, steps redone, samples repeated or skipped, and the bytes
// of every link from the interface counters.
//
// Thread-safety: runSim is called from the main thread of a process that runs nothing else (it becomes a child
// subreaper and blocks SIGINT/SIGTERM to read them through a signalfd). Blocking: until the job ends or --timeout.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "lib/launch/sim_faults.h"

namespace dtrain::launch {

struct SimOptions {
  int nodes = 2;                     // initial nodes (--nodes)
  int nprocPerNode = 1;              // workers per node (--nproc-per-node)
  std::string link;                  // tc rate of every link ("" = unshaped)
  std::vector<SimFault> faults;      // --faults, parsed
  std::vector<std::string> program;  // what each agent runs: {"JOB.json", args...} or {"--", PROGRAM, args...}
  bool isJob = true;                 // program is a job file (the built-in trainer: sample logs, report)
  std::string outputDir;             // logs, sample logs, the job's --output-dir (run/)
  std::string report;                // --report FILE.svg|FILE.html ("" = none)
  std::string exe;                   // the dtrain binary the agents and the store run
  std::chrono::milliseconds heartbeatTimeout{std::chrono::seconds(3)};
  std::chrono::milliseconds lastCall{std::chrono::seconds(2)};
  std::chrono::milliseconds shutdownTimeout{std::chrono::seconds(3)};
  std::chrono::milliseconds timeout{std::chrono::minutes(10)};  // the whole sim
  int maxRestarts = 3;
  // The agents' MIN in --nnodes MIN:TOTAL; 0: simSurvivingNodes (the initial nodes less those faults may take
  // away). `dtrain sim JOB.json` lowers it to the largest node count at or below that which the job can run
  // (pipeline stages x tensor must divide the world), so that the survivors of a kill form a round with a spare
  // instead of waiting for a count that never comes.
  int minNodes = 0;
  std::string minNodesNote;  // printed after the sim's first line when minNodes was lowered: why
  bool loopback = false;  // --loopback: no namespaces even as root
  bool verbose = false;   // echo every agent line, prefixed with its node
};

// Throws UsageError for options that cannot work (partition/slow/--link without namespaces is a warning, not an
// error: the sim says what it leaves out). Returns the exit code: 0 when the job finished and no sample was
// repeated or skipped, 1 when it finished with samples repeated or skipped, the survivors' failing exit code (or 4
// when --timeout passed) otherwise; 130 on SIGINT, 143 on SIGTERM.
int runSim(const SimOptions& options);

}  // namespace dtrain::launch
