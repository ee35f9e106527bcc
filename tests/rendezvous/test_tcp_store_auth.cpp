// TCP store authentication (issue 10, section 1): a store started with a token serves only clients that answer
// its challenge with the same token; everyone else is closed before any request and told why.
#include <doctest/doctest.h>

#include <cstdlib>

#include "lib/common/error.h"
#include "rendezvous/tcp_store_client.h"
#include "rendezvous/tcp_store_server.h"
#include "tests/rendezvous/store_test_util.h"

using namespace dtrain;
using namespace dtrain::rendezvous;
using namespace std::chrono_literals;
using dtrain::testing::frame;
using dtrain::testing::RawConn;

namespace {

std::unique_ptr<TcpStoreServer> startServer(const std::string& token) {
  TcpStoreServerOptions o;
  o.host = "127.0.0.1";
  o.token = token;
  return TcpStoreServer::start(o);
}

TcpStoreClientOptions clientOptions(uint16_t port, std::optional<std::string> token) {
  TcpStoreClientOptions o;
  o.host = "127.0.0.1";
  o.port = port;
  o.connectTimeout = 5s;
  o.timeout = 10s;
  o.token = std::move(token);
  return o;
}

}  // namespace

TEST_CASE("store auth: the right token is served, a wrong or missing one is refused naming --rdzv-token") {
  auto server = startServer("s3cret");
  auto good = TcpStoreClient::connect(clientOptions(server->port(), "s3cret"));
  good->set("k", "v");
  CHECK(good->get("k", 1s) == "v");
  CHECK(good->clone()->get("k", 1s) == "v");  // clones keep the token

  CHECK_THROWS_WITH_AS(TcpStoreClient::connect(clientOptions(server->port(), "wrong")),
                       doctest::Contains("refused the rendezvous token: --rdzv-token"), RendezvousError);
  CHECK_THROWS_WITH_AS(TcpStoreClient::connect(clientOptions(server->port(), std::string())),
                       doctest::Contains("requires a rendezvous token and none was given: pass the store's token "
                                         "with --rdzv-token"),
                       RendezvousError);
  CHECK(server->stats().authFailures == 1);  // the tokenless client gave up before answering
}

TEST_CASE("store auth: a client without a token option reads DTRAIN_RDZV_TOKEN") {
  auto server = startServer("from-env");
  ::setenv("DTRAIN_RDZV_TOKEN", "from-env", 1);
  auto c = TcpStoreClient::connect(clientOptions(server->port(), std::nullopt));
  ::unsetenv("DTRAIN_RDZV_TOKEN");
  c->set("k", "v");
  CHECK_THROWS_AS(TcpStoreClient::connect(clientOptions(server->port(), std::nullopt)), RendezvousError);
}

TEST_CASE("store auth: a raw client that skips the challenge cannot send requests") {
  auto server = startServer("s3cret");
  RawConn raw(server->port());
  std::string hello;
  proto::putHandshake(hello);
  raw.send(hello);
  auto reply = raw.recvExactly(proto::kHandshakeReplyBytes + proto::kNonceBytes);
  REQUIRE(reply.size() == proto::kHandshakeReplyBytes + proto::kNonceBytes);
  CHECK(reply[6] == static_cast<char>(proto::HandshakeStatus::kAuthRequired));
  // A forged "set" where the digest belongs: read as a (wrong) digest, answered kBadToken, then closed.
  std::string body(1, static_cast<char>(proto::Op::kSet));
  ByteWriter w(body);
  w.putBytes("dtrain/none/event");
  w.putBytes("failed 42 forged");
  raw.send(frame(body));
  auto verdict = raw.recvExactly(1);
  REQUIRE(verdict.size() == 1);
  CHECK(verdict[0] == static_cast<char>(proto::HandshakeStatus::kBadToken));
  CHECK(raw.closedByPeer());
  auto good = TcpStoreClient::connect(clientOptions(server->port(), "s3cret"));
  CHECK_FALSE(good->tryGet("dtrain/none/event").has_value());
  CHECK(server->stats().authFailures == 1);
}

TEST_CASE("store auth: a store without a token serves clients that have one") {
  auto server = startServer("");
  auto c = TcpStoreClient::connect(clientOptions(server->port(), "anything"));
  c->set("k", "v");
  CHECK(c->get("k", 1s) == "v");
}
