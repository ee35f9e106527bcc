// TCP store: every op through a real server on 127.0.0.1:0, blocking calls, timeouts, limits, server stop.
#include <doctest/doctest.h>

#include <fcntl.h>

#include <atomic>
#include <filesystem>
#include <thread>

#include "lib/common/error.h"
#include "rendezvous/prefix_store.h"
#include "rendezvous/tcp_store_client.h"
#include "rendezvous/tcp_store_server.h"
#include "tests/rendezvous/store_batch_contract.h"
#include "tests/rendezvous/store_test_util.h"

using namespace dtrain;
using namespace dtrain::rendezvous;
using namespace std::chrono_literals;

namespace {

std::unique_ptr<TcpStoreServer> startServer() {
  TcpStoreServerOptions o;
  o.host = "127.0.0.1";
  return TcpStoreServer::start(o);
}

std::shared_ptr<TcpStoreClient> client(const TcpStoreServer& server, Millis timeout = 30s) {
  TcpStoreClientOptions o;
  o.host = "127.0.0.1";
  o.port = server.port();
  o.connectTimeout = 10s;
  o.timeout = timeout;
  return TcpStoreClient::connect(o);
}

}  // namespace

TEST_CASE("tcp store: every op") {
  auto server = startServer();
  REQUIRE(server->port() != 0);
  auto s = client(*server);
  s->ping();
  s->set("a", "1");
  CHECK(s->get("a", 1s) == "1");
  CHECK(s->get("a") == "1");  // default timeout overload
  s->set("a", "2");           // overwrite
  CHECK(s->tryGet("a") == "2");
  CHECK_FALSE(s->tryGet("missing").has_value());

  CHECK(s->add("n", 5) == 5);  // missing key counts as 0
  CHECK(s->add("n", -7) == -2);
  CHECK(s->get("n", 1s) == "-2");

  CHECK(s->compareSet("c", "", "x") == "x");   // missing key matches empty expected
  CHECK(s->compareSet("c", "y", "z") == "x");  // mismatch: current value, unchanged
  CHECK(s->compareSet("c", "x", "z") == "z");
  CHECK(s->compareSet("d", "nonempty", "v") == "");  // missing key, non-empty expected: not created
  CHECK_FALSE(s->tryGet("d").has_value());

  s->append("log", "ab");
  s->append("log", "cd");
  CHECK(s->get("log", 1s) == "abcd");

  CHECK(s->check({"a", "n", "c"}));
  CHECK_FALSE(s->check({"a", "missing"}));
  CHECK(s->check({}));
  CHECK(s->wait({"a", "n"}, 1s));

  CHECK(s->numKeys() == 4);  // a n c log
  CHECK(s->remove("a"));
  CHECK_FALSE(s->remove("a"));
  CHECK(s->numKeys() == 3);

  // Keys and values are bytes: NULs and empty values survive.
  std::string bin("k\0ey", 4), val("\0\x01\xff", 3);
  s->set(bin, val);
  CHECK(s->get(bin, 1s) == val);
  s->set("empty", "");
  CHECK(s->tryGet("empty") == std::string());

  // add on a non-integer value is an error reply; the connection stays usable.
  CHECK_THROWS_WITH_AS(s->add("log", 1), doctest::Contains("not an integer"), Error);
  CHECK(s->get("n", 1s) == "-2");
}

TEST_CASE("tcp store: large values round-trip") {
  auto server = startServer();
  auto s = client(*server);
  std::string big(8u << 20, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 7 + 3);
  s->set("big", big);
  CHECK(s->get("big", 5s) == big);
  s->append("big", "tail");
  CHECK(s->tryGet("big")->size() == big.size() + 4);
  s->set("small", "x");  // buffers shrink back and keep working
  CHECK(s->get("small", 1s) == "x");
}

