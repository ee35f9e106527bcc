#include "lib/train/comm_hook.h"

#include "lib/common/error.h"

namespace dtrain::train {

namespace {

class FunctionHook final : public CommHook {
 public:
  FunctionHook(std::string name, std::function<comm::WorkPtr(const GradBucket&, comm::Backend&)> start)
      : name_(std::move(name)), start_(std::move(start)) {}
  std::string name() const override { return name_; }
  comm::WorkPtr start(const GradBucket& bucket, comm::Backend& group) override { return start_(bucket, group); }

 private:
  std::string name_;
  std::function<comm::WorkPtr(const GradBucket&, comm::Backend&)> start_;
};

}  // namespace

void CommHook::run(const GradBucket& bucket, comm::Backend& group) {
  comm::WorkPtr work = start(bucket, group);
  DTRAIN_CHECK(work != nullptr, "communication hook '{}' returned no Work for bucket {}", name(), bucket.index);
  work->wait();
}

comm::WorkPtr AllreduceAvgHook::start(const GradBucket& bucket, comm::Backend& group) {
  return group.allreduceAsync(bucket.grads, comm::ReduceOp::kAvg);
}

void AllreduceAvgHook::run(const GradBucket& bucket, comm::Backend& group) {
  group.allreduce(bucket.grads, comm::ReduceOp::kAvg);
}

CommHookPtr makeCommHook(std::string name, std::function<comm::WorkPtr(const GradBucket&, comm::Backend&)> start) {
  return std::make_shared<FunctionHook>(std::move(name), std::move(start));
}

}  // namespace dtrain::train
