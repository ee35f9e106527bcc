#include "lib/ckpt/bench.h"

#include <algorithm>
#include <chrono>
#include <memory>

#include "lib/ckpt/checkpoint.h"
#include "lib/common/aligned_buffer.h"
#include "lib/common/error.h"

namespace dtrain::ckpt {

double WriteBenchResult::medianBytesPerSecond() const {
  if (runs.empty()) return 0;
  std::vector<double> t;
  for (const auto& r : runs) t.push_back(r.totalSeconds());
  std::sort(t.begin(), t.end());
  const double median = t.size() % 2 ? t[t.size() / 2] : (t[t.size() / 2 - 1] + t[t.size() / 2]) / 2;
  return static_cast<double>(fileBytes) / median;
}

WriteBenchResult runWriteBenchmark(const WriteBenchOptions& o) {
  DTRAIN_CHECK_AS(UsageError, o.tensors >= 1 && o.repeats >= 1 && o.bytes >= 4 * static_cast<uint64_t>(o.tensors),
                  "bench: bad sizes (bytes {}, tensors {}, repeats {})", o.bytes, o.tensors, o.repeats);
  const uint64_t perTensor = o.bytes / static_cast<uint64_t>(o.tensors) / 4;  // floats per tensor
  AlignedBuffer<float> payload(perTensor * static_cast<uint64_t>(o.tensors));
  // Not zeros: a file system or device that compresses or deduplicates must not flatter the figure.
  uint32_t x = 2463534242u;
  for (uint64_t i = 0; i < perTensor * static_cast<uint64_t>(o.tensors); ++i) {
    x ^= x << 13, x ^= x >> 17, x ^= x << 5;
    payload[i] = static_cast<float>(x) * 1e-9f;
  }
  std::vector<NamedTensor> views;
  for (int t = 0; t < o.tensors; ++t) {
    const float* data = payload.data() + perTensor * static_cast<uint64_t>(t);
    views.push_back({fmt::format("layer{}.weight", t), TensorView::flat(data, perTensor, DType::kFloat32)});
  }

  WriteBenchResult result;
  using Clock = std::chrono::steady_clock;
  for (int r = 0; r < o.repeats; ++r) {
    const auto t0 = Clock::now();
    CheckpointWriter writer(o.dir, r, CheckpointWriter::newToken(), {.directIO = o.directIO});
    const FileRecord rec = writer.writeTensors("model.safetensors", views);
    const auto t1 = Clock::now();
    const auto final = writer.commit({.step = r});
    const auto t2 = Clock::now();
    result.fileBytes = rec.size;
    result.runs.push_back({std::chrono::duration<double>(t1 - t0).count(), std::chrono::duration<double>(t2 - t1).count()});
    std::error_code ec;
    std::filesystem::remove_all(final, ec);
  }
  // FileSink falls back to buffered I/O silently; report what a probe gets in this directory.
  {
    const auto probe = o.dir / ".direct-probe";
    FileSink sink(probe, {.direct = o.directIO});
    char block[4096] = {};
    sink.write(block, sizeof block);
    sink.finish();
    result.directIO = sink.usingDirectIO();
    std::error_code ec;
    std::filesystem::remove(probe, ec);
  }
  return result;
}

}  // namespace dtrain::ckpt
