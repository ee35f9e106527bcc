// The parameter server's sparse tables: row pulls and pushes, and the checkpoint/export shards each server
// writes and reads itself (sparse_shards.h). Split from ps_server.cpp; the state is in ps_server_state.h.
#include "lib/train/ps_server.h"

#include <algorithm>
#include <limits>
#include <map>

#include <fmt/format.h>

#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/ckpt/checkpoint.h"
#include "lib/train/ps_server_state.h"
#include "lib/train/sparse_shards.h"

namespace dtrain::train::ps {

using detail::Reader;

std::string Server::saveOrLoadTables(const Conn& conn, const RequestHeader& h) {
  Reader r{conn.in};
  uint8_t flag = 0;
  if (!r.take(flag) || flag > 1) return fmt::format("{}: no kind/state flag", opName(h.op));
  // Under the lock, straight from (or into) the shards, no copy: the workers are meeting for a checkpoint (or
  // starting), so no push waits for it.
  std::lock_guard lock(mu_);
  std::vector<HeldTable> held;
  for (size_t i = 0; i < tables_.size(); ++i) {
    const SparseTableOptions& t = options_.tables[i];
    held.push_back({t.name.empty() ? fmt::format("sparse{}", i) : t.name, t.rows, tables_[i]->shard.get()});
  }
  try {
    if (h.op == Op::kSparseSave) {
      std::string dir, token;
      if (!r.takeString(dir) || !r.takeString(token) || r.pos != conn.in.size() || dir.empty())
        return "sparse-save: malformed payload (expected u8 kind, u32-prefixed directory and token)";
      const ckpt::PieceFile file = heldPieces(held, options_.serverRank, options_.servers, /*withState=*/flag == 0);
      if (flag == 0) {
        ckpt::CheckpointWriter writer(dir, h.step, token);
        writer.writeTensors(sparseShardName(options_.serverRank, options_.servers), file.tensors, file.metadata);
      } else {
        ckpt::writeSafetensorsFile(std::filesystem::path(dir) / modelShardName(options_.serverRank, options_.servers),
                                   file.tensors, file.metadata);
      }
      return "";
    }
    uint32_t count = 0;
    std::vector<std::filesystem::path> files;
    if (!r.take(count) || count > 4096) return "sparse-load: malformed payload (no file count)";
    for (uint32_t i = 0; i < count; ++i) {
      std::string path;
      if (!r.takeString(path)) return "sparse-load: malformed payload (truncated path)";
      files.emplace_back(path);
    }
    loadHeldRows(files, held, /*withState=*/flag == 1);
    for (auto& t : tables_) t->version = h.step;
    cv_.notify_all();
  } catch (const std::exception& e) {  // dtrain::Error, and the file system's
    return fmt::format("{}: {}", opName(h.op), e.what());
  }
  return "";
}

std::string Server::dispatchSparse(Conn& conn, const RequestHeader& h) {
  if (h.partition >= tables_.size())
    return fmt::format("{}: sparse table {} unknown (this job has {})", opName(h.op), h.partition, tables_.size());
  TableState& t = *tables_[h.partition];
  SparseShard& shard = *t.shard;
  const size_t dim = static_cast<size_t>(shard.dim());
  const RowRange& range = shard.range();
  const auto w = static_cast<size_t>(conn.worker);
  const std::vector<uint8_t>& in = conn.in;
  Reader r{in};
  // Rows and their floats from the payload, checked against this server's range and for repeats.
  auto takeRows = [&](uint64_t n, std::vector<int64_t>& ids, std::vector<float>* floats) -> std::string {
    const uint64_t expected = 8 + n * 8 + (floats ? n * dim * sizeof(float) : 0);
    if (in.size() != expected)
      return fmt::format("{} of table {}: payload of {} bytes for {} rows of dim {} (expected {})", opName(h.op),
                         h.partition, in.size(), n, dim, expected);
    ids.resize(n);
    std::memcpy(ids.data(), in.data() + 8, n * 8);
    if (floats) {
      floats->resize(n * dim);
      std::memcpy(floats->data(), in.data() + 8 + n * 8, n * dim * sizeof(float));
    }
    std::vector<int64_t> sorted = ids;
    std::sort(sorted.begin(), sorted.end());
    if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end())
      return fmt::format("{} of table {}: a row appears twice", opName(h.op), h.partition);
    if (!sorted.empty() && (sorted.front() < range.begin || sorted.back() >= range.end))
      return fmt::format("{} of table {}: rows {}..{} requested, server {} holds rows [{}, {})", opName(h.op),
                         h.partition, sorted.front(), sorted.back(), options_.serverRank, range.begin, range.end);
    return "";
  };
  std::vector<int64_t> ids;
  std::vector<float> grads;
  std::unique_lock lock(mu_);
  const Deadline deadline(options_.timeout);
  auto waitFor = [&](auto ready) {
    return cv_.wait_until(lock, deadline.at(), [&] { return stopping_ || ready(); }) && !stopping_;
  };
  conn.out.clear();
  uint64_t n = 0;
  if (h.op == Op::kSparsePull) {
    if (!r.take(n)) return "sparse pull: no row count";
    if (std::string err = takeRows(n, ids, nullptr); !err.empty()) return err;
    if (options_.mode == Mode::kSync && !waitFor([&] { return t.version >= h.step || !syncBroken_.empty(); }))
      return fmt::format("sparse pull of table {}: step {} not reached in time", h.partition, h.step);
    conn.out.resize(n * dim);
    shard.pull(ids, conn.out);
  } else if (h.op == Op::kSparsePush) {
    if (!r.take(n)) return "sparse push: no row count";
    if (std::string err = takeRows(n, ids, &grads); !err.empty()) return err;
    if (options_.mode != Mode::kSync) {
      shard.apply(ids, grads, h.lr);
      ++stats_.updates;
      ++t.version;
      cv_.notify_all();
    } else {
      if (!syncBroken_.empty()) return syncBroken_;
      if (h.step != t.version)
        return fmt::format("sparse push to table {} for step {}, but the table is at step {} (sync mode)",
                           h.partition, h.step, t.version);
      if (t.pushed[w]) return fmt::format("second sparse push to table {} for step {}", h.partition, h.step);
      for (size_t i = 0; i < ids.size(); ++i) {
        std::vector<float>& row = t.sum[ids[i]];
        row.resize(dim, 0.0f);
        for (size_t c = 0; c < dim; ++c) row[c] += grads[i * dim + c];
      }
      t.pushed[w] = 1;
      if (++t.pushes == options_.workers) {
        // The average over the workers (rows a worker did not touch count as zero), in row order.
        const float scale = 1.0f / static_cast<float>(options_.workers);
        ids.clear();
        grads.clear();
        for (const auto& [row, g] : t.sum) {
          ids.push_back(row);
          for (float v : g) grads.push_back(v * scale);
        }
        shard.apply(ids, grads, h.lr);
        ++stats_.updates;
        t.sum.clear();
        std::fill(t.pushed.begin(), t.pushed.end(), 0);
        t.pushes = 0;
        ++t.version;
        cv_.notify_all();
      } else if (!waitFor([&] { return t.version > h.step || !syncBroken_.empty(); })) {
        return fmt::format("timed out after {} ms waiting for the other workers' sparse gradients of step {}: {} "
                           "pushed none (stuck, hung or far behind; parallel.timeout bounds the wait)",
                           options_.timeout.count(), h.step, notPushedLocked(t.pushed));
      } else if (t.version <= h.step) {
        return syncBroken_;
      }
    }
  } else {
    int64_t first = 0, rows = 0;
    if (!r.take(first) || !r.take(rows)) return fmt::format("{}: no row window", opName(h.op));
    auto state = shard.stateBuffers();
    if (first < range.begin || rows < 0 || first + rows > range.end ||
        static_cast<uint64_t>(rows) * dim > kMaxPartitionFloats)
      return fmt::format("{} of table {}: rows [{}, {}) (expected a window of server {}'s rows [{}, {}) of at most "
                         "{} floats)",
                         opName(h.op), h.partition, first, first + rows, options_.serverRank, range.begin, range.end,
                         kMaxPartitionFloats);
    const size_t at = static_cast<size_t>(first - range.begin) * dim, count = static_cast<size_t>(rows) * dim;
    if (h.op == Op::kSparseFetch) {
      const int64_t steps = shard.steps();
      conn.out.resize(2);
      std::memcpy(conn.out.data(), &steps, sizeof(steps));
      conn.out.insert(conn.out.end(), shard.values().begin() + static_cast<long>(at),
                      shard.values().begin() + static_cast<long>(at + count));
      for (const auto& b : state)
        conn.out.insert(conn.out.end(), b.data.begin() + static_cast<long>(at),
                        b.data.begin() + static_cast<long>(at + count));
    } else {
      int64_t steps = 0;
      const size_t expected = 24 + (1 + state.size()) * count * sizeof(float);
      if (!r.take(steps) || in.size() != expected)
        return fmt::format("sparse init of table {}: payload of {} bytes (expected {})", h.partition, in.size(),
                           expected);
      const auto* f = reinterpret_cast<const float*>(in.data() + 24);  // NOLINT: bytes of floats
      std::memcpy(shard.values().data() + at, f, count * sizeof(float));
      for (size_t b = 0; b < state.size(); ++b)
        std::memcpy(state[b].data.data() + at, f + (b + 1) * count, count * sizeof(float));
      shard.setSteps(steps);
      t.version = h.step;
      cv_.notify_all();
    }
  }
  ReplyHeader rep{.partition = h.partition, .version = t.version};
  const int64_t minClock = minClockLocked();
  rep.minClock = minClock == std::numeric_limits<int64_t>::max() ? clock_[w] : minClock;
  lock.unlock();
  rep.bytes = conn.out.size() * sizeof(float);
  reply(conn, rep, conn.out.data(), rep.bytes);
  return "";
}

}  // namespace dtrain::train::ps
