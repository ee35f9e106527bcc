#include <doctest/doctest.h>

#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "lib/ckpt/safetensors.h"
#include "lib/common/error.h"
#include "lib/nn/device.h"
#include "lib/nn/registry.h"
#include "lib/train/check.h"
#include "lib/train/checkpointing.h"
#include "lib/train/compression.h"
#include "lib/train/job.h"
#include "tests/support/process.h"
#include "tests/train/job_fixture.h"

using namespace dtrain;
using namespace dtrain::train;
using nlohmann::json;

using namespace dtrain::train::test_job;


TEST_CASE("a job loads with defaults: name from the file, output under runs/<name>") {
  auto dir = testing::tempDir("job");
  auto job = loadJob({writeJob(dir, kJob, "tiny.json")});
  CHECK(job.name == "tiny");
  CHECK(job.outputDir == std::filesystem::path("runs/tiny"));
  CHECK(job.checkpoint.dir == std::filesystem::path("runs/tiny/checkpoints"));
  CHECK(job.data.batchSize == 8);
  CHECK(job.loop.epochs == 2);
  CHECK(job.parallel.backend == "auto");
  CHECK(job.parallel.strategy == "ddp");
  CHECK(job.modelHash.size() == 16);
}

TEST_CASE("a top-level section set to null counts as not given (docs/job-file.md), a required one is missing") {
  auto dir = testing::tempDir("job_null");
  auto path = writeJob(dir, kJob);
  for (const char* section : {"parallel", "checkpoint", "logging", "init", "schedule", "train", "output_dir"}) {
    CAPTURE(section);
    Job job;
    REQUIRE_NOTHROW(job = loadJob({path, {std::string(section) + "=null"}}));
    CHECK(job.parallel.strategy == "ddp");
    CHECK(job.checkpoint.enabled);
  }
  CHECK(loadJob({path, {"train=null"}}).loop.epochs == 1);
  CHECK(configErrorOf({path, {"model=null"}}).find("missing required field 'model'") != std::string::npos);
  CHECK(configErrorOf({path, {"optimizer=null"}}).find("missing required field 'optimizer'") != std::string::npos);
}

TEST_CASE("--set overrides any field, parsing JSON values, and creates missing objects") {
  json doc = json::parse(kJob);
  applySet(doc, "train.epochs=1", "job.json");
  applySet(doc, "optimizer.lr=0.5", "job.json");
  applySet(doc, "model.layers.0.out=16", "job.json");
  applySet(doc, "checkpoint.every_steps=10", "job.json");
  applySet(doc, "name=fast run", "job.json");
  CHECK(doc["train"]["epochs"] == 1);
  CHECK(doc["optimizer"]["lr"] == 0.5);
  CHECK(doc["model"]["layers"][0]["out"] == 16);
  CHECK(doc["checkpoint"]["every_steps"] == 10);
  CHECK(doc["name"] == "fast run");
  CHECK_THROWS_WITH_AS(applySet(doc, "train.epochs", "job.json"), doctest::Contains("expected PATH=VALUE"), ConfigError);
  CHECK_THROWS_WITH_AS(applySet(doc, "model.layers.7.out=1", "job.json"), doctest::Contains("array of 3"), ConfigError);
  CHECK_THROWS_WITH_AS(applySet(doc, "train.epochs.x=1", "job.json"), doctest::Contains("not an object"), ConfigError);
}

TEST_CASE("--set changes what loadJob validates") {
  auto dir = testing::tempDir("job");
  auto path = writeJob(dir, kJob);
  auto job = loadJob({path, {"train.epochs=5", "data.batch_size=4"}, "out"});
  CHECK(job.loop.epochs == 5);
  CHECK(job.data.batchSize == 4);
  CHECK(job.outputDir == std::filesystem::path("out"));
  CHECK(configErrorOf({path, {"train.epochs=0"}}).find("/train/epochs") != std::string::npos);
}

TEST_CASE("an error in a value that --set gave names the --set as typed, and only that one") {
  auto dir = testing::tempDir("job");
  auto path = writeJob(dir, kJob);
  std::string msg = configErrorOf({path, {"train.epochs=2", "optimizer.lr=-1"}});
  CHECK(msg.find(path + ": /optimizer/lr: ") == 0);
  CHECK(msg.find("(from --set optimizer.lr=-1)") != std::string::npos);
  CHECK(msg.find("train.epochs") == std::string::npos);
  // A field the file does not know, created by the --set: reported at its top, still naming the --set.
  msg = configErrorOf({path, {"training.lr=0.1"}});
  CHECK(msg.find("unknown field 'training'") != std::string::npos);
  CHECK(msg.find("(from --set training.lr=0.1)") != std::string::npos);
  // A whole object given by --set: an error inside it names that --set.
  msg = configErrorOf({path, {R"(optimizer={"type": "sgd", "lr": "fast"})"}});
  CHECK(msg.find("/optimizer/lr") != std::string::npos);
  CHECK(msg.find(R"((from --set optimizer={"type": "sgd", "lr": "fast"}))") != std::string::npos);
  // An error the --set did not cause is reported as before.
  auto bad = writeJob(dir, std::string(kJob).replace(std::string(kJob).find("\"epochs\""), 8, "\"epochz\""), "bad.json");
  msg = configErrorOf({bad, {"optimizer.lr=0.1"}});
  CHECK(msg.find("epochz") != std::string::npos);
  CHECK(msg.find("--set") == std::string::npos);
}

