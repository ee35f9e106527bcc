#include "lib/comm/tcp/ring.h"

#include <algorithm>
#include <cstdint>
#include <optional>

#include "lib/comm/reduce.h"
#include "lib/common/error.h"

namespace dtrain::comm::tcp {

std::vector<Segment> splitEvenly(size_t count, int parts) {
  std::vector<Segment> out(static_cast<size_t>(parts));
  const size_t base = count / static_cast<size_t>(parts);
  const size_t extra = count % static_cast<size_t>(parts);
  size_t offset = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    out[i].offset = offset;
    out[i].count = base + (i < extra ? 1 : 0);
    offset += out[i].count;
  }
  return out;
}

namespace {

class RingRun {
 public:
  RingRun(const RingPlan& plan, Waiter& waiter) : p_(plan), waiter_(waiter), esz_(dtypeSize(plan.dtype)) {
    DTRAIN_CHECK(p_.chunkBytes % 64 == 0 && p_.chunkBytes > 0, "ring chunk must be a positive multiple of 64");
  }

  void run() {
    const size_t steps = p_.steps.size();
    while (sendStep_ < steps || recvStep_ < steps) {
      bool moved = false;
      bool wantWrite = false;
      bool wantRead = false;
      pumpSend(moved, wantWrite);
      pumpRecv(moved, wantRead);
      // A send can unblock after the receive side moved on (its gate), so loop once more before sleeping.
      if (moved) continue;
      DTRAIN_CHECK(wantRead || wantWrite || heldUntil_, "ring engine stalled with nothing to wait for (inconsistent plan)");
      waiter_.wait(*p_.left, wantRead, false, p_.right, false, wantWrite,
                   heldUntil_ ? *heldUntil_ : Clock::time_point::max());
    }
  }

 private:
  // Bytes of step t finished on the receive side (received and, for combine steps, combined).
  size_t finished(int t) const {
    const auto ut = static_cast<size_t>(t);
    if (ut < recvStep_) return p_.steps[ut].recvLen;
    if (ut == recvStep_) return processed_;
    return 0;
  }

  void pumpSend(bool& moved, bool& wantWrite) {
    while (sendStep_ < p_.steps.size()) {
      const RingStep& st = p_.steps[sendStep_];
      if (sent_ == st.sendLen) {
        ++sendStep_;
        sent_ = 0;
        continue;
      }
      const size_t allowed = st.sendAfter < 0 ? st.sendLen : std::min(st.sendLen, finished(st.sendAfter));
      if (allowed <= sent_) return;  // gated: the receive side will open it
      if (releasedStep_ != sendStep_ && linkDelay().count() > 0) {
        // A simulated link latency (linkDelay): the step's first byte leaves that long after it is ready.
        if (!heldUntil_) heldUntil_ = Clock::now() + linkDelay();
        if (Clock::now() < *heldUntil_) return;
        heldUntil_.reset();
        releasedStep_ = sendStep_;
      }
      const size_t n = p_.right->sendSome(st.send + sent_, allowed - sent_);
      if (n == 0) {
        wantWrite = true;
        return;
      }
      sent_ += n;
      moved = true;
    }
  }

  void pumpRecv(bool& moved, bool& wantRead) {
    while (recvStep_ < p_.steps.size()) {
      const RingStep& st = p_.steps[recvStep_];
      if (received_ == st.recvLen) {
        ++recvStep_;
        received_ = 0;
        processed_ = 0;
        continue;
      }
      size_t n;
      if (st.recvInto != nullptr) {
        n = p_.left->recvSome(st.recvInto + received_, st.recvLen - received_);
        received_ += n;
        processed_ = received_;
      } else {
        const size_t inChunk = received_ - processed_;
        const size_t want = std::min(p_.chunkBytes - inChunk, st.recvLen - received_);
        n = p_.left->recvSome(p_.staging + inChunk, want);
        received_ += n;
        if (received_ - processed_ == p_.chunkBytes || received_ == st.recvLen) combine(st);
      }
      if (n == 0) {
        wantRead = true;
        return;
      }
      moved = true;
    }
  }

  void combine(const RingStep& st) {
    const size_t len = received_ - processed_;
    const size_t count = len / esz_;
    reduce2(st.combineOut + processed_, st.combineWith + processed_, p_.staging, count, p_.dtype, p_.op);
    if (st.divisor > 1) divide(st.combineOut + processed_, count, p_.dtype, st.divisor);
    processed_ = received_;
  }

  const RingPlan& p_;
  Waiter& waiter_;
  const size_t esz_;
  size_t sendStep_ = 0;
  size_t sent_ = 0;
  size_t recvStep_ = 0;
  size_t received_ = 0;
  size_t processed_ = 0;
  std::optional<Clock::time_point> heldUntil_;
  size_t releasedStep_ = SIZE_MAX;  // the send step whose hold has passed  // the current step's held first byte leaves then (linkDelay)
};

}  // namespace

void runRing(const RingPlan& plan, Waiter& waiter) { RingRun(plan, waiter).run(); }

}  // namespace dtrain::comm::tcp
