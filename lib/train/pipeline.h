// Pipeline parallelism (GPipe, Huang et al. 2019; PipeDream-Flush's 1F1B, Narayanan et al. 2021), combined with
// data parallelism across replicas of each stage. docs/parallelism.md is the user's view.
//
// The model's top-level layers are cut into K contiguous stages (layout.h partitionStages); the ranks of one
// replica (same data and tensor coordinates) each hold one stage, built with the whole model's names and initial
// values (nn::Model::build with StageOptions). Every stage runs trainBatch() on the same batch (every stage reads
// the same data: stage 0 needs the features, the last stage the targets). The batch of B samples is cut into
// m = min(M, B) micro-batches of B/m samples (the first B mod m one larger). A micro-batch's activation travels
// forward through the stages, the last stage computes the loss and d(loss)/d(output) scaled by b_j / B (so the
// accumulated gradient is the whole batch's mean), and the gradient travels back; each stage accumulates its
// parameter gradients over the micro-batches, so one step equals one full-batch step.
//
// Schedules, per stage s of K with m micro-batches:
//   gpipe: all m forwards, then all m backwards. Keeps m micro-batches' activations.
//   1f1b:  min(K-s-1, m) warm-up forwards, then one forward and one backward alternately, then the remaining
//          backwards: at most K-s micro-batches are in flight, so activation memory is bounded by the stage count,
//          not by m. Both leave (K-1)/(m+K-1) of each stage's time idle (the bubble).
// A micro-batch in flight needs its own activations and layer state: the stage keeps one model instance per
// in-flight slot (Model::replica(), sharing the parameter and gradient arenas), micro-batch j in slot j mod S.
//
// Communication: activations and their gradients go by Backend::sendAsync/recvAsync over 2-rank communicators, one
// per neighbour and direction (ProcessGroups::actPrev/actNext/gradPrev/gradNext), so that a send never waits
// behind a receive. Receives are posted ahead (as soon as the slot's buffer is free) and sends complete in the
// background while the stage computes the next micro-batch: communication overlaps compute. A dead neighbour is a
// CommError within the backend's timeout, and the launcher restarts the whole group from the last checkpoint.
//
// After the last backward, finishStep() sums the gradient of a tied token table over its two copies (the
// embedding on the first stage, the lm_head's replica on the last; ProcessGroups::ends), then averages gradients
// over the stage's data-parallel replicas (a DdpStrategy over ProcessGroups::data, whole arena, the job's
// communication hook), so the copies stay equal and replicas identical. Metrics, stop agreement and barriers span
// the world; gradient norms and finiteness are agreed over it (agreeFinite, gradNorm), so every rank clips by the
// same global norm and stops at the same step.
//
// Checkpoints: every rank loads the parameters it holds (the replica included) and their optimizer state by full
// name; the data-rank-0 rank of each stage writes its stage's parameters and optimizer state as
// model-p<s>-t<t>.safetensors / optimizer-p<s>-t<t>.safetensors (lib/ckpt/sharded.h). exportModel() writes the
// final, whole model.safetensors.
//
// Timeline (scripts/bench/pipeline): with DTRAIN_PIPELINE_TRACE=DIR every rank appends one JSON line per
// trainBatch() to DIR/pipeline-r<rank>.jsonl: {"rank", "stage", "stages", "micro", "wall" (s), "busy" (s, forward and
// backward compute), "slots" (micro-batches in flight), "activation_bytes" (the slots' activations and layer
// state), "events": [["F"|"B", j, t0, t1], ...] (seconds from the batch's start)}.
//
// Threading: the trainer's thread drives everything; the communicators' threads move bytes. Not thread-safe.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "lib/nn/loss.h"
#include "lib/nn/model.h"
#include "lib/train/ddp.h"
#include "lib/train/strategy.h"

namespace dtrain::train {

class PipelineStrategy final : public Strategy {
 public:
  // groups from makeProcessGroups with layout.stages > 1 (tensor parallelism: lib/train/tensor_parallel.h).
  PipelineStrategy(ProcessGroups groups, const Job& job, const StrategyOptions& options);
  ~PipelineStrategy() override;

