#include "lib/comm/shm/sync.h"

#include <linux/futex.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <thread>

#include "lib/common/error.h"


namespace dtrain::comm::shm {
namespace {

uint32_t* word(std::atomic<uint32_t>& a) { return reinterpret_cast<uint32_t*>(&a); }

void futexWake(std::atomic<uint32_t>& a) {
  // Shared (not FUTEX_PRIVATE): the waiters are other processes mapping the same pages.
  ::syscall(SYS_futex, word(a), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

void futexWait(std::atomic<uint32_t>& a, uint32_t expected, std::chrono::microseconds timeout) {
  timespec ts{static_cast<time_t>(timeout.count() / 1000000), static_cast<long>(timeout.count() % 1000000) * 1000};
  ::syscall(SYS_futex, word(a), FUTEX_WAIT, expected, &ts, nullptr, 0);  // EAGAIN/ETIMEDOUT/EINTR: re-check
}

// Longest single futex sleep: bounds how late a dead peer (pidfd) or the deadline is noticed.
constexpr std::chrono::microseconds kSleepSlice{5000};

}  // namespace

void Flag::post(uint32_t v) {
  value.store(v, std::memory_order_seq_cst);
  // Pairs with the waiter's sleepers increment before its final check (both seq_cst): either it sees the new
  // value or we see it asleep.
  if (sleepers.load(std::memory_order_seq_cst) != 0) futexWake(value);
}

void Flag::add(uint32_t delta) {
  value.fetch_add(delta, std::memory_order_seq_cst);
  if (sleepers.load(std::memory_order_seq_cst) != 0) futexWake(value);
}

void Flag::wakeAll() { futexWake(value); }

PeerWatch::PeerWatch(const std::vector<PeerInfo>& peers) {
  const int64_t self = ::getpid();
  std::vector<int64_t> seen;
  for (size_t r = 0; r < peers.size(); ++r) {
    const int64_t pid = peers[r].pid;
    if (pid == self || std::find(seen.begin(), seen.end(), pid) != seen.end()) continue;
    seen.push_back(pid);
    int fd = static_cast<int>(::syscall(SYS_pidfd_open, static_cast<pid_t>(pid), 0));
    fds_.push_back(fd);  // -1: no pidfd support (or already gone); fall back to kill(pid, 0)
    ranks_.push_back(static_cast<int>(r));
    pids_.push_back(pid);
  }
}

PeerWatch::~PeerWatch() {
  for (int fd : fds_)
    if (fd >= 0) ::close(fd);
}

int PeerWatch::deadRank() const {
  for (size_t i = 0; i < fds_.size(); ++i) {
    if (fds_[i] >= 0) {
      pollfd p{fds_[i], POLLIN, 0};
      if (::poll(&p, 1, 0) > 0) return ranks_[i];  // readable pidfd = the process exited
    } else if (::kill(static_cast<pid_t>(pids_[i]), 0) != 0 && errno == ESRCH) {
      return ranks_[i];
    }
  }
  return -1;
}

Waiter::Waiter(AbortState& abort, Flag* const* allFlags, size_t flagCount, const PeerWatch& peers, int rank,
               const Deadline& deadline, std::chrono::milliseconds timeout, std::chrono::microseconds spin)
    : abort_(abort),
      allFlags_(allFlags),
      flagCount_(flagCount),
      peers_(peers),
      rank_(rank),
      deadline_(deadline),
      timeout_(timeout),
      spin_(spin) {}

void Waiter::abort(const std::string& why) {
  uint32_t expected = 0;
  if (abort_.claimed.compare_exchange_strong(expected, 1)) {
    abort_.rank = rank_;
    std::snprintf(abort_.why, sizeof(abort_.why), "%s", why.c_str());
    abort_.flag.post(1);
  }
  for (size_t i = 0; i < flagCount_; ++i) allFlags_[i]->wakeAll();
}

void Waiter::throwAborted() {
  DTRAIN_THROW(CommError, "shared-memory communicator aborted by rank {}: {}", abort_.rank, abort_.why);
}

void Waiter::yieldCpu() { std::this_thread::yield(); }

void Waiter::sleepUntil(Flag& flag, int peer, const std::function<bool()>& pred) {
  // Sleep on the futex in slices, checking abort, dead peers and the deadline between them.
  for (;;) {
    if (abort_.flag.load() != 0) throwAborted();
    const uint32_t seen = flag.load();
    flag.sleepers.fetch_add(1, std::memory_order_seq_cst);
    if (pred()) {
      flag.sleepers.fetch_sub(1, std::memory_order_relaxed);
      return;
    }
    auto left = std::chrono::duration_cast<std::chrono::microseconds>(deadline_.at() - Clock::now());
    futexWait(flag.value, seen, std::max(std::chrono::microseconds(1), std::min(left, kSleepSlice)));
    flag.sleepers.fetch_sub(1, std::memory_order_relaxed);
    if (pred()) return;
    if (abort_.flag.load() != 0) throwAborted();
    if (int dead = peers_.deadRank(); dead >= 0) {
      std::string why = fmt::format("rank {} died (its process exited)", dead);
      abort(why);
      DTRAIN_THROW(CommError, "shared-memory communicator: {}", why);
    }
    if (deadline_.expired()) {
      std::string whom = peer >= 0 ? fmt::format("rank {}", peer) : std::string("the other ranks");
      std::string why = fmt::format("rank {} timed out after {} ms waiting for {} (stalled or hung peer)", rank_,
                                    timeout_.count(), whom);
      abort(why);
      DTRAIN_THROW(CommError, "{}", why);
    }
  }
}

}  // namespace dtrain::comm::shm
