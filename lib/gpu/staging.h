// Host -> device copies of training batches: page-locked (pinned) host memory, a separate copy stream, and two
// device slots, so the copy of batch n+1 can run while batch n computes (PyTorch's pin_memory + non_blocking
// copies on a side stream, with the stream-ordering a caching allocator would otherwise give).
//
//   BatchStaging staging({featureBytes, labelBytes}, device);
//   int slot = staging.stage({{features, fBytes}, {labels, lBytes}});  // memcpy into pinned memory, async H2D
//   auto dev = staging.use(slot);   // the compute stream waits (on the GPU) for the copy; dev[0], dev[1]
//   ... kernels on the compute stream read dev[0], dev[1] ...
//
// Ordering, all by events, the host never waiting for compute:
// - stage() takes the slots in turn. Before overwriting a slot's pinned memory the host waits for that slot's
//   previous copy to have read it (an event on the copy stream; normally long done). The copy stream then waits
//   (cudaStreamWaitEvent) until the compute stream has finished every kernel of the batch the slot held before,
//   and copies; an event marks the copy done.
// - use(slot) makes the compute stream wait for that event, and records on the compute stream that every batch
//   used before this one is finished once the stream gets here: that is what stage() waits for before reusing
//   the other slot. So a caller may stage batch n+1 as soon as batch n's work is enqueued, and the copy overlaps
//   it; or stage and use at once (no overlap, still correct).
// - At most one batch is staged ahead: staging into the slot of the batch in use (before the batch staged ahead
//   is used) or into a slot staged but not yet used is a UsageError.
// - unstage(slot) drops a batch staged ahead that will not be used (the trainer stopped before it): the slot is
//   the one the next stage() takes (host bookkeeping only; that stage() orders its copy after the dropped one).
// The compute stream is the legacy default stream (where every CUDA layer computes); the copy stream is
// non-blocking (a blocking stream would wait for the legacy stream's work and overlap nothing).
// Ownership: move-only; pinned memory (cudaHostAlloc) and device slots are freed at destruction (cudaFreeHost
// and cudaFree synchronise). Thread-safety: none (one trainer thread). Errors: GpuError for CUDA failures,
// UsageError for a part larger than its maximum or a slot staged twice.
#pragma once

#include <array>
#include <cstddef>
#include <initializer_list>
#include <memory>
#include <vector>

#include "lib/gpu/memory.h"
#include "lib/gpu/stream.h"

namespace dtrain::gpu {

class BatchStaging {
 public:
  static constexpr int kSlots = 2;
  static constexpr int kParts = 2;  // features and labels
  struct Part {
    const void* host = nullptr;  // any host memory (pageable is fine): copied into pinned memory first
    size_t bytes = 0;
  };

  BatchStaging() = default;
  // Slots for parts of at most maxBytes[i] bytes each, on GPU `device`.
  BatchStaging(std::array<size_t, kParts> maxBytes, int device);
  ~BatchStaging();
  BatchStaging(BatchStaging&&) noexcept;
  BatchStaging& operator=(BatchStaging&&) noexcept;
  BatchStaging(const BatchStaging&) = delete;
  BatchStaging& operator=(const BatchStaging&) = delete;

  // Starts the copy of one batch's parts (fewer than kParts is fine) into the next slot; returns the slot.
  int stage(std::initializer_list<Part> parts);
  // The slot's device pointers (part i at [i]), ordered after its copy on the compute stream. Each staged slot
  // is used once.
  std::array<void*, kParts> use(int slot);
  // Drops the staged, unused batch of `slot`; the next stage() refills that slot. UsageError if it holds none.
  void unstage(int slot);

 private:
  void release() noexcept;

  struct Slot {
    std::array<void*, kParts> pinned{};  // cudaHostAlloc'd, maxBytes_[i] each
    std::array<DeviceBuffer, kParts> device;
    std::unique_ptr<Event> copied;       // on the copy stream, after the slot's last copy
    std::unique_ptr<Event> finished;     // on the compute stream, after the last kernel of the slot's last batch
    bool copiedOnce = false, finishedOnce = false, staged = false;
  };
  std::array<Slot, kSlots> slots_;
  std::array<size_t, kParts> maxBytes_{};
  std::unique_ptr<Stream> copyStream_;
  int next_ = 0;       // the slot stage() takes next
  int lastUsed_ = -1;  // the slot of the batch used last
  int device_ = 0;
};

}  // namespace dtrain::gpu

namespace dtrain::gpu {

// A host copy of a device float arena for code that computes on the host (the top-k and PowerSGD compression hooks
// on a GPU, lib/train/compression_hooks.h): `count` floats of pinned host memory, filled slice by slice from the
// device and copied back, the host never blocking except in wait().
//
// - download(src, offset, n): an event recorded on the compute stream (the legacy default stream) after the work
//   enqueued so far; a non-blocking copy stream waits for it on the GPU (cudaStreamWaitEvent) and copies the n
//   device floats at src into host()[offset, offset + n); an event marks the copy done. Returns at once with a
//   ticket for wait(). So a bucket's download overlaps the backward kernels enqueued after it.
// - wait(ticket): blocks until that copy landed in host memory; each ticket is waited once (then reused).
// - upload(dst, offset, n): host()[offset, offset + n) -> dst, enqueued on the compute stream (returns at once):
//   kernels enqueued later (the optimizer) see it. The host must not write that slice until the compute stream
//   passed the copy: the next download() of the slice is ordered after it on the GPU, and its wait() is where
//   the host may write again.
// Ownership: move-only; the pinned memory (cudaHostAlloc) is freed at destruction (cudaFreeHost synchronises).
// Thread-safety: none (the trainer's thread). Errors: GpuError for CUDA failures, UsageError for a slice outside
// the arena or an unknown ticket.
class ArenaStaging {
 public:
  ArenaStaging(size_t count, int device);
  ~ArenaStaging();
  ArenaStaging(const ArenaStaging&) = delete;
  ArenaStaging& operator=(const ArenaStaging&) = delete;

  float* host() const noexcept { return host_; }
  size_t size() const noexcept { return count_; }
  int download(const float* src, size_t offset, size_t n);
  void wait(int ticket);
  void upload(float* dst, size_t offset, size_t n);

 private:
  void checkSlice(size_t offset, size_t n, const char* what) const;

  struct Ticket {
    std::unique_ptr<Event> ready;   // on the compute stream: the slice's gradients are final
    std::unique_ptr<Event> copied;  // on the copy stream: the slice is in host memory
    bool busy = false;
  };
  float* host_ = nullptr;
  size_t count_ = 0;
  int device_ = 0;
  std::unique_ptr<Stream> copyStream_;
  std::vector<Ticket> tickets_;  // one per bucket in flight; grows to the number of buckets of a step
};

}  // namespace dtrain::gpu
