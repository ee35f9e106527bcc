// `dtrain store`: a standalone rendezvous store in the foreground, for jobs whose agents all connect to one
// store (`dtrain run --rdzv-endpoint HOST:PORT`) instead of node 0's agent hosting it.
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>

#include "apps/dtrain/commands.h"
#include "lib/common/log.h"
#include "lib/common/error.h"
#include "lib/common/net.h"
#include "lib/common/parse.h"
#include "lib/launch/http_server.h"
#include "lib/launch/metrics_hub.h"
#include "rendezvous/store.h"
#include "rendezvous/store_protocol.h"
#include "rendezvous/tcp_store_server.h"

namespace dtrain::app {

namespace {

struct StoreArgs {
  std::string host;  // --host / --rdzv-bind; empty: chosen by bindHost()
  int port = rendezvous::kDefaultPort;  // torchrun's default rendezvous port
  bool quiet = false;
  int metricsPort = -1;
  std::string token, tokenFile;
  // Limits (rendezvous::TcpStoreLimits); sizes and durations as text, parsed with dtrain's one wording.
  size_t maxConnections = rendezvous::TcpStoreLimits{}.maxConnections;
  std::string maxBuffered = "512MiB", maxQueuedReplies = "4MiB", maxStoredBytes = "1GiB";
  std::string handshakeTimeout = "10s", idleTimeout = "0";
  size_t maxKeys = rendezvous::TcpStoreLimits{}.maxKeys;
  size_t maxKeysPerRequest = rendezvous::TcpStoreLimits{}.maxKeysPerRequest;
};

}  // namespace

std::string resolveRdzvToken(const std::string& token, const std::string& tokenFile) {
  if (tokenFile.empty()) return token;
  DTRAIN_CHECK_AS(UsageError, token.empty(),
                  "--rdzv-token and --rdzv-token-file both give the store's token (DTRAIN_RDZV_TOKEN counts as "
                  "--rdzv-token): give one");
  DTRAIN_CHECK_AS(UsageError, !std::filesystem::is_directory(tokenFile),
                  "--rdzv-token-file {}: is a folder (expected a file whose first line is the token)", tokenFile);
  std::ifstream in(tokenFile);
  const int err = errno;
  DTRAIN_CHECK_AS(UsageError, in.good(),
                  "--rdzv-token-file {}: cannot read it: {} (expected a readable file whose first line is the token)",
                  tokenFile, std::strerror(err));
  std::string line;
  std::getline(in, line);
  while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.pop_back();
  DTRAIN_CHECK_AS(UsageError, !line.empty(), "--rdzv-token-file {}: the first line is empty", tokenFile);
  return line;
}

namespace {

rendezvous::TcpStoreLimits limitsFrom(const StoreArgs& a) {
  rendezvous::TcpStoreLimits l;
  l.maxConnections = a.maxConnections;
  l.maxBufferedBytes = static_cast<size_t>(parse::bytesFlag("--max-buffered", a.maxBuffered, true));
  DTRAIN_CHECK_AS(UsageError, l.maxBufferedBytes >= rendezvous::proto::kMaxFrameBytes + (64 << 10),
               "--max-buffered {}: must be at least {} bytes (one maximal frame plus 64 KiB)", a.maxBuffered,
               rendezvous::proto::kMaxFrameBytes + (64 << 10));
  l.maxQueuedReplyBytes = static_cast<size_t>(parse::bytesFlag("--max-queued-replies", a.maxQueuedReplies, true));
  l.handshakeTimeout = parse::durationFlag("--handshake-timeout", a.handshakeTimeout);
  l.idleTimeout = parse::durationFlag("--idle-timeout", a.idleTimeout);
  l.maxKeys = a.maxKeys;
  l.maxStoredBytes = static_cast<size_t>(parse::bytesFlag("--max-stored-bytes", a.maxStoredBytes, true));
  l.maxKeysPerRequest = a.maxKeysPerRequest;
  return l;
}

// Where the store listens. An explicit --host/--rdzv-bind is obeyed. Without one, a store with a token serves
// every interface (clients must prove the token: the usual standalone store that agents on other nodes reach),
// and a store without a token refuses to start: an unauthenticated store on the network lets anyone read and
// forge every job's rendezvous state, so that takes an explicit choice (docs/store.md, "Where it listens").
std::string bindHost(const StoreArgs& a, const std::string& token) {
  if (!a.host.empty()) return a.host;
  DTRAIN_CHECK_AS(UsageError, !token.empty(),
                  "dtrain store: no --rdzv-token, so the store would serve anyone who can reach it. Give a shared "
                  "secret with --rdzv-token T (or --rdzv-token-file F, or DTRAIN_RDZV_TOKEN) and the same one to "
                  "dtrain run; or say where it listens: --host 127.0.0.1 (this machine only) or --host 0.0.0.0 "
                  "(every interface, unauthenticated)");
  return "0.0.0.0";
}

int runStore(const StoreArgs& a) {
  auto limits = limitsFrom(a);  // bad flag values fail before anything starts
  auto token = resolveRdzvToken(a.token, a.tokenFile);
  const std::string host = bindHost(a, token);
  if (a.quiet) log::setLevel(log::Level::kWarn);
  // Block the stop signals before the server's thread exists, then wait for them synchronously: no handler,
  // nothing async-signal-unsafe, and the io thread never sees them.
  sigset_t stopSignals;
  sigemptyset(&stopSignals);
  sigaddset(&stopSignals, SIGINT);
  sigaddset(&stopSignals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stopSignals, nullptr);

  rendezvous::TcpStoreServerOptions options;
  options.host = host;
  options.port = static_cast<uint16_t>(a.port);
  options.limits = limits;
  options.token = token;
  auto server = rendezvous::TcpStoreServer::start(options);
  std::unique_ptr<launch::HttpServer> metrics;
  if (a.metricsPort >= 0) {
    metrics = std::make_unique<launch::HttpServer>(
        host, a.metricsPort,
        [s = server.get()](std::string_view target) {
          if (target == "/metrics" || target.substr(0, 9) == "/metrics?")
            return launch::HttpResponse{200, "text/plain; version=0.0.4; charset=utf-8",
                                        launch::renderStoreMetrics(s->stats())};
          return launch::HttpResponse{404, "text/plain; charset=utf-8", "not found: this endpoint serves /metrics\n"};
        },
        "--metrics-port");
    log::info("store: serving Prometheus metrics on http://{}/metrics", net::joinHostPort(host, metrics->port()));
  }
  // Exactly one line on stdout, flushed, once connections are accepted: scripts and tests read the port here.
  std::printf("dtrain store listening on %s\n", server->address().c_str());
  std::fflush(stdout);
  log::info("store: protocol v{}, host {}, pid {}; stop with Ctrl-C or SIGTERM", rendezvous::proto::kVersion,
            net::hostname(), ::getpid());
  // Where it listens and whether it authenticates, at start: an open store on the network is a warning (shown
  // under --quiet too), since anyone who can reach it can read and forge the rendezvous state.
  const bool everywhere = host == "0.0.0.0" || host == "::" || host == "[::]";
  const std::string where = everywhere ? "every interface" : (net::isLoopback(host) ? "loopback only" : "this address");
  if (!token.empty()) {
    log::info("store: listening on {} ({}); authentication on: clients must prove the --rdzv-token", server->address(),
              where);
  } else if (net::isLoopback(host)) {
    log::info("store: listening on {} ({}); authentication off (no --rdzv-token)", server->address(), where);
  } else {
    log::warn("store: listening on {} ({}) WITHOUT authentication (no --rdzv-token): anyone who can reach this "
              "port can read and forge the rendezvous state of every job using it", server->address(), where);
  }

  int sig = 0;
  while (sigwait(&stopSignals, &sig) != 0) {
  }
  auto stats = server->stats();
  metrics.reset();
  server->stop();
  log::info("store: {} received, stopped ({} connections, {} requests, {} protocol errors)", ::strsignal(sig),
            stats.connectionsAccepted, stats.requests, stats.protocolErrors);
  return 0;
}

}  // namespace

void addStoreCommand(CLI::App& root, Action& action) {
  auto args = std::make_shared<StoreArgs>();
  auto* sub = root.add_subcommand("store", "Run a standalone rendezvous store (TCP) until SIGINT/SIGTERM");
  sub->add_option("--host,--rdzv-bind", args->host,
                  "Address to listen on; default: every interface when --rdzv-token is given, else required "
                  "(127.0.0.1: this machine only; 0.0.0.0: every interface, unauthenticated)");
  sub->add_option("--port", args->port, "TCP port to listen on; 0 picks a free one (printed on stdout)")
      ->check(CLI::Range(0, 65535))
      ->capture_default_str();
  sub->add_option("--rdzv-token", args->token,
                  "Shared secret every client must prove it knows (dtrain run --rdzv-token); default: none")
      ->envname("DTRAIN_RDZV_TOKEN");
  sub->add_option("--rdzv-token-file", args->tokenFile, "Read the shared secret from the first line of this file");
  sub->add_option("--max-connections", args->maxConnections, "Connections over this are closed at once")
      ->check(atLeastOne())
      ->capture_default_str();
  sub->add_option("--max-buffered", args->maxBuffered,
                   "Memory for all connections' partial requests and queued replies (at least 129MiB)")
      ->capture_default_str();
  sub->add_option("--max-queued-replies", args->maxQueuedReplies,
                  "Per connection: stop answering a client whose unread replies exceed this")
      ->capture_default_str();
  sub->add_option("--handshake-timeout", args->handshakeTimeout,
                  "Close connections that do not complete the handshake in time; 0 = never")
      ->capture_default_str();
  sub->add_option("--idle-timeout", args->idleTimeout,
                  "Close connections without a request (or a parked wait) for this long; 0 = never")
      ->capture_default_str();
  sub->add_option("--max-keys", args->maxKeys, "Quota: number of keys")
      ->check(atLeastOne())
      ->capture_default_str();
  sub->add_option("--max-stored-bytes", args->maxStoredBytes, "Quota: bytes of keys and values (+64 per key)")
      ->capture_default_str();
  sub->add_option("--max-keys-per-request", args->maxKeysPerRequest, "Keys in one check or wait")
      ->check(atLeastOne())
      ->capture_default_str();
  sub->add_option("--metrics-port", args->metricsPort,
                  "Serve Prometheus metrics of the store at http://HOST:PORT/metrics (0: a free port, logged)")
      ->check(CLI::Range(0, 65535));
  sub->add_flag("--quiet", args->quiet, "Log only warnings and errors (the listening line is still printed)");
  sub->footer(exitCodesHelp({{"0", "stopped by SIGINT or SIGTERM"}, {"1", ""}, {"3", ""}, {"5", ""}}));
  sub->callback([&action, args] { action = [args] { return runStore(*args); }; });
}

}  // namespace dtrain::app
