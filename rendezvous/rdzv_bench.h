// The rendezvous-at-scale benchmark behind `dtrain bench rdzv` (figures in docs/store.md,
// scripts/bench/rdzv_scale): `agents` simulated agents, one thread and one store connection each, join ONE
// rendezvous round through the real Rendezvous code (min = max = agents), then heartbeat every `interval` for
// `beats` beats, each beat being Rendezvous::beat (bump our counter and read the watched members' counters in
// one batch), as an agent's round loop does. The beats of different agents are spread evenly over the
// interval, as independent agents' timers are. Against a store started in this process (when `address` is
// empty) or a running store (`dtrain store`).
//
// Reports: connect time, time to form the round (from the moment all connected agents start joining until the
// last join returns), per-agent join latency, and latency percentiles of the heartbeat and the membership read.
// Blocking; throws the first agent's error (a join that timed out, a lost store). Needs about 2 descriptors per
// agent with an in-process store (RLIMIT_NOFILE is raised to its hard limit).
#pragma once

#include <chrono>
#include <string>

#include "rendezvous/store.h"
#include "rendezvous/store_bench.h"

namespace dtrain::rendezvous {

struct RdzvBenchOptions {
  std::string address;  // HOST:PORT of a running store; "": one in this process on loopback
  int agents = 4096;    // >= 1
  int nprocPerAgent = 8;
  int beats = 5;                               // heartbeats per agent after the round formed
  Millis interval{std::chrono::seconds(1)};    // heartbeat interval
  Millis connectTimeout{std::chrono::seconds(120)};
  Millis joinTimeout{std::chrono::seconds(300)};
};

struct RdzvBenchResult {
  std::string address;
  bool inProcess = false;
  double connectSeconds = 0;  // until every agent had its connection
  double formSeconds = 0;     // start of join -> the last agent's join returned
  double joinP50Ms = 0, joinP99Ms = 0, joinMaxMs = 0;  // per agent: its join() call
  int worldSize = 0;
  double beatSeconds = 0;  // the heartbeat phase
  OpFigures heartbeat;     // Rendezvous::beat: one set and the watched members' reads, one batch
  double joinRoundTripsPerAgent = -1;  // store round trips of an agent's join() (TCP stores), mean over agents
  double beatRoundTripsPerAgent = -1;  // ... of one beat
  double formCpuSeconds = 0;    // this process's CPU (all agents, and the in-process store) while the round formed
  double formStoreCpuSeconds = -1;  // in-process store only: its io thread's share of formCpuSeconds
  double peakRssMiB = 0;        // this process's peak resident memory (VmHWM): the agents' state (and the store's)
  uint64_t storeRequests = 0;   // in-process store only: requests served over the whole run
  uint64_t storeReplyWrites = 0;  // in-process store only: reply writes (about the round trips) over the run
  double storeCpuSeconds = -1;  // in-process store only: CPU of its io thread over the whole run
};

RdzvBenchResult runRdzvBenchmark(const RdzvBenchOptions& options);

}  // namespace dtrain::rendezvous
