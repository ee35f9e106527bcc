// The rendezvous protocol (rendezvous/rendezvous.h) over the in-memory store, one thread per node: the store
// semantics are the TCP server's (MemoryStore runs the same StoreState), so what holds here holds between
// processes. Every wait is the store's own (condition variable, with a timeout); nothing sleeps to synchronise.
#include <doctest/doctest.h>

#include "lib/common/error.h"
#include "rendezvous/memory_store.h"
#include "rendezvous/rendezvous.h"

using namespace dtrain;
using namespace dtrain::rendezvous;

TEST_CASE("round events keep their wire names in the store") {
  const std::pair<RoundEventType, const char*> names[] = {{RoundEventType::kFailed, "failed"},
                                                          {RoundEventType::kNodeLost, "node_lost"},
                                                          {RoundEventType::kMembership, "membership"},
                                                          {RoundEventType::kShutdown, "shutdown"},
                                                          {RoundEventType::kDone, "done"}};
  for (const auto& [type, name] : names) {
    CAPTURE(name);
    CHECK(roundEventName(type) == name);
    CHECK(parseRoundEventType(name) == type);
    RoundEvent e{type, "one line", 130, "multi\nline"};
    auto json = e.toJson();
    CHECK(json.find(std::string("\"type\":\"") + name + "\"") != std::string::npos);
    auto back = RoundEvent::fromJson(json);
    CHECK(back.type == type);
    CHECK(back.message == "one line");
    CHECK(back.exitCode == 130);
    CHECK(back.report == "multi\nline");
  }
  CHECK(RoundEvent{RoundEventType::kFailed, "", 1, ""}.toJson() ==
        R"({"exit_code":1,"message":"","report":"","type":"failed"})");
  CHECK_FALSE(parseRoundEventType("crashed").has_value());
  CHECK_THROWS_AS(RoundEvent::fromJson(R"({"type":"crashed"})"), ProtocolError);
  CHECK_THROWS_AS(RoundEvent::fromJson("not json"), ProtocolError);
  CHECK(RoundEvent{RoundEventType::kNodeLost, "", 0, ""}.isFailure());
  CHECK(RoundEvent{RoundEventType::kFailed, "", 0, ""}.isFailure());
  CHECK_FALSE(RoundEvent{RoundEventType::kMembership, "", 0, ""}.isFailure());
  CHECK_FALSE(RoundEvent{RoundEventType::kShutdown, "", 0, ""}.isFailure());
  CHECK_FALSE(RoundEvent{RoundEventType::kDone, "", 0, ""}.isFailure());
}
