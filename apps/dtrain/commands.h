// Each subcommand lives in its own file and registers itself on the root CLI11 app. Parsing only: the work
// is done by the libraries. A subcommand's callback stores the action main() runs after parsing succeeded.
#pragma once

#include <CLI/CLI.hpp>

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "lib/common/error.h"
#include "lib/launch/monitor_endpoints.h"

namespace dtrain::app {

using Action = std::function<int()>;

// A count flag's check: an integer >= 1, and a message that says so ("--repeats: expected an integer >= 1, got 0";
// CLI11's PositiveNumber says "Value 0 not in range 0.000000 to 1797...").
inline CLI::Validator atLeastOne() {
  return CLI::Validator(
      [](std::string& value) -> std::string {
        long long n = 0;
        size_t used = 0;
        try {
          n = std::stoll(value, &used);
        } catch (const std::exception&) {
          used = 0;
        }
        if (used == 0 || used != value.size() || n < 1) return "expected an integer >= 1, got " + value;
        return {};
      },
      "INT>=1");
}

// One line of a command's "Exit codes" help: a code as README.md's table writes it ("0", "126 / 127", "128+N",
// "other", and "10" for `dtrain top`), and what it means for this command ("" : the table's meaning).
struct ExitCodeHelp {
  std::string code;
  std::string meaning;
};
// The "Exit codes" section of a command's --help (its footer), one line per code in the order given. Every
// command lists the codes it can return: 0, 1 (an internal error) and 3 (its command line) at least. Throws
// std::logic_error for a code the table does not have. exit_codes.cpp.
std::string exitCodesHelp(const std::vector<ExitCodeHelp>& codes);

void addRunCommand(CLI::App& root, Action& action);
// Before CLI11 parses `dtrain run ...`: removes the worker's command line (JOB.json... or PROGRAM...) from
// `args` (argv as strings, argv[0] included) and hands it to the run command.
std::vector<std::string> splitWorkerArgs(CLI::App& root, std::vector<std::string>& args);
void addStoreCommand(CLI::App& root, Action& action);
// The store's shared secret from --rdzv-token (or DTRAIN_RDZV_TOKEN, through the flag's envname) or
// --rdzv-token-file (its first line); "" when neither is given. Throws UsageError for both, or an unreadable or
// empty file. cmd_store.cpp.
std::string resolveRdzvToken(const std::string& token, const std::string& tokenFile);
void addTrainCommand(CLI::App& root, Action& action);
void addCheckCommand(CLI::App& root, Action& action);
void addBenchCommand(CLI::App& root, Action& action);
void addCkptCommand(CLI::App& root, Action& action);
void addDebugCommand(CLI::App& root, Action& action);  // cmd_debug.cpp: `dtrain debug dump RUN_ID`
void addGenerateCommand(CLI::App& root, Action& action);  // cmd_generate.cpp
void addPlotCommand(CLI::App& root, Action& action);  // cmd_plot.cpp: `dtrain plot RUN_DIR...`
void addTopCommand(CLI::App& root, Action& action);   // cmd_top.cpp: `dtrain top RUN_ID`
void addSimCommand(CLI::App& root, Action& action);   // cmd_sim.cpp: `dtrain sim --nodes N JOB.json`
// Before CLI11 parses `dtrain sim ...`: removes what the agents run (JOB.json... or -- PROGRAM...) from `args`.
void splitSimArgs(std::vector<std::string>& args);
// What the store at `endpoint` holds about run `runId` (cmd_debug.cpp), read in one round trip: the "host:port"
// monitoring endpoints its agents published (agents with --metrics-port or --dashboard: one line per agent start,
// read by launch::currentMonitorEndpoints: ordered by address, without the endpoints that an agent's restart left
// behind, which go to `superseded`) and, once the job ended, the `ended` record its agents wrote
// (rendezvous::RoundEvent JSON; absent when they were killed or lost the store).
// Throws StoreNotAnswering when nothing answers at the endpoint: at once when the connection is refused (not
// retried), else within `timeout` (the store is gone with its job, or not started), StoreAuthError (exit 4) for a wrong or missing token,
// RendezvousError (exit 4) when no agent ever joined `runId` on that store, UsageError for a bad endpoint.
struct MonitoredRun {
  std::vector<std::string> agents;
  std::vector<launch::SupersededEndpoint> superseded;
  std::optional<std::string> ended;
};
// `dtrain top`'s exit code when the job is not running: it ended (its end record in the store), or its store or
// every agent does not answer (docs/monitoring.md). Not a `dtrain run` code: README's table leaves 10 free for it.
inline constexpr int kExitJobNotRunning = 10;
class StoreNotAnswering : public RendezvousError {
 public:
  using RendezvousError::RendezvousError;
};
MonitoredRun readMonitoredRun(const std::string& runId, const std::string& endpoint, const std::string& token,
                              std::chrono::milliseconds timeout);
// The one line `dtrain top` and `dtrain debug dump` print (stdout) for a job that is not running, `command` first:
// its store does not answer (storeSilentLine), or it ended with the end record `record` (endedLine; a record this
// dtrain cannot read still says it ended). Pure formatting; thread-safe.
std::string storeSilentLine(const std::string& command, const std::string& runId, const std::string& endpoint,
                            const StoreNotAnswering& e);
std::string endedLine(const std::string& command, const std::string& runId, const std::string& record);
// The line for a run none of whose agents answered (`silent`: each one's "host:port: reason"): reads the store once
// more (readMonitoredRun, up to `timeout`) and returns endedLine's line when the job ended meanwhile (its agents
// record the end before they exit), storeSilentLine's when the store is gone too, else "COMMAND: run ID is not
// running: none of its agents answers (...), and its store at ADDR records no end of the job: ...". Throws what
// readMonitoredRun throws other than StoreNotAnswering.
std::string agentsSilentLine(const std::string& command, const std::string& runId, const std::string& endpoint,
                             const std::string& token, std::chrono::milliseconds timeout,
                             const std::vector<std::string>& silent);
// Resolves --rdzv-token / --rdzv-token-file into `token` (resolveRdzvToken) and returns nothing; returns
// storeSilentLine's line instead when the token file is missing and nothing answers at `endpoint` (`dtrain run
// --standalone` removes the token file it logged when its store stops: the run is over, not a wrong flag).
// Blocks up to `timeout` in that case only. Throws resolveRdzvToken's UsageError otherwise.
std::optional<std::string> tokenOrNotRunning(const std::string& command, const std::string& runId,
                                             const std::string& endpoint, const std::string& tokenFlag,
                                             const std::string& tokenFile, std::chrono::milliseconds timeout,
                                             std::string& token);
// One agent's answer to askAgents: the body of a 200 reply, or what went wrong ("HTTP status 404", the
// connection refused, no complete reply within the timeout).
struct AgentReply {
  std::string agent;  // "host:port"
  std::optional<std::string> body;
  std::string error;  // when !body
};
// GET `target` from every agent of `agents` ("host:port"), at most kMaxAgentProbes at a time, each bounded by
// `timeout` (launch::httpGet: connect, request and reply; a refused connection fails at once). Blocks until all are
// answered or timed out: about `timeout` at most for up to kMaxAgentProbes agents, whatever number does not answer.
// Returns one reply per agent, in the order of `agents`. Never throws for an agent's failure (it is in `error`);
// throws std::system_error only when not even one thread can be started. Thread-safe.
inline constexpr size_t kMaxAgentProbes = 64;
std::vector<AgentReply> askAgents(const std::vector<std::string>& agents, const std::string& target,
                                  std::chrono::milliseconds timeout);
// The line `dtrain top` and `dtrain debug dump` print for an endpoint an agent's restart left in the store:
// "agent OLD (node rank R, pid P): superseded by its restart at NEW (pid Q), not asked". Pure formatting.
std::string supersededLine(const launch::SupersededEndpoint& s);

// `dtrain bench <what>`: cmd_bench.cpp creates the `bench` group; each benchmark adds itself to it.
void addBenchStore(CLI::App& bench, Action& action);        // cmd_bench_store.cpp
void addBenchRdzv(CLI::App& bench, Action& action);         // cmd_bench_store.cpp (rendezvous at scale)
void addBenchCollectives(CLI::App& bench, Action& action);  // cmd_bench_comm.cpp (allreduce, broadcast, ...)

}  // namespace dtrain::app
