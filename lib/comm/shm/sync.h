// Synchronisation inside a shared-memory segment: counters ranks publish and others wait on.
//
// A Flag is a 32-bit counter on its own cache line plus a count of sleepers. Posting is a release store (and
// a futex wake only when somebody sleeps); waiting spins briefly (a peer on another core usually answers
// within a microsecond or two), then yields, then sleeps on the futex in short slices, checking between
// slices whether the segment was aborted, whether the deadline passed, and whether a peer process died
// (pidfd). So a dead peer is noticed within milliseconds and a stalled one at the deadline, and whoever
// notices first aborts the segment, which wakes everybody else with the same error.
// Counters wrap: comparisons are on the signed difference.
// Thread-safety: Flags are shared between processes; a Waiter is used by one thread.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "lib/comm/backend.h"
#include "lib/common/clock.h"

namespace dtrain::comm::shm {

struct alignas(64) Flag {
  std::atomic<uint32_t> value{0};
  std::atomic<uint32_t> sleepers{0};

  uint32_t load() const { return value.load(std::memory_order_acquire); }
  void post(uint32_t v);   // release store, then wake sleepers if any
  void add(uint32_t delta);  // atomic increment, then wake sleepers if any
  void wakeAll();
};
static_assert(sizeof(Flag) == 64);
static_assert(std::atomic<uint32_t>::is_always_lock_free);

// a >= b on wrapping counters.
inline bool reached(uint32_t a, uint32_t b) { return static_cast<int32_t>(a - b) >= 0; }

// Shared abort state, in the segment header.
struct AbortState {
  Flag flag;                      // 0 = healthy, 1 = aborted
  std::atomic<uint32_t> claimed;  // first aborter writes the message
  int32_t rank;
  char why[200];
};

// Watches peer processes through pidfds (threads of this process are skipped: they cannot die alone).
class PeerWatch {
 public:
  explicit PeerWatch(const std::vector<PeerInfo>& peers);
  ~PeerWatch();
  PeerWatch(const PeerWatch&) = delete;
  PeerWatch& operator=(const PeerWatch&) = delete;
  // A rank whose process has exited, or -1.
  int deadRank() const;

 private:
  std::vector<int> fds_;
  std::vector<int> ranks_;
  std::vector<int64_t> pids_;  // fallback when pidfd_open is unavailable
};

class Waiter {
 public:
  Waiter(AbortState& abort, Flag* const* allFlags, size_t flagCount, const PeerWatch& peers, int rank,
         const Deadline& deadline, std::chrono::milliseconds timeout, std::chrono::microseconds spin);

  // Blocks until pred() holds; `flag` is the counter whose change can make it hold, `peer` whom we wait for.
  // Throws CommError (after aborting the segment) on timeout or a dead peer, or when another rank aborted.
  template <typename Pred>
  void until(Flag& flag, int peer, Pred pred) {
    if (pred()) [[likely]] return;
    if (spinUntil(pred)) return;
    sleepUntil(flag, peer, [&]() -> bool { return pred(); });
  }

  // Marks the segment aborted (first caller's message wins) and wakes every sleeper. Does not throw.
  void abort(const std::string& why);

 private:
  // Spins (inline: this is every small collective's critical path), yielding after a few microseconds so an
  // oversubscribed machine lets the awaited rank run. One pause between checks: on recent Xeons a pause is
  // ~140 cycles, so a longer burst would add a microsecond to every small collective. False after spin_.
  template <typename Pred>
  bool spinUntil(Pred& pred) {
    const auto start = Clock::now();
    for (uint32_t i = 1;; ++i) {
      cpuRelax();
      if (pred()) return true;
      if ((i & 255) == 0) {
        if (abort_.flag.load() != 0) throwAborted();
        const auto spent = Clock::now() - start;
        if (spent >= spin_) return false;
        if (spent >= std::chrono::microseconds(4)) yieldCpu();
      }
    }
  }
  static void cpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::atomic_signal_fence(std::memory_order_seq_cst);
#endif
  }
  static void yieldCpu();
  void sleepUntil(Flag& flag, int peer, const std::function<bool()>& pred);
  [[noreturn]] void throwAborted();

  AbortState& abort_;
  Flag* const* allFlags_;
  size_t flagCount_;
  const PeerWatch& peers_;
  int rank_;
  const Deadline& deadline_;
  std::chrono::milliseconds timeout_;
  std::chrono::microseconds spin_;
};

}  // namespace dtrain::comm::shm
