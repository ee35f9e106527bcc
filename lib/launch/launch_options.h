// What `dtrain run` was asked to do, after CLI parsing and before anything starts. Validation happens here so
// that every bad input is rejected, with the flag and the value named, before a store or a worker exists.
#pragma once

#include <chrono>
#include <filesystem>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "rendezvous/etcd_store.h"

namespace dtrain::launch {

using Millis = std::chrono::milliseconds;

// Which of a worker's streams go to files only (redirect) or to files and the console (tee); torchrun's
// codes: 0 none, 1 stdout, 2 stderr, 3 both. Per local rank, with a default for ranks not listed.
struct StreamChoice {
  int all = 0;
  std::map<int, int> perRank;
  int forRank(int localRank) const;
  // "3" or "0:1,1:2"; throws UsageError naming `flag`.
  static StreamChoice parse(const std::string& flag, const std::string& value);
};

struct LaunchOptions {
  // As typed (for messages and --dry-run) and resolved.
  std::string nnodesText = "1";
  int minNodes = 1;
  int maxNodes = 1;
  std::string nprocText = "1";
  int nproc = 1;
  int nodeRank = -1;              // -1: not given
  std::string rdzvEndpoint;       // host[:port]; empty: 127.0.0.1:29400 for a single node
  std::string rdzvBackend = "static";  // static: node rank 0 hosts the store; store: a standalone store
  // The backend was spelt c10d (torchrun's name, where the agent at the endpoint hosts the store); validate() turns it
  // into "store" (a standalone `dtrain store`, hosted by no agent), and the agent says so in those words.
  bool rdzvBackendC10d = false;
  std::string rdzvId = "none";
  bool standalone = false;
  // Shared secret of the store (--rdzv-token, --rdzv-token-file, DTRAIN_RDZV_TOKEN); generated under --standalone.
  std::string rdzvToken;
  std::string rdzvTokenFile;  // the file rdzvToken was read from, if any (absolute): --standalone's log names it
  std::string rdzvBind;  // --rdzv-bind: address the hosted store listens on; empty: derived (storeBindHost)
  // --rdzv-conf KEY=VALUE,... (torchrun's): with --rdzv-backend etcd, protocol (http|https), cacert, cert, key
  // (PEM files), user, password (or DTRAIN_ETCD_PASSWORD). Checked by validate().
  std::string rdzvConf;
  int maxRestarts = 0;
  int maxReforms = 100;  // --max-reforms: re-formations (membership changes) allowed per job
  Millis shutdownTimeout{std::chrono::seconds(30)};
  Millis rdzvTimeout{std::chrono::seconds(900)};
  Millis lastCall{std::chrono::seconds(30)};
  Millis heartbeatInterval{std::chrono::seconds(1)};
  Millis heartbeatTimeout{std::chrono::seconds(5)};
  std::string localAddr;          // address other nodes reach this node at (MASTER_ADDR when node 0)
  std::string logDir;
  StreamChoice redirects;
  StreamChoice tee;
  std::vector<int> localRanksFilter;  // empty: all
  std::vector<std::string> program;   // argv of the worker program (argv[0] as typed)
  std::string programPath;            // resolved executable
  // Monitoring (docs/monitoring.md): --metrics-port serves /metrics on --metrics-bind; -1: off, 0: a free port.
  int metricsPort = -1;
  std::string metricsBind = "0.0.0.0";
  std::string jobName;  // the `job` label: the job's name, or the program's basename
  // The workers are dtrain's own trainer (`dtrain run JOB.json`): a worker exits 0 only when its training
  // completed (a stop signal makes it checkpoint and exit 128+signal), so a Ctrl-C that reaches the agent while the
  // workers exit after writing the model does not turn the completed job into 130 (round_policy.h).
  bool trainerWorkers = false;
  // The workers are this dtrain (trainerWorkers, or `-- dtrain bench ...`: programPath is /proc/self/exe's file),
  // set by validate(). Their exit codes follow README's table, so a worker's 3 is a usage error that no restart
  // cures (round_policy.h); another program's 3 is its own and is restarted like any failure.
  bool dtrainWorkers = false;
  // The job's parameter servers ("parallel": {"strategy": "parameter_server", "servers": S}); 0: no roles. The
  // workers' environment then carries ROLE_NAME=server|worker, ROLE_RANK, ROLE_WORLD_SIZE (ps_placement.h).
  int psServers = 0;
  // The parameter servers run in "async" or "ssp" mode: a failed worker other than worker 0 (the chief, which
  // writes checkpoints and the model) does not end the round; the servers and the other workers go on without it
  // (TensorFlow's ParameterServerStrategy; docs/parameter_server.md "Failures").
  bool psWorkersExpendable = false;
  // Elastic launches: the node counts in --nnodes MIN..MAX whose world the job cannot run (dtrain run computes
  // them from the job file: train::unusableNodeCounts). Rounds close with the largest usable count; the nodes
  // beyond it wait as spares (rendezvous::RendezvousOptions::unusableNodes).
  std::vector<int> unusableNodes;
  // --timeline FILE.json: this agent writes every node's timeline there at the end (lib/launch/timeline.h).
  std::string timelineFile;
  // --dashboard PORT: a live page of the run's curves (lib/launch/dashboard.h); -1: off, 0: a free port.
  int dashboardPort = -1;

