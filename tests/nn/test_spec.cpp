// Model/loss/optimizer spec parsing: shape inference and every kind of error, each asserted on its message.
#include <doctest/doctest.h>

#include <sys/stat.h>

#include <fstream>

#include "lib/common/error.h"
#include "lib/nn/loss.h"
#include "lib/nn/optimizer.h"
#include "lib/nn/spec.h"
#include "tests/support/process.h"

using namespace dtrain;
using namespace dtrain::nn;
using nlohmann::json;

namespace {

json model(json input, json layers) { return json{{"input", std::move(input)}, {"layers", std::move(layers)}}; }

template <typename F>
std::string errorOf(F&& f) {
  try {
    f();
  } catch (const dtrain::ConfigError& e) {
    CHECK(e.exitCode() == 2);
    return e.what();
  }
  return "no error";
}

std::string modelError(const json& j) {
  return errorOf([&] { parseModelSpec(j, "job.json", "/model"); });
}
std::string optimizerError(const json& j) {
  return errorOf([&] { parseOptimizerSpec(j, "job.json", "/optimizer"); });
}

}  // namespace

TEST_CASE("shapes are inferred through a CNN") {
  auto spec = parseModelSpec(model({1, 28, 28}, json::parse(R"([
      {"type": "conv2d", "out": 16, "kernel": 5, "padding": 2}, {"type": "relu"},
      {"type": "maxpool2d", "kernel": 2},
      {"type": "conv2d", "out": 32, "kernel": [3, 5], "stride": [1, 2]}, {"type": "gelu"},
      {"type": "maxpool2d", "kernel": 3, "stride": 2, "padding": 1},
      {"type": "flatten"}, {"type": "dropout", "p": 0.25}, {"type": "linear", "out": 64, "bias": false},
      {"type": "layernorm"}, {"type": "tanh"}, {"type": "linear", "out": 10, "in": 64}, {"type": "sigmoid"}])")),
                             "job.json", "/model");
  REQUIRE(spec.layers.size() == 13);
  CHECK(spec.layers[0].output == Shape{16, 28, 28});
  CHECK(spec.layers[2].output == Shape{16, 14, 14});
  CHECK(spec.layers[3].output == Shape{32, 12, 5});  // (14-3)/1+1, (14-5)/2+1
  CHECK(spec.layers[5].output == Shape{32, 6, 3});   // (12+2-3)/2+1, (5+2-3)/2+1
  CHECK(spec.layers[6].output == Shape{576});
  CHECK(spec.layers[8].output == Shape{64});
  CHECK(spec.output() == Shape{10});
  CHECK(spec.layers[0].paramCount() == 16 * 1 * 5 * 5 + 16);
  CHECK(spec.layers[3].paramCount() == 32 * 16 * 3 * 5 + 32);
  CHECK(spec.layers[8].paramCount() == 576 * 64);
  CHECK(spec.layers[9].paramCount() == 128);
  CHECK(spec.paramCount() == 416 + 7712 + 36864 + 128 + 650);
  CHECK(spec.layers[4].path == "/model/layers/4");
}

TEST_CASE("summary rows and table") {
  auto spec = parseModelSpec(model({784}, json::parse(R"([{"type": "linear", "out": 256}, {"type": "relu"},
                                                         {"type": "linear", "out": 10}])")),
                             "", "/model");
  auto rows = summarize(spec);
  REQUIRE(rows.size() == 3);
  CHECK(rows[0].index == 0);
  CHECK(rows[0].type == "linear");
  CHECK(rows[0].detail == "784 -> 256");
  CHECK(rows[0].output == Shape{256});
  CHECK(rows[0].params == 200960);
  CHECK(rows[1].params == 0);
  std::string table = formatSummary(spec);
  CHECK(table.find("[N,784]") != std::string::npos);
  CHECK(table.find("203530") != std::string::npos);
  CHECK(table.find("total parameters: 203530") != std::string::npos);
}

TEST_CASE("unknown layer type") {
  CHECK(modelError(model({4}, json::parse(R"([{"type": "relu"}, {"type": "conv"}])"))) ==
        "job.json: /model/layers/1/type: unknown layer type 'conv' (expected linear, relu, gelu, tanh, sigmoid, "
        "dropout, layernorm, flatten, conv2d, maxpool2d, embedding, causal_self_attention, block, lm_head)");
}

