#include "lib/gpu/staging.h"

#include <cstring>
#include <utility>

#include "lib/gpu/check.h"
#include "lib/gpu/stream.h"

namespace dtrain::gpu {

HostStaging::HostStaging(size_t maxBytes, int device) : capacity_(maxBytes), device_(device) {
  setDevice(device);
  for (Slot& s : slots_) {
    if (maxBytes > 0) DTRAIN_CUDA_CHECK(cudaHostAlloc(&s.host, maxBytes, cudaHostAllocDefault));
    s.done = std::make_unique<Event>(device);
  }
}

HostStaging::~HostStaging() { release(); }

HostStaging::HostStaging(HostStaging&& other) noexcept
    : next_(other.next_), capacity_(std::exchange(other.capacity_, 0)), device_(other.device_) {
  for (int i = 0; i < 2; ++i) slots_[i] = std::exchange(other.slots_[i], Slot{});
}

HostStaging& HostStaging::operator=(HostStaging&& other) noexcept {
  if (this != &other) {
    release();
    next_ = other.next_;
    capacity_ = std::exchange(other.capacity_, 0);
    device_ = other.device_;
    for (int i = 0; i < 2; ++i) slots_[i] = std::exchange(other.slots_[i], Slot{});
  }
  return *this;
}

void HostStaging::release() noexcept {
  for (Slot& s : slots_) {
    // cudaFreeHost waits for the device; a copy still reading the slot finishes first.
    if (s.host != nullptr) cudaFreeHost(s.host);
    s = Slot{};
  }
}

void HostStaging::toDevice(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  DTRAIN_CHECK_AS(UsageError, bytes <= capacity_, "staging {} bytes through pinned slots of {} bytes", bytes,
                  capacity_);
  setDevice(device_);
  Slot& s = slots_[next_];
  next_ ^= 1;
  if (s.used) s.done->synchronize();  // its previous copy has read the slot
  std::memcpy(s.host, src, bytes);
  DTRAIN_CUDA_CHECK(cudaMemcpyAsync(dst, s.host, bytes, cudaMemcpyHostToDevice, cudaStreamLegacy));
  s.done->record(nullptr);  // the legacy default stream, as the copy
  s.used = true;
}

}  // namespace dtrain::gpu