TEST_CASE("job errors name the file, the JSON path and what was expected") {
  auto dir = testing::tempDir("job");
  SUBCASE("missing file") {
    CHECK(configErrorOf({dir + "/nope.json"}).find("nope.json does not exist") != std::string::npos);
  }
  SUBCASE("not JSON") {
    auto msg = configErrorOf({writeJob(dir, "{ not json")});
    CHECK(msg.find("not valid JSON") != std::string::npos);
  }
  SUBCASE("unknown top-level field (a typo)") {
    json doc = json::parse(kJob);
    doc["optimiser"] = json::object();
    auto msg = configErrorOf({writeJob(dir, doc.dump())});
    CHECK(msg.find("job.json") != std::string::npos);
    CHECK(msg.find("optimiser") != std::string::npos);
  }
  SUBCASE("unknown layer type, with the layer's path") {
    json doc = json::parse(kJob);
    doc["model"]["layers"][1]["type"] = "relux";
    auto msg = configErrorOf({writeJob(dir, doc.dump())});
    CHECK(msg.find("/model/layers/1") != std::string::npos);
    CHECK(msg.find("relux") != std::string::npos);
  }
  SUBCASE("bad parallel backend") {
    json doc = json::parse(kJob);
    doc["parallel"] = {{"backend", "mpi"}};
    auto msg = configErrorOf({writeJob(dir, doc.dump())});
    CHECK(msg.find("/parallel/backend") != std::string::npos);
    CHECK(msg.find("mpi") != std::string::npos);
  }
  SUBCASE("a parallel strategy that does not exist yet") {
    for (const char* strategy : {"pipeline"}) {  // parameter_server exists: tests/train/test_ps.cpp
      json doc = json::parse(kJob);
      doc["parallel"] = {{"strategy", strategy}};
      auto msg = configErrorOf({writeJob(dir, doc.dump())});
      CHECK(msg.find("job.json") != std::string::npos);
      CHECK(msg.find("/parallel/strategy") != std::string::npos);
      CHECK(msg.find(strategy) != std::string::npos);
      CHECK(msg.find("expected ddp") != std::string::npos);
    }
  }
  SUBCASE("an empty output or checkpoint folder, and an init.from that is a folder") {
    json doc = json::parse(kJob);
    doc["output_dir"] = "";  // was: the run wrote into the working directory
    auto msg = configErrorOf({writeJob(dir, doc.dump())});
    CHECK_MESSAGE(msg.find("job.json: /output_dir: expected a folder path, got an empty string") != std::string::npos, msg);
    doc = json::parse(kJob);
    doc["checkpoint"] = {{"dir", ""}};  // was: checkpoints beside model.safetensors in the output folder itself
    msg = configErrorOf({writeJob(dir, doc.dump())});
    CHECK_MESSAGE(msg.find("job.json: /checkpoint/dir: expected a folder path, got an empty string") != std::string::npos,
                  msg);
    for (const char* from : {"", "."}) {  // the job's folder: was accepted, then every worker failed (mmap, exit 8)
      doc = json::parse(kJob);
      doc["init"] = {{"from", from}};
      msg = configErrorOf({writeJob(dir, doc.dump())});
      CHECK_MESSAGE(msg.find("job.json: /init/from: " + (std::filesystem::path(dir) / from).string() +
                             " is a folder, not a weights file") != std::string::npos,
                    msg);
    }
  }
  SUBCASE("a bucket size past the limit names the limit (it said \"> 0\" of 5000)") {
    for (const char* key : {"bucket_mb", "first_bucket_mb"}) {
      json doc = json::parse(kJob);
      doc["parallel"] = {{key, 5000}};
      auto msg = configErrorOf({writeJob(dir, doc.dump())});
      CHECK_MESSAGE(msg.find(fmt::format("/parallel/{}: expected a number of MiB > 0 and <= 4096, got 5000", key)) !=
                        std::string::npos,
                    msg);
    }
  }
  SUBCASE("missing model file") {
    json doc = json::parse(kJob);
    doc["model"] = "models/none.json";
    auto msg = configErrorOf({writeJob(dir, doc.dump())});
    CHECK(msg.find("model file") != std::string::npos);
    CHECK(msg.find("models/none.json") != std::string::npos);
  }
}

TEST_CASE("train and val splits of the same text files with different val_fractions are refused, naming both") {
  // Before, the eval set silently overlapped the training tokens (or left a gap): an eval loss that flattered the model.
  auto dir = testing::tempDir("job_split");
  std::ofstream(dir + "/t.txt") << "some text to train on, long enough for a few windows of tokens\n";
  auto job = [&](const json& trainSplit, const json& evalSplit) {
    json doc = {{"model", {{"preset", "gpt"}, {"vocab_size", 256}, {"block_size", 4}, {"n_layer", 1}, {"n_head", 1},
                           {"n_embd", 8}}},
                {"loss", {{"type", "cross_entropy"}}},
                {"optimizer", {{"type", "sgd"}, {"lr", 0.1}}},
                {"data", {{"train", {{"format", "text"}, {"path", "t.txt"}}}, {"eval", {{"format", "text"}, {"path", "t.txt"}}}}}};
    doc["data"]["train"].update(trainSplit);
    doc["data"]["eval"].update(evalSplit);
    return JobArgs{.path = writeJob(dir, doc.dump())};
  };
  CHECK(configErrorOf(job({{"val_fraction", 0.0}}, {{"split", "val"}})) ==
        dir + "/job.json: /data/eval/val_fraction: 0.1 but /data/train/val_fraction is 0 over the same files: the val "
              "split would overlap the last 10% of the train split (expected the same val_fraction in both; the "
              "default is 0.1)");
  CHECK(configErrorOf(job({{"val_fraction", 0.3}}, {{"split", "val"}})).find(
            "/data/eval/val_fraction: 0.1 but /data/train/val_fraction is 0.3 over the same files: the val split would "
            "leave 20% of the tokens out of both") != std::string::npos);
  // The same fraction (given or default), or other files, load.
  CHECK_NOTHROW(loadJob(job({{"val_fraction", 0.2}}, {{"split", "val"}, {"val_fraction", 0.2}})));
  CHECK_NOTHROW(loadJob(job(json::object(), {{"split", "val"}})));
  std::ofstream(dir + "/v.txt") << "held-out text in a file of its own\n";
  CHECK_NOTHROW(loadJob(job({{"val_fraction", 0.0}}, {{"path", "v.txt"}, {"split", "val"}})));
}

