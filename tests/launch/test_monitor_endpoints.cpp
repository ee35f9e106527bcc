// The agents' monitoring endpoints in the store (lib/launch/monitor_endpoints.h): which ones `dtrain top` and
// `dtrain debug dump` ask, and which ones an agent's restart left behind.
#include <doctest/doctest.h>

#include "lib/launch/monitor_endpoints.h"

using namespace dtrain::launch;

namespace {

std::vector<std::string> addresses(const std::vector<MonitorEndpoint>& endpoints) {
  std::vector<std::string> out;
  for (const auto& e : endpoints) out.push_back(e.address);
  return out;
}

}  // namespace

TEST_CASE("an agent's line reads back as written") {
  const std::string line = monitorEndpointLine({"10.0.0.7:9100", 3, 4242, "gpu7"});
  CHECK(line == "10.0.0.7:9100 node_rank=3 pid=4242 hostname=gpu7\n");
  auto got = currentMonitorEndpoints(line);
  REQUIRE(got.current.size() == 1);
  CHECK(got.current[0].address == "10.0.0.7:9100");
  CHECK(got.current[0].nodeRank == 3);
  CHECK(got.current[0].pid == 4242);
  CHECK(got.current[0].hostname == "gpu7");
  CHECK(got.superseded.empty());
}

TEST_CASE("a restart of the same --node-rank at another address supersedes the old endpoint; the newest wins") {
  const std::string text = monitorEndpointLine({"a:1", 0, 10, "a"}) + monitorEndpointLine({"b:2", 1, 20, "b"}) +
                           monitorEndpointLine({"b:3", 1, 21, "b"}) + monitorEndpointLine({"c:4", 1, 22, "c"});
  auto got = currentMonitorEndpoints(text);
  CHECK(addresses(got.current) == std::vector<std::string>{"a:1", "c:4"});
  REQUIRE(got.superseded.size() == 2);
  CHECK(got.superseded[0].old.address == "b:2");
  CHECK(got.superseded[0].old.pid == 20);
  CHECK(got.superseded[0].by.address == "c:4");  // the node's current registration, not the next one
  CHECK(got.superseded[1].old.address == "b:3");
  CHECK(got.superseded[1].by.address == "c:4");
}

TEST_CASE("the same address registered again replaces its earlier line without a note (a fixed --metrics-port)") {
  const std::string text = monitorEndpointLine({"b:2", 1, 20, "b"}) + monitorEndpointLine({"b:5", 1, 21, "b"}) +
                           monitorEndpointLine({"b:2", 1, 22, "b"});
  auto got = currentMonitorEndpoints(text);
  REQUIRE(got.current.size() == 1);
  CHECK(got.current[0].address == "b:2");
  CHECK(got.current[0].pid == 22);
  REQUIRE(got.superseded.size() == 1);  // b:5 was node 1 too, before b:2 came back
  CHECK(got.superseded[0].old.address == "b:5");
}

TEST_CASE("agents without a --node-rank are all asked: they cannot be told from a second agent on the host") {
  const std::string text = monitorEndpointLine({"h:2", -1, 20, "h"}) + monitorEndpointLine({"h:1", -1, 21, "h"});
  auto got = currentMonitorEndpoints(text);
  CHECK(addresses(got.current) == std::vector<std::string>{"h:1", "h:2"});  // ordered by address
  CHECK(got.superseded.empty());
}

TEST_CASE("lines of an older dtrain (HOST:PORT alone) read as agents without a --node-rank; junk is skipped") {
  auto got = currentMonitorEndpoints("127.0.0.1:9100\n\n127.0.0.1:9100\nnot an endpoint\nhost-without-port\n"
                                     "127.0.0.1:9101 node_rank=x future_key=1\n");
  REQUIRE(got.current.size() == 2);
  CHECK(got.current[0].address == "127.0.0.1:9100");
  CHECK(got.current[0].nodeRank == -1);
  CHECK(got.current[0].pid == 0);
  CHECK(got.current[1].address == "127.0.0.1:9101");
  CHECK(got.current[1].nodeRank == -1);
  CHECK(got.superseded.empty());
}
