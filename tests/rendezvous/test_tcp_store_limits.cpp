// TCP store resource limits (issue 10, section 1): a store must stay small and keep serving well-behaved clients
// whatever a careless or hostile client sends: huge declared frames, replies never read, half-open handshakes,
// idle or too many connections, too many keys or bytes, check/wait on too many keys.
// The server runs in this process, so its memory is this process's VmRSS.
#include <doctest/doctest.h>

#include <sys/socket.h>
#include <sys/time.h>

#include <fstream>
#include <limits>
#include <thread>

#include "lib/common/error.h"
#include "rendezvous/store_state.h"
#include "rendezvous/tcp_store_client.h"
#include "rendezvous/tcp_store_server.h"
#include "tests/rendezvous/store_test_util.h"

using namespace dtrain;
using namespace dtrain::rendezvous;
using namespace std::chrono_literals;
using dtrain::testing::eventually;
using dtrain::testing::frame;
using dtrain::testing::RawConn;

namespace {

constexpr size_t kMiB = size_t{1} << 20;

std::unique_ptr<TcpStoreServer> startServer(const TcpStoreLimits& limits = {}) {
  TcpStoreServerOptions o;
  o.host = "127.0.0.1";
  o.limits = limits;
  return TcpStoreServer::start(o);
}

std::shared_ptr<TcpStoreClient> connectClient(uint16_t port) {
  TcpStoreClientOptions o;
  o.host = "127.0.0.1";
  o.port = port;
  o.connectTimeout = 10s;
  o.timeout = 30s;
  return TcpStoreClient::connect(o);
}

// This process's resident set size in bytes (/proc/self/status VmRSS).
size_t rssBytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  return 0;
}

std::string op(proto::Op o) { return std::string(1, static_cast<char>(o)); }

std::string getRequest(std::string_view key) {
  std::string body = op(proto::Op::kGet);
  ByteWriter w(body);
  w.putBytes(key);
  w.put<uint64_t>(1000);
  return frame(body);
}

// Sends up to `bytes` zero bytes; stops early (returns what was sent) when the server stops reading for 1 s.
size_t sendUntilBlocked(int fd, size_t bytes) {
  timeval tv{1, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  std::string chunk(kMiB, '\0');
  size_t sent = 0;
  while (sent < bytes) {
    ssize_t n = ::send(fd, chunk.data(), std::min(chunk.size(), bytes - sent), MSG_NOSIGNAL);
    if (n <= 0) break;
    sent += static_cast<size_t>(n);
  }
  return sent;
}

void checkStillServes(const TcpStoreServer& server) {
  auto c = connectClient(server.port());
  c->set("alive", "yes");
  CHECK(c->get("alive", 1s) == "yes");
}

}  // namespace

TEST_CASE("store limits: frames declaring a large length are not allocated before their bytes arrive") {
  auto server = startServer();
  size_t before = rssBytes();
  std::vector<std::unique_ptr<RawConn>> conns;
  for (int i = 0; i < 7; ++i) {
    auto c = std::make_unique<RawConn>(server->port());
    REQUIRE(c->handshake());
    std::string bytes;
    ByteWriter(bytes).put<uint32_t>(static_cast<uint32_t>(proto::kMaxFrameBytes - 1024));
    bytes.append(10, 'x');
    c->send(bytes);
    conns.push_back(std::move(c));
  }
  checkStillServes(*server);
  // Give the server a moment to have read every connection's bytes: growth, if any, shows up within it.
  bool grew = eventually([&] { return rssBytes() > before + 100 * kMiB; }, 1500ms);
  size_t after = rssBytes();
  MESSAGE("VmRSS grew by " << (after - std::min(after, before)) / 1024 << " KiB for 7 declared ~127 MiB frames");
  CHECK_FALSE(grew);
  CHECK(after < before + 32 * kMiB);
  CHECK(server->stats().bufferedBytes < 8 * kMiB);
}

