// Slurm's compressed list notations, expanded: host lists (SLURM_JOB_NODELIST="node[01-04,07]") and repeated
// counts (SLURM_TASKS_PER_NODE="2(x3),1"). Pure functions, no Slurm needed; thread-safe; nothing blocks.
//
// Host list grammar (what Slurm's hostlist_create accepts, checked against `scontrol show hostnames`):
//   list  := item { sep item }        sep: ',' or blanks (tabs, spaces) outside brackets
//   item  := text { '[' ranges ']' text }
//   ranges:= range { ',' range }      range: DIGITS | DIGITS '-' DIGITS  (LOW <= HIGH, at most 65536 values)
// Zero padding is the width of LOW as typed: node[08-10] gives node08 node09 node10; n[1-010] gives n1..n10.
// Several bracket groups form a cartesian product in Slurm's own order, which is not plain lexicographic: for
// groups g1..gk the loops run, outermost first, g(k-1), g(k-2), ..., g1 and then gk innermost. So a[1-2]b[3-4]
// is a1b3 a1b4 a2b3 a2b4, but x[1-2]y[3-4]z[5-6] is x1y3z5 x1y3z6 x2y3z5 x2y3z6 x1y4z5 ... (Slurm 22.05 does so).
// Accepted beyond Slurm, because sites name hosts that way and the meaning is unambiguous: text after the last
// bracket (node[1-2]-ib) and non-numeric names inside brackets (gpu-[1-2]-[a,b], each name taken as is).
// Rejected with a UsageError that quotes the input and names the position (1-based) and the problem: unbalanced
// or nested brackets, reversed ranges (3-1), empty items (a,,b or node[] or a trailing comma), steps (1-10:2,
// which Slurm does not have either), numbers of more than 18 digits, more than 1,048,576 hosts in all.
// An empty or all-blank input is an empty list, as in Slurm.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace dtrain::launch {

std::vector<std::string> expandHostlist(std::string_view hostlist);

// First host of a non-empty list (the store host of a Slurm step); throws UsageError when the list is empty.
std::string firstHost(std::string_view hostlist);

// Slurm's per-node counts, SLURM_TASKS_PER_NODE / SLURM_JOB_CPUS_PER_NODE: "2(x3),1" -> {2, 2, 2, 1}.
// Each item is COUNT or COUNT(xREPEAT) with REPEAT >= 1; throws UsageError naming the input and position.
std::vector<int> expandTasksPerNode(std::string_view value);

}  // namespace dtrain::launch
