// The cgroup memory limit of this process (lib/common/cgroup.h): /proc/self/cgroup and /proc/self/mountinfo
// lines of cgroup v1, v2 and hybrid machines, the limit files' values, and the smallest limit of a cgroup and its
// ancestors read from a fake hierarchy in a temporary folder. The real kernel's limit is tested by
// test_train_integration ("dtrain check in a cgroup ...").
#include <doctest/doctest.h>

#include <filesystem>

#include "lib/common/cgroup.h"
#include "tests/support/process.h"

using namespace dtrain;
namespace fs = std::filesystem;

namespace {

// This machine's files as they were read (a hybrid: v1 controllers, a v2 hierarchy at /sys/fs/cgroup/unified).
constexpr const char* kHybridCgroup =
    "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/e40bcfd5\n3:cpuset:/\n2:cpuacct:/\n1:cpu:/\n0::/\n";
constexpr const char* kHybridMountinfo =
    "22 1 253:0 / / rw,relatime - ext4 /dev/vda rw\n"
    "30 22 0:27 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "31 30 0:28 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
    "34 30 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "39 30 0:36 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n"
    "40 30 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";

}  // namespace

TEST_CASE("/proc/self/cgroup lines: v1 controllers, named hierarchies, the v2 entry; malformed lines skipped") {
  auto m = parseProcCgroup(kHybridCgroup);
  REQUIRE(m.size() == 7);
  CHECK(m[0].hierarchy == 9);
  CHECK(m[0].controllers == std::vector<std::string>{"name=systemd"});
  CHECK(m[2].hierarchy == 4);
  CHECK(m[2].controllers == std::vector<std::string>{"memory"});
  CHECK(m[2].path == "/process_api/e40bcfd5");
  CHECK(m[6].hierarchy == 0);
  CHECK(m[6].controllers.empty());
  CHECK(m[6].path == "/");
  // Comounted controllers, a path holding ':', and junk.
  auto n = parseProcCgroup("5:cpu,cpuacct:/a:b\nnot a line\n:memory:/x\n7:memory:relative\n0::/user.slice/u.scope");
  REQUIRE(n.size() == 2);
  CHECK(n[0].controllers == std::vector<std::string>{"cpu", "cpuacct"});
  CHECK(n[0].path == "/a:b");
  CHECK(n[1].path == "/user.slice/u.scope");
}

TEST_CASE("mountinfo lines: cgroup and cgroup2 mounts with their roots, optional fields and escapes") {
  auto mounts = parseMountinfoCgroups(kHybridMountinfo);
  REQUIRE(mounts.size() == 4);  // ext4 and tmpfs are not cgroups
  CHECK(mounts[1].mountPoint == "/sys/fs/cgroup/memory");
  CHECK_FALSE(mounts[1].v2);
  CHECK(mounts[1].controllers == std::vector<std::string>{"memory"});
  CHECK(mounts[2].controllers == std::vector<std::string>{"name=systemd"});
  CHECK(mounts[3].v2);
  CHECK(mounts[3].mountPoint == "/sys/fs/cgroup/unified");
  // systemd's v2-only layout: optional fields before " - ", a container's namespaced root, an escaped space.
  auto v2 = parseMountinfoCgroups(
      "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 "
      "rw,nsdelegate,memory_recursiveprot\n"
      "60 50 0:30 /kubepods/pod1 /mnt/my\\040cg ro master:9 - cgroup2 cgroup2 rw\n"
      "61 50 0:31 / /c rw - cgroup cgroup rw,memory,release_agent=/x\n");
  REQUIRE(v2.size() == 3);
  CHECK(v2[0].v2);
  CHECK(v2[0].root == "/");
  CHECK(v2[0].mountPoint == "/sys/fs/cgroup");
  CHECK(v2[1].root == "/kubepods/pod1");
  CHECK(v2[1].mountPoint == "/mnt/my cg");
  CHECK(v2[2].controllers == std::vector<std::string>{"memory"});
}

TEST_CASE("limit values: bytes, v2's max and v1's no-limit number are no limit") {
  CHECK(parseCgroupMemoryValue("4294967296\n") == int64_t{4294967296});
  CHECK(parseCgroupMemoryValue("0\n") == int64_t{0});
  CHECK_FALSE(parseCgroupMemoryValue("max\n"));
  CHECK_FALSE(parseCgroupMemoryValue("9223372036854771712\n"));  // v1 unlimited (PAGE_COUNTER_MAX pages)
  CHECK_FALSE(parseCgroupMemoryValue("99999999999999999999999\n"));
  CHECK_FALSE(parseCgroupMemoryValue(""));
  CHECK_FALSE(parseCgroupMemoryValue("-1\n"));
  CHECK_FALSE(parseCgroupMemoryValue("12k\n"));
}

