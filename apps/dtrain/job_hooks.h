// Glue shared by the commands that launch (selfExe) and between the job-file commands (`dtrain train`, `dtrain check`, `dtrain run JOB.json`): the shared
// options (--set, --output-dir) and the validation the launcher runs before any worker starts.
#pragma once

#include <CLI/CLI.hpp>

#include <string>
#include <vector>

#include "lib/train/job.h"

namespace dtrain::app {

// JOB.json (positional), --set PATH=VALUE (repeatable), --output-dir DIR.
void addJobOptions(CLI::App& app, train::JobArgs& args);

// args: JOB.json followed by `dtrain train` options (as `dtrain run JOB.json ...` received them). Parses them
// like `dtrain train` would and validates the job; throws ConfigError/UsageError so that a bad job costs no
// rendezvous, no worker and no restart. Returns the job, for checks that need the launch plan (the memory check,
// train::checkJobFitsMemory, once the local worker count is known).
train::Job validateJobForLaunch(const std::vector<std::string>& args);

// What a CLI11 parse error says, with the unexpected arguments of an ExtrasError in the order they were typed
// (CLI11 2.x lists them reversed when they came after the positionals: "not expected: 2 -n" for `... -n 2`).
std::string parseErrorText(const CLI::ParseError& e);

// This executable's absolute path (/proc/self/exe), what `dtrain run` and `dtrain sim` start workers and agents
// from. Throws Error when the link cannot be read.
std::string selfExe();

}  // namespace dtrain::app
