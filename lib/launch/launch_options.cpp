#include "lib/launch/launch_options.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>

#include <sched.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "lib/common/dir_check.h"
#include "lib/common/error.h"
#include "lib/common/net.h"
#include "lib/common/sha256.h"
#include "lib/common/parse.h"
#include "rendezvous/etcd_store.h"
#include "rendezvous/store.h"

namespace dtrain::launch {

int StreamChoice::forRank(int localRank) const {
  auto it = perRank.find(localRank);
  return it == perRank.end() ? all : it->second;
}

StreamChoice StreamChoice::parse(const std::string& flag, const std::string& value) {
  auto bad = [&] {
    DTRAIN_THROW(UsageError,
                 "{} {}: expected 0 (none), 1 (stdout), 2 (stderr) or 3 (both), or per local rank as 0:1,1:2", flag,
                 value);
  };
  auto code = [&](std::string_view s) {
    auto v = parse::toInt(s);
    if (!v || *v < 0 || *v > 3) bad();
    return static_cast<int>(*v);
  };
  StreamChoice c;
  if (value.find(':') == std::string::npos) {
    c.all = code(value);
    return c;
  }
  for (const auto& item : parse::split(value, ',')) {
    auto parts = parse::split(item, ':');
    if (parts.size() != 2) bad();
    auto rank = parse::toInt(parts[0]);
    if (!rank || *rank < 0) bad();
    c.perRank[static_cast<int>(*rank)] = code(parts[1]);
  }
  return c;
}

std::pair<int, int> parseNnodes(const std::string& value) {
  auto bad = [&] {
    DTRAIN_THROW(UsageError, "--nnodes {}: expected a positive node count N or a range MIN:MAX with 1 <= MIN <= MAX",
                 value);
  };
  auto parts = parse::split(value, ':');
  if (parts.empty() || parts.size() > 2) bad();
  auto lo = parse::toInt(parts[0]);
  auto hi = parts.size() == 2 ? parse::toInt(parts[1]) : lo;
  if (!lo || !hi || *lo < 1 || *hi < *lo) bad();
  return {static_cast<int>(*lo), static_cast<int>(*hi)};
}

int usableCpuCount() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

int countVisibleDevices(std::string_view value, int driverGpus) {
  int n = 0;
  std::vector<int64_t> seen;
  for (const auto& raw : parse::split(value, ',')) {
    const std::string item(parse::trim(raw));
    if (item.rfind("GPU-", 0) == 0 || item.rfind("MIG-", 0) == 0) {
      ++n;
      continue;
    }
    const auto index = parse::toInt(item);
    if (!index || *index < 0 || (driverGpus > 0 && *index >= driverGpus) ||
        std::find(seen.begin(), seen.end(), *index) != seen.end())
      break;  // CUDA stops at the first invalid entry
    seen.push_back(*index);
    ++n;
  }
  return n;
}

int driverGpuCount(const std::filesystem::path& procGpus, const std::filesystem::path& dev) {
  std::error_code ec;
  int n = 0;
  if (std::filesystem::is_directory(procGpus, ec)) {
    for (auto it = std::filesystem::directory_iterator(procGpus, ec);
         !ec && it != std::filesystem::directory_iterator(); it.increment(ec))
      ++n;
    return n;
  }
  // No /proc/driver/nvidia (gVisor's nvproxy, some containers): the GPUs' device nodes, /dev/nvidia<N> (not
  // nvidiactl, nvidia-uvm, nvidia-modeset, nvidia-caps).
  for (auto it = std::filesystem::directory_iterator(dev, ec); !ec && it != std::filesystem::directory_iterator();
       it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.size() > 6 && name.rfind("nvidia", 0) == 0 &&
        name.find_first_not_of("0123456789", 6) == std::string::npos)
      ++n;
  }
  return n;
}

int visibleGpuCount() {
  const int driverGpus = driverGpuCount("/proc/driver/nvidia/gpus", "/dev");
  if (const char* v = std::getenv("CUDA_VISIBLE_DEVICES")) return countVisibleDevices(v, driverGpus);
  return driverGpus;
}

