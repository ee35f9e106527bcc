#include "lib/comm/nccl/nccl_backend.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstring>
#include <thread>
#include <utility>

#include "lib/comm/nccl/nccl_wait.h"
#include "lib/common/error.h"
#include "lib/common/parse.h"
#include "lib/common/worker_metrics.h"
#include "lib/gpu/check.h"
#include "lib/gpu/device.h"
#include "lib/gpu/memory.h"
#include "lib/gpu/nccl.h"
#include "lib/gpu/stream.h"

namespace dtrain::comm::nccl {
namespace {

ncclDataType_t toNccl(DType t) {
  // Backend::start/run reject dtypes outside kSupportedDTypes before anything reaches NCCL.
  const auto type = gpu::ncclType(t);
  DTRAIN_CHECK_AS(UsageError, type.has_value(), "backend 'nccl': dtype {} is not supported", dtypeName(t));
  return *type;
}

// GPU failures inside the communicator are collective failures (exit code 7), as NCCL's own are.
template <typename F>
decltype(auto) gpuFailureIsCommError(F&& body) {
  try {
    return body();
  } catch (const gpu::GpuError& e) {
    CommError translated(e.what());
    translated.setWhere(e.where());
    throw translated;
  }
}

ncclRedOp_t toNccl(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kAvg: return ncclAvg;
    case ReduceOp::kMin: return ncclMin;
    case ReduceOp::kMax: return ncclMax;
  }
  return ncclSum;
}

int deviceFor(const BackendOptions& o) {
  int count = gpu::visibleGpuCount();
  DTRAIN_CHECK_AS(UsageError, count > 0, "backend 'nccl' needs a GPU, but none is visible to this process");
  auto colon = o.device.find(':');
  if (colon != std::string::npos) {
    auto idx = parse::toInt(o.device.substr(colon + 1));
    DTRAIN_CHECK_AS(UsageError, idx && *idx >= 0 && *idx < count, "device '{}': this process sees {} GPU(s)",
                    o.device, count);
    return static_cast<int>(*idx);
  }
  return o.localRank % count;
}

class NcclBackend;

class NcclWork : public Work {
 public:
  // `flight`: the flight recorder's token of the call (worker_metrics.h), ended when completion is observed.
  NcclWork(std::shared_ptr<NcclBackend> owner, gpu::Event event, Deadline deadline, uint64_t flight, NcclCall call)
      : owner_(std::move(owner)), event_(std::move(event)), deadline_(deadline), flight_(flight), call_(call) {}
  void wait() override;
  bool done() override {
    if (finished_) return true;
    try {
      const bool ready = event_.query();
      if (ready) flightEnd(std::exchange(flight_, 0));
      return ready;
    } catch (const Error&) {
      return true;  // finished, unsuccessfully: wait() reports it
    }
  }

 private:
  std::shared_ptr<NcclBackend> owner_;
  gpu::Event event_;
  Deadline deadline_;
  uint64_t flight_ = 0;
  NcclCall call_;  // "ncclAllReduce", ... and its file:line: named by every failure of this operation
  bool finished_ = false;
};

class NcclBackend : public Backend {
 public:
  explicit NcclBackend(BackendOptions options)
      : Backend(std::move(options)),
        device_(deviceFor(options_)),
        stream_(gpuFailureIsCommError([&] { return gpu::Stream(device_, /*nonBlocking=*/true); })),
        ready_(gpuFailureIsCommError([&] { return gpu::Event(device_); })),
        barrier_(gpuFailureIsCommError([&] { return gpu::DeviceBuffer(sizeof(float), device_); })) {
    ncclUniqueId id;
    const Deadline deadline = newDeadline();
    if (rank() == 0) {
      DTRAIN_NCCL_CHECK(ncclGetUniqueId(&id));
      options_.store->set(key("nccl/id"), std::string_view(reinterpret_cast<const char*>(&id), sizeof(id)));
    } else {
      std::string bytes;
      try {
        bytes = options_.store->get(key("nccl/id"), deadline.remaining());
      } catch (const TimeoutError&) {
        DTRAIN_THROW(CommError, "rank 0 never published the NCCL id of '{}'", options_.groupName);
      }
      DTRAIN_CHECK_AS(ProtocolError, bytes.size() == sizeof(id), "malformed NCCL id in the store");
      std::memcpy(&id, bytes.data(), sizeof(id));
    }
    // Non-blocking init, so a rank that never shows up is a timeout here instead of a hang inside NCCL.
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    NcclCall init;
    const ncclResult_t r = DTRAIN_NCCL_ISSUE(init, "ncclCommInitRankConfig",
                                             ncclCommInitRankConfig(&comm_, size(), id, rank(), &config));
    settle(r, init, deadline);
  }

