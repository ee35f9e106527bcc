#include "lib/launch/sim_report.h"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>

#include "lib/common/error.h"
#include "lib/common/parse.h"
#include "lib/launch/plot.h"

namespace dtrain::launch {

namespace {

struct RoundSpan {
  int64_t firstStep = std::numeric_limits<int64_t>::max(), lastStep = -1;
  double firstStepT = std::numeric_limits<double>::infinity(), firstT = std::numeric_limits<double>::infinity();
  double lastT = -std::numeric_limits<double>::infinity();
  int world = 0;
  int64_t samplesAfterFirst = 0;
};

std::string seconds(const std::optional<double>& s) { return s ? fmt::format("{:.1f} s", *s) : "-"; }

}  // namespace

std::vector<SampleStep> readSampleLogs(const std::string& dir, double t0) {
  std::vector<SampleStep> steps;
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) return steps;
  for (const auto& f : std::filesystem::directory_iterator(dir)) {
    if (f.path().extension() != ".jsonl") continue;
    std::ifstream in(f.path());
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty()) continue;
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const std::exception&) {
        continue;  // a line cut short by a SIGKILL
      }
      SampleStep s;
      s.round = j.value("round", 0);
      s.rank = j.value("rank", 0);
      s.world = j.value("world", 1);
      s.epoch = j.value("epoch", int64_t{0});
      s.step = j.value("step", int64_t{0});
      s.t = j.value("t", t0) - t0;
      s.idx = j.value("idx", std::vector<int64_t>{});
      s.pad = j.value("pad", std::vector<int64_t>{});
      s.drop = j.value("drop", std::vector<int64_t>{});
      s.emptyEpoch = j.value("steps", int64_t{1}) == 0;
      steps.push_back(std::move(s));
    }
  }
  return steps;
}

