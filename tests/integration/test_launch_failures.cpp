// `dtrain run` when things go wrong: failing workers, restarts, signals, lost agents, bad input.
#include <doctest/doctest.h>

#include <signal.h>
#include <sys/stat.h>

#include <array>
#include <filesystem>
#include <thread>

#include "tests/integration/launch_helpers.h"
#include "tests/integration/train_helpers.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;

TEST_CASE("a failing worker stops its peers on both nodes and its exit code comes back with a report") {
  int port = freePort();
  std::string id = uniqueRunId("fail");
  // Rank 3 (node 1) fails; everyone else would sleep for 1000 s if not stopped.
  std::string script = "if [ $RANK = 3 ]; then echo 'fatal: disk on fire' >&2; exit 7; fi; exec sleep 1000";
  auto args = [&](int nodeRank) {
    return runArgs({"--nnodes", "2", "--nproc-per-node", "2", "--node-rank", std::to_string(nodeRank), "--rdzv-endpoint",
                    fmt::format("127.0.0.1:{}", port), "--rdzv-id", id, "--shutdown-timeout", "5s", "--", "sh", "-c",
                    script});
  };
  Background node0(args(0));
  auto r1 = run(args(1), {.timeout = 60s});
  auto r0 = node0.wait(60s);
  CHECK(r1.exitCode == 7);
  CHECK(r0.exitCode == 7);
  for (auto* r : {&r0, &r1}) {
    INFO(r->err);
    CHECK(r->err.find("worker failed: node 1") != std::string::npos);
    CHECK(r->err.find("rank 3 (local rank 1)") != std::string::npos);
    CHECK(r->err.find("exit code 7") != std::string::npos);
    CHECK(r->err.find("| fatal: disk on fire") != std::string::npos);
  }
  CHECK(processesWithRunId(id).empty());
}

TEST_CASE("a worker killed by a signal is reported as 128+signal") {
  auto r = run(runArgs({"--standalone", "--nproc-per-node", "2", "--", "sh", "-c",
                        "if [ $RANK = 0 ]; then kill -SEGV $$; fi; exec sleep 1000"}),
               {.timeout = 30s});
  CHECK(r.exitCode == 128 + SIGSEGV);
  CHECK(r.err.find("signal 11 (SIGSEGV)") != std::string::npos);
}

TEST_CASE("restarts happen exactly --max-restarts times, with DTRAIN_RESTART_COUNT counting up") {
  std::string dir = tempDir("restarts");
  std::string script = fmt::format("echo $DTRAIN_RESTART_COUNT >> {}/attempts-$RANK; exit 3", dir);
  auto r = run(runArgs({"--standalone", "--nproc-per-node", "2", "--max-restarts", "2", "--", "sh", "-c", script}),
               {.timeout = 60s});
  CHECK(r.exitCode == 3);
  // Both ranks ran in each of the 3 attempts (1 + 2 restarts), unless stopped first by the failing peer;
  // at least the attempts themselves are exactly 0, 1, 2.
  std::string attempts0 = readFile(dir + "/attempts-0") + readFile(dir + "/attempts-1");
  CHECK(attempts0.find("0\n") != std::string::npos);
  CHECK(attempts0.find("1\n") != std::string::npos);
  CHECK(attempts0.find("2\n") != std::string::npos);
  CHECK(attempts0.find("3\n") == std::string::npos);
  CHECK(linesWith(r.err, "restarting the workers").size() == 2);
  CHECK(r.err.find("giving up after 2 restart(s)") != std::string::npos);
}

TEST_CASE("a restarted group succeeds when the failure does not repeat") {
  std::string script = "if [ $RANK = 1 ] && [ $DTRAIN_RESTART_COUNT = 0 ]; then exit 9; fi; echo ok-$DTRAIN_RESTART_COUNT";
  auto r = run(runArgs({"--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--", "sh", "-c", script}),
               {.timeout = 60s});
  CHECK(r.exitCode == 0);
  CHECK(linesWith(r.out, "ok-1").size() == 2);
}

TEST_CASE("SIGTERM to the agent is forwarded to the workers and the agent exits once they are gone") {
  std::string script = "trap 'echo got-term-$RANK; exit 0' TERM; echo ready-$RANK; sleep 1000 & wait";
  Background agent(runArgs({"--standalone", "--nproc-per-node", "2", "--", "sh", "-c", script}));
  agent.waitForLine("ready-0", 30s);
  agent.waitForLine("ready-1", 30s);
  agent.signal(SIGTERM);
  auto r = agent.wait(30s);
  CHECK(r.exitCode == 128 + SIGTERM);
  CHECK(r.out.find("got-term-0") != std::string::npos);
  CHECK(r.out.find("got-term-1") != std::string::npos);
}

