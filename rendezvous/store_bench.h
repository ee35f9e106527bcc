// The store benchmark behind `dtrain bench store` (figures in docs/store.md): `clients` concurrent clients,
// one connection and one thread each, do set/get pairs on a key of their own for `duration`, against a TCP
// store server started in this process (when `address` is empty) or a running store. Reports throughput and
// latency percentiles per operation. Blocking; throws the first client's error (connect timeout, store error).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "rendezvous/store.h"

namespace dtrain::rendezvous {

struct StoreBenchOptions {
  std::string address;                          // HOST:PORT of a running store; "": one in-process on loopback
  int clients = 64;                             // >= 1
  std::chrono::duration<double> duration{2.0};  // the measured interval
  size_t valueBytes = 64;                       // <= kMaxValueBytes
  Millis connectTimeout{std::chrono::seconds(30)};  // how long each client retries connecting
};

// One operation's figures over all clients. Percentiles are nearest-rank on the sorted latencies.
struct OpFigures {
  uint64_t ops = 0;
  double opsPerSecond = 0;
  double p50Us = 0, p90Us = 0, p99Us = 0, p999Us = 0, maxUs = 0;
};

struct StoreBenchResult {
  std::string address;  // the store measured
  bool inProcess = false;
  double elapsedSeconds = 0;
  OpFigures set, get;
};

StoreBenchResult runStoreBenchmark(const StoreBenchOptions& options);

// Figures for `latenciesNs` (one per operation, in any order; sorted in place) over `seconds`; all zero
// percentiles when empty.
OpFigures summarizeLatencies(std::vector<uint64_t>& latenciesNs, double seconds);

}  // namespace dtrain::rendezvous
