// TCP store under abuse: bad handshakes, malformed frames, peers that are not stores, 512 connections.
#include <doctest/doctest.h>

#include <latch>
#include <thread>

#include "lib/common/error.h"
#include "lib/common/net.h"
#include "lib/common/socket.h"
#include "rendezvous/tcp_store_client.h"
#include "rendezvous/tcp_store_server.h"
#include "tests/rendezvous/store_test_util.h"

using namespace dtrain;
using namespace dtrain::rendezvous;
using namespace std::chrono_literals;
using dtrain::testing::frame;
using dtrain::testing::RawConn;

namespace {

std::unique_ptr<TcpStoreServer> startServer() {
  TcpStoreServerOptions o;
  o.host = "127.0.0.1";
  return TcpStoreServer::start(o);
}

TcpStoreClientOptions clientOptions(uint16_t port, Millis connectTimeout = 10s) {
  TcpStoreClientOptions o;
  o.host = "127.0.0.1";
  o.port = port;
  o.connectTimeout = connectTimeout;
  o.timeout = 30s;
  return o;
}

std::string op(proto::Op o) { return std::string(1, static_cast<char>(o)); }

// A listening socket that accepts connections into its backlog and never says a word.
struct SilentListener {
  SilentListener() {
    auto listener = net::listen("127.0.0.1", 0);
    fd = listener.socket.release();
    port = listener.port;
  }
  ~SilentListener() { ::close(fd); }
  // Accepts one connection, writes `answer`, and closes it.
  void answerOnce(const std::string& answer) {
    int c = ::accept4(fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) return;
    char buf[16];
    (void)!::recv(c, buf, sizeof(buf), 0);  // the client's hello
    (void)!::send(c, answer.data(), answer.size(), MSG_NOSIGNAL);
    ::close(c);
  }
  int fd = -1;
  uint16_t port = 0;
};

// After each abuse the server must still serve a well-behaved client.
void checkStillServes(const TcpStoreServer& server) {
  auto c = TcpStoreClient::connect(clientOptions(server.port()));
  c->set("alive", "yes");
  CHECK(c->get("alive", 1s) == "yes");
}

}  // namespace