  std::string name() const override { return "pipeline"; }
  std::string summary() const override;
  // This rank's stage of the job's model, for micro-batches of up to microBatchSize() samples. The trainer builds
  // its model with it instead of nn::Model::build.
  nn::Model buildModel(uint64_t seed) const;
  int microBatchSize() const { return microMax_; }
  // Sizes the stage's buffers for batches of at most `batch` samples (at most data.batch_size: a rank's share of
  // the data may be smaller). Call before buildModel() and prepare().
  void limitBatch(int batch);
  const StageRange& stage() const { return stages_[static_cast<size_t>(groups_.coords.stage)]; }
  bool firstStage() const { return groups_.coords.stage == 0; }
  bool lastStage() const { return groups_.coords.stage + 1 == groups_.layout.stages; }

  void prepare(nn::Model& model) override;
  nn::LayerGradReady gradReadyHook() override { return {}; }
  void finishStep() override;
  void reduceMetrics(std::span<double> values, comm::ReduceOp op) override;
  int agreeOnStop(int localSignal) override;
  int64_t stopCheckEvery() const override { return 8; }
  void barrier() override;
  CheckpointShard checkpointShard(const nn::Model& model) const override;
  bool agreeFinite(std::span<const float> values) override;
  double gradNorm(const nn::Model& model) override;

  // One batch of `batch` samples through the pipeline with the schedule (see above); every stage of the replica
  // calls it with the same batch. `features`: [batch, input...] (read by the first stage); `targets`: the batch's
  // targets (read by the last stage). Gradients are written (mode kOverwrite) or added (kAccumulate) scaled by
  // gradScale. `dropoutSeed` and `dropoutPosition`, mixed with the micro-batch's number, reseed the stage's random
  // layers per micro-batch (nn::Model::reseedDropout). Returns the batch's mean loss on the last stage, 0 elsewhere.
  // Blocks until this stage's part is done; CommError when a neighbour fails.
  float trainBatch(const float* features, const TensorView& targets, int batch, float gradScale, nn::GradMode mode,
                   uint64_t dropoutSeed, uint64_t dropoutPosition);
  // Forward only, in micro-batches, for evaluation: the batch's sums on the last stage, zeros elsewhere.
  nn::EvalSums evalBatch(const float* features, const TensorView& targets, int batch);
  // Collective over the world: writes the whole model as safetensors at `path` (rank 0 writes; each stage's
  // data-rank-0 rank contributes its parameters through a temporary folder beside it; rank 0 streams the file one
  // tensor at a time, so it never holds the whole model).
  void exportModel(const nn::Model& model, const std::filesystem::path& path);

 private:
  struct Slot;
  void forward(int j);   // forwardCompute(j), timed for the trace
  void backward(int j);
  void forwardCompute(int j);
  void backwardCompute(int j);
  void writeTrace(int m);
  void markCompute();
  void postReceives(int j);
  void waitSends();

  const Job& job_;
  std::vector<StageRange> stages_;
  int microBatches_;
  int microMax_;
  PipelineSettings::Schedule schedule_;
  std::unique_ptr<DdpStrategy> ddp_;   // over the data group; null when there is one replica
  nn::Model* model_ = nullptr;
  std::vector<nn::Model> replicas_;    // slots 1..S-1 (slot 0 is model_)
  std::vector<std::unique_ptr<Slot>> slots_;
  std::unique_ptr<nn::Loss> loss_;     // last stage
  int64_t tiedEntry_ = -1;             // the tied table's entry in this stage's paramTable (first/last stage)
  // The batch trainBatch() is working on.
  struct Micro {
    int offset = 0;
    int size = 0;
  };
  std::vector<Micro> micro_;
  const float* features_ = nullptr;
  TensorView targets_;
  int batch_ = 0;
  float gradScale_ = 1;
  nn::GradMode mode_ = nn::GradMode::kOverwrite;
  bool firstBackward_ = true;
  uint64_t dropoutSeed_ = 0, dropoutPosition_ = 0;
  double lossSum_ = 0;
  // DTRAIN_PIPELINE_TRACE: the timeline of the current batch (empty path: off).
  std::string tracePath_;
  std::vector<std::tuple<char, int, double, double>> events_;
  std::chrono::steady_clock::time_point batchStart_;
  double computeStart_ = 0;
};

}  // namespace dtrain::train
