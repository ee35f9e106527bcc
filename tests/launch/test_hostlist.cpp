// Slurm host list and per-node count expansion. The expected orders were checked against Slurm 22.05's own
// `scontrol show hostnames` (tests/slurm compares the two on a real cluster).
#include <doctest/doctest.h>

#include "lib/common/error.h"
#include "lib/launch/hostlist.h"

using dtrain::UsageError;
using dtrain::launch::expandHostlist;
using dtrain::launch::expandTasksPerNode;
using dtrain::launch::firstHost;
using V = std::vector<std::string>;

namespace {

// The message of the UsageError that `fn` throws (fails the test when it throws nothing).
template <typename Fn>
std::string usageErrorOf(Fn fn) {
  try {
    fn();
  } catch (const UsageError& e) {
    return e.what();
  }
  FAIL("expected a UsageError");
  return {};
}

std::string hostlistError(const std::string& s) {
  return usageErrorOf([&] { expandHostlist(s); });
}

}  // namespace

TEST_CASE("plain names and comma lists") {
  CHECK(expandHostlist("node1") == V{"node1"});
  CHECK(expandHostlist("localhost") == V{"localhost"});
  CHECK(expandHostlist("a1,b[2-3],c") == V{"a1", "b2", "b3", "c"});
  CHECK(expandHostlist("a, b\tc") == V{"a", "b", "c"});  // Slurm also separates on blanks
  CHECK(expandHostlist("n007") == V{"n007"});
  CHECK(expandHostlist("").empty());
  CHECK(expandHostlist("  ").empty());
}

TEST_CASE("ranges, lists and zero padding") {
  CHECK(expandHostlist("node[01-04,07]") == V{"node01", "node02", "node03", "node04", "node07"});
  CHECK(expandHostlist("node[1-2]") == V{"node1", "node2"});
  CHECK(expandHostlist("node[08-11]") == V{"node08", "node09", "node10", "node11"});
  CHECK(expandHostlist("n[001-3]") == V{"n001", "n002", "n003"});
  // The width is LOW's as typed: a padded HIGH does not pad LOW (Slurm prints n1 .. n10 here).
  CHECK(expandHostlist("n[1-010]").front() == "n1");
  CHECK(expandHostlist("n[1-010]").back() == "n10");
  CHECK(expandHostlist("n[1-010]").size() == 10);
  CHECK(expandHostlist("n[7]") == V{"n7"});
  CHECK(expandHostlist("n[1-3,2]") == V{"n1", "n2", "n3", "n2"});  // duplicates kept, as Slurm does
  CHECK(expandHostlist("[1-3]") == V{"1", "2", "3"});
  CHECK(expandHostlist("rack[1-2]-n[1-2],login") == V{"rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2", "login"});
  CHECK(expandHostlist("n[0-65535]").size() == 65536);
}

TEST_CASE("several bracket groups follow Slurm's order") {
  CHECK(expandHostlist("a[1-2]b[3-4]") == V{"a1b3", "a1b4", "a2b3", "a2b4"});
  CHECK(expandHostlist("n[1-2][3-4]") == V{"n13", "n14", "n23", "n24"});
  // Three groups: Slurm loops over the middle group outermost, then the first, then the last.
  CHECK(expandHostlist("x[1-2]y[3-4]z[5-6]") ==
        V{"x1y3z5", "x1y3z6", "x2y3z5", "x2y3z6", "x1y4z5", "x1y4z6", "x2y4z5", "x2y4z6"});
  // Four groups: third, second, first, then the last innermost.
  auto four = expandHostlist("a[1-2]b[1-2]c[1-2]d[1-2]");
  REQUIRE(four.size() == 16);
  CHECK(V(four.begin(), four.begin() + 4) == V{"a1b1c1d1", "a1b1c1d2", "a2b1c1d1", "a2b1c1d2"});
  CHECK(four[4] == "a1b2c1d1");
  CHECK(four[8] == "a1b1c2d1");
}