TEST_CASE("a char-vocabulary eval set of other characters than the training set's is refused by checkJobData") {
  // Each char set numbers its own files' characters: before, "XYZ" held out in another file was scored with ids
  // that meant other characters in the model, and the run printed an eval loss and a bigram baseline of nothing.
  auto dir = testing::tempDir("job_vocab");
  std::ofstream(dir + "/a.txt") << "abcabcabcabcabcabcabcabc\n";
  std::ofstream(dir + "/b.txt") << "abcXabcabcabcabcabcabcab\n";
  std::ofstream(dir + "/c.txt") << "cabcabcabcabcab\nbcabcabcab\n";
  auto job = [&](const std::string& evalFile, const std::string& vocab) {
    json doc = {{"model", {{"preset", "gpt"}, {"vocab_size", 256}, {"block_size", 4}, {"n_layer", 1}, {"n_head", 1},
                           {"n_embd", 8}}},
                {"loss", {{"type", "cross_entropy"}}},
                {"optimizer", {{"type", "sgd"}, {"lr", 0.1}}},
                {"data", {{"train", {{"format", "text"}, {"path", "a.txt"}, {"vocab", vocab}, {"val_fraction", 0.5}}},
                          {"eval", {{"format", "text"}, {"path", evalFile}, {"vocab", vocab}, {"split", "val"},
                                    {"val_fraction", 0.5}}}}}};
    return loadJob(JobArgs{.path = writeJob(dir, doc.dump())});
  };
  std::string msg;
  try {
    checkJobData(job("b.txt", "char"));
  } catch (const ConfigError& e) {
    msg = e.what();
  }
  CHECK_MESSAGE(msg.rfind(dir + "/job.json: /data/eval: its vocabulary (", 0) == 0, msg);
  CHECK_MESSAGE(msg.find("'X' (U+0058) is only in the eval set, so a token id would mean another character") !=
                    std::string::npos, msg);
  CHECK_NOTHROW(checkJobData(job("c.txt", "char")));  // the same characters: the same ids
  CHECK_NOTHROW(checkJobData(job("b.txt", "byte")));  // bytes are their own ids
  CHECK_NOTHROW(checkJobData(job("a.txt", "char")));  // the val split of the training file
}

TEST_CASE("checkInitWeights: another model's weights for a gpt job name the missing tensor; a GPT-2 file passes") {
  // Before, any file without the gpt's first c_attn weight was taken for a Hugging Face GPT-2 file and only its
  // header was checked: `dtrain check` said OK and every worker failed after the rendezvous.
  auto dir = testing::tempDir("job_init");
  std::ofstream(dir + "/t.txt") << "some text to train on, long enough for a few windows of tokens\n";
  const std::vector<float> zeros(8 * 24, 0.0f);
  auto writeWeights = [&](const std::string& name, const std::string& tensor, Shape shape) {
    const std::vector<ckpt::NamedTensor> t = {{tensor, TensorView::f32(zeros.data(), shape)}};
    ckpt::writeSafetensorsFile(dir + "/" + name, t);
  };
  writeWeights("mlp.safetensors", "0.weight", {2, 4});
  writeWeights("hf.safetensors", "h.0.attn.c_attn.weight", {8, 24});             // GPT2Model: [C, 3C]
  writeWeights("hf_lm.safetensors", "transformer.h.0.attn.c_attn.weight", {8, 24});  // GPT2LMHeadModel
  auto job = [&](const std::string& from) {
    json doc = {{"model", {{"preset", "gpt"}, {"vocab_size", 256}, {"block_size", 4}, {"n_layer", 1}, {"n_head", 1},
                           {"n_embd", 8}}},
                {"loss", {{"type", "cross_entropy"}}},
                {"optimizer", {{"type", "sgd"}, {"lr", 0.1}}},
                {"data", {{"train", {{"format", "text"}, {"path", "t.txt"}}}}},
                {"init", {{"from", from}}}};
    return loadJob(JobArgs{.path = writeJob(dir, doc.dump())});
  };
  std::string msg;
  try {
    checkInitWeights(job("mlp.safetensors"));
  } catch (const CheckpointError& e) {
    msg = e.what();
  }
  CHECK(msg == dir + "/job.json: /init/from: " + dir +
                   "/mlp.safetensors: no tensor named 'transformer.wte.weight' ([256, 8] in this job's model): weights "
                   "of another model?");
  CHECK_NOTHROW(checkInitWeights(job("hf.safetensors")));
  CHECK_NOTHROW(checkInitWeights(job("hf_lm.safetensors")));
}