TEST_CASE("store limits: all connections' buffers stay within the server-wide budget") {
  TcpStoreLimits limits;
  limits.maxBufferedBytes = proto::kMaxFrameBytes + 8 * kMiB;  // room for one maximal frame, not two
  auto server = startServer(limits);
  std::vector<std::unique_ptr<RawConn>> conns;
  std::vector<std::thread> senders;
  std::vector<size_t> sent(2, 0);
  for (int i = 0; i < 2; ++i) {
    conns.push_back(std::make_unique<RawConn>(server->port()));
    REQUIRE(conns.back()->handshake());
    std::string header;
    ByteWriter(header).put<uint32_t>(static_cast<uint32_t>(proto::kMaxFrameBytes - 1024));
    conns.back()->send(header);
  }
  for (int i = 0; i < 2; ++i)
    senders.emplace_back([&, i] { sent[i] = sendUntilBlocked(conns[i]->fd(), 100 * kMiB); });
  for (auto& t : senders) t.join();
  auto stats = server->stats();
  MESSAGE("sent " << sent[0] / kMiB << " + " << sent[1] / kMiB << " MiB; server buffers "
                  << stats.bufferedBytes / kMiB << " MiB");
  CHECK(stats.bufferedBytes <= limits.maxBufferedBytes);
  CHECK(std::min(sent[0], sent[1]) < 40 * kMiB);  // one of them was stopped early (kernel buffers aside)
  checkStillServes(*server);
  conns.clear();  // closing them releases their buffers
  CHECK(eventually([&] { return server->stats().bufferedBytes < kMiB; }, 10s));
}

TEST_CASE("store limits: a client that never reads its replies is throttled, others are still answered") {
  auto server = startServer();
  auto good = connectClient(server->port());
  good->set("big", std::string(8 * kMiB, 'v'));
  size_t before = rssBytes();
  RawConn hog(server->port());
  REQUIRE(hog.handshake());
  std::string gets;
  for (int i = 0; i < 100; ++i) gets += getRequest("big");
  hog.send(gets);
  // The hog's requests are read and answered until its queued replies pass the bound; then nothing more.
  REQUIRE(eventually([&] { return server->stats().requests >= 2; }, 10s));
  good->set("k", "v");
  CHECK(good->get("k", 1s) == "v");
  bool grew = eventually([&] { return rssBytes() > before + 200 * kMiB; }, 1500ms);
  size_t after = rssBytes();
  MESSAGE("VmRSS grew by " << (after - std::min(after, before)) / kMiB << " MiB for 100 unread 8 MiB replies");
  CHECK_FALSE(grew);
  CHECK(server->stats().bufferedBytes < 40 * kMiB);
  // Once the client reads, every request is answered, in order.
  for (int i = 0; i < 100; ++i) {
    auto reply = hog.recvFrame();
    REQUIRE(reply.size() == 1 + 4 + 8 * kMiB);
    CHECK(reply[0] == static_cast<char>(proto::Status::kOk));
  }
}

TEST_CASE("store limits: connections that do not finish the handshake in time are closed") {
  TcpStoreLimits limits;
  limits.handshakeTimeout = 200ms;
  auto server = startServer(limits);
  RawConn silent(server->port());
  RawConn partial(server->port());
  partial.send("DT");
  auto good = connectClient(server->port());
  CHECK(silent.closedByPeer(5s));
  CHECK(partial.closedByPeer(5s));
  CHECK(server->stats().connectionsTimedOut == 2);
  good->set("k", "v");  // a handshaken connection is not affected
  CHECK(good->get("k", 1s) == "v");
}

TEST_CASE("store limits: the idle timeout closes quiet connections, never a parked wait") {
  TcpStoreLimits limits;
  limits.idleTimeout = 300ms;
  auto server = startServer(limits);
  RawConn idle(server->port());
  REQUIRE(idle.handshake());
  auto waiter = connectClient(server->port());
  CHECK_THROWS_AS(waiter->get("never", 1s), TimeoutError);  // parked for longer than the idle timeout
  CHECK(idle.closedByPeer(5s));
  CHECK(server->stats().connectionsTimedOut >= 1);
}

