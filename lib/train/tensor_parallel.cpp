#include "lib/train/tensor_parallel.h"

#include <cmath>
#include <map>
#include <string>

#include "lib/ckpt/file_io.h"
#include "lib/ckpt/safetensors.h"
#include "lib/common/error.h"

namespace dtrain::train {
namespace {

class BackendTensorGroup final : public nn::TensorGroup {
 public:
  BackendTensorGroup(comm::BackendPtr comm, int rank, int size) : comm_(std::move(comm)), rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void allReduceSum(float* data, size_t count) override {
    comm_->allreduce(TensorView::flat(data, count, DType::kFloat32), comm::ReduceOp::kSum);
  }

 private:
  comm::BackendPtr comm_;
  int rank_, size_;
};

}  // namespace

std::shared_ptr<nn::TensorGroup> tensorGroupOver(comm::BackendPtr tensor, int rank, int size) {
  DTRAIN_CHECK(tensor != nullptr || size == 1, "tensor group of {} ranks without a communicator", size);
  if (size == 1) return nullptr;
  return std::make_shared<BackendTensorGroup>(std::move(tensor), rank, size);
}

double partsGradNorm(const nn::Model& model, bool countReplicated, std::span<const comm::BackendPtr> groups) {
  double sum[1] = {nn::ownedSquaredNorm(model, model.grads(), countReplicated)};
  for (const auto& g : groups)
    if (g != nullptr) g->allreduce(TensorView::flat(sum, 1, DType::kFloat64), comm::ReduceOp::kSum);
  return std::sqrt(sum[0]);
}

std::vector<size_t> tensorSaveParams(const nn::Model& model, int tensorRank) {
  std::vector<size_t> out;
  const auto& table = model.paramTable();
  for (size_t i = 0; i < table.size(); ++i)
    if (table[i].sliced() || tensorRank == 0) out.push_back(i);
  return out;
}

void exportTensorParallel(const nn::Model& model, comm::Backend& tensor, bool writer,
                          const std::filesystem::path& path) {
  const auto& table = model.paramTable();
  const int size = tensor.size(), rank = tensor.rank();
  // The full tensors in first-appearance order (the whole model's order), each with its entries (c_attn's q, k
  // and v slices are three).
  std::vector<std::string> names;
  std::map<std::string, std::vector<const nn::ParamEntry*>> entries;
  for (const auto& e : table) {
    if (!entries.count(e.name)) names.push_back(e.name);
    entries[e.name].push_back(&e);
  }
  std::unique_ptr<ckpt::FileSink> sink;
  const auto tmp = path.string() + ".tmp";
  if (writer) {
    static const float kShapeOnly = 0;  // the header needs names and shapes only
    std::vector<ckpt::NamedTensor> header;
    for (const auto& n : names) header.push_back({n, TensorView::of(&kShapeOnly, entries[n].front()->fullShape)});
    sink = std::make_unique<ckpt::FileSink>(tmp, ckpt::FileSink::Options{.direct = false});
    sink->write(ckpt::safetensorsHeader(header, {{"format", "pt"}, {"producer", "dtrain"}}));
  }
  std::vector<float> full, gathered;
  for (const auto& n : names) {
    const auto& parts = entries[n];
    full.resize(static_cast<size_t>(parts.front()->fullShape.numel()));
    for (const nn::ParamEntry* e : parts) {
      const float* mine = model.params().data() + e->offset;
      if (!e->sliced()) {
        if (writer) std::copy(mine, mine + e->count, full.begin());
        continue;
      }
      // Every rank's slice of this entry (same size on every rank: the splits are even), then placed by rank.
      gathered.resize(e->count * static_cast<size_t>(size));
      tensor.allgather(TensorView::flat(mine, e->count), TensorView::flat(gathered.data(), gathered.size()));
      if (!writer) continue;
      const int64_t len = e->shape[e->sliceDim];
      for (int r = 0; r < size; ++r) {
        nn::ParamEntry at = *e;
        at.sliceStart = e->sliceStart + (r - rank) * len;
        nn::insertSlice(at, gathered.data() + e->count * static_cast<size_t>(r), full.data());
      }
    }
    if (writer) sink->write(full.data(), full.size() * sizeof(float));
  }
  if (!writer) return;
  sink->finish();
  std::filesystem::rename(tmp, path);
}

}  // namespace dtrain::train