TEST_CASE("a SIGTERM delivered twice at once is one stop: the workers keep their grace (timeout(1) sends two)") {
  // timeout(1) signals its child and then its process group, so the agent gets SIGTERM twice within microseconds;
  // `kill PID; kill -- -PGID` does the same. The second used to count as a second Ctrl-C and SIGKILL the workers
  // in the middle of their stop checkpoint. Here the second one comes right after the agent began stopping.
  std::string script =
      "trap 'echo got-term-$RANK; sleep 1; echo stopped-cleanly-$RANK; exit 0' TERM; echo ready-$RANK; "
      "sleep 1000 & wait";
  Background agent(runArgs({"--standalone", "--nproc-per-node", "1", "--", "sh", "-c", script}));
  agent.waitForLine("ready-0", 30s);
  agent.signal(SIGTERM);
  agent.waitForLine("received SIGTERM: stopping the workers", 30s, /*fromStderr=*/true);
  agent.signal(SIGTERM);
  auto r = agent.wait(30s);
  CHECK_FALSE(r.timedOut);
  CHECK(r.exitCode == 128 + SIGTERM);
  CHECK(r.out.find("got-term-0") != std::string::npos);
  CHECK(r.out.find("stopped-cleanly-0") != std::string::npos);
  CHECK(r.err.find("the same stop request") != std::string::npos);
}

TEST_CASE("SIGHUP and SIGQUIT stop the job like SIGTERM (workers get SIGTERM); nohup's ignored SIGHUP stays ignored") {
  // torchrun's agent stops its workers on SIGHUP and SIGQUIT too; a closed terminal or Ctrl-\ used to kill the
  // agent outright (its default action), leaving the workers to the process-tree watchdog without their SIGTERM.
  std::string script = "trap 'echo got-term-$RANK; exit 0' TERM; echo ready-$RANK; sleep 1000 & wait";
  for (int sig : {SIGHUP, SIGQUIT}) {
    CAPTURE(sig);
    Background agent(runArgs({"--standalone", "--nproc-per-node", "2", "--", "sh", "-c", script}));
    agent.waitForLine("ready-0", 30s);
    agent.waitForLine("ready-1", 30s);
    agent.signal(sig);
    auto r = agent.wait(30s);
    CHECK_FALSE(r.timedOut);
    CHECK(r.exitCode == 128 + sig);
    CHECK(r.out.find("got-term-0") != std::string::npos);
    CHECK(r.out.find("got-term-1") != std::string::npos);
  }
  // Started under nohup (SIGHUP ignored): SIGHUP changes nothing, the SIGTERM sent after it stops the job. Had the
  // SIGHUP been taken, it would have come first (the agent reads its stop signals in order) and the exit be 129.
  auto argv = runArgs({"--standalone", "--nproc-per-node", "1", "--", "sh", "-c", script});
  argv.insert(argv.begin(), {"sh", "-c", "trap '' HUP; exec \"$0\" \"$@\""});
  Background agent(argv);
  agent.waitForLine("ready-0", 30s);
  agent.signal(SIGHUP);
  agent.signal(SIGTERM);
  auto r = agent.wait(30s);
  CHECK_FALSE(r.timedOut);
  CHECK(r.exitCode == 128 + SIGTERM);
  CHECK(r.out.find("got-term-0") != std::string::npos);
}

TEST_CASE("SIGINT ends an agent waiting in the rendezvous, also when the shell started it with SIGINT ignored") {
  // A script's `dtrain run ... &` inherits SIGINT ignored; the round honours SIGINT anyway, so the rendezvous must
  // too (it used to wait out --rdzv-timeout). With --standalone the random token's file goes as well.
  const std::string dir = tempDir("rdzvint");
  for (bool ignored : {false, true}) {
    CAPTURE(ignored);
    const int port = freePort();
    const std::string id = uniqueRunId("rdzvint");
    std::vector<std::string> argv = runArgs({"--nnodes", "2", "--node-rank", "0", "--nproc-per-node", "1", "--rdzv-endpoint",
                                             fmt::format("127.0.0.1:{}", port), "--rdzv-id", id, "--rdzv-timeout",
                                             "300s", "--", "true"});
    if (ignored) argv.insert(argv.begin(), {"sh", "-c", "trap '' INT; exec \"$0\" \"$@\""});
    Background agent(argv);
    agent.waitForLine(fmt::format("run {} at 127.0.0.1:{}: waiting for 2 node(s) to join", id, port), 60s,
                      /*fromStderr=*/true);
    agent.signal(SIGINT);
    auto r = agent.wait(30s);
    CHECK_FALSE(r.timedOut);
    CHECK(r.exitCode == 128 + SIGINT);
  }
}

