#include <doctest/doctest.h>

#include <thread>

#include "lib/common/error.h"
#include "rendezvous/memory_store.h"
#include "rendezvous/prefix_store.h"
#include "tests/rendezvous/store_batch_contract.h"

using namespace dtrain;
using namespace dtrain::rendezvous;
using namespace std::chrono_literals;

TEST_CASE("memory store: set/get/add/compareSet/append/remove") {
  auto s = MemoryStore::create();
  s->set("a", "1");
  CHECK(s->get("a", 10ms) == "1");
  CHECK(s->add("n", 5) == 5);
  CHECK(s->add("n", -2) == 3);
  CHECK(s->compareSet("c", "", "x") == "x");      // missing key matches empty expected
  CHECK(s->compareSet("c", "y", "z") == "x");     // mismatch returns current
  CHECK(s->compareSet("c", "x", "z") == "z");
  s->append("log", "ab");
  s->append("log", "cd");
  CHECK(s->tryGet("log") == "abcd");
  CHECK(s->check({"a", "n"}));
  CHECK_FALSE(s->check({"a", "missing"}));
  CHECK(s->numKeys() == 4);
  CHECK(s->remove("a"));
  CHECK_FALSE(s->remove("a"));
  CHECK_FALSE(s->tryGet("a").has_value());
}

TEST_CASE("memory store: get times out with an error, wait returns false") {
  auto s = MemoryStore::create();
  CHECK_THROWS_AS(s->get("nope", 20ms), TimeoutError);
  CHECK_FALSE(s->wait({"nope"}, 20ms));
}

TEST_CASE("memory store: a blocked waiter wakes on set from another thread") {
  auto s = MemoryStore::create();
  std::thread t([&] { s->set("ready", "1"); });
  CHECK(s->wait({"ready"}, 5s));
  CHECK(s->get("ready", 5s) == "1");
  t.join();
}

TEST_CASE("prefix store namespaces keys") {
  auto base = MemoryStore::create();
  PrefixStore p("/run1/", base);
  p.set("k", "v");
  CHECK(base->tryGet("/run1/k") == "v");
  CHECK(p.wait({"k"}, 10ms));
  CHECK(p.add("c", 2) == 2);
  CHECK(base->tryGet("/run1/c") == "2");
}

TEST_CASE("size limits are enforced") {
  auto s = MemoryStore::create();
  CHECK_THROWS_AS(s->set(std::string(kMaxKeyBytes + 1, 'k'), "v"), Error);
}

TEST_CASE("memory store: batch (the default loop) and through a prefix store") {
  auto s = MemoryStore::create();
  testing::checkBatchContract(*s, *s);
  PrefixStore p("/run/", s);
  auto r = p.batch({StoreOp::set("x", "1"), StoreOp::tryGet("x"), StoreOp::add("n", 4)});
  CHECK(r[1].value == "1");
  CHECK(s->tryGet("/run/x") == "1");
  CHECK(s->tryGet("/run/n") == "4");
}
