// The fingerprints of lib/common/hash.h: FNV-1a, 64 and 32 bit, checked against the published test vectors
// (http://www.isthe.com/chongo/tech/comp/fnv/). The 64-bit one's offset basis was once one digit short (hash.h).
#include <doctest/doctest.h>

#include "lib/common/hash.h"

TEST_CASE("fnv1a64 and fnv1a32 are FNV-1a: the published offset bases, primes and test vectors") {
  CHECK(dtrain::kFnv64Basis == 0xcbf29ce484222325ull);
  CHECK(dtrain::fnv1a64("") == 0xcbf29ce484222325ull);
  CHECK(dtrain::fnv1a64("a") == 0xaf63dc4c8601ec8cull);
  CHECK(dtrain::fnv1a64("foobar") == 0x85944171f73967e8ull);
  CHECK(dtrain::fnv1aHex("") == "cbf29ce484222325");
  CHECK(dtrain::fnv1aHex("job7/0/0/9") == "0f72cc2f2e022db1");  // 16 digits, leading zero kept
  CHECK(dtrain::fnv1a32("") == 0x811c9dc5u);
  CHECK(dtrain::fnv1a32("a") == 0xe40c292cu);
  CHECK(dtrain::fnv1a32("foobar") == 0xbf9cf968u);
}