  ~NcclBackend() override {
    shutdown();
    // ncclCommAbort already released an aborted communicator. A live one is finalized, then destroyed, bounded by
    // parallel.timeout (nccl_wait.h releaseCommunicator). The barrier buffer, then the stream, go after.
    if (comm_ == nullptr || aborted_) return;
    const Deadline deadline = newDeadline();
    releaseCommunicator({.finalize = [&] {
                           const ncclResult_t r = ncclCommFinalize(comm_);
                           return r == ncclSuccess || r == ncclInProgress;
                         },
                         .state = [&] {
                           ncclResult_t r = ncclInProgress;
                           if (ncclCommGetAsyncError(comm_, &r) != ncclSuccess) return -1;
                           return r == ncclSuccess ? 1 : r == ncclInProgress ? 0 : -1;
                         },
                         .expired = [&] { return deadline.expired(); },
                         .pause = [] { std::this_thread::sleep_for(std::chrono::microseconds(50)); },
                         .destroy = [&] { ncclCommDestroy(comm_); },
                         .abort = [&] { ncclCommAbort(comm_); }});
    comm_ = nullptr;
  }

  std::string name() const override { return "nccl"; }

  Device device() const override { return Device::cuda(device_); }

  // Waits for `event` until the deadline, polling NCCL's asynchronous error meanwhile; aborts the communicator on
  // failure or timeout, so every rank fails with `call` (and its file:line) named instead of hanging.
  void waitEvent(const gpu::Event& event, const Deadline& deadline, const NcclCall& call) {
    try {
      waitForCollective(call, options_.timeout,
                        {.finished = [&] { return event.query(); },
                         .asyncError = [&]() -> std::string {
                           ncclResult_t async = ncclSuccess;
                           ncclCommGetAsyncError(comm_, &async);
                           if (async == ncclSuccess || async == ncclInProgress) return {};
                           return fmt::format("{} ({})", ncclGetErrorString(async), ncclGetLastError(comm_));
                         },
                         .expired = [&] { return deadline.expired(); },
                         .pause = [] { std::this_thread::sleep_for(std::chrono::microseconds(50)); }});
    } catch (const Error& e) {
      abortComm(e.what());
      throw;
    }
  }

 protected:
  // Enqueues on the stream (the caller's, else this communicator's) and, when `sync`, waits on this thread.
  WorkPtr issue(const Operation& op, const CallOptions& call, bool sync) override {
    auto work = gpuFailureIsCommError([&] { return launch(op, call.stream != nullptr ? call.stream : stream_.handle()); });
    if (sync) work->wait();
    return work;
  }
  // Reached only through runInline (nothing composes nccl today): the same, synchronously.
  void doAllreduce(void* buf, size_t count, DType dtype, ReduceOp op, const Deadline&) override {
    issue(Operation::allreduce(view(buf, count, dtype), op), {}, true);
  }
  void doBroadcast(void* buf, size_t count, DType dtype, int root, const Deadline&) override {
    issue(Operation::broadcast(view(buf, count, dtype), root), {}, true);
  }
  void doAllgather(const void* in, void* out, size_t countPerRank, DType dtype, const Deadline&) override {
    issue(Operation::allgather(view(in, countPerRank, dtype), view(out, countPerRank * size(), dtype)), {}, true);
  }
  void doReduceScatter(const void* in, void* out, size_t countPerRank, DType dtype, ReduceOp op,
                       const Deadline&) override {
    issue(Operation::reduceScatter(view(in, countPerRank * size(), dtype), view(out, countPerRank, dtype), op), {},
          true);
  }
  void doSend(const void* buf, size_t bytes, int peer, const Deadline&) override {
    issue(Operation::send(view(buf, bytes, DType::kUInt8), peer), {}, true);
  }
  void doRecv(void* buf, size_t bytes, int peer, const Deadline&) override {
    issue(Operation::recv(view(buf, bytes, DType::kUInt8), peer), {}, true);
  }
  void doBarrier(const Deadline&) override { issue(Operation::barrier(), {}, true); }
  std::shared_ptr<Backend> makeGroup(BackendOptions options) override {
    return std::make_shared<NcclBackend>(std::move(options));
  }

 private:
  TensorView view(const void* p, size_t count, DType dtype) const {
    return TensorView::flat(p, count, dtype, device());
  }