TEST_CASE("tcp store: blocking get and wait are woken from another client") {
  auto server = startServer();
  auto waiter = client(*server);
  auto writer = client(*server);

  std::string got;
  std::thread t([&] { got = waiter->get("ready", 20s); });
  // The get is parked server-side before the writer sets the key: the wake-up path is exercised, not luck.
  REQUIRE(testing::eventually([&] { return server->stats().waiters == 1; }, 10s));
  writer->set("ready", "go");
  t.join();
  CHECK(got == "go");

  // WAIT on several keys completes only when all exist; add, compareSet and append each wake it.
  std::atomic<bool> done{false};
  bool result = false;
  std::thread w([&] {
    result = waiter->wait({"k1", "k2", "k3"}, 20s);
    done = true;
  });
  REQUIRE(testing::eventually([&] { return server->stats().waiters == 1; }, 10s));
  writer->add("k1", 1);
  writer->compareSet("k2", "", "v");
  CHECK(writer->check({"k1", "k2"}));
  CHECK(server->stats().waiters == 1);  // still parked: k3 is missing
  CHECK_FALSE(done.load());
  writer->append("k3", "x");
  w.join();
  CHECK(result);
  CHECK(server->stats().waiters == 0);
}

TEST_CASE("tcp store: many waiters on one key all wake") {
  auto server = startServer();
  auto writer = client(*server);
  constexpr int kWaiters = 32;
  std::vector<std::thread> threads;
  std::atomic<int> woke{0};
  for (int i = 0; i < kWaiters; ++i)
    threads.emplace_back([&] {
      auto c = client(*server);
      if (c->get("event", 20s) == "done") ++woke;
    });
  REQUIRE(testing::eventually([&] { return server->stats().waiters == kWaiters; }, 10s));
  writer->set("event", "done");
  for (auto& t : threads) t.join();
  CHECK(woke == kWaiters);
}

TEST_CASE("tcp store: get times out with TimeoutError, wait returns false, connection stays usable") {
  auto server = startServer();
  auto s = client(*server);
  CHECK_THROWS_WITH_AS(s->get("nope", 50ms), doctest::Contains("get('nope') timed out"), TimeoutError);
  CHECK_FALSE(s->wait({"nope"}, 50ms));
  CHECK_FALSE(s->wait({"nope"}, 0ms));
  CHECK_THROWS_AS(s->get("nope", 0ms), TimeoutError);
  CHECK(server->stats().waiters == 0);
  s->set("after", "1");
  CHECK(s->get("after", 1s) == "1");
}

TEST_CASE("tcp store: key and value limits give errors") {
  auto server = startServer();
  auto s = client(*server);
  std::string longKey(kMaxKeyBytes + 1, 'k');
  CHECK_THROWS_WITH_AS(s->set(longKey, "v"), doctest::Contains("exceeds the limit"), Error);
  CHECK_THROWS_AS(s->get(longKey, 10ms), Error);
  CHECK_THROWS_AS(s->add(longKey, 1), Error);
  std::string tooBig(kMaxValueBytes + 1, 'v');
  CHECK_THROWS_WITH_AS(s->set("k", tooBig), doctest::Contains("exceeds the limit"), Error);

  // The server enforces the limits too (a client that skips the check gets an error reply, not a crash).
  testing::RawConn raw(server->port());
  REQUIRE(raw.handshake());
  std::string body;
  ByteWriter w(body);
  w.put<uint8_t>(static_cast<uint8_t>(proto::Op::kSet));
  w.putBytes(longKey);
  w.putBytes("v");
  raw.send(testing::frame(body));
  auto reply = raw.recvFrame();
  REQUIRE(!reply.empty());
  CHECK(reply[0] == static_cast<char>(proto::Status::kError));
  CHECK(reply.find("exceeds the limit") != std::string::npos);
  raw.send(testing::frame(std::string(1, static_cast<char>(proto::Op::kPing))));  // still open
  auto pong = raw.recvFrame();
  REQUIRE(pong.size() == 1);
  CHECK(pong[0] == static_cast<char>(proto::Status::kOk));

  // Appending past the value limit is refused server-side.
  s->set("grow", std::string(kMaxValueBytes, 'a'));
  CHECK_THROWS_WITH_AS(s->append("grow", "b"), doctest::Contains("exceed the value limit"), Error);
  CHECK(s->tryGet("grow")->size() == kMaxValueBytes);
}