int resolveNproc(const std::string& value) {
  if (value == "auto") {
    int gpus = visibleGpuCount();
    return gpus > 0 ? gpus : usableCpuCount();
  }
  if (value == "cpu") return usableCpuCount();
  if (value == "gpu") {
    int gpus = visibleGpuCount();
    DTRAIN_CHECK_AS(UsageError, gpus > 0, "--nproc-per-node gpu: no GPU is visible to this process");
    return gpus;
  }
  auto n = parse::toInt(value);
  DTRAIN_CHECK_AS(UsageError, n && *n >= 1 && *n <= 4096,
                  "--nproc-per-node {}: expected a positive number of workers, or auto, cpu or gpu", value);
  return static_cast<int>(*n);
}

std::vector<int> parseIntList(const std::string& flag, const std::string& value) {
  std::vector<int> out;
  for (const auto& item : parse::split(value, ',')) {
    auto v = parse::toInt(item);
    DTRAIN_CHECK_AS(UsageError, v && *v >= 0, "{} {}: expected a comma-separated list of local ranks such as 0,1",
                    flag, value);
    out.push_back(static_cast<int>(*v));
  }
  return out;
}

namespace {

// torchrun runs a script through the interpreter (`torchrun train.py` is `python -u train.py`); dtrain runs the
// program it is given, so `dtrain run train.py` found no program. Say how to launch a Python script.
std::string pythonHint(const std::string& program) {
  const std::string_view p = program;
  if (p.size() < 3 || p.substr(p.size() - 3) != ".py") return "";
  return fmt::format("; dtrain runs the program it is given (torchrun adds python itself): launch a Python script "
                     "as dtrain run [options] -- python3 {}",
                     program);
}

}  // namespace

std::string resolveProgram(const std::string& program) {
  auto check = [&](const std::string& path) -> bool {
    struct stat st{};
    if (::stat(path.c_str(), &st) != 0) return false;
    if (S_ISDIR(st.st_mode) || ::access(path.c_str(), X_OK) != 0)
      throw Error(fmt::format("program '{}' ({}) is not executable{}", program, path,
                              S_ISDIR(st.st_mode) ? ": it is a folder" : pythonHint(program)),
                  ExitCode::kNotExecutable);
    return true;
  };
  if (program.find('/') != std::string::npos) {
    if (check(program)) return program;
    throw Error(fmt::format("program '{}' does not exist", program), ExitCode::kNotFound);
  }
  const char* path = std::getenv("PATH");
  for (const auto& dir : parse::split(path ? path : "/usr/local/bin:/usr/bin:/bin", ':')) {
    std::string candidate = (dir.empty() ? std::string(".") : dir) + "/" + program;
    struct stat st{};
    if (::stat(candidate.c_str(), &st) == 0 && !S_ISDIR(st.st_mode) && ::access(candidate.c_str(), X_OK) == 0)
      return candidate;
  }
  // A file of that name here is not searched for (PATH lookup, as the shell's): say what would run it.
  struct stat here{};
  std::string hint = pythonHint(program);
  if (hint.empty() && ::stat(program.c_str(), &here) == 0 && S_ISREG(here.st_mode))
    hint = fmt::format("; the file {0} here is not looked for: run it as ./{0}, or, if it is a job file, name it "
                       "{0}.json (dtrain run JOB.json)",
                       program);
  throw Error(fmt::format("program '{}' was not found in PATH{}", program, hint), ExitCode::kNotFound);
}

bool isJobFileName(const std::string& word) {
  if (word.size() <= 5) return false;
  std::string tail = word.substr(word.size() - 5);
  std::transform(tail.begin(), tail.end(), tail.begin(), [](unsigned char c) { return std::tolower(c); });
  return tail == ".json";
}

