#include "lib/gpu/stream.h"

#include <utility>

#include "lib/gpu/check.h"

namespace dtrain::gpu {

Stream::Stream(int device, bool nonBlocking) : device_(device) {
  setDevice(device);
  cudaStream_t s = nullptr;
  DTRAIN_CUDA_CHECK(cudaStreamCreateWithFlags(&s, nonBlocking ? cudaStreamNonBlocking : cudaStreamDefault));
  stream_ = s;
}

Stream::~Stream() {
  if (stream_ != nullptr) cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
}

Stream::Stream(Stream&& other) noexcept : stream_(std::exchange(other.stream_, nullptr)), device_(other.device_) {}

Stream& Stream::operator=(Stream&& other) noexcept {
  if (this != &other) {
    if (stream_ != nullptr) cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
    stream_ = std::exchange(other.stream_, nullptr);
    device_ = other.device_;
  }
  return *this;
}

void Stream::synchronize() const { DTRAIN_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_))); }

Event::Event(int device, bool timing) {
  setDevice(device);
  cudaEvent_t e = nullptr;
  DTRAIN_CUDA_CHECK(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming));
  event_ = e;
}

Event::~Event() {
  if (event_ != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(event_));
}

Event::Event(Event&& other) noexcept : event_(std::exchange(other.event_, nullptr)) {}

Event& Event::operator=(Event&& other) noexcept {
  if (this != &other) {
    if (event_ != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(event_));
    event_ = std::exchange(other.event_, nullptr);
  }
  return *this;
}

void Event::record(void* stream) {
  DTRAIN_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(event_), static_cast<cudaStream_t>(stream)));
}

bool Event::query() const {
  const cudaError_t st = cudaEventQuery(static_cast<cudaEvent_t>(event_));
  if (st == cudaSuccess) return true;
  // "Not ready" is not a failure, but the runtime also records it as the thread's last error: left there, the next
  // kernel launch check (DTRAIN_CU_CHECK_LAUNCH reads cudaGetLastError) would fail with "device not ready" after
  // any wait that polled a running event (an NCCL all-reduce, a staged copy). Cleared here, as PyTorch's
  // CUDAEvent::query and CUDAStream::query do.
  cudaGetLastError();
  if (st == cudaErrorNotReady) return false;
  DTRAIN_THROW(GpuError, "cudaEventQuery failed: {} ({})", cudaGetErrorString(st), detail::checkSite(__FILE__, __LINE__));
}

void Event::synchronize() const { DTRAIN_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(event_))); }

}  // namespace dtrain::gpu
