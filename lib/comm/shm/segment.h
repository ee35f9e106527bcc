// The POSIX shared-memory segment one shm communicator works in, and its layout.
//
// Lifetime (no leaks in /dev/shm, even after a crash): rank 0 creates "/dtrain-shm-<pid>-<random>",
// publishes the name through the store, and unlinks it as soon as every rank has mapped it; from then on the
// memory lives exactly as long as some rank maps it, and the kernel frees it when the last one exits, however
// it exits. Only a crash of rank 0 inside that short setup window can leave a name behind; the next creator
// on the machine removes the names whose creator is gone: rank 0 holds an flock(2) on the segment from before it
// sizes it until it unlinks it, so a sized segment whose lock can be taken has no creator any more. A lock, not the
// pid in the name: a creator in another pid namespace sharing /dev/shm (containers with --ipc=host) is never taken
// for a dead one, and a reused pid never keeps a dead one's name.
//
// Layout, 4 KiB aligned: header | per-rank phase flags (128-byte stride: no false sharing, also not with the
// adjacent-line prefetcher) | per-pair p2p head/tail flags | in[rank][2 slots] | res[2 slots] | p2p rings.
// Thread-safety: the mapping is shared; what is written where is the backend's protocol (shm_backend.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lib/comm/shm/sync.h"

namespace dtrain::comm::shm {

struct Header {
  uint64_t magic;
  uint32_t version;
  uint32_t nranks;
  uint64_t slotBytes;
  uint64_t p2pBytes;
  uint64_t totalBytes;
  Flag attached;  // ranks other than the creator that mapped the segment
  AbortState abort;
};

struct Layout {
  Layout(int nranks, size_t slotBytes, size_t p2pBytes);
  int n;
  size_t slotBytes;
  size_t p2pBytes;  // power of two
  size_t phaseOffset, pairOffset, inOffset, resOffset, p2pOffset, total;
};

class Segment {
 public:
  // Creates (O_EXCL) and initialises a segment. Throws CommError.
  static std::unique_ptr<Segment> create(const std::string& name, const Layout& layout);
  // Maps an existing segment and checks it matches `layout`. Throws CommError.
  static std::unique_ptr<Segment> attach(const std::string& name, const Layout& layout);
  ~Segment();  // unmaps (and unlinks when still linked and created here)
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;

  // Removes the name; the mapping stays valid. Idempotent.
  void unlink();
  const std::string& name() const { return name_; }

  Header& header() { return *reinterpret_cast<Header*>(base_); }
  Flag& phase(int r) { return *reinterpret_cast<Flag*>(base_ + layout_.phaseOffset + 128 * static_cast<size_t>(r)); }
  Flag& head(int src, int dst) { return pairFlag(src, dst, 0); }  // bytes written src -> dst
  Flag& tail(int src, int dst) { return pairFlag(src, dst, 1); }  // bytes read by dst
  char* in(int r, int slot) {
    return base_ + layout_.inOffset + (static_cast<size_t>(r) * 2 + static_cast<size_t>(slot)) * layout_.slotBytes;
  }
  char* res(int slot) { return base_ + layout_.resOffset + static_cast<size_t>(slot) * layout_.slotBytes; }
  char* ring(int src, int dst) {
    return base_ + layout_.p2pOffset + (static_cast<size_t>(src) * static_cast<size_t>(layout_.n) +
                                        static_cast<size_t>(dst)) * layout_.p2pBytes;
  }
  // Every flag, for abort wake-ups.
  std::vector<Flag*> allFlags();
  const Layout& layout() const { return layout_; }

 private:
  Segment(std::string name, const Layout& layout, char* base, bool owner, int lockFd);
  Flag& pairFlag(int src, int dst, int which) {
    return *reinterpret_cast<Flag*>(base_ + layout_.pairOffset +
                                    ((static_cast<size_t>(src) * static_cast<size_t>(layout_.n) +
                                      static_cast<size_t>(dst)) * 2 + static_cast<size_t>(which)) * 128);
  }

  std::string name_;
  Layout layout_;
  char* base_;
  bool linked_;     // created here and not unlinked yet
  int lockFd_ = -1;  // created here: holds the creator's flock until unlink()
};

// "/dtrain-shm-<pid>-<random>".
std::string newSegmentName();
// Unlinks the /dev/shm/dtrain-shm-* segments whose creator is gone (a crash inside the setup window): those sized
// (a segment of 0 bytes may be one whose creator has not locked and sized it yet) whose flock this call can take.
// Never throws; returns how many it unlinked.
int removeStaleSegments();

}  // namespace dtrain::comm::shm
