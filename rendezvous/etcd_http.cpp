#include "rendezvous/etcd_http.h"

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/ssl/host_name_verification.hpp>
#include <openssl/ssl.h>

#include <fcntl.h>

#include <filesystem>

#include "lib/common/error.h"

namespace dtrain::rendezvous::etcd {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;

namespace {

// grpc-gateway's HTTP status for a gRPC code that says "this member, now" rather than "this request": 5xx
// (UNAVAILABLE 503: no leader; DEADLINE_EXCEEDED 504; UNKNOWN/INTERNAL 500), CANCELED 408 (a member shutting
// down answers "the client connection is closing"), ABORTED 409, RESOURCE_EXHAUSTED 429.
bool retryableStatus(unsigned status) { return status >= 500 || status == 408 || status == 409 || status == 429; }

// An error of the TLS layer itself (a certificate that does not verify, an alert from the server refusing ours):
// no retry fixes it. A reset or an EOF during the handshake is the endpoint's, and retried.
bool tlsConfigurationError(const boost::system::error_code& ec) {
  return ec.category() == asio::error::get_ssl_category() && ec != asio::ssl::error::stream_truncated;
}

}  // namespace

std::shared_ptr<asio::ssl::context> makeTlsContext(const EtcdStoreOptions& o) {
  if (!o.tls) return nullptr;
  auto ctx = std::make_shared<asio::ssl::context>(asio::ssl::context::tls_client);
  auto load = [&](const std::string& file, const char* key, auto&& fn) {
    boost::system::error_code ec;
    fn(ec);
    if (ec)
      DTRAIN_THROW(EtcdRefusedError, "etcd TLS: cannot use {} '{}' (--rdzv-conf {}={}): {}", key, file, key, file,
                   ec.message());
  };
  if (o.caCert.empty()) {
    boost::system::error_code ec;
    ctx->set_default_verify_paths(ec);
  } else {
    load(o.caCert, "cacert", [&](auto& ec) { ctx->load_verify_file(o.caCert, ec); });
  }
  DTRAIN_CHECK_AS(EtcdRefusedError, o.cert.empty() == o.key.empty(),
                  "etcd TLS: --rdzv-conf cert= and key= go together (the client certificate and its private key); "
                  "got only {}",
                  o.cert.empty() ? "key" : "cert");
  if (!o.cert.empty()) {
    load(o.cert, "cert", [&](auto& ec) { ctx->use_certificate_chain_file(o.cert, ec); });
    load(o.key, "key", [&](auto& ec) { ctx->use_private_key_file(o.key, asio::ssl::context::pem, ec); });
  }
  ctx->set_verify_mode(asio::ssl::verify_peer);
  return ctx;
}

Http::Http(const net::HostPort& endpoint, Millis timeout, asio::ssl::context* tls) : endpoint_(endpoint), plain_(io_) {
  asio::ip::tcp::resolver resolver(io_);
  boost::system::error_code ec;
  auto results = resolver.resolve(endpoint.host, std::to_string(endpoint.port), ec);
  if (ec) throw EndpointFailure(fmt::format("cannot resolve {}: {}", endpoint.str(), ec.message()));
  plain_.expires_after(timeout);
  plain_.async_connect(results, [&](const boost::system::error_code& e, const auto&) { ec = e; });
  runIo();
  if (ec) throw EndpointFailure(fmt::format("cannot connect to {}: {}", endpoint.str(), ec.message()));
  ::fcntl(plain_.socket().native_handle(), F_SETFD, FD_CLOEXEC);
  if (tls == nullptr) return;
  tls_ = std::make_unique<beast::ssl_stream<beast::tcp_stream>>(std::move(plain_), *tls);
  // SNI for names (etcd serves one certificate whatever the name, but proxies may not); the certificate must name
  // the host we dialled: a DNS name or IP address in its subjectAltName.
  SSL_set_tlsext_host_name(tls_->native_handle(), endpoint.host.c_str());
  tls_->set_verify_callback(asio::ssl::host_name_verification(endpoint.host));
  lowest().expires_after(timeout);
  tls_->async_handshake(asio::ssl::stream_base::client, [&](const boost::system::error_code& e) { ec = e; });
  runIo();
  if (ec && tlsConfigurationError(ec))
    DTRAIN_THROW(EtcdRefusedError,
                 "TLS handshake with etcd at {} failed: {} (does --rdzv-conf cacert= name the CA that signed its "
                 "certificate, and does that certificate name {}? does etcd accept the client certificate given "
                 "with cert=/key=?)",
                 endpoint.str(), ec.message(), endpoint.host);
  if (ec) throw EndpointFailure(fmt::format("{}: TLS handshake: {}", endpoint.str(), ec.message()));
}

Http::~Http() = default;

beast::tcp_stream& Http::lowest() { return tls_ ? beast::get_lowest_layer(*tls_) : plain_; }

void Http::runIo() {
  io_.restart();
  io_.run();
}

void Http::send(const std::string& path, const std::string& body, Millis timeout, bool keepAlive,
                const std::string& authToken) {
  http::request<http::string_body> req{http::verb::post, path, 11};
  req.set(http::field::host, endpoint_.str());
  req.set(http::field::content_type, "application/json");
  if (!authToken.empty()) req.set(http::field::authorization, authToken);
  req.keep_alive(keepAlive);
  req.body() = body;
  req.prepare_payload();
  boost::system::error_code ec;
  lowest().expires_after(timeout);
  auto done = [&](const boost::system::error_code& e, size_t) { ec = e; };
  if (tls_)
    http::async_write(*tls_, req, done);
  else
    http::async_write(plain_, req, done);
  runIo();
  if (ec) throw EndpointFailure(fmt::format("{}: sending {}: {}", endpoint_.str(), path, ec.message()));
}

std::string Http::exchange(const std::string& path, const std::string& body, Millis timeout,
                           const std::string& authToken) {
  send(path, body, timeout, true, authToken);
  http::response<http::string_body> res;
  boost::system::error_code ec;
  lowest().expires_after(timeout);
  auto done = [&](const boost::system::error_code& e, size_t) { ec = e; };
  if (tls_)
    http::async_read(*tls_, buffer_, res, done);
  else
    http::async_read(plain_, buffer_, res, done);
  runIo();
  // TLS 1.3: a server that refuses our client certificate says so after the handshake, on the first read.
  if (ec && tlsConfigurationError(ec))
    DTRAIN_THROW(EtcdRefusedError,
                 "etcd at {} refused the TLS connection: {} (does it accept the client certificate given with "
                 "--rdzv-conf cert=/key=? an etcd with --client-cert-auth needs one signed by its trusted CA)",
                 endpoint_.str(), ec.message());
  if (ec) throw EndpointFailure(fmt::format("{}: reading the answer to {}: {}", endpoint_.str(), path, ec.message()));
  auto status = res.result_int();
  if (retryableStatus(status))
    throw EndpointFailure(fmt::format("{} answered {} to {}: {}", endpoint_.str(), status, path, res.body()));
  if (status != 200)
    throw HttpError(status, res.body(),
                    fmt::format("etcd at {} answered {} to {}: {}", endpoint_.str(), status, path, res.body()));
  return std::move(res.body());
}

bool Http::watch(const std::string& body, const Deadline& deadline, Millis requestTimeout, const std::string& authToken) {
  send("/v3/watch", body, std::min(requestTimeout, std::max(Millis(1), deadline.remaining())), false, authToken);
  http::response_parser<http::string_body> parser;
  parser.body_limit(boost::none);
  for (;;) {
    if (deadline.expired()) return false;
    boost::system::error_code ec;
    lowest().expires_after(deadline.remaining());
    auto done = [&](const boost::system::error_code& e, size_t) { ec = e; };
    if (tls_)
      http::async_read_some(*tls_, buffer_, parser, done);
    else
      http::async_read_some(plain_, buffer_, parser, done);
    runIo();
    if (ec == beast::error::timeout) return false;
    if (ec) throw EndpointFailure(fmt::format("{}: watch stream: {}", endpoint_.str(), ec.message()));
    if (parser.is_header_done() && parser.get().result_int() != 200)
      throw EndpointFailure(fmt::format("{} answered {} to a watch", endpoint_.str(), parser.get().result_int()));
    auto& text = parser.get().body();
    if (text.find("\"events\"") != std::string::npos) return true;
    if (text.find("\"canceled\":true") != std::string::npos || text.find("\"error\"") != std::string::npos)
      throw EndpointFailure(fmt::format("{}: watch ended: {}", endpoint_.str(), text.substr(0, 300)));
    if (parser.is_done()) throw EndpointFailure(fmt::format("{}: watch stream closed", endpoint_.str()));
  }
}

}  // namespace dtrain::rendezvous::etcd