TEST_CASE("SIGINT ends `dtrain run JOB.json` while the agent validates the job, also with SIGINT inherited ignored") {
  // The agent validates the job and reads its data before the rendezvous (seconds for a large text set). Its
  // handlers come after that, so a SIGINT inherited ignored (a script's `dtrain run ... &`) was dropped there: the
  // job went on to start its workers and train to the end (exit 0).
  const std::string dir = tempDir("validateint");
  const std::string text = dir + "/big.txt";
  std::string bytes(24u << 20, 'a');
  for (size_t i = 0; i < bytes.size(); i += 7) bytes[i] = static_cast<char>('a' + i % 26);
  writeFile(text, bytes);
  bytes.clear();
  bytes.shrink_to_fit();
  writeFile(dir + "/job.json", R"({"model": {"preset": "gpt", "vocab_size": 256, "block_size": 8, "n_layer": 1,
                                             "n_head": 1, "n_embd": 8},
    "loss": {"type": "cross_entropy"}, "data": {"train": {"format": "text", "path": "big.txt"}, "batch_size": 4},
    "optimizer": {"type": "adamw", "lr": 0.001}, "train": {"max_steps": 1}, "checkpoint": false})");
  auto argv = runArgs({"--standalone", "--nproc-per-node", "1", dir + "/job.json", "--output-dir", dir + "/out"});
  argv.insert(argv.begin(), {"sh", "-c", "trap '' INT; exec \"$0\" \"$@\""});
  Background agent(argv);
  // The moment: the agent has the data file open (it is validating the job). A condition, polled, not a sleep.
  auto readsData = [&] {
    std::error_code ec;
    for (std::filesystem::directory_iterator it(fmt::format("/proc/{}/fd", agent.pid()), ec), end; !ec && it != end;
         it.increment(ec))
      if (std::filesystem::read_symlink(it->path(), ec) == text) return true;
    return false;
  };
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  bool seen = false;
  while (!seen && agent.running() && std::chrono::steady_clock::now() < deadline) seen = readsData();
  REQUIRE_MESSAGE(seen, "never saw the agent read the job's data");
  agent.signal(SIGINT);
  auto r = agent.wait(60s);
  INFO(r.out, r.err);
  CHECK_FALSE(r.timedOut);
  CHECK(r.exitCode == 128 + SIGINT);
  CHECK(r.out.find("[n0 r0]") == std::string::npos);  // no worker started
}

TEST_CASE("SIGINT while the store's host waits for the other agents after the job completed: exit 0 as decided") {
  // Every worker exited 0, so the job completed; the store's host then waits (up to 5 s) for every agent to read
  // the outcome. A SIGINT there ended it with 130 (and the agent still waiting lost the store: exit 4). A third
  // agent, stopped with SIGSTOP while it waits for a later round, holds node 0 in that wait: no timing involved.
  const std::string dir = tempDir("late_int");
  const int port = freePort();
  const std::string id = uniqueRunId("lateint");
  const std::string script = fmt::format("echo started; while [ ! -e {0}/go ]; do sleep 0.05; done; echo bye", dir);
  auto agent = [&](int nodeRank) {
    return runArgs({"--nnodes", "2", "--nproc-per-node", "1", "--node-rank", std::to_string(nodeRank),
                    "--rdzv-endpoint", fmt::format("127.0.0.1:{}", port), "--rdzv-id", id, "--", "sh", "-c", script});
  };
  Background node0(agent(0), {.env = {{"DTRAIN_LOG_LEVEL", "debug"}}});
  Background node1(agent(1));
  node0.waitForLine("[n0 r0] started", 60s);
  node1.waitForLine("[n1 r1] started", 60s);
  Background spare(agent(1));
  spare.waitForLine("this node waits for a later round", 60s, /*fromStderr=*/true);
  spare.signal(SIGSTOP);
  writeFile(dir + "/go", "");
  node0.waitForLine("to see the job's end", 60s, /*fromStderr=*/true);
  node0.signal(SIGINT);
  auto r0 = node0.wait(60s);  // after the 5 s wait: the stopped agent never acknowledges
  auto r1 = node1.wait(60s);
  spare.signal(SIGCONT);
  spare.wait(60s);
  INFO(r0.err, r1.err);
  CHECK(r0.exitCode == 0);
  CHECK(r1.exitCode == 0);
  CHECK(r0.err.find("SIGINT came after the job's outcome was decided (it completed): exit 0 as decided") !=
        std::string::npos);
  CHECK(processesWithRunId(id).empty());
}

