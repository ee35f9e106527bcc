// The fault schedule of `dtrain sim --faults` (docs/sim.md): what happens to which virtual node, and when.
//
// Grammar: entries separated by ',' or ';', each one of
//   kill:nodeK@T          SIGKILL node K's agent and every process under it at T (the node is gone for good)
//   freeze:nodeK@T+D      SIGSTOP node K's agent and its processes at T, SIGCONT them at T+D
//   partition:nodeK@T+D   cut node K's link (its bridge port goes down) at T, restore it at T+D
//   slow:nodeK=RATE[@T]   shape node K's link to RATE (tc tbf, "10mbit", "1gbit") from T (default: the start)
//   join:nodeK@T          start node K's agent at T: K must be the next node after the initial --nodes ones
//   delay:nodeK=D         every message node K's workers send over the TCP transport leaves D after it is ready
//                         (DTRAIN_LINK_DELAY, lib/comm/tcp/conn.h: dtrain's own latency, this kernel has no netem);
//                         from the start, for every agent node K runs
//   loss:nodeK=P%[@T]     drop P percent of node K's packets in each direction (iptables statistic mode in its
//                         namespace) from T (default: the start); needs namespaces and iptables
// T and D are durations as the other flags take them ("5s", "500ms", "2m"), measured from the moment the initial
// agents are started; or T is "stepN": the moment the job has completed optimizer step N (job files only: read
// from the workers' sample logs), which lands a fault at the same point of training however fast the machine is. Nodes are numbered from 0: --nodes 4 makes node0..node3; joins add node4, node5, ...
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace dtrain::launch {

enum class SimFaultKind { kKill, kFreeze, kPartition, kSlow, kJoin, kDelay, kLoss };

struct SimFault {
  SimFaultKind kind = SimFaultKind::kKill;
  int node = 0;
  std::chrono::milliseconds at{0};
  int64_t atStep = -1;                    // >= 0: fire once the job completed this optimizer step (instead of `at`)
  std::chrono::milliseconds duration{0};  // freeze and partition
  std::string rate;                       // slow
  std::chrono::milliseconds delay{0};     // delay
  double lossPercent = 0;                 // loss: 0 < P < 100
  std::string text;                       // the entry as typed, for the report
  double firedAt = -1;                    // set by the sim: seconds since the start when it was applied
};

// Parses the schedule for a sim of `initialNodes` nodes. Throws UsageError naming --faults, the entry and what was
// expected: unknown kinds, node numbers out of range, joins that skip a number or name an existing node, a node
// killed or joined twice, a freeze/partition without +D, a bad rate, a delay with @T or given twice for a node, a
// loss outside (0, 100)%.
std::vector<SimFault> parseSimFaults(const std::string& text, int initialNodes);

// The delay:nodeK=D of node `node`, zero when none.
std::chrono::milliseconds simLinkDelay(const std::vector<SimFault>& faults, int node);

// The total number of nodes (initial plus joined).
int simTotalNodes(const std::vector<SimFault>& faults, int initialNodes);

// The initial nodes less those a kill, freeze or partition may take away (at least 1): the fewest nodes the
// survivors of the schedule's faults may have to form a round with.
int simSurvivingNodes(const std::vector<SimFault>& faults, int initialNodes);

const char* simFaultName(SimFaultKind kind);

// A tc rate ("10mbit", "1gbit", "500kbit", "100mbps"): digits then a unit tc knows. Throws UsageError naming `what`.
void checkTcRate(const std::string& rate, const std::string& what);

}  // namespace dtrain::launch
