#include "lib/comm/tcp/mesh_auth.h"

#include <sys/random.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "lib/common/error.h"

namespace dtrain::comm::tcp::auth {
namespace {

void putU32(std::string& m, uint32_t v) {
  for (int i = 0; i < 4; ++i) m.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

template <size_t N>
void putBytes(std::string& m, const std::array<uint8_t, N>& a) {
  m.append(reinterpret_cast<const char*>(a.data()), a.size());
}

sha256::Digest proof(std::string_view token, const char* label, const Session& session, uint32_t tag, int self,
                     int other, const Nonce& first, const Nonce& second) {
  std::string m(label);
  putBytes(m, session);
  putU32(m, tag);
  putU32(m, static_cast<uint32_t>(self));
  putU32(m, static_cast<uint32_t>(other));
  putBytes(m, first);
  putBytes(m, second);
  return sha256::hmac(token, m);
}

}  // namespace

void randomBytes(void* out, size_t n) {
  auto* p = static_cast<char*>(out);
  size_t got = 0;
  while (got < n) {
    ssize_t r = ::getrandom(p + got, n - got, 0);
    if (r > 0) {
      got += static_cast<size_t>(r);
    } else if (errno != EINTR) {
      DTRAIN_THROW(CommError, "getrandom failed: {}", std::strerror(errno));
    }
  }
}

sha256::Digest acceptorProof(std::string_view token, const Session& session, uint32_t tag, int acceptor,
                             int connector, const Nonce& connectorNonce, const Nonce& acceptorNonce) {
  return proof(token, "dtrain mesh v2 accept:", session, tag, acceptor, connector, connectorNonce, acceptorNonce);
}

sha256::Digest connectorProof(std::string_view token, const Session& session, uint32_t tag, int connector,
                              int acceptor, const Nonce& acceptorNonce, const Nonce& connectorNonce) {
  return proof(token, "dtrain mesh v2 connect:", session, tag, connector, acceptor, acceptorNonce, connectorNonce);
}

std::string checkHeader(const HelloHeader& h, uint32_t tag, int self, int size) {
  if (h.magic != kHelloMagic) return "not a dtrain collective connection (bad hello magic)";
  if (h.version != kVersion)
    return fmt::format("it speaks mesh protocol v{}, this rank speaks v{} (mixed dtrain versions?)", h.version,
                       kVersion);
  if (h.tag != tag) return "it belongs to another collective group";
  if (h.rank <= self || h.rank >= size)
    return fmt::format("it claims rank {}, but only ranks {}..{} connect to rank {}", h.rank, self + 1, size - 1,
                       self);
  return "";
}

}  // namespace dtrain::comm::tcp::auth
