// `dtrain run` launching arbitrary programs: the environment contract, multi-node on loopback, output.
#include <doctest/doctest.h>

#include <filesystem>

#include "tests/integration/launch_helpers.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;

TEST_CASE("standalone: every rank gets the torchrun environment contract") {
  auto r = run(runArgs({"--standalone", "--nproc-per-node", "2", "--max-restarts", "3", "--", "env"}),
               {.timeout = 30s, .unsetEnv = {"OMP_NUM_THREADS"}});
  INFO(r.err);
  REQUIRE(r.exitCode == 0);
  auto env = envByRank(r.out);
  REQUIRE(env.size() == 2);
  for (int rank = 0; rank < 2; ++rank) {
    auto& e = env[rank];
    CHECK(e["RANK"] == std::to_string(rank));
    CHECK(e["LOCAL_RANK"] == std::to_string(rank));
    CHECK(e["WORLD_SIZE"] == "2");
    CHECK(e["LOCAL_WORLD_SIZE"] == "2");
    CHECK(e["GROUP_RANK"] == "0");
    CHECK(e["GROUP_WORLD_SIZE"] == "1");
    CHECK(e["MASTER_ADDR"] == "127.0.0.1");
    CHECK(std::stoi(e["MASTER_PORT"]) > 0);
    CHECK(e["DTRAIN_RESTART_COUNT"] == "0");
    CHECK(e["DTRAIN_MAX_RESTARTS"] == "3");
    CHECK(e["TORCHELASTIC_RESTART_COUNT"] == "0");
    CHECK(e["TORCHELASTIC_MAX_RESTARTS"] == "3");
    CHECK(e["TORCHELASTIC_RUN_ID"] == e["DTRAIN_RUN_ID"]);
    CHECK(!e["DTRAIN_RUN_ID"].empty());
    CHECK(e["DTRAIN_STORE"].rfind("127.0.0.1:", 0) == 0);
    CHECK(e["OMP_NUM_THREADS"] == "1");
  }
  CHECK(env[0]["MASTER_PORT"] == env[1]["MASTER_PORT"]);
}

TEST_CASE("a user's OMP_NUM_THREADS is kept, and a single worker is not limited") {
  auto r = run(runArgs({"--standalone", "--nproc-per-node", "2", "--", "env"}), {.timeout = 30s, .env = {{"OMP_NUM_THREADS", "4"}}});
  REQUIRE(r.exitCode == 0);
  CHECK(envByRank(r.out)[1]["OMP_NUM_THREADS"] == "4");
  auto one = run(runArgs({"--standalone", "--nproc-per-node", "1", "--", "env"}), {.timeout = 30s, .unsetEnv = {"OMP_NUM_THREADS"}});
  REQUIRE(one.exitCode == 0);
  CHECK(envByRank(one.out)[0].count("OMP_NUM_THREADS") == 0);
}

TEST_CASE("two nodes x two workers on loopback: ranks contiguous per node, one master") {
  int port = freePort();
  std::string id = uniqueRunId("2x2");
  auto common = [&](int nodeRank) {
    return runArgs({"--nnodes", "2", "--nproc-per-node", "2", "--node-rank", std::to_string(nodeRank), "--rdzv-endpoint",
                    fmt::format("127.0.0.1:{}", port), "--rdzv-id", id, "--rdzv-timeout", "60s", "--", "env"});
  };
  Background node1(common(1));  // joins first: it waits for node 0, which hosts the store
  auto r0 = run(common(0), {.timeout = 60s});
  auto r1 = node1.wait(60s);
  INFO(r0.err, r1.err);
  REQUIRE(r0.exitCode == 0);
  REQUIRE(r1.exitCode == 0);
  auto e0 = envByRank(r0.out);
  auto e1 = envByRank(r1.out);
  REQUIRE(e0.size() == 2);
  REQUIRE(e1.size() == 2);
  CHECK(e0.count(0) == 1);
  CHECK(e0.count(1) == 1);
  CHECK(e1.count(2) == 1);
  CHECK(e1.count(3) == 1);
  for (auto* env : {&e0, &e1}) {
    for (auto& [rank, e] : *env) {
      CHECK(e["RANK"] == std::to_string(rank));
      CHECK(e["LOCAL_RANK"] == std::to_string(rank % 2));
      CHECK(e["WORLD_SIZE"] == "4");
      CHECK(e["GROUP_RANK"] == std::to_string(rank / 2));
      CHECK(e["GROUP_WORLD_SIZE"] == "2");
      CHECK(e["MASTER_ADDR"] == "127.0.0.1");
      CHECK(e["MASTER_PORT"] == e0[0]["MASTER_PORT"]);
      CHECK(e["DTRAIN_RUN_ID"] == id);
      CHECK(e["DTRAIN_STORE"] == fmt::format("127.0.0.1:{}", port));
    }
  }
  CHECK(e0[0]["MASTER_PORT"] != std::to_string(port));  // torch's own store needs a port of its own
}