void analyseSim(SimReport& report, const std::vector<SampleStep>& steps, const std::vector<SimAgentEvent>& events,
                const std::vector<SimFault>& faults, int nprocPerNode) {
  report.haveSamples = !steps.empty();
  std::map<int, RoundSpan> rounds;
  for (const auto& s : steps) {
    if (s.emptyEpoch) continue;  // not a step: no round's span or timing
    auto& r = rounds[s.round];
    r.firstStep = std::min(r.firstStep, s.step);
    r.lastStep = std::max(r.lastStep, s.step);
    r.firstT = std::min(r.firstT, s.t);
    r.lastT = std::max(r.lastT, s.t);
    r.world = s.world;
  }
  for (const auto& s : steps) {
    if (s.emptyEpoch) continue;
    auto& r = rounds[s.round];
    if (s.step == r.firstStep) r.firstStepT = std::min(r.firstStepT, s.t);
    else r.samplesAfterFirst += static_cast<int64_t>(s.idx.size() + s.pad.size());
  }
  auto nextRound = [&](int round) { return rounds.upper_bound(round); };

  // The final model's history: what no later round redid.
  SimAudit& a = report.audit;
  a.rounds = static_cast<int>(rounds.size());
  std::set<std::pair<int, int64_t>> kept, redone;
  std::map<int64_t, std::map<int64_t, int>> seen;
  std::map<int64_t, std::set<int64_t>> dropped;  // per epoch: what drop_last left out
  for (const auto& s : steps) {
    auto next = nextRound(s.round);
    if (next != rounds.end() && s.step >= next->second.firstStep) {
      if (!s.emptyEpoch) redone.insert({s.round, s.step});
      continue;
    }
    if (s.emptyEpoch) {
      // The epoch is checked like any other: its samples were trained before the resize or dropped.
      seen[s.epoch];
      dropped[s.epoch].insert(s.drop.begin(), s.drop.end());
      a.emptyEpochs.insert(s.epoch);
      continue;
    }
    kept.insert({s.round, s.step});
    auto& counts = seen[s.epoch];
    for (auto i : s.idx) counts[i]++;
    dropped[s.epoch].insert(s.drop.begin(), s.drop.end());
    a.samplesTrained += static_cast<int64_t>(s.idx.size() + s.pad.size());
    a.padding += static_cast<int64_t>(s.pad.size());
  }
  a.stepsKept = static_cast<int64_t>(kept.size());
  a.stepsRedone = static_cast<int64_t>(redone.size());
  const int64_t lastEpoch = seen.empty() ? -1 : seen.rbegin()->first;
  for (const auto& [epoch, counts] : seen) {
    ++a.epochsChecked;
    for (const auto& [sample, times] : counts) a.repeated += times - 1;
    // What drop_last left out is accounted for, not skipped (a sample both trained and dropped counts once).
    int64_t covered = static_cast<int64_t>(counts.size()), droppedHere = 0;
    for (auto i : dropped[epoch])
      if (!counts.contains(i)) ++droppedHere;
    covered += droppedHere;
    a.dropped += droppedHere;
    // The last epoch may be cut short (max_steps, or the job's end mid-epoch): complete only when it holds every
    // sample (a 5-epoch run that finished read "5 epoch(s) checked, 4 complete" and "checked for repeats only").
    if (epoch < lastEpoch || (a.datasetSize > 0 && covered == a.datasetSize)) {
      ++a.epochsComplete;
      if (a.datasetSize > 0) a.skipped += std::max<int64_t>(0, a.datasetSize - covered);
    }
  }

  // Throughput per node count: the rounds' steady parts (their first step, start-up, left out).
  std::map<int, std::pair<double, double>> byNodes;  // nodes -> (samples, seconds)
  for (const auto& [round, r] : rounds) {
    const double span = r.lastT - r.firstStepT;
    if (r.lastStep - r.firstStep < 2 || !(span > 0)) continue;
    const int nodes = std::max(1, r.world / std::max(1, nprocPerNode));
    byNodes[nodes].first += static_cast<double>(r.samplesAfterFirst);
    byNodes[nodes].second += span;
  }
  report.throughput.clear();
  for (const auto& [nodes, sums] : byNodes)
    report.throughput.push_back({nodes, nodes * nprocPerNode, sums.first / sums.second, sums.second, 0});
  if (!report.throughput.empty()) {
    const auto& base = report.throughput.front();
    for (auto& t : report.throughput)
      t.efficiency = (t.samplesPerSec / t.nodes) / (base.samplesPerSec / base.nodes);
  }

  // Each fault: which round was training when it hit, and how the next one came.
  report.faults.clear();
  for (const auto& f : faults) {
    SimFaultResult res{f, std::nullopt, std::nullopt, 0};
    const double tf = f.firedAt;
    const double tend = tf + std::chrono::duration<double>(f.duration).count();
    // A link's condition (slow, delay, loss) is not an event with a detection or a recovery.
    const bool condition = f.kind == SimFaultKind::kSlow || f.kind == SimFaultKind::kDelay || f.kind == SimFaultKind::kLoss;
    if (!condition && f.firedAt >= 0) {
      for (const auto& e : events)
        if (e.t >= tf && (e.what == "re-form" || e.what == "restart") &&
            (e.node != f.node || f.kind == SimFaultKind::kJoin)) {
          res.detection = e.t - tf;
          break;
        }
      int before = -1;
      for (const auto& [round, r] : rounds)
        if (r.firstT <= tf) before = round;
      // A new round that trains: recovered, counted from the fault's start (the group may re-form while a
      // partition or freeze still lasts). No new round: the first step after the fault's end, counted from there.
      double newRound = std::numeric_limits<double>::infinity(), anyAfter = newRound;
      for (const auto& s : steps) {
        if (s.emptyEpoch) continue;
        if (s.round > before && s.t >= tf) newRound = std::min(newRound, s.t);
        if (s.t >= tend) anyAfter = std::min(anyAfter, s.t);
      }
      if (std::isfinite(newRound)) res.recovery = newRound - tf;
      else if (std::isfinite(anyAfter)) res.recovery = anyAfter - tend;
      if (auto it = rounds.find(before); it != rounds.end()) {
        auto next = nextRound(before);
        if (next != rounds.end()) res.stepsRedone = std::max<int64_t>(0, it->second.lastStep - (next->second.firstStep - 1));
      }
    }
    report.faults.push_back(res);
  }

  std::map<int64_t, double> perSecond;
  for (const auto& s : steps)
    if (!s.emptyEpoch) perSecond[static_cast<int64_t>(std::floor(s.t))] += static_cast<double>(s.idx.size() + s.pad.size());
  report.samplesPerSecOverTime.clear();
  if (!perSecond.empty())
    for (int64_t sec = perSecond.begin()->first; sec <= perSecond.rbegin()->first; ++sec)
      report.samplesPerSecOverTime.emplace_back(static_cast<double>(sec) + 0.5, perSecond.count(sec) ? perSecond[sec] : 0.0);
}