TEST_CASE("tcp store: server stop fails blocked clients promptly and later calls fail fast") {
  auto server = startServer();
  auto s = client(*server, 60s);
  auto other = client(*server, 60s);
  std::string error;
  std::thread t([&] {
    try {
      s->get("never", 60s);
    } catch (const NetworkError& e) {
      error = e.what();
    }
  });
  REQUIRE(testing::eventually([&] { return server->stats().waiters == 1; }, 10s));
  auto start = Clock::now();
  server->stop();
  t.join();
  CHECK(secondsSince(start) < 10.0);  // a hang would be the 60 s timeout
  CHECK(error.find("127.0.0.1:" + std::to_string(server->port())) != std::string::npos);
  CHECK(error.find("during get('never')") != std::string::npos);
  // An idle connection learns it on its next call, and a broken one keeps failing fast.
  CHECK_THROWS_AS(other->set("x", "1"), NetworkError);
  CHECK_THROWS_WITH_AS(other->set("x", "1"), doctest::Contains("unusable after an earlier error"), NetworkError);
  server->stop();  // idempotent
}

TEST_CASE("tcp store: a second server on the same port fails with kAddressInUse naming host:port") {
  auto server = startServer();
  TcpStoreServerOptions o;
  o.host = "127.0.0.1";
  o.port = server->port();
  try {
    TcpStoreServer::start(o);
    FAIL("second server started on a busy port");
  } catch (const Error& e) {
    CHECK(e.code() == ExitCode::kAddressInUse);
    CHECK(std::string(e.what()).find("127.0.0.1:" + std::to_string(o.port)) != std::string::npos);
    CHECK(std::string(e.what()).find("in use") != std::string::npos);
  }
  auto s = client(*server);  // the first one still serves
  s->ping();
}

TEST_CASE("tcp store: clone opens an independent connection; prefix store over tcp") {
  auto server = startServer();
  auto s = client(*server);
  auto c = s->clone();
  CHECK(c.get() != s.get());
  CHECK(server->stats().connectionsOpen == 2);
  c->set("shared", "yes");
  CHECK(s->get("shared", 1s) == "yes");
  PrefixStore p("/run/", s);
  p.set("k", "v");
  CHECK(s->get("/run/k", 1s) == "v");
  CHECK(p.get("k", 1s) == "v");
}

TEST_CASE("tcp store: connectStore parses host:port") {
  auto server = startServer();
  auto s = connectStore("127.0.0.1:" + std::to_string(server->port()), 5s);
  s->set("x", "1");
  CHECK(s->get("x", 1s) == "1");
  CHECK_THROWS_AS(connectStore("127.0.0.1:notaport", 1s), UsageError);
  CHECK_THROWS_AS(connectStore("", 1s), UsageError);
}

TEST_CASE("tcp store: every descriptor is close-on-exec (the agent forks workers while hosting the store)") {
  auto server = startServer();
  auto s = client(*server);
  auto c = s->clone();
  s->set("k", "v");
  int sockets = 0;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    int fd = std::stoi(entry.path().filename().string());
    std::error_code ec;
    auto target = std::filesystem::read_symlink(entry.path(), ec).string();
    if (ec || (target.rfind("socket:", 0) != 0 && target.find("anon_inode") == std::string::npos)) continue;
    int flags = ::fcntl(fd, F_GETFD);
    if (flags < 0) continue;  // the directory iterator's own fd, already closed
    ++sockets;
    CHECK_MESSAGE((flags & FD_CLOEXEC) != 0, "fd ", fd, " (", target, ") is inheritable");
  }
  CHECK(sockets >= 5);  // listener, 2 accepted, 2 client ends
}

