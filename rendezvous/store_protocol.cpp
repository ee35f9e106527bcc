#include "rendezvous/store_protocol.h"

namespace dtrain::rendezvous::proto {

const char* opName(Op op) {
  switch (op) {
    case Op::kPing: return "ping";
    case Op::kSet: return "set";
    case Op::kGet: return "get";
    case Op::kTryGet: return "tryGet";
    case Op::kAdd: return "add";
    case Op::kCompareSet: return "compareSet";
    case Op::kWait: return "wait";
    case Op::kCheck: return "check";
    case Op::kDelete: return "remove";
    case Op::kNumKeys: return "numKeys";
    case Op::kAppend: return "append";
  }
  return "unknown";
}

}  // namespace dtrain::rendezvous::proto
