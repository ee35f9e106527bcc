// TensorBoard event files ("logging": {"tensorboard": true}): scalars of the run written where TensorBoard
// looks for them, <output dir>/tensorboard/events.out.tfevents.<unix seconds>.<host>.<pid>.
//
// Format (TensorFlow's, as TensorBoard reads it):
//  - TFRecord framing (tensorflow/core/lib/io/record_writer.cc): per record, the payload length as uint64
//    little-endian, the masked CRC-32C of those 8 bytes (uint32 LE), the payload, the masked CRC-32C of the
//    payload. Masking: ((crc >> 15) | (crc << 17)) + 0xa282ead8. CRC-32C (Castagnoli, reflected, polynomial
//    0x1EDC6F41) is Boost.CRC's crc_optimal.
//  - Each payload is a tensorflow.Event protocol buffer (tensorflow/core/util/event.proto): wall_time = 1
//    (double), step = 2 (int64), file_version = 3 (string, "brain.Event:2" in the first record), summary = 5
//    (tensorflow.Summary: repeated Value value = 1; Value: tag = 1 string, simple_value = 2 float). These few
//    fields are encoded here directly (varints and fixed-width little-endian fields, protobuf's wire format),
//    instead of generating code for the whole schema.
//
// Tags: train/loss, train/learning_rate, train/samples_per_second, train/grad_norm, train/comm_bytes_per_step
// (with a communication hook), eval/loss, eval/accuracy. Written by rank 0 at each progress interval and
// evaluation (the values are the group's); flushed after each, so TensorBoard sees a live run.
#pragma once

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <string_view>

#include "lib/train/callbacks.h"

namespace dtrain::train {

// CRC-32C of `data` and its TFRecord mask.
uint32_t crc32c(std::string_view data);
uint32_t maskedCrc32c(std::string_view data);
// One TFRecord: length, masked CRC of the length, payload, masked CRC of the payload.
std::string tfRecord(std::string_view payload);
// Serialized tensorflow.Event messages.
std::string fileVersionEvent(double wallTime);
std::string scalarEvent(double wallTime, int64_t step, std::string_view tag, float value);

// Appends events to a new file in `dir` (created). Not thread-safe. Throws dtrain::Error naming the file when it
// cannot be created; a later write failure is logged once and turns the writer off (training goes on).
class EventFileWriter {
 public:
  explicit EventFileWriter(const std::filesystem::path& dir);
  ~EventFileWriter();
  EventFileWriter(const EventFileWriter&) = delete;
  EventFileWriter& operator=(const EventFileWriter&) = delete;

  void scalar(std::string_view tag, double value, int64_t step);
  void flush();
  const std::filesystem::path& path() const { return path_; }

 private:
  void write(const std::string& event);
  std::filesystem::path path_;
  std::FILE* file_ = nullptr;
};

// The trainer callback: rank 0 writes, the other ranks do nothing.
class TensorBoardLogger : public TrainerCallback {
 public:
  TensorBoardLogger(bool leader, const std::filesystem::path& outputDir);
  void onLog(const StepStats& stats) override;
  void onEval(const StepStats& stats, const EvalResult& eval) override;
  void onFinish(const StepStats& stats, const TrainResult& result) override;

 private:
  std::unique_ptr<EventFileWriter> writer_;
};

}  // namespace dtrain::train
