#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "lib/common/error.h"
#include "lib/data/sampler.h"

using namespace dtrain;
using namespace dtrain::data;

namespace {

std::vector<std::vector<int64_t>> shards(int64_t n, int world, bool shuffle, uint64_t seed, int64_t epoch,
                                         int64_t start = 0, bool dropLast = false, bool pad = true) {
  std::vector<std::vector<int64_t>> out;
  for (int r = 0; r < world; ++r) {
    DistributedSampler s({.datasetSize = n, .rank = r, .worldSize = world, .shuffle = shuffle, .seed = seed,
                          .dropLast = dropLast, .pad = pad, .epoch = epoch, .startSample = start});
    out.emplace_back(s.indices().begin(), s.indices().end());
  }
  return out;
}

std::map<int64_t, int> counts(const std::vector<std::vector<int64_t>>& parts) {
  std::map<int64_t, int> c;
  for (const auto& p : parts)
    for (auto i : p) ++c[i];
  return c;
}

}  // namespace

TEST_CASE("the epoch order is a permutation, fixed by seed + epoch, different across epochs") {
  std::vector<int64_t> a, b, c, d;
  DistributedSampler::epochOrder(1000, true, 7, 3, a);
  DistributedSampler::epochOrder(1000, true, 7, 3, b);
  DistributedSampler::epochOrder(1000, true, 7, 4, c);
  DistributedSampler::epochOrder(1000, false, 7, 3, d);
  CHECK(a == b);
  CHECK(a != c);
  std::vector<int64_t> sorted = a;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < 1000; ++i) REQUIRE(sorted[static_cast<size_t>(i)] == i);
  for (int64_t i = 0; i < 1000; ++i) REQUIRE(d[static_cast<size_t>(i)] == i);
  // seed + epoch is the generator's seed (as in PyTorch): seed 7 epoch 4 == seed 8 epoch 3.
  DistributedSampler::epochOrder(1000, true, 8, 3, b);
  CHECK(b == c);
}

TEST_CASE("the order is pinned to mt19937_64 + Fisher-Yates, not to the standard library's distributions") {
  std::vector<int64_t> order;
  DistributedSampler::epochOrder(10, true, 0, 0, order);
  // Recomputed independently: mt19937_64(0), j = high 64 bits of (draw * (i + 1)) (Lemire, no rejection hit).
  std::mt19937_64 rng(0);
  std::vector<int64_t> expect = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
  for (int64_t i = 9; i > 0; --i) {
    unsigned __int128 m = static_cast<unsigned __int128>(rng()) * static_cast<uint64_t>(i + 1);
    std::swap(expect[static_cast<size_t>(i)], expect[static_cast<size_t>(m >> 64)]);
  }
  CHECK(order == expect);
}

TEST_CASE("ranks take disjoint strided shards that cover the dataset, padded like PyTorch") {
  const int64_t n = 103;
  const int world = 4;
  auto parts = shards(n, world, true, 42, 0);
  std::vector<int64_t> order;
  DistributedSampler::epochOrder(n, true, 42, 0, order);
  for (int r = 0; r < world; ++r) {
    REQUIRE(parts[static_cast<size_t>(r)].size() == 26);  // ceil(103 / 4)
    // indices[r::world] of the order padded with its own start.
    for (size_t k = 0; k < 26; ++k) {
      size_t p = static_cast<size_t>(r) + k * world;
      CHECK(parts[static_cast<size_t>(r)][k] == order[p % n]);
    }
  }
  auto c = counts(parts);
  CHECK(c.size() == static_cast<size_t>(n));  // covering
  int repeated = 0;
  for (auto& [i, k] : c) repeated += k - 1;
  CHECK(repeated == 1);  // 104 - 103 padding entries, the order's first element
  CHECK(c[order[0]] == 2);
}