TEST_CASE("SIGINT to a run whose checkpoint is already at its end: exit 0, and the log says what happened") {
  // The workers resume at the end, write the model and exit 0 whether or not the forwarded SIGINT reached them. The
  // log said "SIGINT came after every worker had finished" also when the agent had forwarded it to running workers.
  const std::string dir = tempDir("early_int");
  writeFile(dir + "/job.json", smallJob(48, 8, 1).dump());
  const auto args = runArgs({"--standalone", "--nproc-per-node", "2", dir + "/job.json", "--output-dir", dir + "/out"});
  REQUIRE(run(args, {.timeout = 60s}).exitCode == 0);
  for (int i = 0; i < 3; ++i) {
    CAPTURE(i);
    Background agent(args);
    agent.waitForLine("nothing left to train", 60s);
    agent.signal(SIGINT);
    auto r = agent.wait(60s);
    INFO(r.out, r.err);
    CHECK(r.exitCode == 0);
    const bool forwarded = r.err.find("received SIGINT: stopping the workers") != std::string::npos;
    CHECK((r.err.find("SIGINT came after every worker had finished") != std::string::npos) == !forwarded);
    CHECK((r.err.find("SIGINT reached the workers, but every worker exited 0") != std::string::npos) == forwarded);
  }
}

TEST_CASE("SIGTERM stops a job whose workers crash-loop, wherever in the restart loop it lands") {
  // Each round lasts a moment, so the signal often arrives as a round ends. It used to be dropped with the round
  // (queued in the round's signal set, or posted to its stopped event loop) about 1 time in 4 here, and the agent
  // went on restarting until --max-restarts ran out.
  for (int i = 0; i < 12; ++i) {
    CAPTURE(i);
    Background agent(runArgs({"--standalone", "--nproc-per-node", "2", "--max-restarts", "100000", "--", "sh", "-c",
                              "sleep 0.0$RANDOM; exit 3"}));
    agent.waitForLine("(restart 1 of 100000)", 60s, /*fromStderr=*/true);
    // Not a synchronisation: the moment in the loop is the variable under test, spread over a few rounds.
    std::this_thread::sleep_for(std::chrono::milliseconds(i * 41 % 350));
    agent.signal(SIGTERM);
    auto r = agent.wait(30s);
    CHECK_FALSE(r.timedOut);
    CHECK(r.exitCode == 128 + SIGTERM);
  }
}

TEST_CASE("workers that ignore SIGTERM are killed after --shutdown-timeout") {
  std::string script = "trap '' TERM; echo ready-$RANK; while :; do sleep 1; done";
  Background agent(runArgs({"--standalone", "--nproc-per-node", "1", "--shutdown-timeout", "1s", "--", "sh", "-c", script}));
  agent.waitForLine("ready-0", 30s);
  agent.signal(SIGTERM);
  auto r = agent.wait(30s);
  CHECK(r.exitCode == 128 + SIGTERM);
  CHECK(r.err.find("did not stop within --shutdown-timeout") != std::string::npos);
}

TEST_CASE("an agent killed with SIGKILL leaves no worker behind") {
  std::string id = uniqueRunId("orphans");
  // The workers block in the shell itself (opening a FIFO nobody writes): an `exec sleep` after the ready line
  // let processesWithRunId read an empty /proc/PID/environ mid-exec (1 run in ~20 saw one worker).
  std::string fifo = tempDir("orphans") + "/never";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  Background agent(runArgs({"--standalone", "--rdzv-id", id, "--nproc-per-node", "2", "--", "sh", "-c",
                            "echo ready-$RANK; read x < " + fifo}));
  agent.waitForLine("ready-0", 30s);
  agent.waitForLine("ready-1", 30s);
  auto workers = processesWithRunId(id);
  REQUIRE(workers.size() == 2);
  agent.signal(SIGKILL);
  agent.wait(10s);
  for (pid_t pid : workers) CHECK(waitForExit(pid, 10s));
  CHECK(processesWithRunId(id).empty());
}