rendezvous::EtcdStoreOptions LaunchOptions::etcdOptions() const {
  rendezvous::EtcdStoreOptions o;
  o.endpoints = rendezvous::parseEtcdEndpoints(rdzvEndpoint, &o.tls).value_or(std::vector<net::HostPort>{});
  rendezvous::etcdOptionsFromEnvironment(o);  // DTRAIN_ETCD_PASSWORD (and the others) unless given below
  std::string_view rest = rdzvConf;
  while (!rest.empty()) {
    auto comma = rest.find(',');
    auto item = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
    if (item.empty()) continue;
    auto eq = item.find('=');
    DTRAIN_CHECK_AS(UsageError, eq != std::string_view::npos, "--rdzv-conf: '{}' is not KEY=VALUE", item);
    std::string k(item.substr(0, eq)), v(item.substr(eq + 1));
    auto file = [&](std::string& out) {
      DTRAIN_CHECK_AS(UsageError, std::filesystem::is_regular_file(v), "--rdzv-conf {}={}: no such file", k, v);
      out = std::filesystem::absolute(v).string();  // workers inherit it whatever their directory
    };
    if (k == "protocol") {
      DTRAIN_CHECK_AS(UsageError, v == "http" || v == "https", "--rdzv-conf protocol={}: expected http or https", v);
      o.tls = v == "https";
    } else if (k == "cacert") {
      file(o.caCert);
    } else if (k == "cert") {
      file(o.cert);
    } else if (k == "key") {
      file(o.key);
    } else if (k == "user") {
      o.user = v;
    } else if (k == "password") {
      o.password = v;
    } else {
      DTRAIN_THROW(UsageError, "--rdzv-conf: unknown key '{}' (etcd takes protocol, cacert, cert, key, user, password)", k);
    }
  }
  DTRAIN_CHECK_AS(UsageError, o.cert.empty() == o.key.empty(),
                  "--rdzv-conf: cert= and key= go together (the client certificate and its private key)");
  DTRAIN_CHECK_AS(UsageError, o.tls || (o.caCert.empty() && o.cert.empty()),
                  "--rdzv-conf: cacert/cert/key need TLS: give https:// endpoints or protocol=https");
  DTRAIN_CHECK_AS(UsageError, !o.password.empty() || o.user.empty(),
                  "--rdzv-conf user={} needs password=... (or the environment variable {})", o.user,
                  rendezvous::kEtcdPasswordEnv);
  return o;
}

void checkCreatableDir(std::string_view flag, const std::string& dir) {
  const auto problem = findDirProblem(dir);
  if (!problem) return;
  DTRAIN_CHECK_AS(UsageError, !problem->notDirectory, "{} {}: {} exists and is not a folder", flag, dir,
                  problem->at.string());
  DTRAIN_THROW(UsageError, "{} {}: the folder {} is not writable ({})", flag, dir, problem->at.string(),
               problem->error);
}

void checkWritableFile(std::string_view flag, const std::string& file) {
  namespace fs = std::filesystem;
  const auto parent = fs::absolute(file).parent_path();
  DTRAIN_CHECK_AS(UsageError, fs::is_directory(parent), "{} {}: the folder {} does not exist", flag, file,
                  parent.string());
  DTRAIN_CHECK_AS(UsageError, !fs::is_directory(file), "{} {}: is a folder (expected a file name)", flag, file);
  DTRAIN_CHECK_AS(UsageError, ::access(parent.c_str(), W_OK | X_OK) == 0, "{} {}: the folder {} is not writable ({})",
                  flag, file, parent.string(), std::strerror(errno));
}

