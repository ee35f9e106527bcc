// The `nccl` backend (CUDA target only: compiled when DTRAIN_WITH_CUDA is 1, registered by registry.cpp
// under that guard). No CUDA or NCCL header leaks from here, so CPU code can include it.
//
// One NCCL communicator per group: rank 0 creates the ncclUniqueId and publishes it through the store; the
// device is "cuda:N" from BackendOptions::device, else LOCAL_RANK modulo the visible GPUs. Operations run on
// the communicator's own non-blocking CUDA stream, which waits (cudaStreamWaitEvent, on the GPU) on an event
// recorded on the legacy default stream at each launch: they are ordered after work already issued there, and
// work issued there later does not wait for them (so backward overlaps the all-reduce of earlier buckets).
// A caller using other streams synchronises them first, or hands its stream to the call (CallOptions::stream). Buffers are views on this communicator's GPU (Backend::device()) of device (or
// managed) memory. The CUDA side (device, stream, events, buffers) is lib/gpu. Async calls enqueue on the stream and return a Work backed by a CUDA event; wait() polls the event
// and the communicator's async error, and on timeout aborts the communicator (ncclCommAbort), so a dead or
// stalled peer is a CommError, not a hang. The communicator is created non-blocking for the same reason.
#pragma once

#include <cstddef>

#include "lib/comm/backend.h"

namespace dtrain::comm::nccl {

// Collective over the group (blocks until the NCCL communicator is up, options.timeout).
BackendPtr createNcclBackend(const BackendOptions& options);

}  // namespace dtrain::comm::nccl
