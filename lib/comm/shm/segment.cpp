#include "lib/comm/shm/segment.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <new>
#include <random>

#include "lib/common/error.h"
#include "lib/common/parse.h"

namespace dtrain::comm::shm {
namespace {

constexpr uint64_t kMagic = 0x4d48535f4e494152ull;  // "RAIN_SHM"
constexpr uint32_t kVersion = 1;
constexpr const char* kPrefix = "dtrain-shm-";

size_t align4k(size_t v) { return (v + 4095) / 4096 * 4096; }

}  // namespace

Layout::Layout(int nranks, size_t slot, size_t p2p) : n(nranks), slotBytes(align4k(slot)), p2pBytes(p2p) {
  static_assert(sizeof(Header) <= 4096);
  const auto un = static_cast<size_t>(n);
  phaseOffset = 4096;
  pairOffset = phaseOffset + 128 * un;
  inOffset = align4k(pairOffset + 128 * 2 * un * un);
  resOffset = inOffset + 2 * un * slotBytes;
  p2pOffset = resOffset + 2 * slotBytes;
  total = p2pOffset + un * un * p2pBytes;
}

Segment::Segment(std::string name, const Layout& layout, char* base, bool owner, int lockFd)
    : name_(std::move(name)), layout_(layout), base_(base), linked_(owner), lockFd_(lockFd) {}

Segment::~Segment() {
  unlink();
  ::munmap(base_, layout_.total);
}

void Segment::unlink() {
  if (!linked_) return;
  linked_ = false;
  ::shm_unlink(name_.c_str());
  if (lockFd_ >= 0) ::close(lockFd_);  // after the unlink: a sweep never finds the name unlocked while it is ours
  lockFd_ = -1;
}

std::unique_ptr<Segment> Segment::create(const std::string& name, const Layout& layout) {
  int fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  DTRAIN_CHECK_AS(CommError, fd >= 0, "cannot create shared memory {}: {}", name, std::strerror(errno));
  // Locked before it is sized: removeStaleSegments leaves a segment of 0 bytes alone and unlinks a sized one only
  // when it can take this lock (its creator is gone). A new file: nobody else holds a lock on it yet.
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int err = errno;
    ::close(fd);
    ::shm_unlink(name.c_str());
    DTRAIN_THROW(CommError, "cannot lock shared memory {}: {}", name, std::strerror(err));
  }
  if (::ftruncate(fd, static_cast<off_t>(layout.total)) != 0) {
    int err = errno;
    ::close(fd);
    ::shm_unlink(name.c_str());
    DTRAIN_THROW(CommError, "cannot size shared memory {} to {}: {} (is /dev/shm large enough?)", name,
                 parse::formatBytes(layout.total), std::strerror(err));
  }
  void* p = ::mmap(nullptr, layout.total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int err = errno;
  if (p == MAP_FAILED) {
    ::close(fd);
    ::shm_unlink(name.c_str());
    DTRAIN_THROW(CommError, "cannot map shared memory {}: {}", name, std::strerror(err));
  }
  std::unique_ptr<Segment> seg(new Segment(name, layout, static_cast<char*>(p), true, fd));
  // ftruncate zero-fills: every flag starts at 0. Construct the atomics in place, then publish the header.
  Header& h = *new (p) Header{};
  for (Flag* f : seg->allFlags()) new (f) Flag{};
  h.nranks = static_cast<uint32_t>(layout.n);
  h.slotBytes = layout.slotBytes;
  h.p2pBytes = layout.p2pBytes;
  h.totalBytes = layout.total;
  h.version = kVersion;
  std::atomic_thread_fence(std::memory_order_release);
  h.magic = kMagic;
  return seg;
}

std::unique_ptr<Segment> Segment::attach(const std::string& name, const Layout& layout) {
  int fd = ::shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0);
  DTRAIN_CHECK_AS(CommError, fd >= 0, "cannot open shared memory {}: {} (did rank 0 give up?)", name,
                  std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) != layout.total) {
    ::close(fd);
    DTRAIN_THROW(CommError, "shared memory {} has {} bytes, expected {}: ranks disagree on the group or tuning",
                 name, static_cast<long long>(st.st_size), layout.total);
  }
  void* p = ::mmap(nullptr, layout.total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int err = errno;
  ::close(fd);
  DTRAIN_CHECK_AS(CommError, p != MAP_FAILED, "cannot map shared memory {}: {}", name, std::strerror(err));
  std::unique_ptr<Segment> seg(new Segment(name, layout, static_cast<char*>(p), false, -1));
  const Header& h = seg->header();
  DTRAIN_CHECK_AS(CommError,
                  h.magic == kMagic && h.version == kVersion && h.nranks == static_cast<uint32_t>(layout.n) &&
                      h.slotBytes == layout.slotBytes && h.p2pBytes == layout.p2pBytes,
                  "shared memory {} does not match this group (ranks disagree on size or DTRAIN_SHM_* tuning)",
                  name);
  return seg;
}

std::vector<Flag*> Segment::allFlags() {
  std::vector<Flag*> out;
  out.push_back(&header().attached);
  out.push_back(&header().abort.flag);
  for (int r = 0; r < layout_.n; ++r) out.push_back(&phase(r));
  for (int s = 0; s < layout_.n; ++s)
    for (int d = 0; d < layout_.n; ++d) {
      out.push_back(&head(s, d));
      out.push_back(&tail(s, d));
    }
  return out;
}

std::string newSegmentName() {
  std::random_device rd;
  return fmt::format("/{}{}-{:08x}{:08x}", kPrefix, ::getpid(), rd(), rd());
}

int removeStaleSegments() {
  DIR* dir = ::opendir("/dev/shm");
  if (dir == nullptr) return 0;
  const std::string prefix = kPrefix;
  int removed = 0;
  while (dirent* e = ::readdir(dir)) {
    const std::string name = "/" + std::string(e->d_name);
    if (name.compare(1, prefix.size(), prefix) != 0) continue;
    const int fd = ::shm_open(name.c_str(), O_RDONLY | O_CLOEXEC, 0);
    if (fd < 0) continue;  // gone meanwhile, or another user's
    struct stat st {};
    // Sized, so locked by its creator first; the lock taken here: that creator is gone.
    if (::fstat(fd, &st) == 0 && st.st_size > 0 && ::flock(fd, LOCK_EX | LOCK_NB) == 0 &&
        ::shm_unlink(name.c_str()) == 0)
      ++removed;
    ::close(fd);
  }
  ::closedir(dir);
  return removed;
}

}  // namespace dtrain::comm::shm
