#include "lib/comm/bench.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "lib/comm/reduce.h"
#include "lib/common/aligned_buffer.h"
#include "lib/common/config.h"
#include "lib/common/error.h"

#if DTRAIN_WITH_CUDA
#include "lib/gpu/memory.h"
#endif

namespace dtrain::comm {
namespace {

// A benchmark buffer: host memory (64-byte aligned, zeroed), or device memory on the bench communicator's GPU.
class Buffer {
 public:
  Buffer(size_t bytes, const Device& where) : bytes_(bytes), where_(where) {
    if (where.isCpu()) {
      host_ = AlignedBuffer<char>(bytes);
      p_ = host_.data();
      return;
    }
#if DTRAIN_WITH_CUDA
    device_ = gpu::DeviceBuffer(bytes, where.index);
    p_ = device_.data();
#else
    DTRAIN_THROW(NotBuiltError, "bench: {} buffers need CUDA, which this dtrain was built without", where.str());
#endif
  }

  void* data() { return p_; }
  void upload(const std::vector<char>& host) {
    const size_t n = std::min(bytes_, host.size());
    copy(TensorView::flat(p_, n, DType::kUInt8, where_), TensorView::flat(host.data(), n, DType::kUInt8));
  }
  std::vector<char> download() {
    std::vector<char> host(bytes_);
    copy(TensorView::flat(host.data(), bytes_, DType::kUInt8), TensorView::flat(p_, bytes_, DType::kUInt8, where_));
    return host;
  }

 private:
  static void copy(const TensorView& dst, const TensorView& src) {
#if DTRAIN_WITH_CUDA
    gpu::copy(dst, src);
#else
    std::memcpy(dst.data, src.data, src.bytes());  // host only: a device Buffer cannot exist here
#endif
  }

