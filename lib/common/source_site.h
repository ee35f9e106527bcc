// The call site an error message names: "lib/gpu/memory.cpp:31" from __FILE__ and __LINE__, the path from the
// repository root whatever directory the build ran in. Used by the CUDA/NCCL check macros (lib/gpu/check.h) and
// the nccl backend's failures (lib/comm/nccl/nccl_wait.h), whose messages end with " (<file>:<line>)" so a
// worker's one-line error locates the call without a debug log. Header-only, no CUDA; thread-safe (pure).
#pragma once

#include <fmt/format.h>

#include <string>
#include <string_view>

namespace dtrain::detail {

// The path from the last lib/, apps/ or tests/ folder of `file` (absolute or ../ paths alike), then ":line"; a path
// without one of those folders is kept as given.
inline std::string sourceSite(const char* file, int line) {
  std::string_view f(file);
  size_t from = std::string_view::npos;
  for (std::string_view root : {"/lib/", "/apps/", "/tests/"})
    if (const size_t at = f.rfind(root); at != std::string_view::npos && (from == std::string_view::npos || at > from))
      from = at;
  if (from != std::string_view::npos) f.remove_prefix(from + 1);
  return ::fmt::format("{}:{}", f, line);
}

}  // namespace dtrain::detail
