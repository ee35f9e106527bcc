// DistributedSampler: which samples of an epoch each rank takes, with PyTorch's DistributedSampler semantics,
// plus a resume point that survives a change of world size.
//
// Per epoch, the group's order is a permutation of [0, N): shuffled from (seed + epoch) when `shuffle`, the
// identity otherwise. The generator is std::mt19937_64 seeded with seed + epoch driving a Fisher-Yates shuffle
// with unbiased bounded integers (random.h); PyTorch's exact order (torch.randperm) cannot be reproduced, the
// semantics are the same: same seed and epoch give the same order on every rank and every machine.
//
// Resume: `startSample` is how many entries of the epoch's order the group already consumed (possibly at another
// world size). Only the rest, order[startSample:], is shared out over the *current* world: padded to a multiple of
// the world size by repeating the epoch order from its start (PyTorch's rule), or cut down to one with dropLast, or
// (pad=false, for evaluation) left uneven so every sample is seen exactly once. Rank r takes rest[r::world]. A
// resume at the same world size therefore yields exactly the indices the uninterrupted epoch had left, padding
// included (bit-identical resume). After every rank
// has taken k samples, the group has consumed exactly the prefix rest[0 : k*world] (position() below), so a
// checkpoint storing that position resumes with no sample of the epoch skipped and none seen twice (padding
// aside), whatever the next world size is.
//
// Resize without repeats: padding is what a fixed world does (PyTorch), but after a resize mid-epoch the rest
// rarely divides by the new world, and padding would repeat samples. The trainer then sets pad=false for the
// rest of that epoch (setPad): uneven shards, rank r taking rest[r::world] as before, so ranks differ by at most
// one sample and only in their last batch; maxSamplesPerRank() (rank 0's count) tells every rank how many steps
// the group takes, and a rank whose samples ran out joins the last step with an empty batch (trainer.cpp).
//
// Cost: setEpoch() is O(N) time (one permutation) and keeps only this rank's N/world indices.
// Thread-safety: const methods may run concurrently; setEpoch() must not overlap any other call.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace dtrain::data {

struct SamplerOptions {
  int64_t datasetSize = 0;
  int rank = 0;
  int worldSize = 1;
  bool shuffle = true;
  uint64_t seed = 0;
  bool dropLast = false;  // drop the tail that does not fill a whole round of the world (PyTorch's drop_last)
  bool pad = true;        // when !dropLast: pad to a multiple of the world (PyTorch); false: uneven shards
  int64_t epoch = 0;      // the epoch the constructor prepares
  int64_t startSample = 0;
};

class DistributedSampler {
 public:
  // Throws ConfigError on a bad rank/world/startSample.
  explicit DistributedSampler(const SamplerOptions& options);

  // Prepares `epoch`, skipping the first `startSample` entries of its order. startSample may equal the dataset
  // size (nothing left); larger is a ConfigError (the dataset shrank since the checkpoint).
  void setEpoch(int64_t epoch, int64_t startSample = 0);

  int64_t epoch() const { return epoch_; }
  int64_t startSample() const { return startSample_; }
  int64_t datasetSize() const { return options_.datasetSize; }
  int rank() const { return options_.rank; }
  int worldSize() const { return options_.worldSize; }
  // Entries of the epoch's order left for the group: datasetSize - startSample.
  int64_t remaining() const { return options_.datasetSize - startSample_; }
  // Samples the whole group takes this epoch after padding/dropping (a multiple of the world unless uneven).
  int64_t totalSize() const { return total_; }
  int64_t numSamplesThisRank() const { return static_cast<int64_t>(indices_.size()); }
  // The most samples any rank takes this epoch (rank 0's share): what fixes the group's step count.
  int64_t maxSamplesPerRank() const { return (total_ + options_.worldSize - 1) / options_.worldSize; }
  // Padding (true) or uneven shards (false) from the next setEpoch on; dropLast, when set, still wins.
  void setPad(bool pad) { options_.pad = pad; }
  bool pad() const { return options_.pad; }
  // This rank's sample indices for the epoch, in order.
  std::span<const int64_t> indices() const { return indices_; }
  // How many of indices()[localBegin, localBegin + count) are padding: repeats of the epoch's first samples that
  // fill the last round of the world (PyTorch's rule), always the rank's last indices. 0 without padding.
  int64_t paddingIn(int64_t localBegin, int64_t count) const;
  // With dropLast: this rank's share of the samples the epoch leaves out, the tail of the rest that does not fill
  // a whole round of the world (PyTorch's drop_last), rest[q] for totalSize() <= q < remaining() and
  // q = rank (mod world): the samples this rank would have taken next. Fewer than one per rank; every dropped
  // sample is some rank's. Empty without dropLast. Valid until the next setEpoch().
  std::span<const int64_t> dropped() const { return dropped_; }

  // Epoch position (entries of the epoch's order consumed by the group) once every rank has taken its first
  // `localTaken` samples: startSample + min(localTaken * world, remaining). Store this in a checkpoint.
  int64_t position(int64_t localTaken) const;

  // The epoch's full order (identity when !shuffle). O(n); `out` is resized to n.
  static void epochOrder(int64_t n, bool shuffle, uint64_t seed, int64_t epoch, std::vector<int64_t>& out);

 private:
  SamplerOptions options_;
  int64_t epoch_ = 0;
  int64_t startSample_ = 0;
  int64_t total_ = 0;
  std::vector<int64_t> order_;  // scratch, reused across epochs
  std::vector<int64_t> indices_;
  std::vector<int64_t> dropped_;
};

}  // namespace dtrain::data
