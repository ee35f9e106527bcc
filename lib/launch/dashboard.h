// `dtrain run --dashboard PORT`: a live page of the run, served by the agent on the same Boost.Beast server as
// /metrics (http_server.h): per rank the loss against the step and the throughput against time, this node's state
// (round, restarts, running workers, heartbeat ages of the other nodes, worker exits), the last events (failed
// rounds, restarts) and, on a node that hosts parameter servers, a section per server (the dtrain_ps_* figures of
// /metrics: requests/s and requests by op, updates applied, bytes, errors, live and lost workers, staleness mean,
// p90 and max, with requests/s and the staleness p90 against time). The page polls a JSON endpoint every second and draws with Chart.js from Debian's
// libjs-chart.js, served from the local file: nothing is fetched from the network.
//
// Endpoints (on the agent's monitoring server):
//   /dashboard            the page (HTML + a short script)
//   /dashboard/chart.js   Chart.js, read from /usr/share/javascript/chart.js/chart.min.js (404 naming the Debian
//                         package when it is missing: the page then says so instead of drawing)
//   /dashboard/data.json  {"job","run_id","node","round","restarts","nodes","world_size","workers_running",
//                          "heartbeat_age_seconds":[...],"worker_exits":{"code":n},"events":[{"time","text"}],
//                          "ranks":[{"rank","step","epoch","loss","learning_rate","samples_per_second",
//                                    "age_seconds","history":{"time":[],"step":[],"loss":[],"samples_per_second":[]}}],
//                          "servers":[{"rank","server","requests_by_op":{"push":n,...},"request_rate_by_op":{"push":r},
//                                      "requests_per_second","errors","updates","updates_per_second","received_bytes",
//                                      "sent_bytes","workers","workers_live","workers_lost",
//                                      "staleness":{"count","mean","p90","max"},
//                                      "history":{"time":[],"requests_per_second":[],"staleness_p90":[]}}]}
//                         Counters are cumulative since the server started; the per-op and update rates are over
//                         the last sampling interval (null / absent before the second sample); staleness mean and
//                         p90 are null before any push was answered in async/ssp (sync has none), p90 interpolated
//                         in the histogram's buckets as Prometheus' histogram_quantile does.
//
// History: a sampler thread reads the workers' shared blocks (through the MetricsHub) once per `interval` and
// appends a point per rank whose step moved and a point per parameter server; at kMaxPoints per rank every other point is dropped, so the whole
// run stays visible at a coarser grain. Cost: reading a few 4 KiB blocks per second, off the training path.
// Thread-safety: all members are safe from any thread; the handler never blocks on a worker or the store.
#pragma once

#include <chrono>
#include <cstdint>
#include <condition_variable>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "lib/launch/http_server.h"

namespace dtrain::launch {

class MetricsHub;

inline constexpr const char* kChartJsPath = "/usr/share/javascript/chart.js/chart.min.js";

// The q-quantile (0..1) of a parameter server's staleness histogram (`buckets`: counts per bucket, not cumulative,
// of PsServerMetrics::kStalenessBounds and +Inf), interpolated linearly inside the bucket it falls in, as
// Prometheus' histogram_quantile: the +Inf bucket answers the highest finite bound, the first bucket (bound 0)
// answers 0. NaN when the histogram is empty, q is outside [0, 1] or `buckets` has the wrong size.
double histogramQuantile(double q, const std::vector<uint64_t>& buckets);

class Dashboard {
 public:
  static constexpr size_t kMaxPoints = 2000;

  Dashboard(const MetricsHub& hub, std::string job, std::string runId,
            std::chrono::milliseconds interval = std::chrono::seconds(1));
  ~Dashboard();  // stops the sampler
  Dashboard(const Dashboard&) = delete;
  Dashboard& operator=(const Dashboard&) = delete;

  // The answer for a /dashboard... target, or nullopt when `target` is not one of its endpoints.
  std::optional<HttpResponse> handle(std::string_view target) const;
  // /dashboard/data.json's body.
  std::string dataJson() const;
  // Takes one sample now (the sampler thread calls it; tests too).
  void sample();

 private:
  struct History {
    std::vector<double> time, step, loss, samplesPerSecond;
  };
  struct ServerHistory {
    std::vector<double> time, requestsPerSecond, stalenessP90;  // stalenessP90: NaN (null) while empty
    double lastTime = 0;
    std::map<std::string, uint64_t> lastByOp;
    uint64_t lastUpdates = 0;
    std::map<std::string, double> rateByOp;  // over the last interval
    double updatesPerSecond = 0;
  };
  void loop();

  const MetricsHub& hub_;
  std::string job_;
  std::string runId_;
  std::chrono::milliseconds interval_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::map<int, History> history_;  // by rank
  std::map<int, ServerHistory> servers_;  // by rank
  std::thread thread_;
};

}  // namespace dtrain::launch
