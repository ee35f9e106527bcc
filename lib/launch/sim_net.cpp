#include "lib/launch/sim_net.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstring>

#include "lib/common/error.h"
#include "lib/common/parse.h"
#include "lib/launch/spawn.h"

namespace dtrain::launch {

namespace {

constexpr const char* kSubnet = "10.200.0.";

std::string findTool(const std::string& name) {
  for (const char* dir : {"/usr/sbin", "/sbin", "/usr/bin", "/bin"}) {
    std::string path = std::string(dir) + "/" + name;
    if (::access(path.c_str(), X_OK) == 0) return path;
  }
  return "";
}

std::string readAll(int fd) {
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

// A process that owns a fresh network namespace and waits to be killed; dies with its parent.
pid_t startHolder() {
  int ready[2];
  DTRAIN_SYSCALL(::pipe2(ready, O_CLOEXEC));
  const pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) {
    ::close(ready[0]);
    ::close(ready[1]);
    DTRAIN_THROW(Error, "fork: {}", std::strerror(errno));
  }
  if (pid == 0) {
    // Only async-signal-safe calls between fork and _exit.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(1);
    char ok = ::unshare(CLONE_NEWNET) == 0 ? 1 : 0;
    (void)!::write(ready[1], &ok, 1);
    if (!ok) ::_exit(1);
    ::close(ready[1]);
    ::close(ready[0]);
    for (;;) ::pause();
  }
  ::close(ready[1]);
  char ok = 0;
  ssize_t n;
  do n = ::read(ready[0], &ok, 1);
  while (n < 0 && errno == EINTR);
  ::close(ready[0]);
  if (n != 1 || !ok) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    DTRAIN_THROW(Error, "dtrain sim: cannot create a network namespace (unshare(CLONE_NEWNET) failed: needs root)");
  }
  return pid;
}

void stopHolder(pid_t pid) {
  if (pid <= 0) return;
  ::kill(pid, SIGKILL);
  while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
  }
}

std::string burstFor(const std::string& rate) {
  // About 10 ms at the rate, at least 32 KiB (tbf needs a burst of at least one MTU per timer tick).
  const double bytes = std::max(32768.0, tcRateBits(rate) / 8 / 100);
  return std::to_string(static_cast<uint64_t>(bytes));
}

}  // namespace