void LaunchOptions::validate() {
  std::tie(minNodes, maxNodes) = parseNnodes(nnodesText);
  nproc = resolveNproc(nprocText);
  DTRAIN_CHECK_AS(UsageError, maxRestarts >= 0, "--max-restarts {}: expected 0 or more", maxRestarts);
  DTRAIN_CHECK_AS(UsageError, maxReforms >= 0, "--max-reforms {}: expected 0 or more", maxReforms);
  DTRAIN_CHECK_AS(UsageError,
                  rdzvBackend == "static" || rdzvBackend == "store" || rdzvBackend == "c10d" || rdzvBackend == "etcd" ||
                      rdzvBackend == "etcd-v3",
                  "--rdzv-backend {}: expected static (node rank 0 hosts the store), store (a standalone "
                  "`dtrain store` at --rdzv-endpoint) or etcd (an etcd v3 cluster at --rdzv-endpoint)",
                  rdzvBackend);
  if (rdzvBackend == "etcd-v3") rdzvBackend = "etcd";
  if (rdzvBackend == "c10d") {
    rdzvBackend = "store";
    rdzvBackendC10d = true;
  }
  if (!timelineFile.empty()) {
    checkWritableFile("--timeline", timelineFile);
    timelineFile = std::filesystem::absolute(timelineFile).string();
  }
  if (!logDir.empty()) checkCreatableDir("--log-dir", logDir);
  if (standalone) {
    DTRAIN_CHECK_AS(UsageError, maxNodes == 1, "--standalone runs a single node, but --nnodes is {}", nnodesText);
    DTRAIN_CHECK_AS(UsageError, rdzvEndpoint.empty(), "--standalone picks its own endpoint; drop --rdzv-endpoint {}",
                    rdzvEndpoint);
  }
  if (nodeRank >= 0)
    DTRAIN_CHECK_AS(UsageError, nodeRank < maxNodes, "--node-rank {} is out of range for --nnodes {} (expected 0..{})",
                    nodeRank, nnodesText, maxNodes - 1);
  if (rdzvBackend == "static" && maxNodes > 1 && !standalone) {
    DTRAIN_CHECK_AS(UsageError, nodeRank >= 0,
                    "--nnodes {} with --rdzv-backend static needs --node-rank (node rank 0 hosts the store); "
                    "or run a standalone `dtrain store` and pass --rdzv-backend store",
                    nnodesText);
    DTRAIN_CHECK_AS(UsageError, !rdzvEndpoint.empty(),
                    "--nnodes {} needs --rdzv-endpoint HOST[:PORT] (the address of node rank 0)", nnodesText);
  }
  if (rdzvBackend == "store")
    DTRAIN_CHECK_AS(UsageError, !rdzvEndpoint.empty(),
                    "--rdzv-backend store needs --rdzv-endpoint HOST[:PORT] of a running `dtrain store`");
  if (rdzvBackend == "etcd") {
    DTRAIN_CHECK_AS(UsageError, !rdzvEndpoint.empty(),
                    "--rdzv-backend etcd needs --rdzv-endpoint HOST[:PORT][,HOST[:PORT]...] of the etcd cluster");
    DTRAIN_CHECK_AS(UsageError, rendezvous::parseEtcdEndpoints(rdzvEndpoint).has_value(),
                    "--rdzv-endpoint {}: expected HOST[:PORT][,HOST[:PORT]...] (etcd's client port, 2379 by default)",
                    rdzvEndpoint);
    etcdOptions();  // --rdzv-conf's keys and files
  } else if (!rdzvEndpoint.empty()) {
    const auto hp = net::parseHostPort(rdzvEndpoint, rendezvous::kDefaultPort);
    DTRAIN_CHECK_AS(UsageError, hp.has_value(), "--rdzv-endpoint {}: expected HOST or HOST:PORT ([ADDR]:PORT for an IPv6 address)",
                    rdzvEndpoint);
    // Port 0 lets node 0's store take any free port, which no other node can know: they retried port 0 until
    // --rdzv-timeout (15 minutes by default).
    DTRAIN_CHECK_AS(UsageError, hp->port != 0 || maxNodes == 1,
                    "--rdzv-endpoint {}: port 0 (a free port picked by the store) cannot be found by the other nodes of "
                    "--nnodes {}; give a fixed port (default {})",
                    rdzvEndpoint, nnodesText, rendezvous::kDefaultPort);
  }
  DTRAIN_CHECK_AS(UsageError, rdzvConf.empty() || rdzvBackend == "etcd",
                  "--rdzv-conf {}: only --rdzv-backend etcd takes settings (protocol, cacert, cert, key, user, "
                  "password); this job uses --rdzv-backend {}",
                  rdzvConf, rdzvBackend);
  DTRAIN_CHECK_AS(UsageError, shutdownTimeout.count() >= 0, "--shutdown-timeout must not be negative");
  // 0 s left no time for the store's handshake: the agent reported its own store as "not a dtrain store" (exit 6).
  DTRAIN_CHECK_AS(UsageError, rdzvTimeout.count() > 0,
                  "--rdzv-timeout {} ms: expected a positive duration (how long agents wait for the store and for "
                  "every node to join; default 900s)",
                  rdzvTimeout.count());
  DTRAIN_CHECK_AS(UsageError, heartbeatInterval.count() > 0, "--heartbeat-interval {} ms: expected a positive duration",
                  heartbeatInterval.count());
  DTRAIN_CHECK_AS(UsageError, heartbeatTimeout > heartbeatInterval,
                  "--heartbeat-timeout ({} ms) must be longer than --heartbeat-interval ({} ms)",
                  heartbeatTimeout.count(), heartbeatInterval.count());
  for (int r : localRanksFilter)
    DTRAIN_CHECK_AS(UsageError, r < nproc, "--local-ranks-filter: local rank {} does not exist with {} worker(s) per node",
                    r, nproc);
  DTRAIN_CHECK_AS(UsageError, !program.empty(), "no program to launch: give a job file or -- PROGRAM [ARGS...]");
  programPath = resolveProgram(program.front());
  std::error_code sameError;
  dtrainWorkers = trainerWorkers || std::filesystem::equivalent(programPath, "/proc/self/exe", sameError);
}