TEST_CASE("the model may live in its own file, resolved against the job's folder") {
  auto dir = testing::tempDir("job");
  std::filesystem::create_directories(dir + "/models");
  json doc = json::parse(kJob);
  testing::writeFile(dir + "/models/mlp.json", doc["model"].dump());
  doc["model"] = "models/mlp.json";
  auto job = loadJob({writeJob(dir, doc.dump())});
  CHECK(job.model.layers.size() == 3);
  auto inline_ = loadJob({writeJob(dir, kJob, "inline.json")});
  CHECK(job.modelHash == inline_.modelHash);

  // A bad value inside is named in the model file, at its own pointer (was: the job file's /model/layers/0/out).
  json bad = json::parse(kJob)["model"];
  bad["layers"][0]["out"] = -3;
  testing::writeFile(dir + "/models/bad.json", bad.dump());
  doc["model"] = "models/bad.json";
  const auto jobPath = writeJob(dir, doc.dump(), "bad_job.json");
  auto msg = configErrorOf({jobPath});
  CHECK_MESSAGE(msg.rfind(dir + "/models/bad.json (the model file of " + jobPath + "): /layers/0/out: ", 0) == 0, msg);
  // A job file given as the model file: its "model" object's pointer.
  testing::writeFile(dir + "/models/job_as_model.json", json({{"name", "x"}, {"model", bad}}).dump());
  doc["model"] = "models/job_as_model.json";
  msg = configErrorOf({writeJob(dir, doc.dump(), "bad_job2.json")});
  CHECK_MESSAGE(msg.find("/models/job_as_model.json (the model file of ") != std::string::npos, msg);
  CHECK_MESSAGE(msg.find("): /model/layers/0/out: ") != std::string::npos, msg);
  // A model file that holds no object.
  testing::writeFile(dir + "/models/list.json", "[1, 2]");
  doc["model"] = "models/list.json";
  msg = configErrorOf({writeJob(dir, doc.dump(), "bad_job3.json")});
  CHECK_MESSAGE(msg.find("/models/list.json (the model file of ") != std::string::npos, msg);
  CHECK_MESSAGE(msg.find("): /: expected a model object, got [1,2]") != std::string::npos, msg);
  // A model file that cannot be read as JSON (a folder, a syntax error): the job file and its /model are named
  // too (the message named only the model file's path).
  std::filesystem::create_directories(dir + "/models/folder.json");
  testing::writeFile(dir + "/models/broken.json", R"({"input": [4], "layers": [)");
  for (std::string file : {"models/folder.json", "models/broken.json"}) {
    CAPTURE(file);
    doc["model"] = file;
    const auto path = writeJob(dir, doc.dump(), "bad_job4.json");
    msg = configErrorOf({path});
    CHECK_MESSAGE(msg.rfind(path + ": /model: ", 0) == 0, msg);
    CHECK_MESSAGE(msg.find(file) != std::string::npos, msg);
  }
}

// Issue 10 §5: numbers that lie. Each used to be truncated, hang, read without limit or end in an internal error.
TEST_CASE("batch sizes past the bound are errors, not truncated") {
  auto dir = testing::tempDir("job_bounds");
  auto path = writeJob(dir, kJob);
  CHECK(configErrorOf({path, {"data.batch_size=2147483648"}}) ==
        path + ": /data/batch_size: 2147483648 is more than the supported 16777216 samples per rank (from --set "
               "data.batch_size=2147483648)");
  CHECK(configErrorOf({path, {"data.batch_size=4294967297"}}) ==
        path + ": /data/batch_size: 4294967297 is more than the supported 16777216 samples per rank (from --set "
               "data.batch_size=4294967297)");
  CHECK(configErrorOf({path, {"checkpoint.keep=4294967297"}}) ==
        path + ": /checkpoint/keep: 4294967297 is more than the supported 1048576 (from --set checkpoint.keep=4294967297)");
  CHECK(configErrorOf({path, {"parallel.reference_world_size=4294967297"}}) ==
        path + ": /parallel/reference_world_size: 4294967297 is more than the supported 1048576 (from --set "
               "parallel.reference_world_size=4294967297)");
  CHECK(loadJob({path, {"data.batch_size=16777216"}}).data.batchSize == 16777216);
}

TEST_CASE("a number that overflows a double is a config error naming the file") {
  auto dir = testing::tempDir("job_overflow");
  std::string text = kJob;
  text.replace(text.find("\"lr\": 0.1"), 9, "\"lr\": 1e999");
  auto path = writeJob(dir, text);
  CHECK(configErrorOf({path}) == path + ": not valid JSON: number overflow parsing '1e999'");
  // In a model file the job refers to, too.
  testing::writeFile(dir + "/model.json", R"({"input": [4], "layers": [{"type": "linear", "out": -1e400}]})");
  std::string withFile = kJob;
  auto start = withFile.find("\"model\":");
  withFile.replace(start, withFile.find("\"loss\"") - start, "\"model\": \"model.json\",\n  ");
  auto path2 = writeJob(dir, withFile, "job2.json");
  CHECK(configErrorOf({path2}) ==
        path2 + ": /model: " + dir + "/model.json: not valid JSON: number overflow parsing '-1e400'");
  // --set takes a value that is not valid JSON as a string, which the field then refuses.
  auto clean = writeJob(dir, kJob, "clean.json");
  CHECK(configErrorOf({clean, {"optimizer.lr=1e999"}}) ==
        clean + ": /optimizer/lr: expected a number > 0, got \"1e999\" (from --set optimizer.lr=1e999)");
}

