// CSV reading: features become float32, one or more columns become the labels.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <map>
#include <string_view>

#include <fmt/ranges.h>

#include "lib/common/error.h"
#include "lib/common/parse.h"
#include "lib/data/formats.h"

namespace dtrain::data {

namespace {

// Splits one record into cells, honouring double quotes ("" inside quotes is a quote). `text` is advanced past
// the record's line end; `lines` counts physical lines (a quoted cell may span several).
std::vector<std::string> nextRecord(std::string_view& text, char delimiter, int64_t& lines) {
  std::vector<std::string> cells;
  std::string cell;
  bool quoted = false;
  size_t i = 0;
  for (; i < text.size(); ++i) {
    char c = text[i];
    if (quoted) {
      if (c == '"' && i + 1 < text.size() && text[i + 1] == '"') {
        cell.push_back('"');
        ++i;
      } else if (c == '"') {
        quoted = false;
      } else {
        if (c == '\n') ++lines;
        cell.push_back(c);
      }
    } else if (c == '"') {
      quoted = true;
    } else if (c == delimiter) {
      cells.push_back(std::move(cell));
      cell.clear();
    } else if (c == '\n') {
      break;
    } else if (c != '\r') {
      cell.push_back(c);
    }
  }
  ++lines;
  cells.push_back(std::move(cell));
  text.remove_prefix(std::min(i + 1, text.size()));
  return cells;
}

bool parseFloat(std::string_view s, float& out) {
  s = parse::trim(s);
  if (!s.empty() && s.front() == '+') s.remove_prefix(1);
  if (s.empty()) return false;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && p == s.data() + s.size() && std::isfinite(out);
}

bool isBlank(const std::vector<std::string>& cells) {
  return cells.size() == 1 && parse::trim(cells[0]).empty();
}

}  // namespace

CsvTable readCsv(const std::string& path, const CsvOptions& options) {
  auto bytes = readFileBytes(path);
  std::string_view text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  int64_t lines = 0;

  // Records with their starting line numbers, blank lines skipped.
  std::vector<std::pair<int64_t, std::vector<std::string>>> records;
  while (!text.empty()) {
    int64_t line = lines + 1;
    auto cells = nextRecord(text, options.delimiter, lines);
    if (!isBlank(cells)) records.emplace_back(line, std::move(cells));
  }
  DTRAIN_CHECK_AS(ConfigError, !records.empty(), "{}: empty CSV file", path);

  const size_t columns = records[0].second.size();
  bool header = false;
  if (options.header) {
    header = *options.header;
  } else {
    float ignored;
    for (const auto& c : records[0].second) header = header || !parseFloat(c, ignored);
  }
  std::vector<std::string> names;
  for (size_t c = 0; c < columns; ++c)
    names.push_back(header ? std::string(parse::trim(records[0].second[c])) : fmt::format("col{}", c));
  const size_t firstRow = header ? 1 : 0;
  DTRAIN_CHECK_AS(ConfigError, records.size() > firstRow, "{}: CSV file has a header but no rows", path);

  // Resolve label columns.
  DTRAIN_CHECK_AS(ConfigError, !options.labelColumns.empty(), "{}: no label column given", path);
  std::vector<size_t> labelCols;
  for (const auto& l : options.labelColumns) {
    size_t col = 0;
    if (const auto* name = std::get_if<std::string>(&l)) {
      DTRAIN_CHECK_AS(ConfigError, header, "{}: label column '{}' given by name, but the file has no header row",
                      path, *name);
      auto it = std::find(names.begin(), names.end(), *name);
      DTRAIN_CHECK_AS(ConfigError, it != names.end(), "{}: no column named '{}' (columns: {})", path, *name,
                      fmt::join(names, ", "));
      col = static_cast<size_t>(it - names.begin());
    } else {
      int64_t idx = std::get<int64_t>(l);
      int64_t resolved = idx < 0 ? static_cast<int64_t>(columns) + idx : idx;
      DTRAIN_CHECK_AS(ConfigError, resolved >= 0 && resolved < static_cast<int64_t>(columns),
                      "{}: label column index {} out of range (the file has {} columns)", path, idx, columns);
      col = static_cast<size_t>(resolved);
    }
    labelCols.push_back(col);
  }
  std::vector<bool> isLabel(columns, false);
  for (auto c : labelCols) isLabel[c] = true;
  const size_t featureCount = columns - static_cast<size_t>(std::count(isLabel.begin(), isLabel.end(), true));
  DTRAIN_CHECK_AS(ConfigError, featureCount > 0, "{}: every column is a label (expected feature columns)", path);

  const size_t rows = records.size() - firstRow;
  CsvTable table;
  table.features.type = DType::kFloat32;
  table.features.shape = {static_cast<int64_t>(rows), static_cast<int64_t>(featureCount)};
  table.features.bytes = ByteBuffer::uninitialized(rows * featureCount * sizeof(float));
  auto* feat = reinterpret_cast<float*>(table.features.bytes.mutableData());
  for (size_t c = 0; c < columns; ++c)
    if (!isLabel[c]) table.featureNames.push_back(names[c]);

  // Label cells are kept as text until the kind is known.
  std::vector<std::string> labelText;
  labelText.reserve(rows * labelCols.size());
  for (size_t r = firstRow; r < records.size(); ++r) {
    const auto& [line, cells] = records[r];
    DTRAIN_CHECK_AS(ConfigError, cells.size() == columns, "{}:{}: {} cells, expected {}{}", path, line,
                    cells.size(), columns, header ? " (as in the header)" : " (as in the first row)");
    for (size_t c = 0; c < columns; ++c) {
      if (isLabel[c]) continue;
      DTRAIN_CHECK_AS(ConfigError, parseFloat(cells[c], *feat), "{}:{}: column '{}' ({}): cannot parse '{}' as a "
                      "number", path, line, names[c], c, cells[c]);
      ++feat;
    }
    for (auto c : labelCols) labelText.emplace_back(parse::trim(cells[c]));
  }

  // Decide the label kind: all integers (or text) -> class, any fractional number -> target.
  bool anyText = false, anyFraction = false;
  for (const auto& s : labelText) {
    float v;
    if (!parseFloat(s, v)) anyText = true;
    else if (v != std::floor(v) || v < 0) anyFraction = true;
  }
  LabelKind kind = options.labelKind.value_or(anyFraction && !anyText ? LabelKind::kTarget : LabelKind::kClass);
  Labels& labels = table.labels;
  labels.kind = kind;
  auto lineOf = [&](size_t i) { return records[firstRow + i / labelCols.size()].first; };
  auto colOf = [&](size_t i) { return labelCols[i % labelCols.size()]; };
  if (kind == LabelKind::kTarget) {
    labels.shape = {static_cast<int64_t>(labelCols.size())};
    labels.targets.resize(labelText.size());
    for (size_t i = 0; i < labelText.size(); ++i)
      DTRAIN_CHECK_AS(ConfigError, parseFloat(labelText[i], labels.targets[i]),
                      "{}:{}: label column '{}' ({}): cannot parse '{}' as a number (label_kind is target)", path,
                      lineOf(i), names[colOf(i)], colOf(i), labelText[i]);
    return table;
  }
  DTRAIN_CHECK_AS(ConfigError, labelCols.size() == 1, "{}: {} label columns for class labels (expected one)", path,
                  labelCols.size());
  if (anyText) {
    // Class names: sorted unique text, like sklearn's LabelEncoder, so the mapping does not depend on row order.
    std::map<std::string, int32_t> ids;
    for (const auto& s : labelText) ids.emplace(s, 0);
    int32_t next = 0;
    for (auto& [name, id] : ids) {
      id = next++;
      labels.classNames.push_back(name);
    }
    for (const auto& s : labelText) labels.classes.push_back(ids[s]);
    labels.numClasses = next;
    return table;
  }
  for (size_t i = 0; i < labelText.size(); ++i) {
    float v = -1;
    bool ok = parseFloat(labelText[i], v) && v >= 0 && v == std::floor(v) && v <= 2.0e9f;
    DTRAIN_CHECK_AS(ConfigError, ok,
                    "{}:{}: label column '{}' ({}): '{}' is not a class index (expected an integer >= 0)", path,
                    lineOf(i), names[colOf(i)], colOf(i), labelText[i]);
    labels.classes.push_back(static_cast<int32_t>(v));
  }
  return table;
}

}  // namespace dtrain::data
