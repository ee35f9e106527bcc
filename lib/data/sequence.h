// Token sequences for language models: the "text" and "tokens" dataset formats.
//
//   {"format": "text", "path": "input.txt" | ["a.txt", "b.txt"], "vocab": "byte" | "char",
//    "split": "train" | "val", "val_fraction": 0.1, "block_size": 128}
//   {"format": "tokens", "path": "train.bin", "block_size": 1024}
//
// text: the files' bytes, concatenated in the order given. "byte" tokens are the bytes themselves (vocabulary 256,
// any content); "char" decodes UTF-8 and numbers the distinct characters in code point order (nanoGPT's
// shakespeare_char), a vocabulary saved beside the model as vocab.json so `dtrain generate` can decode. The first
// (1 - val_fraction) of the tokens are the "train" split, the rest "val" (nanoGPT's prepare.py).
// tokens: uint16 token ids, little-endian: a raw array (nanoGPT's train.bin) or llm.c's file (a header of 256
// int32: magic 20240520, version 1, token count; then the ids), recognised by its magic.
//
// Sample i is the window starting at token i * T (T = block_size): features x[iT : iT+T] (token ids as float32),
// labels x[iT+1 : iT+T+1] (int32 class labels, one per position), as llm.c's dataloader cuts them, so an epoch
// sees each token once and there are (n - 1) / T samples. The DistributedSampler then partitions, shuffles and
// resumes them like any other dataset's samples.
//
// Errors are ConfigError naming the file and what was wrong (empty, unreadable, bad header, a token id >= the
// model's vocab_size, fewer than T + 1 tokens). Loaded datasets are immutable and thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "lib/data/dataset.h"

namespace dtrain::data {

enum class Vocab : uint8_t { kByte, kChar };

struct SequenceOptions {
  std::vector<std::string> paths;  // resolved
  bool textFormat = true;          // text, else tokens (.bin)
  Vocab vocab = Vocab::kByte;      // text only
  bool valSplit = false;           // text: the "val" split
  double valFraction = 0.1;        // text
  int64_t blockSize = 0;           // T; 0 until the job fills it from the model's input
};

// The token stream of a source, before windowing.
struct TokenStream {
  std::vector<uint16_t> tokens;
  std::vector<uint32_t> chars;  // kChar: code point of each token id; empty for bytes and token files
  int64_t vocabSize = 0;        // 256 for bytes, chars.size(), or max id + 1 for token files
  std::string description;      // "text fortunes (+3 files): 1,234,567 bytes, byte vocab"
};

// Reads and tokenises the files (the whole stream, not yet split).
TokenStream readTokenStream(const SequenceOptions& options);

class SequenceDataset final : public Dataset {
 public:
  // Splits (text) and windows `stream`. ConfigError when the split has fewer than blockSize + 1 tokens.
  SequenceDataset(std::shared_ptr<const TokenStream> stream, const SequenceOptions& options);

  int64_t size() const override { return size_; }
  const Shape& featureShape() const override { return window_; }
  LabelKind labelKind() const override { return LabelKind::kClass; }
  const Shape& labelShape() const override { return window_; }
  std::optional<int64_t> numClasses() const override { return stream_->vocabSize; }
  const std::vector<std::string>& classNames() const override { return noNames_; }
  std::string describe() const override { return description_; }
  // features: T floats per sample; labels: T int32 per sample.
  void fetch(std::span<const int64_t> indices, float* features, void* labels) const override;

  const TokenStream& stream() const { return *stream_; }
  int64_t numTokens() const { return end_ - begin_; }
  // The largest token id in this split and where it is (for the vocab_size check).
  std::pair<uint16_t, int64_t> maxToken() const;

 private:
  std::shared_ptr<const TokenStream> stream_;
  int64_t begin_ = 0, end_ = 0, block_ = 0, size_ = 0;
  Shape window_;
  std::string description_;
  std::vector<std::string> noNames_;
};

// The validation loss (mean cross-entropy in nats per token, predicting token t+1 from token t) of a bigram model
// counted on `train` with add-one smoothing over `vocab` symbols, over every position of `eval`'s windows: the
// baseline a language model has to beat.
double bigramLoss(const SequenceDataset& train, const SequenceDataset& eval, int64_t vocab);

// vocab.json beside the model: {"vocab": "byte"} or {"vocab": "char", "chars": [code points]}; what `dtrain
// generate` reads to decode (a missing file means bytes).
std::string vocabularyJson(const TokenStream& stream);
// Encodes / decodes text with such a vocabulary; ConfigError for a character it does not have.
struct Vocabulary {
  Vocab kind = Vocab::kByte;
  std::vector<uint32_t> chars;
  static Vocabulary fromJson(const std::string& text, const std::string& file);
  std::vector<int32_t> encode(const std::string& text) const;
  std::string decode(int32_t token) const;
  int64_t size() const { return kind == Vocab::kByte ? 256 : static_cast<int64_t>(chars.size()); }
};

// UTF-8 of one code point.
std::string utf8(uint32_t codePoint);

}  // namespace dtrain::data
