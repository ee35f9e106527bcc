#include <doctest/doctest.h>

#include "lib/common/error.h"
#include "lib/common/json_fields.h"

using namespace dtrain;
using nlohmann::json;

namespace {

std::string errorOf(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no ConfigError)";
}

bool positive(int64_t v) { return v >= 1; }

}  // namespace

TEST_CASE("JSON pointers are escaped per RFC 6901") {
  CHECK(jsonPointer("/a", "b") == "/a/b");
  CHECK(jsonPointer("", "x/y") == "/x~1y");
  CHECK(jsonPointer("/m", "~t") == "/m/~0t");
  CHECK(jsonPointer("/m", "~/") == "/m/~0~1");
  json j = {{"a/b", "x"}};
  JsonFields f(j, "job.json", "/data");
  CHECK(errorOf([&] { f.allowOnly({"c"}); }) == "job.json: /data/a~1b: unknown field 'a/b' (expected c)");
}

TEST_CASE("a key given twice in one object is a config error naming its JSON pointer (not the last one silently)") {
  CHECK(errorOf([] { parseConfigJson(R"({"optimizer": {"lr": 0.1, "lr": 0.5}})", "job.json", "not valid JSON"); }) ==
        "job.json: /optimizer/lr: the key \"lr\" is given twice in the same object (JSON keeps only one; which is "
        "meant?)");
  CHECK(errorOf([] {
          parseConfigJson(R"({"m": {"layers": [{"type": "relu"}, {"out": 2, "a/b": 1, "a/b": 2}]}})", "m.json", "x");
        }).find("m.json: /m/layers/1/a~1b: the key") == 0);
  CHECK(errorOf([] { parseConfigJson(R"({"a": 1, "b": {"a": 2}, "c": [{"a": 3}, {"a": 4}], "a2": [[1], {"a": 5}]})",
                                     "ok.json", "x"); }) == "(no ConfigError)");
  CHECK(parseConfigJson(R"({"a": [1, {"b": [2, 3]}], "c": {}})", "ok.json", "x")["a"][1]["b"][1] == 3);
}

TEST_CASE("null counts as absent: defaults apply, required fields are missing") {
  json j = {{"n", nullptr}, {"k", 3}};
  JsonFields f(j, "job.json", "/train");
  CHECK_FALSE(f.has("n"));
  CHECK(f.has("k"));
  CHECK(f.integer("n", 7, "an integer >= 1", positive) == 7);
  CHECK(f.boolean("n", true));
  CHECK(f.string("n", "dflt") == "dflt");
  CHECK(errorOf([&] { f.integer("n", "an integer >= 1", positive); }) ==
        "job.json: /train: missing required field 'n' (an integer >= 1)");
  JsonFields t(j, "job.json", "/data/train", "", JsonFields::Wording::kTerse);
  CHECK(errorOf([&] { t.string("n"); }) == "job.json: /data/train/n: missing (expected a string)");
}

TEST_CASE("the two wordings say the same things") {
  json j = {{"lr", "0.1"}, {"type", "sgdd"}, {"extra", 1}, {"ok", 2}};
  JsonFields named(j, "job.json", "/optimizer");
  JsonFields terse(j, "job.json", "/data/train", "", JsonFields::Wording::kTerse);
  auto num = [](double v) { return v > 0; };
  CHECK(errorOf([&] { named.number("lr", "a number > 0", num); }) ==
        "job.json: /optimizer/lr: expected a number > 0, got \"0.1\"");
  CHECK(errorOf([&] { terse.number("lr", "a number > 0", num); }) ==
        "job.json: /data/train/lr: \"0.1\" (expected a number > 0)");
  CHECK(errorOf([&] { named.choice("type", {"sgd", "adam"}, "optimizer"); }) ==
        "job.json: /optimizer/type: unknown optimizer 'sgdd' (expected sgd, adam)");
  CHECK(errorOf([&] { terse.choice("type", {"sgd", "adam"}, "optimizer"); }) ==
        "job.json: /data/train/type: 'sgdd' (expected one of: sgd, adam)");
  CHECK(errorOf([&] { named.allowOnly({"lr", "type", "ok"}); }) ==
        "job.json: /optimizer/extra: unknown field 'extra' (expected lr, type, ok)");
  CHECK(errorOf([&] { terse.allowOnly({"lr", "type", "ok"}); }) ==
        "job.json: /data/train/extra: unknown key (expected one of: lr, type, ok)");
  CHECK(errorOf([&] { named.choice("missing", {"a", "b"}, "thing"); }) ==
        "job.json: /optimizer: missing required field 'missing' (one of a, b)");
  CHECK(errorOf([&] { terse.choice("missing", {"a", "b"}, "thing"); }) ==
        "job.json: /data/train/missing: missing (expected one of: a, b)");
  CHECK(named.choice("missing", {"a", "b"}, "thing", "b") == "b");
  CHECK(errorOf([&] { JsonFields(json(5), "job.json", "/loss", "the loss"); }) ==
        "job.json: /loss: expected the loss as a JSON object, got 5");
  CHECK(errorOf([&] { JsonFields(json(5), "job.json", "/data/train", "an object", JsonFields::Wording::kTerse); }) ==
        "job.json: /data/train: 5 (expected an object)");
}

TEST_CASE("integers, numbers and long values") {
  json j = {{"k", {3, 5}}, {"one", 3}, {"bad", {3, 0}}, {"m", {1.5, 2}}, {"s", std::string(100, 'x')}};
  JsonFields f(j, "", "/layer");
  CHECK(f.integers("k", 2, {}, "an integer >= 1", positive) == std::vector<int64_t>{3, 5});
  CHECK(f.integers("one", 2, {}, "an integer >= 1", positive) == std::vector<int64_t>{3, 3});
  CHECK(errorOf([&] { f.integers("bad", 2, {}, "an integer >= 1", positive); }) ==
        "/layer/bad/1: expected an integer >= 1, got 0");
  CHECK(f.numbers("m") == std::vector<double>{1.5, 2});
  CHECK(f.numbers("one") == std::vector<double>{3});
  CHECK(errorOf([&] { f.numbers("s"); }) ==
        "/layer/s: expected a number or an array of numbers, got \"" + std::string(56, 'x') + "...");
}

TEST_CASE("durations: seconds as a number, or a string with a unit") {
  using std::chrono::milliseconds;
  json j = {{"a", 300}, {"b", "5m"}, {"c", 0.5}, {"d", "soon"}, {"e", 0}};
  JsonFields f(j, "job.json", "/parallel");
  CHECK(f.duration("a", milliseconds(1)) == milliseconds(300000));
  CHECK(f.duration("b", milliseconds(1)) == milliseconds(300000));
  CHECK(f.duration("c", milliseconds(1)) == milliseconds(500));
  CHECK(f.duration("none", milliseconds(7)) == milliseconds(7));
  CHECK(errorOf([&] { f.duration("d", milliseconds(1)); }) ==
        "job.json: /parallel/d: expected a duration: seconds (300) or a string such as \"5m\"");
  CHECK(errorOf([&] { f.duration("e", milliseconds(1)); }) ==
        "job.json: /parallel/e: expected a duration: seconds (300) or a string such as \"5m\"");
}
