// Host -> device copies of training batches through page-locked (pinned) host memory: the DMA engine reads the
// host side directly (pageable memory would first be copied by the driver into its own pinned bounce buffer),
// and the copy is asynchronous for the host.
//
//   HostStaging staging(maxBytes, device);
//   staging.toDevice(devicePtr, hostPtr, bytes);  // memcpy into a pinned slot, then cudaMemcpyAsync
//
// Two pinned slots alternate; a slot is reused only after its previous copy finished (one event per slot, which
// the host waits on before writing the slot), so the host may run one call ahead of the GPU and never overwrites
// memory a copy still reads. The copy is enqueued on the legacy default stream, where every CUDA layer computes:
// kernels issued afterwards see the data, kernels issued before it finish reading the destination first (stream
// order), so one destination buffer can be refilled every step.
// A separate copy stream that prefetches batch n+1 while batch n computes is the next step (docs/gpu.md).
// Ownership: move-only; the pinned memory (cudaHostAlloc) is freed at destruction (cudaFreeHost synchronises).
// Thread-safety: none (one trainer thread). Errors: GpuError for CUDA failures, UsageError for more than maxBytes.
#pragma once

#include <cstddef>
#include <memory>

#include "lib/gpu/stream.h"

namespace dtrain::gpu {

class HostStaging {
 public:
  HostStaging() = default;
  HostStaging(size_t maxBytes, int device);
  ~HostStaging();
  HostStaging(HostStaging&&) noexcept;
  HostStaging& operator=(HostStaging&&) noexcept;
  HostStaging(const HostStaging&) = delete;
  HostStaging& operator=(const HostStaging&) = delete;

  // Copies `bytes` from host memory `src` (any: pageable is fine) to device memory `dst` of this staging's GPU.
  // Returns once the copy is enqueued (after a memcpy into the pinned slot).
  void toDevice(void* dst, const void* src, size_t bytes);

 private:
  void release() noexcept;

  struct Slot {
    void* host = nullptr;          // cudaHostAlloc'd, maxBytes
    std::unique_ptr<Event> done;   // recorded after the slot's last copy
    bool used = false;
  };
  Slot slots_[2];
  int next_ = 0;
  size_t capacity_ = 0;
  int device_ = 0;
};

}  // namespace dtrain::gpu
