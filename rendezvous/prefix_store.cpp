#include "rendezvous/prefix_store.h"

namespace dtrain::rendezvous {

PrefixStore::PrefixStore(std::string prefix, StorePtr base) : prefix_(std::move(prefix)), base_(std::move(base)) {
  timeout_ = base_->timeout();
}

std::vector<std::string> PrefixStore::ks(const std::vector<std::string>& keys) const {
  std::vector<std::string> out;
  out.reserve(keys.size());
  for (const auto& key : keys) out.push_back(k(key));
  return out;
}

void PrefixStore::set(std::string_view key, std::string_view value) { base_->set(k(key), value); }
std::string PrefixStore::get(std::string_view key, Millis timeout) { return base_->get(k(key), timeout); }
std::optional<std::string> PrefixStore::tryGet(std::string_view key) { return base_->tryGet(k(key)); }
int64_t PrefixStore::add(std::string_view key, int64_t delta) { return base_->add(k(key), delta); }
std::string PrefixStore::compareSet(std::string_view key, std::string_view expected, std::string_view desired) {
  return base_->compareSet(k(key), expected, desired);
}
bool PrefixStore::wait(const std::vector<std::string>& keys, Millis timeout) { return base_->wait(ks(keys), timeout); }
bool PrefixStore::check(const std::vector<std::string>& keys) { return base_->check(ks(keys)); }
bool PrefixStore::remove(std::string_view key) { return base_->remove(k(key)); }
int64_t PrefixStore::numKeys() { return base_->numKeys(); }
void PrefixStore::append(std::string_view key, std::string_view value) { base_->append(k(key), value); }
void PrefixStore::multiSet(const std::vector<std::pair<std::string, std::string>>& entries) {
  std::vector<std::pair<std::string, std::string>> prefixed;
  prefixed.reserve(entries.size());
  for (const auto& [key, value] : entries) prefixed.emplace_back(k(key), value);
  base_->multiSet(prefixed);
}
std::vector<std::optional<std::string>> PrefixStore::multiGet(const std::vector<std::string>& keys) {
  return base_->multiGet(ks(keys));
}
std::vector<StoreResult> PrefixStore::batch(const std::vector<StoreOp>& ops) {
  std::vector<StoreOp> prefixed = ops;
  for (auto& op : prefixed) op.key = k(op.key);
  return base_->batch(prefixed);
}
std::shared_ptr<Store> PrefixStore::clone() {
  auto copy = std::make_shared<PrefixStore>(prefix_, base_->clone());
  copy->setTimeout(timeout_);
  return copy;
}

}  // namespace dtrain::rendezvous
