// `dtrain plot RUN_DIR... --out FILE.svg|.html|.png`: training curves from runs' metrics.jsonl, drawn as SVG with no
// plotting library (people would rather look than read). Four panels: training loss, evaluation accuracy (or
// evaluation loss for regression), learning rate and throughput (samples/s), against the optimizer step; several
// runs are overlaid in different colours with a legend. The HTML form wraps the same SVG in a page.
#pragma once

#include <string>
#include <vector>

namespace dtrain::launch {

struct RunCurves {
  std::string label;  // the run's folder name
  // (step, value) per series, in file order.
  std::vector<std::pair<double, double>> loss, evalLoss, evalAccuracy, lr, samplesPerSec;
};

// Reads RUN_DIR/metrics.jsonl (or a metrics.jsonl path). Throws UsageError (exit 3) naming the file when it is
// missing, ConfigError naming file:line for a line that is not JSON.
RunCurves readRunCurves(const std::string& runDirOrFile);

// The chart, a standalone SVG document.
std::string renderSvg(const std::vector<RunCurves>& runs);
// The same chart in a minimal HTML page (title, the SVG inline).
std::string renderHtml(const std::vector<RunCurves>& runs);

// The same chart as a PNG image at `outPath`: the SVG piped to `converter` (rsvg-convert, Debian's librsvg2-bin,
// looked up in PATH) at run time. librsvg is the SVG renderer GNOME itself uses; running its command-line tool
// keeps librsvg/cairo/glib out of dtrain's build and its one binary, for one optional output format. Blocks until
// the converter exits. Throws UsageError (exit 3) naming --out and the package when the converter cannot be
// started, dtrain::Error when it fails.
void writePng(const std::vector<RunCurves>& runs, const std::string& outPath,
              const std::string& converter = "rsvg-convert");
// A chart of other data through the same drawing (dtrain sim's report): panels two per row, each with its own
// x-axis label, one polyline per series (with dots when `dots`), and dashed vertical markers with a label.
struct ChartSeries {
  std::string label;
  std::vector<std::pair<double, double>> points;
  bool dots = false;
};
struct ChartPanel {
  std::string title, xLabel;
  std::vector<ChartSeries> series;
  std::vector<std::pair<double, std::string>> vlines;
};
std::string renderChart(const std::string& title, const std::vector<ChartPanel>& panels);
// A minimal HTML page with `title` as heading and the SVG inline.
std::string wrapHtml(const std::string& title, const std::string& svg);

}  // namespace dtrain::launch
