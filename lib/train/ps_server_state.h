// Internal to lib/train: the parameter server's per-partition, per-table and per-connection state, shared by
// ps_server.cpp (connections, dense partitions) and ps_server_sparse.cpp (sparse tables and their shards). Every
// field is guarded by Server::mu_ (see ps_server.h); nothing outside the Server touches these.
#pragma once

#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "lib/train/ps_server.h"
#include "lib/train/sparse_shards.h"

namespace dtrain::train::ps {
struct Server::PartitionState {
  Partition where;
  bool initialised = false;
  std::vector<float> params;
  std::unique_ptr<nn::Optimizer> optimizer;
  std::vector<float> sum;         // kSync: the step's gradients so far
  std::vector<uint8_t> pushed;    // kSync: per worker, pushed this step
  std::vector<int64_t> pendingSamples;  // kSync: per worker, the counted samples of its push this step (-1: none)
  int pushes = 0;
  int64_t version = 0;            // the step the parameters are at
};

struct Server::TableState {
  std::unique_ptr<SparseShard> shard;
  int64_t version = 0;                         // the step the rows are at
  std::map<int64_t, std::vector<float>> sum;   // kSync: the step's row gradients so far, by row
  std::vector<uint8_t> pushed;                 // kSync: per worker, pushed this step
  int pushes = 0;
};

struct Server::Conn {
  net::Socket socket;
  std::string peer = "a worker";
  int worker = -1;  // after hello
  bool bye = false;
  std::vector<uint8_t> in;
  std::vector<float> out;
};

namespace detail {

// A reader over a request's payload that reports what is missing instead of reading past it.
struct Reader {
  const std::vector<uint8_t>& b;
  size_t pos = 0;
  template <typename T>
  bool take(T& v) {
    if (pos + sizeof(T) > b.size()) return false;
    std::memcpy(&v, b.data() + pos, sizeof(T));
    pos += sizeof(T);
    return true;
  }
  // A u32 length and that many bytes.
  bool takeString(std::string& s) {
    uint32_t n = 0;
    if (!take(n) || pos + n > b.size()) return false;
    s.assign(reinterpret_cast<const char*>(b.data() + pos), n);  // NOLINT: bytes of text
    pos += n;
    return true;
  }
};

}  // namespace detail

}  // namespace dtrain::train::ps