TEST_CASE("dropLast cuts the tail; pad=false gives uneven shards that see each sample exactly once") {
  auto dropped = shards(103, 4, true, 1, 0, 0, /*dropLast=*/true);
  for (const auto& p : dropped) CHECK(p.size() == 25);
  auto c = counts(dropped);
  CHECK(c.size() == 100);
  for (auto& [i, k] : c) CHECK(k == 1);

  auto uneven = shards(103, 4, false, 1, 0, 0, false, /*pad=*/false);
  CHECK(uneven[0].size() == 26);
  CHECK(uneven[2].size() == 26);
  CHECK(uneven[3].size() == 25);
  auto cu = counts(uneven);
  CHECK(cu.size() == 103);
  for (auto& [i, k] : cu) CHECK(k == 1);
  CHECK(uneven[1][0] == 1);  // no shuffle: identity order, rank 1 starts at sample 1
  CHECK(uneven[1][1] == 5);
}

TEST_CASE("world size 1 gets the whole order; an empty dataset gives nothing") {
  auto one = shards(17, 1, true, 5, 2);
  std::vector<int64_t> order;
  DistributedSampler::epochOrder(17, true, 5, 2, order);
  CHECK(one[0] == order);
  auto none = shards(0, 3, true, 5, 0);
  for (const auto& p : none) CHECK(p.empty());
}

TEST_CASE("resume at the same world size covers the rest of the epoch exactly once") {
  const int64_t n = 1000;
  const int world = 4;
  auto full = shards(n, world, true, 9, 1);
  const int64_t taken = 37;  // every rank consumed 37 samples, then the job was killed
  DistributedSampler s0({.datasetSize = n, .rank = 0, .worldSize = world, .seed = 9, .epoch = 1});
  const int64_t position = s0.position(taken);
  CHECK(position == 37 * 4);
  auto rest = shards(n, world, true, 9, 1, position);
  std::multiset<int64_t> seen;
  for (int r = 0; r < world; ++r) {
    const auto& f = full[static_cast<size_t>(r)];
    seen.insert(f.begin(), f.begin() + taken);
    seen.insert(rest[static_cast<size_t>(r)].begin(), rest[static_cast<size_t>(r)].end());
    // Same world, divisible: the resumed shard is exactly the uninterrupted one's remainder.
    CHECK(std::equal(f.begin() + taken, f.end(), rest[static_cast<size_t>(r)].begin(),
                     rest[static_cast<size_t>(r)].end()));
  }
  CHECK(seen.size() == static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) REQUIRE(seen.count(i) == 1);
}

TEST_CASE("resume at the same world size with padding is identical to the uninterrupted epoch") {
  const int64_t n = 103;  // not divisible: 1 padding entry at world 4, 5 at world 6
  for (int world : {4, 6}) {
    CAPTURE(world);
    auto full = shards(n, world, true, 2, 3);
    for (int64_t taken : {int64_t{0}, int64_t{1}, int64_t{10}, static_cast<int64_t>(full[0].size()) - 1}) {
      CAPTURE(taken);
      DistributedSampler probe({.datasetSize = n, .rank = 0, .worldSize = world, .seed = 2, .epoch = 3});
      auto rest = shards(n, world, true, 2, 3, probe.position(taken));
      for (int r = 0; r < world; ++r) {
        const auto& f = full[static_cast<size_t>(r)];
        CHECK(std::vector<int64_t>(f.begin() + taken, f.end()) == rest[static_cast<size_t>(r)]);
      }
    }
  }
}

TEST_CASE("resume at a different world size covers the rest of the epoch exactly once") {
  const int64_t n = 1001;
  for (auto [before, after] : {std::pair{4, 3}, std::pair{2, 5}, std::pair{3, 1}}) {
    CAPTURE(before);
    CAPTURE(after);
    auto first = shards(n, before, true, 3, 0);
    const int64_t taken = 50;
    DistributedSampler probe({.datasetSize = n, .rank = 0, .worldSize = before, .seed = 3});
    const int64_t position = probe.position(taken);
    auto second = shards(n, after, true, 3, 0, position);
    std::map<int64_t, int> seen;
    for (const auto& p : first)
      for (size_t k = 0; k < static_cast<size_t>(taken); ++k) ++seen[p[k]];
    auto restCounts = counts(second);
    for (auto& [i, k] : restCounts) seen[i] += k;
    CHECK(seen.size() == static_cast<size_t>(n));
    int64_t extra = 0;
    for (auto& [i, k] : seen) extra += k - 1;
    // Only the new world's padding repeats samples: ceil(rest / after) * after - rest entries.
    const int64_t rest = n - position;
    CHECK(extra == (rest + after - 1) / after * after - rest);
  }
}

