// LaunchOptions' plan, as `dtrain run --dry-run` prints it (scripts and the Slurm tier read these lines).
#include <doctest/doctest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>

#include "lib/common/error.h"
#include "lib/launch/launch_options.h"
#include "lib/launch/worker_env.h"
#include "tests/support/process.h"

using namespace dtrain::launch;

TEST_CASE("launch plan: defaults, then every field resolved") {
  LaunchOptions o;
  o.program = {"python", "train.py", "--lr", "0.1"};
  CHECK(o.plan() ==
        "nnodes=1 nproc_per_node=1 node_rank=0 rdzv_backend=static rdzv_endpoint=- rdzv_id=none max_restarts=0 max_reforms=100\n"
        "program=python train.py --lr 0.1");
  o.standalone = true;  // --standalone without --rdzv-id: the agent draws a random id, and the plan says so
  CHECK(o.plan().find(" rdzv_id=random ") != std::string::npos);
  CHECK(o.plan().find(" node_rank=0 ") != std::string::npos);  // one node is node 0 (it said -1)
  o.standalone = false;
  o.maxNodes = 4;  // several nodes without --node-rank: ranks follow the order of joining
  CHECK(o.plan().find(" node_rank=join-order ") != std::string::npos);
  o.nnodesText = "2:4";
  o.nproc = 8;
  o.nodeRank = 1;
  o.rdzvBackend = "store";
  o.rdzvEndpoint = "node0:29400";
  o.rdzvId = "job42";
  o.maxRestarts = 3;
  CHECK(o.plan() ==
        "nnodes=2:4 nproc_per_node=8 node_rank=1 rdzv_backend=store rdzv_endpoint=node0:29400 rdzv_id=job42 "
        "max_restarts=3 max_reforms=100\nprogram=python train.py --lr 0.1");
}

TEST_CASE("CUDA_VISIBLE_DEVICES is counted as the CUDA runtime reads it: up to the first invalid entry") {
  CHECK(countVisibleDevices("", 8) == 0);
  CHECK(countVisibleDevices("-1", 8) == 0);
  CHECK(countVisibleDevices("NoDevFiles", 8) == 0);
  CHECK(countVisibleDevices("0", 8) == 1);
  CHECK(countVisibleDevices("0,1", 8) == 2);
  CHECK(countVisibleDevices(" 2, 3 ", 8) == 2);
  CHECK(countVisibleDevices("0,1,-1,2", 8) == 2);  // -1 ends the list
  CHECK(countVisibleDevices("0,1,", 8) == 2);      // so does an empty entry
  CHECK(countVisibleDevices("0,0", 8) == 1);       // and a repeated index
  CHECK(countVisibleDevices("0,7", 2) == 1);       // an index beyond the driver's GPUs
  CHECK(countVisibleDevices("0,7", 0) == 2);       // driver count unknown: indices are taken as given
  CHECK(countVisibleDevices("GPU-8f1a,MIG-2b3c/1/0", 1) == 2);  // UUIDs count one each
  CHECK(countVisibleDevices("1,gpu0", 8) == 1);
}

TEST_CASE("the driver's GPUs: /proc/driver/nvidia/gpus where it exists, else the /dev/nvidia<N> device nodes") {
  const std::string dir = dtrain::testing::tempDir("driver_gpus");
  const std::filesystem::path proc = dir + "/proc-gpus", dev = dir + "/dev";
  std::filesystem::create_directories(dev);
  for (const char* node : {"nvidia0", "nvidia1", "nvidia12", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools",
                           "nvidia-modeset", "nvidia", "null"})
    std::ofstream(dev / node).put('\n');
  std::filesystem::create_directories(dev / "nvidia-caps");
  // No /proc/driver/nvidia (gVisor's nvproxy): the GPU nodes count, not the control, UVM or modeset nodes.
  CHECK(driverGpuCount(proc, dev) == 3);
  // The driver's own list wins where it exists (one GPU of the three nodes given to this container).
  std::filesystem::create_directories(proc / "0000:19:00.0");
  CHECK(driverGpuCount(proc, dev) == 1);
  std::filesystem::remove(proc / "0000:19:00.0");
  CHECK(driverGpuCount(proc, dev) == 0);  // an empty list: no GPU, whatever /dev holds
  std::filesystem::remove(proc);
  std::filesystem::remove_all(dev);
  CHECK(driverGpuCount(proc, dev) == 0);  // no driver at all
}

