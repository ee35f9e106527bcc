#include "lib/train/check.h"

#include <fmt/format.h>

#include "lib/common/error.h"
#include "lib/nn/model.h"

namespace dtrain::train {

void checkDataFitsModel(const Job& job, const data::Dataset& ds, const nn::Loss& loss, const std::string& which) {
  int64_t features = ds.featureSize();
  int64_t input = job.model.input.numel();
  DTRAIN_CHECK_AS(ConfigError, features == input,
                  "{}: {}: samples have shape {} ({} values) but the model's input {} takes {} values", job.sourceFile,
                  which, ds.featureShape().spaced(), features, job.model.input.str(), input);
  try {
    loss.checkTargets(ds.labelShape(), data::labelDType(ds.labelKind()));
  } catch (const ConfigError& e) {
    DTRAIN_THROW(ConfigError, "{}: {}: {}", job.sourceFile, which, e.what());
  }
  if (auto classes = ds.numClasses(); classes && loss.type() == nn::LossType::kCrossEntropy) {
    int64_t logits = job.model.output().numel();
    DTRAIN_CHECK_AS(ConfigError, *classes <= logits,
                    "{}: {}: the data has {} classes but the model outputs {} logits (last layer's out)", job.sourceFile,
                    which, *classes, logits);
  }
}

std::string checkJob(const Job& job) {
  auto train = data::loadDataset(job.data.train);
  auto loss = nn::Loss::create(job.loss, job.model.output(), static_cast<int>(job.data.batchSize), Device::cpu());
  checkDataFitsModel(job, *train, *loss, "/data/train");
  std::string evalLine = "eval:  (none)";
  if (job.data.eval) {
    auto eval = data::loadDataset(*job.data.eval);
    checkDataFitsModel(job, *eval, *loss, "/data/eval");
    evalLine = fmt::format("eval:  {}", eval->describe());
  }
  auto model = nn::Model::build(job.model, static_cast<int>(job.data.batchSize), job.loop.seed, Device::cpu());
  std::string out = fmt::format("{}: OK\n\n{}\n", job.sourceFile, model.summaryTable());
  out += fmt::format("loss:  {}\noptimizer: {} lr {}\n", nn::lossTypeName(job.loss.type),
                     nn::optimizerTypeName(job.optimizer.type), job.optimizer.lr);
  out += fmt::format("train: {}\n{}\n", train->describe(), evalLine);
  auto stepsPerEpoch = [&](int64_t world) {
    // DistributedSampler's share: padded up to a multiple of the world, or cut down with drop_last.
    int64_t perRank = job.data.dropLast ? train->size() / world : (train->size() + world - 1) / world;
    return stepsForSamples(job, perRank);
  };
  out += fmt::format("run:   {} epoch(s), batch {} per rank: {} steps per epoch on 1 rank, {} on 2, {} on 4{}\n",
                     job.loop.epochs, job.data.batchSize, stepsPerEpoch(1), stepsPerEpoch(2), stepsPerEpoch(4),
                     job.loop.maxSteps > 0 ? fmt::format(" (max_steps {})", job.loop.maxSteps) : "");
  out += fmt::format("output: {}\n", job.outputDir.string());
  return out;
}

}  // namespace dtrain::train
