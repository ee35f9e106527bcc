// Refused nodes (rendezvous.h, `refused/count` and `refused/<n>`; docs/rendezvous.md "Refused nodes"): the
// checks that refuse an agent (another job on the run id, another environment), the record a refused agent leaves in the store, the line the job's first
// agent logs for it (waitRefusal, RefusalWatcher) and the count a join timeout names. Split from rendezvous.cpp,
// which joins and closes rounds.
#include <nlohmann/json.hpp>

#include <algorithm>

#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/common/parse.h"
#include "rendezvous/refusal_watcher.h"
#include "rendezvous/rendezvous.h"

namespace dtrain::rendezvous {

using json = nlohmann::json;

namespace {

// "NAME=value" lines -> (name, value), in order.
std::vector<std::pair<std::string, std::string>> envLines(const std::string& text) {
  std::vector<std::pair<std::string, std::string>> out;
  size_t start = 0;
  while (start < text.size()) {
    size_t nl = text.find('\n', start);
    std::string line = text.substr(start, nl == std::string::npos ? std::string::npos : nl - start);
    start = nl == std::string::npos ? text.size() : nl + 1;
    size_t eq = line.find('=');
    if (eq != std::string::npos) out.emplace_back(line.substr(0, eq), line.substr(eq + 1));
  }
  return out;
}

}  // namespace

void Rendezvous::throwIfAnotherJob(const std::string& job, const std::optional<std::string>& ended) {
  auto idOf = [](std::string_view fp) { return fp.substr(0, fp.find(' ')); };
  if (idOf(job) == idOf(options_.jobFingerprint)) return;
  // Say when that job is over, so that nobody goes looking for a job still running under the id.
  std::string state;
  if (ended) {
    auto outcome = RoundEvent::fromJson(*ended);
    state = outcome.type == RoundEventType::kDone
                ? ", which has ended: it completed"
                : fmt::format(", which has ended: {}, exit code {}", roundEventName(outcome.type), outcome.exitCode);
  } else {
    // That job runs (or waits for nodes): its first agent names this node too. (An ended job has nobody to tell.)
    recordRefusal(fmt::format("it runs another job on this run id (job {}; this run id's job is {}): give each job "
                              "its own --rdzv-id",
                              options_.jobFingerprint, job));
  }
  DTRAIN_THROW(RendezvousError,
               "rendezvous at {}: another job already uses this run id on this store (job {}{}); this is job {}. "
               "Give each job its own --rdzv-id",
               options_.endpoint, job, state, options_.jobFingerprint);
}

void Rendezvous::throwIfEnvDisagrees(const std::string& recorded) {
  if (recorded == options_.agreedEnv) return;
  auto theirs = envLines(recorded), ours = envLines(options_.agreedEnv);
  for (const auto& [name, value] : ours) {
    auto it = std::find_if(theirs.begin(), theirs.end(), [&](const auto& kv) { return kv.first == name; });
    const std::string other = it == theirs.end() ? std::string("(not compared by that agent)") : it->second;
    if (other == value) continue;
    recordRefusal(fmt::format("its {} is {}, the job's first agent's is {}; every node must give it the same value "
                              "(it decides which collectives the ranks run)",
                              name, value, other));
    DTRAIN_THROW(RendezvousError,
                 "rendezvous at {}: {} is {} on this node but {} on the job's first agent; every node "
                 "must give it the same value: it decides which collectives the ranks run, so the ranks would wait "
                 "for each other until parallel.timeout. Set it alike in every node's environment",
                 options_.endpoint, name, value, other);
  }
  recordRefusal(fmt::format("its environment '{}' differs from the job's first agent's '{}'", options_.agreedEnv,
                            recorded));
  DTRAIN_THROW(RendezvousError,
               "rendezvous at {}: this node's environment differs from the job's first agent's: here '{}', there '{}'",
               options_.endpoint, options_.agreedEnv, recorded);
}

void Rendezvous::recordRefusal(const std::string& reason) {
  try {
    const int64_t n = store_->add("refused/count", 1);
    store_->set(fmt::format("refused/{}", n), json{{"node", json::parse(self_.toJson())}, {"reason", reason}}.dump());
  } catch (const std::exception& e) {
    log::debug("rendezvous: could not record this node's refusal in the store: {}", e.what());
  }
}

std::optional<std::string> Rendezvous::waitRefusal(Store& store, int index, Millis timeout) {
  auto got = store.batch({StoreOp::get(fmt::format("refused/{}", index), timeout)});
  if (!got[0].value) return std::nullopt;
  auto j = json::parse(*got[0].value, nullptr, false);
  if (!j.is_object() || !j.contains("node")) return fmt::format("a node was refused: {}", *got[0].value);
  NodeInfo n = NodeInfo::fromJson(j["node"].dump());
  return fmt::format("node {} ({}pid {}{}) was refused and exits with code 4: {}", n.hostname,
                     n.host.empty() || n.host == n.hostname ? std::string() : n.host + ", ", n.pid,
                     n.requestedNodeRank >= 0 ? fmt::format(", --node-rank {}", n.requestedNodeRank) : "",
                     j.value("reason", "no reason recorded"));
}

std::string Rendezvous::refusedCountNote(const std::optional<std::string>& count) {
  // Nodes that came but were refused (their own message says why; the first agent logged each).
  const auto refused = parse::toInt(count.value_or("0")).value_or(0);
  return refused > 0 ? fmt::format("; {} node(s) came and were refused (another environment, or another job on this "
                                   "run id: see the job's first agent's log or theirs)",
                                   refused)
                     : "";
}

RefusalWatcher::RefusalWatcher(StorePtr store) : thread_([this, store = std::move(store)] { loop(*store); }) {}

RefusalWatcher::~RefusalWatcher() {
  stop_ = true;
  thread_.join();
}

std::unique_ptr<RefusalWatcher> RefusalWatcher::start(Store& store) {
  log::debug("rendezvous: this is the job's first agent (it recorded agreed_env): nodes refused later are logged "
             "here");
  try {
    return std::make_unique<RefusalWatcher>(store.clone());
  } catch (const std::exception& e) {
    log::debug("cannot watch for refused nodes: {}", e.what());
    return nullptr;
  }
}

void RefusalWatcher::loop(Store& store) {
  for (int next = 1; !stop_;) {
    try {
      if (auto line = Rendezvous::waitRefusal(store, next, kSlice)) {
        log::warn("rendezvous: {}", *line);
        ++next;
      }
    } catch (const std::exception& e) {
      log::debug("stopped watching for refused nodes: {}", e.what());
      return;
    }
  }
}

}  // namespace dtrain::rendezvous