TEST_CASE("bad shapes name the layer index and both shapes") {
  CHECK(modelError(model({1, 28, 28}, json::parse(R"([{"type": "conv2d", "out": 16, "kernel": 5}, {"type": "relu"},
        {"type": "maxpool2d", "kernel": 2}, {"type": "conv2d", "out": 16, "kernel": 5},
        {"type": "linear", "out": 10}])"))) ==
        "job.json: /model/layers/4: linear expects input [N, F] but gets [N,16,8,8]; add a flatten layer");
  CHECK(modelError(model({784}, json::parse(R"([{"type": "conv2d", "out": 4, "kernel": 3}])"))) ==
        "job.json: /model/layers/0: conv2d expects input [N, C, H, W] but gets [N,784]; set the model input to "
        "[C, H, W] (e.g. [1, 28, 28])");
  CHECK(modelError(model({3, 4}, json::parse(R"([{"type": "maxpool2d", "kernel": 2}])"))) ==
        "job.json: /model/layers/0: maxpool2d expects input [N, C, H, W] but gets [N,3,4]");
  CHECK(modelError(model({1, 4, 4}, json::parse(R"([{"type": "conv2d", "out": 2, "kernel": 5}])"))) ==
        "job.json: /model/layers/0: conv2d output would be empty: input [N,1,4,4] with kernel 5x5, stride 1x1, "
        "padding 0x0");
  CHECK(modelError(model({10}, json::parse(R"([{"type": "linear", "out": 5, "in": 12}])"))) ==
        "job.json: /model/layers/0/in: linear declares in 12 but its input is [N,10] (10 features)");
  CHECK(modelError(model({1, 8, 8}, json::parse(R"([{"type": "maxpool2d", "kernel": 2, "padding": 2}])"))) ==
        "job.json: /model/layers/0/padding: maxpool2d padding 2x2 must be at most half the kernel 2x2");
}

TEST_CASE("missing fields, wrong types and unknown fields") {
  CHECK(modelError(model({4}, json::parse(R"([{"type": "linear"}])"))) ==
        "job.json: /model/layers/0: missing required field 'out' (an integer >= 1)");
  CHECK(modelError(model({4}, json::parse(R"([{"type": "linear", "out": "256"}])"))) ==
        "job.json: /model/layers/0/out: expected an integer >= 1, got \"256\"");
  CHECK(modelError(model({4}, json::parse(R"([{"type": "linear", "out": 2.5}])"))) ==
        "job.json: /model/layers/0/out: expected an integer >= 1, got 2.5");
  CHECK(modelError(model({4}, json::parse(R"([{"type": "linear", "out": 0}])"))) ==
        "job.json: /model/layers/0/out: expected an integer >= 1, got 0");
  CHECK(modelError(model({4}, json::parse(R"([{"type": "linear", "out": 3, "bias": 1}])"))) ==
        "job.json: /model/layers/0/bias: expected true or false, got 1");
  CHECK(modelError(model({4}, json::parse(R"([{"type": "dropout", "p": 1.5}])"))) ==
        "job.json: /model/layers/0/p: expected a probability in [0, 1], got 1.5");
  CHECK(modelError(model({4}, json::parse(R"([{"type": "linear", "out": 3, "out_features": 3}])"))) ==
        "job.json: /model/layers/0/out_features: unknown field 'out_features' (expected type, out, bias, in, init_std)");
  CHECK(modelError(model({1, 8, 8}, json::parse(R"([{"type": "conv2d", "out": 3, "kernel": [3]}])"))) ==
        "job.json: /model/layers/0/kernel: expected an integer >= 1 or a list of 2 such values, got [3]");
  CHECK(modelError(model({1, 8, 8}, json::parse(R"([{"type": "conv2d", "out": 3, "kernel": [3, -1]}])"))) ==
        "job.json: /model/layers/0/kernel/1: expected an integer >= 1, got -1");
  CHECK(modelError(model({4}, json::parse(R"([{"out": 3}])"))) ==
        "job.json: /model/layers/0: missing required field 'type' (one of linear, relu, gelu, tanh, sigmoid, "
        "dropout, layernorm, flatten, conv2d, maxpool2d, embedding, causal_self_attention, block, lm_head)");
  CHECK(modelError(model({4}, json::parse(R"([17])"))) ==
        "job.json: /model/layers/0: expected a layer as a JSON object, got 17");
}

TEST_CASE("model-level errors") {
  CHECK(modelError(json{{"layers", json::array({json{{"type", "relu"}}})}}) ==
        "job.json: /model: missing required field 'input'");
  CHECK(modelError(model({0}, json::parse(R"([{"type": "relu"}])"))) ==
        "job.json: /model/input: expected a list of 1 to 5 integers >= 1 (the per-sample shape, e.g. [784]), got [0]");
  CHECK(modelError(model({4}, json::array())) ==
        "job.json: /model/layers: expected a non-empty list of layer objects, got []");
  CHECK(modelError(json{{"input", {4}}, {"layers", json::array({json{{"type", "relu"}}})}, {"optimizer", 1}}) ==
        "job.json: /model/optimizer: unknown field 'optimizer' (expected input, layers, name)");
  CHECK(modelError(json("model.json")) == "job.json: /model: expected the model as a JSON object, got \"model.json\"");
}

TEST_CASE("loadModelSpec reads a model file or a job file, and names the file in errors") {
  std::string dir = dtrain::testing::tempDir("nn-spec");
  dtrain::testing::writeFile(dir + "/model.json", R"({"input": [8], "layers": [{"type": "linear", "out": 2}]})");
  dtrain::testing::writeFile(dir + "/job.json", R"({"model": {"input": [8], "layers": [{"type": "tanh"}]},
                                                     "loss": {"type": "mse"}})");
  dtrain::testing::writeFile(dir + "/bad.json", R"({"input": [8], "layers": [{"type": "linear"}]})");
  dtrain::testing::writeFile(dir + "/broken.json", R"({"input": [8], )");
  CHECK(loadModelSpec(dir + "/model.json").output() == Shape{2});
  auto job = loadModelSpec(dir + "/job.json");
  CHECK(job.layers[0].type() == "tanh");
  CHECK(job.layers[0].path == "/model/layers/0");
  CHECK(errorOf([&] { loadModelSpec(dir + "/bad.json"); }) ==
        dir + "/bad.json: /layers/0: missing required field 'out' (an integer >= 1)");
  CHECK(errorOf([&] { loadModelSpec(dir + "/missing.json"); }) == dir + "/missing.json: cannot open model file");
  CHECK(errorOf([&] { loadModelSpec(dir + "/broken.json"); }).rfind(dir + "/broken.json: invalid JSON: ", 0) == 0);
}