TEST_CASE("--nproc-per-node gpu: one worker per GPU CUDA_VISIBLE_DEVICES shows; none visible is a clear error") {
  // The agent counts without starting CUDA (it forks the workers): the variable as CUDA reads it, capped by the
  // driver's GPUs when /proc/driver/nvidia/gpus lists them (this machine may have none: then taken as given).
  const char* saved = std::getenv("CUDA_VISIBLE_DEVICES");
  const std::string before = saved != nullptr ? saved : "";
  ::setenv("CUDA_VISIBLE_DEVICES", "", 1);
  CHECK_THROWS_WITH_AS(resolveNproc("gpu"), "--nproc-per-node gpu: no GPU is visible to this process",
                       dtrain::UsageError);
  CHECK(resolveNproc("auto") == usableCpuCount());  // auto falls back to the CPUs
  ::setenv("CUDA_VISIBLE_DEVICES", "0,1", 1);
  const int gpus = visibleGpuCount();  // 2 without a driver; 1 where the driver lists a single GPU
  CHECK((gpus == 1 || gpus == 2));
  CHECK(resolveNproc("gpu") == gpus);
  CHECK(resolveNproc("auto") == gpus);
  CHECK_THROWS_WITH_AS(resolveNproc("gpus"), doctest::Contains("expected a positive number of workers, or auto, cpu or gpu"),
                       dtrain::UsageError);
  if (saved != nullptr) ::setenv("CUDA_VISIBLE_DEVICES", before.c_str(), 1);
  else ::unsetenv("CUDA_VISIBLE_DEVICES");
}

