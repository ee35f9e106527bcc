#include "lib/train/strategy.h"

#include "lib/common/error.h"
#include "lib/train/ddp.h"
#include "lib/train/ps_strategy.h"
#include "lib/train/sparse_tables.h"
#include "lib/train/pipeline.h"

namespace dtrain::train {

std::vector<size_t> allParams(const nn::Model& model) {
  std::vector<size_t> all(model.paramTable().size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = i;
  return all;
}

CheckpointShard LocalStrategy::checkpointShard(const nn::Model& model) const {
  return {.loadParams = allParams(model),
          .loadOptimizer = true,
          .saveModel = true,
          .saveParams = allParams(model),
          .saveOptimizer = true};
}

ProcessGroups makeProcessGroups(const LayoutDims& layout, int rank, comm::BackendPtr world) {
  ProcessGroups g{.rank = rank, .worldSize = layout.world(), .layout = layout, .coords = coordsOf(layout, rank)};
  g.dataRank = g.coords.data;
  g.dataSize = layout.data;
  g.world = std::move(world);
  if (g.world == nullptr) return g;
  if (!layout.modelParallel()) {
    g.data = g.world;
    return g;
  }
  // Every rank makes every group in this order (newGroup's contract); non-members get nullptr.
  auto each = [&](auto&& ranksOf, comm::BackendPtr& mine, int size) {
    for (int r = 0; r < layout.world(); ++r) {
      std::vector<int> ranks = ranksOf(layout, r);
      if (ranks.front() != r) continue;  // one list per group: made when r is its first member
      auto group = g.world->newGroup(ranks);
      if (group != nullptr) mine = std::move(group);
    }
    if (size == 1) mine = nullptr;
  };
  each(dataGroupRanks, g.data, layout.data);
  each(pipelineGroupRanks, g.pipeline, layout.stages);
  each(tensorGroupRanks, g.tensor, layout.tensor);
  for (int r = 0; r < layout.world(); ++r) {
    const RankCoords c = coordsOf(layout, r);
    if (layout.stages == 1) break;
    if (c.stage + 1 < layout.stages) {
      const std::vector<int> pair{r, rankOf(layout, {c.data, c.stage + 1, c.tensor})};
      auto act = g.world->newGroup(pair);
      auto grad = g.world->newGroup(pair);
      if (r == rank) g.actNext = act, g.gradNext = grad;
      else if (act != nullptr) g.actPrev = act, g.gradPrev = grad;
    }
    if (c.stage == 0) {
      auto ends = g.world->newGroup({r, rankOf(layout, {c.data, layout.stages - 1, c.tensor})});
      if (ends != nullptr) g.ends = std::move(ends);
    }
  }
  return g;
}

std::unique_ptr<Strategy> makeStrategy(const Job& job, ProcessGroups groups, const StrategyOptions& options) {
  if (job.parallel.strategy == "parameter_server" && options.roundStore) {
    // Even one worker talks to its servers; the servers publish their addresses in the round's store.
    const PsSettings& ps = *job.parallel.ps;
    return std::make_unique<PsStrategy>(
        std::move(groups),
        PsStrategyOptions{.settings = ps,
                          .serverAddresses = psServerAddresses(*options.roundStore, ps.servers, job.parallel.timeout),
                          .timeout = job.parallel.timeout,
                          .sparseTables = sparseTableOptions(job)});
  }
  if (groups.worldSize == 1) return std::make_unique<LocalStrategy>();
  if (groups.layout.stages > 1) return std::make_unique<PipelineStrategy>(std::move(groups), job, options);
  // job_parallel.cpp accepts only the names below, so another one here is a programming error.
  DTRAIN_CHECK(job.parallel.strategy == "ddp", "parallel strategy '{}' has no implementation",
               job.parallel.strategy);
  return std::make_unique<DdpStrategy>(std::move(groups),
                                       DdpOptions{.firstBucketMb = job.parallel.firstBucketMb,
                                                  .bucketMb = job.parallel.bucketMb,
                                                  .overlap = job.parallel.overlap.value_or(options.overlapDefault),
                                                  .hook = options.commHook});
}

}  // namespace dtrain::train
