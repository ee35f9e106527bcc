#include "lib/launch/sim_faults.h"

#include <algorithm>
#include <cctype>
#include <set>

#include "lib/common/error.h"
#include "lib/common/parse.h"

namespace dtrain::launch {

namespace {

int parseNode(const std::string& entry, const std::string& name) {
  DTRAIN_CHECK_AS(UsageError, name.size() > 4 && name.compare(0, 4, "node") == 0,
                  "--faults '{}': '{}' is not a node (expected node0, node1, ...)", entry, name);
  auto n = parse::toInt(name.substr(4));
  DTRAIN_CHECK_AS(UsageError, n && *n >= 0 && *n < 4096, "--faults '{}': '{}' is not a node (expected node0, node1, ...)",
                  entry, name);
  return static_cast<int>(*n);
}

// "stepN" -> N, else -1.
int64_t parseStep(const std::string& entry, const std::string& value) {
  if (value.compare(0, 4, "step") != 0) return -1;
  auto n = parse::toInt(value.substr(4));
  DTRAIN_CHECK_AS(UsageError, n && *n >= 1, "--faults '{}': '{}' is not a step (expected stepN with N >= 1)", entry, value);
  return *n;
}

std::chrono::milliseconds parseTime(const std::string& entry, const std::string& value) {
  auto d = parse::toDuration(value);
  DTRAIN_CHECK_AS(UsageError, d.has_value() && d->count() >= 0, "--faults '{}': '{}' is not a time (expected {})",
                  entry, value, parse::kDurationExpected);
  return *d;
}

}  // namespace

const char* simFaultName(SimFaultKind kind) {
  switch (kind) {
    case SimFaultKind::kKill: return "kill";
    case SimFaultKind::kFreeze: return "freeze";
    case SimFaultKind::kPartition: return "partition";
    case SimFaultKind::kSlow: return "slow";
    case SimFaultKind::kJoin: return "join";
    case SimFaultKind::kDelay: return "delay";
    case SimFaultKind::kLoss: return "loss";
  }
  return "?";
}

void checkTcRate(const std::string& rate, const std::string& what) {
  size_t digits = 0;
  while (digits < rate.size() && (std::isdigit(static_cast<unsigned char>(rate[digits])) || rate[digits] == '.')) ++digits;
  static const std::set<std::string> kUnits = {"bit", "kbit", "mbit", "gbit", "bps", "kbps", "mbps", "gbps"};
  std::string unit = rate.substr(digits);
  std::transform(unit.begin(), unit.end(), unit.begin(), [](unsigned char c) { return std::tolower(c); });
  DTRAIN_CHECK_AS(UsageError, digits > 0 && kUnits.count(unit) > 0 && parse::toDouble(rate.substr(0, digits)).value_or(0) > 0,
                  "{} '{}': expected a rate such as 10mbit, 100mbit or 1gbit", what, rate);
}

std::vector<SimFault> parseSimFaults(const std::string& text, int initialNodes) {
  std::vector<SimFault> faults;
  std::string normalized = text;
  std::replace(normalized.begin(), normalized.end(), ';', ',');
  std::set<int> killed, joined, delayed;
  for (auto piece : parse::split(normalized, ',')) {
    std::string entry(parse::trim(piece));
    if (entry.empty()) continue;
    SimFault f;
    f.text = entry;
    auto colon = entry.find(':');
    DTRAIN_CHECK_AS(UsageError, colon != std::string::npos,
                    "--faults '{}': expected KIND:nodeK@T (kill, freeze, partition, slow, join, delay, loss)", entry);
    std::string kind = entry.substr(0, colon), rest = entry.substr(colon + 1);
    if (kind == "kill") f.kind = SimFaultKind::kKill;
    else if (kind == "freeze") f.kind = SimFaultKind::kFreeze;
    else if (kind == "partition") f.kind = SimFaultKind::kPartition;
    else if (kind == "slow") f.kind = SimFaultKind::kSlow;
    else if (kind == "join") f.kind = SimFaultKind::kJoin;
    else if (kind == "delay") f.kind = SimFaultKind::kDelay;
    else if (kind == "loss") f.kind = SimFaultKind::kLoss;
    else DTRAIN_THROW(UsageError, "--faults '{}': unknown fault '{}' (expected kill, freeze, partition, slow, join, delay or loss)", entry, kind);
    std::string node = rest, when;
    if (f.kind == SimFaultKind::kDelay) {
      auto eq = rest.find('=');
      DTRAIN_CHECK_AS(UsageError, eq != std::string::npos && rest.find('@') == std::string::npos,
                      "--faults '{}': expected delay:nodeK=D, e.g. delay:node1=20ms (a delay holds from the start: "
                      "it takes no @T)", entry);
      node = rest.substr(0, eq);
      f.delay = parseTime(entry, rest.substr(eq + 1));
      DTRAIN_CHECK_AS(UsageError, f.delay.count() > 0 && f.delay.count() <= 10000,
                      "--faults '{}': the delay must be between 1ms and 10s", entry);
    } else if (f.kind == SimFaultKind::kLoss) {
      auto eq = rest.find('=');
      DTRAIN_CHECK_AS(UsageError, eq != std::string::npos, "--faults '{}': expected loss:nodeK=P%[@T], e.g. loss:node1=1%", entry);
      node = rest.substr(0, eq);
      std::string percent = rest.substr(eq + 1);
      if (auto at = percent.find('@'); at != std::string::npos) {
        when = percent.substr(at + 1);
        percent = percent.substr(0, at);
        f.atStep = parseStep(entry, when);
        if (f.atStep < 0) f.at = parseTime(entry, when);
      }
      auto value = percent.size() > 1 && percent.back() == '%' ? parse::toDouble(percent.substr(0, percent.size() - 1))
                                                               : std::nullopt;
      DTRAIN_CHECK_AS(UsageError, value && *value > 0 && *value < 100,
                      "--faults '{}': '{}' is not a loss (expected a percentage above 0 and below 100, e.g. 1%)", entry,
                      percent);
      f.lossPercent = *value;
    } else if (f.kind == SimFaultKind::kSlow) {
      auto eq = rest.find('=');
      DTRAIN_CHECK_AS(UsageError, eq != std::string::npos, "--faults '{}': expected slow:nodeK=RATE[@T]", entry);
      node = rest.substr(0, eq);
      std::string rate = rest.substr(eq + 1);
      if (auto at = rate.find('@'); at != std::string::npos) {
        when = rate.substr(at + 1);
        rate = rate.substr(0, at);
        f.atStep = parseStep(entry, when);
        if (f.atStep < 0) f.at = parseTime(entry, when);
      }
      checkTcRate(rate, fmt::format("--faults '{}':", entry));
      f.rate = rate;
    } else {
      auto at = rest.find('@');
      DTRAIN_CHECK_AS(UsageError, at != std::string::npos, "--faults '{}': expected {}:nodeK@T{}", entry, kind,
                      f.kind == SimFaultKind::kFreeze || f.kind == SimFaultKind::kPartition ? "+D" : "");
      node = rest.substr(0, at);
      when = rest.substr(at + 1);
      auto plus = when.find('+');
      const bool needsDuration = f.kind == SimFaultKind::kFreeze || f.kind == SimFaultKind::kPartition;
      DTRAIN_CHECK_AS(UsageError, needsDuration == (plus != std::string::npos), "--faults '{}': {}", entry,
                      needsDuration ? fmt::format("{} needs a duration: {}:nodeK@T+D, e.g. {}:node1@8s+3s", kind, kind, kind)
                                    : fmt::format("{} takes no duration (expected {}:nodeK@T)", kind, kind));
      if (needsDuration) {
        f.duration = parseTime(entry, when.substr(plus + 1));
        DTRAIN_CHECK_AS(UsageError, f.duration.count() > 0, "--faults '{}': the duration must be positive", entry);
        when = when.substr(0, plus);
      }
      f.atStep = parseStep(entry, when);
      if (f.atStep < 0) f.at = parseTime(entry, when);
    }
    f.node = parseNode(entry, node);
    if (f.kind == SimFaultKind::kJoin) {
      const int expected = initialNodes + static_cast<int>(joined.size());
      DTRAIN_CHECK_AS(UsageError, f.node == expected,
                      "--faults '{}': the next node to join is node{} (--nodes {} makes node0..node{}; joins add the "
                      "following numbers in order)", entry, expected, initialNodes, initialNodes - 1);
      joined.insert(f.node);
    } else {
      const int known = initialNodes + static_cast<int>(joined.size());
      DTRAIN_CHECK_AS(UsageError, f.node < known,
                      "--faults '{}': there is no node{} (--nodes {}{}; a joining node must be named by its join "
                      "before other faults)", entry, f.node, initialNodes,
                      joined.empty() ? "" : fmt::format(" plus {} joined", joined.size()));
    }
    if (f.kind == SimFaultKind::kKill) {
      DTRAIN_CHECK_AS(UsageError, killed.insert(f.node).second, "--faults '{}': node{} is killed twice", entry, f.node);
    }
    if (f.kind == SimFaultKind::kDelay) {
      DTRAIN_CHECK_AS(UsageError, delayed.insert(f.node).second, "--faults '{}': node{} is given two delays", entry, f.node);
    }
    faults.push_back(f);
  }
  return faults;
}

std::chrono::milliseconds simLinkDelay(const std::vector<SimFault>& faults, int node) {
  for (const auto& f : faults)
    if (f.kind == SimFaultKind::kDelay && f.node == node) return f.delay;
  return std::chrono::milliseconds(0);
}

int simTotalNodes(const std::vector<SimFault>& faults, int initialNodes) {
  int total = initialNodes;
  for (const auto& f : faults)
    if (f.kind == SimFaultKind::kJoin) total = std::max(total, f.node + 1);
  return total;
}

int simSurvivingNodes(const std::vector<SimFault>& faults, int initialNodes) {
  int lost = 0;
  for (const auto& f : faults)
    if (f.kind == SimFaultKind::kKill || f.kind == SimFaultKind::kFreeze || f.kind == SimFaultKind::kPartition) ++lost;
  return std::max(1, initialNodes - lost);
}

}  // namespace dtrain::launch