TEST_CASE("a chain of resizes within one epoch still sees every sample exactly once (no padding)") {
  const int64_t n = 840;  // divisible by every world below at every cut
  std::map<int64_t, int> seen;
  int64_t position = 0;
  for (auto [world, taken] : {std::pair{4, 30}, std::pair{2, 60}, std::pair{6, 40}, std::pair{3, 1000}}) {
    auto parts = shards(n, world, true, 11, 5, position);
    int64_t t = std::min<int64_t>(taken, static_cast<int64_t>(parts[0].size()));
    for (const auto& p : parts)
      for (size_t k = 0; k < static_cast<size_t>(t); ++k) ++seen[p[k]];
    DistributedSampler probe({.datasetSize = n, .rank = 0, .worldSize = world, .seed = 11, .epoch = 5,
                              .startSample = position});
    position = probe.position(t);
  }
  CHECK(position == n);
  CHECK(seen.size() == static_cast<size_t>(n));
  for (auto& [i, k] : seen) REQUIRE(k == 1);
}

TEST_CASE("position saturates at the end; a resume past the dataset is an error; bad rank is an error") {
  DistributedSampler s({.datasetSize = 10, .rank = 1, .worldSize = 4, .seed = 0});
  CHECK(s.numSamplesThisRank() == 3);
  CHECK(s.totalSize() == 12);
  CHECK(s.position(3) == 10);
  s.setEpoch(1, 10);
  CHECK(s.numSamplesThisRank() == 0);
  CHECK(s.epoch() == 1);
  CHECK_THROWS_WITH_AS(s.setEpoch(1, 11), doctest::Contains("beyond the epoch's 10 samples"), ConfigError);
  CHECK_THROWS_AS(DistributedSampler({.datasetSize = 10, .rank = 4, .worldSize = 4}), ConfigError);
  CHECK_THROWS_AS(DistributedSampler({.datasetSize = 10, .rank = 0, .worldSize = 0}), ConfigError);
}

TEST_CASE("a resize mid-epoch with uneven shards (pad=false) repeats and skips nothing, whatever the cut") {
  // 240 samples, batch 5: a cut after 6 steps of 4 ranks (120 consumed), then 3 ranks for 7 steps (105 more), then
  // 4 ranks to the end: neither rest divides by the new world; the ranks' shares differ by at most one, and rank 0
  // holds the most (maxSamplesPerRank), which fixes the group's step count.
  const int64_t n = 240;
  std::map<int64_t, int> seen;
  int64_t position = 0;
  bool first = true;
  for (auto [world, steps] : {std::pair{4, 6}, std::pair{3, 7}, std::pair{4, 1000}}) {
    auto parts = shards(n, world, true, 3, 2, position, false, /*pad=*/first);
    DistributedSampler probe({.datasetSize = n, .rank = 0, .worldSize = world, .seed = 3, .pad = first, .epoch = 2,
                              .startSample = position});
    CHECK(probe.maxSamplesPerRank() == static_cast<int64_t>(parts[0].size()));
    for (const auto& p : parts) CHECK(parts[0].size() - p.size() <= 1);
    const auto taken = std::min<int64_t>(steps * 5, probe.maxSamplesPerRank());
    for (const auto& p : parts)
      for (size_t k = 0; k < std::min(p.size(), static_cast<size_t>(taken)); ++k) ++seen[p[k]];
    position = probe.position(taken);
    first = false;
  }
  CHECK(position == n);
  CHECK(seen.size() == static_cast<size_t>(n));
  for (auto& [i, k] : seen) REQUIRE(k == 1);
}

TEST_CASE("setPad switches padding for the next setEpoch; maxSamplesPerRank is the padded or the uneven share") {
  DistributedSampler s({.datasetSize = 10, .rank = 3, .worldSize = 4, .seed = 0});
  CHECK(s.pad());
  CHECK(s.numSamplesThisRank() == 3);  // padded to 12
  CHECK(s.maxSamplesPerRank() == 3);
  s.setPad(false);
  s.setEpoch(0, 0);
  CHECK(s.numSamplesThisRank() == 2);  // 10 over 4: 3, 3, 2, 2
  CHECK(s.maxSamplesPerRank() == 3);
  s.setEpoch(0, 3);  // 7 left: 2, 2, 2, 1
  CHECK(s.numSamplesThisRank() == 1);
  CHECK(s.maxSamplesPerRank() == 2);
}

