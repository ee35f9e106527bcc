#include "lib/launch/sim.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <regex>

#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/common/parse.h"
#include "lib/launch/launch_options.h"
#include "lib/launch/process_tree.h"
#include "lib/launch/sim_net.h"
#include "lib/launch/sim_report.h"
#include "lib/launch/spawn.h"

extern char** environ;

namespace dtrain::launch {

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

double unixNow() { return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count(); }

// Every process below `root` (children first found by a /proc scan of parent pids), root excluded.
std::vector<pid_t> descendantsOf(pid_t root) {
  std::multimap<pid_t, pid_t> children;
  if (DIR* d = ::opendir("/proc")) {
    while (dirent* e = ::readdir(d)) {
      char* end = nullptr;
      long pid = std::strtol(e->d_name, &end, 10);
      if (*end != '\0' || pid <= 0) continue;
      std::ifstream in(fmt::format("/proc/{}/stat", pid));
      std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      size_t close = stat.rfind(')');
      if (close == std::string::npos) continue;
      char state = 0;
      int ppid = 0;
      if (std::sscanf(stat.c_str() + close + 1, " %c %d", &state, &ppid) == 2)
        children.emplace(static_cast<pid_t>(ppid), static_cast<pid_t>(pid));
    }
    ::closedir(d);
  }
  std::vector<pid_t> out, todo = {root};
  while (!todo.empty()) {
    pid_t p = todo.back();
    todo.pop_back();
    for (auto [it, end] = children.equal_range(p); it != end; ++it) {
      out.push_back(it->second);
      todo.push_back(it->second);
    }
  }
  return out;
}

struct SimNode {
  pid_t agent = -1;
  int outFd = -1;
  std::string partial;
  std::ofstream log;
  bool started = false, exited = false, killed = false, frozen = false, partitioned = false, faulted = false;
  int exitCode = 0;
};

struct Action {
  double at;       // seconds since start, when atStep < 0
  int64_t atStep;  // >= 0: once the job completed this step
  std::function<void()> run;
  bool join = false;
  bool fired = false;
};

class Sim {
 public:
  explicit Sim(const SimOptions& o)
      : o_(o), total_(simTotalNodes(o.faults, o.nodes)), nodes_(static_cast<size_t>(total_)), faults_(o.faults) {}
  ~Sim() { shutdown(); }
  int run();

 private:
  void setUp();
  void startStore();
  void applyFault(size_t index);
  void tailSampleLogs();
  void startAgent(int node);
  void signalNode(int node, int sig, bool agentFirst);
  void readAgent(int node);
  void onLine(int node, const std::string& line);
  void reap();
  void event(int node, const std::string& what, const std::string& message);
  void shutdown();
  // The fewest nodes a round may form with (--nnodes MIN:TOTAL): SimOptions::minNodes, else the initial ones less
  // those a fault may take away, so a sim without such faults forms its first group with every initial node, and
  // survivors of a kill still form one.
  int minNodes() const { return o_.minNodes > 0 ? o_.minNodes : simSurvivingNodes(o_.faults, o_.nodes); }
  double now() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

