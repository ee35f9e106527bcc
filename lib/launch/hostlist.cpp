#include "lib/launch/hostlist.h"

#include <cctype>

#include "lib/common/error.h"
#include "lib/common/parse.h"

namespace dtrain::launch {

namespace {

constexpr size_t kMaxRangeValues = 65536;  // Slurm's own MAX_RANGE
constexpr size_t kMaxHosts = size_t{1} << 20;
constexpr size_t kMaxDigits = 18;  // fits int64 without overflow checks

[[noreturn]] void badHostlist(std::string_view input, size_t pos, const std::string& problem) {
  DTRAIN_THROW(UsageError, "bad Slurm host list '{}': {} at position {}", input, problem, pos + 1);
}

bool allDigits(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s)
    if (!std::isdigit(static_cast<unsigned char>(c))) return false;
  return true;
}

bool isBlank(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// The values of one bracket group, input[begin, end) being the text between '[' and ']'.
std::vector<std::string> expandGroup(std::string_view input, size_t begin, size_t end) {
  std::vector<std::string> values;
  if (begin == end) badHostlist(input, begin - 1, "empty brackets '[]'");
  size_t start = begin;
  for (size_t i = begin; i <= end; ++i) {
    if (i < end && input[i] != ',') continue;
    std::string_view element = input.substr(start, i - start);
    if (element.empty()) badHostlist(input, start, "empty range inside brackets");
    for (size_t k = 0; k < element.size(); ++k) {
      if (isBlank(element[k])) badHostlist(input, start + k, "blank inside brackets");
      if (element[k] == ':')
        badHostlist(input, start + k, "':' inside brackets (Slurm has no LOW-HIGH:STEP ranges)");
    }
    size_t dash = element.find('-');
    if (dash == std::string_view::npos) {
      // A number keeps its digits as typed (its padding); a name (gpu-[a,b]) is taken as is.
      if (element.size() > kMaxDigits && allDigits(element))
        badHostlist(input, start, fmt::format("number '{}' is too long", element));
      values.emplace_back(element);
    } else {
      std::string_view lo = element.substr(0, dash), hi = element.substr(dash + 1);
      if (!allDigits(lo) || !allDigits(hi))
        badHostlist(input, start,
                    fmt::format("range '{}' is not LOW-HIGH with non-negative decimal numbers", element));
      if (lo.size() > kMaxDigits || hi.size() > kMaxDigits)
        badHostlist(input, start, fmt::format("number in range '{}' is too long", element));
      int64_t a = *parse::toInt(lo), b = *parse::toInt(hi);
      if (a > b) badHostlist(input, start, fmt::format("reversed range '{}' (LOW must not exceed HIGH)", element));
      if (static_cast<uint64_t>(b - a) + 1 > kMaxRangeValues)
        badHostlist(input, start, fmt::format("range '{}' has more than {} values", element, kMaxRangeValues));
      int width = static_cast<int>(lo.size());  // Slurm pads to the width of LOW as typed
      for (int64_t v = a; v <= b; ++v) values.push_back(fmt::format("{:0{}d}", v, width));
    }
    start = i + 1;
  }
  return values;
}

// Expands one item (no separators outside its brackets, brackets balanced) onto `out`.
void expandItem(std::string_view input, size_t begin, size_t end, std::vector<std::string>& out) {
  std::vector<std::string_view> texts;  // texts[0] group[0] texts[1] group[1] ... texts[k]
  std::vector<std::vector<std::string>> groups;
  size_t p = begin;
  for (;;) {
    size_t open = input.find('[', p);
    if (open == std::string_view::npos || open >= end) {
      texts.push_back(input.substr(p, end - p));
      break;
    }
    size_t close = input.find(']', open);
    texts.push_back(input.substr(p, open - p));
    groups.push_back(expandGroup(input, open + 1, close));
    p = close + 1;
  }
  if (groups.empty()) {
    out.emplace_back(texts[0]);
    return;
  }
  size_t total = 1;
  for (const auto& g : groups) {
    if (total > (kMaxHosts - out.size()) / g.size())
      badHostlist(input, begin, fmt::format("expands to more than {} hosts", kMaxHosts));
    total *= g.size();
  }
  // Slurm's loop order (see the header): groups k-2 .. 0 from the outside in, then group k-1 innermost.
  size_t k = groups.size();
  std::vector<size_t> order;
  for (size_t g = k - 1; g-- > 0;) order.push_back(g);
  order.push_back(k - 1);
  std::vector<size_t> idx(k, 0);
  for (;;) {
    std::string name(texts[0]);
    for (size_t g = 0; g < k; ++g) {
      name += groups[g][idx[g]];
      name += texts[g + 1];
    }
    out.push_back(std::move(name));
    size_t j = order.size();
    for (;;) {
      if (j == 0) return;
      size_t g = order[--j];
      if (++idx[g] < groups[g].size()) break;
      idx[g] = 0;
    }
  }
}

}  // namespace

std::vector<std::string> expandHostlist(std::string_view input) {
  std::vector<std::string> out;
  constexpr size_t npos = std::string_view::npos;
  size_t itemStart = npos, openPos = npos, lastComma = npos;
  bool itemSinceComma = false;
  for (size_t i = 0; i < input.size(); ++i) {
    char c = input[i];
    if (openPos != npos) {  // inside brackets: only ']' matters here, the group parser checks the rest
      if (c == '[') badHostlist(input, i, "nested '['");
      if (c == ']') openPos = npos;
      continue;
    }
    if (c == ',' || isBlank(c)) {
      if (itemStart != npos) expandItem(input, itemStart, i, out);
      itemStart = npos;
      if (c == ',') {
        if (!itemSinceComma) badHostlist(input, i, "empty item before ','");
        itemSinceComma = false;
        lastComma = i;
      }
      continue;
    }
    if (c == ']') badHostlist(input, i, "']' without a matching '['");
    if (c == '[') openPos = i;
    if (itemStart == npos) itemStart = i;
    itemSinceComma = true;
  }
  if (openPos != npos) badHostlist(input, openPos, "'[' is never closed");
  if (itemStart != npos) expandItem(input, itemStart, input.size(), out);
  if (lastComma != npos && !itemSinceComma) badHostlist(input, lastComma, "empty item after the last ','");
  return out;
}

std::string firstHost(std::string_view hostlist) {
  auto hosts = expandHostlist(hostlist);
  DTRAIN_CHECK_AS(UsageError, !hosts.empty(), "the Slurm host list '{}' names no host", hostlist);
  return hosts.front();
}

std::vector<int> expandTasksPerNode(std::string_view input) {
  auto bad = [&](size_t pos, const std::string& problem) {
    DTRAIN_THROW(UsageError, "bad Slurm per-node count list '{}': {} at position {} (expected items like 2 or 2(x3))",
                 input, problem, pos + 1);
  };
  std::vector<int> out;
  if (parse::trim(input).empty()) bad(0, "empty list");
  size_t start = 0;
  for (size_t i = 0; i <= input.size(); ++i) {
    if (i < input.size() && input[i] != ',') continue;
    std::string_view item = input.substr(start, i - start);
    if (item.empty()) bad(start, "empty item");
    std::string_view count = item, repeat = "1";
    if (size_t paren = item.find('('); paren != std::string_view::npos) {
      count = item.substr(0, paren);
      std::string_view rest = item.substr(paren);
      if (rest.size() < 4 || rest.substr(0, 2) != "(x" || rest.back() != ')')
        bad(start + paren, fmt::format("'{}' is not (xREPEAT)", rest));
      repeat = rest.substr(2, rest.size() - 3);
      if (!allDigits(repeat) || repeat.size() > 7 || *parse::toInt(repeat) < 1)
        bad(start + paren + 2, fmt::format("repeat '{}' is not a positive number", repeat));
    }
    if (!allDigits(count) || count.size() > 9) bad(start, fmt::format("count '{}' is not a number", count));
    auto times = static_cast<size_t>(*parse::toInt(repeat));
    if (times > kMaxHosts - out.size()) bad(start, fmt::format("more than {} nodes", kMaxHosts));
    out.insert(out.end(), times, static_cast<int>(*parse::toInt(count)));
    start = i + 1;
  }
  return out;
}

}  // namespace dtrain::launch
