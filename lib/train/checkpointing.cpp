#include "lib/train/checkpointing.h"

#include <algorithm>

#include "lib/ckpt/checkpoint.h"
#include "lib/ckpt/safetensors.h"
#include "lib/ckpt/sharded.h"
#include "lib/common/error.h"
#include "lib/common/hash.h"
#include "lib/common/log.h"
#include "lib/train/sparse_shards.h"
#include "lib/train/weights.h"

namespace dtrain::train {

namespace {

constexpr const char* kModelFile = "model.safetensors";
constexpr const char* kOptimizerFile = "optimizer.safetensors";

std::string rankFile(int rank) { return fmt::format("rank-{}.json", rank); }

bool startsWith(const std::string& s, std::string_view head) { return s.rfind(head, 0) == 0; }
bool endsWith(const std::string& s, std::string_view tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// The optimizer state of one parameter, as sharded files name it.
std::string stateName(const std::string& buffer, const std::string& param) { return buffer + "/" + param; }

ckpt::Slice sliceOf(const nn::ParamEntry& p) {
  if (p.sliceDim < 0) return {};
  return {.dim = p.sliceDim, .start = p.sliceStart, .length = p.shape[p.sliceDim]};
}

// Every tensor of checkpoint `cp` under its full name, whatever layout wrote it: the pieces of the sharded files
// (model-*.safetensors, optimizer-*.safetensors) and of the unsharded ones, whose optimizer state is one flat
// arena per buffer in the whole model's parameter order (`fullTable`).
struct CheckpointTensors {
  ckpt::TensorAssembler model, optimizer;
};
CheckpointTensors indexCheckpoint(const ckpt::Checkpoint& cp, const std::vector<nn::ParamEntry>& fullTable) {
  CheckpointTensors t;
  for (const auto& f : cp.files()) {
    if (!endsWith(f.name, ".safetensors")) continue;
    const auto path = cp.path() / f.name;
    if (f.name == kModelFile || startsWith(f.name, "model-")) t.model.addFile(path);
    if (startsWith(f.name, "optimizer-")) t.optimizer.addFile(path);
    if (f.name == kOptimizerFile) {
      std::vector<std::string> buffers;
      const auto file = ckpt::SafetensorsFile::open(path);
      for (const auto& info : file.tensors()) buffers.push_back(info.name);
      for (const auto& buffer : buffers)
        for (const auto& p : fullTable)
          t.optimizer.addFlatPiece(path, buffer, stateName(buffer, p.name), static_cast<int64_t>(p.offset), p.shape);
    }
  }
  return t;
}

// CheckpointError unless checkpoint `cp` (its model tensors indexed in `model`) was written for `job`'s model: the
// same spec hash, and every dense parameter of the whole model present with its full shape. The message names the
// first parameter that differs, so the user sees what changed, not only two hashes.
void checkWrittenForModel(const ckpt::Checkpoint& cp, const ckpt::TensorAssembler& model, const Job& job) {
  std::string difference;
  for (const auto& p : nn::paramTableOf(job.model)) {
    if (!model.has(p.name)) {
      difference = fmt::format("this job's model has {} {} but the checkpoint has no tensor of that name", p.name,
                               p.fullShape.spaced());
      break;
    }
    if (const Shape stored = model.fullShape(p.name); !(stored == p.fullShape)) {
      difference = fmt::format("{} is {} in the checkpoint but {} in this job's model", p.name, stored.spaced(),
                               p.fullShape.spaced());
      break;
    }
  }
  const bool sameSpec = cp.meta().specHash == job.modelHash;
  if (sameSpec && difference.empty()) return;
  if (difference.empty())
    difference = "every parameter has the shape this model expects: the layers differ in something else (a layer "
                 "without parameters, or a setting)";
  DTRAIN_THROW(CheckpointError,
               "{}: checkpoint was written for another model: {} (spec hash {}, this job's model hashes to {}); "
               "refusing to load it: resume with the original model spec, or start a fresh run in another output "
               "directory (--output-dir)",
               cp.path().string(), difference, cp.meta().specHash, job.modelHash);
}

// The optimizer that wrote checkpoint `cp` (the "optimizer" metadata of its optimizer files), or "" when none says.
std::string savedOptimizer(const ckpt::Checkpoint& cp) {
  for (const auto& f : cp.files()) {
    if (!(f.name == kOptimizerFile || (startsWith(f.name, "optimizer-") && endsWith(f.name, ".safetensors")))) continue;
    const auto file = ckpt::SafetensorsFile::open(cp.path() / f.name);
    if (const auto it = file.metadata().find("optimizer"); it != file.metadata().end()) return it->second;
  }
  return "";
}

const char* kResumeAdvice = "resume with the optimizer settings that wrote it, or start a fresh run in another output directory "
                            "(--output-dir; \"init\": {\"from\": ...} takes the weights without the optimizer state)";

// Adam and AdamW keep the same state (step, exp_avg, exp_avg_sq, max_exp_avg_sq with amsgrad) and differ only in how
// weight decay enters the update, so either resumes the other, as torch.optim's load_state_dict allows.
bool sameOptimizerState(const std::string& a, const std::string& b) {
  const auto family = [](const std::string& t) { return t == "adamw" ? std::string("adam") : t; };
  return family(a) == family(b);
}

// CheckpointError unless checkpoint `cp` was written by an optimizer keeping `job`'s optimizer's state: Adam's
// moments do not resume SGD (nor the other way round). A resume with another type failed every worker after the
// rendezvous with "the checkpoint has no tensor 'exp_avg/0.weight'", naming neither the checkpoint nor the optimizers.
void checkWrittenForOptimizer(const ckpt::Checkpoint& cp, const Job& job) {
  const std::string saved = savedOptimizer(cp), wanted = nn::optimizerTypeName(job.optimizer.type);
  if (saved.empty() || sameOptimizerState(saved, wanted)) return;
  DTRAIN_THROW(CheckpointError,
               "{}: checkpoint was written with the {} optimizer, but this job's /optimizer/type is {}; refusing to "
               "load its optimizer state into another optimizer: {}",
               cp.path().string(), saved, wanted, kResumeAdvice);
}

ckpt::TensorAssembler indexModelFiles(const ckpt::Checkpoint& cp) {
  ckpt::TensorAssembler model;
  for (const auto& f : cp.files())
    if (f.name == kModelFile || (startsWith(f.name, "model-") && endsWith(f.name, ".safetensors")))
      model.addFile(cp.path() / f.name);
  return model;
}

void loadPiece(const ckpt::TensorAssembler& from, const std::string& name, const nn::ParamEntry& p, float* dst) {
  from.load(name, p.fullShape.empty() ? p.shape : p.fullShape, sliceOf(p), std::span<float>(dst, p.count));
}
std::string hookFile(int rank) { return fmt::format("comm_hook-rank-{}.safetensors", rank); }

}  // namespace

Checkpointer::Checkpointer(const Job& job, Strategy& strategy, std::string runTag)
    : job_(job),
      strategy_(strategy),
      rank_(strategy.groups().rank),
      worldSize_(strategy.groups().worldSize),
      runTag_(std::move(runTag)) {}

std::optional<ResumePoint> Checkpointer::resume(nn::Model& model, nn::Optimizer& optimizer) {
  if (job_.checkpoint.enabled && !job_.checkpoint.resume && rank_ == 0)
    if (auto warning = resumeOffWarning(job_)) log::warn("{}", *warning);
  if (!job_.checkpoint.enabled) return std::nullopt;
  if (rank_ == 0)  // a killed writer's staging dirs that this run's writers would join (the same tokens)
    for (const auto& gone : ckpt::removeStagingDirs(job_.checkpoint.dir, [&](int64_t step) { return token(step); }).removed)
      log::warn("removed {}: a checkpoint whose writer died before committing it", gone.string());
  if (!job_.checkpoint.resume) return std::nullopt;
  auto latest = ckpt::findLatestValid(job_.checkpoint.dir);
  if (rank_ == 0)
    for (const auto& s : latest.skipped)
      log::warn("skipping checkpoint {}: {} ({})", s.path.string(), ckpt::statusName(s.status), s.reason);
  if (!latest.checkpoint) {
    // Every checkpoint there was skipped: say what that means, since nothing else does (no "resumed from" line, and
    // a run that meant to continue trains from scratch).
    if (rank_ == 0 && !latest.skipped.empty())
      log::warn("no usable checkpoint in {}: the {} checkpoint(s) there were skipped (above), so training starts at "
                "step 0; new checkpoints replace them as the run reaches their steps",
                job_.checkpoint.dir.string(), latest.skipped.size());
    return std::nullopt;
  }
  auto cp = ckpt::Checkpoint::open(latest.checkpoint->path);
  checkWrittenForModel(cp, indexModelFiles(cp), job_);  // before anything is indexed by this model's offsets
  checkWrittenForOptimizer(cp, job_);
  const CheckpointShard shard = strategy_.checkpointShard(model);
  // Names are the whole model's in every layout, so any layout resumes any other (docs/checkpoints.md). Through
  // host memory: a GPU model's arenas are staged down, overwritten by the file and copied back, so any checkpoint
  // resumes on any device.
  const CheckpointTensors tensors = indexCheckpoint(cp, nn::paramTableOf(job_.model));
  model.hostParams();
  for (size_t i : shard.loadParams) {
    const auto& p = model.paramTable().at(i);
    loadPiece(tensors.model, p.name, p, static_cast<float*>(model.hostParamTensor(p).data));
  }
  model.uploadHostParams();
  if (shard.loadOptimizer) {
    // The same type with settings that keep other state: SGD's momentum turned on (or top-k's momentum_correction,
    // which keeps the velocity in the hook, turned off) starts the momentum from zero, as torch.optim.SGD starts a
    // missing momentum_buffer; other missing state (Adam's amsgrad turned on) is refused, naming it.
    auto buffers = optimizer.hostStateBuffers();
    for (auto& buf : buffers) {
      if (shard.loadParams.empty()) break;
      const std::string first = stateName(buf.name, model.paramTable().at(shard.loadParams.front()).name);
      if (!tensors.optimizer.has(first) && buf.name == "momentum_buffer") {
        if (rank_ == 0)
          log::warn("{}: the checkpoint holds no SGD momentum (written without momentum, or with top-k's "
                    "momentum_correction, which keeps it in the compression hook): the momentum starts from zero",
                    cp.path().string());
        for (size_t i : shard.loadParams) {
          const auto& p = model.paramTable().at(i);
          std::fill_n(buf.data.data() + p.offset, p.count, 0.0f);
        }
        continue;
      }
      DTRAIN_CHECK_AS(CheckpointError, tensors.optimizer.has(first),
                      "{}: the checkpoint holds no '{}' state for this job's {} optimizer ({}: written with other "
                      "optimizer settings, e.g. without amsgrad); refusing to resume from it: {}",
                      cp.path().string(), buf.name, nn::optimizerTypeName(job_.optimizer.type), first, kResumeAdvice);
      for (size_t i : shard.loadParams) {
        const auto& p = model.paramTable().at(i);
        loadPiece(tensors.optimizer, stateName(buf.name, p.name), p, buf.data.data() + p.offset);
      }
    }
    optimizer.commitHostState();
  }
  const auto& meta = cp.meta();
  optimizer.setSteps(meta.user.value("optimizer_steps", meta.step));
  ResumePoint r{meta.step, meta.epoch, meta.samplesConsumed, meta.worldSize,
                meta.user.value("epoch_world", meta.worldSize), cp.path()};
  if (const auto it = meta.user.find("log_interval"); it != meta.user.end() && it->is_object())
    r.interval = IntervalLoss{.lossSum = it->value("loss_sum", 0.0), .batches = it->value("batches", int64_t{0}),
                              .logEvery = it->value("log_every", int64_t{0})};
  return r;
}

std::optional<ResumePoint> checkResumeCheckpoint(const Job& job, std::vector<std::string>* skipped) {
  if (!job.checkpoint.enabled || !job.checkpoint.resume) return std::nullopt;
  // The folder may belong to a job that is running (an agent joining it elastically): its retention can delete the
  // checkpoint picked here before it is read. One that vanished is looked for again; if the folder keeps changing,
  // the check is left to the workers, which resume once the group has re-formed and nothing is being written.
  for (int attempt = 0; attempt < 3; ++attempt) {
    auto latest = ckpt::findLatestValid(job.checkpoint.dir);
    if (skipped != nullptr) {
      skipped->clear();
      for (const auto& c : latest.skipped)
        skipped->push_back(fmt::format("{}: {} ({})", c.path.string(), ckpt::statusName(c.status), c.reason));
    }
    if (!latest.checkpoint) return std::nullopt;
    std::optional<ckpt::Checkpoint> cp;
    std::optional<ckpt::TensorAssembler> files;
    try {
      cp.emplace(ckpt::Checkpoint::open(latest.checkpoint->path));
      files.emplace(indexModelFiles(*cp));
    } catch (const std::exception& e) {
      if (std::filesystem::exists(latest.checkpoint->path)) throw;
      log::debug("{}: removed while it was read ({}); looking again", latest.checkpoint->path.string(), e.what());
      continue;
    }
    checkWrittenForModel(*cp, *files, job);
    checkWrittenForOptimizer(*cp, job);
    const auto& meta = cp->meta();
    return ResumePoint{meta.step, meta.epoch, meta.samplesConsumed, meta.worldSize,
                       meta.user.value("epoch_world", meta.worldSize), cp->path()};
  }
  return std::nullopt;
}

void checkInitWeights(const Job& job) {
  if (job.initFrom.empty()) return;
  try {
    const auto path = denseWeightsFile(job.initFrom);
    const auto file = ckpt::SafetensorsFile::open(path);  // a truncated or damaged file throws here
    const auto table = nn::paramTableOf(job.model);
    // Hugging Face GPT-2 names lack nanoGPT's "transformer." (GPT2Model) or keep it (GPT2LMHeadModel) and store
    // Conv1D weights transposed: recognised as loadWeights does (weights.cpp's isHfGpt2), by the first block's
    // c_attn weight [C, 3C] under either name. Any file without our c_attn weight used to pass as one, so another
    // model's weights for a gpt job passed `dtrain check` and failed in every worker.
    const bool huggingFace = std::any_of(table.begin(), table.end(), [&](const nn::ParamEntry& p) {
      if (p.name != "transformer.h.0.attn.c_attn.weight") return false;
      const Shape ours = p.fullShape.empty() ? p.shape : p.fullShape;
      const auto* t = file.find(p.name.substr(std::string_view("transformer.").size()));
      if (t == nullptr) t = file.find(p.name);
      return t != nullptr && t->shape.rank() == 2 && ours.rank() == 2 && t->shape[0] == ours[1] &&
             t->shape[1] == ours[0] && ours[0] != ours[1];
    });
    if (huggingFace) return;
    for (const auto& p : table) {
      const auto* t = file.find(p.name);
      const Shape want = p.fullShape.empty() ? p.shape : p.fullShape;
      DTRAIN_CHECK_AS(CheckpointError, t != nullptr,
                      "{}: no tensor named '{}' ({} in this job's model): weights of another model?", path.string(),
                      p.name, want.spaced());
      DTRAIN_CHECK_AS(CheckpointError, t->shape == want, "{}: tensor '{}' has shape {}, expected {}", path.string(),
                      p.name, t->shape.spaced(), want.spaced());
      DTRAIN_CHECK_AS(CheckpointError, t->dtype == DType::kFloat32, "{}: tensor '{}' is {}, expected F32",
                      path.string(), p.name, dtypeName(t->dtype));
    }
  } catch (const CheckpointError& e) {
    throw CheckpointError(fmt::format("{}: /init/from: {}", job.sourceFile, e.what()));
  }
}

std::optional<std::string> resumeOffWarning(const Job& job) {
  if (!job.checkpoint.enabled || job.checkpoint.resume || !std::filesystem::is_directory(job.checkpoint.dir))
    return std::nullopt;
  for (const auto& c : ckpt::listCheckpoints(job.checkpoint.dir, /*verifyChecksums=*/false))
    if (c.status == ckpt::Status::kComplete)
      return fmt::format("{}: checkpoint.resume is false, but {} already holds checkpoints up to step {}: they stay "
                         "beside this run's, and a later run that resumes takes the newest step there, which may be "
                         "one of theirs; give this run its own --output-dir to start clean",
                         job.sourceFile, job.checkpoint.dir.string(), c.step);
  return std::nullopt;
}

bool Checkpointer::loadCommHookState(const ResumePoint& from, std::string* whyFresh) {
  const auto fresh = [whyFresh](std::string why) {
    if (whyFresh) *whyFresh = std::move(why);
    return false;
  };
  if (!hook_) return false;
  auto state = hook_->stateBuffers();
  if (state.empty()) return false;
  const bool sameWorld = from.savedWorldSize == worldSize_;
  const std::string file = hookFile(sameWorld ? rank_ : 0);
  auto cp = ckpt::Checkpoint::open(from.path);
  if (!cp.hasFile(file)) return fresh("none in the checkpoint");
  const auto& tensors = cp.tensors(file);
  const auto hook = tensors.metadata().find("hook");
  if (hook != tensors.metadata().end() && hook->second != hook_->name())
    return fresh(fmt::format("the checkpoint holds {}'s", hook->second));
  // The same type with settings that shape its state otherwise (PowerSGD's Q has rank columns per matrix; top-k
  // with momentum correction keeps a velocity): the state does not carry over, as with another type. It used to
  // fail the resume with exit 8 ("tensor 'powersgd.q' has shape [2592], expected [5184]") for a changed rank.
  for (const auto& s : state) {
    const ckpt::TensorInfo* t = tensors.find(s.name);
    if (t == nullptr)
      return fresh(fmt::format("the checkpoint's state has no {}: written with other settings", s.name));
    if (t->shape != s.view.shape)
      return fresh(fmt::format("the checkpoint's {} has shape {}, this job's {}: written with other settings",
                               s.name, t->shape.str(), s.view.shape.str()));
  }
  for (const auto& s : state) cp.loadTensor(file, s.name, s.view);
  hook_->stateLoaded(sameWorld);
  return true;
}

std::filesystem::path Checkpointer::save(const nn::Model& model, nn::Optimizer& optimizer, int64_t step,
                                         int64_t epoch, int64_t samplesConsumed, int epochWorld,
                                         const IntervalLoss& interval) {
  // Every rank derives the same token: no message needed to agree on the staging dir.
  const std::string token = this->token(step);
  ckpt::CheckpointWriter writer(job_.checkpoint.dir, step, token);
  const CheckpointShard shard = strategy_.checkpointShard(model);
  if (!shard.shardTag.empty()) {
    const ckpt::Metadata meta{{"format", "pt"}, {"dtrain.shard", shard.shardTag}};
    // Host views (a GPU model's parameters and optimizer state are staged down first).
    model.hostParams();
    std::vector<ckpt::PieceTensor> params;
    for (size_t i : shard.saveParams) {
      const auto& p = model.paramTable().at(i);
      params.push_back({p.name, model.hostParamTensor(p), p.fullShape, sliceOf(p)});
    }
    if (shard.saveModel) {
      const auto file = ckpt::piecesToWrite(params, meta);
      writer.writeTensors(fmt::format("model-{}.safetensors", shard.shardTag), file.tensors, file.metadata);
    }
    if (shard.saveOptimizer) {
      std::vector<ckpt::PieceTensor> state;
      for (auto& buf : optimizer.hostStateBuffers())
        for (size_t i : shard.saveParams) {
          const auto& p = model.paramTable().at(i);
          state.push_back({stateName(buf.name, p.name), TensorView::of(buf.data.data() + p.offset, p.shape),
                           p.fullShape, sliceOf(p)});
        }
      auto extra = meta;
      extra["optimizer"] = nn::optimizerTypeName(optimizer.spec().type);
      const auto file = ckpt::piecesToWrite(state, extra);
      writer.writeTensors(fmt::format("optimizer-{}.safetensors", shard.shardTag), file.tensors, file.metadata);
    }
  } else if (shard.saveModel) {
    auto tensors = parameterTensors(model, shard.saveParams);
    writer.writeTensors(kModelFile, tensors, {{"format", "pt"}});
  }
  if (shard.shardTag.empty() && shard.saveOptimizer) {
    std::vector<ckpt::NamedTensor> state;
    const auto n = static_cast<int64_t>(model.numParams());
    for (auto& buf : optimizer.hostStateBuffers())
      state.push_back({buf.name, TensorView::of(buf.data.data(), Shape{n})});
    writer.writeTensors(kOptimizerFile, state, {{"optimizer", nn::optimizerTypeName(optimizer.spec().type)}});
  }
  // The sparse tables are not in the arenas: their holders (the parameter servers) write their own rows into the
  // staging dir (sparse_shards.h), so no process holds a whole table; the commit requires every holder's file.
  std::vector<std::string> sparseFiles;
  if (sparse_ != nullptr && shard.saveModel) sparseFiles = sparse_->saveShards(job_.checkpoint.dir, step, token);
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
    meta.user = {{"optimizer_steps", optimizer.steps()}, {"job", job_.name}, {"lr", optimizer.lr()},
                 {"epoch_world", epochWorld}};
    const LayoutDims& l = strategy_.groups().layout;
    meta.user["layout"] = {{"data", l.data}, {"pipeline", l.stages}, {"tensor", l.tensor}};
    meta.user["log_interval"] = {
        {"loss_sum", interval.lossSum}, {"batches", interval.batches}, {"log_every", interval.logEvery}};
    ckpt::CommitOptions options;
    for (int r = 0; r < (shard.everyRankFile ? worldSize_ : 1); ++r) options.requiredFiles.push_back(rankFile(r));
    options.requiredFiles.insert(options.requiredFiles.end(), sparseFiles.begin(), sparseFiles.end());
    if (!sparseFiles.empty()) meta.user["sparse_shards"] = sparseFiles;
    committed = writer.commit(meta, options);
    ckpt::applyRetention(job_.checkpoint.dir, job_.checkpoint.keep);
  }
  // Nobody moves on (or exits after a stop signal) before the checkpoint is committed.
  strategy_.barrier();
  return committed;
}

void Checkpointer::loadSparseTables(const ResumePoint& from) {
  if (sparse_ == nullptr) return;
  auto cp = ckpt::Checkpoint::open(from.path);
  // The holders' files this checkpoint's meta names (every one is in the manifest: the commit required them), or
  // any sparse file of an older checkpoint (sparse.safetensors, every table whole).
  std::vector<std::filesystem::path> files;
  const auto& user = cp.meta().user;
  if (user.contains("sparse_shards") && user["sparse_shards"].is_array()) {
    for (const auto& f : user["sparse_shards"]) {
      const std::string name = f.is_string() ? f.get<std::string>() : std::string();
      DTRAIN_CHECK_AS(CheckpointError, cp.hasFile(name), "{}: meta.json names the sparse shard '{}', which the "
                      "manifest does not list", from.path.string(), name);
      files.push_back(from.path / name);
    }
  } else {
    for (const auto& f : cp.files())
      if (isSparseCheckpointFile(f.name)) files.push_back(from.path / f.name);
  }
  DTRAIN_CHECK_AS(CheckpointError, !files.empty(),
                  "{}: no sparse table files (the checkpoint was written without the model's sparse embedding tables)",
                  from.path.string());
  sparse_->loadShards(files, /*withState=*/true, from.step);
}

}  // namespace dtrain::train