  // Enqueues the NCCL call for `op` on `streamHandle` and returns a Work on an event recorded after it.
  WorkPtr launch(const Operation& op, void* streamHandle) {
    checkUsable();
    gpu::setDevice(device_);
    const auto stream = static_cast<cudaStream_t>(streamHandle);
    if (streamHandle == stream_.handle()) {
      // The communication stream is non-blocking: it is ordered after the work issued so far to the legacy default
      // stream (where dtrain's CUDA layers compute) by an event, on the GPU, so backward keeps computing while
      // this bucket is reduced and the host never waits to launch it.
      ready_.record(nullptr);
      DTRAIN_CUDA_CHECK(cudaStreamWaitEvent(stream, static_cast<cudaEvent_t>(ready_.handle()), 0));
    }
    using K = Operation::Kind;
    const size_t count = static_cast<size_t>(op.buf.numel());
    void* buf = op.buf.data;
    void* out = op.out.data;
    const bool hasBuf = op.kind != K::kBarrier && op.kind != K::kNone;
    const bool hasOut = op.kind == K::kAllgather || op.kind == K::kReduceScatter;
    if (hasBuf && op.buf.numel() > 0) requireDevicePointer(buf);
    if (hasOut && op.out.numel() > 0) requireDevicePointer(out);
    const Deadline deadline = newDeadline();
    // The flight recorder (dtrain debug dump): begun at the enqueue, ended when a wait sees the event complete, so
    // a rank stuck in NCCL shows the call it never finished (TORCH_NCCL's flight recorder semantics).
    const uint64_t flight = flightBegin(static_cast<int>(op.kind), hasBuf && op.kind != K::kBarrier ? op.buf.bytes() : 0,
                                        options_.groupName);
    // Each call's name and file:line go with its failures (settle's, and the wait's through NcclWork); an empty
    // operation (kNone) is named by this line.
    ncclResult_t r = ncclSuccess;
    NcclCall call = DTRAIN_NCCL_CALL("NCCL operation");
    switch (op.kind) {
      case K::kNone: break;
      case K::kAllreduce:
        r = DTRAIN_NCCL_ISSUE(call, "ncclAllReduce",
                              ncclAllReduce(buf, buf, count, toNccl(op.buf.dtype), toNccl(op.op), comm_, stream));
        break;
      case K::kBroadcast:
        r = DTRAIN_NCCL_ISSUE(call, "ncclBroadcast",
                              ncclBroadcast(buf, buf, count, toNccl(op.buf.dtype), op.peer, comm_, stream));
        break;
      case K::kAllgather:
        r = DTRAIN_NCCL_ISSUE(call, "ncclAllGather",
                              ncclAllGather(buf, out, count, toNccl(op.buf.dtype), comm_, stream));
        break;
      case K::kReduceScatter:
        r = DTRAIN_NCCL_ISSUE(call, "ncclReduceScatter",
                              ncclReduceScatter(buf, out, static_cast<size_t>(op.out.numel()), toNccl(op.buf.dtype),
                                                toNccl(op.op), comm_, stream));
        break;
      case K::kSend:
        r = DTRAIN_NCCL_ISSUE(call, "ncclSend", ncclSend(buf, op.buf.bytes(), ncclInt8, op.peer, comm_, stream));
        break;
      case K::kRecv:
        r = DTRAIN_NCCL_ISSUE(call, "ncclRecv", ncclRecv(buf, op.buf.bytes(), ncclInt8, op.peer, comm_, stream));
        break;
      case K::kBarrier:
        r = DTRAIN_NCCL_ISSUE(call, "ncclAllReduce (barrier)",
                              ncclAllReduce(barrier_.data(), barrier_.data(), 1, ncclFloat32, ncclSum, comm_, stream));
        break;
    }
    settle(r, call, deadline);
    gpu::Event event(device_);
    event.record(streamHandle);
    return std::make_shared<NcclWork>(std::static_pointer_cast<NcclBackend>(shared_from_this()), std::move(event),
                                      deadline, flight, call);
  }

  // The view says cuda; make sure the memory is (a host pointer would fail inside NCCL, less clearly).
  static void requireDevicePointer(const void* p) {
    DTRAIN_CHECK_AS(UsageError, gpu::isDeviceMemory(p),
                    "backend 'nccl' needs GPU buffers; got a host pointer (use tcp/shm/hier for CPU tensors)");
  }

  // A non-blocking communicator may answer ncclInProgress: poll until it settles or the deadline passes. Failures
  // name `call` and its file:line (nccl_wait.h).
  void settle(ncclResult_t r, const NcclCall& call, const Deadline& deadline) {
    while (r == ncclInProgress) {
      if (deadline.expired()) {
        abortComm("timed out");
        throwCallError(call, fmt::format("timed out after {} ms (a peer did not join or stalled)",
                                         options_.timeout.count()));
      }
      std::this_thread::yield();
      ncclCommGetAsyncError(comm_, &r);
    }
    if (r != ncclSuccess) {
      const std::string detail = comm_ != nullptr ? ncclGetLastError(comm_) : "";
      abortComm(ncclGetErrorString(r));
      throwCallFailed(call, ncclGetErrorString(r), detail);
    }
  }

  void abortComm(const std::string& why) {
    markBroken(why);
    if (comm_ != nullptr && !aborted_) {
      aborted_ = true;
      ncclCommAbort(comm_);
    }
  }

  int device_ = 0;
  gpu::Stream stream_;          // non-blocking; destroyed after the barrier buffer (members go in reverse order)
  gpu::Event ready_;            // recorded on the legacy default stream before each launch on stream_
  gpu::DeviceBuffer barrier_;   // one float all-reduced by barrier()
  ncclComm_t comm_ = nullptr;
  bool aborted_ = false;
};

void NcclWork::wait() {
  if (finished_) return;
  owner_->waitEvent(event_, deadline_, call_);
  finished_ = true;
  flightEnd(std::exchange(flight_, 0));
}

}  // namespace

BackendPtr createNcclBackend(const BackendOptions& options) { return std::make_shared<NcclBackend>(options); }

}  // namespace dtrain::comm::nccl
