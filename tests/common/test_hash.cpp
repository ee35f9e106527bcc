// The fingerprints of lib/common/hash.h. The 64-bit one is stored in every checkpoint (`spec_hash`, compared on
// resume) and names the data cache's files, so its values must never change: they are pinned here. It uses a
// non-standard offset basis (see hash.h); with FNV-1a's published basis it gives the published test vectors
// (http://www.isthe.com/chongo/tech/comp/fnv/), which checks the rest of the function. The 32-bit one is standard.
#include <doctest/doctest.h>

#include "lib/common/hash.h"

TEST_CASE("fnv1a64's values are pinned (checkpoints store them) and fnv1a32 is FNV-1a's") {
  CHECK(dtrain::fnv1a64("") == 0x14650FB0739D0383ull);
  CHECK(dtrain::fnv1aHex("") == "14650fb0739d0383");
  CHECK(dtrain::fnv1a64("a") == 0x44bd8ad473cd9906ull);
  CHECK(dtrain::fnv1aHex("job7/0/0/9") == "3be9bc56bdb6624b");
  // With the published basis: the published vectors (the multiply and xor steps are FNV-1a's).
  constexpr uint64_t published = 14695981039346656037ull;
  CHECK(dtrain::fnv1a64("", published) == 0xcbf29ce484222325ull);
  CHECK(dtrain::fnv1a64("a", published) == 0xaf63dc4c8601ec8cull);
  CHECK(dtrain::fnv1a64("foobar", published) == 0x85944171f73967e8ull);
  CHECK(dtrain::fnv1a32("") == 0x811c9dc5u);
  CHECK(dtrain::fnv1a32("a") == 0xe40c292cu);
  CHECK(dtrain::fnv1a32("foobar") == 0xbf9cf968u);
}
