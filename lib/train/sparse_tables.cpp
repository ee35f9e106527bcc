#include "lib/train/sparse_tables.h"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "lib/common/error.h"

namespace dtrain::train {

std::vector<ps::SparseTableOptions> sparseTableOptions(const Job& job) {
  std::vector<ps::SparseTableOptions> out;
  for (const nn::LayerSpec& l : job.model.layers) {
    if (!l.sparse) continue;
    ps::SparseTableOptions t;
    t.rows = l.vocab;
    t.dim = static_cast<int>(l.output.back());
    t.initStd = l.initStd > 0 ? l.initStd : 1.0;
    // One stream per table, fixed by the job's seed (splitmix64's increment keeps neighbouring layers apart).
    t.seed = job.loop.seed + 0x9E3779B97F4A7C15ULL * static_cast<uint64_t>(l.index + 1);
    t.optimizer = ps::sparseOptimizerFor(
        job.optimizer, false, fmt::format("{}: /optimizer (for the sparse table of {})", job.sourceFile, l.path));
    out.push_back(t);
  }
  return out;
}

std::vector<std::string> sparseStateNames(ps::SparseOptimizerType type) {
  switch (type) {
    case ps::SparseOptimizerType::kSgd: return {};
    case ps::SparseOptimizerType::kAdagrad: return {"sum"};
    case ps::SparseOptimizerType::kAdam: return {"exp_avg", "exp_avg_sq"};
  }
  return {};
}

// --- LocalSparseTables ---

LocalSparseTables::LocalSparseTables(std::vector<ps::SparseTableOptions> tables) : SparseTables(std::move(tables)) {
  for (const auto& t : tables_)
    shards_.push_back(std::make_unique<ps::SparseShard>(ps::RowRange{0, t.rows, 0}, t.dim, t.optimizer, t.initStd,
                                                        t.seed));
}

void LocalSparseTables::pull(int table, std::span<const int64_t> ids, std::span<float> out) {
  shards_.at(static_cast<size_t>(table))->pull(ids, out);
}

void LocalSparseTables::push(int table, std::vector<int64_t> ids, std::vector<float> grads) {
  shards_.at(static_cast<size_t>(table))->apply(ids, grads, lr_);
}

SparseTableState LocalSparseTables::readTable(int table) {
  ps::SparseShard& s = *shards_.at(static_cast<size_t>(table));
  SparseTableState out;
  out.steps = s.steps();
  out.values.assign(s.values().begin(), s.values().end());
  for (const auto& b : s.stateBuffers()) out.state.emplace_back(b.data.begin(), b.data.end());
  return out;
}

void LocalSparseTables::writeTable(int table, int64_t, const SparseTableState& state) {
  ps::SparseShard& s = *shards_.at(static_cast<size_t>(table));
  auto buffers = s.stateBuffers();
  DTRAIN_CHECK(state.values.size() == s.values().size() && state.state.size() == buffers.size(),
               "sparse table {}: restoring {} values and {} state buffers into {} and {}", table, state.values.size(),
               state.state.size(), s.values().size(), buffers.size());
  std::copy(state.values.begin(), state.values.end(), s.values().begin());
  for (size_t b = 0; b < buffers.size(); ++b) {
    DTRAIN_CHECK(state.state[b].size() == buffers[b].data.size(), "sparse table {}: state buffer {} of {} floats",
                 table, buffers[b].name, state.state[b].size());
    std::copy(state.state[b].begin(), state.state[b].end(), buffers[b].data.begin());
  }
  s.setSteps(state.steps);
}

// --- PsSparseTables ---

PsSparseTables::PsSparseTables(std::vector<ps::SparseTableOptions> tables, ps::Client& client, int servers,
                               int64_t startStep)
    : SparseTables(std::move(tables)), client_(client), step_(startStep) {
  for (const auto& t : tables_) plans_.push_back(ps::planRowRanges(t.rows, servers));
}

std::vector<size_t> PsSparseTables::runs(int table, std::span<const int64_t> ids) const {
  const auto& plan = plans_.at(static_cast<size_t>(table));
  std::vector<size_t> at(plan.size() + 1, ids.size());
  for (size_t s = 0; s < plan.size(); ++s)
    at[s] = static_cast<size_t>(std::lower_bound(ids.begin(), ids.end(), plan[s].begin) - ids.begin());
  return at;
}

void PsSparseTables::pull(int table, std::span<const int64_t> ids, std::span<float> out) {
  const auto dim = static_cast<size_t>(tables_.at(static_cast<size_t>(table)).dim);
  const std::vector<size_t> at = runs(table, ids);
  for (size_t s = 0; s + 1 < at.size(); ++s) {
    if (at[s] == at[s + 1]) continue;
    client_.sparsePullAsync(static_cast<uint32_t>(table), static_cast<int>(s), step_,
                            std::vector<int64_t>(ids.begin() + static_cast<long>(at[s]),
                                                 ids.begin() + static_cast<long>(at[s + 1])),
                            out.data() + at[s] * dim);
  }
  client_.wait();
}

void PsSparseTables::push(int table, std::vector<int64_t> ids, std::vector<float> grads) {
  const auto dim = static_cast<size_t>(tables_.at(static_cast<size_t>(table)).dim);
  const std::vector<size_t> at = runs(table, ids);
  for (size_t s = 0; s + 1 < at.size(); ++s)
    client_.sparsePushAsync(static_cast<uint32_t>(table), static_cast<int>(s), step_, lr_,
                            std::vector<int64_t>(ids.begin() + static_cast<long>(at[s]),
                                                 ids.begin() + static_cast<long>(at[s + 1])),
                            std::vector<float>(grads.begin() + static_cast<long>(at[s] * dim),
                                               grads.begin() + static_cast<long>(at[s + 1] * dim)));
}

int64_t PsSparseTables::windowRows(int table) const {
  return std::max<int64_t>(1, static_cast<int64_t>(ps::kMaxPartitionFloats) / tables_.at(static_cast<size_t>(table)).dim);
}

SparseTableState PsSparseTables::readTable(int table) {
  const ps::SparseTableOptions& t = tables_.at(static_cast<size_t>(table));
  const auto dim = static_cast<size_t>(t.dim);
  const size_t buffers = sparseStateNames(t.optimizer.type).size();
  SparseTableState out;
  out.values.resize(static_cast<size_t>(t.rows) * dim);
  out.state.assign(buffers, std::vector<float>(out.values.size()));
  const int64_t window = windowRows(table);
  for (const ps::RowRange& r : plans_.at(static_cast<size_t>(table))) {
    for (int64_t first = r.begin; first < r.end; first += window) {
      const int64_t rows = std::min(window, r.end - first);
      const size_t count = static_cast<size_t>(rows) * dim, at = static_cast<size_t>(first) * dim;
      std::vector<float> got = client_.sparseFetch(static_cast<uint32_t>(table), r.server, first, rows);
      DTRAIN_CHECK_AS(ProtocolError, got.size() == 2 + (1 + buffers) * count,
                      "parameter server {}: sparse fetch of table {} rows [{}, {}) returned {} floats (expected {})",
                      r.server, table, first, first + rows, got.size(), 2 + (1 + buffers) * count);
      int64_t steps = 0;
      std::memcpy(&steps, got.data(), sizeof(steps));
      out.steps = std::max(out.steps, steps);
      std::copy_n(got.data() + 2, count, out.values.data() + at);
      for (size_t b = 0; b < buffers; ++b) std::copy_n(got.data() + 2 + (1 + b) * count, count, out.state[b].data() + at);
    }
  }
  return out;
}

void PsSparseTables::writeTable(int table, int64_t step, const SparseTableState& state) {
  const ps::SparseTableOptions& t = tables_.at(static_cast<size_t>(table));
  const auto dim = static_cast<size_t>(t.dim);
  const size_t buffers = sparseStateNames(t.optimizer.type).size();
  DTRAIN_CHECK(state.values.size() == static_cast<size_t>(t.rows) * dim && state.state.size() == buffers,
               "sparse table {}: restoring {} values and {} state buffers (expected {} and {})", table,
               state.values.size(), state.state.size(), static_cast<size_t>(t.rows) * dim, buffers);
  const int64_t window = windowRows(table);
  std::vector<float> floats;
  for (const ps::RowRange& r : plans_.at(static_cast<size_t>(table))) {
    for (int64_t first = r.begin; first < r.end; first += window) {
      const int64_t rows = std::min(window, r.end - first);
      const size_t count = static_cast<size_t>(rows) * dim, at = static_cast<size_t>(first) * dim;
      floats.assign(state.values.begin() + static_cast<long>(at), state.values.begin() + static_cast<long>(at + count));
      for (size_t b = 0; b < buffers; ++b)
        floats.insert(floats.end(), state.state[b].begin() + static_cast<long>(at),
                      state.state[b].begin() + static_cast<long>(at + count));
      client_.sparseInit(static_cast<uint32_t>(table), r.server, step, first, rows, state.steps, floats);
    }
  }
}

}  // namespace dtrain::train