TEST_CASE("job files must be regular files of a config file's size, checked before reading") {
  auto dir = testing::tempDir("job_special");
  CHECK(configErrorOf({"/dev/zero"}) == "/dev/zero: job file is not a regular file (a character device)");
  REQUIRE(::mkfifo((dir + "/fifo.json").c_str(), 0600) == 0);
  CHECK(configErrorOf({dir + "/fifo.json"}) == dir + "/fifo.json: job file is not a regular file (a fifo)");
  // A model path that is a FIFO: refused, not waited on.
  std::string withFifo = kJob;
  auto start = withFifo.find("\"model\":");
  withFifo.replace(start, withFifo.find("\"loss\"") - start, "\"model\": \"fifo.json\",\n  ");
  auto path = writeJob(dir, withFifo);
  CHECK(configErrorOf({path}) ==
        path + ": /model: " + dir + "/fifo.json: model file is not a regular file (a fifo)");
  // Bigger than 64 MiB: refused from its size, before reading it.
  {
    std::ofstream big(dir + "/big.json");
    big.seekp((int64_t{64} << 20) + 1);
    big.put(' ');
  }
  CHECK(configErrorOf({dir + "/big.json"}) ==
        dir + "/big.json: job file is 67108866 bytes, more than the 64 MiB a config file may have");
}

