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
#events li { font-family: monospace; }
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
                             throughput: makeChart('throughput', 'seconds', 'samples/s') } : null;
function setSeries(chart, ranks, xs, ys) {
  chart.data.datasets = ranks.map((r, i) => ({
    label: 'rank ' + r.rank, borderColor: colors[i % colors.length], borderWidth: 1.5,
    data: r.history[xs].map((x, k) => ({ x: xs === 'time' ? x - r.history.time[0] : x, y: r.history[ys][k] })) }));
  chart.update('none');
}
function cell(row, text, cls) { const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; }
function render(d) {
  document.getElementById('title').textContent = 'dtrain: ' + d.job + ' (run ' + d.run_id + ', node ' + d.node + ')';
  document.getElementById('status').textContent = haveChart ? 'live, refreshed every second'
      : 'Chart.js is not installed on the agent\'s machine (Debian package libjs-chart.js): curves are not drawn';
  const node = document.getElementById('node');
  node.innerHTML = '<tr><th>round</th><th>restarts</th><th>nodes</th><th>world size</th><th>workers running</th>' +
                   '<th>heartbeat age (s) by node</th><th>worker exits by code</th></tr>';
  const row = node.insertRow();
  [d.round, d.restarts, d.nodes, d.world_size, d.workers_running].forEach(v => cell(row, v));
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
  let points = 0;
  if (charts) {
    setSeries(charts.loss, d.ranks, 'step', 'loss');
    setSeries(charts.throughput, d.ranks, 'time', 'samples_per_second');
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

std::string readFile(const char* path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return {};
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

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
  const double now = unixSeconds();
  std::lock_guard lock(mu_);
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
