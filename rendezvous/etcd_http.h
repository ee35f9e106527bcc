// Internal to etcd_store.cpp: one HTTP/1.1 connection (plain or TLS) to one etcd endpoint, with a deadline on
// every exchange, and the TLS settings behind it. Not a public header.
//
// Beast's stream timeouts apply to asynchronous operations only, so each step is started asynchronously and the
// connection's private io_context is run until it completes (or its timer closes the socket): a blocking call
// with a deadline.
//
// Errors: EndpointFailure for what another endpoint (or a later try) may not have: refused or reset connections,
// timeouts, 5xx/408/409/429 answers. EtcdRefusedError (etcd_store.h) for what no retry fixes: the server's
// certificate does not verify against the CA, the server refused our client certificate, wrong user/password.
// Another 4xx answer is an Error naming the endpoint.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>

#include <memory>
#include <stdexcept>
#include <string>

#include "lib/common/clock.h"
#include "lib/common/net.h"
#include "rendezvous/etcd_store.h"

namespace dtrain::rendezvous::etcd {

// A retryable failure of one endpoint (connection, timeout, 5xx): the caller moves to the next endpoint.
struct EndpointFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// An HTTP answer that is not 200 and not retryable (4xx other than 408/409/429).
struct HttpError : std::runtime_error {
  HttpError(unsigned status, std::string body, const std::string& what)
      : std::runtime_error(what), status(status), body(std::move(body)) {}
  unsigned status;
  std::string body;
};

// The TLS client context for EtcdStoreOptions (tls, caCert, cert, key); throws EtcdRefusedError naming the
// --rdzv-conf key of a file that cannot be read or parsed.
std::shared_ptr<boost::asio::ssl::context> makeTlsContext(const EtcdStoreOptions& options);

class Http {
 public:
  // Connects (and with `tls`, completes the TLS handshake, verifying the server's certificate for endpoint.host).
  Http(const net::HostPort& endpoint, Millis timeout, boost::asio::ssl::context* tls);
  ~Http();

  // One request, one whole answer (the body). `authToken`: sent as the Authorization header when not empty.
  std::string exchange(const std::string& path, const std::string& body, Millis timeout, const std::string& authToken);
  // Streams a watch: true once a message carries events, false when `deadline` passes first.
  bool watch(const std::string& body, const Deadline& deadline, Millis requestTimeout, const std::string& authToken);

 private:
  void send(const std::string& path, const std::string& body, Millis timeout, bool keepAlive, const std::string& authToken);
  void runIo();
  boost::beast::tcp_stream& lowest();

  net::HostPort endpoint_;
  boost::asio::io_context io_;
  boost::beast::tcp_stream plain_;
  std::unique_ptr<boost::beast::ssl_stream<boost::beast::tcp_stream>> tls_;
  boost::beast::flat_buffer buffer_;
};

}  // namespace dtrain::rendezvous::etcd