TEST_CASE("tcp store: multiSet and multiGet are pipelined batches with set/tryGet semantics") {
  auto server = startServer();
  auto s = client(*server);
  // More entries than one pipelined chunk (512), values of mixed sizes (a reply may span receives).
  std::vector<std::pair<std::string, std::string>> entries;
  for (int i = 0; i < 1300; ++i)
    entries.emplace_back(fmt::format("k{}", i), std::string(static_cast<size_t>(i % 7 == 0 ? 40000 : i), 'a' + i % 26));
  const auto before = server->stats().requests;
  s->multiSet(entries);
  CHECK(server->stats().requests - before == entries.size());  // one request per entry, same as set()
  for (int i : {0, 1, 511, 512, 1299}) CHECK(s->get(fmt::format("k{}", i), 1s) == entries[static_cast<size_t>(i)].second);

  std::vector<std::string> keys{"k1299", "missing", "k0"};
  for (int i = 0; i < 1000; ++i) keys.push_back(fmt::format("k{}", (i * 7) % 1300));
  auto values = s->multiGet(keys);
  REQUIRE(values.size() == keys.size());
  CHECK(values[0] == entries[1299].second);
  CHECK_FALSE(values[1].has_value());
  CHECK(values[2] == entries[0].second);
  for (int i = 0; i < 1000; ++i) CHECK(values[3 + static_cast<size_t>(i)] == entries[static_cast<size_t>((i * 7) % 1300)].second);
  CHECK(s->multiGet({}).empty());
  s->multiSet({});

  // Through a prefix store: the keys are prefixed, still one batch.
  PrefixStore p("/run/", s);
  p.multiSet({{"x", "1"}, {"y", "2"}});
  CHECK(s->get("/run/y", 1s) == "2");
  CHECK(p.multiGet({"x", "z"}) == std::vector<std::optional<std::string>>{std::string("1"), std::nullopt});
  s->ping();  // the connection is in step after the batches
}

TEST_CASE("tcp store: a refused entry of a batch is an error and the connection stays in step") {
  TcpStoreServerOptions o;
  o.host = "127.0.0.1";
  o.limits.maxKeys = 600;
  auto server = TcpStoreServer::start(o);
  auto s = client(*server);
  std::vector<std::pair<std::string, std::string>> entries;
  for (int i = 0; i < 700; ++i) entries.emplace_back(fmt::format("k{}", i), "v");
  CHECK_THROWS_WITH_AS(s->multiSet(entries), doctest::Contains("max-keys"), Error);
  // The first chunk (512) was applied; the second was refused from key 600 on; later calls are answered in step.
  CHECK(s->tryGet("k511") == "v");
  CHECK(s->numKeys() == 600);
  CHECK(s->multiGet({"k0", "k650"}) == std::vector<std::optional<std::string>>{std::string("v"), std::nullopt});
  s->set("k0", "again");
  CHECK(s->get("k0", 1s) == "again");
}

TEST_CASE("tcp store: batch pipelines mixed operations in one round trip, a parked get included") {
  auto server = startServer();
  auto s = client(*server);
  auto other = client(*server);
  testing::checkBatchContract(*s, *other);

  // One round trip (one reply write by the server) for a heartbeat-shaped batch: a set and three reads.
  s->set("hb/1", "0");
  const auto trips = s->roundTrips();
  const auto writes = server->stats().replyWrites;
  const auto requests = server->stats().requests;
  auto r = s->batch({StoreOp::set("hb/0", "1"), StoreOp::tryGet("hb/1"), StoreOp::tryGet("hb/2"),
                     StoreOp::tryGet("hb/0")});
  CHECK(s->roundTrips() - trips == 1);
  CHECK(server->stats().requests - requests == 4);
  CHECK(server->stats().replyWrites - writes == 1);
  CHECK(r[1].value == "0");
  CHECK_FALSE(r[2].value.has_value());
  CHECK(r[3].value == "1");

  // A refused op is an error after every reply was read: the ops around it ran, the connection is in step.
  CHECK_THROWS_WITH_AS(s->batch({StoreOp::set("e/1", "a"), StoreOp::add("e/1", 1), StoreOp::set("e/2", "b")}),
                       doctest::Contains("not an integer"), Error);
  CHECK(s->tryGet("e/2") == "b");
  CHECK_THROWS_AS(s->batch({StoreOp::set(std::string(kMaxKeyBytes + 1, 'k'), "v")}), Error);  // refused locally
  s->ping();
}