  size_t bytes_;
  Device where_;
  AlignedBuffer<char> host_;
#if DTRAIN_WITH_CUDA
  gpu::DeviceBuffer device_;
#endif
  void* p_ = nullptr;
};

void put(DType t, char* buf, size_t i, double v) {
  switch (t) {
    case DType::kFloat32: reinterpret_cast<float*>(buf)[i] = static_cast<float>(v); break;
    case DType::kFloat64: reinterpret_cast<double*>(buf)[i] = v; break;
    case DType::kInt32: reinterpret_cast<int32_t*>(buf)[i] = static_cast<int32_t>(v); break;
    case DType::kInt64: reinterpret_cast<int64_t*>(buf)[i] = static_cast<int64_t>(v); break;
    case DType::kBFloat16: reinterpret_cast<uint16_t*>(buf)[i] = floatToBf16(static_cast<float>(v)); break;
    case DType::kFloat16: reinterpret_cast<uint16_t*>(buf)[i] = floatToFp16(static_cast<float>(v)); break;
    default: DTRAIN_THROW(UsageError, "bench: dtype {} is not supported by the collectives", dtypeName(t));
  }
}

double get(DType t, const char* buf, size_t i) {
  switch (t) {
    case DType::kFloat32: return reinterpret_cast<const float*>(buf)[i];
    case DType::kFloat64: return reinterpret_cast<const double*>(buf)[i];
    case DType::kInt32: return reinterpret_cast<const int32_t*>(buf)[i];
    case DType::kInt64: return static_cast<double>(reinterpret_cast<const int64_t*>(buf)[i]);
    case DType::kBFloat16: return bf16ToFloat(reinterpret_cast<const uint16_t*>(buf)[i]);
    case DType::kFloat16: return fp16ToFloat(reinterpret_cast<const uint16_t*>(buf)[i]);
    default: break;
  }
  return 0;
}

// Small integers in [-5, 5]: exact in every dtype, and so is their sum over any realistic world size.
double input(int rank, size_t i) { return static_cast<double>(static_cast<int>((rank * 7 + i * 3) % 11) - 5); }

double reduced(int n, size_t i, ReduceOp op, DType t) {
  double acc = input(0, i);
  for (int r = 1; r < n; ++r) {
    const double v = input(r, i);
    acc = op == ReduceOp::kMin ? std::min(acc, v) : op == ReduceOp::kMax ? std::max(acc, v) : acc + v;
  }
  if (op == ReduceOp::kAvg)
    acc = (t == DType::kInt32 || t == DType::kInt64) ? static_cast<double>(static_cast<int64_t>(acc) / n) : acc / n;
  return acc;
}

bool close(DType t, double got, double want) {
  if (got == want) return true;
  const double rel = t == DType::kBFloat16 ? 1.0 / 128 : t == DType::kFloat16 ? 1.0 / 1024 : 1e-6;
  return std::abs(got - want) <= rel * std::abs(want);
}

}  // namespace

std::string collectiveName(Collective c) {
  switch (c) {
    case Collective::kAllreduce: return "allreduce";
    case Collective::kBroadcast: return "broadcast";
    case Collective::kAllgather: return "allgather";
    case Collective::kReduceScatter: return "reduce_scatter";
  }
  return "?";
}

std::optional<Collective> parseCollective(const std::string& s) {
  for (Collective c : {Collective::kAllreduce, Collective::kBroadcast, Collective::kAllgather,
                       Collective::kReduceScatter})
    if (collectiveName(c) == s) return c;
  return std::nullopt;
}

double busFactor(Collective c, int n) {
  switch (c) {
    case Collective::kAllreduce: return 2.0 * (n - 1) / n;
    case Collective::kBroadcast: return 1.0;
    case Collective::kAllgather:
    case Collective::kReduceScatter: return static_cast<double>(n - 1) / n;
  }
  return 1.0;
}

void runBench(Backend& bench, Backend& control, const BenchOptions& o,
              const std::function<void(const BenchRow&)>& onRow) {
  DTRAIN_CHECK_AS(UsageError, o.minBytes > 0 && o.minBytes <= o.maxBytes, "sizes: need 0 < min-bytes <= max-bytes");
  DTRAIN_CHECK_AS(UsageError, o.stepFactor > 1.0, "step factor must be > 1");
  const int n = bench.size(), me = bench.rank();
  checkSupported(o.dtype, collectiveName(o.what));
  const size_t esz = dtypeSize(o.dtype);
  const Device where = bench.device();
  // Every size is a whole number of elements, and for allgather / reduce_scatter of n equal blocks.
  const size_t unit = esz * ((o.what == Collective::kAllgather || o.what == Collective::kReduceScatter)
                                 ? static_cast<size_t>(n) : 1);
  const size_t maxBytes = o.maxBytes / unit * unit;
  DTRAIN_CHECK_AS(UsageError, maxBytes > 0, "max-bytes {} is smaller than one element per rank ({} bytes)",
                  o.maxBytes, unit);
  Buffer a(maxBytes, where), b(maxBytes, where);

  for (double size = static_cast<double>(o.minBytes); size <= static_cast<double>(o.maxBytes) * (1 + 1e-9);
       size *= o.stepFactor) {
    const size_t bytes = static_cast<size_t>(size) / unit * unit;
    if (bytes == 0) continue;
    const size_t count = bytes / esz;
    const size_t perRank = count / static_cast<size_t>(n);
    // The views are built once per size, so the timed loop measures the collective alone.
    const TensorView whole = TensorView::flat(a.data(), count, o.dtype, where);
    const TensorView gatherIn = TensorView::flat(a.data(), perRank, o.dtype, where);
    const TensorView gatherOut = TensorView::flat(b.data(), count, o.dtype, where);
    const TensorView scatterOut = TensorView::flat(b.data(), perRank, o.dtype, where);
    auto once = [&] {
      switch (o.what) {
        case Collective::kAllreduce: return bench.allreduce(whole, o.op);
        case Collective::kBroadcast: return bench.broadcast(whole, 0);
        case Collective::kAllgather: return bench.allgather(gatherIn, gatherOut);
        case Collective::kReduceScatter: return bench.reduceScatter(whole, scatterOut, o.op);
      }
    };
    auto timed = [&](int iters) {
      control.barrier();
      const auto start = Clock::now();
      for (int i = 0; i < iters; ++i) once();
      double mine = secondsSince(start) / iters;
      control.allreduce(TensorView::flat(&mine, 1), ReduceOp::kMax);
      return mine;
    };
    const double warm = timed(std::max(1, o.warmup));
    int64_t iters = o.iters;
    if (iters <= 0) iters = std::clamp<int64_t>(static_cast<int64_t>(o.budgetSeconds / std::max(warm, 1e-7)), 5, 100000);
    control.broadcast(TensorView::flat(&iters, 1), 0);
    BenchRow row;
    row.bytes = bytes;
    row.count = count;
    row.iters = static_cast<int>(iters);
    const double seconds = timed(static_cast<int>(iters));
    row.timeUs = seconds * 1e6;
    row.algbwGBps = static_cast<double>(bytes) / seconds / 1e9;
    row.busbwGBps = row.algbwGBps * busFactor(o.what, n);
    if (o.check) {
      // Known inputs, one call, count wrong elements everywhere.
      const bool intoB = o.what == Collective::kAllgather || o.what == Collective::kReduceScatter;
      const size_t inCount = o.what == Collective::kAllgather ? perRank : count;
      std::vector<char> host(inCount * esz);
      for (size_t i = 0; i < inCount; ++i)
        put(o.dtype, host.data(), i, o.what == Collective::kBroadcast ? (me == 0 ? input(0, i) : -1.0) : input(me, i));
      a.upload(host);
      once();
      const std::vector<char> got = intoB ? b.download() : a.download();
      int64_t wrong = 0;
      const size_t outCount = o.what == Collective::kReduceScatter ? perRank : count;
      for (size_t i = 0; i < outCount; ++i) {
        double want = 0;
        switch (o.what) {
          case Collective::kAllreduce: want = reduced(n, i, o.op, o.dtype); break;
          case Collective::kBroadcast: want = input(0, i); break;
          case Collective::kAllgather: want = input(static_cast<int>(i / perRank), i % perRank); break;
          case Collective::kReduceScatter:
            want = reduced(n, static_cast<size_t>(me) * perRank + i, o.op, o.dtype);
            break;
        }
        if (!close(o.dtype, get(o.dtype, got.data(), i), want)) ++wrong;
      }
      control.allreduce(TensorView::flat(&wrong, 1), ReduceOp::kSum);
      row.wrong = wrong;
    }
    onRow(row);
  }
}

}  // namespace dtrain::comm
