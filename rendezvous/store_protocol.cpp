#include "rendezvous/store_protocol.h"

#include "lib/common/sha256.h"

namespace dtrain::rendezvous::proto {

std::string authDigest(std::string_view token, std::string_view nonce) {
  std::string message("dtrain store auth v1:");
  message.append(nonce);
  auto d = sha256::hmac(token, message);
  return std::string(reinterpret_cast<const char*>(d.data()), d.size());
}

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