TEST_CASE("store limits: connections over the cap are closed at once") {
  TcpStoreLimits limits;
  limits.maxConnections = 3;
  auto server = startServer(limits);
  std::vector<std::unique_ptr<RawConn>> conns;
  for (int i = 0; i < 3; ++i) {
    conns.push_back(std::make_unique<RawConn>(server->port()));
    REQUIRE(conns.back()->handshake());
  }
  RawConn over(server->port());
  CHECK(over.closedByPeer(5s));
  CHECK(server->stats().connectionsRefused == 1);
  conns.pop_back();
  REQUIRE(eventually([&] { return server->stats().connectionsOpen == 2; }, 5s));
  checkStillServes(*server);
}

TEST_CASE("store limits: quotas on keys and stored bytes are errors naming the quota") {
  TcpStoreLimits limits;
  limits.maxKeys = 3;
  limits.maxStoredBytes = 4 * kMiB;
  auto server = startServer(limits);
  auto c = connectClient(server->port());
  c->set("a", "1");
  c->set("b", "2");
  c->add("c", 1);
  try {
    c->set("d", "4");
    FAIL("a fourth key was accepted");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("store quota exceeded") != std::string::npos);
    CHECK(std::string(e.what()).find("max-keys") != std::string::npos);
  }
  CHECK_THROWS_WITH_AS(c->append("e", "x"), doctest::Contains("max-keys"), Error);
  CHECK_THROWS_WITH_AS(c->compareSet("e", "", "x"), doctest::Contains("max-keys"), Error);
  c->set("a", "overwrite is fine");
  CHECK(c->numKeys() == 3);
  CHECK(c->remove("a"));
  c->set("d", "4");
  CHECK_THROWS_WITH_AS(c->set("b", std::string(5 * kMiB, 'x')), doctest::Contains("max-stored-bytes"), Error);
  CHECK(c->get("b", 1s) == "2");  // a refused mutation changes nothing
  c->set("b", std::string(3 * kMiB, 'x'));
  CHECK_THROWS_WITH_AS(c->append("b", std::string(2 * kMiB, 'x')), doctest::Contains("max-stored-bytes"), Error);
  CHECK(server->stats().keys == 3);
  CHECK(c->remove("d"));
  checkStillServes(*server);  // the quota errors did not close the connection or the server
}

TEST_CASE("store state: stored bytes are counted and returned on every mutation") {
  StoreState s(StoreState::Quota{10, 1000});
  s.set("k", "12345");
  CHECK(s.storedBytes() == 1 + 5 + StoreState::kEntryOverheadBytes);
  s.set("k", "1");
  CHECK(s.storedBytes() == 1 + 1 + StoreState::kEntryOverheadBytes);
  s.append("k", "23");
  s.add("n", 100);
  CHECK(s.storedBytes() == 2 + 3 + 3 + 2 * StoreState::kEntryOverheadBytes);
  s.add("n", -95);  // "5": the value shrank
  CHECK(s.storedBytes() == 2 + 3 + 1 + 2 * StoreState::kEntryOverheadBytes);
  s.remove("k");
  s.remove("n");
  CHECK(s.storedBytes() == 0);
}

TEST_CASE("store limits: check and wait on too many keys are refused with an error") {
  TcpStoreLimits limits;
  limits.maxKeysPerRequest = 1000;
  auto server = startServer(limits);
  auto c = connectClient(server->port());
  std::vector<std::string> keys(1001, "k");
  CHECK_THROWS_WITH_AS(c->check(keys), doctest::Contains("max-keys-per-request"), Error);
  CHECK_THROWS_WITH_AS(c->wait(keys, 1s), doctest::Contains("max-keys-per-request"), Error);
  keys.resize(1000);
  c->set("k", "v");
  CHECK(c->check(keys));
  CHECK(c->wait(keys, 1s));
}

TEST_CASE("the connection cap keeps descriptors for the rest of the process under any open-file limit") {
  CHECK(rendezvous::connectionCapFor(64) == 48);        // 16 kept at least
  CHECK(rendezvous::connectionCapFor(20000) == 18976);  // 1024 kept at most
  CHECK(rendezvous::connectionCapFor(4096) == 3584);    // an eighth
  CHECK(rendezvous::connectionCapFor(20) == 10);        // half of a tiny limit
  CHECK(rendezvous::connectionCapFor(0) == std::numeric_limits<size_t>::max());  // unknown
}
