// Helpers for thread-per-rank collective tests: one thread per rank over a MemoryStore, failures collected
// per rank and reported on the main thread (doctest assertions are not thread-safe).
#pragma once

#include <dirent.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "lib/comm/backend.h"
#include "lib/comm/reduce.h"
#include "lib/comm/registry.h"
#include "rendezvous/memory_store.h"

namespace dtrain::comm::testing {

// Options for `rank` of `n` ranks spread over `nodes` simulated nodes (rank r on node r % nodes, so a node's
// ranks are not contiguous and nodes may differ in size).
inline BackendOptions rankOptions(int rank, int n, rendezvous::StorePtr store, int nodes = 1) {
  BackendOptions o;
  o.rank = rank;
  o.size = n;
  o.nodeRank = rank % nodes;
  o.localRank = 0;
  o.localSize = 0;
  for (int r = 0; r < n; ++r) {
    if (r % nodes != o.nodeRank) continue;
    if (r == rank) o.localRank = o.localSize;
    ++o.localSize;
  }
  o.store = std::move(store);
  o.timeout = std::chrono::seconds(60);
  o.groupName = "test";
  return o;
}

// hier is exercised over 2 simulated nodes; shm needs one node; tcp does not care.
inline int nodesFor(const std::string& backend) { return backend == "hier" ? 2 : 1; }

// Runs body(rank) on n threads; returns one message per rank, empty when that rank succeeded.
inline std::vector<std::string> onRanks(int n, const std::function<void(int)>& body) {
  std::vector<std::string> errors(static_cast<size_t>(n));
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      try {
        body(r);
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

// Every failed rank's message ("" when all succeeded): the root cause is often not on rank 0.
inline std::string firstError(const std::vector<std::string>& errors) {
  std::string all;
  for (size_t r = 0; r < errors.size(); ++r)
    if (!errors[r].empty()) all += (all.empty() ? "" : "; ") + ("rank " + std::to_string(r) + ": " + errors[r]);
  return all;
}

// Throws with a description when `ok` is false (inside rank threads).
inline void expect(bool ok, const std::string& what) {
  if (!ok) throw std::runtime_error(what);
}

// Names in /dev/shm created by this process's shm communicators.
inline std::vector<std::string> ownShmSegments() {
  std::vector<std::string> out;
  const std::string prefix = "dtrain-shm-" + std::to_string(::getpid()) + "-";
  if (DIR* d = ::opendir("/dev/shm")) {
    while (dirent* e = ::readdir(d)) {
      std::string name = e->d_name;
      if (name.rfind(prefix, 0) == 0) out.push_back(name);
    }
    ::closedir(d);
  }
  return out;
}

// Element access through double, for building inputs and checking results of any dtype.
inline void storeAs(DType t, void* buf, size_t i, double v) {
  switch (t) {
    case DType::kFloat32: static_cast<float*>(buf)[i] = static_cast<float>(v); break;
    case DType::kFloat64: static_cast<double*>(buf)[i] = v; break;
    case DType::kInt32: static_cast<int32_t*>(buf)[i] = static_cast<int32_t>(v); break;
    case DType::kInt64: static_cast<int64_t*>(buf)[i] = static_cast<int64_t>(v); break;
    case DType::kBFloat16: static_cast<uint16_t*>(buf)[i] = floatToBf16(static_cast<float>(v)); break;
    case DType::kFloat16: static_cast<uint16_t*>(buf)[i] = floatToFp16(static_cast<float>(v)); break;
    default: throw std::runtime_error("storeAs: unsupported dtype");
  }
}

inline double loadAs(DType t, const void* buf, size_t i) {
  switch (t) {
    case DType::kFloat32: return static_cast<const float*>(buf)[i];
    case DType::kFloat64: return static_cast<const double*>(buf)[i];
    case DType::kInt32: return static_cast<const int32_t*>(buf)[i];
    case DType::kInt64: return static_cast<double>(static_cast<const int64_t*>(buf)[i]);
    case DType::kBFloat16: return bf16ToFloat(static_cast<const uint16_t*>(buf)[i]);
    case DType::kFloat16: return fp16ToFloat(static_cast<const uint16_t*>(buf)[i]);
    default: break;
  }
  return 0;
}

// Small integers: exact in every dtype, and so are their sums over up to 8 ranks.
inline double inputValue(int rank, size_t i) { return static_cast<double>(static_cast<int>((rank * 7 + i * 3) % 11) - 5); }

// The reference reduction of inputValue over ranks 0..n-1 at index i.
inline double expectedValue(int n, size_t i, ReduceOp op, DType t) {
  double acc = inputValue(0, i);
  for (int r = 1; r < n; ++r) {
    const double v = inputValue(r, i);
    acc = op == ReduceOp::kMin ? std::min(acc, v) : op == ReduceOp::kMax ? std::max(acc, v) : acc + v;
  }
  if (op == ReduceOp::kAvg) {
    const bool integer = t == DType::kInt32 || t == DType::kInt64;
    acc = integer ? static_cast<double>(static_cast<int64_t>(acc) / n) : acc / n;
  }
  return acc;
}

// Equal, up to the 16-bit types' rounding of an average.
inline bool closeEnough(DType t, double got, double want) {
  if (got == want) return true;
  const double rel = t == DType::kBFloat16 ? 1.0 / 128 : t == DType::kFloat16 ? 1.0 / 1024 : 1e-6;
  return std::abs(got - want) <= rel * std::abs(want);
}

}  // namespace dtrain::comm::testing
