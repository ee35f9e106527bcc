#include <doctest/doctest.h>

#include <cstdlib>
#include <functional>

#include "lib/common/bytes.h"
#include "lib/common/env.h"
#include "lib/common/error.h"
#include "lib/common/net.h"
#include "lib/common/parse.h"

using namespace dtrain;

TEST_CASE("sizes parse with binary multiples, as nccl-tests does") {
  CHECK(parse::toBytes("1024") == 1024u);
  CHECK(parse::toBytes("1K") == 1024u);
  CHECK(parse::toBytes("64M") == 64u << 20);
  CHECK(parse::toBytes("2GiB") == 2ull << 30);
  CHECK_FALSE(parse::toBytes("12Q").has_value());
  CHECK_FALSE(parse::toBytes("").has_value());
}

TEST_CASE("durations default to seconds and accept units") {
  using std::chrono::milliseconds;
  CHECK(parse::toDuration("30") == milliseconds(30000));
  CHECK(parse::toDuration("500ms") == milliseconds(500));
  CHECK(parse::toDuration("1.5s") == milliseconds(1500));
  CHECK(parse::toDuration("2m") == milliseconds(120000));
  CHECK_FALSE(parse::toDuration("soon").has_value());
}

TEST_CASE("integers reject trailing junk") {
  CHECK(parse::toInt("42") == 42);
  CHECK(parse::toInt("-7") == -7);
  CHECK_FALSE(parse::toInt("4x").has_value());
  CHECK_FALSE(parse::toInt("").has_value());
}

TEST_CASE("host:port parsing with default port and IPv6 brackets") {
  auto a = net::parseHostPort("node1", 29400);
  REQUIRE(a);
  CHECK(a->host == "node1");
  CHECK(a->port == 29400);
  auto b = net::parseHostPort("127.0.0.1:1234", 29400);
  REQUIRE(b);
  CHECK(b->port == 1234);
  auto c = net::parseHostPort("[::1]:80", 1);
  REQUIRE(c);
  CHECK(c->host == "::1");
  CHECK(c->str() == "[::1]:80");
  CHECK_FALSE(net::parseHostPort("host:99999", 1).has_value());
  CHECK_FALSE(net::parseHostPort(":80", 1).has_value());
}

TEST_CASE("IPv6 endpoints: written bracketed by joinHostPort, read back; a port after a bare IPv6 address is refused") {
  CHECK(net::joinHostPort("::1", 29400) == "[::1]:29400");
  CHECK(net::joinHostPort("fe80::1%eth0", 80) == "[fe80::1%eth0]:80");
  CHECK(net::joinHostPort("[::1]", 29400) == "[::1]:29400");  // given bracketed: not bracketed twice
  CHECK(net::joinHostPort("10.0.0.1", 29400) == "10.0.0.1:29400");
  CHECK(net::joinHostPort("node0", 1) == "node0:1");
  auto back = net::parseHostPort(net::joinHostPort("::1", 29400), 1);
  REQUIRE(back);
  CHECK(back->host == "::1");
  CHECK(back->port == 29400);
  auto bare = net::parseHostPort("::1", 29400);  // a bare IPv6 address takes the default port
  REQUIRE(bare);
  CHECK(bare->host == "::1");
  CHECK(bare->port == 29400);
  CHECK(net::parseHostPort("fe80::1%eth0", 5).has_value());
  // "::1:29400" was taken as a host named "::1:29400" on the default port, and failed at connect.
  CHECK_FALSE(net::parseHostPort("::1:29400", 1).has_value());
  CHECK_FALSE(net::parseHostPort("node0:29400:1", 1).has_value());
}

TEST_CASE("byte coding round-trips and a short buffer is a protocol error") {
  std::string buf;
  ByteWriter w(buf);
  w.put<uint32_t>(0xdeadbeef);
  w.putBytes("hello");
  w.put<int64_t>(-5);
  ByteReader r(buf);
  CHECK(r.get<uint32_t>() == 0xdeadbeef);
  CHECK(r.getBytes() == "hello");
  CHECK(r.get<int64_t>() == -5);
  CHECK(r.done());
  ByteReader shortReader(std::string_view(buf).substr(0, 6));
  shortReader.get<uint32_t>();
  CHECK_THROWS_AS(shortReader.getBytes(), ProtocolError);
}

TEST_CASE("flags and environment variables share one duration and size reader and one wording") {
  using std::chrono::milliseconds;
  CHECK(parse::durationFlag("--timeout", "5m") == milliseconds(300000));
  CHECK(parse::durationFlag("--grace", "0") == milliseconds(0));
  CHECK(parse::bytesFlag("--size", "64K", true) == 65536u);
  auto usage = [](const std::function<void()>& fn) -> std::string {
    try {
      fn();
    } catch (const UsageError& e) {
      return e.what();
    }
    return "(no UsageError)";
  };
  CHECK(usage([] { parse::durationFlag("--rdzv-timeout", "5x"); }) ==
        "--rdzv-timeout 5x: expected a duration such as 30, 30s, 500ms or 2m");
  CHECK(usage([] { parse::durationFlag("--budget", "0", true); }) ==
        "--budget 0: expected a positive duration such as 30, 30s, 500ms or 2m");
  CHECK(usage([] { parse::bytesFlag("--size", "12Q", true); }) ==
        "--size 12Q: expected a positive size such as 65536, 64K or 1G");
  CHECK(usage([] { parse::durationOrThrow("x", "environment variable T=x"); }) ==
        "environment variable T=x: expected a duration such as 30, 30s, 500ms or 2m");
  ::setenv("DTRAIN_TEST_BYTES", "2M", 1);
  CHECK(env::getBytes("DTRAIN_TEST_BYTES", 1) == 2u << 20);
  ::setenv("DTRAIN_TEST_BYTES", "lots", 1);
  CHECK(usage([] { env::getBytes("DTRAIN_TEST_BYTES", 1); }) ==
        "environment variable DTRAIN_TEST_BYTES=lots: expected a size such as 65536, 64K or 1G");
  ::unsetenv("DTRAIN_TEST_BYTES");
  CHECK(env::getBytes("DTRAIN_TEST_BYTES", 7) == 7u);
}

TEST_CASE("net::isLoopback: loopback literals and localhost, not wildcards or other addresses") {
  CHECK(net::isLoopback("127.0.0.1"));
  CHECK(net::isLoopback("127.0.0.2"));
  CHECK(net::isLoopback("::1"));
  CHECK(net::isLoopback("localhost"));
  CHECK_FALSE(net::isLoopback("0.0.0.0"));
  CHECK_FALSE(net::isLoopback("::"));
  CHECK_FALSE(net::isLoopback(""));
  CHECK_FALSE(net::isLoopback("10.1.2.3"));
  CHECK_FALSE(net::isLoopback("no-such-host.invalid"));
}
