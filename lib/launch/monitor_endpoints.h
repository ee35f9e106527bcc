// The agents' monitoring endpoints in the run's store, through which `dtrain top` and `dtrain debug dump` find a
// running job's agents (docs/monitoring.md). Each agent started with --metrics-port (or --dashboard) appends one
// line to kMonitorAgentsKey when it starts, before it joins:
//
//   HOST:PORT node_rank=R pid=P hostname=NAME\n
//
// (R: its --node-rank, -1 when not given; the fields after HOST:PORT are space-separated key=value pairs, and
// readers skip keys they do not know). An agent that restarts appends a new line and leaves its old one: the key
// is append-only, as its writers may be killed at any time. Readers therefore pick the current endpoints
// (currentMonitorEndpoints): a later line with the same HOST:PORT replaces an earlier one (a restart on a fixed
// --metrics-port), and a later line with the same --node-rank (>= 0) supersedes an earlier one at another
// address (a restart on --metrics-port 0, or on another machine): that node's old agent is gone, and probing its
// endpoint cost each frame of `dtrain top` a connect timeout. Agents without a --node-rank cannot be told apart
// from a second agent on the same host, so their old endpoints stay listed (they are refused at once, or answer).
// Lines of dtrain before this format ("HOST:PORT" alone) read as agents without a --node-rank.
//
// Pure functions of their arguments: thread-safe, no I/O, never throw (a line that is not HOST:PORT... is skipped).
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace dtrain::launch {

// The store key (under /dtrain/<run_id>/) where agents with --metrics-port append their registration line.
inline constexpr const char* kMonitorAgentsKey = "monitor/agents";

// One agent's registration.
struct MonitorEndpoint {
  std::string address;   // "HOST:PORT" of its /metrics
  int nodeRank = -1;     // its --node-rank, or -1
  int pid = 0;           // the agent's pid on its host; 0 when unknown (an old line)
  std::string hostname;  // its host's name; empty when unknown
};

// The line an agent appends (with its '\n').
std::string monitorEndpointLine(const MonitorEndpoint& endpoint);

// An endpoint left by an agent that restarted, and the registration of the same --node-rank that replaced it.
struct SupersededEndpoint {
  MonitorEndpoint old;
  MonitorEndpoint by;
};

struct MonitorEndpoints {
  std::vector<MonitorEndpoint> current;        // the ones to probe, ordered by address
  std::vector<SupersededEndpoint> superseded;  // not probed, ordered by old.address
};

// The current endpoints of the key's value `text` (lines in append order; see the header comment).
MonitorEndpoints currentMonitorEndpoints(std::string_view text);

}  // namespace dtrain::launch
