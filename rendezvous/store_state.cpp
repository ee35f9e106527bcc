#include "rendezvous/store_state.h"

#include <malloc.h>

#include <algorithm>

#include "lib/common/error.h"
#include "lib/common/parse.h"
#include "rendezvous/store.h"

namespace dtrain::rendezvous {

namespace {
// Freed bytes after which remove() hands memory back to the system (glibc keeps freed small blocks otherwise).
constexpr size_t kTrimAfterBytes = size_t{64} << 20;
}  // namespace

void StoreState::charge(std::string_view key, bool isNew, size_t grow) {
  if (isNew) {
    DTRAIN_CHECK(data_.size() < quota_.maxKeys,
                 "store quota exceeded: the store holds {} keys, the limit (max-keys) is {}; cannot create '{}'",
                 data_.size(), quota_.maxKeys, key);
    grow += key.size() + kEntryOverheadBytes;
  }
  DTRAIN_CHECK(storedBytes_ + grow <= quota_.maxStoredBytes,
               "store quota exceeded: storing '{}' would bring the store to {} bytes, the limit (max-stored-bytes) "
               "is {} bytes",
               key, storedBytes_ + grow, quota_.maxStoredBytes);
  storedBytes_ += grow;
}

void StoreState::release(size_t bytes) {
  storedBytes_ -= std::min(bytes, storedBytes_);
  freedSinceTrim_ += bytes;
  if (freedSinceTrim_ >= kTrimAfterBytes || data_.empty()) {
    if (data_.empty()) Map<std::string>().swap(data_);  // also return the bucket array
    freedSinceTrim_ = 0;
    ::malloc_trim(0);
  }
}

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
  if (it == data_.end()) {
    charge(key, true, value.size());
    data_.emplace(std::string(key), std::string(value));
  } else {
    if (value.size() > it->second.size()) charge(key, false, value.size() - it->second.size());
    else release(it->second.size() - value.size());
    it->second.assign(value);
  }
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
  auto text = std::to_string(result);
  if (it == data_.end()) {
    charge(key, true, text.size());
    data_.emplace(std::string(key), std::move(text));
  } else {
    if (text.size() > it->second.size()) charge(key, false, text.size() - it->second.size());
    else storedBytes_ -= it->second.size() - text.size();
    it->second = std::move(text);
  }
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
    charge(key, true, desired.size());
    data_.emplace(std::string(key), std::string(desired));
  } else if (it->second == expected) {
    if (desired.size() > it->second.size()) charge(key, false, desired.size() - it->second.size());
    else release(it->second.size() - desired.size());
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
    charge(key, true, value.size());
    data_.emplace(std::string(key), std::string(value));
  } else {
    DTRAIN_CHECK(it->second.size() + value.size() <= kMaxValueBytes,
                 "store append('{}') would exceed the value limit of {} bytes", key, kMaxValueBytes);
    charge(key, false, value.size());
    it->second.append(value);
  }
  notify(key);
}

bool StoreState::remove(std::string_view key) {
  auto it = data_.find(key);
  if (it == data_.end()) return false;
  size_t bytes = it->first.size() + it->second.size() + kEntryOverheadBytes;
  data_.erase(it);
  release(bytes);
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
