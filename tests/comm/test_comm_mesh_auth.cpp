// The tcp mesh admits only connections that prove the job's token (lib/comm/tcp/mesh_auth.h): rogue clients
// on a rank's collective port are refused (and logged with their address) while the real ranks connect.
#include <doctest/doctest.h>

#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "lib/comm/tcp/mesh_auth.h"
#include "lib/common/bytes.h"
#include "lib/common/error.h"
#include "lib/common/hash.h"
#include "lib/common/net.h"
#include "lib/common/socket.h"
#include "tests/comm/comm_test_util.h"

using namespace dtrain;
using namespace dtrain::comm;
using namespace dtrain::comm::testing;
using namespace std::chrono_literals;
namespace auth = dtrain::comm::tcp::auth;

namespace {

// Sends stderr (where lib/common/log writes) to a file while alive, so the test can read the warnings.
class CaptureStderr {
 public:
  CaptureStderr() : path_(fmt::format("/tmp/dtrain-test-mesh-auth-{}.log", ::getpid())) {
    std::fflush(stderr);
    saved_ = ::dup(STDERR_FILENO);
    FILE* f = std::fopen(path_.c_str(), "w");
    ::dup2(::fileno(f), STDERR_FILENO);
    std::fclose(f);
  }
  ~CaptureStderr() {
    restore();
    std::remove(path_.c_str());
  }
  std::string text() {
    restore();
    std::ifstream in(path_);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

 private:
  void restore() {
    if (saved_ < 0) return;
    std::fflush(stderr);
    ::dup2(saved_, STDERR_FILENO);
    ::close(saved_);
    saved_ = -1;
  }
  std::string path_;
  int saved_ = -1;
};

// A client of rank 0's collective port, as an attacker or a stray process would be.
struct Rogue {
  net::Socket socket;
  std::string local;  // "127.0.0.1:port": how rank 0's log names it

