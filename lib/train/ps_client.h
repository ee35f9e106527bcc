// A worker's side of the parameter-server protocol (ps_protocol.h): one connection and one I/O thread per server,
// so requests to different servers run in parallel while each connection keeps its strict request/reply order.
//
// pushPullAsync() queues "push this gradient slice, write the parameters the server answers into this slice"; the
// trainer's thread keeps back-propagating meanwhile (the overlap DDP gets from its buckets). wait() blocks until
// everything queued finished and rethrows the first failure (CommError naming the server, e.g. a server that died
// or an error reply). Buffers handed to a queued request must stay alive and untouched until wait() returns.
// Thread-safety: one thread (the trainer's) calls the methods; the I/O threads are internal.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "lib/common/socket.h"
#include "lib/train/ps_protocol.h"

namespace dtrain::train::ps {

struct ClientOptions {
  int workerRank = 0;
  int workers = 1;
  size_t numParams = 0;
  size_t partitionFloats = kMaxPartitionFloats;
  std::vector<std::string> servers;  // "host:port" of server 0, 1, ...
  std::chrono::milliseconds timeout{std::chrono::minutes(5)};
};

// What the last replies said about the other workers: the worker's clock minus the slowest live worker's.
struct ClientTraffic {
  uint64_t bytesSent = 0;      // payload + headers
  uint64_t bytesReceived = 0;
  uint64_t requests = 0;
};

class Client {
 public:
  // Connects to every server and says hello (blocking; CommError when a server cannot be reached or refuses).
  explicit Client(ClientOptions options);
  ~Client();  // lets each lane finish its queued requests, then joins its thread; says no bye (call bye() first)
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  const std::vector<Partition>& partitions() const { return plan_; }

  // Queues a push of `grad` (the partition's count floats) for `step` at `lr`; the answer lands in `params`.
  // `samples` >= 0 sends it as kPushPullCounted: the server adds `samples` (the step's training samples on this
  // worker) to this worker's tally once it applied the gradient (ps_protocol.h).
  void pushPullAsync(uint32_t partition, int64_t step, double lr, const float* grad, float* params,
                     int64_t samples = -1);
  // Queues a pull (after init; sync mode waits until the partition reached `step`) into `params`.
  void pullAsync(uint32_t partition, int64_t step, float* params);
  // Sends one partition's initial state (worker 0): `payload` as ps_protocol.h's kInit describes. Blocking.
  void init(uint32_t partition, int64_t step, const std::vector<uint8_t>& payload);
  // Fetches one partition's steps, params and optimizer state (blocking): the kFetch reply payload as floats.
  std::vector<float> fetch(uint32_t partition);
  // Sparse tables (ps_sparse.h, ps_protocol.h's kSparse* ops) on `server`, the holder of the rows' range.
  // Queues a pull of the distinct rows `ids` (sync mode: once the table reached `step`) into out (ids x dim floats).
  void sparsePullAsync(uint32_t table, int server, int64_t step, std::vector<int64_t> ids, float* out);
  // Queues a push of the distinct rows' gradient (ids x dim floats) for `step` at `lr` (sync: returns once applied).
  void sparsePushAsync(uint32_t table, int server, int64_t step, double lr, std::vector<int64_t> ids,
                       std::vector<float> grads);
  // Blocking: a window of the server's rows: i64 steps (2 floats), values, then each state buffer's window.
  std::vector<float> sparseFetch(uint32_t table, int server, int64_t firstRow, int64_t rows);
  // Blocking: restores a window (`floats`: values then each state buffer, rows x dim each) and the step count.
  void sparseInit(uint32_t table, int server, int64_t step, int64_t firstRow, int64_t rows, int64_t steps,
                  std::span<const float> floats);
  // Blocking, every server in parallel: each writes its rows of every table (ps_protocol.h's kSparseSave):
  // `exported` false into the checkpoint staging dir of (dir, step, token) with their optimizer state, true into
  // dir/model-<k>-of-<S>.safetensors. CommError naming the server that failed.
  void sparseSave(bool exported, const std::string& dir, int64_t step, const std::string& token);
  // Blocking, every server in parallel: each reads the rows it holds from `files` (kSparseLoad).
  void sparseLoad(const std::vector<std::string>& files, bool withState, int64_t step);
  // Blocking: the workers' barrier number `count` (1, 2, ...) on server 0, which answers once every live worker
  // reached it (ps_protocol.h's kBarrier): a worker that died does not hold the others. CommError on timeout.
  // Returns server 0's tally of every worker's applied counted pushes (WorkerTally, by worker rank).
  std::vector<WorkerTally> barrier(int64_t count);
  // Blocking, every server but server 0 in parallel: each one's tally (kTally), once none of the workers in `gone`
  // (those server 0's barrier found lost or finished) is connected to it. Entry k is server k's; entry 0 is left
  // empty (server 0's comes with barrier()). CommError naming the server that failed or timed out.
  std::vector<std::vector<WorkerTally>> otherTallies(const std::vector<int32_t>& gone);
  // Blocks until every queued request finished; rethrows the first failure.
  void wait();
  // Tells every server this worker is done (blocking, errors ignored: the job is over).
  void bye();

  // Staleness seen in the replies since the last call: min/mean/max of (own step + 1 - slowest clock), and how many.
  struct Staleness {
    int64_t min = 0, max = 0;
    double sum = 0;
    int64_t count = 0;
  };
  Staleness takeStaleness();
  ClientTraffic traffic() const;

 private:
  struct Lane;
  // Runs one request on `lane`'s connection; returns the reply header, the payload read into `into` (bytes).
  // `trailer` (trailerBytes, counted in h.bytes) is sent after `payload`.
  ReplyHeader roundTrip(Lane& lane, const RequestHeader& h, const void* payload, void* into, size_t intoBytes,
                        const void* trailer = nullptr, size_t trailerBytes = 0);
  // Runs one request whose reply may have any size; returns the reply payload.
  std::vector<float> exchange(Lane& lane, const RequestHeader& h, const std::vector<uint8_t>& payload);
  void enqueue(int server, std::function<void(Lane&)> task);

  ClientOptions options_;
  std::vector<Partition> plan_;
  std::vector<std::unique_ptr<Lane>> lanes_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int64_t pending_ = 0;
  std::string failure_;
  Staleness staleness_;
  ClientTraffic traffic_;
};

}  // namespace dtrain::train::ps
