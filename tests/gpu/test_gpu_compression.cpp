// fp16/bf16 gradient compression on a GPU (part of test_gpu_train, label gpu): CastHook's device path over a
// one-rank nccl communicator casts a device bucket to 16 bits, all-reduces it in fp16/bf16 and casts it back on the
// device, giving exactly the CPU hook's rounding (one rank: the sum is the value; divided by 1). With two or more
// GPUs, a `dtrain run -n 2` job with "compression": {"type": "bf16"} is docs/gpu.md's checklist item.
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "lib/comm/reduce.h"
#include "lib/comm/registry.h"
#include "lib/nn/device.h"
#include "lib/train/compression.h"
#include "lib/train/compression_hooks.h"
#include "rendezvous/memory_store.h"

using namespace dtrain;

TEST_CASE("with a GPU: fp16/bf16 compression casts, all-reduces in 16 bits and casts back on the device") {
  comm::BackendOptions o;
  o.store = rendezvous::MemoryStore::create();
  o.device = "cuda:0";
  o.groupName = "gpu-compression";
  o.timeout = std::chrono::seconds(60);
  auto nccl = comm::createBackend("nccl", o);
  const size_t n = 3000, offset = 1000, count = 1500;  // one bucket in the middle of the arena
  std::vector<float> host(n);
  for (size_t i = 0; i < n; ++i) host[i] = std::sin(static_cast<float>(i)) * 3.0f + 1e-3f * static_cast<float>(i);
  for (const auto type : {train::CompressionSettings::Type::kFp16, train::CompressionSettings::Type::kBf16}) {
    const bool fp16 = type == train::CompressionSettings::Type::kFp16;
    CAPTURE(fp16);
    train::CompressionSettings c;
    c.type = type;
    auto hook = train::makeCompressionHook(c, 1);
    hook->bind(train::HookLayout{.arenaSize = n, .params = {}, .groupSize = 1});
    nn::DeviceFloats dev(n, Device::cuda(0));
    nn::copyBytes(dev.data(), dev.device(), host.data(), Device::cpu(), n * sizeof(float));
    train::GradBucket bucket{.index = 0, .grads = TensorView::flat(dev.data() + offset, count, Device::cuda(0)),
                             .offset = offset, .layers = {}, .last = true, .params = {}};
    hook->start(bucket, *nccl)->wait();
    std::vector<float> back(n);
    nn::copyBytes(back.data(), Device::cpu(), dev.data(), dev.device(), n * sizeof(float));
    for (size_t i = 0; i < n; ++i) {
      CAPTURE(i);
      const bool inside = i >= offset && i < offset + count;
      const float expected = !inside ? host[i]
                             : fp16  ? comm::fp16ToFloat(comm::floatToFp16(host[i]))
                                     : comm::bf16ToFloat(comm::floatToBf16(host[i]));
      REQUIRE(back[i] == expected);
    }
    CHECK(hook->traffic()->bytesSent == 0);  // one rank: nothing on the wire (2(n-1)/n of the bytes)
  }
}