  const SimOptions& o_;
  int total_;
  std::vector<SimNode> nodes_;
  std::vector<SimFault> faults_;  // firedAt filled in as they fire
  std::vector<Action> actions_;
  int64_t maxStep_ = 0;  // the highest optimizer step any worker logged
  std::map<std::string, uint64_t> tailOffsets_;
  Clock::time_point lastTail_{};
  std::unique_ptr<ProcessTree> tree_;
  std::unique_ptr<SimNetwork> net_;
  std::string network_;
  pid_t store_ = -1;
  std::string endpoint_, token_, runId_;
  Clock::time_point start_ = Clock::now();
  double unixStart_ = unixNow();
  std::vector<SimAgentEvent> events_;
  int64_t datasetSize_ = 0;
  bool shutDown_ = false;
  int sigFd_ = -1;
  sigset_t oldMask_{};
};

void Sim::event(int node, const std::string& what, const std::string& message) {
  events_.push_back({now(), node, what});
  if (!message.empty()) fmt::print("[sim {:6.1f}s] {}\n", now(), message);
  std::fflush(stdout);
}

void Sim::setUp() {
  std::filesystem::create_directories(o_.outputDir);
  std::random_device rd;
  token_ = fmt::format("{:08x}{:08x}{:08x}{:08x}", rd(), rd(), rd(), rd());
  runId_ = fmt::format("sim-{:08x}", rd());
  std::string why;
  const bool isolated = !o_.loopback && simNamespacesAvailable(why);
  if (o_.loopback) why = "--loopback";
  tree_ = std::make_unique<ProcessTree>(o_.shutdownTimeout, o_.exe);
  net_ = std::make_unique<SimNetwork>(total_, isolated, o_.link);
  if (isolated) {
    network_ = fmt::format("network namespaces on a bridge, links {}", o_.link.empty() ? "unshaped" : o_.link);
  } else {
    network_ = fmt::format("loopback 127.0.0.x ({}): no namespaces, no link shaping, no partitions", why);
    log::warn("dtrain sim: {}: nodes share the loopback interface (127.0.0.2...); links are not shaped, partition "
              "and slow faults are skipped, no per-link byte counts", why);
  }
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGINT);
  sigaddset(&mask, SIGTERM);
  ::sigprocmask(SIG_BLOCK, &mask, &oldMask_);
  sigFd_ = ::signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
  DTRAIN_CHECK(sigFd_ >= 0, "signalfd: {}", std::strerror(errno));
}

std::vector<std::string> environmentWith(const std::vector<std::string>& extra) {
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string entry = *e;
    bool replaced = false;
    for (const auto& x : extra)
      if (entry.compare(0, x.find('=') + 1, x, 0, x.find('=') + 1) == 0) replaced = true;
    if (!replaced) env.push_back(std::move(entry));
  }
  env.insert(env.end(), extra.begin(), extra.end());
  return env;
}