TEST_CASE("nodes may run different numbers of workers") {
  int port = freePort();
  std::string id = uniqueRunId("hetero");
  auto args = [&](int nodeRank, int nproc) {
    return runArgs({"--nnodes", "2", "--nproc-per-node", std::to_string(nproc), "--node-rank", std::to_string(nodeRank),
                    "--rdzv-endpoint", fmt::format("127.0.0.1:{}", port), "--rdzv-id", id, "--", "env"});
  };
  Background node0(args(0, 1));
  auto r1 = run(args(1, 3), {.timeout = 60s});
  auto r0 = node0.wait(60s);
  REQUIRE(r0.exitCode == 0);
  REQUIRE(r1.exitCode == 0);
  auto e0 = envByRank(r0.out);
  auto e1 = envByRank(r1.out);
  REQUIRE(e0.size() == 1);
  REQUIRE(e1.size() == 3);
  CHECK(e0[0]["LOCAL_WORLD_SIZE"] == "1");
  for (int rank = 1; rank <= 3; ++rank) {
    CHECK(e1[rank]["WORLD_SIZE"] == "4");
    CHECK(e1[rank]["LOCAL_RANK"] == std::to_string(rank - 1));
    CHECK(e1[rank]["LOCAL_WORLD_SIZE"] == "3");
  }
}

TEST_CASE("console lines are prefixed by node and rank and never interleave") {
  // Each worker writes 2000 lines quickly, in small writes, racing the other.
  std::string script = "i=0; while [ $i -lt 2000 ]; do echo \"line-$RANK-$i-abcdefghijklmnopqrstuvwxyz\"; i=$((i+1)); done";
  auto r = run(runArgs({"--standalone", "--nproc-per-node", "2", "--", "sh", "-c", script}), {.timeout = 60s});
  REQUIRE(r.exitCode == 0);
  int counts[2] = {0, 0};
  std::istringstream in(r.out);
  std::string line;
  while (std::getline(in, line)) {
    int node, rank, rankAgain, i;
    char tail[64];
    REQUIRE_MESSAGE(std::sscanf(line.c_str(), "[n%d r%d] line-%d-%d-%63s", &node, &rank, &rankAgain, &i, tail) == 5, line);
    CHECK(rank == rankAgain);
    CHECK(std::string(tail) == "abcdefghijklmnopqrstuvwxyz");
    counts[rank]++;
  }
  CHECK(counts[0] == 2000);
  CHECK(counts[1] == 2000);
}

TEST_CASE("--local-ranks-filter shows only the chosen ranks") {
  auto r = run(runArgs({"--standalone", "--nproc-per-node", "3", "--local-ranks-filter", "1", "--", "sh", "-c",
                        "echo hello-$RANK"}),
               {.timeout = 30s});
  REQUIRE(r.exitCode == 0);
  CHECK(linesWith(r.out, "hello-").size() == 1);
  CHECK(r.out.find("[n0 r1] hello-1") != std::string::npos);
}

TEST_CASE("--log-dir keeps per-attempt, per-rank files; --redirects keeps them off the console") {
  std::string dir = tempDir("logs");
  auto r = run(runArgs({"--standalone", "--rdzv-id", "logs1", "--nproc-per-node", "2", "--log-dir", dir, "--redirects",
                        "1", "--", "sh", "-c", "echo out-$RANK; echo err-$RANK >&2"}),
               {.timeout = 30s});
  REQUIRE(r.exitCode == 0);
  CHECK(linesWith(r.out, "out-").empty());         // stdout redirected to files only
  CHECK(linesWith(r.err, "err-").size() == 2);      // stderr still on the console
  for (int rank = 0; rank < 2; ++rank) {
    auto base = fmt::format("{}/logs1/attempt_0/{}/", dir, rank);
    CHECK(readFile(base + "stdout.log") == fmt::format("out-{}\n", rank));
    CHECK(readFile(base + "stderr.log") == fmt::format("err-{}\n", rank));
  }
}

