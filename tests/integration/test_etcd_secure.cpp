// --rdzv-backend etcd with TLS and etcd authentication, against a real etcd (Debian etcd-server): certificates
// the test makes with openssl (a CA, a server certificate for IP 127.0.0.1, a client certificate, and a second
// CA that signed nothing of this etcd), an etcd serving https with --client-cert-auth, and an etcd with
// `auth enable`. The right settings are served (agents and their workers); a wrong CA, a missing client
// certificate or a wrong password is refused at once, clearly, with exit 4 before any worker starts. Skipped
// (with a message) when etcd or openssl is missing; scripts/setup installs both.
#include <doctest/doctest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "lib/common/error.h"
#include "rendezvous/etcd_store.h"
#include "tests/integration/launch_helpers.h"
#include "tests/integration/train_helpers.h"
#include "tests/support/etcd_cluster.h"

using namespace dtrain;
using namespace dtrain::testing;
using namespace std::chrono_literals;

namespace {

#define SKIP_WITHOUT_ETCD_OR_OPENSSL()                                                                \
  if (!EtcdCluster::available() || ::access("/usr/bin/openssl", X_OK) != 0) {                        \
    MESSAGE("skipped: etcd or openssl is not installed (scripts/setup installs etcd-server, openssl)"); \
    return;                                                                                          \
  }

// A temporary directory with ca.pem, server.pem/key, client.pem/key (signed by ca) and other-ca.pem.
struct Certificates {
  std::filesystem::path dir;
  Certificates() {
    dir = std::filesystem::temp_directory_path() / uniqueRunId("etcd-tls");
    std::filesystem::create_directories(dir);
    std::ofstream(dir / "server.ext") << "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n";
    std::ofstream(dir / "client.ext") << "extendedKeyUsage=clientAuth\n";
    // EC keys: quick to make on a loaded machine.
    const std::string script =
        "set -e; cd " + dir.string() + "; k='-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'; "
        "openssl req -x509 $k -keyout ca.key -out ca.pem -days 2 -subj /CN=dtrain-test-ca; "
        "openssl req -x509 $k -keyout other-ca.key -out other-ca.pem -days 2 -subj /CN=dtrain-other-ca; "
        "openssl req $k -keyout server.key -out server.csr -subj /CN=127.0.0.1; "
        "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 "
        "-extfile server.ext; "
        "openssl req $k -keyout client.key -out client.csr -subj /CN=root; "
        "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2 "
        "-extfile client.ext";
    auto r = run({"/bin/sh", "-c", script}, RunOptions{60s});
    REQUIRE_MESSAGE(r.exitCode == 0, std::string(r.out + r.err));
  }
  ~Certificates() {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
  std::string operator()(const char* name) const { return (dir / name).string(); }
  EtcdTls tls() const {
    return {(*this)("ca.pem"), (*this)("server.pem"), (*this)("server.key"), (*this)("client.pem"), (*this)("client.key")};
  }
};

rendezvous::EtcdStoreOptions options(const std::string& endpoint) {
  rendezvous::EtcdStoreOptions o;
  o.endpoints = *rendezvous::parseEtcdEndpoints(endpoint, &o.tls);
  o.prefix = "/t/";
  o.connectTimeout = 120s;  // a refusal must not wait for it: it is raised at once
  return o;
}

// `dtrain run` of one node through etcd: with `job` a 2-worker training job (its workers bootstrap through
// etcd too), else a program that says it started.
std::vector<std::string> agent(const std::string& endpoint, const std::string& conf, const std::string& job = "") {
  std::vector<std::string> a{"--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "etcd", "--rdzv-endpoint",
                             endpoint, "--rdzv-id", uniqueRunId("etcd-sec"), "--rdzv-conf", conf, "--rdzv-timeout", "120s"};
  if (job.empty()) {
    for (const char* s : {"--", "/bin/sh", "-c", "echo worker started"}) a.push_back(s);
  } else {
    a.push_back(job);
  }
  return runArgs(a);
}

std::string writeJob(const std::filesystem::path& dir) {
  auto job = smallJob(64, 8, 1);
  job["checkpoint"] = false;
  auto path = (dir / "job.json").string();
  std::ofstream(path) << job.dump();
  return path;
}

}  // namespace

TEST_CASE("etcd over TLS: the CA and a client certificate are served; a wrong CA or none is refused at once") {
  SKIP_WITHOUT_ETCD_OR_OPENSSL();
  Certificates certs;
  EtcdCluster etcd(1, certs.tls());
  auto o = options(etcd.endpoint(0));
  REQUIRE(o.tls);
  o.caCert = certs("ca.pem");
  o.cert = certs("client.pem");
  o.key = certs("client.key");
  auto s = rendezvous::EtcdStore::connect(o);
  s->set("k", "v");
  CHECK(s->get("k", 10s) == "v");
  auto r = s->batch({rendezvous::StoreOp::set("a", "1"), rendezvous::StoreOp::tryGet("k")});
  CHECK(r[1].value == "v");
  CHECK(s->address() == "etcd://" + etcd.endpoint(0));
  CHECK(s->wait({"k"}, 10s));  // a watch over TLS

  auto wrongCa = o;
  wrongCa.caCert = certs("other-ca.pem");
  CHECK_THROWS_WITH_AS(rendezvous::EtcdStore::connect(wrongCa), doctest::Contains("cacert"), rendezvous::EtcdRefusedError);
  auto noClientCert = o;
  noClientCert.cert.clear();
  noClientCert.key.clear();
  CHECK_THROWS_WITH_AS(rendezvous::EtcdStore::connect(noClientCert), doctest::Contains("client certificate"),
                       rendezvous::EtcdRefusedError);

  // dtrain run: a training job whose workers reach etcd over TLS too; a wrong CA exits 4 before any worker.
  auto job = writeJob(certs.dir);
  const std::string conf = fmt::format("cacert={},cert={},key={}", certs("ca.pem"), certs("client.pem"), certs("client.key"));
  RunOptions ro;
  ro.timeout = 180s;
  auto ok = run(agent(etcd.endpoint(0), conf, job), ro);
  INFO(ok.out << ok.err);
  CHECK(ok.exitCode == 0);
  CHECK(ok.out.find("[n0 r0] done:") != std::string::npos);
  auto bad = run(agent(etcd.endpoint(0), fmt::format("cacert={},cert={},key={}", certs("other-ca.pem"),
                                                     certs("client.pem"), certs("client.key"))),
                 ro);
  INFO(bad.out << bad.err);
  CHECK(bad.exitCode == 4);
  CHECK(bad.err.find("TLS handshake with etcd at 127.0.0.1") != std::string::npos);
  CHECK(bad.err.find("cacert") != std::string::npos);
  CHECK(bad.out.find("worker started") == std::string::npos);
  // Settings that cannot work are usage errors (exit 3) naming the key.
  auto missing = run(agent(etcd.endpoint(0), "cacert=/nonexistent/ca.pem"), ro);
  CHECK(missing.exitCode == 3);
  CHECK(missing.err.find("cacert=/nonexistent/ca.pem: no such file") != std::string::npos);
  auto unknown = run(agent(etcd.endpoint(0), "colour=blue"), ro);
  CHECK(unknown.exitCode == 3);
  CHECK(unknown.err.find("unknown key 'colour'") != std::string::npos);
}

TEST_CASE("etcd with authentication: the user and password are served; a wrong password or none is refused") {
  SKIP_WITHOUT_ETCD_OR_OPENSSL();
  EtcdCluster etcd(1);
  const auto ep = "--endpoints=" + etcd.endpoint(0);
  for (std::vector<std::string> cmd : {std::vector<std::string>{"user", "add", "root:s3cret"},
                                       std::vector<std::string>{"user", "grant-role", "root", "root"},
                                       std::vector<std::string>{"auth", "enable"}}) {
    cmd.insert(cmd.begin(), ep);
    auto r = run(etcd.etcdctl(cmd), RunOptions{30s});
    // grant-role may say the role is granted already; the others must succeed
    if (cmd[1] != "user" || cmd[2] != "grant-role") REQUIRE_MESSAGE(r.exitCode == 0, std::string(r.out + r.err));
  }
  auto o = options(etcd.endpoint(0));
  o.user = "root";
  o.password = "s3cret";
  auto s = rendezvous::EtcdStore::connect(o);
  s->set("k", "v");
  CHECK(s->get("k", 10s) == "v");
  std::thread writer([&] { rendezvous::EtcdStore::connect(o)->set("later", "1"); });
  CHECK(s->wait({"later"}, 30s));  // a watch carries the token too
  writer.join();

  // A token etcd stops accepting is replaced, not fatal: disabling and enabling authentication drops every simple
  // token etcd issued (as a restart or the token TTL does), and the store's next calls authenticate again.
  for (const char* step : {"disable", "enable"}) {
    std::vector<std::string> cmd{ep, "auth", step};
    if (std::string(step) == "disable") cmd.insert(cmd.begin() + 1, {"--user", "root:s3cret"});
    auto r = run(etcd.etcdctl(cmd), RunOptions{30s});
    REQUIRE_MESSAGE(r.exitCode == 0, std::string(r.out + r.err));
  }
  s->set("after_reauth", "v2");
  CHECK(s->get("after_reauth", 10s) == "v2");
  CHECK(s->get("k", 10s) == "v");
  std::thread writer2([&] { rendezvous::EtcdStore::connect(o)->set("later2", "1"); });
  CHECK(s->wait({"later2"}, 30s));
  writer2.join();

  auto wrong = o;
  wrong.password = "guess";
  CHECK_THROWS_WITH_AS(rendezvous::EtcdStore::connect(wrong), doctest::Contains("wrong user name or password"),
                       rendezvous::EtcdRefusedError);
  auto none = o;
  none.user.clear();
  none.password.clear();
  CHECK_THROWS_WITH_AS(rendezvous::EtcdStore::connect(none), doctest::Contains("requires authentication"),
                       rendezvous::EtcdRefusedError);

  RunOptions ro;
  ro.timeout = 180s;
  auto ok = run(agent(etcd.endpoint(0), "user=root,password=s3cret"), ro);
  INFO(ok.out << ok.err);
  CHECK(ok.exitCode == 0);
  CHECK(ok.out.find("worker started") != std::string::npos);
  auto bad = run(agent(etcd.endpoint(0), "user=root,password=guess"), ro);
  INFO(bad.out << bad.err);
  CHECK(bad.exitCode == 4);
  CHECK(bad.err.find("wrong user name or password") != std::string::npos);
  CHECK(bad.out.find("worker started") == std::string::npos);
}
