#include "lib/launch/dashboard.h"

#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "lib/launch/metrics_hub.h"

namespace dtrain::launch {

namespace {

double unixSeconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// The page: a title, this node's state, two charts, a table per rank and the last events. The script polls
// data.json every second and redraws; #rendered's data-points counts the points Chart.js laid out (what a test in
// a headless browser reads back).
constexpr const char* kPage = R"html(<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dtrain dashboard</title>
<script src="/dashboard/chart.js"></script>
<style>
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .3em 0; }
#status { color: #555; margin-bottom: .8em; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
.chart { width: 560px; height: 320px; }
table { border-collapse: collapse; margin: .8em 0; }
td, th { border: 1px solid #ccc; padding: .2em .6em; text-align: right; }
th { background: #f3f3f3; }
.stale { color: #b00; }
.waiting { color: #555; text-align: left; }
#events li { font-family: monospace; }
td.op { text-align: left; }
</style></head>
<body>
<h1 id="title">dtrain</h1>
<div id="status">waiting for the agent...</div>
<table id="node"></table>
<div class="charts">
  <div class="chart"><canvas id="loss"></canvas></div>
  <div class="chart"><canvas id="throughput"></canvas></div>
</div>
<table id="ranks"></table>
<div id="ps" hidden>
<h2 style="font-size:1.05em">Parameter servers</h2>
<div class="charts">
  <div class="chart"><canvas id="psrate"></canvas></div>
  <div class="chart"><canvas id="psstale"></canvas></div>
</div>
<table id="servers"></table>
</div>
<h2 style="font-size:1.05em">Events</h2>
<ul id="events"><li>none</li></ul>
<p id="rendered" data-points="0" data-polls="0" hidden></p>
<script>
"use strict";
const colors = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf'];
const haveChart = typeof Chart !== 'undefined';
let polls = 0;
function makeChart(id, xTitle, yTitle) {
  return new Chart(document.getElementById(id), {
    type: 'line', data: { datasets: [] },
    options: { animation: false, parsing: false, normalized: true, maintainAspectRatio: false,
               elements: { point: { radius: 0 } },
               scales: { x: { type: 'linear', title: { display: true, text: xTitle } },
                         y: { title: { display: true, text: yTitle } } },
               plugins: { title: { display: true, text: yTitle } } } });
}
const charts = haveChart ? { loss: makeChart('loss', 'step', 'training loss'),
                             throughput: makeChart('throughput', 'seconds', 'samples/s'),
                             psrate: makeChart('psrate', 'seconds', 'parameter-server requests/s'),
                             psstale: makeChart('psstale', 'seconds', 'staleness of the pushes (p90, steps)') } : null;
function setSeries(chart, ranks, xs, ys) {
  chart.data.datasets = ranks.map((r, i) => ({
    label: 'rank ' + r.rank, borderColor: colors[i % colors.length], borderWidth: 1.5,
    data: r.history[xs].map((x, k) => ({ x: xs === 'time' ? x - r.history.time[0] : x, y: r.history[ys][k] })) }));
  chart.update('none');
}
function setServerSeries(chart, servers, ys) {
  chart.data.datasets = servers.map((s, i) => ({
    label: 'server ' + s.server + ' (rank ' + s.rank + ')', borderColor: colors[i % colors.length], borderWidth: 1.5,
    data: s.history.time.map((t, k) => ({ x: t - s.history.time[0], y: s.history[ys][k] })) }));
  chart.update('none');
}
function cell(row, text, cls) { const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; return td; }
function num(v, digits) { return v === null ? '-' : v.toFixed(digits); }
function renderServers(servers) {
  document.getElementById('ps').hidden = servers.length === 0;
  const table = document.getElementById('servers');
  table.innerHTML = '<tr><th>server</th><th>rank</th><th>requests/s</th><th>requests by op: total (per s)</th>' +
                    '<th>updates applied</th><th>updates/s</th><th>MB in</th><th>MB out</th><th>errors</th>' +
                    '<th>workers live</th><th>lost</th><th>staleness mean</th><th>p90</th><th>max</th></tr>';
  for (const s of servers) {
    const tr = table.insertRow();
    tr.id = 'server-' + s.server;
    const field = (name, text, cls) => { cell(tr, text, cls).dataset.field = name; };
    field('server', s.server);
    field('rank', s.rank);
    field('requests_per_second', s.requests_per_second.toFixed(0));
    field('ops', Object.entries(s.requests_by_op).map(([op, n]) =>
        op + ': ' + n + ' (' + num(s.request_rate_by_op[op] ?? null, 0) + ')').join(', ') || '-', 'op');
    field('updates', s.updates);
    field('updates_per_second', num(s.updates_per_second, 0));
    field('received_mb', (s.received_bytes / 1e6).toFixed(1));
    field('sent_mb', (s.sent_bytes / 1e6).toFixed(1));
    field('errors', s.errors, s.errors > 0 ? 'stale' : '');
    field('workers_live', s.workers_live + ' of ' + s.workers);
    field('workers_lost', s.workers_lost, s.workers_lost > 0 ? 'stale' : '');
    field('staleness_mean', num(s.staleness.mean, 2));
    field('staleness_p90', num(s.staleness.p90, 1));
    field('staleness_max', s.staleness.count > 0 ? s.staleness.max : '-');
  }
}
function render(d) {
  // An agent in no round yet (waiting for the round to close, or an elastic job's spare) has no node rank, nodes or
  // world size: round is -1 and the others their defaults, which read as a second node 0 of round -1.
  const waiting = d.round < 0;
  document.getElementById('title').textContent = 'dtrain: ' + d.job + ' (run ' + d.run_id +
      (waiting ? ', agent in no round yet)' : ', node ' + d.node + ')');
  document.getElementById('status').textContent = haveChart ? 'live, refreshed every second'
      : 'Chart.js is not installed on the agent\'s machine (Debian package libjs-chart.js): curves are not drawn';
  const node = document.getElementById('node');
  node.innerHTML = '<tr><th>round</th><th>restarts</th><th>nodes</th><th>world size</th><th>workers running</th>' +
                   '<th>heartbeat age (s) by node</th><th>worker exits by code</th></tr>';
  const row = node.insertRow();
  if (waiting) {
    cell(row, 'none yet: waiting in the rendezvous (for the round to close, or as a spare for a later round)', 'waiting');
    [d.restarts, '-', '-', d.workers_running].forEach(v => cell(row, v));
  } else {
    [d.round, d.restarts, d.nodes, d.world_size, d.workers_running].forEach(v => cell(row, v));
  }
  cell(row, d.heartbeat_age_seconds.map((a, n) => n + ': ' + (a < 0 ? '-' : a.toFixed(1))).join(', ') || '-');
  cell(row, Object.entries(d.worker_exits).map(([c, n]) => c + ': ' + n).join(', ') || '-');
  const ranks = document.getElementById('ranks');
  ranks.innerHTML = '<tr><th>rank</th><th>step</th><th>epoch</th><th>loss</th><th>lr</th><th>samples/s</th>' +
                    '<th>last report (s ago)</th></tr>';
  for (const r of d.ranks) {
    const tr = ranks.insertRow();
    [r.rank, r.step, r.epoch + 1, r.loss === null ? '-' : r.loss.toPrecision(4), r.learning_rate.toPrecision(3),
     r.samples_per_second === null ? '-' : r.samples_per_second.toFixed(0)].forEach(v => cell(tr, v));
    cell(tr, r.age_seconds.toFixed(1), r.age_seconds > 10 ? 'stale' : '');
  }
  const events = document.getElementById('events');
  events.innerHTML = '';
  for (const e of d.events) {
    const li = document.createElement('li');
    li.textContent = new Date(e.time * 1000).toLocaleTimeString() + '  ' + e.text;
    events.appendChild(li);
  }
  if (!d.events.length) events.innerHTML = '<li>none</li>';
  renderServers(d.servers);
  let points = 0;
  if (charts) {
    setSeries(charts.loss, d.ranks, 'step', 'loss');
    setSeries(charts.throughput, d.ranks, 'time', 'samples_per_second');
    setServerSeries(charts.psrate, d.servers, 'requests_per_second');
    setServerSeries(charts.psstale, d.servers, 'staleness_p90');
    for (const c of Object.values(charts))
      c.data.datasets.forEach((_, i) => { points += c.getDatasetMeta(i).data.length; });
  }
  const marker = document.getElementById('rendered');
  marker.dataset.points = points;
  marker.dataset.polls = ++polls;
}
async function poll() {
  try {
    const reply = await fetch('/dashboard/data.json', { cache: 'no-store' });
    render(await reply.json());
  } catch (e) {
    document.getElementById('status').textContent = 'the agent does not answer (' + e + '): the run may have ended';
  }
  setTimeout(poll, 1000);
}
poll();
</script>
</body></html>
)html";

nlohmann::json numberOrNull(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(); }

std::string readFile(const char* path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return {};
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

double histogramQuantile(double q, const std::vector<uint64_t>& buckets) {
  constexpr int n = PsServerMetrics::kStalenessBuckets;
  if (buckets.size() != static_cast<size_t>(n) || !(q >= 0 && q <= 1)) return std::numeric_limits<double>::quiet_NaN();
  uint64_t total = 0;
  for (uint64_t b : buckets) total += b;
  if (total == 0) return std::numeric_limits<double>::quiet_NaN();
  const double rank = q * static_cast<double>(total);
  double below = 0;
  for (int k = 0; k < n; ++k) {
    const double count = static_cast<double>(buckets[k]);
    if (below + count >= rank && count > 0) {
      // The +Inf bucket: the highest finite bound, as Prometheus answers.
      if (k == n - 1) return static_cast<double>(PsServerMetrics::kStalenessBounds[n - 2]);
      const double upper = static_cast<double>(PsServerMetrics::kStalenessBounds[k]);
      // The first bucket with a bound <= 0 has no width (Prometheus returns its bound).
      if (k == 0 && upper <= 0) return upper;
      const double lower = k == 0 ? 0.0 : static_cast<double>(PsServerMetrics::kStalenessBounds[k - 1]);
      return lower + (upper - lower) * (rank - below) / count;
    }
    below += count;
  }
  return static_cast<double>(PsServerMetrics::kStalenessBounds[n - 2]);
}

Dashboard::Dashboard(const MetricsHub& hub, std::string job, std::string runId, std::chrono::milliseconds interval)
    : hub_(hub), job_(std::move(job)), runId_(std::move(runId)), interval_(interval) {
  thread_ = std::thread([this] { loop(); });
}

Dashboard::~Dashboard() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void Dashboard::loop() {
  std::unique_lock lock(mu_);
  while (!stopping_) {
    lock.unlock();
    sample();
    lock.lock();
    cv_.wait_for(lock, interval_, [this] { return stopping_; });
  }
}

void Dashboard::sample() {
  const auto ranks = hub_.rankStates();
  const auto servers = hub_.serverStates();
  const double now = unixSeconds();
  std::lock_guard lock(mu_);
  for (const auto& s : servers) {
    ServerHistory& h = servers_[s.rank];
    // Rates over the time since the previous sample (none at the first).
    if (h.lastTime > 0 && now > h.lastTime) {
      const double dt = now - h.lastTime;
      h.rateByOp.clear();
      for (const auto& [op, n] : s.requestsByOp) {
        auto it = h.lastByOp.find(op);
        const uint64_t before = it == h.lastByOp.end() ? 0 : it->second;
        h.rateByOp[op] = n >= before ? static_cast<double>(n - before) / dt : 0.0;  // a restarted server: 0
      }
      h.updatesPerSecond = s.updates >= h.lastUpdates ? static_cast<double>(s.updates - h.lastUpdates) / dt : 0.0;
    }
    h.lastTime = now;
    h.lastByOp = s.requestsByOp;
    h.lastUpdates = s.updates;
    h.time.push_back(now);
    h.requestsPerSecond.push_back(s.requestsPerSecond);
    h.stalenessP90.push_back(histogramQuantile(0.9, s.stalenessBuckets));
    if (h.time.size() >= kMaxPoints) {
      for (auto* v : {&h.time, &h.requestsPerSecond, &h.stalenessP90}) {
        size_t keep = 0;
        for (size_t i = 0; i < v->size(); i += 2) (*v)[keep++] = (*v)[i];
        v->resize(keep);
      }
    }
  }
  for (const auto& r : ranks) {
    if (r.updatedUnixSeconds <= 0 || r.step <= 0) continue;
    History& h = history_[r.rank];
    // A restarted worker may report a step below the last one: a new segment of the same curve.
    if (!h.step.empty() && h.step.back() == static_cast<double>(r.step)) continue;
    h.time.push_back(now);
    h.step.push_back(static_cast<double>(r.step));
    h.loss.push_back(r.hasLoss ? r.loss : std::numeric_limits<double>::quiet_NaN());  // NaN: null in the JSON
    h.samplesPerSecond.push_back(r.hasSamples ? r.samplesPerSecond : std::numeric_limits<double>::quiet_NaN());
    if (h.time.size() >= kMaxPoints) {
      for (auto* v : {&h.time, &h.step, &h.loss, &h.samplesPerSecond}) {
        size_t keep = 0;
        for (size_t i = 0; i < v->size(); i += 2) (*v)[keep++] = (*v)[i];
        v->resize(keep);
      }
    }
  }
}

std::string Dashboard::dataJson() const {
  const auto agent = hub_.agentState();
  const auto ranks = hub_.rankStates();
  const double now = unixSeconds();
  nlohmann::json d = {{"job", job_},
                      {"run_id", runId_},
                      {"node", agent.nodeRank},
                      {"round", agent.round},
                      {"restarts", agent.restartCount},
                      {"nodes", agent.numNodes},
                      {"world_size", agent.worldSize},
                      {"workers_running", agent.running},
                      {"heartbeat_age_seconds", agent.heartbeatAges}};
  nlohmann::json exits = nlohmann::json::object();
  for (const auto& [code, n] : agent.exitsByCode) exits[std::to_string(code)] = n;
  d["worker_exits"] = exits;
  nlohmann::json events = nlohmann::json::array();
  for (const auto& [time, text] : agent.events) events.push_back({{"time", time}, {"text", text}});
  d["events"] = events;
  nlohmann::json list = nlohmann::json::array();
  std::lock_guard lock(mu_);
  for (const auto& r : ranks) {
    nlohmann::json history = {{"time", nlohmann::json::array()}, {"step", nlohmann::json::array()},
                              {"loss", nlohmann::json::array()}, {"samples_per_second", nlohmann::json::array()}};
    if (auto it = history_.find(r.rank); it != history_.end())
      history = {{"time", it->second.time}, {"step", it->second.step}, {"loss", it->second.loss},
                 {"samples_per_second", it->second.samplesPerSecond}};
    list.push_back({{"rank", r.rank},
                    {"step", r.step},
                    {"epoch", r.epoch},
                    // null (shown as '-', no point) on a rank that computes no loss, as for a non-finite one.
                    {"loss", r.hasLoss && std::isfinite(r.loss) ? nlohmann::json(r.loss) : nlohmann::json()},
                    {"learning_rate", r.learningRate},
                    // null ('-') on a rank whose data replica's samples another rank counts (model parallelism)
                    {"samples_per_second", r.hasSamples ? nlohmann::json(r.samplesPerSecond) : nlohmann::json()},
                    {"age_seconds", r.updatedUnixSeconds > 0 ? now - r.updatedUnixSeconds : -1.0},
                    {"history", history}});
  }
  d["ranks"] = list;
  nlohmann::json servers = nlohmann::json::array();
  for (const auto& s : hub_.serverStates()) {
    nlohmann::json byOp = nlohmann::json::object(), rateByOp = nlohmann::json::object();
    for (const auto& [op, n] : s.requestsByOp) byOp[op] = n;
    nlohmann::json history = {{"time", nlohmann::json::array()}, {"requests_per_second", nlohmann::json::array()},
                              {"staleness_p90", nlohmann::json::array()}};
    nlohmann::json updatesPerSecond;  // null until two samples were taken
    if (auto it = servers_.find(s.rank); it != servers_.end()) {
      for (const auto& [op, r] : it->second.rateByOp) rateByOp[op] = r;
      if (!it->second.rateByOp.empty() || it->second.time.size() > 1) updatesPerSecond = it->second.updatesPerSecond;
      nlohmann::json p90 = nlohmann::json::array();
      for (double v : it->second.stalenessP90) p90.push_back(numberOrNull(v));
      history = {{"time", it->second.time}, {"requests_per_second", it->second.requestsPerSecond},
                 {"staleness_p90", p90}};
    }
    uint64_t count = 0;
    for (uint64_t n : s.stalenessBuckets) count += n;
    servers.push_back(
        {{"rank", s.rank},
         {"server", s.server},
         {"requests_by_op", byOp},
         {"request_rate_by_op", rateByOp},
         {"requests_per_second", s.requestsPerSecond},
         {"errors", s.errors},
         {"updates", s.updates},
         {"updates_per_second", updatesPerSecond},
         {"received_bytes", s.receivedBytes},
         {"sent_bytes", s.sentBytes},
         {"workers", s.workers},
         {"workers_live", s.workersLive},
         {"workers_lost", s.workersLost},
         // null mean and p90 until a push was answered in async/ssp (sync has no staleness)
         {"staleness",
          {{"count", count},
           {"mean", count > 0 ? nlohmann::json(s.stalenessSum / static_cast<double>(count)) : nlohmann::json()},
           {"p90", numberOrNull(histogramQuantile(0.9, s.stalenessBuckets))},
           {"max", s.stalenessMax}}},
         {"history", history}});
  }
  d["servers"] = servers;
  return d.dump();
}

std::optional<HttpResponse> Dashboard::handle(std::string_view target) const {
  if (target == "/dashboard" || target == "/dashboard/" || target == "/")
    return HttpResponse{200, "text/html; charset=utf-8", kPage};
  if (target == "/dashboard/data.json") return HttpResponse{200, "application/json", dataJson()};
  if (target == "/dashboard/chart.js") {
    std::string js = readFile(kChartJsPath);
    if (js.empty())
      return HttpResponse{404, "text/plain; charset=utf-8",
                          fmt::format("{} is missing: install Debian's libjs-chart.js\n", kChartJsPath)};
    return HttpResponse{200, "application/javascript", std::move(js)};
  }
  return std::nullopt;
}

}  // namespace dtrain::launch
