#include "rendezvous/store.h"

#include "lib/common/error.h"

#include <exception>

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

std::vector<StoreResult> Store::batch(const std::vector<StoreOp>& ops) {
  std::vector<StoreResult> results(ops.size());
  std::exception_ptr first;
  for (size_t i = 0; i < ops.size(); ++i) {
    const auto& op = ops[i];
    auto& r = results[i];
    try {
      switch (op.kind) {
        case StoreOp::Kind::kSet: set(op.key, op.value); break;
        case StoreOp::Kind::kTryGet: r.value = tryGet(op.key); break;
        case StoreOp::Kind::kGet:
          try {
            r.value = get(op.key, op.timeout);
          } catch (const TimeoutError&) {
            r.value.reset();  // a timed-out get is a result in a batch
          }
          break;
        case StoreOp::Kind::kAdd: r.number = add(op.key, op.delta); break;
        case StoreOp::Kind::kCompareSet: r.value = compareSet(op.key, op.expected, op.value); break;
        case StoreOp::Kind::kAppend: append(op.key, op.value); break;
        case StoreOp::Kind::kRemove: r.number = remove(op.key) ? 1 : 0; break;
      }
    } catch (const NetworkError&) {
      throw;  // the store is gone: the other ops cannot be sent either
    } catch (const Error&) {
      if (!first) first = std::current_exception();
    }
  }
  if (first) std::rethrow_exception(first);
  return results;
}

}  // namespace dtrain::rendezvous