TEST_CASE("\"device\": \"cuda\" is validated before any worker: build, backend, strategy, layers, precision") {
  const std::string dir = testing::tempDir("job_cuda");
  auto withDevice = [&](const std::string& extra) {
    std::string text = kJob;
    text.insert(text.rfind('}'), ", " + extra);
    return JobArgs{.path = writeJob(dir, text)};
  };
  // bf16 is GPU-only: on the CPU a clear refusal naming the field; with cuda it loads (below).
  CHECK(configErrorOf(withDevice(R"("precision": "bf16")"))
            .find("/precision: \"bf16\" runs on GPUs only (\"device\": \"cuda\")") != std::string::npos);
  CHECK(loadJob(withDevice(R"("precision": "fp32")")).precision == Job::Precision::kFp32);
  CHECK(configErrorOf(withDevice(R"("precision": "fp16")")).find("/precision") != std::string::npos);
  if (!nn::cudaBuilt()) {
    CHECK(configErrorOf(withDevice(R"("device": "cuda")")).find("/device: \"cuda\" needs a dtrain built with CUDA") !=
          std::string::npos);
    return;
  }
  const Job job = loadJob(withDevice(R"("device": "cuda", "tf32": false)"));
  CHECK(job.device == Device::cuda(0));
  CHECK_FALSE(job.tf32);
  CHECK(loadJob(withDevice(R"("device": "cpu")")).device == Device::cpu());
  // A checkpoint holds the CPU's files whatever the device (parameters and optimizer state are staged device ->
  // host), and resuming compares the model spec only: device, tf32 and precision stay out of it, so a GPU run's
  // checkpoint resumes on the CPU and vice versa (run with a GPU by test_gpu_train's cross-device resumes).
  CHECK(job.modelHash == loadJob(withDevice(R"("device": "cpu")")).modelHash);
  CHECK(job.modelHash == loadJob(withDevice(R"("device": "cuda", "precision": "bf16")")).modelHash);
  CHECK(loadJob(withDevice(R"("precision": "fp32")")).tf32);
  CHECK(configErrorOf(withDevice(R"("device": "cuda", "parallel": {"backend": "tcp"})"))
            .find("/parallel/backend: 'tcp' cannot carry GPU gradients") != std::string::npos);
  // Every compression runs with cuda: fp16/bf16 on the device (CastHook's GPU path), top-k and PowerSGD on host
  // copies of the buckets (CompressionHook's host staging), every option; errors as on the CPU.
  CHECK(loadJob(withDevice(R"("device": "cuda", "parallel": {"compression": {"type": "fp16"}})"))
            .parallel.compression->type == CompressionSettings::Type::kFp16);
  CHECK(loadJob(withDevice(R"("device": "cuda", "parallel": {"compression": {"type": "bf16"}})"))
            .parallel.compression->type == CompressionSettings::Type::kBf16);
  const Job topkJob = loadJob(withDevice(R"("device": "cuda", "parallel": {"compression": {"type": "topk",
      "ratio": 0.01, "warmup_steps": 10, "start_step": 5, "error_feedback": true}})"));
  CHECK(topkJob.parallel.compression->type == CompressionSettings::Type::kTopK);
  CHECK(topkJob.parallel.compression->warmupSteps == 10);
  const Job psgdJob = loadJob(withDevice(R"("device": "cuda", "parallel": {"compression": {"type": "powersgd",
      "rank": 2, "start_step": 3, "error_feedback": false}})"));
  CHECK(psgdJob.parallel.compression->rank == 2);
  CHECK_FALSE(psgdJob.parallel.compression->errorFeedback);
  auto withOptimizer = [&](const std::string& optimizer, const std::string& compression) {
    std::string text = kJob;
    const std::string sgd = R"("optimizer": {"type": "sgd", "lr": 0.1})";
    text.replace(text.find(sgd), sgd.size(), optimizer);
    text.insert(text.rfind('}'), R"(, "device": "cuda", "parallel": {"compression": )" + compression + "}");
    return JobArgs{.path = writeJob(dir, text)};
  };
  const Job dgc = loadJob(withOptimizer(R"("optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9, "clip_grad_norm": 1})",
                                        R"({"type": "topk", "momentum_correction": true, "momentum_masking": false})"));
  CHECK(dgc.parallel.compression->momentumCorrection);
  CHECK(dgc.parallel.compression->momentum == 0.9);
  CHECK(dgc.parallel.compression->localClipNorm == 1);
  CHECK(loadJob(withOptimizer(R"("optimizer": {"type": "adamw", "lr": 0.01})", R"({"type": "topk", "local_adam": true})"))
            .parallel.compression->localAdam);
  CHECK(configErrorOf(withDevice(R"("device": "cuda", "parallel": {"compression": {"type": "topk", "rank": 2}})"))
            .find("/parallel/compression/rank: applies to \"type\": \"powersgd\" only") != std::string::npos);
  CHECK(configErrorOf(withDevice(R"("device": "cuda", "parallel": {"compression": {"type": "topk", "momentum_correction": true}})"))
            .find("/parallel/compression/momentum_correction") != std::string::npos);
  CHECK(loadJob(withDevice(R"("device": "cuda", "precision": "bf16")")).precision == Job::Precision::kBf16);
  std::string conv = R"({"model": {"input": [1, 6, 6], "layers": [{"type": "conv2d", "out": 2, "kernel": 3},
    {"type": "flatten"}, {"type": "linear", "out": 3}]}, "loss": {"type": "cross_entropy"},
    "data": {"train": {"format": "synthetic", "task": "classification", "samples": 8, "features": 36,
    "num_classes": 3}}, "optimizer": {"type": "sgd", "lr": 0.1}, "device": "cuda"})";
  // Every layer type has a CUDA implementation now (conv2d, maxpool2d and dropout were refused before).
  CHECK(loadJob({.path = writeJob(dir, conv, "conv.json")}).device == Device::cuda(0));
  std::string pooled = conv;
  pooled.replace(pooled.find(R"({"type": "flatten"})"), 19,
                 R"({"type": "maxpool2d", "kernel": 2}, {"type": "dropout", "p": 0.5}, {"type": "flatten"})");
  CHECK(loadJob({.path = writeJob(dir, pooled, "pooled.json")}).model.layers.size() == 5);
  // The model-parallel and parameter-server strategies stay on the CPU: refused with the field that asks for them.
  CHECK(configErrorOf(withDevice(R"("device": "cuda", "parallel": {"pipeline": {"stages": 2, "micro_batches": 8}})"))
            .find("/parallel/pipeline/stages: 2 pipeline stages run on the CPU only") != std::string::npos);
  CHECK(configErrorOf(withDevice(R"("device": "cuda", "parallel": {"tensor": 2})"))
            .find("/parallel/tensor: tensor parallelism (2 ranks) runs on the CPU only") != std::string::npos);
  CHECK(configErrorOf(withDevice(R"("device": "cuda", "parallel": {"strategy": "parameter_server", "servers": 1})"))
            .find("/parallel/strategy: 'parameter_server' runs on the CPU only") != std::string::npos);
  CHECK(loadJob(withDevice(R"("parallel": {"tensor": 2})")).parallel.tensor == 2);  // fine on the CPU
  // Attention dropout (the gpt preset's "dropout") runs on the GPU too.
  const std::string gpt = writeJob(dir, kJob, "gpt.json");
  const std::string preset = R"(model={"preset": "gpt", "vocab_size": 16, "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 4)";
  CHECK(loadJob({gpt, {preset + "}", R"(device="cuda")"}}).device == Device::cuda(0));
  const std::string attnDropout = R"(model={"input": [8], "layers": [{"type": "embedding", "vocab_size": 16,
    "n_embd": 4}, {"type": "causal_self_attention", "n_head": 2, "dropout": 0.1}, {"type": "lm_head",
    "vocab_size": 16, "tied": false}]})";
  CHECK(loadJob({gpt, {attnDropout, R"(device="cuda")"}}).model.layers[1].p == 0.1);
  // Every loss and optimizer has a CUDA implementation (bce_with_logits and adagrad were refused by name before).
  CHECK(loadJob({gpt, {R"(loss={"type": "bce_with_logits"})", R"(device="cuda")"}}).loss.type ==
        nn::LossType::kBceWithLogits);
  CHECK(loadJob({gpt, {R"(optimizer={"type": "adagrad", "lr": 0.1})", R"(device="cuda")"}}).optimizer.type ==
        nn::OptimizerType::kAdagrad);
  CHECK(loadJob({gpt, {R"(loss={"type": "mse"})", R"(optimizer={"type": "adam"})", R"(device="cuda")"}}).device ==
        Device::cuda(0));
}

