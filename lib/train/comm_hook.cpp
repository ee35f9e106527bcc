#include "lib/train/comm_hook.h"

#include <exception>
#include <mutex>

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

class ThenWork final : public comm::Work {
 public:
  ThenWork(comm::WorkPtr inner, std::function<void()> then) : inner_(std::move(inner)), then_(std::move(then)) {}
  void wait() override {
    inner_->wait();
    finish();
  }
  // `then` may submit collectives, which only the submitting thread does: done() never runs it.
  bool done() override {
    std::lock_guard lock(mu_);
    return ran_;
  }

 private:
  void finish() {
    std::lock_guard lock(mu_);
    if (!ran_) {
      ran_ = true;
      try {
        then_();
      } catch (...) {
        error_ = std::current_exception();
      }
    }
    if (error_) std::rethrow_exception(error_);
  }
  comm::WorkPtr inner_;
  std::function<void()> then_;
  std::mutex mu_;
  bool ran_ = false;
  std::exception_ptr error_;
};

}  // namespace

uint64_t allreduceWireBytes(uint64_t bytes, int n) {
  return n <= 1 ? 0 : bytes * 2 * static_cast<uint64_t>(n - 1) / static_cast<uint64_t>(n);
}

uint64_t allgatherWireBytes(uint64_t bytes, int n) { return n <= 1 ? 0 : bytes * static_cast<uint64_t>(n - 1); }

comm::WorkPtr thenWork(comm::WorkPtr inner, std::function<void()> then) {
  DTRAIN_CHECK(inner != nullptr, "thenWork: no inner Work");
  return std::make_shared<ThenWork>(std::move(inner), std::move(then));
}

void AllreduceAvgHook::count(const GradBucket& bucket, const comm::Backend& group) {
  const uint64_t wire = allreduceWireBytes(bucket.grads.bytes(), group.size());
  traffic_.bytesSent += wire;
  traffic_.bytesUncompressed += wire;
  if (bucket.last) ++traffic_.steps;
}

void CommHook::run(const GradBucket& bucket, comm::Backend& group) {
  comm::WorkPtr work = start(bucket, group);
  DTRAIN_CHECK(work != nullptr, "communication hook '{}' returned no Work for bucket {}", name(), bucket.index);
  work->wait();
}

comm::WorkPtr AllreduceAvgHook::start(const GradBucket& bucket, comm::Backend& group) {
  count(bucket, group);
  return group.allreduceAsync(bucket.grads, comm::ReduceOp::kAvg);
}

void AllreduceAvgHook::run(const GradBucket& bucket, comm::Backend& group) {
  count(bucket, group);
  group.allreduce(bucket.grads, comm::ReduceOp::kAvg);
}

CommHookPtr makeCommHook(std::string name, std::function<comm::WorkPtr(const GradBucket&, comm::Backend&)> start) {
  return std::make_shared<FunctionHook>(std::move(name), std::move(start));
}

}  // namespace dtrain::train
