// CUDA streams and events as owning, move-only handles. handle() gives the raw cudaStream_t / cudaEvent_t
// as void*, so code without CUDA headers can pass a stream on (comm::CallOptions::stream) while only CUDA
// sources look inside. Creating either makes its GPU current on the calling thread.
// Thread-safety: CUDA's (a stream or event may be used from several threads); the objects are plain owners.
// Errors: UsageError for a GPU index that is not visible; GpuError when CUDA fails.
#pragma once

namespace dtrain::gpu {

class Stream {
 public:
  // A new stream on GPU `device`. By default it is ordered after work on the legacy default stream (as
  // cudaStreamDefault); nonBlocking streams are not (cudaStreamNonBlocking).
  explicit Stream(int device, bool nonBlocking = false);
  ~Stream();
  Stream(Stream&& other) noexcept;
  Stream& operator=(Stream&& other) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  void* handle() const noexcept { return stream_; }  // the cudaStream_t
  int device() const noexcept { return device_; }
  // Blocks until the work issued to the stream so far finished. Throws GpuError (also for its failures).
  void synchronize() const;

 private:
  void* stream_ = nullptr;
  int device_ = 0;
};

class Event {
 public:
  // A new event on GPU `device`; without `timing` it records no timestamps (cudaEventDisableTiming), which
  // makes record/query cheaper.
  explicit Event(int device, bool timing = false);
  ~Event();
  Event(Event&& other) noexcept;
  Event& operator=(Event&& other) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  void* handle() const noexcept { return event_; }  // the cudaEvent_t
  // Records the event after the work issued so far to `stream` (a cudaStream_t as void*; nullptr is the
  // legacy default stream). Throws GpuError.
  void record(void* stream);
  void record(const Stream& stream) { record(stream.handle()); }
  // Non-blocking: true once the recorded work finished, false while it runs. Throws GpuError ("cudaEventQuery
  // failed: <CUDA's text>", file:line of the check) when the GPU reported a failure of that work.
  // "Not ready" leaves CUDA's last-error slot clear (the runtime records it there too), so a kernel launch check
  // after a polling wait does not report it.
  bool query() const;
  // Blocks until the recorded work finished. Throws GpuError.
  void synchronize() const;

 private:
  void* event_ = nullptr;
};

}  // namespace dtrain::gpu