TEST_CASE("DTRAIN_COMPRESSION_HOST_STAGING with a value that is no boolean fails a cuda job's loading, naming it") {
  // "true" used to mean "off" (only "1" counted): the job ran the device path the user had asked to avoid.
  if (!nn::cudaBuilt()) return;
  const std::string dir = testing::tempDir("job_staging");
  std::string text = kJob;
  text.insert(text.rfind('}'), R"(, "device": "cuda", "parallel": {"compression": {"type": "topk", "ratio": 0.1}})");
  const std::string path = writeJob(dir, text);
  ::setenv(kHostStagingVariable, "maybe", 1);
  std::string error;
  try {
    loadJob({path});
  } catch (const UsageError& e) {
    error = e.what();
  }
  CHECK(error.find("environment variable DTRAIN_COMPRESSION_HOST_STAGING=maybe: expected 0/1/true/false") !=
        std::string::npos);
  // A CPU job does not read it; fp16 never stages.
  std::string cpu = kJob;
  cpu.insert(cpu.rfind('}'), R"(, "parallel": {"compression": {"type": "topk", "ratio": 0.1}})");
  CHECK(loadJob({writeJob(dir, cpu, "cpu.json")}).device == Device::cpu());
  std::string half = kJob;
  half.insert(half.rfind('}'), R"(, "device": "cuda", "parallel": {"compression": {"type": "fp16"}})");
  CHECK(loadJob({writeJob(dir, half, "half.json")}).device == Device::cuda(0));
  ::setenv(kHostStagingVariable, "true", 1);
  CHECK(loadJob({path}).device == Device::cuda(0));
  ::unsetenv(kHostStagingVariable);
}

TEST_CASE("\"attention\" picks the CUDA attention's kernels: auto, fused or matmul; fused where it cannot run is refused") {
  const std::string dir = testing::tempDir("job_attention");
  const std::string gpt = writeJob(dir, kJob, "gpt.json");
  const std::string preset = R"(model={"preset": "gpt", "vocab_size": 16, "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 4)";
  CHECK(loadJob({gpt, {preset + "}"}}).attention == nn::AttentionKernel::kAuto);  // the default
  CHECK(loadJob({gpt, {preset + "}", "attention=fused"}}).attention == nn::AttentionKernel::kFused);
  CHECK(loadJob({gpt, {preset + "}", "attention=matmul"}}).attention == nn::AttentionKernel::kMatmul);
  CHECK(loadJob({gpt, {preset + "}", "attention=auto"}}).attention == nn::AttentionKernel::kAuto);
  CHECK(configErrorOf({gpt, {preset + "}", "attention=flash"}})
            .find("/attention: unknown attention kernel 'flash' (expected auto, fused, matmul)") != std::string::npos);
  CHECK(configErrorOf({gpt, {preset + "}", "attention=1"}}).find("/attention") != std::string::npos);
  // The CPU layers have one implementation: the field is accepted and ignored there, whatever the model.
  const std::string wide =
      R"(model={"preset": "gpt", "vocab_size": 16, "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 258})";
  CHECK(loadJob({gpt, {wide, "attention=fused"}}).attention == nn::AttentionKernel::kFused);
  if (!nn::cudaBuilt()) return;
  CHECK(loadJob({gpt, {preset + "}", "attention=fused", R"(device="cuda")"}}).device == Device::cuda(0));
  // Attention dropout runs in the fused kernels too.
  CHECK(loadJob({gpt, {preset + R"(, "dropout": 0.1})", "attention=fused", R"(device="cuda")"}}).attention ==
        nn::AttentionKernel::kFused);
  // "fused" on a GPU names the first layer the fused kernels cannot run, and why: a head size above 128 (n_embd
  // 258 / 2 heads = 129); "auto" runs it on the matmul path.
  CHECK(configErrorOf({gpt, {wide, "attention=fused", R"(device="cuda")"}})
            .find("/attention: \"fused\" cannot run /model/layers/1/layers/1 (causal_self_attention: head size 129 "
                  "(n_embd 258 / n_head 2) is above the fused kernels' 128); use \"auto\"") != std::string::npos);
  CHECK(loadJob({gpt, {wide, R"(device="cuda")"}}).attention == nn::AttentionKernel::kAuto);
}

TEST_CASE("checkGpusForWorkers names both counts when a node has fewer GPUs than local workers") {
  const std::string dir = testing::tempDir("job_gpus");
  Job cpu = loadJob({.path = writeJob(dir, kJob)});
  CHECK_NOTHROW(checkGpusForWorkers(cpu, 8, 0));  // CPU jobs need no GPU
  Job gpu = cpu;
  gpu.device = Device::cuda(0);
  CHECK_NOTHROW(checkGpusForWorkers(gpu, 2, 2));
  try {
    checkGpusForWorkers(gpu, 4, 2);
    FAIL("4 workers on 2 GPUs passed");
  } catch (const ConfigError& e) {
    const std::string m = e.what();
    CHECK(m.find("/device: \"cuda\" needs one GPU per local worker: 4 local worker(s) but 2 GPU(s) visible") !=
          std::string::npos);
    CHECK(m.find(gpu.sourceFile) == 0);
  }
  CHECK_THROWS_WITH_AS(checkGpusForWorkers(gpu, 1, 0), doctest::Contains("1 local worker(s) but 0 GPU(s) visible"),
                       ConfigError);
}

// A parameter-server job with a sparse table: the sparse optimizer's fields, set on the command line.
static const char* kSparsePsJob = R"({
  "model": {"input": [2], "layers": [
    {"type": "embedding", "vocab_size": 1000, "n_embd": 16, "position": false, "sparse": true},
    {"type": "flatten"}, {"type": "linear", "out": 1}]},
  "loss": {"type": "bce_with_logits"},
  "data": {"train": {"format": "synthetic", "task": "recsys", "users": 600, "items": 400, "samples": 100}, "batch_size": 8},
  "optimizer": {"type": "sgd", "lr": 0.01},
  "parallel": {"strategy": "parameter_server", "servers": 1, "mode": "async"}
})";