void Sim::startStore() {
  std::vector<std::string> argv = net_->enterHub();
  for (const auto& a : std::vector<std::string>{o_.exe, "store", "--host", net_->storeAddress(), "--port", "0", "--quiet"})
    argv.push_back(a);
  auto env = environmentWith({"DTRAIN_RDZV_TOKEN=" + token_});
  tree_->mark(env);
  int out[2];
  DTRAIN_SYSCALL(::pipe2(out, O_CLOEXEC));
  const int storeLog = ::open((o_.outputDir + "/store.log").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  try {
    store_ = spawnProcess({.path = argv.front(), .argv = argv, .env = env, .stdoutFd = out[1], .stderrFd = storeLog});
  } catch (...) {
    ::close(out[0]);
    ::close(out[1]);
    if (storeLog >= 0) ::close(storeLog);
    throw;
  }
  ::close(out[1]);
  if (storeLog >= 0) ::close(storeLog);
  // The store prints "dtrain store listening on HOST:PORT" once it listens.
  std::string text;
  const auto deadline = Clock::now() + 30s;
  while (text.find('\n') == std::string::npos && Clock::now() < deadline) {
    pollfd p{out[0], POLLIN, 0};
    if (::poll(&p, 1, 200) <= 0) continue;
    char buf[256];
    ssize_t n = ::read(out[0], buf, sizeof(buf));
    if (n <= 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  ::close(out[0]);
  auto at = text.find("listening on ");
  DTRAIN_CHECK(at != std::string::npos, "dtrain sim: the rendezvous store did not start (see {}/store.log)", o_.outputDir);
  endpoint_ = std::string(parse::trim(text.substr(at + 13, text.find('\n', at) - at - 13)));
}

void Sim::startAgent(int node) {
  auto& n = nodes_[static_cast<size_t>(node)];
  std::vector<std::string> argv = net_->enterNode(node);
  argv.push_back(o_.exe);
  const std::vector<std::string> flags = {
      "run", "--nnodes", fmt::format("{}:{}", minNodes(), total_), "--nproc-per-node", std::to_string(o_.nprocPerNode),
      "--node-rank", std::to_string(node), "--rdzv-backend", "store", "--rdzv-endpoint", endpoint_, "--rdzv-id", runId_,
      "--rdzv-last-call", fmt::format("{}ms", o_.lastCall.count()),
      "--rdzv-timeout", fmt::format("{}ms", o_.timeout.count()),
      "--heartbeat-timeout", fmt::format("{}ms", o_.heartbeatTimeout.count()),
      "--shutdown-timeout", fmt::format("{}ms", o_.shutdownTimeout.count()),
      "--max-restarts", std::to_string(o_.maxRestarts), "--local-addr", net_->nodeAddress(node)};
  argv.insert(argv.end(), flags.begin(), flags.end());
  if (o_.isJob) {
    argv.insert(argv.end(), o_.program.begin(), o_.program.end());
    if (std::find(o_.program.begin(), o_.program.end(), "--output-dir") == o_.program.end()) {
      argv.push_back("--output-dir");
      argv.push_back(o_.outputDir + "/run");
    }
  } else {
    argv.push_back("--");
    argv.insert(argv.end(), o_.program.begin(), o_.program.end());
  }
  std::vector<std::string> extra = {"DTRAIN_COMM_HOST=" + net_->nodeAddress(node), "DTRAIN_RDZV_TOKEN=" + token_};
  if (o_.isJob) extra.push_back("DTRAIN_SAMPLE_LOG=" + o_.outputDir + "/samples");
  // delay:nodeK=D: the node's workers hold every message they send that long (lib/comm/tcp/conn.h, linkDelay).
  if (auto delay = simLinkDelay(o_.faults, node); delay.count() > 0)
    extra.push_back(fmt::format("DTRAIN_LINK_DELAY={}ms", delay.count()));
  auto env = environmentWith(extra);
  tree_->mark(env);
  int out[2];
  DTRAIN_SYSCALL(::pipe2(out, O_CLOEXEC));
  try {
    n.agent = spawnProcess({.path = argv.front(), .argv = argv, .env = env, .stdoutFd = out[1], .stderrFd = out[1]});
  } catch (...) {
    ::close(out[0]);
    ::close(out[1]);
    throw;
  }
  ::close(out[1]);
  ::fcntl(out[0], F_SETFL, O_NONBLOCK);
  n.outFd = out[0];
  n.started = true;
  n.log.open(fmt::format("{}/node{}.log", o_.outputDir, node));
  event(node, "start", fmt::format("node{} ({}): agent started, pid {}", node, net_->nodeAddress(node), n.agent));
}

void Sim::signalNode(int node, int sig, bool agentFirst) {
  auto& n = nodes_[static_cast<size_t>(node)];
  if (n.agent <= 0 || n.exited) return;
  auto below = descendantsOf(n.agent);
  if (agentFirst) ::kill(n.agent, sig);
  for (pid_t p : below) ::kill(p, sig);
  if (!agentFirst) ::kill(n.agent, sig);
}

void Sim::onLine(int node, const std::string& line) {
  auto& n = nodes_[static_cast<size_t>(node)];
  n.log << fmt::format("[{:8.3f}] {}\n", now(), line);
  n.log.flush();
  std::string what;
  if (line.find("re-forming the group") != std::string::npos) what = "re-form";
  else if (line.find("restarting the workers") != std::string::npos) what = "restart";
  if (!what.empty()) events_.push_back({now(), node, what});
  static const std::regex kSamples(R"((\d+) training samples)");
  std::smatch m;
  if (datasetSize_ == 0 && std::regex_search(line, m, kSamples)) datasetSize_ = std::stoll(m[1].str());
  const bool notable = !what.empty() || line.find("error") != std::string::npos || line.find("done:") != std::string::npos ||
                       line.find("resumed from") != std::string::npos ||
                       // Elastic jobs with node counts they cannot run: a node waiting as a spare, a round waiting
                       // for a usable count, a spare's exit with the job's result (rendezvous.h unusableNodes).
                       line.find("waits as a spare") != std::string::npos ||
                       line.find("this job cannot run on") != std::string::npos ||
                       line.find("the job completed without this node") != std::string::npos;
  if (o_.verbose || notable) fmt::print("[node{}] {}\n", node, line);
}

void Sim::readAgent(int node) {
  auto& n = nodes_[static_cast<size_t>(node)];
  char buf[8192];
  for (;;) {
    ssize_t got = ::read(n.outFd, buf, sizeof(buf));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      if (got == 0) {  // EOF: the agent and everything that shared its output are gone
        if (!n.partial.empty()) onLine(node, n.partial);
        n.partial.clear();
        ::close(n.outFd);
        n.outFd = -1;
      }
      return;
    }
    n.partial.append(buf, static_cast<size_t>(got));
    size_t nl;
    while ((nl = n.partial.find('\n')) != std::string::npos) {
      onLine(node, n.partial.substr(0, nl));
      n.partial.erase(0, nl + 1);
    }
  }
}

void Sim::reap() {
  int status = 0;
  pid_t pid;
  while ((pid = ::waitpid(-1, &status, WNOHANG)) > 0) {
    if (pid == store_) {
      store_ = -1;
      if (!shutDown_) log::warn("dtrain sim: the rendezvous store ended ({})", describeStatus(status));
      continue;
    }
    for (size_t i = 0; i < nodes_.size(); ++i) {
      auto& n = nodes_[i];
      if (n.agent != pid) continue;
      n.exited = true;
      n.exitCode = exitCodeOf(status);
      event(static_cast<int>(i), fmt::format("exit {}", n.exitCode),
            fmt::format("node{}: agent ended ({})", i, describeStatus(status)));
    }
  }
}

void Sim::shutdown() {
  if (shutDown_) return;
  shutDown_ = true;
  // Frozen nodes first get going again, or SIGTERM would wait for a SIGCONT nobody sends.
  for (size_t i = 0; i < nodes_.size(); ++i)
    if (nodes_[i].frozen) signalNode(static_cast<int>(i), SIGCONT, false), nodes_[i].frozen = false;
  for (auto& n : nodes_)
    if (n.started && !n.exited) ::kill(n.agent, SIGTERM);
  const auto deadline = Clock::now() + o_.shutdownTimeout + 5s;
  auto running = [&] {
    return std::any_of(nodes_.begin(), nodes_.end(), [](const SimNode& n) { return n.started && !n.exited; });
  };
  while (running() && Clock::now() < deadline) {
    reap();
    for (size_t i = 0; i < nodes_.size(); ++i)
      if (nodes_[i].outFd >= 0) readAgent(static_cast<int>(i));
    ::usleep(20000);  // bounded shutdown wait, not a synchronisation
  }
  for (size_t i = 0; i < nodes_.size(); ++i)
    if (nodes_[i].started && !nodes_[i].exited) signalNode(static_cast<int>(i), SIGKILL, true);
  if (store_ > 0) {
    ::kill(store_, SIGTERM);
    const auto storeDeadline = Clock::now() + 5s;
    while (store_ > 0 && Clock::now() < storeDeadline) {
      reap();
      if (store_ > 0) ::usleep(20000);  // bounded shutdown wait, not a synchronisation
    }
  }
  for (auto& n : nodes_)
    if (n.outFd >= 0) ::close(n.outFd), n.outFd = -1;
  net_.reset();  // the namespaces go with their holders
  // Whatever is still around (nothing, normally) is stopped: marked or descendant processes.
  if (tree_) tree_->stopLeftovers(o_.shutdownTimeout);
  reap();
  tree_.reset();  // the watchdog
  if (sigFd_ >= 0) {
    ::close(sigFd_);
    sigFd_ = -1;
    ::sigprocmask(SIG_SETMASK, &oldMask_, nullptr);
  }
}

void Sim::applyFault(size_t index) {
  auto& f = faults_[index];
  f.firedAt = now();
  const int k = f.node;
  auto& n = nodes_[static_cast<size_t>(k)];
  const double end = now() + std::chrono::duration<double>(f.duration).count();
  switch (f.kind) {
    case SimFaultKind::kKill:
      n.killed = n.faulted = true;
      event(k, "kill", fmt::format("{}: SIGKILL node{}'s agent and its workers", f.text, k));
      signalNode(k, SIGKILL, true);
      break;
    case SimFaultKind::kFreeze:
      n.frozen = n.faulted = true;
      event(k, "freeze", fmt::format("{}: SIGSTOP node{}", f.text, k));
      signalNode(k, SIGSTOP, true);
      actions_.push_back({end, -1, [this, k] {
                            auto& m = nodes_[static_cast<size_t>(k)];
                            if (!m.frozen) return;
                            m.frozen = false;
                            event(k, "thaw", fmt::format("SIGCONT node{}", k));
                            signalNode(k, SIGCONT, false);
                          }});
      break;
    case SimFaultKind::kPartition:
      if (!net_->isolated()) {
        log::warn("dtrain sim: {} skipped: partitions need network namespaces", f.text);
        break;
      }
      n.partitioned = n.faulted = true;
      event(k, "partition", fmt::format("{}: node{}'s link is down", f.text, k));
      net_->setPartitioned(k, true);
      actions_.push_back({end, -1, [this, k] {
                            event(k, "heal", fmt::format("node{}'s link is up again", k));
                            net_->setPartitioned(k, false);
                          }});
      break;
    case SimFaultKind::kSlow:
      if (!net_->isolated()) {
        log::warn("dtrain sim: {} skipped: shaping needs network namespaces", f.text);
        break;
      }
      event(k, "slow", fmt::format("{}: node{}'s link shaped to {}", f.text, k, f.rate));
      net_->setRate(k, f.rate);
      break;
    case SimFaultKind::kJoin:
      event(k, "join", fmt::format("{}: node{} joins", f.text, k));
      startAgent(k);
      break;
    case SimFaultKind::kDelay:  // in the node's environment from its start (startAgent)
      event(k, "delay", fmt::format("{}: node{}'s messages leave {} ms late (dtrain's transport)", f.text, k,
                                    f.delay.count()));
      break;
    case SimFaultKind::kLoss:
      if (!net_->isolated()) {
        log::warn("dtrain sim: {} skipped: packet loss needs network namespaces", f.text);
        break;
      }
      event(k, "loss", fmt::format("{}: node{} drops {}% of its packets each way", f.text, k, f.lossPercent));
      net_->setLoss(k, f.lossPercent);
      break;
  }
}

void Sim::tailSampleLogs() {
  // Only what was appended since the last look, at most every 100 ms: "step":N of each new line.
  if (!o_.isJob || Clock::now() - lastTail_ < 100ms) return;
  lastTail_ = Clock::now();
  std::error_code ec;
  const std::string dir = o_.outputDir + "/samples";
  if (!std::filesystem::is_directory(dir, ec)) return;
  for (const auto& f : std::filesystem::directory_iterator(dir, ec)) {
    const std::string path = f.path().string();
    std::ifstream in(path, std::ios::binary);
    uint64_t& offset = tailOffsets_[path];
    in.seekg(static_cast<std::streamoff>(offset));
    std::string line;
    while (std::getline(in, line)) {
      if (in.eof()) break;  // a line still being written: read it whole next time
      offset += line.size() + 1;
      auto at = line.find("\"step\":");
      if (at != std::string::npos) maxStep_ = std::max<int64_t>(maxStep_, std::atoll(line.c_str() + at + 7));
    }
  }
}

int Sim::run() {
  setUp();
  startStore();
  fmt::print("[sim] {} node(s) x {} worker(s) on {}; store {}; output {}\n", o_.nodes, o_.nprocPerNode, network_,
             endpoint_, o_.outputDir);
  if (!o_.minNodesNote.empty()) fmt::print("[sim] {}\n", o_.minNodesNote);
  // The schedule as actions, fired by time or by training progress; a freeze's thaw and a partition's heal are
  // added when their start fires.
  for (size_t i = 0; i < faults_.size(); ++i) {
    const auto& f = faults_[i];
    actions_.push_back({std::chrono::duration<double>(f.at).count(), f.atStep, [this, i] { applyFault(i); },
                        f.kind == SimFaultKind::kJoin});
  }
  start_ = Clock::now();
  unixStart_ = unixNow();
  for (int i = 0; i < o_.nodes; ++i) startAgent(i);
  int interrupted = 0;
  bool timedOut = false;
  std::optional<double> doneAt;  // when the first agent finished the job
  for (;;) {
    tailSampleLogs();
    for (size_t i = 0; i < actions_.size(); ++i) {  // (an action may add actions)
      if (actions_[i].fired) continue;
      if (actions_[i].atStep >= 0 ? maxStep_ >= actions_[i].atStep : actions_[i].at <= now()) {
        actions_[i].fired = true;
        auto run = actions_[i].run;
        run();
      }
    }
    reap();
    const bool anyRunning =
        std::any_of(nodes_.begin(), nodes_.end(), [](const SimNode& n) { return n.started && !n.exited; });
    if (!doneAt)
      for (const auto& n : nodes_)
        if (n.exited && n.exitCode == 0) doneAt = now();
    // Nothing runs: done, unless a node is still to join.
    if (!anyRunning && (doneAt || std::none_of(actions_.begin(), actions_.end(),
                                                [](const Action& a) { return a.join && !a.fired; })))
      break;
    // The job is done once an agent finished it; stragglers (a partitioned node still trying to rejoin) get a grace.
    if (doneAt && now() > *doneAt + std::chrono::duration<double>(o_.heartbeatTimeout + o_.shutdownTimeout).count() + 5) break;
    if (now() > std::chrono::duration<double>(o_.timeout).count()) {
      timedOut = true;
      log::error("dtrain sim: --timeout {}s passed: stopping every node", o_.timeout.count() / 1000);
      break;
    }
    std::vector<pollfd> fds = {{sigFd_, POLLIN, 0}};
    std::vector<int> owner = {-1};
    for (size_t i = 0; i < nodes_.size(); ++i)
      if (nodes_[i].outFd >= 0) fds.push_back({nodes_[i].outFd, POLLIN, 0}), owner.push_back(static_cast<int>(i));
    int wait = 100;
    for (const auto& a : actions_)
      if (!a.fired && a.atStep < 0) wait = std::min(wait, std::max(0, static_cast<int>((a.at - now()) * 1000) + 1));
    if (::poll(fds.data(), fds.size(), wait) < 0 && errno != EINTR) DTRAIN_THROW(Error, "poll: {}", std::strerror(errno));
    if (fds[0].revents & POLLIN) {
      signalfd_siginfo info{};
      if (::read(sigFd_, &info, sizeof(info)) == sizeof(info)) {
        interrupted = static_cast<int>(info.ssi_signo);
        log::warn("dtrain sim: received SIG{}: stopping every node", sigabbrev_np(interrupted));
        break;
      }
    }
    for (size_t i = 1; i < fds.size(); ++i)
      if (fds[i].revents & (POLLIN | POLLHUP)) readAgent(owner[i]);
  }
  const double elapsed = now();
  SimReport report;
  report.links.clear();
  if (net_->isolated())
    for (const auto& l : net_->linkBytes()) report.links.push_back({l.toNode, l.fromNode});
  shutdown();

  int code = 0;
  bool finished = false;
  for (const auto& n : nodes_) {
    if (!n.started) continue;
    if (n.exitCode == 0 && n.exited) finished = true;
    else if (!n.faulted && code == 0) code = n.exitCode == 0 ? 1 : n.exitCode;
  }
  if (!finished && code == 0) code = 1;
  if (timedOut) code = static_cast<int>(ExitCode::kRendezvous);
  report.nodes = o_.nodes;
  report.nprocPerNode = o_.nprocPerNode;
  report.network = network_;
  report.seconds = elapsed;
  report.audit.datasetSize = datasetSize_;
  analyseSim(report, readSampleLogs(o_.outputDir + "/samples", unixStart_), events_, faults_, o_.nprocPerNode);
  if (code == 0 && report.haveSamples && (report.audit.repeated > 0 || report.audit.skipped > 0)) code = 1;
  if (interrupted) code = 128 + interrupted;
  report.exitCode = code;
  fmt::print("\n{}", formatSimReport(report));
  std::ofstream(o_.outputDir + "/sim.json") << simReportJson(report);
  if (!o_.report.empty()) {
    writeSimReport(report, o_.report);
    fmt::print("report: {}\n", o_.report);
  }
  std::fflush(stdout);
  return code;
}

}  // namespace

int runSim(const SimOptions& options) {
  DTRAIN_CHECK_AS(UsageError, options.nodes >= 1, "--nodes {}: expected at least 1", options.nodes);
  DTRAIN_CHECK_AS(UsageError, options.nprocPerNode >= 1, "--nproc-per-node {}: expected at least 1", options.nprocPerNode);
  DTRAIN_CHECK_AS(UsageError, !options.program.empty(), "dtrain sim: nothing to run: give a JOB.json or -- PROGRAM");
  if (!options.report.empty()) {
    const auto& r = options.report;
    const bool ok = (r.size() > 4 && r.compare(r.size() - 4, 4, ".svg") == 0) ||
                    (r.size() > 5 && r.compare(r.size() - 5, 5, ".html") == 0);
    DTRAIN_CHECK_AS(UsageError, ok, "--report {}: expected a FILE.svg or FILE.html", r);
    checkWritableFile("--report", r);
  }
  checkCreatableDir("--output-dir", options.outputDir);
  Sim sim(options);
  return sim.run();
}

}  // namespace dtrain::launch
