#include "lib/comm/tuning.h"

#include "lib/common/env.h"

namespace dtrain::comm {

int64_t tuned(int64_t value, const char* envName, int64_t fallback) {
  if (value >= 0) return value;
  return static_cast<int64_t>(env::getBytes(envName, static_cast<uint64_t>(fallback)));
}

}  // namespace dtrain::comm