TEST_CASE("torchrun's --no-python, --monitor-interval and --start-method are accepted (no effect)") {
  // A torchrun command line with them failed with "The following argument was not expected" (exit 3).
  auto r = run(runArgs({"--standalone", "--nproc_per_node=2", "--monitor_interval=0.1", "--start_method=spawn",
                        "--no_python", "--", "sh", "-c", "echo rank=$RANK"}),
               {.timeout = 30s});
  INFO(r.out, r.err);
  CHECK(r.exitCode == 0);
  CHECK(linesWith(r.out, "rank=").size() == 2);
  auto dashes = run(runArgs({"--standalone", "--no-python", "--monitor-interval", "5", "--start-method", "fork",
                             "--dry-run", "--", "true"}),
                    {.timeout = 30s});
  CHECK(dashes.exitCode == 0);
  CHECK_MESSAGE(dashes.out.find(" node_rank=0 ") != std::string::npos, dashes.out);  // one node is node 0, not -1
  auto bad = run(runArgs({"--standalone", "--start-method", "thread", "--", "true"}), {.timeout = 30s});
  CHECK(bad.exitCode == 3);
  CHECK(bad.err.find("--start-method") != std::string::npos);
}

TEST_CASE("torchrun's --master-addr / --master-port make the endpoint; --master-port alone is 127.0.0.1:PORT") {
  auto plan = [](std::vector<std::string> flags) {
    flags.insert(flags.end(), {"--dry-run", "--", "true"});
    return run(runArgs(flags), {.timeout = 30s, .unsetEnv = {"DTRAIN_MASTER_PORT", "DTRAIN_MASTER_ADDR"}});
  };
  auto both = plan({"--master-addr", "127.0.0.1", "--master-port", "29511"});
  CHECK(both.exitCode == 0);
  CHECK(both.out.find("rdzv_endpoint=127.0.0.1:29511 ") != std::string::npos);
  // torchrun's --master_addr defaults to 127.0.0.1: the port alone was ignored (the store took 29400), and a 2-node
  // launch said it needed --rdzv-endpoint.
  auto port = plan({"--master-port", "29511"});
  INFO(port.out, port.err);
  CHECK(port.exitCode == 0);
  CHECK(port.out.find("rdzv_endpoint=127.0.0.1:29511 ") != std::string::npos);
  auto twoNodes = plan({"--nnodes", "2", "--node-rank", "0", "--master-port", "29511"});
  CHECK(twoNodes.exitCode == 0);
  CHECK(twoNodes.out.find("rdzv_endpoint=127.0.0.1:29511 ") != std::string::npos);
  // An IPv6 --master-addr: the endpoint is written [ADDR]:PORT (it was "::1:29511", read back as a host of that
  // name on port 29400); a port after a bare IPv6 address is refused, naming the bracketed form.
  auto v6 = plan({"--master-addr", "::1", "--master-port", "29511"});
  CHECK(v6.exitCode == 0);
  CHECK_MESSAGE(v6.out.find("rdzv_endpoint=[::1]:29511 ") != std::string::npos, v6.out);
  auto v6bracketed = plan({"--master-addr", "[::1]", "--master-port", "29511"});
  CHECK_MESSAGE(v6bracketed.out.find("rdzv_endpoint=[::1]:29511 ") != std::string::npos, v6bracketed.out);
  auto v6bad = plan({"--rdzv-endpoint", "::1:29511"});
  CHECK(v6bad.exitCode == 3);
  CHECK_MESSAGE(v6bad.err.find("--rdzv-endpoint ::1:29511: expected HOST or HOST:PORT ([ADDR]:PORT for an IPv6 "
                               "address)") != std::string::npos,
                v6bad.err);
  // An explicit endpoint wins, as in torchrun.
  auto endpoint = plan({"--rdzv-endpoint", "127.0.0.1:29600", "--master-port", "29511"});
  CHECK(endpoint.out.find("rdzv_endpoint=127.0.0.1:29600 ") != std::string::npos);
  // A port out of range names --master-port (it was ignored, or reported as --rdzv-endpoint 127.0.0.1:99999).
  for (const char* bad : {"99999", "-3", "0"}) {
    CAPTURE(bad);
    auto r = plan({"--master-addr", "127.0.0.1", "--master-port", bad});
    CHECK(r.exitCode == 3);
    CHECK_MESSAGE(r.err.find("--master-port") != std::string::npos, r.err);
    CHECK(r.err.find("--rdzv-endpoint") == std::string::npos);
  }
}

