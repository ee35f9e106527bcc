#include "lib/train/layout.h"

#include <fmt/format.h>

#include <algorithm>
#include <limits>

#include "lib/common/error.h"
#include "lib/nn/tensor_parallel.h"
#include "lib/train/check.h"

namespace dtrain::train {

LayoutDims resolveLayout(const ParallelSettings& parallel, int worldSize, const std::string& source) {
  LayoutDims d{.data = 1, .stages = parallel.pipeline.stages, .tensor = parallel.tensor};
  const int64_t modelWays = int64_t{d.stages} * d.tensor;
  if (parallel.data > 0) {
    DTRAIN_CHECK_AS(ConfigError, int64_t{parallel.data} * modelWays == worldSize,
                    "{}: /parallel: data {} x pipeline stages {} x tensor {} = {} ranks, but the world has {} rank(s); "
                    "make them equal (or omit data: it defaults to world / (stages x tensor))",
                    source, parallel.data, d.stages, d.tensor, int64_t{parallel.data} * modelWays, worldSize);
    d.data = parallel.data;
    return d;
  }
  DTRAIN_CHECK_AS(ConfigError, worldSize >= modelWays && worldSize % modelWays == 0,
                  "{}: /parallel: a world of {} rank(s) is not divisible by pipeline stages {} x tensor {} = {}; "
                  "launch a multiple of {} ranks",
                  source, worldSize, d.stages, d.tensor, modelWays, modelWays);
  d.data = static_cast<int>(worldSize / modelWays);
  return d;
}

NodeCountCheck unusableNodeCounts(const ParallelSettings& parallel, int minNodes, int maxNodes, int nprocPerNode,
                                  int psServers, const std::string& source) {
  NodeCountCheck out;
  const int last = static_cast<int>(std::min<int64_t>(maxNodes, int64_t{minNodes} + 4096));
  for (int nodes = minNodes; nodes <= last; ++nodes) {
    const int64_t world = int64_t{nodes} * nprocPerNode;
    if (world > std::numeric_limits<int>::max()) break;
    ++out.checked;
    if (psServers > 0 && psServers >= world) {
      out.unusable.emplace_back(nodes, fmt::format("{}: /parallel/servers: {} server(s) leave no rank of a world of "
                                                   "{} to train",
                                                   source, psServers, world));
      continue;
    }
    try {
      resolveLayout(parallel, static_cast<int>(world), source);
    } catch (const ConfigError& e) {
      out.unusable.emplace_back(nodes, e.what());
    }
  }
  return out;
}

RankCoords coordsOf(const LayoutDims& dims, int rank) {
  DTRAIN_CHECK(rank >= 0 && rank < dims.world(), "rank {} outside a world of {}", rank, dims.world());
  return {.data = rank / (dims.stages * dims.tensor),
          .stage = rank / dims.tensor % dims.stages,
          .tensor = rank % dims.tensor};
}

int rankOf(const LayoutDims& dims, const RankCoords& c) { return (c.data * dims.stages + c.stage) * dims.tensor + c.tensor; }

std::vector<int> dataGroupRanks(const LayoutDims& dims, int rank) {
  RankCoords c = coordsOf(dims, rank);
  std::vector<int> out;
  for (c.data = 0; c.data < dims.data; ++c.data) out.push_back(rankOf(dims, c));
  return out;
}

std::vector<int> pipelineGroupRanks(const LayoutDims& dims, int rank) {
  RankCoords c = coordsOf(dims, rank);
  std::vector<int> out;
  for (c.stage = 0; c.stage < dims.stages; ++c.stage) out.push_back(rankOf(dims, c));
  return out;
}

std::vector<int> tensorGroupRanks(const LayoutDims& dims, int rank) {
  RankCoords c = coordsOf(dims, rank);
  std::vector<int> out;
  for (c.tensor = 0; c.tensor < dims.tensor; ++c.tensor) out.push_back(rankOf(dims, c));
  return out;
}

std::vector<int64_t> layerCosts(const nn::ModelSpec& model) {
  std::vector<int64_t> costs;
  for (const auto& l : model.layers) {
    int64_t c = l.paramCount() + 1;
    if (l.tiedTo >= 0) c += l.vocab * l.input.back();
    costs.push_back(c);
  }
  return costs;
}

namespace {

// Linear partition (min over cuts of the max stage cost), O(stages x n^2): models have tens of layers. A stage may
// start at layer j only where canStart[j]; empty when no partition into `stages` respects that.
std::vector<int> balancedSizes(const std::vector<int64_t>& cost, int stages, const std::vector<char>& canStart) {
  const int n = static_cast<int>(cost.size());
  std::vector<int64_t> prefix(static_cast<size_t>(n) + 1, 0);
  for (int i = 0; i < n; ++i) prefix[static_cast<size_t>(i) + 1] = prefix[static_cast<size_t>(i)] + cost[static_cast<size_t>(i)];
  constexpr int64_t kInf = std::numeric_limits<int64_t>::max();
  // best[k][i]: the smallest max cost of the first i layers in k stages; cut[k][i]: where stage k starts.
  std::vector<std::vector<int64_t>> best(static_cast<size_t>(stages) + 1, std::vector<int64_t>(static_cast<size_t>(n) + 1, kInf));
  std::vector<std::vector<int>> cut(static_cast<size_t>(stages) + 1, std::vector<int>(static_cast<size_t>(n) + 1, 0));
  best[0][0] = 0;
  for (int k = 1; k <= stages; ++k)
    for (int i = k; i <= n; ++i)
      for (int j = k - 1; j < i; ++j) {
        const int64_t prev = best[static_cast<size_t>(k) - 1][static_cast<size_t>(j)];
        if (prev == kInf || canStart[static_cast<size_t>(j)] == 0) continue;
        const int64_t v = std::max(prev, prefix[static_cast<size_t>(i)] - prefix[static_cast<size_t>(j)]);
        if (v <= best[static_cast<size_t>(k)][static_cast<size_t>(i)]) {  // <=: the later cut wins ties
          best[static_cast<size_t>(k)][static_cast<size_t>(i)] = v;
          cut[static_cast<size_t>(k)][static_cast<size_t>(i)] = j;
        }
      }
  if (best[static_cast<size_t>(stages)][static_cast<size_t>(n)] == kInf) return {};
  std::vector<int> sizes(static_cast<size_t>(stages), 0);
  int end = n;
  for (int k = stages; k >= 1; --k) {
    const int start = cut[static_cast<size_t>(k)][static_cast<size_t>(end)];
    sizes[static_cast<size_t>(k) - 1] = end - start;
    end = start;
  }
  return sizes;
}

}  // namespace

std::vector<std::pair<int, int>> stagesSplittingPairs(const nn::ModelSpec& model, const std::vector<StageRange>& stages) {
  auto stageOf = [&](int layer) {
    for (size_t s = 0; s < stages.size(); ++s)
      if (layer >= stages[s].first && layer < stages[s].last) return static_cast<int>(s);
    return -1;
  };
  std::vector<std::pair<int, int>> out;
  for (const auto& p : nn::topLevelPairs(model))
    if (stageOf(p.first) != stageOf(p.second)) out.push_back(p);
  return out;
}

std::vector<StageRange> partitionStages(const nn::ModelSpec& model, int stages, const std::vector<int>& balance,
                                        const std::string& source, int tensor) {
  const int n = static_cast<int>(model.layers.size());
  DTRAIN_CHECK_AS(ConfigError, stages >= 1 && stages <= n,
                  "{}: /parallel/pipeline/stages: {} stages but the model has {} layers (a stage holds at least one "
                  "top-level layer)",
                  source, stages, n);
  std::vector<int> sizes = balance;
  if (!sizes.empty()) {
    int64_t sum = 0;
    for (int s : sizes) sum += s;
    DTRAIN_CHECK_AS(ConfigError, static_cast<int>(sizes.size()) == stages && sum == n,
                    "{}: /parallel/pipeline/balance: {} stage(s) holding {} layers; expected {} stage(s) holding the "
                    "model's {} layers",
                    source, sizes.size(), sum, stages, n);
  } else {
    // A stage may start at layer j unless j falls inside a column/row pair (col < j <= row) under tensor > 1.
    std::vector<char> canStart(static_cast<size_t>(n) + 1, 1);
    if (tensor > 1)
      for (const auto& [col, row] : nn::topLevelPairs(model))
        for (int j = col + 1; j <= row; ++j) canStart[static_cast<size_t>(j)] = 0;
    sizes = balancedSizes(layerCosts(model), stages, canStart);
    if (sizes.empty()) sizes = balancedSizes(layerCosts(model), stages, std::vector<char>(static_cast<size_t>(n) + 1, 1));
  }
  std::vector<StageRange> out;
  int at = 0;
  for (int s : sizes) {
    StageRange r{.first = at, .last = at + s};
    for (int i = r.first; i < r.last; ++i) r.params += model.layers[static_cast<size_t>(i)].paramCount();
    out.push_back(r);
    at += s;
  }
  return out;
}

namespace {

// Parameters a stage's ranks hold: its layers' plus a copy of a tied table owned by an earlier stage.
int64_t stageHeld(const nn::ModelSpec& model, const StageRange& r) {
  int64_t n = r.params;
  for (int i = r.first; i < r.last; ++i) {
    const auto& l = model.layers[static_cast<size_t>(i)];
    if (l.tiedTo >= 0 && l.tiedTo < r.first) n += l.vocab * l.input.back();
  }
  return n;
}

std::string layerList(const nn::ModelSpec& model, const StageRange& r) {
  auto label = [&](int i) {
    const auto& l = model.layers[static_cast<size_t>(i)];
    return l.name.empty() ? fmt::format("{} {}", i, l.type()) : fmt::format("{} {}", i, l.name);
  };
  if (r.numLayers() == 1) return label(r.first);
  return fmt::format("{}..{} ({} layers: {} .. {})", r.first, r.last - 1, r.numLayers(), label(r.first),
                     label(r.last - 1));
}

}  // namespace

nn::ModelSpec stageSpec(const nn::ModelSpec& model, const StageRange& stage) {
  nn::ModelSpec part = model;
  part.layers.assign(model.layers.begin() + stage.first, model.layers.begin() + stage.last);
  part.input = model.layers[static_cast<size_t>(stage.first)].input;
  return part;
}

int64_t largestRankParams(const Job& job) {
  const int tensor = job.parallel.tensor, stages = job.parallel.pipeline.stages;
  if (tensor == 1 && stages == 1) return job.model.paramCount();
  int64_t largest = 0;
  for (const auto& s : partitionStages(job.model, stages, job.parallel.pipeline.balance, job.sourceFile, tensor))
    for (int t = 0; t < tensor; ++t)
      largest = std::max(largest, stageHeld(job.model, s) - s.params +
                                      nn::shardCounts(stageSpec(job.model, s), tensor, t).local);
  return largest;
}

std::string describeLayout(const Job& job, int worldSize) {
  const LayoutDims d = resolveLayout(job.parallel, worldSize, job.sourceFile);
  const auto stages = partitionStages(job.model, d.stages, job.parallel.pipeline.balance, job.sourceFile, d.tensor);
  const auto& pl = job.parallel.pipeline;
  std::string out = fmt::format(
      "layout: {} rank(s) = data {} x pipeline {} x tensor {} (tensor fastest: rank = (data x {} + stage) x {} + "
      "tensor)\n",
      worldSize, d.data, d.stages, d.tensor, d.stages, d.tensor);
  // A batch of B samples is cut into min(M, B) micro-batches (docs/parallelism.md): describe those, and their bubble,
  // not the M asked for (64 micro-batches of a 16-sample batch printed "64 micro-batches", a 1.5% bubble, beside the
  // warning that said 16).
  const int64_t micro = std::min<int64_t>(pl.microBatches, std::max<int64_t>(1, job.data.batchSize));
  if (d.stages > 1)
    out += fmt::format("pipeline: {} stages, {} micro-batches of about {} samples, {} schedule, bubble (K-1)/(M+K-1) = "
                       "{:.1f}%{}\n",
                       d.stages, micro, (job.data.batchSize + micro - 1) / micro,
                       pl.schedule == PipelineSettings::Schedule::kGpipe ? "gpipe" : "1f1b",
                       100.0 * (d.stages - 1) / (static_cast<double>(micro) + d.stages - 1),
                       pl.balance.empty() ? ", balanced by parameters and compute" : ", balance as given");
  // Parameters, their gradients and the optimizer's per-element state (momentum; Adam's two moments), float32.
  const auto& o = job.optimizer;
  const int states = o.type == nn::OptimizerType::kSgd       ? (o.momentum > 0 ? 1 : 0)
                     : o.type == nn::OptimizerType::kAdagrad ? 1
                                                             : 2;
  // In the unit that suits the size ("236.8 KiB", "544.5 MiB"): a small model's ranks are not all "0.0 MiB".
  auto bytes = [&](int64_t params) {
    return humanBytes(params * 4 * (2 + states));
  };
  const int64_t whole = job.model.paramCount();
  out += fmt::format("{:>5} {:>5} {:>6} {:>7} {:>12} {:>12} {:>7}  {}\n", "rank", "data", "stage", "tensor",
                     "parameters", "+grad+opt", "share", "layers");
  int64_t largest = 0;
  for (int r = 0; r < worldSize; ++r) {
    const RankCoords c = coordsOf(d, r);
    const StageRange& s = stages[static_cast<size_t>(c.stage)];
    // This rank's slices of the stage's split layers plus its replicated ones (and a tied table's copy).
    const int64_t held = stageHeld(job.model, s) - s.params +
                         nn::shardCounts(stageSpec(job.model, s), d.tensor, c.tensor).local;
    largest = std::max(largest, held);
    out += fmt::format("{:>5} {:>5} {:>6} {:>7} {:>12} {:>12} {:>6.1f}%  {}\n", r, c.data, c.stage, c.tensor,
                       held, bytes(held), 100.0 * static_cast<double>(held) / static_cast<double>(whole),
                       layerList(job.model, s));
  }
  out += fmt::format("whole model: {} parameters, {} with gradients and {} state; the largest rank holds "
                     "{:.1f}% (1/(pipeline x tensor) = {:.1f}%)\n",
                     whole, bytes(whole), nn::optimizerTypeName(o.type), 100.0 * static_cast<double>(largest) /
                     static_cast<double>(whole), 100.0 / (d.stages * d.tensor));
  return out;
}

}  // namespace dtrain::train
