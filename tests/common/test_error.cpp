#include <doctest/doctest.h>

#include <unistd.h>

#include "lib/common/error.h"

using namespace dtrain;

TEST_CASE("check macros carry the exit code and the place they fired") {
  try {
    DTRAIN_CHECK_AS(ConfigError, 1 + 1 == 3, "field {} is {}", "/train/epochs", -1);
    FAIL("expected a throw");
  } catch (const ConfigError& e) {
    CHECK(std::string(e.what()) == "field /train/epochs is -1");
    CHECK(e.exitCode() == 2);
    CHECK(e.where().find("test_error.cpp:") != std::string::npos);
  }
}

TEST_CASE("syscall wrapper throws SystemError with errno") {
  CHECK_THROWS_AS(DTRAIN_SYSCALL(::close(-1)), SystemError);
  try {
    DTRAIN_SYSCALL(::close(-1));
  } catch (const SystemError& e) {
    CHECK(e.err() == EBADF);
  }
}