  // Throws UsageError (bad flag values, contradictions) or Error with kNotFound/kNotExecutable (program).
  void validate();
  // The etcd client settings of --rdzv-backend etcd: the endpoints, TLS (https:// endpoints or protocol=https)
  // and files (absolute paths), and credentials from --rdzv-conf. Call after validate().
  rendezvous::EtcdStoreOptions etcdOptions() const;
  // Whether this agent hosts the store: --standalone, or the static backend's node rank 0 (or a single node).
  bool hostsStore() const;
  // The address a store hosted by this agent listens on: --rdzv-bind if given; 127.0.0.1 under --standalone;
  // else the endpoint's host (127.0.0.1 when no endpoint), so the store is not exposed on every interface. One
  // exception keeps multi-node jobs working: an endpoint NAME that resolves to a loopback address here (the
  // Debian /etc/hosts 127.0.1.1 entry for the own hostname) while other nodes must reach it binds 0.0.0.0.
  std::string storeBindHost() const;
  // "<16 hex> `<program summary>`": SHA-256 of the program's basename, its arguments and --nnodes, so two
  // different jobs started with the same --rdzv-id on one store are told apart (the path of the program is
  // left out: nodes may install it in different places).
  std::string jobFingerprint() const;
  // The resolved launch plan as `dtrain run --dry-run` prints it: "nnodes=... max_restarts=N\nprogram=..."
  // (rdzv_id=random under --standalone without --rdzv-id: the agent draws one per run; node_rank=0 without
  // --node-rank on a single node, node_rank=join-order on several: ranks follow the order of joining).
  std::string plan() const;
};

// "N" or "MIN:MAX" -> {min, max}; throws UsageError.
std::pair<int, int> parseNnodes(const std::string& value);
// "N" | "auto" | "cpu" | "gpu" -> count; throws UsageError.
int resolveNproc(const std::string& value);
// Comma list of non-negative integers ("0,1"); throws UsageError naming flag.
std::vector<int> parseIntList(const std::string& flag, const std::string& value);
// PATH lookup as execvp would do; throws Error(kNotFound / kNotExecutable) with a clear message.
std::string resolveProgram(const std::string& program);
// Whether the first word after `dtrain run` / `dtrain sim`'s options names a job file: it ends in ".json", in any
// case (JOB.JSON was looked for as a program), with a name before it.
bool isJobFileName(const std::string& word);
// GPUs visible to this process (CUDA_VISIBLE_DEVICES, else the driver's: driverGpuCount); 0 when none. Counted
// without starting CUDA (the agent forks workers), by countVisibleDevices' reading of the variable.
int visibleGpuCount();
// The GPUs the NVIDIA driver has: the entries of `procGpus` (/proc/driver/nvidia/gpus) where that folder exists, else
// the device nodes nvidia<N> in `dev` (/dev; where /proc/driver/nvidia is absent, as under gVisor's nvproxy, the
// CUDA runtime still sees the GPUs through them); 0 when neither lists any. Never throws.
int driverGpuCount(const std::filesystem::path& procGpus, const std::filesystem::path& dev);
// The GPUs a CUDA_VISIBLE_DEVICES value leaves visible, read as the CUDA runtime reads it: entries (indices, or
// GPU-/MIG- UUIDs) are taken in order up to the first invalid one, which ends the list: an empty entry, anything
// else that is not an index, a negative index, an index repeated, or (when driverGpus > 0: the GPUs the driver
// lists) an index beyond the driver's GPUs. So "0,1,-1,2" is 2 GPUs, "" and "-1" none, "0,7" on 2 GPUs one.
int countVisibleDevices(std::string_view value, int driverGpus);
int usableCpuCount();
// Output paths named by flags, checked before anything starts so a typo is a usage error (UsageError, exit 3)
// naming the flag and the path, not a failure once the job ran. checkCreatableDir: `dir` is a folder, or its
// nearest existing ancestor is a writable folder (it is created later). checkWritableFile: `file` is not a
// folder and its folder exists and is writable. Only stat and access(2) calls.
void checkCreatableDir(std::string_view flag, const std::string& dir);
void checkWritableFile(std::string_view flag, const std::string& file);

}  // namespace dtrain::launch
