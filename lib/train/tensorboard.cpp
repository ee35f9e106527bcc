#include "lib/train/tensorboard.h"

#include <unistd.h>

#include <boost/crc.hpp>

#include <bit>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/common/net.h"

namespace dtrain::train {

namespace {

// Protocol buffers' wire format (https://protobuf.dev/programming-guides/encoding/).
enum WireType : uint32_t { kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kFixed32 = 5 };

void putVarint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out += static_cast<char>((v & 0x7f) | 0x80);
    v >>= 7;
  }
  out += static_cast<char>(v);
}

void putTag(std::string& out, uint32_t field, WireType type) { putVarint(out, (uint64_t{field} << 3) | type); }

template <class T>
void putLittleEndian(std::string& out, T v) {
  static_assert(std::endian::native == std::endian::little, "the encoder writes native little-endian bytes");
  char bytes[sizeof(T)];
  std::memcpy(bytes, &v, sizeof(T));
  out.append(bytes, sizeof(T));
}

void putBytes(std::string& out, uint32_t field, std::string_view bytes) {
  putTag(out, field, kLengthDelimited);
  putVarint(out, bytes.size());
  out.append(bytes);
}

// Event fields (tensorflow/core/util/event.proto) and Summary / Summary.Value fields (summary.proto).
constexpr uint32_t kEventWallTime = 1, kEventStep = 2, kEventFileVersion = 3, kEventSummary = 5;
constexpr uint32_t kSummaryValue = 1, kValueTag = 1, kValueSimpleValue = 2;

std::string eventHeader(double wallTime, int64_t step) {
  std::string e;
  putTag(e, kEventWallTime, kFixed64);
  putLittleEndian(e, wallTime);
  if (step != 0) {  // proto3 leaves default values out
    putTag(e, kEventStep, kVarint);
    putVarint(e, static_cast<uint64_t>(step));
  }
  return e;
}

double unixSeconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

uint32_t crc32c(std::string_view data) {
  boost::crc_optimal<32, 0x1EDC6F41, 0xFFFFFFFF, 0xFFFFFFFF, true, true> crc;
  crc.process_bytes(data.data(), data.size());
  return crc.checksum();
}

uint32_t maskedCrc32c(std::string_view data) {
  const uint32_t c = crc32c(data);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

std::string tfRecord(std::string_view payload) {
  std::string length;
  putLittleEndian(length, static_cast<uint64_t>(payload.size()));
  std::string r = length;
  putLittleEndian(r, maskedCrc32c(length));
  r.append(payload);
  putLittleEndian(r, maskedCrc32c(payload));
  return r;
}

std::string fileVersionEvent(double wallTime) {
  std::string e = eventHeader(wallTime, 0);
  putBytes(e, kEventFileVersion, "brain.Event:2");
  return e;
}

std::string scalarEvent(double wallTime, int64_t step, std::string_view tag, float value) {
  std::string v;
  putBytes(v, kValueTag, tag);
  putTag(v, kValueSimpleValue, kFixed32);
  putLittleEndian(v, value);
  std::string summary;
  putBytes(summary, kSummaryValue, v);
  std::string e = eventHeader(wallTime, step);
  putBytes(e, kEventSummary, summary);
  return e;
}

EventFileWriter::EventFileWriter(const std::filesystem::path& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  DTRAIN_CHECK(!ec, "logging.tensorboard: cannot create {}: {}", dir.string(), ec.message());
  const double now = unixSeconds();
  path_ = dir / fmt::format("events.out.tfevents.{}.{}.{}", static_cast<int64_t>(now), net::hostname(), ::getpid());
  file_ = std::fopen(path_.c_str(), "wb");
  DTRAIN_CHECK(file_ != nullptr, "logging.tensorboard: cannot create {}: {}", path_.string(), std::strerror(errno));
  write(fileVersionEvent(now));
  flush();
}

EventFileWriter::~EventFileWriter() {
  if (file_) std::fclose(file_);
}

void EventFileWriter::write(const std::string& event) {
  if (!file_) return;
  const std::string record = tfRecord(event);
  if (std::fwrite(record.data(), 1, record.size(), file_) != record.size()) {
    log::warn("logging.tensorboard: writing {} failed ({}); no more TensorBoard events this run", path_.string(),
              std::strerror(errno));
    std::fclose(file_);
    file_ = nullptr;
  }
}

void EventFileWriter::scalar(std::string_view tag, double value, int64_t step) {
  write(scalarEvent(unixSeconds(), step, tag, static_cast<float>(value)));
}

void EventFileWriter::flush() {
  if (file_) std::fflush(file_);
}

TensorBoardLogger::TensorBoardLogger(bool leader, const std::filesystem::path& outputDir) {
  if (leader) writer_ = std::make_unique<EventFileWriter>(outputDir / "tensorboard");
}

void TensorBoardLogger::onLog(const StepStats& s) {
  if (!writer_) return;
  writer_->scalar("train/loss", s.loss, s.step);
  writer_->scalar("train/learning_rate", s.lr, s.step);
  writer_->scalar("train/samples_per_second", s.samplesPerSec, s.step);
  if (s.gradNorm) writer_->scalar("train/grad_norm", *s.gradNorm, s.step);
  if (s.commBytesPerStep) writer_->scalar("train/comm_bytes_per_step", *s.commBytesPerStep, s.step);
  writer_->flush();
}

void TensorBoardLogger::onEval(const StepStats& s, const EvalResult& eval) {
  if (!writer_) return;
  writer_->scalar("eval/loss", eval.loss, s.step);
  if (eval.accuracy) writer_->scalar("eval/accuracy", *eval.accuracy, s.step);
  writer_->flush();
}

void TensorBoardLogger::onFinish(const StepStats&, const TrainResult&) {
  if (writer_) writer_->flush();
}

}  // namespace dtrain::train
