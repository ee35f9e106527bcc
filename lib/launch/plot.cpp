#include "lib/launch/plot.h"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lib/common/error.h"

namespace dtrain::launch {

namespace {

constexpr int kPanelWidth = 460, kPanelHeight = 260, kMarginLeft = 70, kMarginBottom = 40, kMarginTop = 30;
constexpr const char* kColours[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
                                    "#7f7f7f"};

std::string escapeXml(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '<') out += "&lt;";
    else if (c == '>') out += "&gt;";
    else if (c == '&') out += "&amp;";
    else if (c == '"') out += "&quot;";
    else out += c;
  }
  return out;
}

std::string tick(double v) {
  if (v == 0) return "0";
  const double a = std::fabs(v);
  if (a >= 1e5 || a < 1e-3) return fmt::format("{:.2e}", v);
  if (a >= 100) return fmt::format("{:.0f}", v);
  return fmt::format("{:.3g}", v);
}

using Series = std::vector<std::pair<double, double>>;

// One panel at (x0, y0): axes, 5 ticks per axis, one polyline per run.
std::string panel(int x0, int y0, const std::string& title, const std::vector<const Series*>& series,
                  const std::string& xLabel = "step", const std::vector<bool>& dots = {},
                  const std::vector<std::pair<double, std::string>>& vlines = {}) {
  double xmin = std::numeric_limits<double>::infinity(), xmax = -xmin, ymin = xmin, ymax = -xmin;
  for (const auto* s : series)
    for (auto [x, y] : *s) {
      if (!std::isfinite(y)) continue;
      xmin = std::min(xmin, x), xmax = std::max(xmax, x), ymin = std::min(ymin, y), ymax = std::max(ymax, y);
    }
  std::string out = fmt::format("<g class=\"panel\"><text x=\"{}\" y=\"{}\" font-weight=\"bold\">{}</text>\n",
                                x0 + kMarginLeft, y0 + 18, escapeXml(title));
  const int w = kPanelWidth - kMarginLeft - 10, h = kPanelHeight - kMarginTop - kMarginBottom;
  const int left = x0 + kMarginLeft, top = y0 + kMarginTop;
  out += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#999\"/>\n", left, top,
                     w, h);
  if (!std::isfinite(xmin)) return out + fmt::format("<text x=\"{}\" y=\"{}\">no data</text></g>\n", left + 10, top + 20);
  // One value (a run evaluated once, a constant learning rate): a range centred on it. [x, x + 1] put the point on
  // the panel's edge, under ticks that read "469 469 470 470".
  if (xmax == xmin) {
    const double pad = std::max(1.0, std::fabs(xmin) * 0.05);
    xmin -= pad, xmax += pad;
  }
  if (ymax == ymin) {
    const double pad = ymin == 0 ? 1.0 : std::fabs(ymin) * 0.05;
    ymin -= pad, ymax += pad;
  }
  auto px = [&](double x) { return left + (x - xmin) / (xmax - xmin) * w; };
  auto py = [&](double y) { return top + h - (y - ymin) / (ymax - ymin) * h; };
  for (int i = 0; i <= 4; ++i) {
    const double fy = ymin + (ymax - ymin) * i / 4, fx = xmin + (xmax - xmin) * i / 4;
    out += fmt::format("<text x=\"{}\" y=\"{:.1f}\" text-anchor=\"end\" font-size=\"11\">{}</text>\n", left - 4,
                       py(fy) + 4, tick(fy));
    out += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\">{}</text>\n", px(fx),
                       top + h + 15, tick(fx));
  }
  out += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\">{}</text>\n", left + w / 2,
                     top + h + 30, escapeXml(xLabel));
  int marker = 0;  // labels step down so that close markers stay readable
  for (const auto& [x, label] : vlines) {
    if (x < xmin || x > xmax) continue;
    const int labelY = top + 10 + 12 * (marker++ % 5);
    out += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{2}\" stroke=\"#888\" stroke-dasharray=\"4,3\"/>"
                       "<text x=\"{3:.1f}\" y=\"{4}\" font-size=\"10\" fill=\"#555\">{5}</text>\n",
                       px(x), top, top + h, px(x) + 2, labelY, escapeXml(label));
  }
  for (size_t r = 0; r < series.size(); ++r) {
    std::string points;
    int count = 0;
    for (auto [x, y] : *series[r])
      if (std::isfinite(y)) points += fmt::format("{:.1f},{:.1f} ", px(x), py(y)), ++count;
    if (points.empty()) continue;
    out += fmt::format("<polyline class=\"run{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
                       r, kColours[r % std::size(kColours)], points);
    // A line through one point draws nothing (a one-epoch run's evaluation was an empty panel): mark it.
    if ((r < dots.size() && dots[r]) || count == 1)
      for (auto [x, y] : *series[r])
        if (std::isfinite(y))
          out += fmt::format("<circle class=\"run{}\" cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3\" fill=\"{}\"/>\n", r, px(x),
                             py(y), kColours[r % std::size(kColours)]);
  }
  return out + "</g>\n";
}

}  // namespace

