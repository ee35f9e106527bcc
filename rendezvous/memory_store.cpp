#include "rendezvous/memory_store.h"

#include "lib/common/error.h"
#include "lib/common/parse.h"

namespace dtrain::rendezvous {

void checkKey(std::string_view key) {
  DTRAIN_CHECK(key.size() <= kMaxKeyBytes, "store key of {} bytes exceeds the limit of {} bytes", key.size(),
               kMaxKeyBytes);
}

void checkValue(std::string_view value) {
  DTRAIN_CHECK(value.size() <= kMaxValueBytes, "store value of {} bytes exceeds the limit of {} bytes",
               value.size(), kMaxValueBytes);
}

void MemoryStore::set(std::string_view key, std::string_view value) {
  checkKey(key);
  checkValue(value);
  {
    std::lock_guard<std::mutex> lock(mu_);
    data_.insert_or_assign(std::string(key), std::string(value));
  }
  changed_.notify_all();
}

std::string MemoryStore::get(std::string_view key, Millis timeout) {
  checkKey(key);
  std::unique_lock<std::mutex> lock(mu_);
  auto found = [&] { return data_.find(key) != data_.end(); };
  if (!changed_.wait_for(lock, timeout, found))
    DTRAIN_THROW(TimeoutError, "store get('{}') timed out after {} ms", key, timeout.count());
  return data_.find(key)->second;
}

std::optional<std::string> MemoryStore::tryGet(std::string_view key) {
  checkKey(key);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = data_.find(key);
  if (it == data_.end()) return std::nullopt;
  return it->second;
}

int64_t MemoryStore::add(std::string_view key, int64_t delta) {
  checkKey(key);
  int64_t result = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = data_.find(key);
    int64_t current = 0;
    if (it != data_.end()) {
      auto parsed = parse::toInt(it->second);
      DTRAIN_CHECK(parsed.has_value(), "store add('{}'): current value is not an integer", key);
      current = *parsed;
    }
    result = current + delta;
    data_.insert_or_assign(std::string(key), std::to_string(result));
  }
  changed_.notify_all();
  return result;
}

std::string MemoryStore::compareSet(std::string_view key, std::string_view expected, std::string_view desired) {
  checkKey(key);
  checkValue(desired);
  std::string result;
  bool wrote = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = data_.find(key);
    if (it == data_.end()) {
      if (expected.empty()) {
        data_.emplace(std::string(key), std::string(desired));
        result = std::string(desired);
        wrote = true;
      }
    } else if (it->second == expected) {
      it->second = std::string(desired);
      result = it->second;
      wrote = true;
    } else {
      result = it->second;
    }
  }
  if (wrote) changed_.notify_all();
  return result;
}

bool MemoryStore::hasAll(const std::vector<std::string>& keys) const {
  for (const auto& k : keys)
    if (data_.find(k) == data_.end()) return false;
  return true;
}

bool MemoryStore::wait(const std::vector<std::string>& keys, Millis timeout) {
  for (const auto& k : keys) checkKey(k);
  std::unique_lock<std::mutex> lock(mu_);
  return changed_.wait_for(lock, timeout, [&] { return hasAll(keys); });
}

bool MemoryStore::check(const std::vector<std::string>& keys) {
  std::lock_guard<std::mutex> lock(mu_);
  return hasAll(keys);
}

bool MemoryStore::remove(std::string_view key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = data_.find(key);
  if (it == data_.end()) return false;
  data_.erase(it);
  return true;
}

int64_t MemoryStore::numKeys() {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(data_.size());
}

void MemoryStore::append(std::string_view key, std::string_view value) {
  checkKey(key);
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = data_.find(key);
    if (it == data_.end()) {
      checkValue(value);
      data_.emplace(std::string(key), std::string(value));
    } else {
      DTRAIN_CHECK(it->second.size() + value.size() <= kMaxValueBytes,
                   "store append('{}') would exceed the value limit of {} bytes", key, kMaxValueBytes);
      it->second.append(value);
    }
  }
  changed_.notify_all();
}

}  // namespace dtrain::rendezvous
