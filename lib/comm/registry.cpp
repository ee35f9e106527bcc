#include "lib/comm/registry.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <set>

#include "lib/comm/hier/hier_backend.h"
#include "lib/comm/shm/shm_backend.h"
#include "lib/comm/tcp/tcp_backend.h"
#include "lib/common/config.h"
#include "lib/common/error.h"

#if DTRAIN_WITH_CUDA
#include "lib/comm/nccl/nccl_backend.h"
#include "lib/gpu/device.h"
#endif

namespace dtrain::comm {
namespace {

struct Registry {
  std::mutex mu;
  std::map<std::string, BackendFactory> factories;
};

Registry& registry() {
  static Registry* r = [] {
    auto* reg = new Registry();
    reg->factories["tcp"] = [](const BackendOptions& o) { return std::make_shared<tcp::TcpBackend>(o); };
    reg->factories["shm"] = [](const BackendOptions& o) { return std::make_shared<shm::ShmBackend>(o); };
    reg->factories["hier"] = [](const BackendOptions& o) { return std::make_shared<hier::HierBackend>(o); };
#if DTRAIN_WITH_CUDA
    reg->factories["nccl"] = [](const BackendOptions& o) { return nccl::createNcclBackend(o); };
#endif
    return reg;
  }();
  return *r;
}

bool isGpuDevice(const std::string& device) { return device.rfind("cuda", 0) == 0 || device.rfind("gpu", 0) == 0; }

#if DTRAIN_WITH_CUDA
bool gpuVisible() { return gpu::visibleGpuCount() > 0; }
#endif

}  // namespace

void registerBackend(const std::string& name, BackendFactory factory) {
  auto& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mu);
  reg.factories[name] = std::move(factory);
}

std::vector<std::string> backendNames() {
  auto& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mu);
  std::vector<std::string> names{"auto"};
  for (const auto& [name, f] : reg.factories) names.push_back(name);
  if (std::find(names.begin(), names.end(), "nccl") == names.end()) names.push_back("nccl");  // reported unbuilt
  std::sort(names.begin(), names.end());
  return names;
}

std::string resolveAutoBackend(const BackendOptions& options) {
  if (isGpuDevice(options.device)) {
#if DTRAIN_WITH_CUDA
    DTRAIN_CHECK_AS(UsageError, gpuVisible(), "device '{}' asked for, but no GPU is visible to this process",
                    options.device);
    return "nccl";
#else
    DTRAIN_THROW(NotBuiltError, "device '{}' needs backend 'nccl', which was not built (this dtrain has no CUDA)",
                 options.device);
#endif
  }
  if (options.size == 1) return "tcp";  // nothing to connect; avoids creating a shared-memory segment
  // Every rank must pick the same backend, and a rank alone on its node cannot tell from its own options
  // whether other nodes have several ranks: exchange node ranks first.
  DTRAIN_CHECK_AS(UsageError, options.store != nullptr, "a group of {} ranks needs a store", options.size);
  auto& store = *options.store;
  const std::string prefix = options.groupName + "/auto/";
  store.set(prefix + std::to_string(options.rank), std::to_string(options.nodeRank));
  std::map<std::string, int> perNode;
  Deadline deadline(options.timeout);
  for (int r = 0; r < options.size; ++r) {
    try {
      ++perNode[store.get(prefix + std::to_string(r), deadline.remaining())];
    } catch (const TimeoutError&) {
      DTRAIN_THROW(CommError, "rank {} did not join communicator '{}' within {} ms", r, options.groupName,
                   options.timeout.count());
    }
  }
  if (perNode.size() == 1) return "shm";
  for (const auto& [node, n] : perNode)
    if (n > 1) return "hier";
  return "tcp";
}

BackendPtr createBackend(const std::string& name, const BackendOptions& options) {
  std::string chosen = name == "auto" ? resolveAutoBackend(options) : name;
  BackendFactory factory;
  {
    auto& reg = registry();
    std::lock_guard<std::mutex> lock(reg.mu);
    auto it = reg.factories.find(chosen);
    if (it != reg.factories.end()) factory = it->second;
  }
  if (!factory) {
    if (chosen == "nccl")
      DTRAIN_THROW(NotBuiltError, "backend 'nccl' was not built (this dtrain was compiled without CUDA; "
                                  "configure with -DDTRAIN_WITH_CUDA=ON where nvcc and NCCL are installed)");
    std::string known;
    for (const auto& n : backendNames()) known += (known.empty() ? "" : ", ") + n;
    DTRAIN_THROW(UsageError, "unknown collective backend '{}' (known: {})", chosen, known);
  }
  return factory(options);
}

}  // namespace dtrain::comm