TEST_CASE("optimizer spec: defaults and errors") {
  auto sgd = parseOptimizerSpec(json{{"type", "sgd"}, {"lr", 0.05}, {"momentum", 0.9}}, "job.json");
  CHECK(sgd.type == OptimizerType::kSgd);
  CHECK(sgd.lr == 0.05);
  CHECK(sgd.momentum == 0.9);
  CHECK(sgd.weightDecay == 0.0);
  CHECK(sgd.clipGradNorm == 0.0);
  auto adamw = parseOptimizerSpec(json{{"type", "adamw"}, {"betas", {0.8, 0.99}}, {"clip_grad_norm", 1.0}}, "job.json");
  CHECK(adamw.lr == 1e-3);
  CHECK(adamw.weightDecay == 0.01);
  CHECK(adamw.beta1 == 0.8);
  CHECK(adamw.beta2 == 0.99);
  CHECK(adamw.eps == 1e-8);
  CHECK(adamw.clipGradNorm == 1.0);
  CHECK(parseOptimizerSpec(json{{"type", "adam"}}, "job.json").weightDecay == 0.0);

  CHECK(optimizerError(json{{"type", "sgdd"}, {"lr", 0.1}}) ==
        "job.json: /optimizer/type: unknown optimizer 'sgdd' (expected sgd, adam, adamw, adagrad)");
  CHECK(optimizerError(json{{"type", "sgd"}}) == "job.json: /optimizer: missing required field 'lr' (a number > 0)");
  CHECK(optimizerError(json{{"type", "sgd"}, {"lr", "0.1"}}) ==
        "job.json: /optimizer/lr: expected a number > 0, got \"0.1\"");
  CHECK(optimizerError(json{{"type", "sgd"}, {"lr", 0.1}, {"momentun", 0.9}}) ==
        "job.json: /optimizer/momentun: unknown field 'momentun' (expected type, lr, momentum, dampening, nesterov, "
        "weight_decay, clip_grad_norm)");
  CHECK(optimizerError(json{{"type", "sgd"}, {"lr", 0.1}, {"nesterov", true}}) ==
        "job.json: /optimizer/nesterov: nesterov momentum requires a momentum > 0 and zero dampening");
  CHECK(optimizerError(json{{"type", "adam"}, {"betas", {0.9, 1.0}}}) ==
        "job.json: /optimizer/betas: expected two numbers in [0, 1) such as [0.9, 0.999], got [0.9,1.0]");
  CHECK(optimizerError(json{{"type", "adam"}, {"momentum", 0.9}}) ==
        "job.json: /optimizer/momentum: unknown field 'momentum' (expected type, lr, betas, eps, weight_decay, "
        "amsgrad, weight_decay_on, clip_grad_norm)");
  CHECK(optimizerError(json{{"type", "sgd"}, {"lr", 0.1}, {"clip_grad_norm", -1}}) ==
        "job.json: /optimizer/clip_grad_norm: expected a number >= 0 (0 turns clipping off), got -1");
}