TEST_CASE("options can come from DTRAIN_* environment variables") {
  auto r = run(runArgs({"--standalone", "--", "sh", "-c", "echo ws=$WORLD_SIZE"}),
               {.timeout = 30s, .env = {{"DTRAIN_NPROC_PER_NODE", "3"}}});
  REQUIRE(r.exitCode == 0);
  CHECK(linesWith(r.out, "ws=3").size() == 3);
  // Every option, by the README's rule DTRAIN_<NAME> (these three had no variable).
  auto plan = run(runArgs({"--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "127.0.0.1:29999", "--dry-run",
                           "--", "true"}),
                  {.timeout = 30s, .env = {{"DTRAIN_RDZV_BIND", "0.0.0.0"}}});
  INFO(plan.out, plan.err);
  CHECK(plan.exitCode == 0);
  CHECK(plan.out.find("listening on 0.0.0.0 (--rdzv-bind)") != std::string::npos);
  std::string dir = tempDir("envtoken");
  writeFile(dir + "/token", "s3cret\n");
  auto token = run(runArgs({"--standalone", "--", "sh", "-c", "echo tok=$DTRAIN_RDZV_TOKEN"}),
                   {.timeout = 30s, .env = {{"DTRAIN_RDZV_TOKEN_FILE", dir + "/token"}}});
  CHECK(token.exitCode == 0);
  CHECK(token.out.find("tok=s3cret") != std::string::npos);
}

TEST_CASE("--local-addr is the workers' collective and parameter-server address (DTRAIN_COMM_HOST) unless the "
          "environment sets DTRAIN_COMM_HOST") {
  // A multi-homed node's --local-addr used to reach only the agent's record: the workers' tcp collectives and
  // parameter servers listened on and advertised the first non-loopback address instead.
  int port = freePort();
  std::string id = uniqueRunId("localaddr");
  auto agent = [&](int nodeRank, const std::string& addr) {
    return runArgs({"--nnodes", "2", "--nproc-per-node", "1", "--node-rank", std::to_string(nodeRank),
                    "--rdzv-endpoint", fmt::format("127.0.0.1:{}", port), "--rdzv-id", id, "--local-addr", addr,
                    "--rdzv-timeout", "60s", "--", "env"});
  };
  Background node1(agent(1, "127.0.0.2"), {.unsetEnv = {"DTRAIN_COMM_HOST"}});
  auto r0 = run(agent(0, "127.0.0.1"), {.timeout = 60s, .unsetEnv = {"DTRAIN_COMM_HOST"}});
  auto r1 = node1.wait(60s);
  INFO(r0.err, r1.err);
  REQUIRE(r0.exitCode == 0);
  REQUIRE(r1.exitCode == 0);
  auto e0 = envByRank(r0.out), e1 = envByRank(r1.out);
  CHECK(e0[0]["DTRAIN_COMM_HOST"] == "127.0.0.1");
  CHECK(e1[1]["DTRAIN_COMM_HOST"] == "127.0.0.2");
  CHECK(e1[1]["MASTER_ADDR"] == "127.0.0.1");

  // DTRAIN_COMM_HOST in the agent's environment wins.
  port = freePort();
  id = uniqueRunId("localaddr-env");
  Background again1(agent(1, "127.0.0.2"), {.env = {{"DTRAIN_COMM_HOST", "127.0.0.3"}}});
  auto s0 = run(agent(0, "127.0.0.1"), {.timeout = 60s, .unsetEnv = {"DTRAIN_COMM_HOST"}});
  auto s1 = again1.wait(60s);
  INFO(s0.err, s1.err);
  REQUIRE(s1.exitCode == 0);
  CHECK(envByRank(s1.out)[1]["DTRAIN_COMM_HOST"] == "127.0.0.3");
}

TEST_CASE("--local-addr that is not this machine's address: the workers' collectives exit 5 naming --local-addr") {
  // The workers used to say only "cannot listen on 192.0.2.1 for collectives" and exit 2 (a bad job file, by the
  // README), with nothing pointing at the flag that chose the address; the README's code for an address that is not
  // local is 5. 192.0.2.1 is TEST-NET-1 (RFC 5737): never assigned to a machine.
  auto r = run(runArgs({"--standalone", "--nproc-per-node", "2", "--local-addr", "192.0.2.1", "--", dtrainBinary(),
                        "bench", "allreduce", "--backend", "tcp", "--max-bytes", "1K", "--iters", "1"}),
               {.timeout = 60s, .unsetEnv = {"DTRAIN_COMM_HOST"}});
  INFO(r.out, r.err);
  CHECK(r.exitCode == 5);
  CHECK(r.err.find("cannot listen on 192.0.2.1 (DTRAIN_COMM_HOST, which dtrain run sets to its --local-addr") !=
        std::string::npos);
  CHECK(r.err.find("expected an address of this machine") != std::string::npos);
}
