// Resolves one backend knob (TcpOptions, ShmOptions): the value set in the options, else the environment
// variable, else the default.
#pragma once

#include <cstdint>

namespace dtrain::comm {

// `value` >= 0 wins; else `envName` (a size such as 64K, or a plain integer) when set; else `fallback`.
// Throws UsageError on a malformed environment value.
int64_t tuned(int64_t value, const char* envName, int64_t fallback);

}  // namespace dtrain::comm
