// The text formats that describe a rendezvous round's membership (keys in rendezvous.h), and the pure functions
// that write and read them. Internal to rendezvous.cpp (and its tests): no store access here.
//
//   r<R>/records     one line per joiner, appended as it joins:
//                    "<join index> <nproc> <node rank or -1> <NodeInfo JSON>\n". The JSON is one line (nlohmann's
//                    dump); a line without it is valid (the joiner's r<R>/node/<i> record is read instead).
//   r<R>/layout      "layout <N> <world> <restarts> <reforms>\n", then per node rank in order
//                    "<join index> <nproc> <NodeInfo JSON>\n"; or "error <message>" when the joiners cannot form
//                    a group (two claim one node rank). Deterministic in the records, so any member may write it.
//   r<R>/assign/<i>  rounds of more than kFullMembershipNodes nodes: "assign <N> <world> <restarts> <reforms>\n"
//                    then "<node rank> <join index> <rank offset> <nproc> <NodeInfo JSON>\n" for joiner i itself
//                    (first), node 0 and the kRingWatch nodes it watches; or the layout's "error ..." line.
// Each member thus learns everything it needs (ranks, world size, restart counts, node 0's address for
// MASTER_ADDR, the watched nodes' records for reports) from one value read once: no further round trips.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "rendezvous/rendezvous.h"

namespace dtrain::rendezvous::layout {

// One joiner, from its records line.
struct Joined {
  int index = 0;
  int nproc = 1;
  int requestedNodeRank = -1;
  std::string record;  // NodeInfo JSON; empty when its line carried none
};

// This joiner's records line.
std::string recordLine(int index, const NodeInfo& self);
// The line that cancels joiner `index`'s earlier lines (it withdrew before the round closed: Rendezvous::join);
// a later joiner that takes the same index appends its own line after it.
std::string withdrawnLine(int index);
// The joiners with index < members, by join index (the last line of an index wins); nullopt where no (well-formed)
// line exists yet or the last one is a withdrawnLine.
std::vector<std::optional<Joined>> parseRecords(const std::string& records, int members);

// The layout text of `joined` (one entry per join index, each with its record), or "error ...".
std::string build(const std::vector<Joined>& joined, int restarts, int reforms);

// One node of a layout or assignment.
struct Placed {
  int nodeRank = 0;
  int joinIndex = 0;
  int rankOffset = 0;
  int nproc = 1;
  std::string record;  // NodeInfo JSON
};

struct Parsed {
  int numNodes = 0;
  int worldSize = 0;
  int restarts = 0;
  int reforms = 0;
  std::vector<Placed> nodes;  // layout: every node, by node rank; assignment: self first, then the others
};

// Parse a layout / an assignment of a round of `members` nodes; ProtocolError naming the round when malformed.
// The caller handles "error ..." texts before.
Parsed parseLayout(const std::string& text, int members, int round);
Parsed parseAssignment(const std::string& text, int members, int round);

// Every joiner's assignment text, by join index (an error layout gives every joiner that error).
std::vector<std::string> assignments(const std::string& layoutText, int members, int round);

// Large rounds: the kRingWatch node ranks after `nodeRank`, modulo numNodes.
std::vector<int> ringWatched(int nodeRank, int numNodes);

}  // namespace dtrain::rendezvous::layout
