// In-process Store: the TCP server's StoreState (the same key/value semantics and limits) behind a mutex, for
// unit tests (one thread per rank). Waiters park on a condition variable and wake on set/add/compareSet/append.
#pragma once

#include <condition_variable>
#include <mutex>

#include "rendezvous/store.h"
#include "rendezvous/store_state.h"

namespace dtrain::rendezvous {

class MemoryStore : public Store, public std::enable_shared_from_this<MemoryStore> {
 public:
  static std::shared_ptr<MemoryStore> create() { return std::shared_ptr<MemoryStore>(new MemoryStore()); }

  void set(std::string_view key, std::string_view value) override;
  std::string get(std::string_view key, Millis timeout) override;
  std::optional<std::string> tryGet(std::string_view key) override;
  int64_t add(std::string_view key, int64_t delta) override;
  std::string compareSet(std::string_view key, std::string_view expected, std::string_view desired) override;
  bool wait(const std::vector<std::string>& keys, Millis timeout) override;
  bool check(const std::vector<std::string>& keys) override;
  bool remove(std::string_view key) override;
  int64_t numKeys() override;
  void append(std::string_view key, std::string_view value) override;
  std::shared_ptr<Store> clone() override { return shared_from_this(); }

 private:
  MemoryStore() = default;
  std::mutex mu_;
  std::condition_variable changed_;
  StoreState state_;  // guarded by mu_
};

}  // namespace dtrain::rendezvous
