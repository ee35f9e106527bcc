// SHA-256 against the FIPS 180-4 example vectors (NIST CSRC "Examples with intermediate values") and
// HMAC-SHA-256 against RFC 4231's test cases.
#include <doctest/doctest.h>

#include "lib/common/sha256.h"

using namespace dtrain;

TEST_CASE("sha256: FIPS 180-4 example vectors") {
  CHECK(sha256::hex(sha256::hash("abc")) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(sha256::hex(sha256::hash("")) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(sha256::hex(sha256::hash("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")) ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  CHECK(sha256::hex(sha256::hash(std::string(1000000, 'a'))) ==
        "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST_CASE("sha256: HMAC-SHA-256, RFC 4231 test cases 1, 2 and 6") {
  CHECK(sha256::hex(sha256::hmac(std::string(20, '\x0b'), "Hi There")) ==
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
  CHECK(sha256::hex(sha256::hmac("Jefe", "what do ya want for nothing?")) ==
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  CHECK(sha256::hex(sha256::hmac(std::string(131, '\xaa'), "Test Using Larger Than Block-Size Key - Hash Key First")) ==
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
  CHECK(sha256::equal(sha256::hash("x"), sha256::hash("x")));
  CHECK_FALSE(sha256::equal(sha256::hash("x"), sha256::hash("y")));
}
