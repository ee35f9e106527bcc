#include "rendezvous/store.h"

#include "lib/common/error.h"

namespace dtrain::rendezvous {

void checkKey(std::string_view key) {
  DTRAIN_CHECK(key.size() <= kMaxKeyBytes, "store key of {} bytes exceeds the limit of {} bytes", key.size(),
               kMaxKeyBytes);
}

void checkValue(std::string_view value) {
  DTRAIN_CHECK(value.size() <= kMaxValueBytes, "store value of {} bytes exceeds the limit of {} bytes",
               value.size(), kMaxValueBytes);
}

void Store::multiSet(const std::vector<std::pair<std::string, std::string>>& entries) {
  for (const auto& [key, value] : entries) set(key, value);
}

std::vector<std::optional<std::string>> Store::multiGet(const std::vector<std::string>& keys) {
  std::vector<std::optional<std::string>> values;
  values.reserve(keys.size());
  for (const auto& key : keys) values.push_back(tryGet(key));
  return values;
}

}  // namespace dtrain::rendezvous
