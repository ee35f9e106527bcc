#include "lib/common/cgroup.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace dtrain {

namespace {

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    size_t end = s.find(sep, start);
    out.push_back(s.substr(start, end == std::string::npos ? std::string::npos : end - start));
    if (end == std::string::npos) return out;
    start = end + 1;
  }
}

bool isOctal(char c) { return c >= '0' && c <= '7'; }

// mountinfo's octal escapes (\040 for a space, ...), as the kernel's seq_path writes them.
std::string unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size() && isOctal(s[i + 1]) && isOctal(s[i + 2]) && isOctal(s[i + 3])) {
      out += static_cast<char>((s[i + 1] - '0') * 64 + (s[i + 2] - '0') * 8 + (s[i + 3] - '0'));
      i += 3;
    } else {
      out += s[i];
    }
  }
  return out;
}

std::optional<std::string> readText(const std::string& path) {
  std::ifstream in(path);
  if (!in) return std::nullopt;
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// `path` relative to `root` when it lies at or under it ("/a/b" under "/a" -> "/b"; under "/" -> itself).
std::optional<std::string> under(const std::string& path, const std::string& root) {
  if (root == "/") return path;
  if (path == root) return std::string("/");
  if (path.size() > root.size() && path.compare(0, root.size(), root) == 0 && path[root.size()] == '/')
    return path.substr(root.size());
  return std::nullopt;
}

// The cgroup directory of `rel` (a path under the mount's root) and each ancestor up to the mount point.
void addChain(const std::string& mountPoint, std::string rel, const std::string& file, std::vector<std::string>& out) {
  for (;;) {
    while (rel.size() > 1 && rel.back() == '/') rel.pop_back();
    const std::string dir = rel == "/" ? mountPoint : mountPoint + rel;
    out.push_back(dir + "/" + file);
    if (rel == "/" || rel.empty()) return;
    const size_t slash = rel.rfind('/');
    rel = slash == 0 || slash == std::string::npos ? "/" : rel.substr(0, slash);
  }
}

}  // namespace

std::vector<CgroupMembership> parseProcCgroup(const std::string& text) {
  std::vector<CgroupMembership> out;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    const size_t a = line.find(':');
    if (a == std::string::npos) continue;
    const size_t b = line.find(':', a + 1);
    if (b == std::string::npos) continue;
    CgroupMembership m;
    const std::string id = line.substr(0, a);
    if (id.empty() || !std::all_of(id.begin(), id.end(), [](char c) { return c >= '0' && c <= '9'; })) continue;
    m.hierarchy = std::atoi(id.c_str());
    const std::string controllers = line.substr(a + 1, b - a - 1);
    if (!controllers.empty()) m.controllers = split(controllers, ',');
    m.path = line.substr(b + 1);  // a path may itself hold ':'
    if (m.path.empty() || m.path[0] != '/') continue;
    out.push_back(std::move(m));
  }
  return out;
}

std::vector<CgroupMount> parseMountinfoCgroups(const std::string& text) {
  std::vector<CgroupMount> out;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS"
    std::istringstream fields(line);
    std::vector<std::string> f;
    for (std::string w; fields >> w;) f.push_back(w);
    auto dash = std::find(f.begin(), f.end(), "-");
    if (f.size() < 6 || dash == f.end() || dash - f.begin() < 6 || f.end() - dash < 3) continue;
    const std::string& type = *(dash + 1);
    if (type != "cgroup" && type != "cgroup2") continue;
    CgroupMount m;
    m.root = unescape(f[3]);
    m.mountPoint = unescape(f[4]);
    m.v2 = type == "cgroup2";
    if (!m.v2) {
      for (const auto& opt : split(*(dash + 3), ',')) {
        // Super options of a v1 mount: its controllers (memory, cpu, ..., name=X) among rw/ro and the like.
        if (opt == "rw" || opt == "ro" || opt == "noprefix" || opt == "xattr" || opt == "clone_children" ||
            opt == "cpuset_v2_mode" || opt.rfind("release_agent=", 0) == 0)
          continue;
        m.controllers.push_back(opt);
      }
    }
    out.push_back(std::move(m));
  }
  return out;
}

std::optional<int64_t> parseCgroupMemoryValue(const std::string& text) {
  std::string t = text;
  while (!t.empty() && (t.back() == '\n' || t.back() == ' ' || t.back() == '\t')) t.pop_back();
  if (t.empty() || t == "max") return std::nullopt;
  if (!std::all_of(t.begin(), t.end(), [](char c) { return c >= '0' && c <= '9'; })) return std::nullopt;
  errno = 0;
  const unsigned long long v = std::strtoull(t.c_str(), nullptr, 10);
  if (errno == ERANGE || v >= (1ull << 62)) return std::nullopt;
  return static_cast<int64_t>(v);
}

std::vector<std::string> cgroupMemoryLimitFiles(const std::vector<CgroupMembership>& memberships,
                                                const std::vector<CgroupMount>& mounts) {
  std::vector<std::string> out;
  for (const auto& m : memberships) {
    const bool v2 = m.hierarchy == 0 && m.controllers.empty();
    const bool v1Memory = !v2 && std::find(m.controllers.begin(), m.controllers.end(), "memory") != m.controllers.end();
    if (!v2 && !v1Memory) continue;
    for (const auto& mount : mounts) {
      if (mount.v2 != v2) continue;
      if (!v2 && std::find(mount.controllers.begin(), mount.controllers.end(), "memory") == mount.controllers.end())
        continue;
      auto rel = under(m.path, mount.root);
      if (!rel) continue;
      addChain(mount.mountPoint, *rel, v2 ? "memory.max" : "memory.limit_in_bytes", out);
      break;  // one mount of the hierarchy is enough (others are bind mounts of the same files)
    }
  }
  return out;
}

std::optional<CgroupMemoryLimit> readCgroupMemoryLimit(const std::string& procCgroupPath,
                                                       const std::string& mountinfoPath) {
  try {
    auto cgroups = readText(procCgroupPath);
    auto mountinfo = readText(mountinfoPath);
    if (!cgroups || !mountinfo) return std::nullopt;
    std::optional<CgroupMemoryLimit> best;
    for (const auto& file : cgroupMemoryLimitFiles(parseProcCgroup(*cgroups), parseMountinfoCgroups(*mountinfo))) {
      auto text = readText(file);
      if (!text) continue;
      auto bytes = parseCgroupMemoryValue(*text);
      if (bytes && (!best || *bytes < best->bytes)) best = CgroupMemoryLimit{*bytes, file};
    }
    return best;
  } catch (const std::exception&) {
    return std::nullopt;  // std::bad_alloc on absurd files: no limit known, as for unreadable ones
  }
}

}  // namespace dtrain