std::string simReportJson(const SimReport& r) {
  nlohmann::json j = {{"nodes", r.nodes}, {"nproc_per_node", r.nprocPerNode}, {"network", r.network},
                      {"seconds", r.seconds}, {"exit_code", r.exitCode}};
  const auto& a = r.audit;
  j["samples"] = {{"dataset_size", a.datasetSize}, {"trained", a.samplesTrained}, {"steps_kept", a.stepsKept},
                  {"steps_redone", a.stepsRedone}, {"repeated", a.repeated}, {"padding", a.padding}, {"skipped", a.skipped},
                  {"dropped", a.dropped}, {"empty_epochs", a.emptyEpochs},
                  {"epochs_checked", a.epochsChecked}, {"epochs_complete", a.epochsComplete}, {"rounds", a.rounds},
                  {"logged", r.haveSamples}};
  j["throughput"] = nlohmann::json::array();
  for (const auto& t : r.throughput)
    j["throughput"].push_back({{"nodes", t.nodes}, {"ranks", t.world}, {"samples_per_s", t.samplesPerSec},
                               {"efficiency", t.efficiency}, {"seconds", t.seconds}});
  j["faults"] = nlohmann::json::array();
  for (const auto& f : r.faults)
    j["faults"].push_back({{"fault", f.fault.text}, {"fired_at_s", f.fault.firedAt >= 0 ? nlohmann::json(f.fault.firedAt) : nlohmann::json(nullptr)},
                           {"detection_s", f.detection ? nlohmann::json(*f.detection) : nlohmann::json(nullptr)},
                           {"recovery_s", f.recovery ? nlohmann::json(*f.recovery) : nlohmann::json(nullptr)},
                           {"steps_redone", f.stepsRedone}});
  j["links"] = nlohmann::json::array();
  for (size_t i = 0; i < r.links.size(); ++i)
    j["links"].push_back({{"node", i}, {"to_node_bytes", r.links[i].toNode}, {"from_node_bytes", r.links[i].fromNode}});
  return j.dump(2) + "\n";
}

std::string formatSimReport(const SimReport& r) {
  std::string out = fmt::format("dtrain sim: {} node(s) x {} worker(s), {}; {:.1f} s; exit code {}\n", r.nodes,
                                r.nprocPerNode, r.network, r.seconds, r.exitCode);
  if (r.haveSamples) {
    const auto& a = r.audit;
    out += fmt::format("samples: {} trained in {} steps that make the final model ({} round(s); {} step(s) redone "
                       "after restarts, not counted); repeated {}{}, skipped {}{} -> {}\n",
                       a.samplesTrained, a.stepsKept, a.rounds, a.stepsRedone, a.repeated,
                       a.padding > 0 ? fmt::format(" (and {} padding: the sampler repeats an epoch's first samples to "
                                                   "fill the world's last round, as PyTorch's DistributedSampler)",
                                                   a.padding)
                                     : std::string(),
                       a.datasetSize > 0 ? std::to_string(a.skipped) : "n/a (dataset size unknown)",
                       fmt::format(" ({}{} epoch(s) checked, {} complete, {} samples each)",
                                   a.dropped > 0 ? fmt::format("and {} dropped by data.drop_last: what fills no whole "
                                                               "round of the world or whole batch, as PyTorch's "
                                                               "DistributedSampler and DataLoader drop it; ",
                                                               a.dropped)
                                                 : std::string(),
                                   a.epochsChecked, a.epochsComplete, a.datasetSize),
                       a.repeated == 0 && a.skipped == 0
                           // The last epoch may be cut short (max_steps): only its repeats are counted, so "every
                           // sample seen once" must not overclaim for it (a one-epoch job has no complete epoch).
                           ? fmt::format("OK: every sample seen once{}{}",
                                         a.dropped > 0 ? ", except those drop_last dropped" : "",
                                         a.epochsComplete < a.epochsChecked ? " (the last epoch, which max_steps may "
                                                                              "cut short, is checked for repeats only)"
                                                                            : "")
                           : "FAIL");
    if (!a.emptyEpochs.empty()) {
      std::vector<int64_t> oneBased;
      for (int64_t e : a.emptyEpochs) oneBased.push_back(e + 1);
      out += fmt::format("         epoch(s) {} took 0 steps: with data.drop_last every rank's share of what was left "
                         "of them made no whole batch (PyTorch's DataLoader(drop_last=True) yields none); their "
                         "samples count as dropped\n",
                         fmt::join(oneBased, ", "));
    }
  } else {
    out += "samples: no sample logs (not a job file, or no step ran)\n";
  }
  if (!r.throughput.empty()) {
    out += "throughput (steady part of each round, first step left out):\n";
    out += fmt::format("  {:>5} {:>5} {:>11} {:>11} {:>9}\n", "nodes", "ranks", "samples/s", "efficiency", "over");
    for (const auto& t : r.throughput)
      out += fmt::format("  {:>5} {:>5} {:>11.1f} {:>10.1f}% {:>7.1f} s\n", t.nodes, t.world, t.samplesPerSec,
                         100 * t.efficiency, t.seconds);
  }
  if (!r.faults.empty()) {
    out += "faults:\n";
    out += fmt::format("  {:<26} {:>8} {:>10} {:>10} {:>12}\n", "fault", "at", "detection", "recovery", "steps redone");
    for (const auto& f : r.faults)
      out += fmt::format("  {:<26} {:>8} {:>10} {:>10} {:>12}\n", f.fault.text,
                         f.fault.firedAt >= 0 ? fmt::format("{:.1f} s", f.fault.firedAt) : "never",
                         seconds(f.detection), seconds(f.recovery),
                         f.fault.kind == SimFaultKind::kSlow || f.fault.kind == SimFaultKind::kDelay ||
                                 f.fault.kind == SimFaultKind::kLoss
                             ? "-"
                             : std::to_string(f.stepsRedone));
  }
  if (!r.links.empty()) {
    out += "links (bytes through each node's veth, from the hub end's counters):\n";
    out += fmt::format("  {:<8} {:>12} {:>12}\n", "node", "to node", "from node");
    for (size_t i = 0; i < r.links.size(); ++i)
      out += fmt::format("  {:<8} {:>12} {:>12}\n", fmt::format("node{}", i), parse::formatBytes(r.links[i].toNode),
                         parse::formatBytes(r.links[i].fromNode));
  }
  return out;
}

