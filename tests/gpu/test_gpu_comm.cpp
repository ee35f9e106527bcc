// The nccl backend on one GPU (part of test_gpu_train, label gpu): "backend": "auto" on a cuda device is nccl, a
// one-rank communicator reduces device memory in place (sync and async, sum and average), its barrier returns,
// and a host pointer is refused with a clear error instead of failing inside NCCL. With two or more GPUs the
// multi-rank cases are `dtrain bench allreduce --backend nccl` in scripts/gpu-check's table and
// docs/gpu.md's checklist item 7.
#include <doctest/doctest.h>

#include <vector>

#include "lib/comm/registry.h"
#include "lib/common/error.h"
#include "lib/nn/device.h"
#include "rendezvous/memory_store.h"

using namespace dtrain;

TEST_CASE("with a GPU: backend auto is nccl on cuda; a one-rank communicator reduces device memory, never hangs") {
  comm::BackendOptions o;
  o.store = rendezvous::MemoryStore::create();
  o.device = "cuda:0";
  o.groupName = "gpu-test";
  o.timeout = std::chrono::seconds(60);
  CHECK(comm::resolveAutoBackend(o) == "nccl");
  auto nccl = comm::createBackend("auto", o);
  REQUIRE(nccl->name() == "nccl");
  CHECK(nccl->device() == Device::cuda(0));
  const size_t n = 1 << 20;
  std::vector<float> host(n);
  for (size_t i = 0; i < n; ++i) host[i] = static_cast<float>(i % 1000) * 0.5f;
  nn::DeviceFloats dev(n, Device::cuda(0));
  nn::copyBytes(dev.data(), dev.device(), host.data(), Device::cpu(), n * sizeof(float));
  const TensorView view = TensorView::flat(dev.data(), n, Device::cuda(0));
  nccl->allreduce(view, comm::ReduceOp::kSum);
  auto work = nccl->allreduceAsync(view, comm::ReduceOp::kAvg);
  work->wait();
  nccl->barrier();
  std::vector<float> back(n);
  nn::copyBytes(back.data(), Device::cpu(), dev.data(), dev.device(), n * sizeof(float));
  CHECK(back == host);  // one rank: the sum and the average are the values themselves
  float onHost = 1.0f;
  CHECK_THROWS_WITH_AS(nccl->allreduce(TensorView::flat(&onHost, 1, Device::cuda(0)), comm::ReduceOp::kSum),
                       doctest::Contains("needs GPU buffers; got a host pointer"), UsageError);
}
