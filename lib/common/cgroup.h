// The memory limit of this process's cgroup: what the kernel's OOM killer enforces on the process and every
// process it starts (a container's `--memory`, a Slurm step, a systemd unit's MemoryMax=), which /proc/meminfo and
// `ulimit -v` do not show. Read from the cgroup files, never written; nothing here needs privileges.
//
// Sources (Linux, Documentation/admin-guide/cgroup-v2.rst and cgroup-v1/memory.rst): /proc/self/cgroup lists the
// process's cgroup in each hierarchy ("ID:CONTROLLERS:PATH"; v2 is "0::PATH"), /proc/self/mountinfo where each
// hierarchy is mounted (proc(5): field 4 is the root of the mount inside the hierarchy, field 5 the mount point,
// after " - " the file system type, cgroup or cgroup2, and the super options, which name a v1 hierarchy's
// controllers). A cgroup's limit applies to it and all its descendants, so the limit on this process is the
// smallest one of its cgroup and each ancestor visible under the mount: v2 `memory.max` ("max": none), v1
// `memory.limit_in_bytes` (no limit reads as a huge number, PAGE_COUNTER_MAX pages: 2^63 - 4096 bytes with 4 KiB
// pages; anything from 2^62 on is taken as none). A hybrid machine (v1 controllers plus a v2 hierarchy without
// the memory controller) is read through both: a missing file is simply no limit.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace dtrain {

// One line of /proc/self/cgroup: "4:memory:/a/b" -> {4, {"memory"}, "/a/b"}; "0::/a" (v2) -> {0, {}, "/a"};
// a named v1 hierarchy "1:name=systemd:/" keeps "name=systemd" as its controller.
struct CgroupMembership {
  int hierarchy = 0;
  std::vector<std::string> controllers;
  std::string path;
};
// Every well-formed line of `text` (/proc/self/cgroup's contents); malformed lines are skipped.
std::vector<CgroupMembership> parseProcCgroup(const std::string& text);

// One cgroup mount of /proc/self/mountinfo. Paths are unescaped (the kernel writes space, tab, newline and
// backslash as \040, \011, \012, \134).
struct CgroupMount {
  std::string root;        // the mount's root inside the hierarchy ("/" unless a namespace or bind mount)
  std::string mountPoint;  // where it is mounted, e.g. /sys/fs/cgroup or /sys/fs/cgroup/memory
  bool v2 = false;         // cgroup2; otherwise a v1 hierarchy
  std::vector<std::string> controllers;  // v1: the super options that are controllers (memory, cpu, name=...)
};
// The cgroup and cgroup2 mounts among the lines of `text` (/proc/self/mountinfo's contents), in order.
std::vector<CgroupMount> parseMountinfoCgroups(const std::string& text);

// The value of a memory.max or memory.limit_in_bytes file: bytes, or nullopt for "max", a value of 2^62 or more
// (v1's "no limit"), or text that is not a number.
std::optional<int64_t> parseCgroupMemoryValue(const std::string& text);

// The limit files that bound this process: for the v2 entry ("0::PATH") under a cgroup2 mount, memory.max of
// PATH's directory and each ancestor up to the mount point; for a v1 entry with the memory controller under a
// mount of that hierarchy, memory.limit_in_bytes likewise. Innermost first. A PATH outside the mount's root (a
// cgroup namespace's "/.." entries) gives no files.
std::vector<std::string> cgroupMemoryLimitFiles(const std::vector<CgroupMembership>& memberships,
                                                const std::vector<CgroupMount>& mounts);

struct CgroupMemoryLimit {
  int64_t bytes = 0;
  std::string file;  // the file it was read from, e.g. /sys/fs/cgroup/x/memory.max
};
// The smallest limit among cgroupMemoryLimitFiles of the two files' contents (defaults: this process's); nullopt
// when there is none or the files cannot be read. Blocking file reads; thread-safe; never throws.
std::optional<CgroupMemoryLimit> readCgroupMemoryLimit(const std::string& procCgroupPath = "/proc/self/cgroup",
                                                       const std::string& mountinfoPath = "/proc/self/mountinfo");

}  // namespace dtrain