void writeSimReport(const SimReport& r, const std::string& path) {
  const bool html = path.size() > 5 && path.compare(path.size() - 5, 5, ".html") == 0;
  const bool svg = path.size() > 4 && path.compare(path.size() - 4, 4, ".svg") == 0;
  DTRAIN_CHECK_AS(UsageError, html || svg, "--report {}: expected a FILE.svg or FILE.html", path);
  std::vector<ChartPanel> panels;
  ChartPanel time{"samples/s over time (all ranks)", "seconds since start", {{"samples/s", r.samplesPerSecOverTime}}, {}};
  for (const auto& f : r.faults)
    if (f.fault.firedAt >= 0) time.vlines.emplace_back(f.fault.firedAt, f.fault.text);
  panels.push_back(time);
  ChartPanel scaling{"throughput vs node count", "nodes", {}, {}};
  ChartSeries measured{"measured samples/s", {}, true}, ideal{"linear from the smallest", {}, false};
  for (const auto& t : r.throughput) {
    measured.points.emplace_back(t.nodes, t.samplesPerSec);
    const auto& b = r.throughput.front();
    ideal.points.emplace_back(t.nodes, b.samplesPerSec / b.nodes * t.nodes);
  }
  scaling.series = {measured, ideal};
  panels.push_back(scaling);
  ChartPanel faults{"fault detection and recovery (s)", "fault number", {}, {}};
  ChartSeries det{"detection", {}, true}, rec{"recovery", {}, true};
  for (size_t i = 0; i < r.faults.size(); ++i) {
    if (r.faults[i].detection) det.points.emplace_back(static_cast<double>(i + 1), *r.faults[i].detection);
    if (r.faults[i].recovery) rec.points.emplace_back(static_cast<double>(i + 1), *r.faults[i].recovery);
  }
  faults.series = {det, rec};
  panels.push_back(faults);
  ChartPanel links{"MB through each link", "node", {}, {}};
  ChartSeries to{"to node", {}, true}, from{"from node", {}, true};
  for (size_t i = 0; i < r.links.size(); ++i) {
    to.points.emplace_back(static_cast<double>(i), static_cast<double>(r.links[i].toNode) / 1e6);
    from.points.emplace_back(static_cast<double>(i), static_cast<double>(r.links[i].fromNode) / 1e6);
  }
  links.series = {to, from};
  panels.push_back(links);
  const std::string title = fmt::format("dtrain sim: {} node(s) x {}, {}; repeated {}, skipped {}", r.nodes,
                                        r.nprocPerNode, r.network, r.audit.repeated, r.audit.skipped);
  const std::string chart = renderChart(title, panels);
  std::ofstream out(path);
  out << (html ? wrapHtml(title, chart + "<pre>" + formatSimReport(r) + "</pre>") : chart);
  DTRAIN_CHECK(out.good(), "--report {}: cannot write the file", path);
}

}  // namespace dtrain::launch
