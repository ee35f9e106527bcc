// What `dtrain sim` measured, and how (docs/sim.md "Report").
//
// Inputs: the per-worker sample logs (DTRAIN_SAMPLE_LOG: one JSON line per optimizer step with round, rank,
// world, epoch, step, wall-clock time `t` and the sample indices), the timestamped agent events the sim saw
// (re-formations, restarts), the fault schedule as applied, and the link counters.
//
// "Seen once": the samples that make up the final model's training. A round (a rendezvous round: restarts and
// re-formations alike) that is followed by another one resumed from a checkpoint and redid the steps after it;
// the steps of a round at or after the next round's first step are discarded ("steps redone", reported apart).
// What is left is the training history of the final model. In it, per epoch, a sample trained twice is
// "repeated", except the sampler's padding (a fixed world of W ranks pads an epoch of N samples with the epoch's
// first (W - N mod W) mod W samples, PyTorch's DistributedSampler rule; the workers log those apart as "pad");
// in every epoch that the run went past (a later epoch has steps), a sample of the dataset that was
// never trained is "skipped", except those data.drop_last leaves out (the tail of the epoch that does not fill a
// whole round of the world, then each rank's last partial batch: PyTorch's DistributedSampler and DataLoader
// drop_last; the workers log those on the epoch's last step as "drop", and they are counted as "dropped"). The last
// epoch is checked for repeats only (max_steps may end it early), unless it holds every sample.
//
// Times are seconds since the sim started the initial agents. Detection: from the fault to the first agent
// (other than the faulted node) reporting a re-formation or a restart. Recovery: from the fault to the first
// optimizer step of a later round; when no new round formed (a freeze shorter than the heartbeat timeout), from
// the fault's end to the first step after it.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "lib/launch/sim_faults.h"

namespace dtrain::launch {

struct SampleStep {
  int round = 0;
  int rank = 0;
  int world = 1;
  int64_t epoch = 0;
  int64_t step = 0;
  double t = 0;  // seconds since the sim started
  std::vector<int64_t> idx;
  std::vector<int64_t> pad;  // the sampler's padding in this step: repeats by design, not counted as repeated
  std::vector<int64_t> drop;  // samples drop_last left out of the epoch (on its last step): not counted as skipped
  // A line of an epoch that took no step ("steps": 0: with drop_last every rank's share of it was smaller than one
  // batch): `step` is the steps done before it, `idx` is empty; only its `drop` counts.
  bool emptyEpoch = false;
};

// Reads every samples-*.jsonl under `dir` (a missing folder is no steps); `t0` is the sim's start (unix seconds).
std::vector<SampleStep> readSampleLogs(const std::string& dir, double t0);

struct SimAgentEvent {
  double t = 0;
  int node = 0;
  std::string what;  // "re-form" | "restart" | "exit N" | "start"
};

struct SimLinkBytes {
  uint64_t toNode = 0, fromNode = 0;
};

struct SimFaultResult {
  SimFault fault;
  std::optional<double> detection, recovery;  // seconds
  int64_t stepsRedone = 0;
};

struct SimThroughput {
  int nodes = 0;
  int world = 0;
  double samplesPerSec = 0;
  double seconds = 0;  // measured over
  double efficiency = 0;  // (samples/s per node) / (samples/s per node at the smallest node count measured)
};

struct SimAudit {
  int64_t datasetSize = 0;  // 0: unknown (no skipped count)
  int64_t stepsKept = 0, stepsRedone = 0, samplesTrained = 0, repeated = 0, skipped = 0;
  int64_t padding = 0;  // padding entries of the kept steps (PyTorch's DistributedSampler rule), in samplesTrained
  int64_t dropped = 0;  // samples drop_last left out of the epochs checked, per the kept steps (not in samplesTrained)
  int epochsChecked = 0, epochsComplete = 0;
  int rounds = 0;
  // Epochs (0-based) of the final history that took no step: with data.drop_last every rank's share of them was
  // smaller than one batch (SampleStep::emptyEpoch); their samples are in `dropped`.
  std::set<int64_t> emptyEpochs;
};

struct SimReport {
  int nodes = 0, nprocPerNode = 1;
  std::string network;  // "namespaces, 1gbit links" / "loopback (no namespaces: not root)"
  double seconds = 0;
  int exitCode = 0;
  bool haveSamples = false;
  SimAudit audit;
  std::vector<SimThroughput> throughput;
  std::vector<SimFaultResult> faults;
  std::vector<SimLinkBytes> links;  // per node; empty on loopback
  std::vector<std::pair<double, double>> samplesPerSecOverTime;  // (t, samples/s) per second
};

// Fills audit, throughput, faults (detection/recovery/steps redone) and the time series from the inputs.
void analyseSim(SimReport& report, const std::vector<SampleStep>& steps, const std::vector<SimAgentEvent>& events,
                const std::vector<SimFault>& faults, int nprocPerNode);

// The report as JSON (written to OUTPUT_DIR/sim.json for scripts: benchmarks read the link bytes from it).
std::string simReportJson(const SimReport& report);
// The table printed at the end of a sim.
std::string formatSimReport(const SimReport& report);
// The same as an SVG chart / HTML page (lib/launch/plot.h), written to `path` by its extension. Throws UsageError
// for another extension, Error when the file cannot be written.
void writeSimReport(const SimReport& report, const std::string& path);

}  // namespace dtrain::launch
