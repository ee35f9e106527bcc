// Issue 11 from a user's side: a GPT job on text trains under `dtrain run -n 2`, prints its bigram baseline,
// writes model.json/vocab.json, and `dtrain generate` samples from it; bad inputs (n_embd not divisible by
// n_head, block_size longer than the data, a token id >= vocab_size, an empty or unreadable text file) are refused
// with exit 2 naming the file, field and value, before any worker starts.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>
#include <sys/stat.h>

#include <filesystem>
#include <string>
#include <vector>

#include "tests/integration/launch_helpers.h"
#include "tests/integration/train_helpers.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;
using nlohmann::json;

namespace {

json gptJob(const std::string& textFile) {
  return json{
      {"model", {{"preset", "gpt"}, {"vocab_size", 256}, {"block_size", 16}, {"n_layer", 1}, {"n_head", 2},
                 {"n_embd", 16}}},
      {"loss", {{"type", "cross_entropy"}}},
      {"optimizer", {{"type", "adamw"}, {"lr", 0.01}, {"weight_decay_on", "matrices"}}},
      {"data", {{"train", {{"format", "text"}, {"path", textFile}, {"split", "train"}}},
                {"eval", {{"format", "text"}, {"path", textFile}, {"split", "val"}}},
                {"batch_size", 4}}},
      {"train", {{"epochs", 1}, {"seed", 1}}},
      {"checkpoint", false}};
}

}  // namespace

TEST_CASE("a GPT trains on text with dtrain run -n 2, and dtrain generate samples from the run") {
  const std::string dir = tempDir("gpt_job");
  std::string text;
  for (int i = 0; i < 300; ++i) text += "the quick brown fox jumps over the lazy dog. ";
  writeFile(dir + "/text.txt", text);
  writeFile(dir + "/job.json", gptJob(dir + "/text.txt").dump());
  auto check = run({dtrainBinary(), "check", dir + "/job.json"});
  INFO(check.err);
  REQUIRE(check.exitCode == 0);
  CHECK(check.out.find("causal_self_attention") == std::string::npos);
  CHECK(check.out.find("x + ln_1>attn") != std::string::npos);
  CHECK(check.out.find("total parameters: 7664") != std::string::npos);  // 256*16 + 16*16 + 12*256 + 13*16 + 32

  auto r = run({dtrainBinary(), "run", "--standalone", "--nproc-per-node", "2", dir + "/job.json", "--output-dir",
                dir + "/run"},
               {.timeout = 120s});
  INFO(r.out);
  INFO(r.err);
  REQUIRE(r.exitCode == 0);
  CHECK(r.out.find("bigram baseline on the same split: eval loss") != std::string::npos);
  CHECK(r.out.find("vs bigram baseline") != std::string::npos);
  for (const char* f : {"model.json", "vocab.json", "model.safetensors"}) CHECK(std::filesystem::exists(dir + "/run/" + f));
  auto tensors = readTensorsF32(dir + "/run/model.safetensors");
  CHECK(tensors.count("transformer.h.0.attn.c_attn.weight") == 1);
  CHECK(tensors.count("lm_head.weight") == 0);

  auto g1 = run({dtrainBinary(), "generate", dir + "/run", "--prompt", "the ", "--tokens", "40", "--seed", "7"});
  auto g2 = run({dtrainBinary(), "generate", dir + "/run", "--prompt", "the ", "--tokens", "40", "--seed", "7"});
  INFO(g1.err);
  REQUIRE(g1.exitCode == 0);
  CHECK(g1.out.rfind("the ", 0) == 0);
  CHECK(g1.out.size() == 4 + 40 + 1);  // prompt, 40 byte tokens, newline
  CHECK(g1.out == g2.out);  // the same seed, the same text
  // A bad flag value is a command-line error (the README's exit 3), before anything is loaded.
  auto bad = run({dtrainBinary(), "generate", dir + "/run", "--temperature", "0"});
  CHECK(bad.exitCode == 3);
  CHECK(bad.err.find("--temperature: 0 (expected > 0)") != std::string::npos);
  auto badTokens = run({dtrainBinary(), "generate", dir + "/run", "--tokens", "-5"});
  CHECK(badTokens.exitCode == 3);
  CHECK(badTokens.err.find("--tokens: -5 (expected >= 0)") != std::string::npos);
  // So is a prompt the model cannot read (it was exit 2, the code of a bad job file).
  auto emptyPrompt = run({dtrainBinary(), "generate", dir + "/run", "--prompt", ""});
  CHECK(emptyPrompt.exitCode == 3);
  CHECK(emptyPrompt.err.find("--prompt: empty (expected at least one character)") != std::string::npos);
  CHECK(emptyPrompt.out.empty());
  // A run folder without model.safetensors (stopped before its end) says why, with the checkpoint exit code.
  std::filesystem::rename(dir + "/run/model.safetensors", dir + "/run/model.safetensors.bak");
  auto unfinished = run({dtrainBinary(), "generate", dir + "/run"});
  CHECK(unfinished.exitCode == 8);
  CHECK(unfinished.err.find("/run/model.safetensors does not exist: the run has not finished") != std::string::npos);
  // Nothing of the prompt is printed before an error; the wrong folder says what it lacks.
  CHECK(unfinished.out.empty());
  auto notRun = run({dtrainBinary(), "generate", dir, "--prompt", "hello"});
  CHECK(notRun.exitCode == 2);
  CHECK(notRun.out.empty());
  CHECK(notRun.err.find(": no model.json here: not the output folder of a language model's run") != std::string::npos);
  auto missing = run({dtrainBinary(), "generate", dir + "/nonexistent"});
  CHECK(missing.exitCode == 2);
  CHECK(missing.err.find("/nonexistent: no such run directory") != std::string::npos);
}

