#include "lib/gpu/staging.h"

#include <cstring>
#include <utility>

#include "lib/gpu/check.h"

namespace dtrain::gpu {

BatchStaging::BatchStaging(std::array<size_t, kParts> maxBytes, int device) : maxBytes_(maxBytes), device_(device) {
  setDevice(device);
  copyStream_ = std::make_unique<Stream>(device, /*nonBlocking=*/true);
  for (Slot& s : slots_) {
    for (int i = 0; i < kParts; ++i) {
      if (maxBytes[i] > 0) DTRAIN_CUDA_CHECK(cudaHostAlloc(&s.pinned[i], maxBytes[i], cudaHostAllocDefault));
      s.device[i] = DeviceBuffer(maxBytes[i], device);
    }
    s.copied = std::make_unique<Event>(device);
    s.finished = std::make_unique<Event>(device);
  }
}

BatchStaging::~BatchStaging() { release(); }

BatchStaging::BatchStaging(BatchStaging&& other) noexcept
    : slots_(std::move(other.slots_)), maxBytes_(other.maxBytes_), copyStream_(std::move(other.copyStream_)),
      next_(other.next_), lastUsed_(other.lastUsed_), device_(other.device_) {
  for (Slot& s : other.slots_) s.pinned = {};
}

BatchStaging& BatchStaging::operator=(BatchStaging&& other) noexcept {
  if (this != &other) {
    release();
    slots_ = std::move(other.slots_);
    for (Slot& s : other.slots_) s.pinned = {};
    maxBytes_ = other.maxBytes_;
    copyStream_ = std::move(other.copyStream_);
    next_ = other.next_;
    lastUsed_ = other.lastUsed_;
    device_ = other.device_;
  }
  return *this;
}

void BatchStaging::release() noexcept {
  for (Slot& s : slots_) {
    // cudaFreeHost waits for the device: a copy still reading the memory finishes first.
    for (void*& p : s.pinned) {
      if (p != nullptr) cudaFreeHost(p);
      p = nullptr;
    }
  }
}

int BatchStaging::stage(std::initializer_list<Part> parts) {
  DTRAIN_CHECK_AS(UsageError, copyStream_ != nullptr, "BatchStaging: stage() on an empty staging");
  DTRAIN_CHECK_AS(UsageError, parts.size() <= static_cast<size_t>(kParts), "BatchStaging: {} parts, at most {}",
                  parts.size(), kParts);
  const int slot = next_;
  Slot& s = slots_[static_cast<size_t>(slot)];
  DTRAIN_CHECK_AS(UsageError, !s.staged, "BatchStaging: slot {} is staged again before its batch was used", slot);
  // One batch ahead at most: the slot of the batch in use is refilled only after the next batch is used (which
  // marks where the batch in use ends on the compute stream).
  DTRAIN_CHECK_AS(UsageError, slot != lastUsed_,
                  "BatchStaging: slot {} holds the batch in use; use the batch staged ahead before staging another", slot);
  int i = 0;
  for (const Part& p : parts) {
    DTRAIN_CHECK_AS(UsageError, p.bytes <= maxBytes_[static_cast<size_t>(i)],
                    "BatchStaging: part {} of {} bytes does not fit its {} bytes", i, p.bytes, maxBytes_[static_cast<size_t>(i)]);
    ++i;
  }
  setDevice(device_);
  const auto copy = static_cast<cudaStream_t>(copyStream_->handle());
  if (s.copiedOnce) s.copied->synchronize();  // the previous copy has read the pinned memory
  // The kernels of the slot's previous batch are done before its device memory is overwritten (on the GPU).
  if (s.finishedOnce) DTRAIN_CUDA_CHECK(cudaStreamWaitEvent(copy, static_cast<cudaEvent_t>(s.finished->handle()), 0));
  i = 0;
  for (const Part& p : parts) {
    const auto k = static_cast<size_t>(i++);
    if (p.bytes == 0) continue;
    std::memcpy(s.pinned[k], p.host, p.bytes);
    DTRAIN_CUDA_CHECK(cudaMemcpyAsync(s.device[k].data(), s.pinned[k], p.bytes, cudaMemcpyHostToDevice, copy));
  }
  s.copied->record(copy);
  s.copiedOnce = true;
  s.staged = true;
  next_ = (slot + 1) % kSlots;
  return slot;
}

std::array<void*, BatchStaging::kParts> BatchStaging::use(int slot) {
  DTRAIN_CHECK_AS(UsageError, slot >= 0 && slot < kSlots && slots_[static_cast<size_t>(slot)].staged,
                  "BatchStaging: use({}) of a slot with no staged batch", slot);
  Slot& s = slots_[static_cast<size_t>(slot)];
  setDevice(device_);
  // Everything enqueued so far on the compute stream belongs to batches used before this one: once the stream
  // passes this point, their slot may be refilled.
  if (lastUsed_ >= 0 && lastUsed_ != slot) {
    Slot& previous = slots_[static_cast<size_t>(lastUsed_)];
    previous.finished->record(nullptr);
    previous.finishedOnce = true;
  }
  DTRAIN_CUDA_CHECK(cudaStreamWaitEvent(cudaStreamLegacy, static_cast<cudaEvent_t>(s.copied->handle()), 0));
  s.staged = false;
  lastUsed_ = slot;
  std::array<void*, kParts> out{};
  for (size_t k = 0; k < static_cast<size_t>(kParts); ++k) out[k] = s.device[k].data();
  return out;
}

void BatchStaging::unstage(int slot) {
  DTRAIN_CHECK_AS(UsageError, slot >= 0 && slot < kSlots && slots_[static_cast<size_t>(slot)].staged,
                  "BatchStaging: unstage({}) of a slot with no staged batch", slot);
  // The dropped copy may still run: the next stage() into this slot waits for it (copied) before reusing the
  // pinned memory, and the copy stream runs the copies in order. The slot's `finished` event still marks the end
  // of the batch it held before, so the device memory is refilled in the same order as without the drop.
  slots_[static_cast<size_t>(slot)].staged = false;
  next_ = slot;
}

}  // namespace dtrain::gpu

