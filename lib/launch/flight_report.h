// Hang diagnosis from the workers' flight recorders (lib/common/worker_metrics.h): each rank's last collective
// calls, gathered from the shared blocks by the agent (its own node) or from every agent's /debug/flight.json
// (`dtrain debug dump RUN_ID`), and the answer to "which rank hangs, and where".
//
// Calls are numbered per process in the order they begin; the built-in trainer issues the same collectives in
// the same order on every rank, so call #n is the same operation everywhere. A rank whose last call number is
// below the others' has not reached the collective they wait in: it is behind (stuck in computation, frozen,
// or dead), and the report names its step and its last call.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "lib/common/worker_metrics.h"

namespace dtrain::launch {

struct FlightCall {
  uint64_t seq = 0;
  std::string op;  // "allreduce", ...
  uint64_t bytes = 0;
  int64_t step = 0;     // optimizer step in progress when it began
  int64_t startNs = 0;  // Unix time
  int64_t endNs = 0;    // 0: in flight
  std::string group;
};

struct RankFlight {
  int rank = -1;
  int node = 0;
  int pid = 0;
  int64_t stepsDone = 0;
  std::vector<FlightCall> calls;  // oldest first
};

// A consistent-enough copy of one block's recorder (entries being rewritten are skipped).
RankFlight readFlight(const WorkerMetricsBlock& block, int node);
nlohmann::json toJson(const RankFlight& r);
RankFlight rankFlightFromJson(const nlohmann::json& j);  // throws nlohmann::json exceptions on bad input

// The report: one line per rank (where it is), then the verdict (who is behind, at which call and step).
// `nowNs`: Unix time, ns, for the waiting times.
//
// `earlier`: the same ranks read `earlierSeconds` before `ranks` (`dtrain debug dump` reads twice). One read cannot
// tell a running job from a hung one: a moving job's ranks are caught inside collectives, or one a call ahead of
// another, and the verdict called the transport suspect, or a rank behind. With two, a rank that began or finished
// a call or a step in between is moving; when every rank moved the verdict says the job is running (no rank named),
// otherwise the usual verdict follows, with which ranks moved and which did not.
std::string analyzeFlight(std::vector<RankFlight> ranks, int64_t nowNs, const std::vector<RankFlight>* earlier = nullptr,
                          double earlierSeconds = 0);
int64_t unixNowNs();

}  // namespace dtrain::launch
