#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <thread>

#include "lib/common/socket.h"

using namespace dtrain;
using namespace std::chrono_literals;

namespace {

// Accepts one connection on `l` and echoes one byte back.
void echoOnce(const net::Listener& l) {
  int c = ::accept4(l.socket.fd(), nullptr, nullptr, SOCK_CLOEXEC);
  REQUIRE(c >= 0);
  char b = 0;
  if (::recv(c, &b, 1, MSG_WAITALL) == 1) (void)!::send(c, &b, 1, MSG_NOSIGNAL);
  ::close(c);
}

void roundTrip(const net::Socket& s) {
  char b = 'x';
  REQUIRE(net::sendAll(s.fd(), &b, 1));
  b = 0;
  REQUIRE(::recv(s.fd(), &b, 1, MSG_WAITALL) == 1);
  CHECK(b == 'x');
}

bool hasIpv6Loopback() {
  try {
    net::listen("::1", 0);
    return true;
  } catch (const net::ListenError&) {
    return false;
  }
}

}  // namespace

TEST_CASE("listen on port 0 reports the bound port; descriptors are close-on-exec") {
  auto l = net::listen("127.0.0.1", 0);
  CHECK(l.port != 0);
  CHECK(l.family == AF_INET);
  CHECK(net::localPort(l.socket.fd()) == l.port);
  CHECK((::fcntl(l.socket.fd(), F_GETFD) & FD_CLOEXEC) != 0);
  std::thread t([&] { echoOnce(l); });
  auto s = net::connect({"127.0.0.1", l.port}, Deadline(5s));
  CHECK((::fcntl(s.fd(), F_GETFD) & FD_CLOEXEC) != 0);
  CHECK((::fcntl(s.fd(), F_GETFL) & O_NONBLOCK) == 0);  // blocking unless asked
  roundTrip(s);
  t.join();
}

TEST_CASE("listen on a port in use names host:port and maps to kAddressInUse") {
  auto l = net::listen("127.0.0.1", 0);
  try {
    net::listen("127.0.0.1", l.port);
    FAIL("a second listener on the same port");
  } catch (const net::ListenError& e) {
    CHECK(std::string(e.what()) == "cannot listen on 127.0.0.1:" + std::to_string(l.port) + ": Address already in use");
    CHECK(e.code() == ExitCode::kAddressInUse);
  }
}

TEST_CASE("connect retries with backoff until a late listener comes up") {
  uint16_t port = net::pickFreePort("127.0.0.1");
  std::thread late([&] {
    std::this_thread::sleep_for(300ms);
    auto l = net::listen("127.0.0.1", port);
    echoOnce(l);
  });
  auto start = Clock::now();
  auto s = net::connect({"127.0.0.1", port}, Deadline(20s), {.initialBackoff = 5ms, .maxBackoff = 50ms});
  CHECK(secondsSince(start) >= 0.25);
  roundTrip(s);
  late.join();
}

TEST_CASE("connect gives up at the deadline naming the endpoint and the last error") {
  uint16_t port = net::pickFreePort("127.0.0.1");
  auto start = Clock::now();
  try {
    net::connect({"127.0.0.1", port}, Deadline(300ms));
    FAIL("connected to nothing");
  } catch (const net::ConnectError& e) {
    std::string what = e.what();
    CHECK(what.find("127.0.0.1:" + std::to_string(port)) != std::string::npos);
    CHECK(what.find("Connection refused") != std::string::npos);
    CHECK(e.timedOut());
    CHECK(e.err() == ECONNREFUSED);
    CHECK(e.attempts() > 1);
    CHECK(e.endpoint() == "127.0.0.1:" + std::to_string(port));
  }
  CHECK(secondsSince(start) >= 0.3);   // it retried for its whole budget
  CHECK(secondsSince(start) < 5.0);    // and not much longer
}

TEST_CASE("connect with retry off makes one pass: a port nobody listens on is refused at once, not at the deadline") {
  const uint16_t port = net::pickFreePort("127.0.0.1");
  try {
    net::connect({"127.0.0.1", port}, Deadline(30s), {.retry = false});
    FAIL("connected to nothing");
  } catch (const net::ConnectError& e) {
    CHECK(std::string(e.what()) == "cannot connect to 127.0.0.1:" + std::to_string(port) + ": Connection refused");
    CHECK(e.err() == ECONNREFUSED);
    CHECK(e.attempts() == 1);
    CHECK_FALSE(e.timedOut());
  }
}

TEST_CASE("connect resolves host names: localhost") {
  // "localhost" may resolve to ::1 first; a listener on 127.0.0.1 is still found (every address is tried).
  auto l = net::listen("127.0.0.1", 0);
  std::thread t([&] { echoOnce(l); });
  auto s = net::connect({"localhost", l.port}, Deadline(10s));
  roundTrip(s);
  t.join();
}

TEST_CASE("IPv6 loopback, when the machine has it") {
  if (!hasIpv6Loopback()) {
    MESSAGE("no IPv6 loopback here: skipped");
    return;
  }
  auto l = net::listen("::1", 0);
  CHECK(l.family == AF_INET6);
  std::thread t([&] { echoOnce(l); });
  net::HostPort to{"::1", l.port};
  CHECK(to.str() == "[::1]:" + std::to_string(l.port));
  auto s = net::connect(to, Deadline(10s));
  roundTrip(s);
  t.join();
}

TEST_CASE("recvAll reads exactly the size asked, and reports a close (errno 0) and the deadline (ETIMEDOUT)") {
  int sv[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  net::Socket a(sv[0]), b(sv[1]);
  std::thread writer([&] {
    for (char c : std::string("hello world")) {
      REQUIRE(net::sendAll(b.fd(), &c, 1));
      std::this_thread::sleep_for(1ms);
    }
  });
  char buf[6] = {};
  CHECK(net::recvAll(a.fd(), buf, 5, Deadline(5s)));
  CHECK(std::string(buf, 5) == "hello");
  writer.join();
  char rest[6] = {};
  CHECK(net::recvAll(a.fd(), rest, 6, Deadline(5s)));
  CHECK(std::string(rest, 6) == " world");
  auto start = std::chrono::steady_clock::now();
  CHECK_FALSE(net::recvAll(a.fd(), buf, 1, Deadline(100ms)));
  CHECK(errno == ETIMEDOUT);
  CHECK(std::chrono::steady_clock::now() - start >= 100ms);
  REQUIRE(net::sendAll(b.fd(), "x", 1));
  b.close();
  CHECK_FALSE(net::recvAll(a.fd(), buf, 2, Deadline(5s)));  // one byte, then the close
  CHECK(errno == 0);
}
