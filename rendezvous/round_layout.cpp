#include "rendezvous/round_layout.h"

#include <algorithm>
#include <charconv>
#include <climits>
#include <string_view>

#include "lib/common/error.h"

namespace dtrain::rendezvous::layout {

namespace {

// Reads the next whitespace-separated integer of `line` into `out`; false when there is none.
bool nextInt(std::string_view& line, int& out) {
  while (!line.empty() && line.front() == ' ') line.remove_prefix(1);
  auto [p, ec] = std::from_chars(line.data(), line.data() + line.size(), out);
  if (ec != std::errc()) return false;
  line.remove_prefix(static_cast<size_t>(p - line.data()));
  return true;
}

// The rest of `line` after one separating space: a record's JSON (possibly empty).
std::string rest(std::string_view line) {
  while (!line.empty() && line.front() == ' ') line.remove_prefix(1);
  return std::string(line);
}

// Splits `text` into lines (the last one may lack its newline).
std::vector<std::string_view> lines(std::string_view text) {
  std::vector<std::string_view> out;
  while (!text.empty()) {
    auto eol = text.find('\n');
    out.push_back(text.substr(0, eol));
    if (eol == std::string_view::npos) break;
    text.remove_prefix(eol + 1);
  }
  return out;
}

// "<keyword> <N> <world> <restarts> <reforms>" into `p`; false when malformed or N != members.
bool header(std::string_view line, std::string_view keyword, int members, Parsed& p) {
  if (line.substr(0, keyword.size() + 1) != std::string(keyword) + " ") return false;
  line.remove_prefix(keyword.size());
  return nextInt(line, p.numNodes) && nextInt(line, p.worldSize) && nextInt(line, p.restarts) &&
         nextInt(line, p.reforms) && p.numNodes == members;
}

}  // namespace

std::string recordLine(int index, const NodeInfo& self) {
  return fmt::format("{} {} {} {}\n", index, self.nproc, self.requestedNodeRank, self.toJson());
}

std::string withdrawnLine(int index) { return fmt::format("{} 0 -1 withdrawn\n", index); }

std::vector<std::optional<Joined>> parseRecords(const std::string& records, int members) {
  std::vector<std::optional<Joined>> byIndex(static_cast<size_t>(std::max(members, 0)));
  auto all = lines(records);
  // A line without its newline is an append still being written (never the case with whole appends; be safe).
  if (!records.empty() && records.back() != '\n') all.pop_back();
  for (auto line : all) {
    Joined j;
    if (!nextInt(line, j.index) || !nextInt(line, j.nproc) || !nextInt(line, j.requestedNodeRank)) continue;
    if (j.index < 0 || j.index >= members) continue;
    if (j.nproc == 0) {  // withdrawnLine: the joiner left before the round closed; a later joiner may take the index
      byIndex[static_cast<size_t>(j.index)].reset();
      continue;
    }
    if (j.nproc < 1) continue;
    j.record = rest(line);
    byIndex[static_cast<size_t>(j.index)] = std::move(j);
  }
  return byIndex;
}

std::string build(const std::vector<Joined>& byIndex, int restarts, int reforms) {
  std::vector<const Joined*> order;
  order.reserve(byIndex.size());
  for (const auto& j : byIndex) order.push_back(&j);
  std::stable_sort(order.begin(), order.end(), [](const Joined* a, const Joined* b) {
    int ra = a->requestedNodeRank < 0 ? INT_MAX : a->requestedNodeRank;
    int rb = b->requestedNodeRank < 0 ? INT_MAX : b->requestedNodeRank;
    return ra != rb ? ra < rb : a->index < b->index;
  });
  for (size_t i = 1; i < order.size(); ++i) {
    if (order[i - 1]->requestedNodeRank < 0 || order[i - 1]->requestedNodeRank != order[i]->requestedNodeRank)
      continue;
    auto a = NodeInfo::fromJson(order[i - 1]->record);
    auto b = NodeInfo::fromJson(order[i]->record);
    return fmt::format("error node rank {} is claimed by two agents ({} pid {} and {} pid {}); give each node "
                       "its own --node-rank",
                       a.requestedNodeRank, a.hostname, a.pid, b.hostname, b.pid);
  }
  int world = 0;
  size_t bytes = 0;
  for (const auto* j : order) {
    world += j->nproc;
    bytes += j->record.size() + 16;
  }
  std::string out = fmt::format("layout {} {} {} {}\n", order.size(), world, restarts, reforms);
  out.reserve(out.size() + bytes);
  for (const auto* j : order) out += fmt::format("{} {} {}\n", j->index, j->nproc, j->record);
  return out;
}

Parsed parseLayout(const std::string& text, int members, int round) {
  auto bad = [&] {
    DTRAIN_THROW(ProtocolError, "rendezvous: malformed layout of round {}: '{}'", round, text.substr(0, 200));
  };
  auto all = lines(text);
  Parsed p;
  if (all.empty() || !header(all.front(), "layout", members, p) || all.size() != static_cast<size_t>(members) + 1)
    bad();
  int offset = 0;
  for (size_t i = 1; i < all.size(); ++i) {
    auto line = all[i];
    Placed node;
    node.nodeRank = static_cast<int>(i - 1);
    if (!nextInt(line, node.joinIndex) || !nextInt(line, node.nproc)) bad();
    if (node.joinIndex < 0 || node.joinIndex >= members || node.nproc < 1) bad();
    node.record = rest(line);
    node.rankOffset = offset;
    offset += node.nproc;
    p.nodes.push_back(std::move(node));
  }
  if (offset != p.worldSize) bad();
  return p;
}

Parsed parseAssignment(const std::string& text, int members, int round) {
  auto bad = [&] {
    DTRAIN_THROW(ProtocolError, "rendezvous: malformed assignment in round {}: '{}'", round, text.substr(0, 200));
  };
  auto all = lines(text);
  Parsed p;
  if (all.size() < 2 || !header(all.front(), "assign", members, p)) bad();
  for (size_t i = 1; i < all.size(); ++i) {
    auto line = all[i];
    Placed node;
    if (!nextInt(line, node.nodeRank) || !nextInt(line, node.joinIndex) || !nextInt(line, node.rankOffset) ||
        !nextInt(line, node.nproc))
      bad();
    if (node.nodeRank < 0 || node.nodeRank >= members || node.joinIndex < 0 || node.joinIndex >= members ||
        node.nproc < 1 || node.rankOffset < 0)
      bad();
    node.record = rest(line);
    p.nodes.push_back(std::move(node));
  }
  return p;
}

std::vector<int> ringWatched(int nodeRank, int numNodes) {
  std::vector<int> watched;
  for (int k = 1; k <= kRingWatch && k < numNodes; ++k) watched.push_back((nodeRank + k) % numNodes);
  return watched;
}

std::vector<std::string> assignments(const std::string& layoutText, int members, int round) {
  if (layoutText.rfind("error ", 0) == 0) return std::vector<std::string>(static_cast<size_t>(members), layoutText);
  auto p = parseLayout(layoutText, members, round);
  std::vector<std::string> out(static_cast<size_t>(members));
  auto line = [&](std::string& text, int r) {
    const auto& n = p.nodes[static_cast<size_t>(r)];
    text += fmt::format("{} {} {} {} {}\n", r, n.joinIndex, n.rankOffset, n.nproc, n.record);
  };
  for (int r = 0; r < members; ++r) {
    std::string text = fmt::format("assign {} {} {} {}\n", members, p.worldSize, p.restarts, p.reforms);
    line(text, r);
    if (r != 0) line(text, 0);
    for (int w : ringWatched(r, members))
      if (w != 0) line(text, w);
    out[static_cast<size_t>(p.nodes[static_cast<size_t>(r)].joinIndex)] = std::move(text);
  }
  return out;
}

}  // namespace dtrain::rendezvous::layout