TEST_CASE("the limit files: the cgroup and each ancestor under the mount, v1 memory and v2; others ignored") {
  // Hybrid: v1 memory from its cgroup up to the mount point; the v2 hierarchy's root too (a missing memory.max
  // there, as on this machine where memory is a v1 controller, is no limit).
  CHECK(cgroupMemoryLimitFiles(parseProcCgroup(kHybridCgroup), parseMountinfoCgroups(kHybridMountinfo)) ==
        std::vector<std::string>{"/sys/fs/cgroup/memory/process_api/e40bcfd5/memory.limit_in_bytes",
                                 "/sys/fs/cgroup/memory/process_api/memory.limit_in_bytes",
                                 "/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/unified/memory.max"});
  // v2 only, the cgroup seen through a namespaced mount whose root is the container's cgroup.
  const auto ns = parseMountinfoCgroups("60 50 0:30 /kube/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
  CHECK(cgroupMemoryLimitFiles(parseProcCgroup("0::/kube/pod1/c1\n"), ns) ==
        std::vector<std::string>{"/sys/fs/cgroup/c1/memory.max", "/sys/fs/cgroup/memory.max"});
  // A cgroup outside the mount's root (a namespace's "/../x" or a sibling) is not reachable: no files.
  CHECK(cgroupMemoryLimitFiles(parseProcCgroup("0::/kube/pod2\n"), ns).empty());
  CHECK(cgroupMemoryLimitFiles(parseProcCgroup("0::/kube/pod10\n"), ns).empty());
  // v1 without the memory controller mounted: nothing to read.
  CHECK(cgroupMemoryLimitFiles(parseProcCgroup("4:memory:/a\n3:cpu:/a\n"),
                               parseMountinfoCgroups("31 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"))
            .empty());
}

TEST_CASE("readCgroupMemoryLimit: the smallest limit of the cgroup and its ancestors, with its file") {
  const std::string dir = testing::tempDir("cgroup");
  const std::string v1 = dir + "/memory", v2 = dir + "/unified";
  fs::create_directories(v1 + "/job/step");
  fs::create_directories(v2 + "/user/app");
  testing::writeFile(dir + "/cgroup", "4:memory:/job/step\n1:cpu:/\n0::/user/app\n");
  testing::writeFile(dir + "/mountinfo", "34 30 0:31 / " + v1 + " rw - cgroup cgroup rw,memory\n40 30 0:37 / " + v2 +
                                             " rw - cgroup2 cgroup2 rw\n");
  const std::string cg = dir + "/cgroup", mi = dir + "/mountinfo";
  // No limit files at all (v2's root and v1's root have none here): no limit.
  CHECK_FALSE(readCgroupMemoryLimit(cg, mi));
  // v1 unlimited everywhere, v2 "max": still none.
  testing::writeFile(v1 + "/job/step/memory.limit_in_bytes", "9223372036854771712\n");
  testing::writeFile(v1 + "/job/memory.limit_in_bytes", "9223372036854771712\n");
  testing::writeFile(v2 + "/user/app/memory.max", "max\n");
  CHECK_FALSE(readCgroupMemoryLimit(cg, mi));
  // A parent's limit bounds its children: v2's user at 4 GiB.
  testing::writeFile(v2 + "/user/memory.max", "4294967296\n");
  auto limit = readCgroupMemoryLimit(cg, mi);
  REQUIRE(limit);
  CHECK(limit->bytes == int64_t{4} << 30);
  CHECK(limit->file == v2 + "/user/memory.max");
  // The smallest wins, whichever hierarchy: v1's step at 3 GiB.
  testing::writeFile(v1 + "/job/step/memory.limit_in_bytes", "3221225472\n");
  limit = readCgroupMemoryLimit(cg, mi);
  REQUIRE(limit);
  CHECK(limit->bytes == int64_t{3} << 30);
  CHECK(limit->file == v1 + "/job/step/memory.limit_in_bytes");
  // Unreadable /proc files: unknown, no limit.
  CHECK_FALSE(readCgroupMemoryLimit(dir + "/missing", mi));
  CHECK_FALSE(readCgroupMemoryLimit(cg, dir + "/missing"));
}