namespace dtrain::gpu {

ArenaStaging::ArenaStaging(size_t count, int device) : count_(count), device_(device) {
  setDevice(device);
  copyStream_ = std::make_unique<Stream>(device, /*nonBlocking=*/true);
  if (count > 0) {
    void* p = nullptr;
    DTRAIN_CUDA_CHECK(cudaHostAlloc(&p, count * sizeof(float), cudaHostAllocDefault));
    host_ = static_cast<float*>(p);
  }
}

ArenaStaging::~ArenaStaging() {
  // cudaFreeHost waits for the device: an upload still reading the memory finishes first.
  if (host_ != nullptr) cudaFreeHost(host_);
}

void ArenaStaging::checkSlice(size_t offset, size_t n, const char* what) const {
  DTRAIN_CHECK_AS(UsageError, offset <= count_ && n <= count_ - offset,
                  "ArenaStaging: {} of [{}, +{}) outside the staged arena of {} floats", what, offset, n, count_);
}

int ArenaStaging::download(const float* src, size_t offset, size_t n) {
  checkSlice(offset, n, "download");
  setDevice(device_);
  size_t t = 0;
  while (t < tickets_.size() && tickets_[t].busy) ++t;
  if (t == tickets_.size()) {
    tickets_.push_back({std::make_unique<Event>(device_), std::make_unique<Event>(device_), false});
  }
  Ticket& ticket = tickets_[t];
  const auto copy = static_cast<cudaStream_t>(copyStream_->handle());
  ticket.ready->record(nullptr);  // after the kernels that wrote the slice (the legacy default stream)
  DTRAIN_CUDA_CHECK(cudaStreamWaitEvent(copy, static_cast<cudaEvent_t>(ticket.ready->handle()), 0));
  if (n > 0)
    DTRAIN_CUDA_CHECK(cudaMemcpyAsync(host_ + offset, src, n * sizeof(float), cudaMemcpyDeviceToHost, copy));
  ticket.copied->record(copy);
  ticket.busy = true;
  return static_cast<int>(t);
}

void ArenaStaging::wait(int ticket) {
  DTRAIN_CHECK_AS(UsageError, ticket >= 0 && static_cast<size_t>(ticket) < tickets_.size() &&
                                  tickets_[static_cast<size_t>(ticket)].busy,
                  "ArenaStaging: wait({}) on a ticket with no download in flight", ticket);
  Ticket& t = tickets_[static_cast<size_t>(ticket)];
  t.copied->synchronize();
  t.busy = false;
}

void ArenaStaging::upload(float* dst, size_t offset, size_t n) {
  checkSlice(offset, n, "upload");
  if (n == 0) return;
  setDevice(device_);
  DTRAIN_CUDA_CHECK(cudaMemcpyAsync(dst, host_ + offset, n * sizeof(float), cudaMemcpyHostToDevice, cudaStreamLegacy));
}

}  // namespace dtrain::gpu
