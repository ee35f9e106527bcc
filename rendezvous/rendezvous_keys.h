// Internal to the rendezvous: the store key of a round's entry and the polling slices that rendezvous.cpp (joining,
// closing) and rendezvous_spares.cpp (waiting for a next round, spares) share. Keys are listed in rendezvous.h.
#pragma once

#include <fmt/format.h>

#include <string>
#include <string_view>

#include "lib/common/clock.h"
#include "rendezvous/rendezvous.h"

namespace dtrain::rendezvous::detail {

// "r<round>/<what>", under the run's prefix.
inline std::string key(int round, std::string_view what) { return fmt::format("r{}/{}", round, what); }

// While fewer than minNodes joined an elastic round, joiners block on its `quorum` key (set by the minNodes-th
// joiner); this bounds the wait only in case that joiner died between joining and setting it. Once the round
// can close we wait on the `closed` key itself, which wakes us the moment anyone closes it. Also the slice in
// which a round that cannot close yet (no usable node count among its joiners) looks for another joiner.
inline constexpr Millis kQuorumPoll{1000};
// While waiting for a round to open, we look whether the job ended (and for a stop signal) this often.
inline constexpr Millis kEndedPoll{1000};
// A joiner of an elastic round that wants to withdraw, or to close the round, while another joiner holds the
// round's `closing` key (a withdrawal under way: two round trips) retries after this long.
inline constexpr Millis kClosingRetry{20};
// ... and takes the key over from a withdrawal that held it this long (its agent died inside it).
inline constexpr Millis kClosingSteal{30000};

// RendezvousOptions::armStop(true) for the lifetime of the object, armStop(false) after it: a stop signal meanwhile
// is only recorded (RendezvousOptions::pendingStop) and handled by the rendezvous.
struct ArmedStop {
  const RendezvousOptions& o;
  explicit ArmedStop(const RendezvousOptions& o) : o(o) {
    if (o.armStop) o.armStop(true);
  }
  ~ArmedStop() {
    if (o.armStop) o.armStop(false);
  }
  ArmedStop(const ArmedStop&) = delete;
  ArmedStop& operator=(const ArmedStop&) = delete;
};

}  // namespace dtrain::rendezvous::detail
