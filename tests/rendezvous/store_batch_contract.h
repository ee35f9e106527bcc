// The Store::batch contract, checked against every implementation (memory, TCP, etcd): mixed operations give
// the results of calling each in order, a get blocks until another client creates its key, a get that times out
// gives nullopt (not an error), and multiSet/multiGet keep set/tryGet semantics over many keys.
#pragma once

#include <doctest/doctest.h>

#include <chrono>
#include <thread>

#include "rendezvous/store.h"

namespace dtrain::testing {

inline void checkBatchContract(rendezvous::Store& s, rendezvous::Store& other) {
  using rendezvous::StoreOp;
  using namespace std::chrono_literals;
  auto r = s.batch({StoreOp::set("b/a", "1"), StoreOp::tryGet("b/a"), StoreOp::add("b/n", 2), StoreOp::add("b/n", 3),
                    StoreOp::compareSet("b/c", "", "x"), StoreOp::compareSet("b/c", "", "y"),
                    StoreOp::append("b/l", "ab"), StoreOp::append("b/l", "cd"), StoreOp::tryGet("b/l"),
                    StoreOp::remove("b/a"), StoreOp::remove("b/a"), StoreOp::tryGet("b/a"),
                    StoreOp::get("b/never", 200ms), StoreOp::get("b/l", 1s), StoreOp::set("b/a", "2")});
  REQUIRE(r.size() == 15);
  CHECK(r[1].value == "1");
  CHECK(r[2].number == 2);
  CHECK(r[3].number == 5);
  CHECK(r[4].value == "x");
  CHECK(r[5].value == "x");  // compareSet returns the value after: it did not match
  CHECK(r[8].value == "abcd");
  CHECK(r[9].number == 1);
  CHECK(r[10].number == 0);
  CHECK_FALSE(r[11].value.has_value());
  CHECK_FALSE(r[12].value.has_value());  // timed out: a result, not an error
  CHECK(r[13].value == "abcd");
  CHECK(s.tryGet("b/a") == "2");
  CHECK(s.batch({}).empty());

  // A get blocks until another client creates the key; the ops after it run after it.
  std::thread writer([&] {
    std::this_thread::sleep_for(100ms);  // not a synchronisation: the batch is correct whenever the set lands
    other.set("b/late", "here");
  });
  auto late = s.batch({StoreOp::get("b/late", 30s), StoreOp::tryGet("b/late"), StoreOp::add("b/n", 1)});
  writer.join();
  CHECK(late[0].value == "here");
  CHECK(late[1].value == "here");
  CHECK(late[2].number == 6);

  // Many keys: more than one etcd txn (128 operations) and than one pipelined chunk of the TCP client (512).
  std::vector<std::pair<std::string, std::string>> entries;
  for (int i = 0; i < 600; ++i) entries.emplace_back(fmt::format("b/k{}", i), fmt::format("v{}", i));
  entries.emplace_back("b/k7", "again");  // the same key twice: the later value wins, as with set() in order
  s.multiSet(entries);
  std::vector<std::string> keys{"b/k0", "b/none", "b/k7", "b/k599", "b/k7"};
  for (int i = 0; i < 300; ++i) keys.push_back(fmt::format("b/k{}", (i * 7) % 600));
  auto values = s.multiGet(keys);
  REQUIRE(values.size() == keys.size());
  CHECK(values[0] == "v0");
  CHECK_FALSE(values[1].has_value());
  CHECK(values[2] == "again");
  CHECK(values[3] == "v599");
  CHECK(values[4] == "again");
  for (int i = 0; i < 300; ++i) {
    int k = (i * 7) % 600;
    CHECK(values[5 + static_cast<size_t>(i)] == (k == 7 ? std::string("again") : fmt::format("v{}", k)));
  }
}

}  // namespace dtrain::testing
