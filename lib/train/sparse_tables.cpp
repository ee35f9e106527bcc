#include "lib/train/sparse_tables.h"

#include <algorithm>
#include <cstring>
#include <regex>

#include <fmt/format.h>

#include "lib/ckpt/checkpoint.h"
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
    t.name = fmt::format("{}.wte.weight", l.paramPrefix());  // as nn::Model::sparseTables() names it
    // One stream per table, fixed by the job's seed (splitmix64's increment keeps neighbouring layers apart).
    t.seed = job.loop.seed + 0x9E3779B97F4A7C15ULL * static_cast<uint64_t>(l.index + 1);
    const std::string context = fmt::format(" (for the sparse table of {}{})",
                                            job.modelSource == job.sourceFile ? "" : job.modelSource + ": ", l.path);
    // AdamW decays by default (torch's 0.01): a job that only wrote (or --set) "type": "adamw" is told so at the
    // field that brought the 0.01.
    bool decayGiven = false;
    if (auto it = job.doc.find("optimizer"); it != job.doc.end() && it->is_object()) {
      auto decay = it->find("weight_decay");
      decayGiven = decay != it->end() && !decay->is_null();
    }
    DTRAIN_CHECK_AS(ConfigError,
                    job.optimizer.type != nn::OptimizerType::kAdamW || decayGiven || job.optimizer.weightDecay == 0,
                    "{}: /optimizer/type: \"adamw\" decays by default (weight_decay {}), and sparse embeddings take "
                    "no weight decay{} (torch.optim does not decay sparse gradients): set \"weight_decay\": 0, or "
                    "use \"adam\" (both map to SparseAdam for the table)",
                    job.sourceFile, job.optimizer.weightDecay, context);
    t.optimizer = ps::sparseOptimizerFor(job.optimizer, false, fmt::format("{}: /optimizer", job.sourceFile), context);
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

// --- SparseTables ---

void SparseTables::beginStep(int64_t step, double lr) {
  for (Pending& p : pending_) p = Pending{};
  lastMicro_ = true;
  startStep(step, lr);
}

void SparseTables::push(int table, std::vector<int64_t> ids, std::vector<float> grads) {
  Pending& p = pending_.at(static_cast<size_t>(table));
  if (!p.ids.empty()) {  // earlier micro-batches of this step: add them in
    ps::accumulateRowGrads(p.ids, p.grads, ids, grads, tables_[static_cast<size_t>(table)].dim);
    ids = std::move(p.ids);
    grads = std::move(p.grads);
    p.ids.clear();
    p.grads.clear();
  }
  if (!lastMicro_) {
    p.ids = std::move(ids);
    p.grads = std::move(grads);
    return;
  }
  p.pushed = true;
  pushRows(table, std::move(ids), std::move(grads));
}

void SparseTables::flushStep() {
  for (size_t t = 0; t < pending_.size(); ++t) {
    Pending& p = pending_[t];
    if (p.pushed) continue;
    p.pushed = true;
    pushRows(static_cast<int>(t), std::move(p.ids), std::move(p.grads));
    p.ids.clear();
    p.grads.clear();
  }
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

void LocalSparseTables::pushRows(int table, std::vector<int64_t> ids, std::vector<float> grads) {
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

std::vector<HeldTable> LocalSparseTables::held() const {
  std::vector<HeldTable> out;
  for (size_t i = 0; i < shards_.size(); ++i)
    out.push_back({tables_[i].name.empty() ? fmt::format("sparse{}", i) : tables_[i].name, tables_[i].rows,
                   shards_[i].get()});
  return out;
}

std::vector<std::string> LocalSparseTables::saveShards(const std::filesystem::path& root, int64_t step,
                                                       const std::string& token) {
  const auto tables = held();
  const ckpt::PieceFile file = heldPieces(tables, 0, 1, /*withState=*/true);
  ckpt::CheckpointWriter writer(root, step, token);
  writer.writeTensors(sparseShardName(0, 1), file.tensors, file.metadata);
  return {sparseShardName(0, 1)};
}

int LocalSparseTables::exportShards(const std::filesystem::path& dir) {
  const auto tables = held();
  const ckpt::PieceFile file = heldPieces(tables, 0, 1, /*withState=*/false);
  ckpt::writeSafetensorsFile(dir / modelShardName(0, 1), file.tensors, file.metadata);
  return 1;
}

void LocalSparseTables::loadShards(const std::vector<std::filesystem::path>& files, bool withState, int64_t) {
  const auto tables = held();
  loadHeldRows(files, tables, withState);
}

// --- PsSparseTables ---

PsSparseTables::PsSparseTables(std::vector<ps::SparseTableOptions> tables, ps::Client& client, int servers,
                               int64_t startStep)
    : SparseTables(std::move(tables)), client_(client), servers_(servers), step_(startStep) {
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

void PsSparseTables::pushRows(int table, std::vector<int64_t> ids, std::vector<float> grads) {
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

namespace dtrain::train {

std::vector<std::string> PsSparseTables::saveShards(const std::filesystem::path& root, int64_t step,
                                                    const std::string& token) {
  // The servers may run elsewhere (a shared file system, as for every rank's files): an absolute path.
  client_.sparseSave(false, std::filesystem::absolute(root).string(), step, token);
  std::vector<std::string> names;
  for (int s = 0; s < servers_; ++s) names.push_back(sparseShardName(s, servers_));
  return names;
}

int PsSparseTables::exportShards(const std::filesystem::path& dir) {
  client_.sparseSave(true, std::filesystem::absolute(dir).string(), 0, "");
  return servers_;
}

void exportSparseModel(SparseTables& tables, const nn::Model& model, const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  const int holders = tables.exportShards(dir);
  std::vector<std::string> dense;
  for (const auto& p : model.paramTable()) dense.push_back(p.name);
  std::vector<IndexedTable> indexed;
  for (const nn::SparseTableInfo& t : model.sparseTables()) indexed.push_back({t.name, t.rows, t.dim});
  uint64_t total = fs::file_size(dir / "model.safetensors");
  std::vector<std::string> shards;
  for (int k = 0; k < holders; ++k) {
    shards.push_back(modelShardName(k, holders));
    total += fs::file_size(dir / shards.back());
  }
  const nlohmann::json index = modelIndex(dense, indexed, holders, total);
  const fs::path tmp = dir / (std::string(kModelIndexFile) + ".tmp");
  ckpt::writeFileDurably(tmp, index.dump(2) + "\n");
  fs::rename(tmp, dir / kModelIndexFile);
  // Shards of an earlier export with another server count would read as part of this model: remove them.
  static const std::regex shard(R"(model-\d{5,}-of-\d{5,}\.safetensors)");
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (std::regex_match(name, shard) && std::find(shards.begin(), shards.end(), name) == shards.end()) {
      std::error_code ec;
      fs::remove(e.path(), ec);
    }
  }
}

void PsSparseTables::loadShards(const std::vector<std::filesystem::path>& files, bool withState, int64_t step) {
  std::vector<std::string> paths;
  for (const auto& f : files) paths.push_back(std::filesystem::absolute(f).string());
  client_.sparseLoad(paths, withState, step);
}

}  // namespace dtrain::train
