#include "lib/launch/timeline.h"

#include <stdlib.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <tuple>

#include <nlohmann/json.hpp>

#include "lib/common/error.h"
#include "lib/common/log.h"

namespace dtrain::launch {

namespace fs = std::filesystem;

namespace {

constexpr size_t kChunkBytes = 16u << 20;  // well below the store's value limit (rendezvous/store.h)
constexpr int kThreadsPerRound = 100;      // tid = round * 100 + the worker's thread number

std::string partKey(int round, int node) { return fmt::format("timeline/part/{}/{}", round, node); }

std::string readWhole(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

struct Event {
  int pid, tid;
  int64_t ts, dur;  // ns, rank 0's clock
  std::string name, cat;
  nlohmann::json args;
};

}  // namespace

TimelineCollector::TimelineCollector(std::string outputFile, rendezvous::StorePtr store)
    : outputFile_(std::move(outputFile)), store_(std::move(store)) {
  const char* tmp = std::getenv("TMPDIR");
  std::string templ = fmt::format("{}/dtrain-timeline-XXXXXX", tmp && *tmp ? tmp : "/tmp");
  DTRAIN_CHECK(::mkdtemp(templ.data()) != nullptr, "--timeline: cannot create a folder for the workers' files ({}): {}",
               templ, std::strerror(errno));
  dir_ = templ;
}

TimelineCollector::~TimelineCollector() {
  std::error_code ec;
  fs::remove_all(dir_, ec);
}

std::string TimelineCollector::workerFile(int round, int rank) const {
  return fmt::format("{}/round{}-rank{}.jsonl", dir_, round, rank);
}

std::string TimelineCollector::localPart(int round) const {
  std::string all;
  const std::string prefix = fmt::format("round{}-", round);
  std::vector<fs::path> files;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir_, ec))
    if (e.path().filename().string().rfind(prefix, 0) == 0) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  for (const auto& f : files) {
    std::string text = readWhole(f);
    if (!text.empty() && text.back() != '\n') text += '\n';  // a cut last line stays a line of its own
    all += text;
  }
  return all;
}

void TimelineCollector::afterRound(int round, int nodeRank, int numNodes) {
  if (collects()) {
    rounds_.push_back({round, nodeRank, numNodes});
    return;
  }
  try {
    const std::string part = localPart(round);
    const std::string key = partKey(round, nodeRank);
    size_t chunks = 0;
    for (size_t off = 0; off < part.size() || chunks == 0; off += kChunkBytes, ++chunks)
      store_->set(fmt::format("{}/{}", key, chunks), std::string_view(part).substr(std::min(off, part.size()), kChunkBytes));
    store_->set(key + "/n", std::to_string(chunks));  // last: its presence says the chunks are complete
  } catch (const std::exception& e) {
    log::warn("--timeline: could not ship this node's timeline of round {}: {}", round, e.what());
  }
}

size_t TimelineCollector::write(const std::string& job, const std::string& runId, std::chrono::milliseconds wait) {
  try {
    const auto deadline = std::chrono::steady_clock::now() + wait;
    std::vector<std::pair<int, std::string>> parts;
    for (const Round& r : rounds_) {
      parts.emplace_back(r.round, localPart(r.round));
      for (int node = 0; node < r.numNodes; ++node) {
        if (node == r.nodeRank) continue;
        const std::string key = partKey(r.round, node);
        const auto left = std::max<int64_t>(1, std::chrono::duration_cast<std::chrono::milliseconds>(
                                                   deadline - std::chrono::steady_clock::now()).count());
        std::string part;
        try {
          if (!store_->wait({key + "/n"}, std::chrono::milliseconds(left))) {
            log::warn("--timeline: node {} did not ship its timeline of round {}: its ranks are missing", node, r.round);
            continue;
          }
          const int chunks = std::stoi(store_->get(key + "/n", std::chrono::seconds(10)));
          for (int c = 0; c < chunks; ++c) part += store_->get(fmt::format("{}/{}", key, c), std::chrono::seconds(30));
        } catch (const std::exception& e) {
          log::warn("--timeline: could not read node {}'s timeline of round {}: {}", node, r.round, e.what());
          continue;
        }
        parts.emplace_back(r.round, std::move(part));
      }
    }
    size_t events = 0;
    const std::string trace = mergeTimeline(parts, job, runId, &events);
    const std::string tmp = outputFile_ + ".tmp";
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      DTRAIN_CHECK(out.good(), "cannot write {}", tmp);
      out << trace;
      out.close();
      DTRAIN_CHECK(out.good(), "writing {} failed", tmp);
    }
    fs::rename(tmp, outputFile_);
    log::info("wrote the timeline {} ({} events; open it in chrome://tracing or ui.perfetto.dev)", outputFile_, events);
    return events;
  } catch (const std::exception& e) {
    log::warn("--timeline {}: not written: {}", outputFile_, e.what());
    return 0;
  }
}

