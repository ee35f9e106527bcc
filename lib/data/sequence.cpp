#include "lib/data/sequence.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <stdexcept>

#include "lib/common/error.h"
#include "lib/data/formats.h"

namespace dtrain::data {
namespace {

constexpr int32_t kLlmcMagic = 20240520;  // llm.c's dev/data/data_common.py
constexpr size_t kLlmcHeaderBytes = 256 * sizeof(int32_t);

std::string baseName(const std::string& path) { return std::filesystem::path(path).filename().string(); }

// Decodes UTF-8 into code points; ConfigError naming the file and byte offset of an invalid sequence.
void decodeUtf8(std::span<const std::byte> bytes, const std::string& path, std::vector<uint32_t>& out) {
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = s[i];
    int len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    bool ok = len > 0 && i + static_cast<size_t>(len) <= n;
    uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1Fu) : len == 3 ? (c & 0x0Fu) : (c & 0x07u);
    for (int k = 1; ok && k < len; ++k) {
      ok = (s[i + static_cast<size_t>(k)] & 0xC0) == 0x80;
      cp = (cp << 6) | (s[i + static_cast<size_t>(k)] & 0x3Fu);
    }
    if (!ok)
      DTRAIN_THROW(ConfigError, "{}: invalid UTF-8 at byte {} (use \"vocab\": \"byte\" for arbitrary bytes)", path, i);
    out.push_back(cp);
    i += static_cast<size_t>(len);
  }
}

ByteBuffer readNonEmpty(const std::string& path) {
  auto bytes = readFileBytes(path);
  DTRAIN_CHECK_AS(ConfigError, !bytes.empty(), "{}: the file is empty (expected text to train on)", path);
  return bytes;
}

void readTokenFile(const std::string& path, TokenStream& s) {
  auto bytes = readNonEmpty(path);
  size_t start = 0, count = 0;
  int32_t head[3] = {0, 0, 0};
  if (bytes.size() >= kLlmcHeaderBytes) std::memcpy(head, bytes.data(), sizeof head);
  if (head[0] == kLlmcMagic) {
    DTRAIN_CHECK_AS(ConfigError, head[1] == 1, "{}: llm.c token file version {} (expected 1: uint16 tokens)", path,
                    head[1]);
    DTRAIN_CHECK_AS(ConfigError, head[2] >= 0 && (bytes.size() - kLlmcHeaderBytes) / 2 == static_cast<size_t>(head[2]),
                    "{}: the llm.c header says {} tokens but the file holds {} bytes after its header ({} tokens)", path,
                    head[2], bytes.size() - kLlmcHeaderBytes, (bytes.size() - kLlmcHeaderBytes) / 2);
    start = kLlmcHeaderBytes;
    count = static_cast<size_t>(head[2]);
  } else {
    DTRAIN_CHECK_AS(ConfigError, bytes.size() % 2 == 0,
                    "{}: {} bytes is not a whole number of uint16 tokens (expected nanoGPT's raw uint16 .bin or "
                    "llm.c's file with magic {})",
                    path, bytes.size(), kLlmcMagic);
    count = bytes.size() / 2;
  }
  const size_t at = s.tokens.size();
  s.tokens.resize(at + count);
  // Little-endian on disk; every platform dtrain runs on is little-endian too.
  std::memcpy(s.tokens.data() + at, bytes.data() + start, count * 2);
}

}  // namespace

