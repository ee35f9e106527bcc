#include "lib/launch/launcher_env.h"

#include <climits>

#include "lib/common/error.h"
#include "lib/common/parse.h"

extern char** environ;

namespace dtrain::launch {

Environment processEnvironment() {
  Environment env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    std::string_view kv(*e);
    auto eq = kv.find('=');
    if (eq == std::string_view::npos) continue;
    env.emplace(std::string(kv.substr(0, eq)), std::string(kv.substr(eq + 1)));
  }
  return env;
}

std::optional<EnvVar> firstSet(const Environment& env, std::initializer_list<const char*> names) {
  for (const char* n : names) {
    auto it = env.find(n);
    if (it != env.end() && !parse::trim(it->second).empty()) return EnvVar{n, std::string(parse::trim(it->second))};
  }
  return std::nullopt;
}

int toCount(const EnvVar& v, int min, const EnvReason& why) {
  auto n = parse::toInt(v.value);
  DTRAIN_CHECK_AS(UsageError, n && *n >= min && *n <= INT_MAX,
                  "environment variable {}={}: expected an integer >= {} (dtrain reads it because {}; {})", v.name,
                  v.value, min, why.reason, why.offSwitch);
  return static_cast<int>(*n);
}

Derived<int> countFrom(const Environment& env, std::initializer_list<const char*> names, int min,
                       const EnvReason& why) {
  Derived<int> d;
  if (auto v = firstSet(env, names)) {
    d.value = toCount(*v, min, why);
    d.from = v->name;
  }
  return d;
}

void applyPlacement(const Placement& p, const LauncherTerms& terms, const GivenOptions& given, LaunchOptions& o,
                    std::vector<std::string>& lines) {
  const auto& nn = p.nnodes;
  if (given.nnodes) {
    auto [lo, hi] = parseNnodes(o.nnodesText);
    if (nn.has())
      DTRAIN_CHECK_AS(UsageError, lo <= *nn.value && *nn.value <= hi, "--nnodes {} contradicts {}: {}={} ({})",
                      o.nnodesText, terms.nodesOwner, nn.from, *nn.value, terms.nnodesAdvice);
    lines.push_back(fmt::format("nnodes={} (--nnodes)", o.nnodesText));
  } else if (nn.has()) {
    o.nnodesText = std::to_string(*nn.value);
    lines.push_back(fmt::format("nnodes={} ({})", *nn.value, nn.from));
  }
  if (o.standalone && nn.has())
    DTRAIN_CHECK_AS(UsageError, *nn.value == 1,
                    "--standalone runs a single node, but {} has {} nodes ({}={}); drop --standalone", terms.rankOwner,
                    *nn.value, nn.from, *nn.value);

  const auto& nr = p.nodeRank;
  if (given.nodeRank) {
    if (nr.has())
      DTRAIN_CHECK_AS(UsageError, o.nodeRank == *nr.value, "--node-rank {} contradicts {}: {}={} ({})", o.nodeRank,
                      terms.rankOwner, nr.from, *nr.value, terms.rankAdvice);
    lines.push_back(fmt::format("node_rank={} (--node-rank)", o.nodeRank));
  } else if (nr.has()) {
    o.nodeRank = *nr.value;
    lines.push_back(fmt::format("node_rank={} ({})", *nr.value, nr.from));
  }

  if (given.rdzvId) {
    lines.push_back(fmt::format("rdzv_id={} (--rdzv-id)", o.rdzvId));
  } else if (p.runId.has()) {
    o.rdzvId = *p.runId.value;
    lines.push_back(fmt::format("rdzv_id={} ({})", o.rdzvId, p.runId.from));
  }

  // A standalone store, the store/c10d backends and etcd live where the user says; only the static backend's
  // endpoint (the store on node rank 0) is derived from the launcher.
  bool ownStore = o.rdzvBackend == "store" || o.rdzvBackend == "c10d" || o.rdzvBackend == "etcd";
  if (given.rdzvEndpoint) {
    lines.push_back(fmt::format("rdzv_endpoint={} (--rdzv-endpoint / --master-addr)", o.rdzvEndpoint));
  } else if (!o.standalone && !ownStore && p.rdzvEndpoint.has()) {
    o.rdzvEndpoint = *p.rdzvEndpoint.value;
    lines.push_back(fmt::format("rdzv_endpoint={} ({})", o.rdzvEndpoint, p.rdzvEndpoint.from));
  }
}

}  // namespace dtrain::launch