std::string mergeTimeline(const std::vector<std::pair<int, std::string>>& parts, const std::string& job,
                          const std::string& runId, size_t* count) {
  std::vector<Event> events;
  nlohmann::json meta = nlohmann::json::array();
  std::map<std::pair<int, int>, std::string> threads;  // (pid, tid) -> name
  std::map<int, std::string> processes;                 // pid -> name
  for (const auto& [round, text] : parts) {
    int rank = -1;
    int64_t offset = 0;
    std::vector<size_t> mine;  // this worker's events, to shift when its offset line comes
    auto settle = [&] {
      for (size_t i : mine) events[i].ts -= offset;
      mine.clear();
      offset = 0;
    };
    std::istringstream lines(text);
    std::string line;
    while (std::getline(lines, line)) {
      nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (!j.is_object()) continue;
      if (j.contains("meta")) {
        settle();
        rank = j.value("rank", -1);
        processes[rank] = fmt::format("rank {} (node {}, {})", rank, j.value("node", -1), j.value("host", "?"));
        continue;
      }
      if (rank < 0) continue;
      if (j.contains("clock_offset_ns")) {
        offset = j["clock_offset_ns"].get<int64_t>();
      } else if (j.contains("thread")) {
        const int tid = round * kThreadsPerRound + j["thread"].get<int>();
        threads[{rank, tid}] = round > 0 ? fmt::format("{} (round {})", j.value("name", "?"), round) : j.value("name", "?");
      } else if (j.contains("ts_ns")) {
        Event e{rank, round * kThreadsPerRound + j.value("tid", 0), j["ts_ns"].get<int64_t>(), j.value("dur_ns", int64_t{0}),
                j.value("name", "?"), j.value("cat", ""), j.contains("args") ? j["args"] : nlohmann::json::object()};
        if (round > 0) e.args["round"] = round;
        mine.push_back(events.size());
        events.push_back(std::move(e));
      }
    }
    settle();
  }
  // Parents before their children: by start, the longer first.
  std::sort(events.begin(), events.end(), [](const Event& a, const Event& b) {
    return std::tie(a.pid, a.tid, a.ts, b.dur) < std::tie(b.pid, b.tid, b.ts, a.dur);
  });
  int64_t base = 0;
  for (size_t i = 0; i < events.size(); ++i) base = i == 0 ? events[i].ts : std::min(base, events[i].ts);
  // Written by hand rather than through one json document: a long run has millions of events.
  std::string out = "{\"traceEvents\":[\n";
  bool first = true;
  auto add = [&](const std::string& obj) {
    if (!first) out += ",\n";
    first = false;
    out += obj;
  };
  for (const auto& [pid, name] : processes) {
    add(nlohmann::json{{"name", "process_name"}, {"ph", "M"}, {"pid", pid}, {"args", {{"name", name}}}}.dump());
    add(nlohmann::json{{"name", "process_sort_index"}, {"ph", "M"}, {"pid", pid}, {"args", {{"sort_index", pid}}}}.dump());
  }
  for (const auto& [key, name] : threads)
    add(nlohmann::json{{"name", "thread_name"}, {"ph", "M"}, {"pid", key.first}, {"tid", key.second}, {"args", {{"name", name}}}}
            .dump());
  auto micros = [](int64_t ns) { return fmt::format("{}.{:03d}", ns / 1000, static_cast<int>(ns % 1000)); };
  for (const Event& e : events) {
    nlohmann::json name = e.name, cat = e.cat;  // escaped by the library
    std::string obj = fmt::format(R"({{"name":{},"cat":{},"ph":"X","pid":{},"tid":{},"ts":{},"dur":{})", name.dump(),
                                  cat.dump(), e.pid, e.tid, micros(e.ts - base), micros(std::max<int64_t>(0, e.dur)));
    if (!e.args.empty()) obj += ",\"args\":" + e.args.dump();
    add(obj + "}");
  }
  out += "\n],\"displayTimeUnit\":\"ms\",\"otherData\":";
  out += nlohmann::json{{"job", job}, {"run_id", runId}, {"producer", "dtrain run --timeline"}}.dump();
  out += "}\n";
  if (count) *count = events.size();
  return out;
}

}  // namespace dtrain::launch
