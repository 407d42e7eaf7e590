// rng_frontend_check: drives a running vhostkit-rng (examples/vhostkit-rng, built against
// the installed library) through our front-end and virtio driver, and checks what it
// does with ordinary and hostile requests. Used by tests/package/rng_device_test.py.
//
//   rng_frontend_check --socket PATH [--iommu] [--packed]   normal and odd chains
//   rng_frontend_check --socket PATH --bad-address          a buffer outside guest memory
//
// Prints one PASS or FAIL line per case; exits 1 if any failed.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "devices/blk/blk_frontend.h"

namespace {

using namespace vhostkit;
using frontend::DriverBuffer;
using testing::BlkFrontend;

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "PASS" : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// Distinct byte values in [p, p + n): about 256 for random data, 1 for a fill.
std::size_t distinct(const std::uint8_t* p, std::size_t n) {
  return std::set<std::uint8_t>(p, p + n).size();
}

// Adds the chain and waits for its completion; nullopt (and a FAIL) if none comes.
std::optional<frontend::UsedBuffer> roundtrip(
    BlkFrontend& fe, std::span<const DriverBuffer> b, const std::string& what,
    std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  auto id = fe.add(0, b);
  if (!id) {
    check(false, what + ": add: " + id.error());
    return std::nullopt;
  }
  auto u = fe.wait(0, timeout);
  if (u && u->id != *id) {
    check(false, fmt::format("{}: completion for id {} instead of {}", what, u->id, *id));
    return std::nullopt;
  }
  return u;
}

}  // namespace

int main(int argc, char** argv) {
  std::string socket;
  testing::BlkFrontendOptions o;
  o.blk_features = 0;  // virtio-rng has no device features
  o.mem_bytes = 16ull << 20;
  bool bad_address = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--socket" && i + 1 < argc)
      socket = argv[++i];
    else if (a == "--iommu")
      o.iommu = true;
    else if (a == "--packed")
      o.packed = true;
    else if (a == "--bad-address")
      bad_address = true;
    else {
      std::fprintf(stderr, "rng_frontend_check: unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  auto client = frontend::FrontendClient::connect(socket);
  if (!client) {
    std::fprintf(stderr, "rng_frontend_check: %s\n", client.error().c_str());
    return 1;
  }
  BlkFrontend fe(std::move(*client), o);
  if (auto r = fe.start(); !r) {
    std::fprintf(stderr, "rng_frontend_check: start: %s\n", r.error().c_str());
    return 1;
  }

  if (bad_address) {
    // A writable buffer far outside guest memory: the queue must break (the daemon logs
    // it), nothing is completed, and the daemon keeps running (checked by the caller).
    DriverBuffer b{Gpa(0x7fff00000000ull), 4096, true};
    auto u = roundtrip(fe, {&b, 1}, "bad address", std::chrono::seconds(2));
    check(!u, "a buffer outside guest memory is not completed");
    return failures == 0 ? 0 : 1;
  }

  {  // One page.
    Gpa g = fe.alloc(4096);
    DriverBuffer b{g, 4096, true};
    auto u = roundtrip(fe, {&b, 1}, "one page");
    check(u && u->len == 4096, "a 4096-byte buffer is filled completely");
    check(distinct(fe.host(g, 4096), 4096) > 200, "the page holds random bytes");
  }
  {  // Three writable pieces.
    const std::uint32_t lens[] = {1000, 3000, 96};
    std::vector<DriverBuffer> b;
    for (std::uint32_t len : lens) b.push_back({fe.alloc(len), len, true});
    auto u = roundtrip(fe, b, "three pieces");
    check(u && u->len == 4096, "a chain of three writable buffers is filled completely");
    bool all = true;
    for (const DriverBuffer& p : b) all = all && distinct(fe.host(p.gpa, p.len), p.len) > 30;
    check(all, "every piece of the chain holds random bytes");
  }
  {  // A chain with nothing to write into.
    Gpa g = fe.alloc(512);
    std::memset(fe.host(g, 512), 0x5a, 512);
    DriverBuffer b{g, 512, false};
    auto u = roundtrip(fe, {&b, 1}, "read-only chain");
    check(u && u->len == 0, "a chain without a writable buffer completes with length 0");
    check(distinct(fe.host(g, 512), 512) == 1 && *fe.host(g, 1) == 0x5a,
          "the read-only buffer is left untouched");
  }
  {  // Readable, then writable.
    Gpa r = fe.alloc(100), w = fe.alloc(200);
    std::memset(fe.host(r, 100), 0x11, 100);
    DriverBuffer b[] = {{r, 100, false}, {w, 200, true}};
    auto u = roundtrip(fe, b, "readable then writable");
    check(u && u->len == 200, "only the writable part of a mixed chain is filled");
    check(distinct(fe.host(r, 100), 100) == 1, "its readable part is left untouched");
  }
  {  // A huge buffer: at most 64 KiB is used.
    const std::uint32_t len = 4u << 20;
    Gpa g = fe.alloc(len);
    std::memset(fe.host(g, len), 0xaa, len);
    DriverBuffer b{g, len, true};
    auto u = roundtrip(fe, {&b, 1}, "4 MiB buffer");
    check(u && u->len == 65536, "a 4 MiB buffer gets 64 KiB (the per-request limit)");
    const std::uint8_t* p = fe.host(g, len);
    check(distinct(p, 65536) > 200, "the first 64 KiB hold random bytes");
    check(std::all_of(p + 65536, p + len, [](std::uint8_t c) { return c == 0xaa; }),
          "nothing is written past the bytes reported");
  }
  {  // Many requests in flight.
    std::vector<Gpa> bufs;
    for (int i = 0; i < 64; ++i) {
      bufs.push_back(fe.alloc(256));
      DriverBuffer b{bufs.back(), 256, true};
      if (!fe.add(0, {&b, 1}, false)) check(false, "add of request " + std::to_string(i));
    }
    fe.publish(0);
    int done = 0;
    bool lens_ok = true;
    while (done < 64) {
      auto u = fe.wait(0);
      if (!u) break;
      lens_ok = lens_ok && u->len == 256;
      ++done;
    }
    check(done == 64 && lens_ok, "64 requests in flight all complete with 256 bytes");
  }
  return failures == 0 ? 0 : 1;
}
