#include "lib/launch/http_server.h"

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <poll.h>
#include <sys/socket.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "lib/common/error.h"
#include "lib/common/net.h"
#include "lib/common/log.h"
#include "lib/common/socket.h"

namespace dtrain::launch {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

constexpr auto kConnectionBudget = std::chrono::seconds(10);

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, const HttpHandler& handler) : stream_(std::move(socket)), handler_(handler) {}

  void start() {
    stream_.expires_after(kConnectionBudget);
    http::async_read(stream_, buffer_, request_,
                     [self = shared_from_this()](beast::error_code ec, size_t) { self->onRead(ec); });
  }

 private:
  void onRead(beast::error_code ec) {
    if (ec) return;  // closed, timed out or malformed: nothing to answer
    response_.version(request_.version());
    response_.keep_alive(false);
    response_.set(http::field::server, "dtrain");
    if (request_.method() != http::verb::get && request_.method() != http::verb::head) {
      response_.result(http::status::method_not_allowed);
      response_.set(http::field::content_type, "text/plain; charset=utf-8");
      response_.body() = "only GET and HEAD are served\n";
    } else {
      HttpResponse r;
      try {
        r = handler_(std::string_view(request_.target().data(), request_.target().size()));
      } catch (const std::exception& e) {
        r = {500, "text/plain; charset=utf-8", std::string(e.what()) + "\n"};
      }
      response_.result(static_cast<unsigned>(r.status));
      response_.set(http::field::content_type, r.contentType);
      response_.body() = std::move(r.body);
    }
    response_.prepare_payload();
    if (request_.method() == http::verb::head) response_.body().clear();
    http::async_write(stream_, response_, [self = shared_from_this()](beast::error_code, size_t) {
      beast::error_code ignored;
      self->stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    });
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  http::request<http::string_body> request_;
  http::response<http::string_body> response_;
  const HttpHandler& handler_;
};

}  // namespace

struct HttpServer::Impl {
  asio::io_context io{1};
  tcp::acceptor acceptor{io};
  HttpHandler handler;
  std::thread thread;

  asio::steady_timer retry{io};
  bool failing = false;  // accept() is failing (EMFILE...): logged once until it recovers

  void accept() {
    acceptor.async_accept([this](beast::error_code ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted) return;
      if (ec) {
        // Out of descriptors (or memory): the pending connection stays in the backlog and the listening socket
        // stays readable, so accepting again at once would spin a core. Back off and retry.
        if (!failing) log::warn("monitoring endpoint: cannot accept connections ({}); retrying every 50 ms", ec.message());
        failing = true;
        retry.expires_after(std::chrono::milliseconds(50));
        retry.async_wait([this](beast::error_code e) {
          if (!e) accept();
        });
        return;
      }
      if (failing) log::info("monitoring endpoint: accepting connections again");
      failing = false;
      std::make_shared<Session>(std::move(socket), handler)->start();
      accept();
    });
  }
};

HttpResponse httpGet(const std::string& host, int port, const std::string& target, std::chrono::milliseconds timeout) {
  const std::string where = net::joinHostPort(host, port);
  Deadline deadline(timeout);
  // One attempt: the server listened before its address was published, so a refused connection means it is gone
  // (retried, as connect() does for a peer still starting, it cost `dtrain top` the whole timeout per dead agent).
  net::Socket sock = net::connect(net::HostPort{host, static_cast<uint16_t>(port)}, deadline, {.retry = false});
  const std::string request = fmt::format("GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", target, where);
  if (!net::sendAll(sock.fd(), request.data(), request.size()))
    throw NetworkError(fmt::format("GET http://{}{}: send failed: {}", where, target, std::strerror(errno)));
  std::string raw;
  char buf[16384];
  for (;;) {
    pollfd p{sock.fd(), POLLIN, 0};
    const auto left = deadline.remaining().count();
    if (left <= 0 || ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 1 << 30))) <= 0)
      throw TimeoutError(fmt::format("GET http://{}{}: no complete reply within {} ms", where, target, timeout.count()));
    const ssize_t n = ::recv(sock.fd(), buf, sizeof(buf), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    raw.append(buf, static_cast<size_t>(n));
  }
  const auto split = raw.find("\r\n\r\n");
  if (raw.compare(0, 5, "HTTP/") != 0 || split == std::string::npos || raw.size() < 12)
    throw NetworkError(fmt::format("GET http://{}{}: not an HTTP reply", where, target));
  HttpResponse r;
  r.status = std::atoi(raw.c_str() + raw.find(' ') + 1);
  r.body = raw.substr(split + 4);
  return r;
}

HttpServer::HttpServer(const std::string& host, int port, HttpHandler handler, const std::string& flag)
    : impl_(std::make_unique<Impl>()) {
  impl_->handler = std::move(handler);
  try {
    tcp::endpoint ep(asio::ip::make_address(host), static_cast<unsigned short>(port));
    impl_->acceptor.open(ep.protocol());
    impl_->acceptor.set_option(asio::socket_base::reuse_address(true));
    impl_->acceptor.bind(ep);
    impl_->acceptor.listen();
  } catch (const std::exception& e) {
    throw Error(fmt::format("{} {}: cannot listen on {}: {}", flag, port, net::joinHostPort(host, port), e.what()),
                ExitCode::kAddressInUse);
  }
  impl_->accept();
  impl_->thread = std::thread([impl = impl_.get()] {
    try {
      impl->io.run();
    } catch (const std::exception& e) {
      log::warn("monitoring endpoint stopped: {}", e.what());
    }
  });
}

HttpServer::~HttpServer() {
  impl_->io.stop();
  if (impl_->thread.joinable()) impl_->thread.join();
}

int HttpServer::port() const { return impl_->acceptor.local_endpoint().port(); }

}  // namespace dtrain::launch