TEST_CASE("loss spec errors") {
  CHECK(parseLossSpec(json{{"type", "mse"}}, "job.json").type == LossType::kMse);
  CHECK(errorOf([] { parseLossSpec(json{{"type", "nll"}}, "job.json", "/loss"); }) ==
        "job.json: /loss/type: unknown loss 'nll' (expected cross_entropy, mse, bce_with_logits)");
  CHECK(errorOf([] { parseLossSpec(json{{"type", "mse"}, {"reduction", "sum"}}, "job.json", "/loss"); }) ==
        "job.json: /loss/reduction: unknown field 'reduction' (expected type)");
}

// Issue 10 §5: sizes are bounded and products overflow-checked, so a huge field is an error naming it, never a
// wrapped-around parameter count (a conv2d kernel of 2^32 used to pass with 1 parameter) or a bad_alloc later.
TEST_CASE("huge sizes are config errors, and no parameter count or shape wraps around") {
  CHECK(modelError(model({1, 8, 8}, json::parse(R"([{"type": "conv2d", "out": 1, "kernel": 4294967296}])"))) ==
        "job.json: /model/layers/0/kernel: 4294967296 is more than the supported 1073741824");
  CHECK(modelError(model({1, 8, 8}, json::parse(R"([{"type": "conv2d", "out": 1, "kernel": 3,
                                                    "stride": 9223372036854775807}])"))) ==
        "job.json: /model/layers/0/stride: 9223372036854775807 is more than the supported 1073741824");
  CHECK(modelError(model({1, 8, 8}, json::parse(R"([{"type": "conv2d", "out": 1, "kernel": 3,
                                                    "padding": [4611686018427387904, 0]}])"))) ==
        "job.json: /model/layers/0/padding: 4611686018427387904 is more than the supported 1073741824");
  CHECK(modelError(model({1, 8, 8}, json::parse(R"([{"type": "conv2d", "out": 4294967296, "kernel": 3}])"))) ==
        "job.json: /model/layers/0/out: 4294967296 is more than the supported 1073741824");
  CHECK(modelError(model({4}, json::parse(R"([{"type": "linear", "out": 4294967296}])"))) ==
        "job.json: /model/layers/0/out: 4294967296 is more than the supported 1073741824");
  // Within each field's bound, but the product is far beyond any machine: out 2^30 x 784 inputs.
  CHECK(modelError(model({784}, json::parse(R"([{"type": "linear", "out": 1073741824}])"))) ==
        "job.json: /model/layers/0: linear has 842887331840 parameters, more than the supported 2147483648 (8 GiB "
        "as float32)");
  // kernel 2^30 x 2^30 with padding that keeps the output non-empty: the weight count overflows int64.
  auto overflow = modelError(model({1024, 1, 1}, json::parse(R"([{"type": "conv2d", "out": 1048576,
      "kernel": 1073741824, "padding": 536870912}])")));
  CHECK(overflow.find("/model/layers/0: conv2d has more than 2^63 parameters") != std::string::npos);
  // A per-sample shape whose product overflows.
  CHECK(modelError(model({1048576, 1048576, 1048576, 1048576}, json::parse(R"([{"type": "relu"}])"))) ==
        "job.json: /model/input: input [1048576,1048576,1048576,1048576] has more than 1073741824 values per sample");
  // Many layers each under the limit, together over it.
  json layers = json::array();
  for (int i = 0; i < 3; ++i) layers.push_back(json{{"type", "linear"}, {"out", 32768}});
  CHECK(modelError(model({32768}, layers)) ==
        "job.json: /model: the model has 3221323776 parameters, more than the supported 2147483648 (8 GiB as "
        "float32)");
}

TEST_CASE("model files must be regular files of a config file's size") {
  auto dir = testing::tempDir("spec_files");
  CHECK(errorOf([&] { loadModelSpec("/dev/zero"); }) == "/dev/zero: model file is not a regular file (a character device)");
  REQUIRE(::mkfifo((dir + "/fifo.json").c_str(), 0600) == 0);
  CHECK(errorOf([&] { loadModelSpec(dir + "/fifo.json"); }) == dir + "/fifo.json: model file is not a regular file (a fifo)");
  CHECK(errorOf([&] { loadModelSpec(dir); }) == dir + ": model file is not a regular file (a directory)");
  testing::writeFile(dir + "/overflow.json", R"({"input": [1e999], "layers": []})");
  CHECK(errorOf([&] { loadModelSpec(dir + "/overflow.json"); }) ==
        dir + "/overflow.json: invalid JSON: number overflow parsing '1e999'");
}
