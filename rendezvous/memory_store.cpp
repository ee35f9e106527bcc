#include "rendezvous/memory_store.h"

#include "lib/common/error.h"

namespace dtrain::rendezvous {

// Every mutation runs StoreState's (limits, integer parsing, compare-and-set rules) under the mutex, then wakes
// the waiters, which re-check their keys.

void MemoryStore::set(std::string_view key, std::string_view value) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    state_.set(key, value);
  }
  changed_.notify_all();
}

std::string MemoryStore::get(std::string_view key, Millis timeout) {
  checkKey(key);
  std::unique_lock<std::mutex> lock(mu_);
  if (!changed_.wait_for(lock, timeout, [&] { return state_.contains(key); }))
    DTRAIN_THROW(TimeoutError, "store get('{}') timed out after {} ms", key, timeout.count());
  return *state_.find(key);
}

std::optional<std::string> MemoryStore::tryGet(std::string_view key) {
  checkKey(key);
  std::lock_guard<std::mutex> lock(mu_);
  const std::string* v = state_.find(key);
  if (v == nullptr) return std::nullopt;
  return *v;
}

int64_t MemoryStore::add(std::string_view key, int64_t delta) {
  int64_t result = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    result = state_.add(key, delta);
  }
  changed_.notify_all();
  return result;
}

std::string MemoryStore::compareSet(std::string_view key, std::string_view expected, std::string_view desired) {
  std::string result;
  {
    std::lock_guard<std::mutex> lock(mu_);
    result = state_.compareSet(key, expected, desired);
  }
  changed_.notify_all();
  return result;
}

bool MemoryStore::wait(const std::vector<std::string>& keys, Millis timeout) {
  for (const auto& k : keys) checkKey(k);
  std::unique_lock<std::mutex> lock(mu_);
  return changed_.wait_for(lock, timeout, [&] { return state_.firstMissing(keys) == nullptr; });
}

bool MemoryStore::check(const std::vector<std::string>& keys) {
  std::lock_guard<std::mutex> lock(mu_);
  return state_.firstMissing(keys) == nullptr;
}

bool MemoryStore::remove(std::string_view key) {
  std::lock_guard<std::mutex> lock(mu_);
  return state_.remove(key);
}

int64_t MemoryStore::numKeys() {
  std::lock_guard<std::mutex> lock(mu_);
  return state_.numKeys();
}

void MemoryStore::append(std::string_view key, std::string_view value) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    state_.append(key, value);
  }
  changed_.notify_all();
}

}  // namespace dtrain::rendezvous
