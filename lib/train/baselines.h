// Baselines a run prints beside its own figures, so a user sees whether the model learned anything.
#pragma once

#include <optional>

#include "lib/data/dataset.h"

namespace dtrain::train {

// A recommender's popularity baseline: every eval sample is scored by its item's click rate in the training set
// (the item is the last feature, e.g. the recsys task's [user, users + item]; an item never seen in training gets
// the overall click rate), and the score's ROC AUC against the eval labels (class 1 = click) is returned. nullopt
// when the data is not a click log (not 2 classes, or no features), or the eval set lacks one of the classes.
std::optional<double> popularityBaselineAuc(const data::Dataset& train, const data::Dataset& eval);

}  // namespace dtrain::train