TEST_CASE("paddingIn marks exactly the padded entries: the rest once, plus total - rest repeats at each rank's end") {
  // dtrain sim counts a sample trained twice in an epoch as repeated, except these (PyTorch's padding).
  for (int64_t n : {1, 2, 5, 7, 12, 13}) {
    for (int world : {1, 2, 3, 4, 5}) {
      for (int64_t start : {int64_t{0}, n / 2}) {
        CAPTURE(n);
        CAPTURE(world);
        CAPTURE(start);
        std::map<int64_t, int> real;
        int64_t padded = 0, total = 0;
        for (int r = 0; r < world; ++r) {
          DistributedSampler s({.datasetSize = n, .rank = r, .worldSize = world, .shuffle = true, .seed = 3,
                                .epoch = 1, .startSample = start});
          const auto idx = s.indices();
          const int64_t count = static_cast<int64_t>(idx.size());
          const int64_t pad = s.paddingIn(0, count);
          CHECK(pad >= 0);
          // Padding is the rank's tail; any split into batches adds up to the same count.
          int64_t split = 0;
          for (int64_t b = 0; b < count; b += 2) split += s.paddingIn(b, std::min<int64_t>(2, count - b));
          CHECK(split == pad);
          for (int64_t k = 0; k < count - pad; ++k) ++real[idx[static_cast<size_t>(k)]];
          padded += pad;
          total = s.totalSize();
        }
        CHECK(static_cast<int64_t>(real.size()) == n - start);  // every sample of the rest once, outside padding
        for (const auto& [sample, times] : real) CHECK(times == 1);
        CHECK(padded == total - (n - start));
        // Without padding (uneven shards, or dropLast) nothing is marked.
        for (int r = 0; r < world; ++r) {
          DistributedSampler uneven({.datasetSize = n, .rank = r, .worldSize = world, .pad = false, .startSample = start});
          CHECK(uneven.paddingIn(0, uneven.numSamplesThisRank()) == 0);
          DistributedSampler dropped({.datasetSize = n, .rank = r, .worldSize = world, .dropLast = true, .startSample = start});
          CHECK(dropped.paddingIn(0, dropped.numSamplesThisRank()) == 0);
        }
      }
    }
  }
}

TEST_CASE("dropped lists exactly what dropLast leaves out: each sample of the rest taken or dropped, once") {
  // dtrain sim counts a sample never trained in an epoch as skipped, except these (PyTorch's drop_last).
  for (int64_t n : {1, 2, 5, 7, 12, 13, 100}) {
    for (int world : {1, 2, 3, 4, 5}) {
      for (int64_t start : {int64_t{0}, n / 2, n / 3}) {
        CAPTURE(n);
        CAPTURE(world);
        CAPTURE(start);
        std::map<int64_t, int> times;
        int64_t dropped = 0, total = 0;
        for (int r = 0; r < world; ++r) {
          DistributedSampler s({.datasetSize = n, .rank = r, .worldSize = world, .shuffle = true, .seed = 3,
                                .dropLast = true, .epoch = 1, .startSample = start});
          for (auto i : s.indices()) ++times[i];
          for (auto i : s.dropped()) ++times[i];
          CHECK(static_cast<int64_t>(s.dropped().size()) <= 1);  // fewer than one round of the world in all
          dropped += static_cast<int64_t>(s.dropped().size());
          total = s.totalSize();
          // Without dropLast nothing is dropped (padded or uneven).
          DistributedSampler padded({.datasetSize = n, .rank = r, .worldSize = world, .startSample = start});
          CHECK(padded.dropped().empty());
          DistributedSampler uneven({.datasetSize = n, .rank = r, .worldSize = world, .pad = false, .startSample = start});
          CHECK(uneven.dropped().empty());
        }
        CHECK(static_cast<int64_t>(times.size()) == n - start);
        for (const auto& [sample, k] : times) CHECK(k == 1);
        CHECK(dropped == (n - start) % world);
        CHECK(total + dropped == n - start);
      }
    }
  }
}