TEST_CASE("bad input: one clear line, a distinct exit code, nothing started") {
  SUBCASE("unknown flag") {
    auto r = run(runArgs({"--nprocs-per-node", "2", "--", "true"}));
    CHECK(r.exitCode == 3);
    CHECK(r.err.find("--nprocs-per-node") != std::string::npos);
  }
  SUBCASE("a mistyped command is named with the commands it could be; errors point at their command's --help") {
    // `dtrain tarin job.json` said "A subcommand is required (see dtrain --help)", hiding the typo.
    auto top = run({dtrainBinary(), "tarin", sourceDir() + "/configs/linear_regression.json"});
    CHECK(top.exitCode == 3);
    CHECK_MESSAGE(top.err.find("dtrain: unknown command 'tarin'; expected one of run, store, train, check") !=
                      std::string::npos,
                  top.err);
    auto nested = run({dtrainBinary(), "ckpt", "lst", "somewhere"});
    CHECK(nested.exitCode == 3);
    CHECK_MESSAGE(nested.err.find("dtrain ckpt: unknown command 'lst'; expected one of list, inspect, bench (see "
                                  "dtrain ckpt --help)") != std::string::npos,
                  nested.err);
    // A bad flag of `dtrain run` sends the user to `dtrain run --help` (the top level's has no run flags).
    auto flag = run(runArgs({"--nprocs-per-node", "2", "--", "true"}));
    CHECK(flag.exitCode == 3);
    CHECK_MESSAGE(flag.err.find("--nprocs-per-node 2 (see dtrain run --help)") != std::string::npos, flag.err);
    auto sub = run({dtrainBinary(), "ckpt", "list"});
    CHECK(sub.exitCode == 3);
    CHECK_MESSAGE(sub.err.find("(see dtrain ckpt list --help)") != std::string::npos, sub.err);
  }
  SUBCASE("an unknown flag is named, also when a required argument is missing after it") {
    // CLI11 checks required arguments before it reports unknown ones: `dtrain check --bogus` said "job is
    // required", `dtrain sim --node 2 job.json` "--nodes is required", hiding the mistyped flag.
    const std::string job = sourceDir() + "/configs/linear_regression.json";
    const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
        {{"check", "--bogus"}, "dtrain check: unknown flag '--bogus' (see dtrain check --help)"},
        {{"check", "--bogus", job}, "--bogus"},
        {{"train", "--bogus=1"}, "dtrain train: unknown flag '--bogus=1'"},
        {{"top", "--bogus"}, "dtrain top: unknown flag '--bogus'"},
        {{"debug", "dump", "-x"}, "dtrain debug dump: unknown flag '-x' (see dtrain debug dump --help)"},
        {{"sim", "--node", "2", job}, "dtrain sim: unknown flag '--node'"},
        {{"ckpt", "list", "--bogus"}, "dtrain ckpt list: unknown flag '--bogus'"},
        {{"generate", "--bogus"}, "dtrain generate: unknown flag '--bogus'"},
        {{"plot", "--bogus"}, "dtrain plot: unknown flag '--bogus'"},
        {{"store", "--bogus"}, "--bogus"},
        {{"run", "--bogus", "--", "true"}, "--bogus"},
    };
    for (const auto& [words, says] : cases) {
      std::vector<std::string> argv{dtrainBinary()};
      argv.insert(argv.end(), words.begin(), words.end());
      CAPTURE(words.front());
      CAPTURE(words.back());
      auto r = run(argv, {.timeout = 30s});
      CHECK(r.exitCode == 3);
      CHECK_MESSAGE(r.err.find(says) != std::string::npos, r.err);
      CHECK_MESSAGE(r.err.find("is required") == std::string::npos, r.err);
    }
  }
  SUBCASE("unexpected arguments are quoted in the order they were typed") {
    auto r = run({dtrainBinary(), "check", sourceDir() + "/configs/linear_regression.json", "--nproc", "2"});
    CHECK(r.exitCode == 3);
    CHECK(r.err.find("not expected: --nproc 2") != std::string::npos);
  }
  SUBCASE("a launcher option after the job file says where it goes") {
    auto r = run(runArgs({"--standalone", sourceDir() + "/configs/linear_regression.json", "-n", "2"}));
    CHECK(r.exitCode == 3);
    CHECK(r.err.find("not expected: -n 2; only --set PATH=VALUE and --output-dir DIR may follow the job file, "
                     "launcher options go before it") != std::string::npos);
    CHECK(r.out.find("[n0 r") == std::string::npos);
  }
  SUBCASE("--nproc-per-node 0") {
    auto r = run(runArgs({"--standalone", "--nproc-per-node", "0", "--", "true"}));
    CHECK(r.exitCode == 3);
    CHECK(r.err.find("--nproc-per-node 0: expected a positive number") != std::string::npos);
  }
  SUBCASE("a bad value from a DTRAIN_* variable names the variable") {
    auto r = run(runArgs({"--standalone", "--", "true"}), {.env = {{"DTRAIN_MAX_RESTARTS", "x"}}});
    CHECK(r.exitCode == 3);
    CHECK_MESSAGE(r.err.find("--max-restarts = x (the value came from the environment variable DTRAIN_MAX_RESTARTS)") !=
                      std::string::npos,
                  r.err);
    // Given on the command line it is the flag's value: no variable is named.
    auto flag = run(runArgs({"--standalone", "--max-restarts", "y", "--", "true"}), {.env = {{"DTRAIN_MAX_RESTARTS", "x"}}});
    CHECK(flag.exitCode == 3);
    CHECK(flag.err.find("environment variable") == std::string::npos);
    // Values checked after parsing too: `--nproc-per-node abc` named a flag the user never typed.
    for (const auto& [var, value, message] :
         std::vector<std::array<std::string, 3>>{{"DTRAIN_NPROC_PER_NODE", "abc", "--nproc-per-node abc: expected"},
                                                 {"DTRAIN_NNODES", "0", "--nnodes 0: expected"},
                                                 {"DTRAIN_RDZV_TIMEOUT", "5x", "--rdzv-timeout 5x: expected"}}) {
      CAPTURE(var);
      auto env = run(runArgs({"--standalone", "--", "true"}), {.env = {{var, value}}});
      CHECK(env.exitCode == 3);
      CHECK_MESSAGE(env.err.find(message) != std::string::npos, env.err);
      CHECK_MESSAGE(env.err.find("(the value came from the environment variable " + var + ")") != std::string::npos,
                    env.err);
    }
    auto typed = run(runArgs({"--standalone", "--nproc-per-node", "abc", "--", "true"}),
                     {.env = {{"DTRAIN_NPROC_PER_NODE", "abc"}}});
    CHECK(typed.exitCode == 3);
    CHECK(typed.err.find("environment variable") == std::string::npos);
  }
  SUBCASE("program that does not exist") {
    auto r = run(runArgs({"--standalone", "--", "no-such-program-xyz"}));
    CHECK(r.exitCode == 127);
    CHECK(r.err.find("'no-such-program-xyz' was not found in PATH") != std::string::npos);
    CHECK(r.err.find("here is not looked for") == std::string::npos);
  }
  SUBCASE("a job file without .json, and JOB.JSON") {
    // `dtrain run --standalone myjob` with myjob in the working directory: "not found in PATH" beside the file said
    // nothing of why; JOB.JSON (upper case) was looked for as a program.
    std::string dir = tempDir("jobname");
    writeFile(dir + "/myjob", readFile(sourceDir() + "/configs/linear_regression.json"));
    writeFile(dir + "/LR.JSON", readFile(sourceDir() + "/configs/linear_regression.json"));
    auto bare = run(runArgs({"--standalone", "--dry-run", "myjob"}), {.cwd = dir});
    CHECK(bare.exitCode == 127);
    CHECK_MESSAGE(bare.err.find("program 'myjob' was not found in PATH; the file myjob here is not looked for: run it "
                                "as ./myjob, or, if it is a job file, name it myjob.json") != std::string::npos,
                  bare.err);
    // torchrun's habit: `torchrun train.py` runs python on it; dtrain says how to launch a script.
    writeFile(dir + "/train.py", "print('hi')\n");
    for (const char* script : {"train.py", "./train.py"}) {
      CAPTURE(script);
      auto py = run(runArgs({"--standalone", "--dry-run", script}), {.cwd = dir});
      CHECK((py.exitCode == 127 || py.exitCode == 126));
      CHECK_MESSAGE(py.err.find(std::string("(torchrun adds python itself): launch a Python script as dtrain run "
                                            "[options] -- python3 ") + script) != std::string::npos,
                    py.err);
    }
    auto upper = run(runArgs({"--standalone", "--dry-run", "LR.JSON"}), {.cwd = dir});
    INFO(upper.out, upper.err);
    CHECK(upper.exitCode == 0);
    CHECK(upper.out.find(" train LR.JSON") != std::string::npos);
  }
  SUBCASE("program that is not executable") {
    std::string dir = tempDir("noexec");
    writeFile(dir + "/script.sh", "echo hi\n");
    auto r = run(runArgs({"--standalone", "--", dir + "/script.sh"}));
    CHECK(r.exitCode == 126);
    CHECK(r.err.find("is not executable") != std::string::npos);
  }
  SUBCASE("port in use") {
    int port = freePort();
    Background holder({dtrainBinary(), "store", "--host", "127.0.0.1", "--port", std::to_string(port)});
    holder.waitForLine("listening on", 30s);
    auto r = run(runArgs({"--rdzv-endpoint", fmt::format("127.0.0.1:{}", port), "--rdzv-id", "x", "--", "true"}));
    CHECK(r.exitCode == 5);
    CHECK(r.err.find(fmt::format("cannot host the rendezvous store on port {}", port)) != std::string::npos);
    // Without --rdzv-endpoint the port is the default one, which a second job on the machine finds taken: the message
    // said "(--rdzv-endpoint 127.0.0.1:29400; ...)", a flag nobody gave. (Held here, or by anyone else: either way.)
    Background defaultHolder({dtrainBinary(), "store", "--host", "127.0.0.1", "--port", "29400"});
    try {
      defaultHolder.waitForLine("listening on", 30s);
    } catch (const std::exception&) {
      // It exited at once: another process holds the port, which is what this check needs.
    }
    auto d = run(runArgs({"--", "true"}), {.unsetEnv = {"DTRAIN_RDZV_ENDPOINT", "DTRAIN_MASTER_ADDR",
                                                        "DTRAIN_MASTER_PORT", "DTRAIN_STANDALONE"}});
    if (d.exitCode == 0) {
      MESSAGE("port 29400 was released while the test ran: the default-port message is not checked");
    } else {
      CHECK(d.exitCode == 5);
      CHECK_MESSAGE(d.err.find("cannot host the rendezvous store on the default port 29400 (no --rdzv-endpoint was "
                               "given)") != std::string::npos,
                    d.err);
      CHECK(d.err.find("--standalone takes a free port") != std::string::npos);
    }
  }
  SUBCASE("unreachable endpoint") {
    int port = freePort();
    auto r = run(runArgs({"--rdzv-backend", "store", "--rdzv-endpoint", fmt::format("127.0.0.1:{}", port),
                          "--rdzv-timeout", "1s", "--", "true"}));
    CHECK(r.exitCode == 4);
    CHECK(r.err.find(fmt::format("no rendezvous store answered at 127.0.0.1:{}", port)) != std::string::npos);
  }
  SUBCASE("--rdzv-backend c10d (torchrun's spelling) says at once that no agent hosts the store") {
    // torchrun's c10d has the agent at the endpoint host a store; dtrain's is the standalone-store backend. The
    // torchrun command line waited silently for --rdzv-timeout (900 s) and then spoke of `--rdzv-backend store`.
    int port = freePort();
    auto r = run(runArgs({"--nnodes=2", "--rdzv_backend=c10d", fmt::format("--rdzv_endpoint=127.0.0.1:{}", port),
                          "--rdzv_id=100", "--rdzv-timeout", "1s", "--", "true"}));
    CHECK(r.exitCode == 4);
    const std::string why = "--rdzv-backend c10d is dtrain's alias of store: every agent connects to a standalone "
                            "`dtrain store` running at the endpoint and none hosts it (unlike torchrun's c10d); to "
                            "have an agent host it, use --rdzv-backend static with --node-rank 0 on that node";
    CHECK_MESSAGE(r.err.find(fmt::format("run 100: connecting to the rendezvous store at 127.0.0.1:{} (up to "
                                         "--rdzv-timeout 1 s); {}\n", port, why)) != std::string::npos,
                  r.err);
    CHECK_MESSAGE(r.err.find(fmt::format("no rendezvous store answered at 127.0.0.1:{} within 1 s ({})", port, why)) !=
                      std::string::npos,
                  r.err);
    // Spelt `store`, the user chose a standalone store: no torchrun note.
    auto plain = run(runArgs({"--rdzv-backend", "store", "--rdzv-endpoint", fmt::format("127.0.0.1:{}", port),
                              "--rdzv-timeout", "1s", "--", "true"}));
    CHECK(plain.exitCode == 4);
    CHECK(plain.err.find("c10d") == std::string::npos);
  }
  SUBCASE("missing nodes time out the rendezvous") {
    int port = freePort();
    auto r = run(runArgs({"--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", fmt::format("127.0.0.1:{}", port),
                          "--rdzv-timeout", "1s", "--", "true"}));
    CHECK(r.exitCode == 4);
    CHECK(r.err.find("1 of 2 node(s) joined") != std::string::npos);
  }
  SUBCASE("node rank out of range") {
    auto r = run(runArgs({"--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1", "--", "true"}));
    CHECK(r.exitCode == 3);
    CHECK(r.err.find("--node-rank 2 is out of range for --nnodes 2") != std::string::npos);
  }
}

