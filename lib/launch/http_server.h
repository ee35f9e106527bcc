// A minimal HTTP/1.1 server (Boost.Beast) for the agent's monitoring endpoints (/metrics; later pages).
//
// It runs on a thread and an io_context of its own, so a slow or stuck client never delays the agent's
// supervision loop; each connection has a 10 s budget for its request and its reply and is closed after one
// answer (Connection: close). Only GET and HEAD are served; anything else is 405. When accept() fails (the
// process is out of descriptors) it logs once and retries every 50 ms instead of spinning on the listener.
// The handler is called on the server's thread: it must be thread-safe with respect to whatever it reads
// (the metrics hub copies its state under a short lock) and must not block.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

namespace dtrain::launch {

struct HttpResponse {
  int status = 200;
  std::string contentType = "text/plain; charset=utf-8";
  std::string body;
};
// Called with the request target (path and query, "/metrics?x=1").
using HttpHandler = std::function<HttpResponse(std::string_view target)>;

// A plain GET to host:port (the client side, for `dtrain top` and `dtrain debug dump`): connect (one attempt: a
// refused connection fails at once), request, read until the server closes, all within `timeout`. Throws
// dtrain::NetworkError (net::ConnectError when it cannot connect; or TimeoutError) naming the address. Blocks the
// calling thread; thread-safe (askAgents calls it from several threads).
HttpResponse httpGet(const std::string& host, int port, const std::string& target, std::chrono::milliseconds timeout);

class HttpServer {
 public:
  // Listens on host:port (port 0: a free one, see port()) and starts serving. Throws dtrain::Error with
  // ExitCode::kAddressInUse, naming `flag`, when the address cannot be bound.
  HttpServer(const std::string& host, int port, HttpHandler handler, const std::string& flag);
  ~HttpServer();  // stops accepting, drops open connections, joins the thread
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  int port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dtrain::launch
