// The virtual network of `dtrain sim` (docs/sim.md): one network namespace per node plus a hub namespace that
// holds a bridge, each node joined to it by a veth pair, links shaped with tc tbf.
//
//   hub namespace:  br0 10.200.0.254/24 (the rendezvous store listens here)
//                   ├─ n0 ══ veth ══ eth0 10.200.0.1/24   node0's namespace
//                   ├─ n1 ══ veth ══ eth0 10.200.0.2/24   node1's namespace ...
//
// No namespace is named (nothing under /var/run/netns) and nothing is added to the host's own namespace: each
// namespace belongs to a tiny holder process (a fork of this one that called unshare(CLONE_NEWNET) and waits),
// tools and agents enter it with nsenter --net=/proc/HOLDER/ns/net. A namespace, its veth ends (and so the
// pairs) and its qdiscs disappear with the last process inside it, so nothing outlives the sim however it ends:
// the holders die with it (PR_SET_PDEATHSIG) and the agents are stopped by the process-tree watchdog
// (process_tree.h). Two sims can run at once: their 10.200.0.0/24 networks never meet.
//
// Shaping: tbf on both ends of a node's veth (egress of each side), so the rate holds in both directions. This
// kernel has no netem: loss is iptables' statistic match in the node's namespace (setLoss), latency is dtrain's
// own transport (DTRAIN_LINK_DELAY, lib/comm/tcp/conn.h); a partition takes the node's bridge port down.
//
// Without root (or without ip/tc/nsenter) the sim runs on loopback instead: every node on 127.0.0.(K+2), the store
// on 127.0.0.1, no shaping, no partitions, no per-link counters; the caller says so.
//
// Thread-safety: one thread. Blocking: every call runs `ip`/`tc` and waits for it (milliseconds).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace dtrain::launch {

// Runs `argv` (PATH lookup) inside the network namespace of process `nsPid` (0: this process's) and returns its
// stdout. Throws Error naming the command with its stderr when it fails.
std::string runInNamespace(pid_t nsPid, const std::vector<std::string>& argv);

// Whether namespaces can be used here; otherwise `why` says what is missing (not root, no `ip`...).
bool simNamespacesAvailable(std::string& why);

// Bits per second of a tc rate ("10mbit" -> 1e7, "1gbit" -> 1e9, "100mbps" -> 8e8).
double tcRateBits(const std::string& rate);

class SimNetwork {
 public:
  struct LinkBytes {
    uint64_t toNode = 0;    // bytes the hub sent into the node's link
    uint64_t fromNode = 0;  // bytes the node sent out
  };

  // Namespaced: builds the hub and `nodes` node namespaces, every link shaped to `rate` ("" = unshaped).
  // Loopback (`isolated` false): builds nothing. Throws Error when a tool fails (what is built so far goes).
  SimNetwork(int nodes, bool isolated, const std::string& rate);
  ~SimNetwork();  // kills the holders: the namespaces and everything in them go
  SimNetwork(const SimNetwork&) = delete;
  SimNetwork& operator=(const SimNetwork&) = delete;

  bool isolated() const { return isolated_; }
  int nodes() const { return isolated_ ? static_cast<int>(nodeHolders_.size()) : loopbackNodes_; }
  std::string storeAddress() const;
  std::string nodeAddress(int node) const;
  // The prefix that runs a command inside node `node`'s namespace ({} on loopback).
  std::vector<std::string> enterNode(int node) const;
  std::vector<std::string> enterHub() const;

  void setRate(int node, const std::string& rate);  // "" removes the shaping
  void setPartitioned(int node, bool partitioned);
  // Drops `percent` of the node's packets in each direction: iptables (iptables-legacy when present) statistic
  // mode on its eth0, INPUT and OUTPUT, inside its namespace; 0 removes the rules. Throws Error naming iptables
  // when it is missing (scripts/setup installs it).
  void setLoss(int node, double percent);
  // Per node, from the hub ends' interface counters (all zero on loopback).
  std::vector<LinkBytes> linkBytes() const;

 private:
  pid_t hub_ = 0;
  std::vector<pid_t> nodeHolders_;
  bool isolated_ = false;
  int loopbackNodes_ = 0;
};

}  // namespace dtrain::launch