TEST_CASE("a run id reused on a long-lived store after a failed or interrupted job fails at once, naming the outcome") {
  int port = freePort();
  Background store({dtrainBinary(), "store", "--host", "127.0.0.1", "--port", std::to_string(port)});
  store.waitForLine("listening on", 30s);
  auto onStore = [&](const std::string& id, std::vector<std::string> rest) {
    std::vector<std::string> args{"--rdzv-backend", "store", "--rdzv-endpoint", fmt::format("127.0.0.1:{}", port),
                                  "--rdzv-id", id, "--rdzv-timeout", "60s"};
    args.insert(args.end(), rest.begin(), rest.end());
    return runArgs(args);
  };
  SUBCASE("after a failure") {
    std::string id = uniqueRunId("reuse-failed");
    auto first = run(onStore(id, {"--", "sh", "-c", "echo boom >&2; exit 3"}));
    CHECK(first.exitCode == 3);
    auto start = std::chrono::steady_clock::now();
    auto again = run(onStore(id, {"--", "sh", "-c", "echo boom >&2; exit 3"}));  // the same job, run again
    INFO(again.err);
    CHECK(again.exitCode == 4);
    CHECK(again.err.find("the job that used this run id on this store already ended (failed, exit code 3") !=
          std::string::npos);
    CHECK(again.err.find("use a new --rdzv-id") != std::string::npos);
    CHECK(std::chrono::steady_clock::now() - start < 30s);  // not the 60 s --rdzv-timeout
  }
  SUBCASE("after SIGTERM") {
    std::string id = uniqueRunId("reuse-term");
    Background first(onStore(id, {"--", "sh", "-c", "echo ready; exec sleep 1000"}));
    first.waitForLine("ready", 30s);
    first.signal(SIGTERM);
    CHECK(first.wait(60s).exitCode == 128 + SIGTERM);
    auto start = std::chrono::steady_clock::now();
    auto again = run(onStore(id, {"--", "sh", "-c", "echo ready; exec sleep 1000"}));
    INFO(again.err);
    CHECK(again.exitCode == 4);
    CHECK(again.err.find("already ended (shutdown, exit code 143") != std::string::npos);
    CHECK(std::chrono::steady_clock::now() - start < 30s);
  }
  SUBCASE("after success") {
    std::string id = uniqueRunId("reuse-done");
    CHECK(run(onStore(id, {"--", "true"})).exitCode == 0);
    auto again = run(onStore(id, {"--", "true"}));
    CHECK(again.exitCode == 4);
    CHECK(again.err.find("already completed a job on this store") != std::string::npos);
  }
}