  Rogue(net::Socket s, std::string addr) : socket(std::move(s)), local(std::move(addr)) {}
  explicit Rogue(const net::HostPort& to) : socket(net::connect(to, Deadline(10s))) {
    sockaddr_storage ss{};
    socklen_t len = sizeof(ss);
    ::getsockname(socket.fd(), reinterpret_cast<sockaddr*>(&ss), &len);
    local = "127.0.0.1:" + std::to_string(net::localPort(socket.fd()));
  }
  void send(const void* p, size_t n) { REQUIRE(net::sendAll(socket.fd(), p, n)); }
  // True when the other side closed the connection within `within` (EOF or reset), whatever it sent before.
  bool closedByPeer(std::chrono::milliseconds within = 10s) {
    char buf[256];
    Deadline deadline(within);
    while (!deadline.expired()) {
      pollfd pfd{socket.fd(), POLLIN, 0};
      if (::poll(&pfd, 1, 100) <= 0) continue;
      ssize_t n = ::recv(socket.fd(), buf, sizeof(buf), 0);
      if (n <= 0) return true;
    }
    return false;
  }
};

auth::HelloHeader helloFor(int rank, uint32_t tag) {
  auth::HelloHeader h;
  h.rank = rank;
  h.tag = tag;
  return h;
}

// Rank 0 builds its mesh once every rank published its PeerInfo (Backend's constructor); publish rank 1's as
// it will (same encoding, same host), so rank 0 listens while the real rank 1 has not started yet.
void publishRankOnePeerInfo(rendezvous::Store& store) {
  std::string peer;
  ByteWriter w(peer);
  w.put<int32_t>(2);
  w.put<int32_t>(0);
  w.put<int32_t>(1);
  w.put<int64_t>(::getpid());
  w.putBytes(net::hostname());
  store.set("test/peer/1", peer);
}

std::vector<float> twoRankSum(int rank) {
  std::vector<float> v(100000);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(rank + 1) * static_cast<float>(i % 7);
  return v;
}

}  // namespace

TEST_CASE("tcp mesh: rogue connections to a rank's port are refused and logged; the real ranks still connect") {
  const std::string token = "s3cret-token";
  auto store = rendezvous::MemoryStore::create();
  auto opts = [&](int r) {
    auto o = rankOptions(r, 2, store);
    o.token = token;
    o.timeout = 30s;
    return o;
  };
  std::vector<std::string> errors(2);
  std::vector<std::vector<float>> results(2);
  auto rankBody = [&](int r) {
    try {
      auto b = createBackend("tcp", opts(r));
      auto v = twoRankSum(r);
      b->allreduce(TensorView::flat(v.data(), v.size()), ReduceOp::kSum);
      results[static_cast<size_t>(r)] = v;
    } catch (const std::exception& e) {
      errors[static_cast<size_t>(r)] = e.what();
    }
  };

  publishRankOnePeerInfo(*store);
  CaptureStderr captured;
  std::thread rank0(rankBody, 0), rank1;
  struct Join {  // also when an assertion below ends the test early
    std::thread& a;
    std::thread& b;
    ~Join() {
      if (a.joinable()) a.join();
      if (b.joinable()) b.join();
    }
  } join{rank0, rank1};
  auto where = net::parseHostPort(store->get("test/tcp/addr/0", 30s), 0);
  REQUIRE(where.has_value());
  const uint32_t tag = fnv1a32("test/tcp/");

  std::vector<std::string> rogues;
  // 1. The old unauthenticated hello claiming rank 1 (this used to be taken as rank 1, data and all).
  {
    Rogue r(*where);
    auto h = helloFor(1, tag);
    h.version = 1;
    r.send(&h, sizeof(h));
    CHECK(r.closedByPeer());
    rogues.push_back(r.local);
  }
  // 2. Garbage: not a dtrain collective connection.
  {
    Rogue r(*where);
    const char junk[] = "GET / HTTP/1.0\r\n\r\n";
    r.send(junk, sizeof(junk));
    CHECK(r.closedByPeer());
    rogues.push_back(r.local);
  }
  std::string sessionBytes = store->get("test/tcp/session", 5s);  // as if the rogues could read the store
  auth::Session session{};
  REQUIRE(sessionBytes.size() == session.size());
  std::memcpy(session.data(), sessionBytes.data(), session.size());
  // 3. A well-formed hello for rank 1 of this session, answered with a wrong token's (and no token's) proof.
  for (std::string wrong : {std::string("guessed"), std::string()}) {
    Rogue r(*where);
    auto h = helloFor(1, tag);
    auth::HelloTail tail;
    tail.session = session;
    r.send(&h, sizeof(h));
    r.send(&tail, sizeof(tail));
    auth::Challenge c;
    REQUIRE(net::recvAll(r.socket.fd(), &c, sizeof(c), Deadline(10s)));
    // The acceptor's proof does not verify under a wrong token: a rogue listener could not fake rank 0 either.
    CHECK_FALSE(sha256::equal(c.proof, auth::acceptorProof(wrong, session, tag, 0, 1, tail.nonce, c.nonce)));
    auto proof = auth::connectorProof(wrong, session, tag, 1, 0, c.nonce, tail.nonce);
    r.send(proof.data(), proof.size());
    CHECK(r.closedByPeer());
    rogues.push_back(r.local);
  }
  // 4. A valid-looking hello for the wrong rank: a proof made with the token for rank 2 (another connection's,
  //    replayed) under a header claiming rank 1; and one from another job/round (its session differs).
  {
    Rogue r(*where);
    auto h = helloFor(1, tag);
    auth::HelloTail tail;
    tail.session = session;
    r.send(&h, sizeof(h));
    r.send(&tail, sizeof(tail));
    auth::Challenge c;
    REQUIRE(net::recvAll(r.socket.fd(), &c, sizeof(c), Deadline(10s)));
    auto proof = auth::connectorProof(token, session, tag, 2, 0, c.nonce, tail.nonce);
    r.send(proof.data(), proof.size());
    CHECK(r.closedByPeer());
    rogues.push_back(r.local);
  }
  {
    Rogue r(*where);
    auto h = helloFor(1, tag);
    auth::HelloTail tail;
    tail.session = session;
    tail.session[0] ^= 1;
    r.send(&h, sizeof(h));
    r.send(&tail, sizeof(tail));
    CHECK(r.closedByPeer());
    rogues.push_back(r.local);
  }
  // 5. One that claims rank 1 and then stalls mid-handshake, holding its connection: it must not block rank 1.
  Rogue staller(*where);
  {
    auto h = helloFor(1, tag);
    auth::HelloTail tail;
    tail.session = session;
    staller.send(&h, sizeof(h));
    staller.send(&tail, sizeof(tail));
  }

  rank1 = std::thread(rankBody, 1);
  rank0.join();
  rank1.join();
  const std::string log = captured.text();
  INFO(log);
  REQUIRE(errors[0].empty());
  REQUIRE(errors[1].empty());
  auto expected0 = twoRankSum(0), expected1 = twoRankSum(1);
  bool right = true;
  for (size_t i = 0; i < expected0.size(); ++i)
    right = right && results[0][i] == expected0[i] + expected1[i] && results[1][i] == results[0][i];
  CHECK(right);
  // Each refusal is one warning naming the rogue's address and why.
  for (const auto& addr : rogues) CHECK(log.find("refused a connection from " + addr) != std::string::npos);
  CHECK(log.find("mesh protocol v1") != std::string::npos);
  CHECK(log.find("not a dtrain collective connection") != std::string::npos);
  CHECK(log.find("without proving it knows the job's token") != std::string::npos);
  CHECK(log.find("another job, round or attempt") != std::string::npos);
}

TEST_CASE("tcp mesh: a rank out of descriptors keeps accepting; a connection that stalls is dropped after 10 s") {
  auto store = rendezvous::MemoryStore::create();
  publishRankOnePeerInfo(*store);
  std::string error0, error1;
  auto body = [&](int r, std::string& error) {
    try {
      auto o = rankOptions(r, 2, store);
      o.token = "t";
      o.timeout = 60s;
      auto b = createBackend("tcp", o);
      std::vector<int64_t> v(1000, r + 1);
      b->allreduce(TensorView::flat(v.data(), v.size()), ReduceOp::kSum);
      if (v[0] != 3) error = "wrong sum";
    } catch (const std::exception& e) {
      error = e.what();
    }
  };
  CaptureStderr captured;
  std::thread rank0(body, 0, std::ref(error0)), rank1;
  struct Join {
    std::thread& a;
    std::thread& b;
    ~Join() {
      if (a.joinable()) a.join();
      if (b.joinable()) b.join();
    }
  } join{rank0, rank1};
  auto where = net::parseHostPort(store->get("test/tcp/addr/0", 30s), 0);
  REQUIRE(where.has_value());
  {
    // The process runs out of descriptors while a connection is pending: accept fails with EMFILE. It used to
    // fail the whole group ("accept failed: Too many open files"); now it retries until descriptors are back.
    int pendingFd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(pendingFd >= 0);
    net::Socket pending(pendingFd);
    rlimit saved{};
    ::getrlimit(RLIMIT_NOFILE, &saved);
    rlimit low = saved;
    low.rlim_cur = 256;
    ::setrlimit(RLIMIT_NOFILE, &low);
    std::vector<int> fds;
    for (int fd; (fd = ::dup(0)) >= 0;) fds.push_back(fd);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(where->port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    const int connected = ::connect(pending.fd(), reinterpret_cast<sockaddr*>(&sa), sizeof(sa));
    std::this_thread::sleep_for(300ms);  // let the accept fail a few times (a duration, not a synchronisation)
    for (int fd : fds) ::close(fd);
    ::setrlimit(RLIMIT_NOFILE, &saved);
    CHECK(connected == 0);
    // Once accepted, it never says a word: dropped by the handshake timeout, without rank 1 having started.
    const std::string addr = "127.0.0.1:" + std::to_string(net::localPort(pending.fd()));
    Rogue staller(std::move(pending), addr);
    CHECK(staller.closedByPeer(20s));
  }
  rank1 = std::thread(body, 1, std::ref(error1));
  rank0.join();
  rank1.join();
  const std::string log = captured.text();
  INFO(log);
  CHECK(error0.empty());
  CHECK(error1.empty());
  CHECK(log.find("cannot accept connections") != std::string::npos);
  CHECK(log.find("did not complete the handshake within 10 s") != std::string::npos);
}

TEST_CASE("tcp mesh: ranks given different tokens fail with an error naming the token, not a silent mix") {
  auto store = rendezvous::MemoryStore::create();
  CaptureStderr captured;
  auto errors = onRanks(2, [&](int r) {
    auto o = rankOptions(r, 2, store);
    o.token = r == 0 ? "one" : "other";
    o.timeout = 3s;
    createBackend("tcp", o);
  });
  const std::string log = captured.text();
  INFO(log);
  CHECK(errors[1].find("did not prove it knows the job's token") != std::string::npos);
  CHECK(errors[1].find("DTRAIN_RDZV_TOKEN") != std::string::npos);
  CHECK_FALSE(errors[0].empty());  // rank 0 never got its peer: the bootstrap timeout
}

TEST_CASE("tcp mesh: a token reaches hier's tcp groups and sub-groups, which connect with it") {
  for (const char* backend : {"tcp", "hier"}) {
    auto store = rendezvous::MemoryStore::create();
    auto errors = onRanks(4, [&](int r) {
      auto o = rankOptions(r, 4, store, nodesFor(backend));
      o.token = "t";
      auto b = createBackend(backend, o);
      std::vector<int64_t> v(1000, r);
      b->allreduce(TensorView::flat(v.data(), v.size()), ReduceOp::kSum);
      expect(v[0] == 6 && v[999] == 6, "wrong sum");
      auto sub = b->newGroup({1, 3});
      if (sub) {
        std::vector<int64_t> w(10, r);
        sub->allreduce(TensorView::flat(w.data(), w.size()), ReduceOp::kSum);
        expect(w[0] == 4, "wrong sub-group sum");
      }
    });
    CHECK_MESSAGE(firstError(errors).empty(), backend, ": ", firstError(errors));
  }
}

TEST_CASE("mesh_auth: proofs are bound to the token, ranks, session, tag, nonces and direction") {
  auth::Session s{};
  auth::Nonce a{}, c{};
  s[0] = 1;
  a[0] = 2;
  c[0] = 3;
  auto base = auth::acceptorProof("k", s, 7, 0, 1, c, a);
  CHECK(sha256::equal(base, auth::acceptorProof("k", s, 7, 0, 1, c, a)));
  CHECK_FALSE(sha256::equal(base, auth::acceptorProof("K", s, 7, 0, 1, c, a)));
  CHECK_FALSE(sha256::equal(base, auth::acceptorProof("k", s, 8, 0, 1, c, a)));
  CHECK_FALSE(sha256::equal(base, auth::acceptorProof("k", s, 7, 0, 2, c, a)));
  CHECK_FALSE(sha256::equal(base, auth::acceptorProof("k", s, 7, 0, 1, a, c)));
  auto s2 = s;
  s2[15] = 9;
  CHECK_FALSE(sha256::equal(base, auth::acceptorProof("k", s2, 7, 0, 1, c, a)));
  // The connector's proof over the same values is another message: not reflectable.
  CHECK_FALSE(sha256::equal(base, auth::connectorProof("k", s, 7, 0, 1, c, a)));
  CHECK(auth::checkHeader(helloFor(1, 7), 7, 0, 2).empty());
  CHECK(auth::checkHeader(helloFor(0, 7), 7, 0, 2).find("claims rank 0") != std::string::npos);
  CHECK(auth::checkHeader(helloFor(2, 7), 7, 0, 2).find("claims rank 2") != std::string::npos);
  CHECK(auth::checkHeader(helloFor(1, 8), 7, 0, 2).find("another collective group") != std::string::npos);
}
