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

}  // namespace dtrain::rendezvous