TEST_CASE("names in brackets and a suffix after the last bracket (beyond Slurm)") {
  CHECK(expandHostlist("gpu-[1-2]-[a,b]") == V{"gpu-1-a", "gpu-1-b", "gpu-2-a", "gpu-2-b"});
  CHECK(expandHostlist("node[1-2]-ib") == V{"node1-ib", "node2-ib"});
  CHECK(expandHostlist("node[1-2]-ib,node[3-4]") == V{"node1-ib", "node2-ib", "node3", "node4"});
}

TEST_CASE("firstHost") {
  CHECK(firstHost("node[3-4],node1") == "node3");
  CHECK(firstHost("x[1-2]y[3-4]z[5-6]") == "x1y3z5");
  CHECK(usageErrorOf([] { firstHost(""); }).find("names no host") != std::string::npos);
}

TEST_CASE("bad host lists are UsageErrors naming the input, the problem and the position") {
  auto e = hostlistError("node[3-1]");
  CHECK(e.find("'node[3-1]'") != std::string::npos);
  CHECK(e.find("reversed range '3-1'") != std::string::npos);
  CHECK(e.find("position 6") != std::string::npos);

  e = hostlistError("node[1-2");
  CHECK(e.find("never closed") != std::string::npos);
  CHECK(e.find("position 5") != std::string::npos);
  CHECK(hostlistError("node]1").find("']' without a matching '['") != std::string::npos);
  CHECK(hostlistError("n[1-[2]]").find("nested '['") != std::string::npos);
  CHECK(hostlistError("a,,b").find("empty item before ','") != std::string::npos);
  CHECK(hostlistError(",a").find("position 1") != std::string::npos);
  CHECK(hostlistError("a,").find("empty item after the last ','") != std::string::npos);
  CHECK(hostlistError("n[]").find("empty brackets") != std::string::npos);
  CHECK(hostlistError("n[1,,2]").find("empty range") != std::string::npos);
  CHECK(hostlistError("n[1-10:2]").find("LOW-HIGH:STEP") != std::string::npos);
  CHECK(hostlistError("n[-1-3]").find("not LOW-HIGH") != std::string::npos);
  CHECK(hostlistError("n[1-]").find("not LOW-HIGH") != std::string::npos);
  CHECK(hostlistError("n[a-c]").find("not LOW-HIGH") != std::string::npos);
  CHECK(hostlistError("n[1, 2]").find("blank inside brackets") != std::string::npos);
  CHECK(hostlistError("n[0-65536]").find("more than 65536 values") != std::string::npos);
  CHECK(hostlistError("n[1-9999999999999999999]").find("too long") != std::string::npos);
  CHECK(hostlistError("a[0-1023]b[0-1023]c[0-1]").find("more than 1048576 hosts") != std::string::npos);
}

TEST_CASE("per-node counts with repetition") {
  CHECK(expandTasksPerNode("2(x3),1") == std::vector<int>{2, 2, 2, 1});
  CHECK(expandTasksPerNode("4") == std::vector<int>{4});
  CHECK(expandTasksPerNode("2(x2)") == std::vector<int>{2, 2});
  CHECK(expandTasksPerNode("72(x2),36,1(x1)") == std::vector<int>{72, 72, 36, 1});
  CHECK(expandTasksPerNode("2,1") == std::vector<int>{2, 1});
}

TEST_CASE("bad per-node counts") {
  auto err = [](const std::string& s) { return usageErrorOf([&] { expandTasksPerNode(s); }); };
  auto e = err("2(x3");
  CHECK(e.find("'2(x3'") != std::string::npos);
  CHECK(e.find("position 2") != std::string::npos);
  CHECK(err("").find("empty list") != std::string::npos);
  CHECK(err("2,,1").find("empty item") != std::string::npos);
  CHECK(err("2(x0)").find("not a positive number") != std::string::npos);
  CHECK(err("x(x2)").find("count 'x'") != std::string::npos);
  CHECK(err("2(3)").find("not (xREPEAT)") != std::string::npos);
  CHECK(err("2(x3)4").find("not (xREPEAT)") != std::string::npos);
}