TEST_CASE("after a forwarded SIGUSR1, a failing worker keeps its report and restart; a clean finish is success") {
  SUBCASE("fails after the warning: reported and restarted") {
    std::string script = "if [ $DTRAIN_RESTART_COUNT = 1 ]; then exit 0; fi; "
                         "trap 'echo \"fatal: after the warning\" >&2; exit 5' USR1; echo ready; "
                         "while :; do sleep 0.1; done";
    Background bg(runArgs({"--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--", "sh", "-c", script}));
    bg.waitForLine("[n0 r0] ready", 30s);
    bg.waitForLine("[n0 r1] ready", 30s);
    bg.signal(SIGUSR1);
    auto r = bg.wait(60s);
    INFO(r.err);
    CHECK(r.exitCode == 0);
    CHECK(r.err.find("exit code 5") != std::string::npos);
    CHECK(r.err.find("| fatal: after the warning") != std::string::npos);
    CHECK(linesWith(r.err, "restarting the workers").size() == 1);
  }
  SUBCASE("handles it and finishes with 0: success, not 138") {
    std::string script = "trap 'exit 0' USR1; echo ready; while :; do sleep 0.1; done";
    Background bg(runArgs({"--standalone", "--nproc-per-node", "2", "--", "sh", "-c", script}));
    bg.waitForLine("[n0 r0] ready", 30s);
    bg.waitForLine("[n0 r1] ready", 30s);
    bg.signal(SIGUSR1);
    auto r = bg.wait(60s);
    INFO(r.err);
    CHECK(r.exitCode == 0);
  }
}

