#include "lib/train/checkpointing.h"

#include "lib/ckpt/checkpoint.h"
#include "lib/common/error.h"
#include "lib/common/hash.h"
#include "lib/common/log.h"
#include "lib/train/weights.h"

namespace dtrain::train {

namespace {

constexpr const char* kModelFile = "model.safetensors";
constexpr const char* kOptimizerFile = "optimizer.safetensors";

std::string rankFile(int rank) { return fmt::format("rank-{}.json", rank); }
std::string hookFile(int rank) { return fmt::format("comm_hook-rank-{}.safetensors", rank); }

}  // namespace

Checkpointer::Checkpointer(const Job& job, Strategy& strategy, std::string runTag)
    : job_(job),
      strategy_(strategy),
      rank_(strategy.groups().rank),
      worldSize_(strategy.groups().worldSize),
      runTag_(std::move(runTag)) {}

std::optional<ResumePoint> Checkpointer::resume(nn::Model& model, nn::Optimizer& optimizer) {
  if (!job_.checkpoint.enabled || !job_.checkpoint.resume) return std::nullopt;
  auto latest = ckpt::findLatestValid(job_.checkpoint.dir);
  if (rank_ == 0)
    for (const auto& s : latest.skipped)
      log::warn("skipping checkpoint {}: {} ({})", s.path.string(), ckpt::statusName(s.status), s.reason);
  if (!latest.checkpoint) return std::nullopt;
  auto cp = ckpt::Checkpoint::open(latest.checkpoint->path);
  cp.checkSpecHash(job_.modelHash);
  const CheckpointShard shard = strategy_.checkpointShard(model);
  for (size_t i : shard.loadParams) {
    const auto& p = model.paramTable().at(i);
    cp.loadTensor(kModelFile, p.name, model.paramTensor(p));
  }
  const auto n = static_cast<int64_t>(model.numParams());
  if (shard.loadOptimizer)
    for (auto& buf : optimizer.stateBuffers())
      cp.loadTensor(kOptimizerFile, buf.name, TensorView::of(buf.data.data(), Shape{n}));
  const auto& meta = cp.meta();
  optimizer.setSteps(meta.user.value("optimizer_steps", meta.step));
  ResumePoint r{meta.step, meta.epoch, meta.samplesConsumed, meta.worldSize, cp.path()};
  return r;
}

bool Checkpointer::loadCommHookState(const ResumePoint& from) {
  if (!hook_) return false;
  auto state = hook_->stateBuffers();
  if (state.empty()) return false;
  const bool sameWorld = from.savedWorldSize == worldSize_;
  const std::string file = hookFile(sameWorld ? rank_ : 0);
  auto cp = ckpt::Checkpoint::open(from.path);
  if (!cp.hasFile(file)) return false;
  const auto& tensors = cp.tensors(file);
  for (const auto& s : state)
    if (tensors.find(s.name) == nullptr) return false;
  for (const auto& s : state) cp.loadTensor(file, s.name, s.view);
  hook_->stateLoaded(sameWorld);
  return true;
}

std::filesystem::path Checkpointer::save(const nn::Model& model, nn::Optimizer& optimizer, int64_t step,
                                         int64_t epoch, int64_t samplesConsumed) {
  // Every rank derives the same token: no message needed to agree on the staging dir.
  std::string token = fnv1aHex(fmt::format("{}/{}", runTag_, step));
  ckpt::CheckpointWriter writer(job_.checkpoint.dir, step, token);
  const CheckpointShard shard = strategy_.checkpointShard(model);
  if (shard.saveModel) {
    auto tensors = parameterTensors(model, shard.saveParams);
    writer.writeTensors(kModelFile, tensors, {{"format", "pt"}});
  }
  if (shard.saveOptimizer) {
    std::vector<ckpt::NamedTensor> state;
    const auto n = static_cast<int64_t>(model.numParams());
    for (auto& buf : optimizer.stateBuffers()) state.push_back({buf.name, TensorView::of(buf.data.data(), Shape{n})});
    writer.writeTensors(kOptimizerFile, state, {{"optimizer", nn::optimizerTypeName(optimizer.spec().type)}});
  }
  if (hook_) {
    std::vector<ckpt::NamedTensor> state;
    for (auto& s : hook_->stateBuffers()) state.push_back({s.name, s.view});
    if (!state.empty()) writer.writeTensors(hookFile(rank_), state, {{"hook", hook_->name()}});
  }
  writer.writeJson(rankFile(rank_), {{"rank", rank_}, {"world_size", worldSize_}, {"step", step}, {"epoch", epoch},
                                     {"samples_consumed", samplesConsumed}});
  strategy_.barrier();  // every rank's part is durable before rank 0 commits
  std::filesystem::path committed;
  if (rank_ == 0) {
    ckpt::CheckpointMeta meta;
    meta.step = step;
    meta.epoch = epoch;
    meta.samplesConsumed = samplesConsumed;
    meta.worldSize = worldSize_;
    meta.specHash = job_.modelHash;
    meta.user = {{"optimizer_steps", optimizer.steps()}, {"job", job_.name}, {"lr", optimizer.lr()}};
    ckpt::CommitOptions options;
    for (int r = 0; r < worldSize_; ++r) options.requiredFiles.push_back(rankFile(r));
    committed = writer.commit(meta, options);
    ckpt::applyRetention(job_.checkpoint.dir, job_.checkpoint.keep);
  }
  // Nobody moves on (or exits after a stop signal) before the checkpoint is committed.
  strategy_.barrier();
  return committed;
}

}  // namespace dtrain::train