TEST_CASE("bad GPT jobs are refused with exit 2 before any worker starts, naming file, field and value") {
  const std::string dir = tempDir("gpt_bad");
  std::string text;
  for (int i = 0; i < 40; ++i) text += "abcdefghij";
  writeFile(dir + "/text.txt", text);
  writeFile(dir + "/empty.txt", "");
  writeFile(dir + "/secret.txt", text);
  ::chmod((dir + "/secret.txt").c_str(), 0);
  std::vector<uint16_t> tokens(200, 7);
  tokens[123] = 300;
  writeFile(dir + "/tokens.bin", std::string(reinterpret_cast<const char*>(tokens.data()), tokens.size() * 2));

  struct Bad {
    std::string name;
    json job;
    std::string expected;
  };
  std::vector<Bad> cases;
  json heads = gptJob(dir + "/text.txt");
  heads["model"]["n_head"] = 3;
  cases.push_back({"n_embd % n_head", heads, "/model/n_head: n_embd 16 is not divisible by n_head 3"});
  json longBlock = gptJob(dir + "/text.txt");
  longBlock["model"]["block_size"] = 64;  // the val split has 40 tokens
  cases.push_back({"block_size > data", longBlock,
                   "/data/eval/path: " + dir + "/text.txt: 40 tokens in the val split (val_fraction 0.1) but "
                   "block_size 64 needs at least 65"});
  json empty = gptJob(dir + "/empty.txt");
  cases.push_back({"empty text", empty, dir + "/empty.txt: the file is empty"});
  json tok = gptJob(dir + "/text.txt");
  tok["data"]["train"] = {{"format", "tokens"}, {"path", dir + "/tokens.bin"}};
  tok["data"].erase("eval");
  cases.push_back({"token id >= vocab_size", tok,
                   "/data/train: token id 300 (at token 123 of tokens tokens.bin: 200 tokens: 12 windows of 16) is >= "
                   "the model's vocab_size 256"});
  if (::geteuid() != 0) {  // root reads any file
    json secret = gptJob(dir + "/secret.txt");
    cases.push_back({"unreadable text", secret, dir + "/secret.txt: not readable"});
  }
  for (const auto& c : cases) {
    INFO(c.name);
    writeFile(dir + "/bad.json", c.job.dump());
    for (const char* cmd : {"check", "run"}) {
      INFO(cmd);
      std::vector<std::string> argv{dtrainBinary(), cmd};
      if (std::string(cmd) == "run") argv.insert(argv.end(), {"--standalone", "--nproc-per-node", "2"});
      argv.insert(argv.end(), {dir + "/bad.json", "--output-dir", dir + "/out"});
      auto r = run(argv, {.timeout = 30s});
      INFO(r.err);
      CHECK(r.exitCode == 2);
      CHECK(r.err.find(c.expected) != std::string::npos);
      CHECK(r.err.find(dir + "/bad.json") != std::string::npos);
      CHECK(r.out.find("[n0 r") == std::string::npos);  // no worker was started
    }
  }
}
