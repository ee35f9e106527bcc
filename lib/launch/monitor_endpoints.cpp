#include "lib/launch/monitor_endpoints.h"

#include <fmt/format.h>

#include <algorithm>
#include <sstream>

#include "lib/common/net.h"
#include "lib/common/parse.h"

namespace dtrain::launch {

std::string monitorEndpointLine(const MonitorEndpoint& endpoint) {
  return fmt::format("{} node_rank={} pid={} hostname={}\n", endpoint.address, endpoint.nodeRank, endpoint.pid,
                     endpoint.hostname);
}

namespace {

// One registration line, or nothing when it does not start with HOST:PORT.
std::optional<MonitorEndpoint> parseLine(const std::string& line) {
  std::istringstream in(line);
  MonitorEndpoint e;
  if (!(in >> e.address)) return std::nullopt;
  auto hp = net::parseHostPort(e.address, 0);
  if (!hp || hp->port == 0) return std::nullopt;
  for (std::string field; in >> field;) {
    const auto eq = field.find('=');
    if (eq == std::string::npos) continue;
    const std::string key = field.substr(0, eq), value = field.substr(eq + 1);
    if (key == "node_rank") e.nodeRank = static_cast<int>(parse::toInt(value).value_or(-1));
    else if (key == "pid") e.pid = static_cast<int>(parse::toInt(value).value_or(0));
    else if (key == "hostname") e.hostname = value;
  }
  return e;
}

}  // namespace

MonitorEndpoints currentMonitorEndpoints(std::string_view text) {
  std::vector<MonitorEndpoint> all;
  std::istringstream lines{std::string(text)};
  for (std::string line; std::getline(lines, line);)
    if (auto e = parseLine(line)) all.push_back(std::move(*e));
  auto sameNode = [](const MonitorEndpoint& a, const MonitorEndpoint& b) {
    return a.nodeRank >= 0 && a.nodeRank == b.nodeRank;
  };
  MonitorEndpoints out;
  std::vector<const MonitorEndpoint*> replacedByRank;
  for (size_t i = 0; i < all.size(); ++i) {
    bool sameAddressLater = false, sameNodeLater = false;
    for (size_t j = i + 1; j < all.size(); ++j) {
      sameAddressLater = sameAddressLater || all[j].address == all[i].address;
      sameNodeLater = sameNodeLater || sameNode(all[j], all[i]);
    }
    if (!sameAddressLater && !sameNodeLater) out.current.push_back(all[i]);
    else if (!sameAddressLater) replacedByRank.push_back(&all[i]);
  }
  // What replaced each: the current registration of its node rank (a node that restarted twice has one).
  for (const MonitorEndpoint* old : replacedByRank) {
    auto by = std::find_if(out.current.begin(), out.current.end(), [&](const auto& c) { return sameNode(c, *old); });
    if (by != out.current.end() && by->address != old->address) out.superseded.push_back({*old, *by});
  }
  auto byAddress = [](const MonitorEndpoint& a, const MonitorEndpoint& b) { return a.address < b.address; };
  std::sort(out.current.begin(), out.current.end(), byAddress);
  std::sort(out.superseded.begin(), out.superseded.end(),
            [&](const auto& a, const auto& b) { return byAddress(a.old, b.old); });
  return out;
}

}  // namespace dtrain::launch
