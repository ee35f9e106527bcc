// The job's first agent's watch for the agents that the rendezvous refuses (docs/rendezvous.md, "Refused nodes"):
// a refused agent leaves its NodeInfo and the reason under `refused/<n>` before it exits with code 4
// (rendezvous.h's key list; Rendezvous::waitRefusal reads a record), and the agent that started the job
// (RendezvousOptions::onFirstAgent) logs each one as it comes, at warning level, while it waits for nodes and
// while its rounds run, instead of only timing out.
//
// Ownership: the watcher owns `store` (give it a connection of its own: a clone of the agent's, which blocks on the
// store in slices) and one thread, both for its lifetime.
// Thread-safety: created and destroyed on one thread; the watching thread only logs.
// Blocking: the constructor starts the thread and returns; the destructor stops it within kSlice (one blocking
// store read). A store error (the store went, the connection broke) ends the watch, logged at debug level.
// Errors: the constructor throws std::system_error when the thread cannot start; start() logs any failure at
// debug level instead and returns nullptr (watching is best effort: the refused node's own message says why).
#pragma once

#include <atomic>
#include <memory>
#include <thread>

#include "lib/common/clock.h"
#include "rendezvous/store.h"

namespace dtrain::rendezvous {

class RefusalWatcher {
 public:
  // Each store read blocks at most this long, so the destructor returns within it.
  static constexpr Millis kSlice{250};

  // Watches `store` (the run's prefixed store) from refused/1 on.
  explicit RefusalWatcher(StorePtr store);
  ~RefusalWatcher();
  RefusalWatcher(const RefusalWatcher&) = delete;
  RefusalWatcher& operator=(const RefusalWatcher&) = delete;

  // A watcher on a clone of `store` (its own connection); nullptr, logged at debug level, when that fails.
  static std::unique_ptr<RefusalWatcher> start(Store& store);

 private:
  void loop(Store& store);

  std::atomic<bool> stop_{false};  // before thread_: set before the thread starts
  std::thread thread_;
};

}  // namespace dtrain::rendezvous
