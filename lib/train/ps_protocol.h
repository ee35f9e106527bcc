// The parameter server's wire protocol between worker ranks and server ranks (docs/parameter_server.md), and the
// partitioning of the parameter arena over the servers.
//
// Partitions (BytePS): the flat parameter arena is cut into contiguous slices of at most kMaxPartitionFloats
// floats (4 MiB) and at most ceil(numParams / servers) floats (so every server gets work even for a small model),
// rounded to 16 floats; partition i lives on server i % servers. The optimizer is elementwise, so a slice of it
// per partition on the servers updates exactly what one optimizer over the arena would.
//
// Transport: one TCP connection per (worker, server), opened by the worker to the address the server published in
// the store under `<run prefix>r<round>/ps/server/<k>`. Requests and replies strictly alternate on a connection.
// Every field is little-endian (the only byte order dtrain runs on; static_assert in ps_protocol.cpp).
//
//   request  (40 bytes): u32 magic "DPS1" | u8 op | u8[3] zero | u32 partition | i64 step | f64 lr | u64 bytes
//   reply    (40 bytes): u32 magic "DPS1" | u8 status | u8[3] zero | u32 partition | i64 version | i64 min_clock |
//                        u64 bytes
// followed by `bytes` of payload. status 0 is OK; status 1 is an error whose payload is the message text (UTF-8).
//
//   op        request payload                                          OK reply payload
//   kHello    i32 worker rank, i32 workers, u64 params, u64 partition   -
//             floats (both sides computed the same plan, or error)
//   kInit     u64 optimizer steps, u32 ranges, ranges x (u64 offset,    -    (worker 0 only: the partition's
//             u64 count) without weight decay (relative to the               parameters, optimizer state and
//             partition), params, then each optimizer state buffer           step count, e.g. from a checkpoint)
//   kPushPull the partition's gradient for `step` (count floats) at `lr`  the partition's parameters afterwards
//   kPushPullCounted  as kPushPull, then u64 samples: the training     as kPushPull
//             samples of the worker's step (its micro-batches), which the server counts for that worker once the
//             gradient is applied (async/ssp: on arrival; sync: when the step's average is applied). A refused
//             push (wrong size, wrong step, a broken sync step) or one whose payload never fully arrived counts
//             nothing. Async/ssp workers send every partition of a step this way: a server tallies a worker's step
//             as whole once it applied all of its own partitions of that step, and keeps the step it applied only
//             some of as partial (WorkerTally), so the servers' tallies together (mergeTallies) say exactly what
//             was applied of each worker's steps, a step applied on some servers and not others included.
//   kPull     - (waits until initialised and, in sync mode, version >=    the partition's parameters
//             step)
//   kFetch    -                                                       u64 steps, params, each state buffer
//   kBye      - (this worker is done)                                   -
//
// Sparse tables (ps_sparse.h; `partition` is the table's index, rows are the server's row range of it):
//   kSparsePull  u64 n, n x i64 distinct rows (sync mode: waits until     n x dim floats, the rows
//                the table reached `step`)
//   kSparsePush  u64 n, n x i64 distinct rows, n x dim floats of their    -   (sync: once every worker pushed
//                gradient, for `step` at `lr`                                  `step`, their average is applied)
//   kSparseFetch i64 first row, i64 rows (a window of the server's range) i64 steps, rows x dim values, then each
//                                                                          state buffer's rows x dim floats
//   kSparseInit  i64 first row, i64 rows, i64 steps, the values and        -   (worker 0, from a checkpoint)
//                state buffers as kSparseFetch answers them
//   kBarrier     - (`step`: the worker's barrier count, 1, 2, ...)       once every live worker reached barrier
//                                                                          `step` (a worker that left counts as
//                                                                          arrived; server 0 only): its tally
//                                                                          (encodeTallies: per worker 6 x i64)
//   kTally       u32 n, n x i32 worker ranks that left (server 0's     this server's tally (as kBarrier's)
//                barrier reply: lost or finished); the server first
//                waits until none of them is connected here (their
//                pushes that arrived are applied), up to its timeout
//   kSparseSave  u8 kind (0: checkpoint, 1: exported model), u32 n,     -   once the server's file is durable
//                n bytes of a directory (the checkpoint root, or the
//                model's output dir), u32 m, m bytes of the checkpoint's
//                staging token (kind 0); `step`: the checkpoint's step.
//                The server writes its rows of every table (sparse_shards.h): kind 0 with their optimizer state into
//                the staging dir as sparse-<k>-of-<S>.safetensors (lib/ckpt's protocol: the commit checks it),
//                kind 1 as <dir>/model-<k>-of-<S>.safetensors.
//   kSparseLoad  u8 with_state, u32 files, files x (u32 n, n bytes of    -   (worker 0: a resume or init.from)
//                a path): the server reads the rows it holds of every
//                table from those files (any server count wrote them);
//                `step`: the training step the tables are at.
// kBarrier is how async/ssp workers meet (checkpoints, the end) without a collective among themselves, so a
// worker that died does not stop the others (docs/parameter_server.md "Failures").
// Fetch and init go in windows of at most kMaxPartitionFloats floats per buffer, so payloads stay bounded.
//
// Validation and errors: a frame with a bad magic, an unknown op or a payload above kMaxPayloadBytes closes that
// one connection (the peer is not speaking this protocol); a well-framed request that is wrong for its partition
// (unknown partition, a gradient of the wrong size, a push for a step that is not the partition's current one in
// sync mode) is answered with an error reply naming what was expected, its payload is discarded, and the server
// keeps serving this worker and the others. The client turns an error reply into a CommError.
// `min_clock` is the slowest live worker's clock (steps it has pushed) on that server: a worker's staleness is its
// own clock minus min_clock.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "lib/common/clock.h"

