// Fault tolerance as a user sees it: kill anything at any moment and the job finishes with the same result.
#include <doctest/doctest.h>

#include <signal.h>

#include <filesystem>
#include <algorithm>
#include <fstream>
#include <regex>
#include <set>

#include "lib/common/hash.h"
#include "tests/integration/launch_helpers.h"
#include "tests/integration/train_helpers.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

std::vector<std::string> trainRun(const std::string& job, const std::string& out, std::vector<std::string> extra = {}) {
  std::vector<std::string> args = runArgs({"--standalone", "--nproc-per-node", "2", "--max-restarts", "2",
                                           "--shutdown-timeout", "2s"});
  args.insert(args.end(), extra.begin(), extra.end());
  args.push_back(job);
  args.push_back("--output-dir");
  args.push_back(out);
  return args;
}

std::vector<std::string> listSteps(const std::string& dir) {
  std::vector<std::string> out;
  if (!fs::exists(dir)) return out;
  for (auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

TEST_CASE("SIGKILL of a worker mid-epoch: the job succeeds with weights bit-identical to an uninterrupted run") {
  std::string dir = tempDir("killresume");
  writeFile(dir + "/job.json", smallJob().dump());
  auto clean = run(trainRun(dir + "/job.json", dir + "/clean"), {.timeout = 60s});
  REQUIRE_MESSAGE(clean.exitCode == 0, clean.err);
  auto killed = run(trainRun(dir + "/job.json", dir + "/killed"),
                    {.timeout = 60s, .env = {{"DTRAIN_FAULT", "rank=1,step=7,action=kill"}}});
  INFO(killed.out, killed.err);
  REQUIRE(killed.exitCode == 0);
  CHECK(killed.err.find("signal 9 (SIGKILL)") != std::string::npos);
  // A SIGKILLed worker says nothing (it cannot catch it): the report names the usual sender, the OOM killer.
  CHECK(killed.err.find("(SIGKILL from outside dtrain: the kernel's out-of-memory killer sends it when memory runs "
                        "out, see `dmesg`; or a kill -9)") != std::string::npos);
  CHECK(killed.out.find("resumed from") != std::string::npos);
  CHECK(readTensorsRaw(dir + "/clean/model.safetensors") == readTensorsRaw(dir + "/killed/model.safetensors"));
}

TEST_CASE("SIGKILL of a worker with a pinned-seed dropout layer: weights bit-identical to an uninterrupted run") {
  // A dropout layer with its own "seed" draws from (that seed, step, micro-batch), the same on every rank: the
  // resumed run drops what the uninterrupted one dropped (its masks used to run on from the model's build).
  std::string dir = tempDir("killresume_pinned");
  json job = smallJob();
  job["model"]["layers"][2]["seed"] = 4;
  writeFile(dir + "/job.json", job.dump());
  auto clean = run(trainRun(dir + "/job.json", dir + "/clean"), {.timeout = 60s});
  REQUIRE_MESSAGE(clean.exitCode == 0, clean.err);
  auto killed = run(trainRun(dir + "/job.json", dir + "/killed"),
                    {.timeout = 60s, .env = {{"DTRAIN_FAULT", "rank=1,step=7,action=kill"}}});
  INFO(killed.out, killed.err);
  REQUIRE(killed.exitCode == 0);
  CHECK(killed.out.find("resumed from") != std::string::npos);
  CHECK(readTensorsRaw(dir + "/clean/model.safetensors") == readTensorsRaw(dir + "/killed/model.safetensors"));
}

TEST_CASE("SIGKILL of a worker in a GPT run with attention and residual dropout: weights bit-identical") {
  // Attention dropout's masks (Philox counters, lib/gpu/philox.h) are keyed from (seed, rank, step, micro-batch)
  // like the dropout layers': the resumed run drops what the uninterrupted one dropped.
  std::string dir = tempDir("killresume_gpt");
  std::string text;
  for (int i = 0; i < 300; ++i) text += "the quick brown fox jumps over the lazy dog. ";
  writeFile(dir + "/text.txt", text);
  const json job = {
      {"model", {{"preset", "gpt"}, {"vocab_size", 256}, {"block_size", 16}, {"n_layer", 2}, {"n_head", 2},
                 {"n_embd", 16}, {"dropout", 0.2}}},
      {"loss", {{"type", "cross_entropy"}}},
      {"optimizer", {{"type", "adamw"}, {"lr", 0.01}}},
      {"data", {{"train", {{"format", "text"}, {"path", dir + "/text.txt"}, {"split", "train"}}}, {"batch_size", 4}}},
      {"train", {{"epochs", 1}, {"max_steps", 12}, {"seed", 3}, {"log_every", 1}}},
      {"checkpoint", {{"every_steps", 3}, {"keep", 2}}}};
  writeFile(dir + "/job.json", job.dump());
  auto clean = run(trainRun(dir + "/job.json", dir + "/clean"), {.timeout = 60s});
  REQUIRE_MESSAGE(clean.exitCode == 0, clean.err);
  auto killed = run(trainRun(dir + "/job.json", dir + "/killed"),
                    {.timeout = 60s, .env = {{"DTRAIN_FAULT", "rank=1,step=7,action=kill"}}});
  INFO(killed.out, killed.err);
  REQUIRE(killed.exitCode == 0);
  CHECK(killed.out.find("resumed from") != std::string::npos);
  CHECK(readTensorsRaw(dir + "/clean/model.safetensors") == readTensorsRaw(dir + "/killed/model.safetensors"));
}

TEST_CASE("an epoch resumed at a larger world where a rank's share runs out a step early: DDP and a pipeline finish") {
  // 97 samples, batch 16. One process saves after `steps` steps; two data replicas resume the rest of that epoch in
  // uneven shares (rank r takes rest[r::2]), so replica 1's last batch is empty. With log_every 1 that step is a
  // progress interval of its own: replica 1 skipped the metrics' reduction that replica 0 entered, and the ranks'
  // collectives fell out of step: a hang until parallel.timeout (exit 7) or a rank that ran ahead and exited.
  std::string dir = tempDir("resume-empty-share");
  json job = smallJob(97, 16, 2);
  job["model"]["layers"][2] = {{"type", "tanh"}};  // no dropout
  job["checkpoint"] = {{"every_steps", 100}};
  job["parallel"] = {{"timeout", "10s"}};
  writeFile(dir + "/job.json", job.dump());
  struct Case {
    const char* name;
    int steps;  // saved by the one process: the rest is 97 - 16 x steps samples
    int nproc;
    const char* parallel;
  };
  for (const Case& c : {Case{"ddp-rest1", 6, 2, R"(parallel={"timeout": "10s"})"},
                        Case{"ddp-rest65", 2, 2, R"(parallel={"timeout": "10s"})"},
                        Case{"pipeline-rest1", 6, 4, R"(parallel={"timeout": "10s", "pipeline": {"stages": 2, "micro_batches": 2}})"},
                        Case{"pipeline-rest65", 2, 4, R"(parallel={"timeout": "10s", "pipeline": {"stages": 2, "micro_batches": 2}})"}}) {
    const std::string name = c.name;
    CAPTURE(name);
    const std::string out = dir + "/" + name;
    auto first = run({dtrainBinary(), "train", dir + "/job.json", "--output-dir", out, "--set",
                      fmt::format("train.max_steps={}", c.steps)},
                     {.timeout = 60s, .env = {{"DTRAIN_SAMPLE_LOG", out + "/samples-1"}}});
    REQUIRE_MESSAGE(first.exitCode == 0, first.err);
    auto resumed = run(runArgs({"--standalone", "--nproc-per-node", std::to_string(c.nproc), dir + "/job.json",
                                "--output-dir", out, "--set", c.parallel}),
                       {.timeout = 90s, .env = {{"DTRAIN_SAMPLE_LOG", out + "/samples-2"}}});
    INFO(resumed.out, resumed.err);
    CHECK(resumed.exitCode == 0);
    CHECK(resumed.out.find(fmt::format("resumed from {}/checkpoints/step-{:09d}", out, c.steps)) != std::string::npos);
    CHECK(resumed.err.find("timed out") == std::string::npos);
    // The start-up line gives the job's batch, not the resumed epoch's rest per rank ("x batch 1 (batch_size 16 is
    // more than a rank's 1 samples)").
    CHECK(resumed.out.find(" x batch 16, ") != std::string::npos);
    CHECK(resumed.out.find("is more than a rank's") == std::string::npos);
    // The epoch of the resize: every sample once, over the two runs.
    std::map<int64_t, int> seen;
    for (const char* part : {"/samples-1", "/samples-2"})
      for (auto& f : fs::directory_iterator(out + part))
        for (auto& j : readJsonLines(f.path().string()))
          if (j["epoch"] == 0)
            for (auto i : j["idx"].get<std::vector<int64_t>>()) seen[i]++;
    CHECK(seen.size() == 97);
    for (auto& [sample, times] : seen) CHECK_MESSAGE(times == 1, "sample ", sample, " seen ", times);
    // The final line's samples are the ones the resumed run trained: what its replicas logged, padding included
    // (it multiplied rank 0's by the replicas, so the uneven rest of 1 sample counted 2, of 65 samples 66).
    int64_t logged = 0;
    for (auto& f : fs::directory_iterator(out + "/samples-2"))
      for (auto& j : readJsonLines(f.path().string()))
        logged += static_cast<int64_t>(j["idx"].size() + (j.contains("pad") ? j["pad"].size() : 0));
    std::smatch m;
    REQUIRE(std::regex_search(resumed.out, m, std::regex(R"(done: \d+ steps \(\d+ in this run, resumed at step \d+\), (\d+) samples)")));
    CHECK(std::stoll(m[1]) == logged);
    CHECK(logged == 97 - 16 * c.steps + 98);  // the rest of epoch 0, then epoch 1 padded to 2 x 49
  }
}

TEST_CASE("after a resume the progress lines' losses are the uninterrupted run's at the same steps") {
  // 256 samples, batch 8, two ranks: 16 steps an epoch, log_every 4. One run goes through; another stops at step 5
  // and resumes. The resumed run's first step (6) is logged alone, with that step's loss; its line at step 8
  // averaged steps 7-8 (the first line ended the interval, and steps 5's loss was not in the checkpoint), against
  // 5-8 in the uninterrupted run.
  std::string dir = tempDir("resume-loss-lines");
  json job = smallJob(256, 8, 2);
  job["model"]["layers"][2] = {{"type", "tanh"}};  // no dropout
  job["train"]["log_every"] = 4;
  job["checkpoint"] = {{"every_steps", 100}};
  writeFile(dir + "/job.json", job.dump());
  // step -> loss of the progress lines in metrics.jsonl (a resumed run appends; the later line of a step wins).
  auto losses = [](const std::string& out) {
    std::map<int64_t, double> byStep;
    for (auto& j : readJsonLines(out + "/metrics.jsonl"))
      if (j.contains("loss") && !j.contains("final") && !j.contains("eval_loss"))
        byStep[j["step"].get<int64_t>()] = j["loss"].get<double>();
    return byStep;
  };
  auto launch = [&](const std::string& out, std::vector<std::string> sets) {
    std::vector<std::string> args =
        runArgs({"--standalone", "--nproc-per-node", "2", dir + "/job.json", "--output-dir", dir + "/" + out});
    for (auto& v : sets) args.insert(args.end(), {"--set", v});
    auto r = run(args, {.timeout = 60s});
    REQUIRE_MESSAGE(r.exitCode == 0, r.out, r.err);
    return r;
  };
  launch("each", {"train.log_every=1"});  // every step's own loss
  launch("whole", {});
  launch("resumed", {"train.max_steps=5"});
  auto second = launch("resumed", {});
  CHECK(second.out.find("resumed from " + dir + "/resumed/checkpoints/step-000000005") != std::string::npos);
  const auto each = losses(dir + "/each"), whole = losses(dir + "/whole"), resumed = losses(dir + "/resumed");
  REQUIRE(each.size() == 32);
  // A line at a multiple of log_every averages the log_every steps up to it (steps 1-4 too: the first step's own
  // line does not end that interval).
  for (int64_t step : {4, 8, 12, 16, 20, 32}) {
    CAPTURE(step);
    double sum = 0;
    for (int64_t k = step - 3; k <= step; ++k) sum += each.at(k);
    CHECK(whole.at(step) == doctest::Approx(sum / 4).epsilon(1e-6));
  }
  // The resumed run's first line is step 6's own loss; every later line is the uninterrupted run's.
  CHECK(resumed.at(6) == doctest::Approx(each.at(6)).epsilon(1e-6));
  for (auto& [step, loss] : whole) {
    if (step <= 5) continue;
    CAPTURE(step);
    REQUIRE(resumed.count(step) == 1);
    CHECK(resumed.at(step) == doctest::Approx(loss).epsilon(1e-9));
  }
}

TEST_CASE("a worker that exits with an error is restarted and resumes from the last checkpoint") {
  std::string dir = tempDir("exitresume");
  writeFile(dir + "/job.json", smallJob().dump());
  auto clean = run(trainRun(dir + "/job.json", dir + "/clean"), {.timeout = 60s});
  REQUIRE(clean.exitCode == 0);
  // Exit code 1 (an internal error, README's table): restarted. Not 3: a dtrain worker's 3 is a usage error, which
  // the agent does not restart since ff0d641 (a restart fails the same way).
  auto r = run(trainRun(dir + "/job.json", dir + "/exit"), {.timeout = 60s, .env = {{"DTRAIN_FAULT", "rank=0,step=10,action=exit,code=1"}}});
  INFO(r.err);
  REQUIRE(r.exitCode == 0);
  REQUIRE(r.out.find("resumed from") != std::string::npos);
  CHECK(readTensorsRaw(dir + "/clean/model.safetensors") == readTensorsRaw(dir + "/exit/model.safetensors"));
  // The progress lines count steps within the epoch as the uninterrupted run does, also after resuming mid-epoch
  // (they restarted at step 1 of the resumed part): what the resumed run prints is the clean run's last lines.
  auto counters = [](const std::string& out) {
    std::vector<std::string> found;
    const std::regex line(R"(epoch \d+/\d+ step \d+/\d+)");
    for (auto it = std::sregex_iterator(out.begin(), out.end(), line); it != std::sregex_iterator(); ++it)
      found.push_back(it->str());
    return found;
  };
  const auto cleanCounters = counters(clean.out);
  const auto resumedCounters = counters(r.out.substr(r.out.rfind("resumed from")));
  REQUIRE(!resumedCounters.empty());
  REQUIRE(resumedCounters.size() <= cleanCounters.size());
  CHECK(std::equal(resumedCounters.rbegin(), resumedCounters.rend(), cleanCounters.rbegin()));
}

TEST_CASE("a corrupt or truncated newest checkpoint is reported and skipped for the previous one") {
  std::string dir = tempDir("corrupt");
  json job = smallJob();
  job["train"]["max_steps"] = 9;
  writeFile(dir + "/job.json", job.dump());
  auto first = run({dtrainBinary(), "train", dir + "/job.json", "--output-dir", dir + "/out"}, {.timeout = 60s});
  REQUIRE(first.exitCode == 0);
  auto steps = listSteps(dir + "/out/checkpoints");
  REQUIRE(steps == std::vector<std::string>{"step-000000006", "step-000000009"});
  SUBCASE("flipped byte") {
    std::fstream f(dir + "/out/checkpoints/step-000000009/model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-3, std::ios::end);
    f.put('\x7f');
  }
  SUBCASE("truncated file") {
    auto p = dir + "/out/checkpoints/step-000000009/optimizer.safetensors";
    fs::resize_file(p, fs::file_size(p) / 2);
  }
  job["train"]["max_steps"] = 12;
  writeFile(dir + "/job.json", job.dump());
  // dtrain check says where a run would resume, and which newer checkpoint it would skip and why (it named only the
  // older one it picked).
  auto checked = run({dtrainBinary(), "check", dir + "/job.json", "--output-dir", dir + "/out"}, {.timeout = 60s});
  INFO(checked.out);
  CHECK(checked.exitCode == 0);
  CHECK(checked.out.find("resume: from " + dir + "/out/checkpoints/step-000000006 (step 6") != std::string::npos);
  CHECK(checked.out.find("warning: a run would skip checkpoint " + dir + "/out/checkpoints/step-000000009: corrupt (") !=
        std::string::npos);
  auto second = run({dtrainBinary(), "train", dir + "/job.json", "--output-dir", dir + "/out"}, {.timeout = 60s});
  INFO(second.out, second.err);
  REQUIRE(second.exitCode == 0);
  CHECK(second.err.find("skipping checkpoint") != std::string::npos);
  CHECK(second.err.find("step-000000009") != std::string::npos);
  CHECK(second.out.find("resumed from " + dir + "/out/checkpoints/step-000000006 (step 6") != std::string::npos);
  CHECK(second.out.find("done: 12 steps") != std::string::npos);
}

TEST_CASE("every checkpoint corrupt (a pipeline stage's shard truncated in each): the run says it starts at step 0") {
  // It warned about each skipped checkpoint and then trained from scratch without a word: no "resumed from" line,
  // nothing that said the run's progress was gone.
  std::string dir = tempDir("all-corrupt");
  json job = smallJob();
  job["model"]["layers"][2] = {{"type", "tanh"}};  // no dropout
  job["train"]["max_steps"] = 7;
  writeFile(dir + "/job.json", job.dump());
  auto args = runArgs({"--standalone", "--nproc-per-node", "2", dir + "/job.json", "--output-dir", dir + "/out", "--set",
                       R"(parallel={"pipeline": {"stages": 2, "micro_batches": 2}})"});
  auto first = run(args, {.timeout = 60s});
  REQUIRE_MESSAGE(first.exitCode == 0, first.err);
  auto steps = listSteps(dir + "/out/checkpoints");
  REQUIRE(steps.size() == 2);
  for (const auto& s : steps) fs::resize_file(dir + "/out/checkpoints/" + s + "/model-p1-t0.safetensors", 10);
  auto second = run(args, {.timeout = 60s});
  INFO(second.out, second.err);
  CHECK(second.exitCode == 0);
  CHECK(second.err.find("skipping checkpoint " + dir + "/out/checkpoints/" + steps[1] + ": corrupt (") !=
        std::string::npos);
  CHECK(second.err.find("no usable checkpoint in " + dir + "/out/checkpoints: the 2 checkpoint(s) there were skipped "
                        "(above), so training starts at step 0") != std::string::npos);
  CHECK(second.out.find("resumed from") == std::string::npos);
  CHECK(second.out.find("done: 7 steps,") != std::string::npos);
}

TEST_CASE("the same command after a writer was killed mid-checkpoint: its staging dir is removed, not joined") {
  // Staging-dir tokens come from the run id, round, restart count and step, so a rerun with the same --rdzv-id (a
  // requeued Slurm job, or the default id `none`) joins the staging dir a killed writer left at that step. Its
  // commit then failed on the dead writer's half-written file, exit 8 at that step on every rerun.
  std::string dir = tempDir("stalestaging");
  json job = smallJob();
  job["train"]["max_steps"] = 9;
  writeFile(dir + "/job.json", job.dump());
  const std::string out = dir + "/out", ckpts = out + "/checkpoints";
  auto args = [&] {
    return runArgs({"--nproc-per-node", "2", "--rdzv-endpoint", fmt::format("127.0.0.1:{}", freePort()), "--rdzv-id",
                    "job7", dir + "/job.json", "--output-dir", out});
  };
  auto first = run(args(), {.timeout = 60s});
  REQUIRE(first.exitCode == 0);
  REQUIRE(listSteps(ckpts) == std::vector<std::string>{"step-000000006", "step-000000009"});
  // What a writer killed during step 9's checkpoint leaves: its staging dir with a file half-written, and a rank's
  // file this run's world does not write (a stale file a joined commit would have listed as its own).
  const std::string staging = ckpts + "/step-000000009.tmp-" + dtrain::fnv1aHex("job7/0/0/9");
  fs::rename(ckpts + "/step-000000009", staging);
  for (const char* f : {"COMMITTED", "manifest.json", "meta.json"}) fs::remove(staging + "/" + f);
  fs::rename(staging + "/optimizer.safetensors", staging + "/.optimizer.safetensors.tmp-999999");
  fs::copy_file(staging + "/rank-1.json", staging + "/rank-5.json");
  auto second = run(args(), {.timeout = 60s});
  INFO(second.out, second.err);
  REQUIRE(second.exitCode == 0);
  CHECK(second.out.find("resumed from " + ckpts + "/step-000000006 (step 6") != std::string::npos);
  CHECK(second.err.find("removed " + staging + ": a checkpoint whose writer died") != std::string::npos);
  CHECK(listSteps(ckpts) == std::vector<std::string>{"step-000000006", "step-000000009"});
  CHECK(run({dtrainBinary(), "ckpt", "inspect", ckpts + "/step-000000009"}).exitCode == 0);
  CHECK_FALSE(fs::exists(ckpts + "/step-000000009/rank-5.json"));
}

TEST_CASE("a checkpoint from a different model is an error, not a silent load") {
  std::string dir = tempDir("spec");
  json job = smallJob();
  job["train"]["max_steps"] = 3;
  writeFile(dir + "/job.json", job.dump());
  REQUIRE(run({dtrainBinary(), "train", dir + "/job.json", "--output-dir", dir + "/out"}, {.timeout = 60s}).exitCode == 0);
  auto r = run({dtrainBinary(), "train", dir + "/job.json", "--set", "model.layers.0.out=32", "--output-dir", dir + "/out"},
               {.timeout = 60s});
  CHECK(r.exitCode == 8);
  CHECK(r.err.find("step-000000003") != std::string::npos);
}

TEST_CASE("dtrain run and dtrain check refuse another model's checkpoint before any worker starts") {
  std::string dir = tempDir("specagent");
  json job = smallJob();
  job["train"]["max_steps"] = 3;
  writeFile(dir + "/job.json", job.dump());
  REQUIRE(run({dtrainBinary(), "train", dir + "/job.json", "--output-dir", dir + "/out"}, {.timeout = 60s}).exitCode == 0);
  auto ok = run({dtrainBinary(), "check", dir + "/job.json", "--output-dir", dir + "/out"}, {.timeout = 60s});
  INFO(ok.out, ok.err);
  CHECK(ok.exitCode == 0);
  CHECK(ok.out.find("resume: from " + dir + "/out/checkpoints/step-000000003 (step 3") != std::string::npos);
  struct Change {
    std::string set, says;
  };
  for (const Change& c : {Change{"model.layers.0.out=32", "0.weight is [16, 6] in the checkpoint but [32, 6] in this "
                                                          "job's model"},
                          Change{"model.layers.1.type=relu", "every parameter has the shape this model expects"}}) {
    CAPTURE(c.set);
    // --max-restarts: a worker's refusal used to burn every restart the same way.
    auto r = run(runArgs({"--standalone", "--nproc-per-node", "2", "--max-restarts", "2", dir + "/job.json", "--set",
                          c.set, "--output-dir", dir + "/out"}),
                 {.timeout = 60s});
    INFO(r.out, r.err);
    CHECK(r.exitCode == 8);
    CHECK(r.err.find(dir + "/out/checkpoints/step-000000003: checkpoint was written for another model") !=
          std::string::npos);
    CHECK(r.err.find(c.says) != std::string::npos);
    CHECK(r.out.find("[n0 r") == std::string::npos);  // no worker started
    CHECK(r.err.find("[n0 r") == std::string::npos);
    CHECK(r.err.find("restarting") == std::string::npos);
    auto checked = run({dtrainBinary(), "check", dir + "/job.json", "--set", c.set, "--output-dir", dir + "/out"},
                       {.timeout = 60s});
    CHECK(checked.exitCode == 8);
    CHECK(checked.err.find(c.says) != std::string::npos);
  }
  // Resume off is no conflict, but the old checkpoints stay where a later resume would take them: said so.
  auto fresh = run({dtrainBinary(), "check", dir + "/job.json", "--set", "model.layers.0.out=32", "--set",
                    "checkpoint.resume=false", "--output-dir", dir + "/out"},
                   {.timeout = 60s});
  CHECK(fresh.exitCode == 0);
  CHECK(fresh.out.find("resume: off") != std::string::npos);
  const std::string stale = "checkpoint.resume is false, but " + dir + "/out/checkpoints already holds checkpoints up "
                            "to step 3";
  CHECK(fresh.out.find(stale) != std::string::npos);
  auto trained = run({dtrainBinary(), "train", dir + "/job.json", "--set", "checkpoint.resume=false", "--output-dir",
                      dir + "/out"},
                     {.timeout = 60s});
  CHECK(trained.exitCode == 0);
  CHECK(trained.err.find(stale) != std::string::npos);
}

TEST_CASE("a checkpoint of another optimizer is refused with both named: run and check before any worker starts") {
  // It failed every worker after the rendezvous with "the checkpoint has no tensor 'exp_avg/0.weight'".
  std::string dir = tempDir("optagent");
  json job = smallJob();  // adam
  job["train"]["max_steps"] = 3;
  writeFile(dir + "/job.json", job.dump());
  REQUIRE(run({dtrainBinary(), "train", dir + "/job.json", "--output-dir", dir + "/out"}, {.timeout = 60s}).exitCode == 0);
  const std::string says = dir + "/out/checkpoints/step-000000003: checkpoint was written with the adam optimizer, but "
                                 "this job's /optimizer/type is sgd; refusing to load its optimizer state";
  auto r = run(runArgs({"--standalone", "--nproc-per-node", "2", "--max-restarts", "2", dir + "/job.json", "--set",
                        "optimizer.type=sgd", "--output-dir", dir + "/out"}),
               {.timeout = 60s});
  INFO(r.out, r.err);
  CHECK(r.exitCode == 8);
  CHECK(r.err.find(says) != std::string::npos);
  CHECK(r.out.find("[n0 r") == std::string::npos);  // no worker started
  CHECK(r.err.find("[n0 r") == std::string::npos);
  auto checked = run({dtrainBinary(), "check", dir + "/job.json", "--set", "optimizer.type=sgd", "--output-dir",
                      dir + "/out"},
                     {.timeout = 60s});
  CHECK(checked.exitCode == 8);
  CHECK(checked.err.find(says) != std::string::npos);
  // The same type with other state (Adam's amsgrad keeps max_exp_avg_sq): the trainer names the missing state.
  auto amsgrad = run({dtrainBinary(), "train", dir + "/job.json", "--set", "optimizer.amsgrad=true", "--set",
                      "train.max_steps=6", "--output-dir", dir + "/out"},
                     {.timeout = 60s});
  CHECK(amsgrad.exitCode == 8);
  CHECK(amsgrad.err.find("step-000000003: the checkpoint holds no 'max_exp_avg_sq' state for this job's adam "
                         "optimizer") != std::string::npos);
  // The original optimizer still resumes.
  auto same = run({dtrainBinary(), "train", dir + "/job.json", "--set", "train.max_steps=6", "--output-dir",
                   dir + "/out"},
                  {.timeout = 60s});
  CHECK(same.exitCode == 0);
  CHECK(same.out.find("resumed from") != std::string::npos);
  // AdamW keeps Adam's state (only the weight decay differs), so it resumes Adam's checkpoint, as torch.optim allows.
  auto adamw = run({dtrainBinary(), "train", dir + "/job.json", "--set", "optimizer.type=adamw", "--set",
                    "train.max_steps=9", "--output-dir", dir + "/out"},
                   {.timeout = 60s});
  INFO(adamw.out, adamw.err);
  CHECK(adamw.exitCode == 0);
  CHECK(adamw.out.find("resumed from") != std::string::npos);
  // SGD's momentum turned on (or top-k's momentum_correction, which keeps it in the hook, turned off) starts the
  // momentum from zero, as torch.optim.SGD starts a missing momentum_buffer, and says so.
  job["optimizer"] = {{"type", "sgd"}, {"lr", 0.05}};
  writeFile(dir + "/sgd.json", job.dump());
  REQUIRE(run({dtrainBinary(), "train", dir + "/sgd.json", "--output-dir", dir + "/sgd"}, {.timeout = 60s}).exitCode == 0);
  auto momentum = run(runArgs({"--standalone", "--nproc-per-node", "2", dir + "/sgd.json", "--set",
                               "optimizer.momentum=0.9", "--set", "train.max_steps=6", "--output-dir", dir + "/sgd"}),
                      {.timeout = 60s});
  INFO(momentum.out, momentum.err);
  CHECK(momentum.exitCode == 0);
  CHECK(momentum.out.find("resumed from") != std::string::npos);
  CHECK(momentum.err.find("step-000000003: the checkpoint holds no SGD momentum (written without momentum, or with "
                          "top-k's momentum_correction, which keeps it in the compression hook): the momentum starts "
                          "from zero") != std::string::npos);
}

TEST_CASE("Ctrl-C once the model is written: the job completed and dtrain run exits 0") {
  std::string dir = tempDir("lateint");
  json job = smallJob(96, 8, 1);
  writeFile(dir + "/job.json", job.dump());
  // The signal lands while the workers exit after writing the model (or once they have): the outcome is theirs.
  // Several tries, as where it lands within that window is up to the scheduler.
  for (int i = 0; i < 3; ++i) {
    CAPTURE(i);
    const std::string out = dir + "/out" + std::to_string(i);
    Background agent(runArgs({"--standalone", "--nproc-per-node", "2", dir + "/job.json", "--output-dir", out}));
    agent.waitForLine("wrote " + out + "/model.safetensors", 60s);
    agent.signal(SIGINT);
    auto r = agent.wait(60s);
    INFO(r.out, r.err);
    CHECK(r.exitCode == 0);
    CHECK(fs::exists(out + "/model.safetensors"));
  }
}

TEST_CASE("restarts exhausted: the root cause and its exit code come back") {
  std::string dir = tempDir("exhaust");
  writeFile(dir + "/job.json", smallJob().dump());
  auto r = run(runArgs({"--standalone", "--nproc-per-node", "2", "--max-restarts", "1", dir + "/job.json", "--output-dir",
                        dir + "/out"}),
               {.timeout = 60s, .env = {{"DTRAIN_FAULT", "rank=1,step=4,action=exit,code=5;rank=1,step=5,action=exit,code=5,attempt=1"}}});
  CHECK(r.exitCode == 5);
  CHECK(r.err.find("giving up after 1 restart(s)") != std::string::npos);
  CHECK(r.err.find("rank 1 (local rank 1)") != std::string::npos);
  CHECK(r.err.find("injected exit after step 5") != std::string::npos);
}

TEST_CASE("configuration errors do not burn restarts") {
  auto r = run(runArgs({"--standalone", "--max-restarts", "3", "--", "sh", "-c", "echo bad config >&2; exit 2"}),
               {.timeout = 30s});
  CHECK(r.exitCode == 2);
  CHECK(r.err.find("restarting the workers") == std::string::npos);
  CHECK(r.err.find("not restarting") != std::string::npos);
}

TEST_CASE("a dtrain worker's usage error (exit 3) does not burn restarts; another program's exit 3 is restarted") {
  auto own = run(runArgs({"--standalone", "--max-restarts", "3", "--", dtrainBinary(), "bench", "allreduce",
                          "--no-such-flag"}),
                 {.timeout = 30s});
  INFO(own.err);
  CHECK(own.exitCode == 3);
  CHECK(own.err.find("--no-such-flag") != std::string::npos);
  CHECK(own.err.find("restarting the workers") == std::string::npos);
  CHECK(own.err.find("exit code 3 is dtrain's usage error") != std::string::npos);
  // A script's 3 is its own: torchrun's rule, every failure is restarted.
  auto script = run(runArgs({"--standalone", "--max-restarts", "1", "--", "sh", "-c", "exit 3"}), {.timeout = 30s});
  INFO(script.err);
  CHECK(script.exitCode == 3);
  CHECK(script.err.find("restarting the workers (restart 1 of 1)") != std::string::npos);
}

TEST_CASE("SIGTERM to the agent: the workers write a checkpoint before they exit") {
  std::string dir = tempDir("sigterm");
  json job = smallJob(4000, 4, 1000);  // far longer than the test lets it run
  job["checkpoint"] = {{"every_steps", 0}};
  writeFile(dir + "/job.json", job.dump());
  Background agent(trainRun(dir + "/job.json", dir + "/out"));
  agent.waitForLine("step 20/", 60s);
  agent.signal(SIGTERM);
  auto r = agent.wait(60s);
  INFO(r.err);
  CHECK(r.exitCode == 128 + SIGTERM);
  auto steps = listSteps(dir + "/out/checkpoints");
  REQUIRE(steps.size() == 1);
  // every_steps is 0 and no epoch ended: only the stop could have written it, at a step past 20
  CHECK(steps[0] > "step-000000020");
  const int stopStep = std::stoi(steps[0].substr(5));
  // The summary says the run stopped (not "done"), at which step, and which checkpoint the next run resumes from.
  CHECK(r.out.find("done:") == std::string::npos);
  CHECK(r.out.find(fmt::format("stopped by SIGTERM after {} steps, ", stopStep)) != std::string::npos);
  CHECK(r.out.find(fmt::format("; saved {}/out/checkpoints/{}: the same command resumes from it", dir, steps[0])) !=
        std::string::npos);
  const std::vector<std::string> resume = {dtrainBinary(), "train", dir + "/job.json", "--set",
                                           "train.max_steps=" + std::to_string(stopStep + 2), "--output-dir",
                                           dir + "/out"};
  auto resumed = run(resume, {.timeout = 60s});
  CHECK(resumed.exitCode == 0);
  CHECK(resumed.out.find("resumed from") != std::string::npos);
  // The step count is the run's, the samples this process's: the line says which steps it took.
  CHECK(resumed.out.find(fmt::format("done: {} steps (2 in this run, resumed at step {}), 8 samples in ", stopStep + 2,
                                     stopStep)) != std::string::npos);
  // The same command once more: the run is at its end. It says so, and metrics.jsonl keeps the real final line
  // (a second one of step 0, loss 0 and 0 samples/s used to be appended).
  const auto metricsBefore = readJsonLines(dir + "/out/metrics.jsonl");
  auto again = run(resume, {.timeout = 60s});
  INFO(again.out, again.err);
  CHECK(again.exitCode == 0);
  CHECK(again.out.find(fmt::format("nothing left to train: {}/out/checkpoints/step-{:09} is at step {}, the end of "
                                   "this run (train.max_steps {})",
                                   dir, stopStep + 2, stopStep + 2, stopStep + 2)) != std::string::npos);
  CHECK(again.out.find(fmt::format("done: {} steps, all before this run (nothing left to train); wrote {}/out/model."
                                   "safetensors", stopStep + 2, dir)) != std::string::npos);
  // With the limit lowered since, the checkpoint is past the end, not at it.
  auto lowered = run({dtrainBinary(), "train", dir + "/job.json", "--set", "train.max_steps=2", "--output-dir",
                      dir + "/out"},
                     {.timeout = 60s});
  CHECK(lowered.exitCode == 0);
  CHECK(lowered.out.find(fmt::format("is at step {}, past the end of this run (train.max_steps 2)", stopStep + 2)) !=
        std::string::npos);
  const auto metricsAfter = readJsonLines(dir + "/out/metrics.jsonl");
  CHECK(metricsAfter == metricsBefore);
  REQUIRE(!metricsAfter.empty());
  CHECK(metricsAfter.back()["final"] == true);
  CHECK(metricsAfter.back()["step"] == stopStep + 2);
}

TEST_CASE("a hung worker is detected by the collective timeout and the group recovers") {
  std::string dir = tempDir("hang");
  json job = smallJob();
  job["parallel"] = {{"timeout", 2}};
  writeFile(dir + "/job.json", job.dump());
  auto clean = run(trainRun(dir + "/job.json", dir + "/clean"), {.timeout = 60s});
  REQUIRE(clean.exitCode == 0);
  auto r = run(trainRun(dir + "/job.json", dir + "/hung"), {.timeout = 90s, .env = {{"DTRAIN_FAULT", "rank=1,step=5,action=hang"}}});
  INFO(r.out, r.err);
  REQUIRE(r.exitCode == 0);
  CHECK(r.err.find("timed out") != std::string::npos);
  CHECK(r.out.find("resumed from") != std::string::npos);
  CHECK(readTensorsRaw(dir + "/clean/model.safetensors") == readTensorsRaw(dir + "/hung/model.safetensors"));
}
