// Internal to lib/ckpt: the names inside a checkpoint root and a guard that turns std::filesystem and JSON
// exceptions into CheckpointError, so callers only ever see dtrain errors.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include "lib/common/error.h"

namespace dtrain::ckpt {

inline constexpr const char* kMetaFile = "meta.json";
inline constexpr const char* kManifestFile = "manifest.json";
inline constexpr const char* kMarkerFile = "COMMITTED";
inline constexpr const char* kMetaFormat = "dtrain-checkpoint";
inline constexpr const char* kManifestFormat = "dtrain-checkpoint-manifest";
inline constexpr const char* kStagingInfix = ".tmp-";      // step-<N>.tmp-<token>
inline constexpr const char* kReplacedInfix = ".replaced-";  // step-<N>.replaced-<token>
inline constexpr const char* kTempInfix = ".tmp-";         // .<file>.tmp-<pid> inside a staging dir

inline std::string stagingDirName(int64_t step, const std::string& token) {
  return fmt::format("step-{:09d}{}{}", step, kStagingInfix, token);
}
inline std::string replacedDirName(int64_t step, const std::string& token) {
  return fmt::format("step-{:09d}{}{}", step, kReplacedInfix, token);
}
// ".<file>.rec": a file's size and crc32 as its writer computed them, until commit() folds it into the manifest.
inline std::string recordName(const std::string& file) { return "." + file + ".rec"; }

enum class DirKind : uint8_t { kFinal, kStaging, kReplaced };
struct ParsedName {
  int64_t step;
  DirKind kind;
};
// "step-000000123" / "step-000000123.tmp-<token>" / "step-000000123.replaced-<token>"; nullopt for anything else,
// which dtrain never touches.
inline std::optional<ParsedName> parseDirName(const std::string& name) {
  if (name.rfind("step-", 0) != 0) return std::nullopt;
  size_t i = 5;
  int64_t step = 0;
  while (i < name.size() && name[i] >= '0' && name[i] <= '9' && i < 24) step = step * 10 + (name[i++] - '0');
  if (i == 5) return std::nullopt;
  const std::string rest = name.substr(i);
  if (rest.empty()) return ParsedName{step, DirKind::kFinal};
  const std::string staging = kStagingInfix, replaced = kReplacedInfix;
  if (rest.size() > staging.size() && rest.rfind(staging, 0) == 0) return ParsedName{step, DirKind::kStaging};
  if (rest.size() > replaced.size() && rest.rfind(replaced, 0) == 0) return ParsedName{step, DirKind::kReplaced};
  return std::nullopt;
}

// Runs fn, converting filesystem and JSON exceptions into CheckpointError prefixed with `what`.
template <typename F>
auto guarded(const std::string& what, F&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const std::filesystem::filesystem_error& e) {
    throw CheckpointError(fmt::format("{}: {}", what, e.what()));
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(fmt::format("{}: {}", what, e.what()));
  }
}

}  // namespace dtrain::ckpt