namespace dtrain::train::ps {

inline constexpr uint32_t kMagic = 0x31535044;  // "DPS1" little-endian
inline constexpr size_t kMaxPartitionFloats = size_t{1} << 20;  // 4 MiB of float32 (BytePS's partition size)
// The largest payload a server reads: an init of the largest partition with Adam's amsgrad state (4 arenas), its
// no-decay ranges, and headroom. Anything larger is not this protocol.
inline constexpr uint64_t kMaxPayloadBytes = 5 * kMaxPartitionFloats * sizeof(float) + (uint64_t{1} << 20);

enum class Op : uint8_t {
  kHello = 1,
  kInit = 2,
  kPushPull = 3,
  kPull = 4,
  kFetch = 5,
  kBye = 6,
  kSparsePull = 7,
  kSparsePush = 8,
  kSparseFetch = 9,
  kSparseInit = 10,
  kBarrier = 11,
  kSparseSave = 12,
  kSparseLoad = 13,
  kPushPullCounted = 14,
  kTally = 15,
};
const char* opName(Op op);
bool validOp(uint8_t op);

struct RequestHeader {
  Op op = Op::kHello;
  uint32_t partition = 0;
  int64_t step = 0;
  double lr = 0;
  uint64_t bytes = 0;
};

struct ReplyHeader {
  bool ok = true;
  uint32_t partition = 0;
  int64_t version = 0;
  int64_t minClock = 0;
  uint64_t bytes = 0;
};

inline constexpr size_t kHeaderBytes = 40;

// Encoding (exactly kHeaderBytes) and decoding. decode* throw ProtocolError on a bad magic, unknown op or status,
// non-zero reserved bytes, or a payload above kMaxPayloadBytes.
void encode(const RequestHeader& h, uint8_t* out);
void encode(const ReplyHeader& h, uint8_t* out);
RequestHeader decodeRequest(const uint8_t* in);
ReplyHeader decodeReply(const uint8_t* in);

// Blocking I/O of a whole header or payload on a socket. send* throw CommError on a failed write; recv* throw
// CommError naming `peer` when the connection closes or the deadline passes ("<peer> closed the connection",
// "<peer> did not answer in time", "<peer>: <strerror>"; peer: "parameter server 0 (host:port)"). recvPayload discards `bytes` when
// `into` is null.
// `trailer` (trailerBytes) follows the payload on the wire (kPushPullCounted's sample count after the gradient);
// the header's byte count covers both.
void sendFrame(int fd, const uint8_t* header, const void* payload, size_t payloadBytes, const std::string& peer,
               const void* trailer = nullptr, size_t trailerBytes = 0);
void recvBytes(int fd, void* into, size_t bytes, const Deadline& deadline, const std::string& peer);

// One worker in a server's tally (kBarrier's and kTally's reply): what the server applied of the worker's
// kPushPullCounted pushes, and whether the worker is still there. Encoded as six little-endian i64 (samples,
// steps, state, partitions, partialPartitions, partialSamples).
struct WorkerTally {
  enum class State : int64_t {
    kLive = 0,      // connected and not done
    kFinished = 1,  // said bye
    kLost = 2,      // its connection closed without bye (killed, crashed, a network failure)
    kAbsent = 3,    // never said hello to this server
  };
  int64_t samples = 0;  // training samples of the whole steps
  int64_t steps = 0;    // whole steps: all of the server's partitions of the step applied (steps of this run: a
                        // resumed run counts from 0)
  State state = State::kAbsent;
  int64_t partitions = 0;         // the server's partitions per step (merged: every server's)
  int64_t partialPartitions = 0;  // of the step after `steps`: the partitions applied, when not all (0: none)
  int64_t partialSamples = 0;     // that step's samples (not in `samples`)
};
inline constexpr size_t kWorkerTallyBytes = 48;
std::vector<uint8_t> encodeTallies(const std::vector<WorkerTally>& tallies);
// ProtocolError when `bytes` is not a whole number of entries or a state is unknown.
std::vector<WorkerTally> decodeTallies(const void* data, size_t bytes);
// Every server's tally (byServer[k][w]: server k's of worker w, every list of the same length) as one: per worker
// the steps every server applied whole (the fewest over the servers; a worker sends a step's pushes only after the
// previous step's were all answered, so the servers' counts differ by at most that one step) with their samples,
// and that next step when some server applied part or all of its partitions of it: partialPartitions of
// `partitions` (every server's) and its samples. State: lost when any server lost the worker, else server 0's.
// ProtocolError when the lists differ in length.
std::vector<WorkerTally> mergeTallies(const std::vector<std::vector<WorkerTally>>& byServer);

struct Partition {
  size_t offset = 0;  // in the parameter arena, floats
  size_t count = 0;
  int server = 0;
};

// The plan described above; `maxFloats` is kMaxPartitionFloats except in tests.
std::vector<Partition> planPartitions(size_t numParams, int servers, size_t maxFloats = kMaxPartitionFloats);

// The key a server publishes its "host:port" under, inside the round's prefix.
std::string serverKey(int server);

}  // namespace dtrain::train::ps
