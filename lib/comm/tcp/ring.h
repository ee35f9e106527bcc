// The pipelined ring engine behind the TCP backend's bandwidth algorithms.
//
// A ring algorithm is a list of steps. In each step a rank sends a span to its right neighbour and receives
// a span from its left one; a received span either lands directly in its final place (all-gather, broadcast)
// or is combined with local data (`out = with op received`, reduce-scatter). The data sent in step t is
// usually what was received and combined in step t-1, so waiting for whole steps would leave the link idle
// while reducing and the CPU idle while receiving. Instead the engine streams: the receive side is cut into
// `chunkBytes` pieces, each piece is combined as soon as it is complete (while it is still in cache), and the
// send side of a dependent step may transmit byte o as soon as the step it depends on has finished piece
// containing o. Sending, receiving and reducing therefore overlap across the whole operation, and the kernel
// socket buffers keep both directions busy. One thread drives it with non-blocking sockets and poll(2).
//
// Ring all-reduce = n-1 reduce-scatter steps + n-1 all-gather steps over n segments: each rank sends and
// receives 2(n-1)/n of the buffer, the bandwidth optimum. Every element's final value is computed once (by the
// segment's owner) and then copied, so all ranks end bitwise identical.
#pragma once

#include <cstddef>
#include <vector>

#include "lib/comm/tcp/conn.h"
#include "lib/comm/types.h"

namespace dtrain::comm::tcp {

struct RingStep {
  const char* send = nullptr;  // bytes to send to the right neighbour this step (sendLen of them)
  size_t sendLen = 0;
  // Send byte o only once step `sendAfter` has finished (received, combined) its bytes up to o; -1: free.
  int sendAfter = -1;
  size_t recvLen = 0;
  char* recvInto = nullptr;      // direct receive: bytes land here
  const char* combineWith = nullptr;  // else combine: combineOut = combineWith op received
  char* combineOut = nullptr;
  int divisor = 1;  // divide the combined result (kAvg's last step)
};

struct RingPlan {
  Conn* right = nullptr;  // sends go here
  Conn* left = nullptr;   // receives come from here (may be the same Conn)
  DType dtype = DType::kFloat32;
  ReduceOp op = ReduceOp::kSum;
  size_t chunkBytes = 256 << 10;  // multiple of 64 bytes
  char* staging = nullptr;        // chunkBytes of scratch for combine steps
  std::vector<RingStep> steps;
};

// Runs every step to completion. Throws CommError (peer lost, timeout) through the waiter.
void runRing(const RingPlan& plan, Waiter& waiter);

// Splits `count` elements into `parts` contiguous segments as evenly as possible (earlier ones one larger).
struct Segment {
  size_t offset;  // in elements
  size_t count;
};
std::vector<Segment> splitEvenly(size_t count, int parts);

}  // namespace dtrain::comm::tcp