TEST_CASE("store robustness: garbage instead of a handshake closes that connection only") {
  auto server = startServer();
  auto good = TcpStoreClient::connect(clientOptions(server->port()));
  RawConn raw(server->port());
  raw.send("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
  auto reply = raw.recvExactly(proto::kHandshakeReplyBytes);
  REQUIRE(reply.size() == proto::kHandshakeReplyBytes);
  CHECK(reply.substr(0, 4) == "DTRS");
  CHECK(reply[6] == static_cast<char>(proto::HandshakeStatus::kBadMagic));
  CHECK(raw.closedByPeer());
  good->set("k", "v");  // the existing connection was not disturbed
  CHECK(good->get("k", 1s) == "v");
  CHECK(server->stats().protocolErrors == 1);
  checkStillServes(*server);
}

TEST_CASE("store robustness: wrong protocol version gets a clear reply and a close") {
  auto server = startServer();
  RawConn raw(server->port());
  std::string hello;
  proto::putHandshake(hello, proto::kVersion + 1);
  raw.send(hello);
  auto reply = raw.recvExactly(proto::kHandshakeReplyBytes);
  REQUIRE(reply.size() == proto::kHandshakeReplyBytes);
  ByteReader r(std::string_view(reply).substr(4));
  CHECK(r.get<uint16_t>() == proto::kVersion);
  CHECK(r.get<uint8_t>() == static_cast<uint8_t>(proto::HandshakeStatus::kBadVersion));
  CHECK(raw.closedByPeer());
  checkStillServes(*server);
}

TEST_CASE("store robustness: malformed frames close that connection, the server keeps serving") {
  auto server = startServer();
  auto good = TcpStoreClient::connect(clientOptions(server->port()));

  SUBCASE("oversized frame length") {
    RawConn raw(server->port());
    REQUIRE(raw.handshake());
    std::string header;
    ByteWriter(header).put<uint32_t>(static_cast<uint32_t>(proto::kMaxFrameBytes + 1));
    raw.send(header);
    auto reply = raw.recvFrame();
    REQUIRE(!reply.empty());
    CHECK(reply[0] == static_cast<char>(proto::Status::kError));
    CHECK(reply.find("exceeds the limit") != std::string::npos);
    CHECK(raw.closedByPeer());
  }
  SUBCASE("unknown op") {
    RawConn raw(server->port());
    REQUIRE(raw.handshake());
    raw.send(frame(std::string(1, static_cast<char>(200))));
    auto reply = raw.recvFrame();
    REQUIRE(!reply.empty());
    CHECK(reply.find("unknown op 200") != std::string::npos);
    CHECK(raw.closedByPeer());
  }
  SUBCASE("field truncated inside a complete frame") {
    RawConn raw(server->port());
    REQUIRE(raw.handshake());
    std::string body = op(proto::Op::kSet);
    ByteWriter(body).put<uint32_t>(1000);  // key length 1000, but the frame ends here
    body += "abc";
    raw.send(frame(body));
    auto reply = raw.recvFrame();
    REQUIRE(!reply.empty());
    CHECK(reply.find("truncated") != std::string::npos);
    CHECK(raw.closedByPeer());
  }
  SUBCASE("trailing bytes after the fields") {
    RawConn raw(server->port());
    REQUIRE(raw.handshake());
    raw.send(frame(op(proto::Op::kNumKeys) + "junk"));
    auto reply = raw.recvFrame();
    REQUIRE(!reply.empty());
    CHECK(reply.find("trailing") != std::string::npos);
    CHECK(raw.closedByPeer());
  }
  SUBCASE("empty frame") {
    RawConn raw(server->port());
    REQUIRE(raw.handshake());
    raw.send(frame(""));
    CHECK(raw.closedByPeer());
  }
  SUBCASE("frame cut off by a disconnect") {
    RawConn raw(server->port());
    REQUIRE(raw.handshake());
    std::string partial = frame(op(proto::Op::kSet) + std::string(100, 'x'));
    raw.send(partial.substr(0, 20));
    raw.closeNow();
    REQUIRE(testing::eventually([&] { return server->stats().connectionsOpen == 1; }, 10s));
  }
  good->set("k", "v");
  CHECK(good->get("k", 1s) == "v");
  checkStillServes(*server);
}

TEST_CASE("store robustness: pipelined requests are answered in order, also behind a parked get") {
  auto server = startServer();
  RawConn raw(server->port());
  REQUIRE(raw.handshake());
  std::string burst;
  std::string get = op(proto::Op::kGet);
  ByteWriter gw(get);
  gw.putBytes("later");
  gw.put<uint64_t>(20000);
  std::string set = op(proto::Op::kSet);
  ByteWriter sw(set);
  sw.putBytes("later");
  sw.putBytes("value");
  burst += frame(get);                       // parks
  burst += frame(op(proto::Op::kNumKeys));  // must be answered after the get
  raw.send(burst);
  REQUIRE(testing::eventually([&] { return server->stats().waiters == 1; }, 10s));
  auto other = TcpStoreClient::connect(clientOptions(server->port()));
  other->set("later", "value");
  auto r1 = raw.recvFrame();
  auto r2 = raw.recvFrame();
  REQUIRE(r1.size() > 1);
  CHECK(r1[0] == static_cast<char>(proto::Status::kOk));
  CHECK(r1.substr(5) == "value");
  REQUIRE(r2.size() == 9);
  ByteReader rr(std::string_view(r2).substr(1));
  CHECK(rr.get<int64_t>() == 1);
}

TEST_CASE("store robustness: a waiter whose client disconnects is cleaned up") {
  auto server = startServer();
  {
    RawConn raw(server->port());
    REQUIRE(raw.handshake());
    std::string get = op(proto::Op::kWait);
    ByteWriter w(get);
    w.put<uint32_t>(2);
    w.putBytes("a");
    w.putBytes("b");
    w.put<uint64_t>(600000);
    raw.send(frame(get));
    REQUIRE(testing::eventually([&] { return server->stats().waiters == 1; }, 10s));
  }  // closes the raw connection while its wait is parked
  CHECK(testing::eventually([&] { return server->stats().waiters == 0 && server->stats().connectionsOpen == 0; },
                            10s));
  auto c = TcpStoreClient::connect(clientOptions(server->port()));
  c->set("a", "1");  // waking a gone waiter must not touch a dead connection
  c->set("b", "1");
  CHECK(c->numKeys() == 2);
}

TEST_CASE("store robustness: 512 concurrent connections each add once") {
  auto server = startServer();
  constexpr int kClients = 512;
  std::latch connected(kClients + 1);
  std::latch release(1);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  threads.reserve(kClients);
  for (int i = 0; i < kClients; ++i)
    threads.emplace_back([&] {
      try {
        auto c = TcpStoreClient::connect(clientOptions(server->port(), 30s));
        connected.count_down();
        c->add("counter", 1);
        release.wait();  // every connection stays open until all are counted
      } catch (const std::exception& e) {
        ++failures;
        connected.count_down();
        release.wait();
      }
    });
  connected.arrive_and_wait();
  CHECK(failures == 0);
  CHECK(server->stats().connectionsOpen == kClients);
  release.count_down();
  for (auto& t : threads) t.join();
  auto c = TcpStoreClient::connect(clientOptions(server->port()));
  CHECK(c->get("counter", 10s) == std::to_string(kClients));
}

TEST_CASE("store client: no server on the port fails after its timeout naming host:port") {
  uint16_t port = net::pickFreePort("127.0.0.1");
  auto start = Clock::now();
  try {
    TcpStoreClient::connect(clientOptions(port, 300ms));
    FAIL("connected to nothing");
  } catch (const RendezvousError& e) {
    std::string what = e.what();
    CHECK(what.find("127.0.0.1:" + std::to_string(port)) != std::string::npos);
    CHECK(what.find("Connection refused") != std::string::npos);
    CHECK(e.code() == ExitCode::kRendezvous);
  }
  CHECK(secondsSince(start) >= 0.3);  // it retried for its whole timeout
}

TEST_CASE("store client: a server that comes up late is reached by the retries") {
  uint16_t port = net::pickFreePort("127.0.0.1");
  std::shared_ptr<TcpStoreClient> c;
  std::thread t([&] { c = TcpStoreClient::connect(clientOptions(port, 20s)); });
  TcpStoreServerOptions o;
  o.host = "127.0.0.1";
  o.port = port;
  auto server = TcpStoreServer::start(o);
  t.join();
  REQUIRE(c);
  c->set("late", "ok");
  CHECK(c->get("late", 1s) == "ok");
}

TEST_CASE("store client: a peer that never answers the handshake fails within the timeout") {
  SilentListener silent;
  auto start = Clock::now();
  try {
    TcpStoreClient::connect(clientOptions(silent.port, 300ms));
    FAIL("handshake with a silent peer succeeded");
  } catch (const ProtocolError& e) {
    std::string what = e.what();
    CHECK(what.find("127.0.0.1:" + std::to_string(silent.port)) != std::string::npos);
    CHECK(what.find("did not answer the dtrain store handshake") != std::string::npos);
  }
  CHECK(secondsSince(start) < 10.0);
}

TEST_CASE("store client: a peer that is not a store, or another version, is named as such") {
  SilentListener fake;
  SUBCASE("not a store") {
    std::thread t([&] { fake.answerOnce("HTTP/1.1 400 Bad Request\r\n\r\n"); });
    CHECK_THROWS_WITH_AS(TcpStoreClient::connect(clientOptions(fake.port, 5s)),
                         doctest::Contains("is not a dtrain store"), ProtocolError);
    t.join();
  }
  SUBCASE("another protocol version") {
    std::string answer;
    proto::putHandshake(answer, 7);
    answer.push_back(static_cast<char>(proto::HandshakeStatus::kBadVersion));
    std::thread t([&] { fake.answerOnce(answer); });
    CHECK_THROWS_WITH_AS(TcpStoreClient::connect(clientOptions(fake.port, 5s)),
                         doctest::Contains("speaks protocol v7, this dtrain speaks v1"), ProtocolError);
    t.join();
  }
}

TEST_CASE("store client: a store that stops answering gives TimeoutError, then the connection fails fast") {
  SilentListener fake;
  std::thread t([&] {
    int c = ::accept4(fake.fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) return;
    char buf[256];
    (void)!::recv(c, buf, proto::kHandshakeBytes, MSG_WAITALL);
    std::string ok;
    proto::putHandshake(ok);
    ok.push_back(static_cast<char>(proto::HandshakeStatus::kOk));
    (void)!::send(c, ok.data(), ok.size(), MSG_NOSIGNAL);
    while (::recv(c, buf, sizeof(buf), 0) > 0) {
    }  // swallow requests until the client gives up and closes
    ::close(c);
  });
  auto options = clientOptions(fake.port, 5s);
  options.timeout = 200ms;
  auto c = TcpStoreClient::connect(options);
  auto start = Clock::now();
  CHECK_THROWS_WITH_AS(c->set("k", "v"), doctest::Contains("did not answer within 200 ms (during set('k'))"),
                       TimeoutError);
  CHECK(secondsSince(start) >= 0.2);
  CHECK_THROWS_WITH_AS(c->tryGet("k"), doctest::Contains("unusable after an earlier error"), NetworkError);
  t.join();  // the client closed its end
}