namespace {
// The message validate() throws for these options (UsageError: exit 3), or "" when it accepts them.
std::string validateError(LaunchOptions o) {
  o.program = {"true"};
  try {
    o.validate();
  } catch (const dtrain::UsageError& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST_CASE("heartbeat flags: a zero interval is named as such, not as a timeout shorter than it") {
  LaunchOptions o;
  o.heartbeatInterval = Millis(0);
  auto message = validateError(o);
  CHECK(message.find("--heartbeat-interval 0 ms: expected a positive duration") != std::string::npos);
  o.heartbeatInterval = Millis(10000);
  CHECK(validateError(o).find("--heartbeat-timeout (5000 ms) must be longer than --heartbeat-interval (10000 ms)") !=
        std::string::npos);
  o.heartbeatInterval = Millis(1000);
  CHECK(validateError(o) == "");
}

TEST_CASE("a job file is a name ending in .json in any case") {
  CHECK(isJobFileName("job.json"));
  CHECK(isJobFileName("configs/LR.JSON"));
  CHECK(isJobFileName("a.Json"));
  CHECK_FALSE(isJobFileName(".json"));
  CHECK_FALSE(isJobFileName("train.py"));
  CHECK_FALSE(isJobFileName("json"));
}

TEST_CASE("--rdzv-endpoint HOST:0 on several nodes is a usage error: the other nodes cannot find a free port") {
  LaunchOptions o;
  o.nnodesText = "2";
  o.nodeRank = 1;
  o.rdzvEndpoint = "127.0.0.1:0";
  // Node 1 retried port 0 until --rdzv-timeout (900 s) while node 0's store listened on a port it picked.
  CHECK(validateError(o).find("--rdzv-endpoint 127.0.0.1:0: port 0 (a free port picked by the store) cannot be "
                              "found by the other nodes of --nnodes 2") != std::string::npos);
  o.rdzvBackend = "store";
  o.nodeRank = -1;
  CHECK(validateError(o).find("port 0") != std::string::npos);
  o = LaunchOptions{};
  o.rdzvEndpoint = "127.0.0.1:0";  // one node: it hosts the store itself, any free port does
  CHECK(validateError(o) == "");
}

TEST_CASE("--rdzv-timeout 0 is a usage error, not a store that fails its handshake") {
  LaunchOptions o;
  o.standalone = true;
  o.rdzvTimeout = Millis(0);
  // It used to start the store and then give up on its handshake at once: "127.0.0.1:PORT accepted the connection
  // but did not answer the dtrain store handshake within 0 ms: not a dtrain store" (exit 6).
  CHECK(validateError(o).find("--rdzv-timeout 0 ms: expected a positive duration") != std::string::npos);
  o.rdzvTimeout = Millis(500);
  CHECK(validateError(o) == "");
}

TEST_CASE("--timeline and --log-dir that cannot be written are usage errors before any worker starts") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / fmt::format("dtrain-launch-options-{}", ::getpid());
  fs::create_directories(dir);
  const fs::path file = dir / "a-file";
  { std::ofstream(file) << "x"; }
  LaunchOptions o;
  o.timelineFile = dir.string();  // a folder, not a file: the merged trace could never be renamed into place
  auto message = validateError(o);
  CHECK(message.find(fmt::format("--timeline {}: is a folder", dir.string())) != std::string::npos);
  o.timelineFile = (file / "trace.json").string();  // the "folder" is a file
  CHECK(validateError(o).find("--timeline") != std::string::npos);
  o.timelineFile = (dir / "trace.json").string();
  CHECK(validateError(o) == "");

  LaunchOptions l;
  l.logDir = file.string();  // exists and is not a folder
  message = validateError(l);
  CHECK(message.find(fmt::format("--log-dir {}: {} exists and is not a folder", file.string(), file.string())) !=
        std::string::npos);
  l.logDir = (file / "logs").string();  // under a file
  CHECK(validateError(l).find("is not a folder") != std::string::npos);
  l.logDir = (dir / "new" / "logs").string();  // created when the first round starts
  CHECK(validateError(l) == "");
  // Where no folder can be made although access(2) allows it (always for root): /proc. It passed here and the
  // agent failed after the store started (exit 1).
  l.logDir = "/proc/x";
  CHECK(validateError(l) ==
        "--log-dir /proc/x: the folder /proc is not writable (cannot create a folder there: No such file or directory)");
  // The probe folder of the check that passed is gone: only the test's file is left.
  CHECK(std::distance(fs::directory_iterator(dir), fs::directory_iterator()) == 1);
  fs::remove_all(dir);
}

TEST_CASE("a folder given as the program is named as a folder (exit 126, as the shell's 'Is a directory')") {
  try {
    resolveProgram("/tmp");
    FAIL("resolveProgram accepted a folder");
  } catch (const dtrain::Error& e) {
    CHECK(e.code() == dtrain::ExitCode::kNotExecutable);
    CHECK(std::string(e.what()) == "program '/tmp' (/tmp) is not executable: it is a folder");
  }
}

TEST_CASE("agreed environment: the tcp sizes compare as the backend reads them, so 64K and 65536 agree") {
  // Nodes compare this text at the rendezvous (exit 4 when it differs). It used to hold the sizes as written, so a
  // node with DTRAIN_TCP_SMALL_BYTES=65536 was refused by a first agent with 64K: the same size, the same collectives.
  const char* names[] = {"DTRAIN_TCP_SMALL_BYTES", "DTRAIN_TCP_CHUNK_BYTES", "DTRAIN_TCP_BLOCK_BYTES",
                         "DTRAIN_COMPRESSION_HOST_STAGING"};
  std::map<std::string, std::optional<std::string>> saved;
  for (const char* n : names) {
    const char* v = std::getenv(n);
    saved[n] = v ? std::optional<std::string>(v) : std::nullopt;
  }
  auto with = [](const char* small, const char* chunk, const char* block) {
    ::setenv("DTRAIN_TCP_SMALL_BYTES", small, 1);
    ::setenv("DTRAIN_TCP_CHUNK_BYTES", chunk, 1);
    ::setenv("DTRAIN_TCP_BLOCK_BYTES", block, 1);
    return agreedEnvironment();
  };
  ::unsetenv("DTRAIN_COMPRESSION_HOST_STAGING");
  const std::string spelled = with("64K", "256KiB", "1M");
  CHECK(spelled == with("65536", "262144", "1048576"));
  CHECK(spelled.find("DTRAIN_TCP_SMALL_BYTES=65536\n") != std::string::npos);
  CHECK(spelled.find("DTRAIN_COMPRESSION_HOST_STAGING=(unset)\n") != std::string::npos);
  CHECK(spelled != with("128K", "256K", "1M"));  // another size still differs
  // Not a size: kept as written (the workers refuse it, naming the variable); empty is unset.
  CHECK(with("lots", "", "1M").find("DTRAIN_TCP_SMALL_BYTES=lots\nDTRAIN_TCP_CHUNK_BYTES=(unset)\n") !=
        std::string::npos);
  for (const auto& [n, v] : saved) {
    if (v) ::setenv(n.c_str(), v->c_str(), 1);
    else ::unsetenv(n.c_str());
  }
}