RunCurves readRunCurves(const std::string& runDirOrFile) {
  std::filesystem::path path = runDirOrFile;
  if (std::filesystem::is_directory(path)) path /= "metrics.jsonl";
  std::ifstream in(path);
  DTRAIN_CHECK_AS(UsageError, in.good(), "{}: no such file (give a run folder with a metrics.jsonl)", path.string());
  RunCurves c;
  c.label = std::filesystem::is_directory(runDirOrFile) ? std::filesystem::path(runDirOrFile).lexically_normal().filename().string()
                                                        : path.parent_path().filename().string();
  if (c.label.empty()) c.label = runDirOrFile;
  std::string line;
  int lineNo = 0;
  while (std::getline(in, line)) {
    ++lineNo;
    if (line.empty()) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const std::exception& e) {
      DTRAIN_THROW(ConfigError, "{}:{}: not a JSON line: {}", path.string(), lineNo, e.what());
    }
    if (!j.contains("step") || j.value("final", false)) continue;
    const double step = j["step"].get<double>();
    auto num = [&](const char* key) { return j.contains(key) && j[key].is_number() ? j[key].get<double>() : NAN; };
    if (j.contains("eval_loss")) {
      c.evalLoss.emplace_back(step, num("eval_loss"));
      if (!std::isnan(num("eval_accuracy"))) c.evalAccuracy.emplace_back(step, num("eval_accuracy"));
      continue;
    }
    c.loss.emplace_back(step, num("loss"));
    c.lr.emplace_back(step, num("lr"));
    c.samplesPerSec.emplace_back(step, num("samples_per_s"));
  }
  return c;
}

std::string renderSvg(const std::vector<RunCurves>& runs) {
  const int legendHeight = 20 * static_cast<int>(runs.size()) + 10;
  const int width = 2 * kPanelWidth, height = 2 * kPanelHeight + legendHeight;
  std::string out = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" "
      "font-family=\"sans-serif\" font-size=\"13\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
      width, height, width, height);
  auto pick = [&](auto member) {
    std::vector<const Series*> s;
    for (const auto& r : runs) s.push_back(&(r.*member));
    return s;
  };
  const bool accuracy = std::any_of(runs.begin(), runs.end(), [](const auto& r) { return !r.evalAccuracy.empty(); });
  out += panel(0, 0, "training loss", pick(&RunCurves::loss));
  out += accuracy ? panel(kPanelWidth, 0, "evaluation accuracy", pick(&RunCurves::evalAccuracy))
                  : panel(kPanelWidth, 0, "evaluation loss", pick(&RunCurves::evalLoss));
  out += panel(0, kPanelHeight, "learning rate", pick(&RunCurves::lr));
  out += panel(kPanelWidth, kPanelHeight, "throughput (samples/s)", pick(&RunCurves::samplesPerSec));
  for (size_t r = 0; r < runs.size(); ++r) {
    const int y = 2 * kPanelHeight + 15 + 20 * static_cast<int>(r);
    out += fmt::format("<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{}\" stroke-width=\"3\"/>", kMarginLeft,
                       y - 4, kMarginLeft + 25, y - 4, kColours[r % std::size(kColours)]);
    out += fmt::format("<text class=\"legend\" x=\"{}\" y=\"{}\">{}</text>\n", kMarginLeft + 32, y,
                       escapeXml(runs[r].label));
  }
  return out + "</svg>\n";
}

