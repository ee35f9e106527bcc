// `dtrain plot RUN_DIR... [--out FILE.svg|FILE.html|FILE.png]`: training curves of one or several runs (lib/launch/plot.h).
#include <cerrno>
#include <cstring>
#include <fstream>

#include "apps/dtrain/commands.h"
#include "lib/common/error.h"
#include "lib/launch/launch_options.h"
#include "lib/launch/plot.h"

namespace dtrain::app {

namespace {

struct PlotArgs {
  std::vector<std::string> runs;
  std::string out = "curves.svg";
};

bool endsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

int runPlot(const PlotArgs& a) {
  const bool html = endsWith(a.out, ".html") || endsWith(a.out, ".htm");
  const bool png = endsWith(a.out, ".png");
  DTRAIN_CHECK_AS(UsageError, html || png || endsWith(a.out, ".svg"),
                  "--out {}: expected a file ending in .svg, .html or .png", a.out);
  // Where the chart goes, before any run is read: a typo in --out is a usage error naming the folder.
  launch::checkWritableFile("--out", a.out);
  std::vector<launch::RunCurves> runs;
  for (const auto& r : a.runs) runs.push_back(launch::readRunCurves(r));
  if (png) {
    launch::writePng(runs, a.out);
    fmt::print("wrote {} ({} run(s))\n", a.out, runs.size());
    return 0;
  }
  std::ofstream out(a.out);
  DTRAIN_CHECK_AS(UsageError, out.good(), "--out {}: cannot write it ({})", a.out, std::strerror(errno));
  out << (html ? launch::renderHtml(runs) : launch::renderSvg(runs));
  out.close();
  DTRAIN_CHECK(out.good(), "--out {}: writing failed", a.out);
  fmt::print("wrote {} ({} run(s))\n", a.out, runs.size());
  return 0;
}

}  // namespace

void addPlotCommand(CLI::App& root, Action& action) {
  auto a = std::make_shared<PlotArgs>();
  auto* sub = root.add_subcommand("plot", "Draw loss, accuracy, learning rate and throughput curves of runs");
  sub->add_option("runs", a->runs, "Run folders (with metrics.jsonl), overlaid")->required();
  sub->add_option("--out,-o", a->out, "Output file: .svg, .html or .png (PNG: rendered by rsvg-convert, Debian's librsvg2-bin)")->capture_default_str();
  sub->footer(exitCodesHelp({{"0", ""}, {"1", ""}, {"2", "a run's metrics.jsonl holds a line that is not JSON"}, {"3", ""}}));
  sub->callback([&action, a] { action = [a] { return runPlot(*a); }; });
}

}  // namespace dtrain::app