TEST_CASE("a node refused by the store for its token is logged at once by the first node, which hosts the store") {
  // A node without the token used to leave no trace on the first node, which waited silently until --rdzv-timeout.
  const int port = freePort();
  const std::string id = uniqueRunId("refused-token");
  auto agent = [&](int nodeRank, std::vector<std::string> token) {
    std::vector<std::string> args{"--nnodes", "2", "--nproc-per-node", "1", "--node-rank", std::to_string(nodeRank),
                                  "--rdzv-endpoint", fmt::format("127.0.0.1:{}", port), "--rdzv-id", id,
                                  "--rdzv-timeout", "60s", "--shutdown-timeout", "2s"};
    args.insert(args.end(), token.begin(), token.end());
    args.insert(args.end(), {"--", "true"});
    return runArgs(args);
  };
  Background node0(agent(0, {"--rdzv-token", "right"}), {.unsetEnv = {"DTRAIN_RDZV_TOKEN"}});
  node0.waitForLine("waiting for 2 node(s) to join", 60s, /*fromStderr=*/true);  // after its store listens
  auto missing = run(agent(1, {}), {.timeout = 30s, .unsetEnv = {"DTRAIN_RDZV_TOKEN"}});
  CHECK(missing.exitCode == 4);
  std::string line = node0.waitForLine("closed without answering the authentication challenge", 20s, true);
  CHECK_MESSAGE(line.find("store: connection from 127.0.0.1:") != std::string::npos, line);
  CHECK_MESSAGE(line.find("a client without the store's token (--rdzv-token)") != std::string::npos, line);
  auto wrong = run(agent(1, {"--rdzv-token", "wrong"}), {.timeout = 30s, .unsetEnv = {"DTRAIN_RDZV_TOKEN"}});
  CHECK(wrong.exitCode == 4);
  line = node0.waitForLine("wrong rendezvous token (--rdzv-token)", 20s, true);
  CHECK_MESSAGE(line.find("store: closing connection from 127.0.0.1:") != std::string::npos, line);
  CHECK(node0.running());  // both before its --rdzv-timeout; it keeps waiting for a node with the token
  auto right = run(agent(1, {"--rdzv-token", "right"}), {.timeout = 60s, .unsetEnv = {"DTRAIN_RDZV_TOKEN"}});
  auto r0 = node0.wait(60s);
  INFO(right.err, r0.err);
  CHECK(right.exitCode == 0);
  CHECK(r0.exitCode == 0);
  CHECK(processesWithRunId(id).empty());
}