std::string renderHtml(const std::vector<RunCurves>& runs) {
  std::string names;
  for (const auto& r : runs) names += (names.empty() ? "" : ", ") + r.label;
  return fmt::format("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>dtrain: {}</title></head>\n"
                     "<body style=\"font-family: sans-serif\"><h1>dtrain: {}</h1>\n{}</body></html>\n",
                     escapeXml(names), escapeXml(names), renderSvg(runs));
}

void writePng(const std::vector<RunCurves>& runs, const std::string& outPath, const std::string& converter) {
  const std::string svg = renderSvg(runs);
  int in[2];
  DTRAIN_SYSCALL(::pipe2(in, O_CLOEXEC));
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, in[0], STDIN_FILENO);
  std::vector<std::string> args = {converter, "--format", "png", "--background-color", "white", "--output", outPath};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int err = ::posix_spawnp(&pid, converter.c_str(), &actions, nullptr, argv.data(), ::environ);
  posix_spawn_file_actions_destroy(&actions);
  ::close(in[0]);
  if (err != 0) {
    ::close(in[1]);
    DTRAIN_THROW(UsageError, "--out {}: PNG is drawn from the SVG by {} (Debian package librsvg2-bin), which could not "
                 "be started: {}; install it, or write .svg or .html",
                 outPath, converter, std::strerror(err));
  }
  // A converter that dies early must not kill us with SIGPIPE: the write fails instead, and its status says why.
  struct sigaction ignore {}, old {};
  ignore.sa_handler = SIG_IGN;
  ::sigaction(SIGPIPE, &ignore, &old);
  bool sent = true;
  for (size_t off = 0; off < svg.size() && sent;) {
    const ssize_t n = ::write(in[1], svg.data() + off, svg.size() - off);
    if (n < 0 && errno == EINTR) continue;
    sent = n > 0;
    if (sent) off += static_cast<size_t>(n);
  }
  ::sigaction(SIGPIPE, &old, nullptr);
  ::close(in[1]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  DTRAIN_CHECK(sent && WIFEXITED(status) && WEXITSTATUS(status) == 0,
               "--out {}: {} failed to convert the chart to PNG (status {})", outPath, converter, status);
}

std::string renderChart(const std::string& title, const std::vector<ChartPanel>& panels) {
  const int rows = static_cast<int>((panels.size() + 1) / 2), titleHeight = 30;
  const int width = 2 * kPanelWidth, height = titleHeight + rows * (kPanelHeight + 20) + 10;
  std::string out = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" "
      "font-family=\"sans-serif\" font-size=\"13\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"{}\" y=\"20\" font-weight=\"bold\" font-size=\"15\">{}</text>\n",
      width, height, width, height, kMarginLeft, escapeXml(title));
  for (size_t i = 0; i < panels.size(); ++i) {
    const auto& p = panels[i];
    const int x0 = static_cast<int>(i % 2) * kPanelWidth, y0 = titleHeight + static_cast<int>(i / 2) * (kPanelHeight + 20);
    std::vector<const Series*> series;
    std::vector<bool> dots;
    for (const auto& s : p.series) series.push_back(&s.points), dots.push_back(s.dots);
    out += panel(x0, y0, p.title, series, p.xLabel, dots, p.vlines);
    // The series' names under the panel, in their colours.
    int lx = x0 + kMarginLeft;
    for (size_t r = 0; r < p.series.size(); ++r) {
      out += fmt::format("<text class=\"legend\" x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"{}\">{}</text>\n", lx,
                         y0 + kPanelHeight + 8, kColours[r % std::size(kColours)], escapeXml(p.series[r].label));
      lx += 12 + 7 * static_cast<int>(p.series[r].label.size());
    }
  }
  return out + "</svg>\n";
}

std::string wrapHtml(const std::string& title, const std::string& svg) {
  return fmt::format("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title></head>\n"
                     "<body style=\"font-family: sans-serif\"><h1>{}</h1>\n{}</body></html>\n",
                     escapeXml(title), escapeXml(title), svg);
}

}  // namespace dtrain::launch
