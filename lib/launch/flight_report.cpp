#include "lib/launch/flight_report.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>

namespace dtrain::launch {

namespace {

constexpr auto kAcquire = std::memory_order_acquire;
constexpr auto kRelaxed = std::memory_order_relaxed;
constexpr const char* kOpNames[] = {"none", "allreduce", "broadcast", "allgather", "reduce_scatter",
                                    "send", "recv", "barrier"};

std::string humanBytes(uint64_t b) {
  if (b >= (1u << 20)) return fmt::format("{:.1f} MiB", static_cast<double>(b) / (1 << 20));
  if (b >= (1u << 10)) return fmt::format("{:.1f} KiB", static_cast<double>(b) / (1 << 10));
  return fmt::format("{} B", b);
}

std::string describe(const FlightCall& c) {
  return fmt::format("{} #{} ({}, group {}, step {})", c.op, c.seq, humanBytes(c.bytes), c.group, c.step);
}

double secondsBetween(int64_t fromNs, int64_t toNs) { return static_cast<double>(toNs - fromNs) * 1e-9; }

}  // namespace

int64_t unixNowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

RankFlight readFlight(const WorkerMetricsBlock& b, int node) {
  RankFlight r;
  r.rank = b.rank.load(kRelaxed);
  r.node = node;
  r.pid = b.pid.load(kRelaxed);
  r.stepsDone = b.step.load(kRelaxed);
  for (const auto& e : b.flight) {
    FlightCall c;
    c.seq = e.seq.load(kAcquire);
    if (c.seq == 0) continue;
    const int kind = e.kind.load(kRelaxed);
    c.op = kind >= 0 && kind < 8 ? kOpNames[kind] : "?";
    c.bytes = e.bytes.load(kRelaxed);
    c.step = e.step.load(kRelaxed);
    c.startNs = e.startNs.load(kRelaxed);
    c.endNs = e.endNs.load(kAcquire);
    uint64_t packed[2] = {e.group[0].load(kRelaxed), e.group[1].load(kRelaxed)};
    char name[17] = {};
    std::memcpy(name, packed, 16);
    c.group = name;
    if (e.seq.load(kAcquire) != c.seq) continue;  // rewritten while we read it
    r.calls.push_back(std::move(c));
  }
  std::sort(r.calls.begin(), r.calls.end(), [](const auto& a, const auto& b) { return a.seq < b.seq; });
  return r;
}

nlohmann::json toJson(const RankFlight& r) {
  nlohmann::json calls = nlohmann::json::array();
  for (const auto& c : r.calls)
    calls.push_back({{"seq", c.seq}, {"op", c.op}, {"bytes", c.bytes}, {"step", c.step}, {"start_ns", c.startNs},
                     {"end_ns", c.endNs}, {"group", c.group}});
  return {{"rank", r.rank}, {"node", r.node}, {"pid", r.pid}, {"steps_done", r.stepsDone}, {"calls", calls}};
}

RankFlight rankFlightFromJson(const nlohmann::json& j) {
  RankFlight r;
  r.rank = j.at("rank").get<int>();
  r.node = j.at("node").get<int>();
  r.pid = j.at("pid").get<int>();
  r.stepsDone = j.at("steps_done").get<int64_t>();
  for (const auto& c : j.at("calls"))
    r.calls.push_back({c.at("seq").get<uint64_t>(), c.at("op").get<std::string>(), c.at("bytes").get<uint64_t>(),
                       c.at("step").get<int64_t>(), c.at("start_ns").get<int64_t>(), c.at("end_ns").get<int64_t>(),
                       c.at("group").get<std::string>()});
  return r;
}

namespace {

// A rank moved between two reads when its newest call, or that call's end, or its step count changed.
bool movedSince(const RankFlight& now, const RankFlight& before) {
  if (now.stepsDone != before.stepsDone || now.calls.size() != before.calls.size()) return true;
  if (now.calls.empty()) return false;
  return now.calls.back().seq != before.calls.back().seq || now.calls.back().endNs != before.calls.back().endNs;
}

}  // namespace

std::string analyzeFlight(std::vector<RankFlight> ranks, int64_t nowNs, const std::vector<RankFlight>* earlier,
                          double earlierSeconds) {
  std::sort(ranks.begin(), ranks.end(), [](const auto& a, const auto& b) { return a.rank < b.rank; });
  // Which ranks moved since the earlier read (a rank absent from it counts as not seen moving).
  std::vector<int> moved, still;
  if (earlier != nullptr) {
    for (const auto& r : ranks) {
      const auto before = std::find_if(earlier->begin(), earlier->end(), [&](const auto& e) { return e.rank == r.rank; });
      (before != earlier->end() && movedSince(r, *before) ? moved : still).push_back(r.rank);
    }
  }
  std::string out = fmt::format("flight recorder: the last collective calls of {} rank(s)\n", ranks.size());
  uint64_t maxSeq = 0;
  for (const auto& r : ranks)
    if (!r.calls.empty()) maxSeq = std::max(maxSeq, r.calls.back().seq);
  const FlightCall* ahead = nullptr;  // the newest call, as some rank that reached it recorded it
  for (const auto& r : ranks) {
    out += fmt::format("  rank {} (node {}, pid {}): {} step(s) done; ", r.rank, r.node, r.pid, r.stepsDone);
    if (r.calls.empty()) {
      out += "no collective call recorded\n";
      continue;
    }
    const FlightCall& last = r.calls.back();
    if (last.seq == maxSeq && !ahead) ahead = &last;
    if (last.endNs == 0)
      out += fmt::format("inside {} for {:.1f} s\n", describe(last), secondsBetween(last.startNs, nowNs));
    else
      out += fmt::format("not in a collective; the last one, {}, ended {:.1f} s ago\n", describe(last),
                         secondsBetween(last.endNs, nowNs));
  }
  if (ranks.empty()) return out + "verdict: nothing recorded yet\n";
  if (maxSeq == 0 && earlier == nullptr) {
    int64_t most = 0;
    for (const auto& r : ranks) most = std::max(most, r.stepsDone);
    return out + (most == 0 ? std::string("verdict: nothing recorded yet\n")
                            : fmt::format("verdict: no collective call recorded, so none to compare (a parameter-server "
                                          "job's workers talk to their servers, not in collectives); read twice "
                                          "(--interval) to see which ranks still finish steps\n"));
  }
  if (earlier != nullptr && still.empty()) {
    int64_t fewest = ranks.front().stepsDone, most = fewest;
    for (const auto& r : ranks) {
      fewest = std::min(fewest, r.stepsDone);
      most = std::max(most, r.stepsDone);
    }
    return out + fmt::format("verdict: no hang: every rank moved on in the last {:.1f} s (began or finished a "
                             "collective or a step; now at {} step(s) done): the job is running. A hung rank stays where it "
                             "is: dump again if the job seems stuck\n",
                             earlierSeconds, fewest == most ? fmt::format("{}", most) : fmt::format("{} to {}", fewest, most));
  }
  if (earlier != nullptr)
    out += moved.empty() ? fmt::format("no rank moved in the last {:.1f} s\n", earlierSeconds)
                         : fmt::format("in the last {:.1f} s rank(s) {} moved on, rank(s) {} did not\n", earlierSeconds,
                                       fmt::join(moved, ", "), fmt::join(still, ", "));
  if (maxSeq == 0) {
    // No rank recorded a collective (a parameter-server job's workers push and pull through their servers): no
    // call to compare, but the two reads still tell which ranks stopped finishing steps. This used to say "nothing
    // recorded yet" whatever the ranks did, also with a worker frozen for minutes.
    for (const int rank : still) {
      const auto r = std::find_if(ranks.begin(), ranks.end(), [&](const auto& x) { return x.rank == rank; });
      out += fmt::format("verdict: rank {} finished no step in the last {:.1f} s: it is stuck or frozen in step {} "
                         "(no collective call recorded to say where: a parameter-server worker talks to its servers, "
                         "not in collectives)\n",
                         rank, earlierSeconds, r->stepsDone + 1);
    }
    return out;
  }
  std::vector<const RankFlight*> behind;
  std::vector<int> waiting;
  for (const auto& r : ranks) {
    if (r.calls.empty() || r.calls.back().seq < maxSeq) behind.push_back(&r);
    else if (r.calls.back().endNs == 0) waiting.push_back(r.rank);
  }
  // Nobody inside a collective: every rank is computing between calls. Call numbers then differ only because the
  // ranks were read at slightly different moments of a moving job; naming one "behind" accused a healthy rank
  // (`dtrain debug dump` on a running job always named one).
  bool anyInside = false;
  for (const auto& r : ranks)
    if (!r.calls.empty() && r.calls.back().endNs == 0) anyInside = true;
  if (!behind.empty() && !anyInside) {
    uint64_t minSeq = maxSeq;
    for (const auto& r : ranks)
      if (!r.calls.empty()) minSeq = std::min(minSeq, r.calls.back().seq);
    return out + fmt::format("verdict: no rank waits in a collective: every rank is computing between calls (the "
                             "last ones begun: #{} to #{}); a hang shows ranks waiting inside a call that another "
                             "rank has not begun\n",
                             minSeq, maxSeq);
  }
  if (!behind.empty()) {
    for (const auto* r : behind) {
      if (r->calls.empty()) {
        out += fmt::format("verdict: rank {} is behind: it never began a collective (step {})\n", r->rank,
                           r->stepsDone + 1);
        continue;
      }
      const FlightCall& last = r->calls.back();
      out += fmt::format("verdict: rank {} is behind: at step {}, it has not begun {} #{}; its last call is {}{}\n",
                         r->rank, r->stepsDone + 1, ahead->op, maxSeq, describe(last),
                         last.endNs == 0 ? " (still inside it)" : " (finished)");
    }
    if (!waiting.empty())
      out += fmt::format("verdict: rank(s) {} wait in {} for it\n", fmt::join(waiting, ", "), describe(*ahead));
    return out;
  }
  if (waiting.size() == ranks.size())
    return out + fmt::format("verdict: no rank is behind: every rank is inside {} (suspect the transport, or a "
                             "rank not shown here)\n",
                             describe(*ahead));
  return out + fmt::format("verdict: no rank is behind: every rank has begun {}\n", describe(*ahead));
}

}  // namespace dtrain::launch