TEST_CASE("the sparse optimizer's fields given with --set: the error names the field and the --set") {
  auto dir = testing::tempDir("job_sparse_set");
  auto path = writeJob(dir, kSparsePsJob);
  REQUIRE(configErrorOf({path}).empty());
  const std::string table = " (for the sparse table of /model/layers/0)";
  // Each used to be "job.json: /optimizer (for the sparse table of /model/layers/0): sgd momentum 0.9 ...": at
  // the optimizer, not the field, and without the --set that gave the value.
  CHECK(configErrorOf({path, {"optimizer.momentum=0.9"}}) ==
        path + ": /optimizer/momentum: 0.9 with sparse embeddings" + table +
            " (expected 0: torch.optim.SGD has no sparse momentum) (from --set optimizer.momentum=0.9)");
  CHECK(configErrorOf({path, {"optimizer.weight_decay=0.1"}}) ==
        path + ": /optimizer/weight_decay: 0.1 with sparse embeddings" + table +
            " (expected 0: torch.optim does not decay sparse gradients) (from --set optimizer.weight_decay=0.1)");
  CHECK(configErrorOf({path, {R"(optimizer={"type": "adam", "amsgrad": true})"}}) ==
        path + ": /optimizer/amsgrad: true with sparse embeddings" + table +
            R"( (expected false: SparseAdam has no amsgrad) (from --set optimizer={"type": "adam", "amsgrad": true}))");
  // AdamW's default decay: named at the type that brought it, and the --set that chose it.
  CHECK(configErrorOf({path, {"optimizer.type=adamw"}}) ==
        path + ": /optimizer/type: \"adamw\" decays by default (weight_decay 0.01), and sparse embeddings take no "
               "weight decay" + table + " (torch.optim does not decay sparse gradients): set \"weight_decay\": 0, or "
               "use \"adam\" (both map to SparseAdam for the table) (from --set optimizer.type=adamw)");
  CHECK(configErrorOf({path, {"optimizer.type=adamw", "optimizer.weight_decay=0"}}).empty());
  // The same values in the file: no --set named.
  auto inFile = writeJob(dir, std::string(kSparsePsJob).replace(std::string(kSparsePsJob).find("\"lr\": 0.01"), 10,
                                                                 "\"lr\": 0.01, \"momentum\": 0.9"),
                         "momentum.json");
  CHECK(configErrorOf({inFile}) == inFile + ": /optimizer/momentum: 0.9 with sparse embeddings" + table +
                                        " (expected 0: torch.optim.SGD has no sparse momentum)");
}

TEST_CASE("a --set that changed another field of a cross-field check is named too (with --set)") {
  auto dir = testing::tempDir("job_sparse_set");
  auto path = writeJob(dir, kSparsePsJob);
  // The strategy set to ddp: the sparse layer (in the model) is what fails, because of the --set.
  std::string msg = configErrorOf({path, {"parallel.strategy=ddp", "train.epochs=1"}});
  CHECK(msg.find(path + ": /parallel/servers: only for the parameter-server strategy") == 0);
  CHECK(msg.find("(with --set parallel.strategy=ddp)") != std::string::npos);
  CHECK(msg.find("train.epochs") == std::string::npos);
  msg = configErrorOf({path, {R"(parallel={"strategy": "ddp"})"}});
  CHECK(msg.find(path + ": /model/layers/0/sparse: a sparse embedding keeps its table on parameter servers") == 0);
  CHECK(msg.find(R"((with --set parallel={"strategy": "ddp"}))") != std::string::npos);
  // The mode changed by --set, the staleness in the file.
  auto ssp = writeJob(dir, std::string(kSparsePsJob).replace(std::string(kSparsePsJob).find("\"mode\": \"async\""),
                                                              15, "\"mode\": \"ssp\", \"staleness\": 2"),
                      "ssp.json");
  REQUIRE(configErrorOf({ssp}).empty());
  msg = configErrorOf({ssp, {"parallel.mode=async"}});
  CHECK(msg.find(ssp + ": /parallel/staleness: only with \"mode\": \"ssp\"") == 0);
  CHECK(msg.find("(with --set parallel.mode=async)") != std::string::npos);
  // A required section removed by --set.
  msg = configErrorOf({ssp, {"loss=null"}});
  CHECK(msg.find("missing required field 'loss'") != std::string::npos);
  CHECK(msg.find("(with --set loss=null)") != std::string::npos);
  // A --set of an unrelated field with a word that happens to be in the message is not named.
  msg = configErrorOf({path, {"optimizer.type=sgd", "loss.type=mse2"}});
  CHECK(msg.find("(from --set loss.type=mse2)") != std::string::npos);
  CHECK(msg.find("optimizer.type") == std::string::npos);
}

TEST_CASE("a model's name and a job's description are strings: a number is refused naming the field") {
  auto dir = testing::tempDir("job_name_type");
  auto path = writeJob(dir, kJob);
  CHECK(configErrorOf({path, {"model.name=5"}}) ==
        path + ": /model/name: expected a string, got 5 (from --set model.name=5)");
  CHECK(configErrorOf({path, {"model.name=mlp"}}).empty());
  CHECK(configErrorOf({path, {R"(description={"a": 1})"}}) ==
        path + ": /description: expected a string, got {\"a\":1} (from --set description={\"a\": 1})");
  CHECK(configErrorOf({path, {"description=a small MLP"}}).empty());
}
