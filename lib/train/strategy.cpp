#include "lib/train/strategy.h"

#include "lib/common/error.h"
#include "lib/train/ddp.h"
#include "lib/train/ps_strategy.h"

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

std::unique_ptr<Strategy> makeStrategy(const Job& job, ProcessGroups groups, const StrategyOptions& options) {
  if (job.parallel.strategy == "parameter_server" && options.roundStore) {
    // Even one worker talks to its servers; the servers publish their addresses in the round's store.
    const PsSettings& ps = *job.parallel.ps;
    return std::make_unique<PsStrategy>(
        std::move(groups),
        PsStrategyOptions{.settings = ps,
                          .serverAddresses = psServerAddresses(*options.roundStore, ps.servers, job.parallel.timeout),
                          .timeout = job.parallel.timeout});
  }
  if (groups.worldSize == 1) return std::make_unique<LocalStrategy>();
  // job.cpp accepts only the names below, so another one here is a programming error.
  DTRAIN_CHECK(job.parallel.strategy == "ddp", "parallel strategy '{}' has no implementation",
               job.parallel.strategy);
  return std::make_unique<DdpStrategy>(std::move(groups),
                                       DdpOptions{.firstBucketMb = job.parallel.firstBucketMb,
                                                  .bucketMb = job.parallel.bucketMb,
                                                  .overlap = job.parallel.overlap.value_or(options.overlapDefault),
                                                  .hook = options.commHook});
}

}  // namespace dtrain::train