bool LaunchOptions::hostsStore() const {
  return standalone || (rdzvBackend == "static" && (nodeRank == 0 || maxNodes == 1));
}

std::string LaunchOptions::storeBindHost() const {
  if (!rdzvBind.empty()) return rdzvBind;
  if (standalone || rdzvEndpoint.empty()) return "127.0.0.1";
  auto hp = net::parseHostPort(rdzvEndpoint, rendezvous::kDefaultPort);
  if (!hp) return "0.0.0.0";  // validate() reports the bad endpoint
  if (maxNodes > 1) {
    in_addr a4{};
    in6_addr a6{};
    bool literal = ::inet_pton(AF_INET, hp->host.c_str(), &a4) == 1 || ::inet_pton(AF_INET6, hp->host.c_str(), &a6) == 1;
    if (!literal) {
      addrinfo hints{};
      hints.ai_family = AF_UNSPEC;
      hints.ai_socktype = SOCK_STREAM;
      addrinfo* res = nullptr;
      if (::getaddrinfo(hp->host.c_str(), nullptr, &hints, &res) == 0 && res != nullptr) {
        bool loopback = false;
        if (res->ai_family == AF_INET)
          loopback = (ntohl(reinterpret_cast<sockaddr_in*>(res->ai_addr)->sin_addr.s_addr) >> 24) == 127;
        else if (res->ai_family == AF_INET6)
          loopback = IN6_IS_ADDR_LOOPBACK(&reinterpret_cast<sockaddr_in6*>(res->ai_addr)->sin6_addr);
        ::freeaddrinfo(res);
        if (loopback) return "0.0.0.0";
      }
    }
  }
  return hp->host;
}

std::string LaunchOptions::jobFingerprint() const {
  std::string text = nnodesText;
  std::string summary;
  for (size_t i = 0; i < program.size(); ++i) {
    auto arg = i == 0 ? std::filesystem::path(program[i]).filename().string() : program[i];
    text.push_back('\0');
    text += arg;
    if (!summary.empty()) summary.push_back(' ');
    summary += arg;
  }
  if (summary.size() > 120) summary = summary.substr(0, 117) + "...";
  return fmt::format("{} `{}`", sha256::hex(sha256::hash(text)).substr(0, 16), summary);
}

std::string LaunchOptions::plan() const {
  // Without --node-rank a single node (--standalone, --nnodes 1) is node 0; several take their ranks from the
  // order they join the rendezvous in (rendezvous.h), which no agent knows before it joined.
  const std::string rank = nodeRank >= 0 ? std::to_string(nodeRank) : maxNodes == 1 ? "0" : "join-order";
  return fmt::format("nnodes={} nproc_per_node={} node_rank={} rdzv_backend={} rdzv_endpoint={} rdzv_id={} "
                     "max_restarts={} max_reforms={}\nprogram={}",
                     nnodesText, nproc, rank, rdzvBackend, rdzvEndpoint.empty() ? "-" : rdzvEndpoint,
                     standalone && rdzvId == "none" ? "random" : rdzvId,  // the agent draws one per run (agent.cpp)
                     maxRestarts, maxReforms, fmt::join(program, " "));
}

}  // namespace dtrain::launch
