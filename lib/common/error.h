// Errors that cross module boundaries, and the check macros that raise them.
//
// Every dtrain error carries the process exit code it maps to, so `main` stays a thin
// `catch (const dtrain::Error& e) { return e.exitCode(); }` and the codes documented in the README are
// decided where the failure is understood. The file:line of the check that fired is kept apart from the
// user-facing message (`where()`), so messages stay readable and debug logs still locate the source.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace dtrain {

// Process exit codes of `dtrain` (documented in README.md "Exit codes"). A failing worker's own code is
// passed through unchanged by `dtrain run`; these are the codes dtrain itself chooses.
enum class ExitCode : int {
  kOk = 0,
  kInternal = 1,       // an unexpected error inside dtrain
  kConfig = 2,         // invalid job/model file, missing dataset, bad --set
  kUsage = 3,          // invalid command line: unknown flag, bad value, contradicting flags
  kRendezvous = 4,     // rendezvous failed: timeout, store unreachable, nobody hosting it
  kAddressInUse = 5,   // cannot listen: port in use or address not local
  kProtocol = 6,       // store/peer speaks another protocol or version
  kComm = 7,           // a collective failed: peer lost, timeout
  kCheckpoint = 8,     // checkpoint cannot be written or is incompatible with the job
  kDiverged = 9,       // training diverged: a non-finite loss, gradient or weights (train.on_nonfinite)
  kNotExecutable = 126,
  kNotFound = 127,
};

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message, ExitCode code = ExitCode::kInternal)
      : std::runtime_error(message), code_(code) {}
  ExitCode code() const noexcept { return code_; }
  int exitCode() const noexcept { return static_cast<int>(code_); }
  // "file:line" of the check that raised it; empty when thrown directly.
  const std::string& where() const noexcept { return where_; }
  void setWhere(std::string where) { where_ = std::move(where); }

 private:
  ExitCode code_;
  std::string where_;
};

#define DTRAIN_DEFINE_ERROR(Name, Code)                                              \
  class Name : public Error {                                                        \
   public:                                                                           \
    explicit Name(const std::string& message, ExitCode code = Code) : Error(message, code) {} \
  }

DTRAIN_DEFINE_ERROR(ConfigError, ExitCode::kConfig);
DTRAIN_DEFINE_ERROR(UsageError, ExitCode::kUsage);
DTRAIN_DEFINE_ERROR(RendezvousError, ExitCode::kRendezvous);
DTRAIN_DEFINE_ERROR(NetworkError, ExitCode::kComm);       // connect/read/write failures
DTRAIN_DEFINE_ERROR(TimeoutError, ExitCode::kComm);       // a blocking call ran past its deadline
DTRAIN_DEFINE_ERROR(ProtocolError, ExitCode::kProtocol);  // malformed frame, bad magic/version
DTRAIN_DEFINE_ERROR(CommError, ExitCode::kComm);          // collective failure
DTRAIN_DEFINE_ERROR(CheckpointError, ExitCode::kCheckpoint);
DTRAIN_DEFINE_ERROR(DivergedError, ExitCode::kDiverged);  // non-finite loss/gradient/weights in training
DTRAIN_DEFINE_ERROR(NotBuiltError, ExitCode::kUsage);     // feature compiled out (e.g. nccl on CPU build)

#undef DTRAIN_DEFINE_ERROR

// An OS call failed; keeps errno.
class SystemError : public Error {
 public:
  SystemError(const std::string& message, int err, ExitCode code = ExitCode::kInternal);
  int err() const noexcept { return err_; }

 private:
  int err_;
};

namespace detail {
template <typename E>
[[noreturn]] void throwAt(const char* file, int line, const std::string& message) {
  E e(message);
  e.setWhere(fmt::format("{}:{}", file, line));
  throw e;
}
[[noreturn]] void throwSystem(const char* file, int line, const char* expr, int err);
}  // namespace detail

}  // namespace dtrain

// DTRAIN_CHECK(cond, "fmt {}", args...) throws dtrain::Error; DTRAIN_CHECK_AS picks the error type.
#define DTRAIN_CHECK_AS(ErrorType, cond, ...)                                                 \
  do {                                                                                       \
    if (!(cond)) [[unlikely]]                                                                \
      ::dtrain::detail::throwAt<ErrorType>(__FILE__, __LINE__, ::fmt::format(__VA_ARGS__));  \
  } while (0)
#define DTRAIN_CHECK(cond, ...) DTRAIN_CHECK_AS(::dtrain::Error, cond, __VA_ARGS__)
#define DTRAIN_THROW(ErrorType, ...) \
  ::dtrain::detail::throwAt<ErrorType>(__FILE__, __LINE__, ::fmt::format(__VA_ARGS__))

// DTRAIN_SYSCALL(expr): evaluates a POSIX call returning -1 on failure; throws SystemError with errno.
// EINTR is retried, since dtrain installs signal handlers and no caller wants a spurious failure.
#define DTRAIN_SYSCALL(expr)                                                      \
  ([&]() {                                                                        \
    for (;;) {                                                                    \
      auto dtrain_rc_ = (expr);                                                   \
      if (dtrain_rc_ != -1) return dtrain_rc_;                                    \
      if (errno != EINTR) ::dtrain::detail::throwSystem(__FILE__, __LINE__, #expr, errno); \
    }                                                                             \
  }())
