// The TCP store server's data: the key/value map and the watchers parked on missing keys.
//
// Not thread-safe by design: the server touches it only from its one io thread, so no operation takes a lock
// and a watcher can never miss a change between its check and its registration.
//
// Watchers: a blocked GET or WAIT registers on ONE missing key (its first missing one). Every mutation of a key
// (set, add, a compareSet that wrote, append) hands that key's watchers back to them; each re-checks all its
// keys and either completes or registers on its next missing key. So a waiter sits in exactly one list and
// removing it (timeout, disconnect) is one lookup, and a WAIT completes only when all its keys exist at once.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace dtrain::rendezvous {

// Quotas: the number of keys and the stored bytes (key + value + kEntryOverheadBytes per key, an estimate of
// the map's own cost) are bounded; a mutation that would exceed one throws dtrain::Error naming the quota and
// changes nothing. Removing keys gives memory back to the system (malloc_trim) once enough was freed.
class StoreState {
 public:
  static constexpr size_t kEntryOverheadBytes = 64;
  struct Quota {
    size_t maxKeys = SIZE_MAX;
    size_t maxStoredBytes = SIZE_MAX;
  };
  StoreState() = default;
  explicit StoreState(Quota quota) : quota_(quota) {}

  class Watcher {
   public:
    virtual ~Watcher() = default;
    // The watched key changed: re-check, then complete or watch() again. Called from inside a mutation.
    virtual void onKeyChanged() = 0;
  };
  using WatcherPtr = std::shared_ptr<Watcher>;

  const std::string* find(std::string_view key) const;
  bool contains(std::string_view key) const { return find(key) != nullptr; }
  // The first key of `keys` that does not exist, or nullptr when all do.
  const std::string* firstMissing(const std::vector<std::string>& keys) const;

  // The mutations throw dtrain::Error (the server turns it into an error reply) on a limit or a bad integer.
  void set(std::string_view key, std::string_view value);
  int64_t add(std::string_view key, int64_t delta);
  std::string compareSet(std::string_view key, std::string_view expected, std::string_view desired);
  void append(std::string_view key, std::string_view value);
  bool remove(std::string_view key);
  int64_t numKeys() const { return static_cast<int64_t>(data_.size()); }
  size_t storedBytes() const { return storedBytes_; }

  void watch(const std::string& key, WatcherPtr watcher);
  void unwatch(const std::string& key, const Watcher* watcher);
  size_t numWatchers() const;

 private:
  struct Hash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
  };
  template <typename V>
  using Map = std::unordered_map<std::string, V, Hash, std::equal_to<>>;

  void notify(std::string_view key);
  // Throws when a new key (isNew) or `grow` more bytes would exceed a quota; then charges them.
  void charge(std::string_view key, bool isNew, size_t grow);
  void release(size_t bytes);

  Quota quota_;
  size_t storedBytes_ = 0;
  size_t freedSinceTrim_ = 0;

  Map<std::string> data_;
  Map<std::vector<WatcherPtr>> watchers_;
};

}  // namespace dtrain::rendezvous
