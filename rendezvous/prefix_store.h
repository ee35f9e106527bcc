// A Store view that prepends a fixed prefix to every key: namespaces per run, per round, per sub-group.
// numKeys() reports the underlying store's total (as c10d's PrefixStore does).
#pragma once

#include <string>

#include "rendezvous/store.h"

namespace dtrain::rendezvous {

class PrefixStore : public Store {
 public:
  PrefixStore(std::string prefix, StorePtr base);

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
  void multiSet(const std::vector<std::pair<std::string, std::string>>& entries) override;
  std::vector<std::optional<std::string>> multiGet(const std::vector<std::string>& keys) override;
  std::vector<StoreResult> batch(const std::vector<StoreOp>& ops) override;
  std::shared_ptr<Store> clone() override;

  const std::string& prefix() const { return prefix_; }
  const StorePtr& base() const { return base_; }

 private:
  std::string k(std::string_view key) const { return prefix_ + std::string(key); }
  std::vector<std::string> ks(const std::vector<std::string>& keys) const;

  std::string prefix_;
  StorePtr base_;
};

}  // namespace dtrain::rendezvous
