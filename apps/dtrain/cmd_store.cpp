// `dtrain store`: a standalone rendezvous store in the foreground, for jobs whose agents all connect to one
// store (`dtrain run --rdzv-endpoint HOST:PORT`) instead of node 0's agent hosting it.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <memory>

#include "apps/dtrain/commands.h"
#include "lib/common/log.h"
#include "lib/common/net.h"
#include "rendezvous/store.h"
#include "rendezvous/store_protocol.h"
#include "rendezvous/tcp_store_server.h"

namespace dtrain::app {

namespace {

struct StoreArgs {
  std::string host = "0.0.0.0";
  int port = rendezvous::kDefaultPort;  // torchrun's default rendezvous port
  bool quiet = false;
};

int runStore(const StoreArgs& a) {
  if (a.quiet) log::setLevel(log::Level::kWarn);
  // Block the stop signals before the server's thread exists, then wait for them synchronously: no handler,
  // nothing async-signal-unsafe, and the io thread never sees them.
  sigset_t stopSignals;
  sigemptyset(&stopSignals);
  sigaddset(&stopSignals, SIGINT);
  sigaddset(&stopSignals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stopSignals, nullptr);

  rendezvous::TcpStoreServerOptions options;
  options.host = a.host;
  options.port = static_cast<uint16_t>(a.port);
  auto server = rendezvous::TcpStoreServer::start(options);
  // Exactly one line on stdout, flushed, once connections are accepted: scripts and tests read the port here.
  std::printf("dtrain store listening on %s\n", server->address().c_str());
  std::fflush(stdout);
  log::info("store: protocol v{}, host {}, pid {}; stop with Ctrl-C or SIGTERM", rendezvous::proto::kVersion,
            net::hostname(), ::getpid());

  int sig = 0;
  while (sigwait(&stopSignals, &sig) != 0) {
  }
  auto stats = server->stats();
  server->stop();
  log::info("store: {} received, stopped ({} connections, {} requests, {} protocol errors)", ::strsignal(sig),
            stats.connectionsAccepted, stats.requests, stats.protocolErrors);
  return 0;
}

}  // namespace

void addStoreCommand(CLI::App& root, Action& action) {
  auto args = std::make_shared<StoreArgs>();
  auto* sub = root.add_subcommand("store", "Run a standalone rendezvous store (TCP) until SIGINT/SIGTERM");
  sub->add_option("--host", args->host, "Address to listen on")->capture_default_str();
  sub->add_option("--port", args->port, "TCP port to listen on; 0 picks a free one (printed on stdout)")
      ->check(CLI::Range(0, 65535))
      ->capture_default_str();
  sub->add_flag("--quiet", args->quiet, "Log only warnings and errors (the listening line is still printed)");
  sub->callback([&action, args] { action = [args] { return runStore(*args); }; });
}

}  // namespace dtrain::app
