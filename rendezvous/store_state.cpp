#include "rendezvous/store_state.h"

#include <algorithm>

#include "lib/common/error.h"
#include "lib/common/parse.h"
#include "rendezvous/store.h"

namespace dtrain::rendezvous {

const std::string* StoreState::find(std::string_view key) const {
  auto it = data_.find(key);
  return it == data_.end() ? nullptr : &it->second;
}

const std::string* StoreState::firstMissing(const std::vector<std::string>& keys) const {
  for (const auto& k : keys)
    if (!contains(k)) return &k;
  return nullptr;
}

void StoreState::set(std::string_view key, std::string_view value) {
  checkKey(key);
  checkValue(value);
  auto it = data_.find(key);
  if (it == data_.end())
    data_.emplace(std::string(key), std::string(value));
  else
    it->second.assign(value);
  notify(key);
}

int64_t StoreState::add(std::string_view key, int64_t delta) {
  checkKey(key);
  auto it = data_.find(key);
  int64_t current = 0;
  if (it != data_.end()) {
    auto parsed = parse::toInt(it->second);
    DTRAIN_CHECK(parsed.has_value(), "store add('{}'): current value is not an integer", key);
    current = *parsed;
  }
  int64_t result = 0;
  DTRAIN_CHECK(!__builtin_add_overflow(current, delta, &result), "store add('{}'): {} + {} overflows int64", key,
               current, delta);
  if (it == data_.end())
    data_.emplace(std::string(key), std::to_string(result));
  else
    it->second = std::to_string(result);
  notify(key);
  return result;
}

std::string StoreState::compareSet(std::string_view key, std::string_view expected, std::string_view desired) {
  checkKey(key);
  checkValue(desired);
  auto it = data_.find(key);
  if (it == data_.end()) {
    // A missing key matches an empty `expected` (c10d semantics); otherwise the caller learns it lost.
    if (!expected.empty()) return std::string();
    data_.emplace(std::string(key), std::string(desired));
  } else if (it->second == expected) {
    it->second.assign(desired);
  } else {
    return it->second;
  }
  notify(key);
  return std::string(desired);
}

void StoreState::append(std::string_view key, std::string_view value) {
  checkKey(key);
  auto it = data_.find(key);
  if (it == data_.end()) {
    checkValue(value);
    data_.emplace(std::string(key), std::string(value));
  } else {
    DTRAIN_CHECK(it->second.size() + value.size() <= kMaxValueBytes,
                 "store append('{}') would exceed the value limit of {} bytes", key, kMaxValueBytes);
    it->second.append(value);
  }
  notify(key);
}

bool StoreState::remove(std::string_view key) {
  auto it = data_.find(key);
  if (it == data_.end()) return false;
  data_.erase(it);
  return true;
}

void StoreState::watch(const std::string& key, WatcherPtr watcher) {
  auto it = watchers_.find(key);
  if (it == watchers_.end()) it = watchers_.emplace(key, std::vector<WatcherPtr>{}).first;
  it->second.push_back(std::move(watcher));
}

void StoreState::unwatch(const std::string& key, const Watcher* watcher) {
  auto it = watchers_.find(key);
  if (it == watchers_.end()) return;
  auto& list = it->second;
  list.erase(std::remove_if(list.begin(), list.end(), [&](const WatcherPtr& w) { return w.get() == watcher; }),
             list.end());
  if (list.empty()) watchers_.erase(it);
}

size_t StoreState::numWatchers() const {
  size_t n = 0;
  for (const auto& [key, list] : watchers_) n += list.size();
  return n;
}

void StoreState::notify(std::string_view key) {
  auto it = watchers_.find(key);
  if (it == watchers_.end()) return;
  // Take the list out first: a watcher may register again (on another key) while we iterate.
  auto list = std::move(it->second);
  watchers_.erase(it);
  for (auto& w : list) w->onKeyChanged();
}

}  // namespace dtrain::rendezvous