std::string utf8(uint32_t cp) {
  std::string o;
  if (cp < 0x80) {
    o += static_cast<char>(cp);
  } else if (cp < 0x800) {
    o += static_cast<char>(0xC0 | (cp >> 6));
    o += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    o += static_cast<char>(0xE0 | (cp >> 12));
    o += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    o += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    o += static_cast<char>(0xF0 | (cp >> 18));
    o += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    o += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    o += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return o;
}

TokenStream readTokenStream(const SequenceOptions& o) {
  DTRAIN_CHECK_AS(ConfigError, !o.paths.empty(), "no files given (expected \"path\": a file or a list of files)");
  TokenStream s;
  size_t bytesRead = 0;
  if (!o.textFormat) {
    for (const auto& p : o.paths) readTokenFile(p, s);
    uint16_t mx = 0;
    for (uint16_t t : s.tokens) mx = std::max(mx, t);
    s.vocabSize = static_cast<int64_t>(mx) + 1;
    s.description = fmt::format("tokens {}{}: {} tokens", baseName(o.paths[0]),
                                o.paths.size() > 1 ? fmt::format(" (+{} files)", o.paths.size() - 1) : "",
                                s.tokens.size());
    return s;
  }
  if (o.vocab == Vocab::kByte) {
    for (const auto& p : o.paths) {
      auto bytes = readNonEmpty(p);
      bytesRead += bytes.size();
      for (std::byte b : bytes) s.tokens.push_back(std::to_integer<uint16_t>(b));
    }
    s.vocabSize = 256;
  } else {
    std::vector<uint32_t> cps;
    for (const auto& p : o.paths) {
      auto bytes = readNonEmpty(p);
      bytesRead += bytes.size();
      decodeUtf8(bytes.span(), p, cps);
    }
    s.chars = cps;
    std::sort(s.chars.begin(), s.chars.end());
    s.chars.erase(std::unique(s.chars.begin(), s.chars.end()), s.chars.end());
    DTRAIN_CHECK_AS(ConfigError, s.chars.size() <= 65536, "{}: {} distinct characters (at most 65536 are supported)",
                    o.paths[0], s.chars.size());
    s.tokens.reserve(cps.size());
    for (uint32_t cp : cps)
      s.tokens.push_back(static_cast<uint16_t>(std::lower_bound(s.chars.begin(), s.chars.end(), cp) - s.chars.begin()));
    s.vocabSize = static_cast<int64_t>(s.chars.size());
  }
  s.description = fmt::format("text {}{}: {} bytes, {} vocab {}", baseName(o.paths[0]),
                              o.paths.size() > 1 ? fmt::format(" (+{} files)", o.paths.size() - 1) : "", bytesRead,
                              o.vocab == Vocab::kByte ? "byte" : "char", s.vocabSize);
  return s;
}

SequenceDataset::SequenceDataset(std::shared_ptr<const TokenStream> stream, const SequenceOptions& o)
    : stream_(std::move(stream)), block_(o.blockSize) {
  DTRAIN_CHECK(block_ >= 1, "sequence dataset without a block_size");
  const auto n = static_cast<int64_t>(stream_->tokens.size());
  end_ = n;
  std::string part;
  if (o.textFormat) {
    // nanoGPT: train = data[:int(n*0.9)], val = data[int(n*0.9):].
    const auto cut = static_cast<int64_t>(static_cast<double>(n) * (1.0 - o.valFraction));
    if (o.valSplit) begin_ = cut;
    else end_ = cut;
    part = fmt::format(", {} split {} tokens", o.valSplit ? "val" : "train", end_ - begin_);
  }
  const int64_t tokens = end_ - begin_;
  DTRAIN_CHECK_AS(ConfigError, tokens >= block_ + 1,
                  "{}: {} tokens{} but block_size {} needs at least {} (one window of block_size + 1 tokens); use more "
                  "data{} or a smaller block_size",
                  o.paths.empty() ? std::string("data") : o.paths[0], tokens,
                  o.textFormat ? fmt::format(" in the {} split (val_fraction {})", o.valSplit ? "val" : "train",
                                             o.valFraction)
                               : "",
                  block_, block_ + 1, o.textFormat ? ", another val_fraction" : "");
  size_ = (tokens - 1) / block_;
  window_ = Shape{block_};
  description_ = fmt::format("{}{}: {} windows of {}", stream_->description, part, size_, block_);
}

void SequenceDataset::fetch(std::span<const int64_t> indices, float* features, void* labels) const {
  auto* out = static_cast<int32_t*>(labels);
  const uint16_t* t = stream_->tokens.data();
  for (size_t b = 0; b < indices.size(); ++b) {
    const int64_t i = indices[b];
    if (i < 0 || i >= size_) throw std::out_of_range(fmt::format("sample index {} out of range [0, {})", i, size_));
    const uint16_t* w = t + begin_ + i * block_;
    float* f = features + static_cast<int64_t>(b) * block_;
    int32_t* l = out + static_cast<int64_t>(b) * block_;
    for (int64_t j = 0; j < block_; ++j) {
      f[j] = static_cast<float>(w[j]);
      l[j] = w[j + 1];
    }
  }
}

std::pair<uint16_t, int64_t> SequenceDataset::maxToken() const {
  uint16_t mx = 0;
  int64_t at = begin_;
  for (int64_t i = begin_; i < end_; ++i)
    if (stream_->tokens[static_cast<size_t>(i)] > mx) mx = stream_->tokens[static_cast<size_t>(i)], at = i;
  return {mx, at};
}

double bigramLoss(const SequenceDataset& train, const SequenceDataset& eval, int64_t vocab) {
  const auto v = static_cast<size_t>(vocab);
  std::vector<double> counts(v * v, 1.0), rows(v, static_cast<double>(vocab));
  const std::vector<int64_t> all = [&] {
    std::vector<int64_t> idx(static_cast<size_t>(train.size()));
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int64_t>(i);
    return idx;
  }();
  const int64_t t = train.featureShape()[0];
  std::vector<float> x(static_cast<size_t>(t));
  std::vector<int32_t> y(static_cast<size_t>(t));
  auto each = [&](const SequenceDataset& ds, auto&& fn) {
    for (int64_t i = 0; i < ds.size(); ++i) {
      ds.fetch(std::span<const int64_t>(&i, 1), x.data(), y.data());
      for (int64_t j = 0; j < t; ++j) fn(static_cast<size_t>(x[static_cast<size_t>(j)]), static_cast<size_t>(y[static_cast<size_t>(j)]));
    }
  };
  each(train, [&](size_t a, size_t b) {
    if (a < v && b < v) counts[a * v + b] += 1, rows[a] += 1;
  });
  double loss = 0;
  int64_t n = 0;
  each(eval, [&](size_t a, size_t b) {
    if (a >= v || b >= v) return;
    loss -= std::log(counts[a * v + b] / rows[a]);
    ++n;
  });
  return n > 0 ? loss / static_cast<double>(n) : 0.0;
}

std::string vocabularyJson(const TokenStream& s) {
  nlohmann::json j;
  if (s.chars.empty()) {
    j["vocab"] = "byte";
  } else {
    j["vocab"] = "char";
    j["chars"] = s.chars;
  }
  return j.dump() + "\n";
}

Vocabulary Vocabulary::fromJson(const std::string& text, const std::string& file) {
  Vocabulary v;
  nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  DTRAIN_CHECK_AS(ConfigError, j.is_object() && j.contains("vocab") && j["vocab"].is_string(),
                  "{}: expected {{\"vocab\": \"byte\"}} or {{\"vocab\": \"char\", \"chars\": [...]}}", file);
  if (j["vocab"] == "byte") return v;
  DTRAIN_CHECK_AS(ConfigError, j["vocab"] == "char" && j.contains("chars") && j["chars"].is_array(),
                  "{}: unknown vocabulary {}", file, j["vocab"].dump());
  v.kind = Vocab::kChar;
  for (const auto& c : j["chars"]) {
    DTRAIN_CHECK_AS(ConfigError, c.is_number_unsigned(), "{}: /chars: {} is not a code point", file, c.dump());
    v.chars.push_back(c.get<uint32_t>());
  }
  return v;
}

std::vector<int32_t> Vocabulary::encode(const std::string& text) const {
  std::vector<int32_t> out;
  if (kind == Vocab::kByte) {
    for (unsigned char c : text) out.push_back(c);
    return out;
  }
  std::vector<std::byte> bytes(text.size());
  std::memcpy(bytes.data(), text.data(), text.size());
  std::vector<uint32_t> cps;
  decodeUtf8(bytes, "--prompt", cps);
  for (uint32_t cp : cps) {
    auto it = std::lower_bound(chars.begin(), chars.end(), cp);
    DTRAIN_CHECK_AS(ConfigError, it != chars.end() && *it == cp,
                    "--prompt: character '{}' (U+{:04X}) is not in the model's vocabulary", utf8(cp), cp);
    out.push_back(static_cast<int32_t>(it - chars.begin()));
  }
  return out;
}

std::string Vocabulary::decode(int32_t token) const {
  if (kind == Vocab::kByte) return std::string(1, static_cast<char>(token));
  if (token < 0 || static_cast<size_t>(token) >= chars.size()) return "\xEF\xBF\xBD";  // U+FFFD
  return utf8(chars[static_cast<size_t>(token)]);
}

}  // namespace dtrain::data
