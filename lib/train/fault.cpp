#include "lib/train/fault.h"

#include <chrono>
#include <thread>

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <thread>

#include "lib/common/env.h"
#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/common/parse.h"

namespace dtrain::train {

std::vector<Fault> parseFaults(const std::string& text) {
  std::vector<Fault> out;
  for (const auto& item : parse::split(text, ';')) {
    if (parse::trim(item).empty()) continue;
    Fault f;
    bool haveStep = false;
    for (const auto& kv : parse::split(item, ',')) {
      auto eq = kv.find('=');
      std::string k(parse::trim(kv.substr(0, eq)));
      std::string v(eq == std::string::npos ? "" : parse::trim(kv.substr(eq + 1)));
      auto num = parse::toInt(v);
      if (k == "action" && (v == "kill" || v == "exit" || v == "hang" || v == "throw" || v == "slow" ||
                            v == "kill_mid_step"))
        f.action = v;
      else if (k == "rank" && num && *num >= 0) f.rank = static_cast<int>(*num);
      else if (k == "step" && num && *num >= 1) f.step = *num, haveStep = true;
      else if (k == "attempt" && num && *num >= 0) f.attempt = static_cast<int>(*num);
      else if (k == "code" && num && *num >= 0 && *num <= 255) f.code = static_cast<int>(*num);
      else if (k == "ms" && num && *num >= 1 && *num <= 3600000) f.ms = static_cast<int>(*num);
      else if (k == "role" && (v == "worker" || v == "server")) f.role = v;
      else
        DTRAIN_THROW(UsageError,
                     "DTRAIN_FAULT={}: bad item '{}' (expected rank=R,step=S,action=kill|exit|hang|throw|slow|kill_mid_step[,attempt=A]"
                     "[,code=C][,ms=M])",
                     text, kv);
    }
    DTRAIN_CHECK_AS(UsageError, haveStep && !f.action.empty(), "DTRAIN_FAULT={}: '{}' needs step=S and action=...", text,
                    item);
    DTRAIN_CHECK_AS(UsageError, (f.action == "slow") == (f.ms > 0), "DTRAIN_FAULT={}: '{}': ms=M goes with action=slow",
                    text, item);
    DTRAIN_CHECK_AS(UsageError, f.role == "worker" || f.action == "kill",
                    "DTRAIN_FAULT={}: '{}': role=server supports action=kill only", text, item);
    out.push_back(f);
  }
  return out;
}

FaultInjector::FaultInjector(int rank, int attempt)
    : faults_(parseFaults(env::getOr("DTRAIN_FAULT", ""))), rank_(rank), attempt_(attempt) {}

void FaultInjector::afterStep(int64_t step) const {
  for (const auto& f : faults_) {
    if (f.rank != rank_ || f.attempt != attempt_ || f.role != "worker") continue;
    if (f.action == "kill_mid_step") continue;  // the parameter-server strategy fires it, inside a step
    if (f.action == "slow") {  // a straggler: every step from `step` on takes `ms` longer
      if (step >= f.step) std::this_thread::sleep_for(std::chrono::milliseconds(f.ms));
      continue;
    }
    if (f.step != step) continue;
    log::warn("DTRAIN_FAULT: rank {} {} after step {}", rank_, f.action, step);
    if (f.action == "kill") ::raise(SIGKILL);
    if (f.action == "exit") throw Error(fmt::format("DTRAIN_FAULT: injected exit after step {}", step),
                                        static_cast<ExitCode>(f.code));
    // An exception that is no dtrain::Error: what a bug looks like ("internal error", exit 1).
    if (f.action == "throw") throw std::logic_error(fmt::format("DTRAIN_FAULT: injected bug after step {}", step));
    // hang: a stuck process that even ignores SIGTERM, as a deadlocked one would
    ::signal(SIGTERM, SIG_IGN);
    ::signal(SIGINT, SIG_IGN);
    for (;;) ::pause();
  }
}

SampleLog::SampleLog(int rank, int worldSize, int attempt, int round)
    : rank_(rank), world_(worldSize), attempt_(attempt), round_(round) {
  auto dir = env::getOr("DTRAIN_SAMPLE_LOG", "");
  if (dir.empty()) return;
  std::filesystem::create_directories(dir);
  auto path = fmt::format("{}/samples-a{}-r{}.jsonl", dir, attempt, rank);
  file_ = std::fopen(path.c_str(), "a");
  DTRAIN_CHECK(file_ != nullptr, "DTRAIN_SAMPLE_LOG: cannot write {}", path);
}

SampleLog::~SampleLog() {
  if (file_) std::fclose(file_);
}

void SampleLog::add(std::span<const int64_t> indices, int64_t padding, std::span<const int64_t> dropped) {
  if (!file_) return;
  const auto cut = indices.end() - std::clamp<int64_t>(padding, 0, static_cast<int64_t>(indices.size()));
  pending_.insert(pending_.end(), indices.begin(), cut);
  pendingPadding_.insert(pendingPadding_.end(), cut, indices.end());
  pendingDropped_.insert(pendingDropped_.end(), dropped.begin(), dropped.end());
}

void SampleLog::onEmptyEpoch(int64_t epoch, int64_t step, std::span<const int64_t> dropped) {
  if (!file_) return;
  const double t = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  fmt::print(file_,
             "{{\"attempt\":{},\"round\":{},\"rank\":{},\"world\":{},\"epoch\":{},\"step\":{},\"t\":{:.6f},\"steps\":0,"
             "\"idx\":[],\"drop\":[{}]}}\n",
             attempt_, round_, rank_, world_, epoch, step, t, fmt::join(dropped, ","));
  std::fflush(file_);
}

void SampleLog::commitStep(int64_t epoch, int64_t step) {
  if (!file_) return;
  // t: wall-clock seconds (Unix time), so that `dtrain sim` can time steps across processes and namespaces.
  const double t = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  fmt::print(file_,
             "{{\"attempt\":{},\"round\":{},\"rank\":{},\"world\":{},\"epoch\":{},\"step\":{},\"t\":{:.6f},\"idx\":[{}]{}{}}}\n",
             attempt_, round_, rank_, world_, epoch, step, t, fmt::join(pending_, ","),
             pendingPadding_.empty() ? std::string() : fmt::format(",\"pad\":[{}]", fmt::join(pendingPadding_, ",")),
             pendingDropped_.empty() ? std::string() : fmt::format(",\"drop\":[{}]", fmt::join(pendingDropped_, ",")));
  std::fflush(file_);
  pending_.clear();
  pendingPadding_.clear();
  pendingDropped_.clear();
}

StepPause::StepPause() {
  if (auto text = env::getOr("DTRAIN_STEP_PAUSE", ""); !text.empty())
    pause_ = parse::durationOrThrow(text, fmt::format("environment variable DTRAIN_STEP_PAUSE={}", text));
}

void StepPause::onStepEnd(const StepEvent&) { std::this_thread::sleep_for(pause_); }

void addTestAids(CallbackList& callbacks, int rank, int worldSize, int attempt, int round, bool logsSamples) {
  auto faults = std::make_shared<FaultInjector>(rank, attempt);  // a malformed DTRAIN_FAULT fails before any file
  auto pause = std::make_shared<StepPause>();
  if (logsSamples) {
    auto sampleLog = std::make_shared<SampleLog>(rank, worldSize, attempt, round);
    if (sampleLog->enabled()) callbacks.add(sampleLog);
  }
  if (pause->enabled()) callbacks.add(pause);
  if (faults->enabled()) callbacks.add(faults);
}

}  // namespace dtrain::train
