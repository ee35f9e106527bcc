// Backends by name: "tcp", "shm", "hier", "nccl", and "auto".
//
// `auto` picks, identically on every rank: nccl when options.device is a GPU (and this binary has CUDA and a
// GPU is visible), shm when every rank is on one node, hier when several ranks share a node, else tcp.
// The CUDA backend is registered by an explicit call compiled only when DTRAIN_WITH_CUDA is 1; a CPU-only
// build reports `backend 'nccl' was not built` (NotBuiltError) instead.
// Thread-safety: createBackend may be called from several threads (one per rank in tests).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "lib/comm/backend.h"

namespace dtrain::comm {

using BackendFactory = std::function<BackendPtr(const BackendOptions&)>;

// Adds or replaces a backend (tests and extensions).
void registerBackend(const std::string& name, BackendFactory factory);
// Registered names plus "auto", sorted.
std::vector<std::string> backendNames();

// Creates the named backend. Collective over the group (all ranks call it with the same name); blocks until
// the group is connected. Throws UsageError (unknown name), NotBuiltError (nccl without CUDA), CommError.
BackendPtr createBackend(const std::string& name, const BackendOptions& options);

// The backend `auto` selects for these options (exchanges node ranks through the store when size > 1).
std::string resolveAutoBackend(const BackendOptions& options);

}  // namespace dtrain::comm
