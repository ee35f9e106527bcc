// What every launcher detection shares (Slurm in slurm.h; MPI launchers and Kubernetes operators in
// cluster_env.h): reading counts from an environment map with their source, the --dry-run lines, and merging a
// detected placement (node count, node rank, run id, endpoint) into the launch options, where an explicit flag
// that contradicts the launcher is a UsageError naming both. Pure functions of their arguments: unit-tested
// without a cluster.
#pragma once

#include <initializer_list>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "lib/launch/launch_options.h"

namespace dtrain::launch {

using Environment = std::map<std::string, std::string>;

// This process's environment as a map. Reads `environ`: not safe against a concurrent setenv.
Environment processEnvironment();

// A value derived from the environment and where it came from ("SLURM_STEP_NUM_NODES"), for --dry-run.
template <typename T>
struct Derived {
  std::optional<T> value;
  std::string from;
  bool has() const { return value.has_value(); }
};

// One environment variable as read (value trimmed).
struct EnvVar {
  std::string name;
  std::string value;
};

// Why a detection reads the variables, for its error messages: `reason` ("SLURM_JOB_ID is set") and how to turn
// the detection off ("DTRAIN_SLURM=0 turns Slurm detection off").
struct EnvReason {
  std::string reason;
  std::string offSwitch;
};

// The first of `names` set to a non-empty (after trimming) value; nullopt when none is.
std::optional<EnvVar> firstSet(const Environment& env, std::initializer_list<const char*> names);

// `v` as an integer >= min. Throws UsageError naming the variable, its value, the bound and `why`.
int toCount(const EnvVar& v, int min, const EnvReason& why);

// firstSet + toCount: empty when none of `names` is set.
Derived<int> countFrom(const Environment& env, std::initializer_list<const char*> names, int min,
                       const EnvReason& why);

// Appends "name=value (source)\n" when `d` has a value (the --dry-run form).
template <typename T>
void describeLine(std::string& out, const char* name, const Derived<T>& d) {
  if (d.has()) out += fmt::format("{}={} ({})\n", name, *d.value, d.from);
}

// Which launch options the user gave (as a flag or a DTRAIN_* variable); the others may come from a launcher.
// rdzvEndpoint counts --master-addr too (cmd_run turns it into the endpoint).
struct GivenOptions {
  bool nnodes = false;
  bool nproc = false;
  bool nodeRank = false;
  bool rdzvEndpoint = false;
  bool rdzvId = false;
};

// How a launcher is named in contradiction messages, e.g. Slurm's "the Slurm allocation" (owner of the node
// count), "the Slurm step" (owner of node ranks) and the advice after each; MPI uses "the MPI launch" for both.
struct LauncherTerms {
  std::string nodesOwner;
  std::string rankOwner;
  std::string nnodesAdvice;  // "drop --nnodes inside Slurm, or change the allocation"
  std::string rankAdvice;    // "inside Slurm every node's rank comes from Slurm; drop --node-rank"
};

// What a launcher says about where this agent sits; any field may be empty.
struct Placement {
  const Derived<int>& nnodes;
  const Derived<int>& nodeRank;
  const Derived<std::string>& runId;
  const Derived<std::string>& rdzvEndpoint;
};

// Merges `p` into `options` (before options.validate()) and appends a --dry-run line "name=value (source)" to
// `lines` for each value decided or checked: fills nnodesText, nodeRank, rdzvId and rdzvEndpoint where the user
// gave none; explicit values stay unless they contradict the launcher, which throws UsageError naming both
// ("--nnodes 4 contradicts the Slurm allocation: SLURM_STEP_NUM_NODES=2 (...)"): --nnodes outside the node count,
// --node-rank other than the launcher's, --standalone with more than one node. The endpoint is derived only for
// the static backend (a standalone store, the store/c10d backends and etcd live where the user says).
void applyPlacement(const Placement& p, const LauncherTerms& terms, const GivenOptions& given, LaunchOptions& options,
                    std::vector<std::string>& lines);

}  // namespace dtrain::launch
