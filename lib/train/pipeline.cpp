#include "lib/train/pipeline.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include "lib/ckpt/file_io.h"
#include "lib/ckpt/safetensors.h"
#include "lib/ckpt/sharded.h"
#include "lib/common/aligned_buffer.h"
#include "lib/common/error.h"
#include "lib/train/tensor_parallel.h"
#include "lib/train/weights.h"

#include <nlohmann/json.hpp>

namespace dtrain::train {

struct PipelineStrategy::Slot {
  nn::Model* model = nullptr;
  AlignedBuffer<float> input;    // the micro-batch's activations from the previous stage (stage > 0)
  AlignedBuffer<float> gradOut;  // the gradient of this stage's output (received, or the loss's on the last stage)
  comm::WorkPtr actRecv, gradRecv, actSend, gradSend;
};

namespace {

void finish(comm::WorkPtr& w) {
  if (w) w->wait();
  w.reset();
}

// Rows [start, start + count) of a batched view.
TensorView rows(const TensorView& v, int start, int count) {
  const Shape per = v.shape.dropFirst();
  const auto bytes = static_cast<size_t>(per.numel()) * dtypeSize(v.dtype);
  return TensorView{static_cast<char*>(v.data) + static_cast<size_t>(start) * bytes, per.withBatch(count), v.dtype,
                    v.device};
}

// The gradient of the tied token table, which the first stage's embedding owns and the last stage's lm_head
// holds a replica of: its name, or empty when the model has no tied head split across stages.
std::string tiedTableName(const nn::ModelSpec& spec, const std::vector<StageRange>& stages) {
  if (stages.size() < 2) return "";
  for (const auto& l : spec.layers) {
    if (l.tiedTo < 0 || l.tiedTo >= stages.front().last) continue;
    if (l.index < stages.back().first) return "";  // head and table share a stage
    const auto& emb = spec.layers[static_cast<size_t>(l.tiedTo)];
    return fmt::format("{}.{}", emb.paramPrefix(), nn::paramShapesOf(emb).front().suffix);
  }
  return "";
}

}  // namespace

PipelineStrategy::PipelineStrategy(ProcessGroups groups, const Job& job, const StrategyOptions& options)
    : Strategy(std::move(groups)),
      job_(job),
      stages_(partitionStages(job.model, groups_.layout.stages, job.parallel.pipeline.balance, job.sourceFile,
                              groups_.layout.tensor)),
      microBatches_(job.parallel.pipeline.microBatches),
      microMax_(static_cast<int>((job.data.batchSize + microBatches_ - 1) / microBatches_)),
      schedule_(job.parallel.pipeline.schedule) {
  // A tied lm_head must sit in the last stage (the gpt preset's does): its table is summed with the first's.
  for (const auto& l : job.model.layers)
    DTRAIN_CHECK_AS(ConfigError,
                    l.tiedTo < 0 || l.tiedTo >= stages_.front().last || l.index >= stages_.back().first ||
                        stages_.size() == 1,
                    "{}: /parallel/pipeline: the tied lm_head (layer {}) must be in the last stage, with the "
                    "embedding in the first; give a balance that puts it there",
                    job.sourceFile, l.index);
  if (groups_.layout.data > 1) {
    ProcessGroups replicas{.rank = groups_.dataRank, .worldSize = groups_.dataSize, .dataRank = groups_.dataRank,
                           .dataSize = groups_.dataSize, .layout = {.data = groups_.dataSize},
                           .coords = {.data = groups_.dataRank}, .world = groups_.data, .data = groups_.data};
    ddp_ = std::make_unique<DdpStrategy>(std::move(replicas),
                                         DdpOptions{.firstBucketMb = job.parallel.firstBucketMb,
                                                    .bucketMb = job.parallel.bucketMb,
                                                    .overlap = false,
                                                    .hook = options.commHook});
  }
  if (const char* dir = std::getenv("DTRAIN_PIPELINE_TRACE"); dir != nullptr && *dir != '\0') {
    std::filesystem::create_directories(dir);
    tracePath_ = fmt::format("{}/pipeline-r{}.jsonl", dir, groups_.rank);
  }
}

PipelineStrategy::~PipelineStrategy() {
  // Sends still in flight read our buffers: let them finish (errors are already someone else's to report).
  for (auto& s : slots_)
    for (comm::WorkPtr* w : {&s->actRecv, &s->gradRecv, &s->actSend, &s->gradSend}) try {
        finish(*w);
      } catch (const Error&) {
      }
}

std::string PipelineStrategy::summary() const {
  const StageRange& s = stage();
  return fmt::format("pipeline stage {} of {} (layers {}..{}), {} micro-batches of up to {}, {}{}",
                     groups_.coords.stage, groups_.layout.stages, s.first, s.last - 1, microBatches_, microMax_,
                     schedule_ == PipelineSettings::Schedule::kGpipe ? "gpipe" : "1f1b",
                     ddp_ ? fmt::format(", {} data replicas", groups_.dataSize) : "");
}

void PipelineStrategy::limitBatch(int batch) {
  DTRAIN_CHECK(batch >= 1 && batch <= job_.data.batchSize, "pipeline: a batch limit of {} (expected 1 to {})", batch,
               job_.data.batchSize);
  microMax_ = (batch + microBatches_ - 1) / microBatches_;
}

nn::Model PipelineStrategy::buildModel(uint64_t seed) const {
  const StageRange& s = stage();
  return nn::Model::build(job_.model, microMax_, seed, Device::cpu(),
                          tensorGroupOver(groups_.tensor, groups_.coords.tensor, groups_.layout.tensor),
                          {.first = s.first, .last = s.last, .inputGrad = !firstStage()});
}

void PipelineStrategy::prepare(nn::Model& model) {
  model_ = &model;
  // In-flight micro-batches per stage: gpipe all of them, 1f1b at most K - s.
  const int inFlight = schedule_ == PipelineSettings::Schedule::kGpipe
                           ? microBatches_
                           : std::min(microBatches_, groups_.layout.stages - groups_.coords.stage);
  replicas_.clear();
  replicas_.reserve(static_cast<size_t>(inFlight - 1));
  for (int i = 1; i < inFlight; ++i) replicas_.push_back(model.replica());
  slots_.clear();
  const auto inFloats = static_cast<size_t>(microMax_ * model.inputShape().numel());
  const auto outFloats = static_cast<size_t>(microMax_ * model.outputShape().numel());
  for (int i = 0; i < inFlight; ++i) {
    auto slot = std::make_unique<Slot>();
    slot->model = i == 0 ? &model : &replicas_[static_cast<size_t>(i) - 1];
    if (!firstStage()) slot->input = AlignedBuffer<float>(inFloats);
    slot->gradOut = AlignedBuffer<float>(outFloats);
    slots_.push_back(std::move(slot));
  }
  if (lastStage()) loss_ = nn::Loss::create(job_.loss, job_.model.output(), microMax_);
  tiedEntry_ = -1;
  if (const std::string tied = tiedTableName(job_.model, stages_); !tied.empty() && (firstStage() || lastStage())) {
    const auto& table = model.paramTable();
    for (size_t i = 0; i < table.size(); ++i)
      if (table[i].name == tied) tiedEntry_ = static_cast<int64_t>(i);
    DTRAIN_CHECK(tiedEntry_ >= 0 && groups_.ends != nullptr, "pipeline: the tied table {} is missing on stage {}", tied,
                 groups_.coords.stage);
  }
  if (ddp_) ddp_->prepare(model);
}

void PipelineStrategy::postReceives(int j) {
  if (j >= static_cast<int>(micro_.size())) return;
  Slot& s = *slots_[static_cast<size_t>(j) % slots_.size()];
  const int n = micro_[static_cast<size_t>(j)].size;
  if (!firstStage())
    s.actRecv = groups_.actPrev->recvAsync(
        TensorView::flat(s.input.data(), static_cast<size_t>(n * model_->inputShape().numel())), 0);
  if (!lastStage())
    s.gradRecv = groups_.gradNext->recvAsync(
        TensorView::flat(s.gradOut.data(), static_cast<size_t>(n * model_->outputShape().numel())), 1);
}

namespace {
double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

// The trace times compute only: from after the waits for the inputs (markCompute) to the end.
void PipelineStrategy::forward(int j) {
  forwardCompute(j);
  if (!tracePath_.empty()) events_.emplace_back('F', j, computeStart_, since(batchStart_));
}

void PipelineStrategy::backward(int j) {
  backwardCompute(j);
  if (!tracePath_.empty()) events_.emplace_back('B', j, computeStart_, since(batchStart_));
}

void PipelineStrategy::markCompute() {
  if (!tracePath_.empty()) computeStart_ = since(batchStart_);
}

void PipelineStrategy::forwardCompute(int j) {
  Slot& s = *slots_[static_cast<size_t>(j) % slots_.size()];
  const Micro& m = micro_[static_cast<size_t>(j)];
  finish(s.actSend);  // the slot's previous output is about to be overwritten
  const float* x = nullptr;
  if (firstStage()) {
    x = features_ + static_cast<int64_t>(m.offset) * model_->inputShape().numel();
  } else {
    finish(s.actRecv);
    x = s.input.data();
  }
  markCompute();
  if (s.model->hasRandomLayers()) {
    const uint64_t salt = 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(j + 1);
    s.model->reseedDropout(dropoutSeed_ + salt, dropoutPosition_ + salt);
  }
  TensorView out = s.model->forward(x, m.size, true);
  if (!lastStage()) {
    s.actSend = groups_.actNext->sendAsync(out, 1);
    return;
  }
  // The batch's mean loss is the size-weighted mean of the micro-batches' means; so is its gradient.
  const double weight = static_cast<double>(m.size) / batch_;
  const float loss = loss_->forward(out, rows(targets_, m.offset, m.size));
  lossSum_ += weight * loss;
  TensorView g = loss_->backward(static_cast<float>(gradScale_ * weight));
  g.requirePacked("the pipeline's loss gradient");  // CUDA's strided bf16 one never reaches a CPU pipeline stage
  std::memcpy(s.gradOut.data(), g.data, g.bytes());
}

void PipelineStrategy::backwardCompute(int j) {
  Slot& s = *slots_[static_cast<size_t>(j) % slots_.size()];
  const Micro& m = micro_[static_cast<size_t>(j)];
  if (!lastStage()) finish(s.gradRecv);
  finish(s.gradSend);  // the slot's previous input gradient is about to be overwritten
  markCompute();
  const nn::GradMode mode = firstBackward_ ? mode_ : nn::GradMode::kAccumulate;
  firstBackward_ = false;
  s.model->backward(TensorView::of(s.gradOut.data(), model_->outputShape().withBatch(m.size)), {}, mode);
  if (!firstStage()) s.gradSend = groups_.gradPrev->sendAsync(s.model->inputGrad(), 0);
  postReceives(j + static_cast<int>(slots_.size()));  // the slot is free again
}

void PipelineStrategy::waitSends() {
  for (auto& s : slots_) {
    finish(s->actSend);
    finish(s->gradSend);
  }
}

float PipelineStrategy::trainBatch(const float* features, const TensorView& targets, int batch, float gradScale,
                                   nn::GradMode mode, uint64_t dropoutSeed, uint64_t dropoutPosition) {
  DTRAIN_CHECK(model_ != nullptr, "pipeline: trainBatch() before prepare()");
  DTRAIN_CHECK(batch >= 1 && batch <= job_.data.batchSize, "pipeline: a batch of {} samples (at most {})", batch,
               job_.data.batchSize);
  // m = min(M, batch) micro-batches, the first batch mod m one sample larger: every stage cuts alike.
  const int m = std::min(microBatches_, batch);
  micro_.clear();
  for (int j = 0, at = 0; j < m; ++j) {
    const int n = batch / m + (j < batch % m ? 1 : 0);
    micro_.push_back({at, n});
    at += n;
  }
  features_ = features;
  targets_ = targets;
  batch_ = batch;
  gradScale_ = gradScale;
  mode_ = mode;
  firstBackward_ = true;
  dropoutSeed_ = dropoutSeed;
  dropoutPosition_ = dropoutPosition;
  lossSum_ = 0;
  events_.clear();
  batchStart_ = std::chrono::steady_clock::now();
  const int inFlight = static_cast<int>(slots_.size());
  for (int j = 0; j < std::min(inFlight, m); ++j) postReceives(j);
  if (schedule_ == PipelineSettings::Schedule::kGpipe) {
    for (int j = 0; j < m; ++j) forward(j);
    for (int j = 0; j < m; ++j) backward(j);
  } else {
    // 1F1B: warm up with the forwards the later stages need, then alternate, then drain.
    const int warmup = std::min(groups_.layout.stages - groups_.coords.stage - 1, m);
    for (int j = 0; j < warmup; ++j) forward(j);
    for (int i = 0; i < m - warmup; ++i) {
      forward(warmup + i);
      backward(i);
    }
    for (int i = m - warmup; i < m; ++i) backward(i);
  }
  waitSends();
  if (!tracePath_.empty()) writeTrace(m);
  return lastStage() ? static_cast<float>(lossSum_) : 0.0f;
}

void PipelineStrategy::writeTrace(int m) {
  // Busy time is the compute of the forwards and backwards, waits for their inputs excluded.
  double busy = 0;
  nlohmann::json events = nlohmann::json::array();
  for (const auto& [kind, j, t0, t1] : events_) {
    busy += t1 - t0;
    events.push_back({std::string(1, kind), j, t0, t1});
  }
  size_t activationBytes = 0;
  for (const auto& s : slots_) activationBytes += s->model->activationBytes();
  nlohmann::json line{{"rank", groups_.rank}, {"stage", groups_.coords.stage}, {"stages", groups_.layout.stages},
                      {"micro", m}, {"wall", since(batchStart_)}, {"busy", busy},
                      {"slots", slots_.size()}, {"activation_bytes", activationBytes}, {"events", events}};
  std::ofstream out(tracePath_, std::ios::app);
  out << line.dump() << "\n";
}

nn::EvalSums PipelineStrategy::evalBatch(const float* features, const TensorView& targets, int batch) {
  DTRAIN_CHECK(model_ != nullptr, "pipeline: evalBatch() before prepare()");
  nn::EvalSums sums;
  Slot& s = *slots_.front();
  for (int at = 0; at < batch; at += microMax_) {
    const int n = std::min(microMax_, batch - at);
    const float* x = features + static_cast<int64_t>(at) * model_->inputShape().numel();
    if (!firstStage()) {
      groups_.actPrev->recv(TensorView::flat(s.input.data(), static_cast<size_t>(n * model_->inputShape().numel())), 0);
      x = s.input.data();
    }
    TensorView out = s.model->forward(x, n, false);
    if (lastStage()) sums += loss_->evaluate(out, rows(targets, at, n));
    else groups_.actNext->send(out, 1);
  }
  return sums;
}

void PipelineStrategy::finishStep() {
  auto grads = model_->grads();
  if (tiedEntry_ >= 0) {
    // The table's two copies got the embedding's and the head's gradients: both take the sum (as the whole
    // model's shared parameter does), so the identical updates keep them equal.
    const auto& e = model_->paramTable()[static_cast<size_t>(tiedEntry_)];
    groups_.ends->allreduce(TensorView::flat(grads.data() + e.offset, e.count), comm::ReduceOp::kSum);
  }
  if (ddp_) ddp_->finishStep();
}

void PipelineStrategy::reduceMetrics(std::span<double> values, comm::ReduceOp op) {
  groups_.world->allreduce(TensorView::flat(values.data(), values.size()), op);
}

int PipelineStrategy::agreeOnStop(int localSignal) {
  double flag[1] = {static_cast<double>(localSignal)};
  groups_.world->allreduce(TensorView::flat(flag, 1), comm::ReduceOp::kMax);
  return static_cast<int>(flag[0]);
}

void PipelineStrategy::barrier() { groups_.world->barrier(); }

bool PipelineStrategy::agreeFinite(std::span<const float> values) {
  double bad[1] = {nn::allFinite(values) ? 0.0 : 1.0};
  groups_.world->allreduce(TensorView::flat(bad, 1), comm::ReduceOp::kMax);
  return bad[0] == 0.0;
}

double PipelineStrategy::gradNorm(const nn::Model& model) {
  // Each parameter once: the tied table's replica on the last stage is left out (its sum is the first stage's);
  // under tensor parallelism the slices of every tensor rank and the replicated parameters of tensor rank 0.
  double sum[1] = {0};
  const auto grads = model.grads();
  const bool replicatedHere = groups_.coords.tensor == 0;
  for (const auto& e : model.paramTable()) {
    if (e.replica || (!e.sliced() && !replicatedHere)) continue;
    for (size_t i = e.offset; i < e.offset + e.count; ++i) sum[0] += static_cast<double>(grads[i]) * grads[i];
  }
  if (groups_.tensor) groups_.tensor->allreduce(TensorView::flat(sum, 1), comm::ReduceOp::kSum);
  if (groups_.pipeline) groups_.pipeline->allreduce(TensorView::flat(sum, 1), comm::ReduceOp::kSum);
  return std::sqrt(sum[0]);
}

CheckpointShard PipelineStrategy::checkpointShard(const nn::Model& model) const {
  const bool writer = groups_.coords.data == 0;
  CheckpointShard shard{.loadParams = allParams(model), .loadOptimizer = true, .saveModel = writer,
                        .saveOptimizer = writer};
  // Replicated parameters of a tensor-parallel stage are written by its tensor rank 0 only.
  if (writer)
    for (size_t i : tensorSaveParams(model, groups_.coords.tensor))
      if (!model.paramTable()[i].replica) shard.saveParams.push_back(i);
  shard.shardTag = fmt::format("p{}-t{}", groups_.coords.stage, groups_.coords.tensor);
  return shard;
}

void PipelineStrategy::exportModel(const nn::Model& model, const std::filesystem::path& path) {
  const auto parts = std::filesystem::path(path.string() + ".parts");
  const CheckpointShard shard = checkpointShard(model);
  if (groups_.rank == 0) {
    std::filesystem::remove_all(parts);
    std::filesystem::create_directories(parts);
  }
  barrier();
  if (shard.saveModel) {
    std::vector<ckpt::PieceTensor> pieces;
    for (size_t i : shard.saveParams) {
      const auto& p = model.paramTable()[i];
      pieces.push_back({p.name, model.paramTensor(p), p.fullShape,
                        p.sliceDim < 0 ? ckpt::Slice{}
                                       : ckpt::Slice{.dim = p.sliceDim, .start = p.sliceStart,
                                                     .length = p.shape[p.sliceDim]}});
    }
    const auto file = ckpt::piecesToWrite(pieces);
    ckpt::writeSafetensorsFile(parts / fmt::format("model-{}.safetensors", shard.shardTag), file.tensors,
                               file.metadata);
  }
  barrier();
  if (groups_.rank != 0) return;
  ckpt::TensorAssembler pieces;
  for (const auto& entry : std::filesystem::directory_iterator(parts)) pieces.addFile(entry.path());
  // Streamed one tensor at a time (header first: it needs names and shapes only), so rank 0 never holds the whole
  // model beside its own stage: what lets a model that needs model parallelism to fit also export.
  const std::vector<nn::ParamEntry> table = nn::paramTableOf(job_.model);
  static const float kShapeOnly = 0;
  std::vector<ckpt::NamedTensor> header;
  for (const auto& e : table) header.push_back({e.name, TensorView::of(&kShapeOnly, e.shape)});
  const auto tmp = std::filesystem::path(path.string() + ".tmp");
  ckpt::FileSink sink(tmp, ckpt::FileSink::Options{.direct = false});
  sink.write(ckpt::safetensorsHeader(header, {{"format", "pt"}, {"producer", "dtrain"}}));
  std::vector<float> tensor;
  for (const auto& e : table) {
    tensor.resize(e.count);
    pieces.load(e.name, e.shape, {}, std::span<float>(tensor.data(), e.count));
    sink.write(tensor.data(), e.count * sizeof(float));
  }
  sink.finish();
  std::filesystem::rename(tmp, path);
  std::filesystem::remove_all(parts);
}

}  // namespace dtrain::train
