#include "lib/comm/tuning.h"

#include "lib/common/env.h"
#include "lib/common/error.h"
#include "lib/common/parse.h"

namespace dtrain::comm {

int64_t tuned(int64_t value, const char* envName, int64_t fallback) {
  if (value >= 0) return value;
  auto v = env::get(envName);
  if (!v || v->empty()) return fallback;
  auto parsed = parse::toBytes(*v);
  DTRAIN_CHECK_AS(UsageError, parsed.has_value(), "environment variable {}={}: expected a size such as 65536 or 64K",
                  envName, *v);
  return static_cast<int64_t>(*parsed);
}

}  // namespace dtrain::comm
