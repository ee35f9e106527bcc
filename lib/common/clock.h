// Clocks and deadlines. Every blocking call in dtrain takes a std::chrono duration; a Deadline turns it into
// an absolute point so loops of partial reads/writes share one budget.
#pragma once

#include <chrono>

namespace dtrain {

using Clock = std::chrono::steady_clock;
using Millis = std::chrono::milliseconds;

class Deadline {
 public:
  explicit Deadline(Millis timeout) : end_(Clock::now() + timeout) {}
  static Deadline never() { return Deadline(Clock::time_point::max()); }
  Clock::time_point at() const { return end_; }
  bool expired() const { return Clock::now() >= end_; }
  // Time left, never negative.
  Millis remaining() const {
    if (end_ == Clock::time_point::max()) return Millis::max();
    auto left = std::chrono::duration_cast<Millis>(end_ - Clock::now());
    return left.count() > 0 ? left : Millis(0);
  }

 private:
  explicit Deadline(Clock::time_point end) : end_(end) {}
  Clock::time_point end_;
};

// Seconds since an arbitrary epoch, as a double: for rates and progress.
inline double secondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace dtrain