std::string runInNamespace(pid_t nsPid, const std::vector<std::string>& argv) {
  std::vector<std::string> full;
  if (nsPid > 0) full = {"nsenter", fmt::format("--net=/proc/{}/ns/net", nsPid), "--"};
  full.insert(full.end(), argv.begin(), argv.end());
  const std::string path = findTool(full.front());
  DTRAIN_CHECK(!path.empty(), "dtrain sim: '{}' is not installed (scripts/setup installs iproute2 and util-linux)",
               full.front());
  int out[2], err[2];
  DTRAIN_SYSCALL(::pipe2(out, O_CLOEXEC));
  DTRAIN_SYSCALL(::pipe2(err, O_CLOEXEC));
  SpawnSpec spec{.path = path, .argv = full, .env = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"},
                 .stdoutFd = out[1], .stderrFd = err[1]};
  pid_t pid;
  try {
    pid = spawnProcess(spec);
  } catch (...) {
    for (int fd : {out[0], out[1], err[0], err[1]}) ::close(fd);
    throw;
  }
  ::close(out[1]);
  ::close(err[1]);
  // Both pipes are small (a few KiB of JSON at most): drain stdout, then stderr.
  std::string text = readAll(out[0]);
  std::string errors = readAll(err[0]);
  ::close(out[0]);
  ::close(err[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::string cmd;
    for (size_t i = nsPid > 0 ? 3 : 0; i < full.size(); ++i) cmd += (cmd.empty() ? "" : " ") + full[i];
    DTRAIN_THROW(Error, "dtrain sim: `{}` failed ({}): {}", cmd, describeStatus(status), parse::trim(errors));
  }
  return text;
}

bool simNamespacesAvailable(std::string& why) {
  if (::geteuid() != 0) {
    why = "not running as root";
    return false;
  }
  for (const char* tool : {"ip", "tc", "nsenter"})
    if (findTool(tool).empty()) {
      why = fmt::format("'{}' is not installed", tool);
      return false;
    }
  return true;
}

double tcRateBits(const std::string& rate) {
  size_t digits = 0;
  while (digits < rate.size() && (std::isdigit(static_cast<unsigned char>(rate[digits])) || rate[digits] == '.')) ++digits;
  double v = parse::toDouble(rate.substr(0, digits)).value_or(0);
  std::string unit = rate.substr(digits);
  for (auto& c : unit) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  double scale = 1;
  if (unit.size() >= 4 && unit.compare(unit.size() - 3, 3, "bps") == 0) scale = 8, unit.resize(unit.size() - 3);
  else if (unit.size() >= 3 && unit.compare(unit.size() - 3, 3, "bit") == 0) unit.resize(unit.size() - 3);
  if (unit == "k") scale *= 1e3;
  else if (unit == "m") scale *= 1e6;
  else if (unit == "g") scale *= 1e9;
  return v * scale;
}

SimNetwork::SimNetwork(int nodes, bool isolated, const std::string& rate) : isolated_(isolated) {
  DTRAIN_CHECK_AS(UsageError, nodes >= 1 && nodes <= 250, "dtrain sim: {} nodes (expected 1 to 250)", nodes);
  if (!isolated) {
    loopbackNodes_ = nodes;
    return;
  }
  try {
    hub_ = startHolder();
    auto hub = [&](std::vector<std::string> cmd) { runInNamespace(hub_, cmd); };
    hub({"ip", "link", "set", "lo", "up"});
    hub({"ip", "link", "add", "br0", "type", "bridge"});
    hub({"ip", "addr", "add", storeAddress() + "/24", "dev", "br0"});
    hub({"ip", "link", "set", "br0", "up"});
    for (int i = 0; i < nodes; ++i) {
      pid_t holder = startHolder();
      nodeHolders_.push_back(holder);
      const std::string port = fmt::format("n{}", i);
      hub({"ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", std::to_string(holder)});
      hub({"ip", "link", "set", port, "master", "br0"});
      hub({"ip", "link", "set", port, "up"});
      runInNamespace(holder, {"ip", "link", "set", "lo", "up"});
      runInNamespace(holder, {"ip", "addr", "add", nodeAddress(i) + "/24", "dev", "eth0"});
      runInNamespace(holder, {"ip", "link", "set", "eth0", "up"});
      if (!rate.empty()) setRate(i, rate);
    }
  } catch (...) {
    for (pid_t p : nodeHolders_) stopHolder(p);
    stopHolder(hub_);
    throw;
  }
}

SimNetwork::~SimNetwork() {
  for (pid_t p : nodeHolders_) stopHolder(p);
  stopHolder(hub_);
}

std::string SimNetwork::storeAddress() const { return isolated_ ? std::string(kSubnet) + "254" : "127.0.0.1"; }

std::string SimNetwork::nodeAddress(int node) const {
  return isolated_ ? fmt::format("{}{}", kSubnet, node + 1) : fmt::format("127.0.0.{}", node + 2);
}

std::vector<std::string> SimNetwork::enterNode(int node) const {
  if (!isolated_) return {};
  return {findTool("nsenter"), fmt::format("--net=/proc/{}/ns/net", nodeHolders_.at(static_cast<size_t>(node))), "--"};
}

std::vector<std::string> SimNetwork::enterHub() const {
  if (!isolated_) return {};
  return {findTool("nsenter"), fmt::format("--net=/proc/{}/ns/net", hub_), "--"};
}

void SimNetwork::setRate(int node, const std::string& rate) {
  if (!isolated_) return;
  const pid_t holder = nodeHolders_.at(static_cast<size_t>(node));
  const std::string port = fmt::format("n{}", node);
  if (rate.empty()) {
    runInNamespace(hub_, {"tc", "qdisc", "del", "dev", port, "root"});
    runInNamespace(holder, {"tc", "qdisc", "del", "dev", "eth0", "root"});
    return;
  }
  const std::string burst = burstFor(rate);
  runInNamespace(hub_, {"tc", "qdisc", "replace", "dev", port, "root", "tbf", "rate", rate, "burst", burst, "latency", "100ms"});
  runInNamespace(holder, {"tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", burst, "latency", "100ms"});
}

void SimNetwork::setPartitioned(int node, bool partitioned) {
  if (!isolated_) return;
  runInNamespace(hub_, {"ip", "link", "set", fmt::format("n{}", node), partitioned ? "down" : "up"});
}

void SimNetwork::setLoss(int node, double percent) {
  if (!isolated_) return;
  const pid_t holder = nodeHolders_.at(static_cast<size_t>(node));
  // The legacy back end needs only the ip_tables module, not nf_tables (absent from some kernels).
  std::string tool = findTool("iptables-legacy");
  if (tool.empty()) tool = findTool("iptables");
  DTRAIN_CHECK(!tool.empty(), "dtrain sim: loss needs iptables (not found; scripts/setup installs it)");
  for (const char* chain : {"INPUT", "OUTPUT"}) {
    runInNamespace(holder, {tool, "-F", chain});
    if (percent <= 0) continue;
    runInNamespace(holder, {tool, "-A", chain, std::string(chain) == "INPUT" ? "-i" : "-o", "eth0", "-m", "statistic",
                            "--mode", "random", "--probability", fmt::format("{:.6f}", percent / 100.0), "-j", "DROP"});
  }
}

std::vector<SimNetwork::LinkBytes> SimNetwork::linkBytes() const {
  std::vector<LinkBytes> out(static_cast<size_t>(nodes()));
  if (!isolated_) return out;
  auto links = nlohmann::json::parse(runInNamespace(hub_, {"ip", "-s", "-j", "link", "show"}));
  for (const auto& l : links) {
    const std::string name = l.value("ifname", "");
    if (name.size() < 2 || name[0] != 'n') continue;
    auto idx = parse::toInt(name.substr(1));
    if (!idx || *idx < 0 || *idx >= nodes() || !l.contains("stats64")) continue;
    // The hub end transmits what goes to the node and receives what the node sends.
    out[static_cast<size_t>(*idx)] = {l["stats64"]["tx"].value("bytes", uint64_t{0}),
                                      l["stats64"]["rx"].value("bytes", uint64_t{0})};
  }
  return out;
}

}  // namespace dtrain::launch
