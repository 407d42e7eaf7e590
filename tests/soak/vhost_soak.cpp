// vhost_soak: thousands of front-end sessions against one vhostkit daemon (vhostkit-net or
// vhostkit-blk), watching the daemon for leaks.
//
// The tool starts the daemon on a socket in a temporary directory, then runs --cycles
// sessions, each a connection from start to disconnect. A seeded mix: well-formed ones
// (negotiate, memory table, rings started, one request or frame through the device,
// rings stopped, sometimes with a dirty log, a replaced memory table or a disconnect
// with the rings still running) and hostile ones (garbage headers, oversized payloads,
// connections cut inside a header or a payload, memory tables with bad sizes or fds that
// cannot be mapped, fds where none belong, rings of impossible sizes, kick fds that are
// not eventfds, logs larger than their fd). Every --sample-every cycles, with the daemon
// quiet (it answers a request on a new connection, so it has finished with every earlier
// one), it samples the daemon's open fds (/proc/PID/fd), mappings (/proc/PID/maps lines)
// and RSS (VmRSS) and prints them. The first sample at or after --warmup cycles is the
// baseline; the run fails if a later sample grows beyond the tolerances, if the daemon
// dies, if a well-formed session fails, or if the daemon does not exit cleanly on
// SIGTERM at the end. The last line is a summary (BENCH lines with --bench).
//
// Usage: vhost_soak --daemon PATH --kind net|blk [--cycles N] [--sample-every N]
//          [--warmup N] [--seed N] [--fd-tolerance N] [--maps-tolerance N]
//          [--rss-tolerance-kib N] [--bench] [--keep]
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "vhostkit/devices/blk.h"
#include "vhostkit/frontend/frontend_client.h"
#include "vhostkit/frontend/guest_memory.h"
#include "vhostkit/frontend/virtio_driver.h"
#include "vhostkit/vhost_user/message.h"
#include "vhostkit/vhost_user/socket.h"

namespace {

using namespace vhostkit;
using namespace vhostkit::vhost_user;
using frontend::FrontendClient;

struct Args {
  std::string daemon;
  std::string kind;
  std::uint64_t cycles = 10000;
  std::uint64_t sample_every = 1000;
  std::uint64_t warmup = 1000;
  std::uint64_t seed = 1;
  long fd_tolerance = 0;
  long maps_tolerance = 4;
  long rss_tolerance_kib = 4096;
  bool bench = false;
  bool keep = false;  // keep the work directory (the daemon's log) after a success
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr, "vhost_soak: %s\n", why.c_str());
  std::fprintf(stderr,
               "usage: vhost_soak --daemon PATH --kind net|blk [--cycles N] [--sample-every N] "
               "[--warmup N] [--seed N] [--fd-tolerance N] [--maps-tolerance N] "
               "[--rss-tolerance-kib N] [--bench] [--keep]\n");
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(k + " needs a value");
      return argv[++i];
    };
    auto number = [&]() -> std::uint64_t {
      std::string v = value();
      char* end = nullptr;
      unsigned long long n = std::strtoull(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0') usage(k + ": not a number: " + v);
      return n;
    };
    if (k == "--daemon")
      a.daemon = value();
    else if (k == "--kind")
      a.kind = value();
    else if (k == "--cycles")
      a.cycles = number();
    else if (k == "--sample-every")
      a.sample_every = number();
    else if (k == "--warmup")
      a.warmup = number();
    else if (k == "--seed")
      a.seed = number();
    else if (k == "--fd-tolerance")
      a.fd_tolerance = static_cast<long>(number());
    else if (k == "--maps-tolerance")
      a.maps_tolerance = static_cast<long>(number());
    else if (k == "--rss-tolerance-kib")
      a.rss_tolerance_kib = static_cast<long>(number());
    else if (k == "--bench")
      a.bench = true;
    else if (k == "--keep")
      a.keep = true;
    else
      usage("unknown option " + k);
  }
  if (a.daemon.empty()) usage("--daemon is required");
  if (a.kind != "net" && a.kind != "blk") usage("--kind must be net or blk");
  if (a.sample_every == 0 || a.warmup >= a.cycles) usage("need 0 < sample-every, warmup < cycles");
  return a;
}

// ---------------------------------------------------------------------------------------
// The daemon and its resources

struct Sample {
  std::uint64_t cycle = 0;
  long fds = 0;
  long maps = 0;
  long rss_kib = 0;
};

std::optional<Sample> sample(pid_t pid, std::uint64_t cycle) {
  Sample s;
  s.cycle = cycle;
  DIR* d = ::opendir(fmt::format("/proc/{}/fd", pid).c_str());
  if (d == nullptr) return std::nullopt;
  while (dirent* e = ::readdir(d))
    if (e->d_name[0] != '.') ++s.fds;
  ::closedir(d);
  std::ifstream maps(fmt::format("/proc/{}/maps", pid));
  if (!maps) return std::nullopt;
  for (std::string line; std::getline(maps, line);) ++s.maps;
  std::ifstream status(fmt::format("/proc/{}/status", pid));
  for (std::string line; std::getline(status, line);)
    if (line.rfind("VmRSS:", 0) == 0) s.rss_kib = std::strtol(line.c_str() + 6, nullptr, 10);
  if (s.rss_kib == 0) return std::nullopt;
  return s;
}

struct Daemon {
  pid_t pid = -1;
  std::string socket;
  std::string log;
};

Result<Daemon, std::string> spawn(const Args& a, const std::string& dir) {
  Daemon d;
  d.socket = dir + "/soak.sock";
  d.log = dir + "/daemon.log";
  std::vector<std::string> argv{a.daemon, "--socket-path", d.socket, "--log-level", "warn"};
  if (a.kind == "blk") {
    std::string image = dir + "/disk.img";
    int fd = ::open(image.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0 || ::ftruncate(fd, 8 << 20) != 0) return tl::unexpected("cannot create " + image);
    ::close(fd);
    argv.insert(argv.end(), {"--blk-file", image});
  }
  pid_t pid = ::fork();
  if (pid < 0) return tl::unexpected(std::string("fork failed"));
  if (pid == 0) {
    int log = ::open(d.log.c_str(), O_CREAT | O_WRONLY | O_TRUNC, 0600);
    if (log >= 0) {
      ::dup2(log, 1);
      ::dup2(log, 2);
    }
    std::vector<char*> cargv;
    for (auto& s : argv) cargv.push_back(s.data());
    cargv.push_back(nullptr);
    ::execv(cargv[0], cargv.data());
    ::_exit(127);
  }
  d.pid = pid;
  for (int i = 0; i < 1000; ++i) {
    if (::access(d.socket.c_str(), F_OK) == 0) return d;
    if (::waitpid(pid, nullptr, WNOHANG) == pid) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return tl::unexpected("the daemon did not start listening; see " + d.log);
}

bool alive(pid_t pid) {
  return ::waitpid(pid, nullptr, WNOHANG) == 0;
}

// ---------------------------------------------------------------------------------------
// Sessions

UniqueFd connect_raw(const std::string& path) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path.c_str());
  if (!fd.valid() || ::connect(fd.get(), reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0)
    return {};
  return fd;
}

// Ends our side and waits (up to 5 s) for the daemon to close its side: it has then
// dealt with everything we sent.
void finish_raw(UniqueFd fd) {
  ::shutdown(fd.get(), SHUT_WR);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  char buf[256];
  while (std::chrono::steady_clock::now() < deadline) {
    pollfd p{fd.get(), POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    if (::read(fd.get(), buf, sizeof buf) <= 0) return;
  }
}

void write_all(int fd, const void* data, std::size_t len) {
  (void)!::send(fd, data, len, MSG_NOSIGNAL);
}

UniqueFd memfd(std::uint64_t size) {
  UniqueFd fd(::memfd_create("vhost-soak", MFD_CLOEXEC));
  if (fd.valid() && ::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) return {};
  return fd;
}

constexpr std::uint64_t kMemBytes = 4ull << 20;
constexpr Gpa kMemBase{0x100000};

struct Session {
  const Args& args;
  const Daemon& daemon;
  std::mt19937_64& rng;

  std::uint32_t queues() const { return args.kind == "net" ? 2 : 1; }
  std::uint64_t features() const {
    std::uint64_t f = virtio::bit(virtio::kFRingIndirectDesc) | virtio::bit(virtio::kFRingEventIdx);
    if (args.kind == "blk") f |= virtio::bit(blk::kFFlush) | virtio::bit(blk::kFBlkSize);
    return f;
  }

  Result<std::unique_ptr<FrontendClient>, std::string> negotiated() {
    auto c = FrontendClient::connect(daemon.socket);
    if (!c) return tl::unexpected(c.error());
    frontend::ClientOptions o;
    o.want_features = features();
    if (auto r = (*c)->negotiate(o); !r) return tl::unexpected(r.error());
    return std::move(*c);
  }

  // Well-formed: variant 0 plain, 1 with a dirty log, 2 a memory table replaced while
  // the rings are stopped, then started again, 3 a disconnect with the rings running.
  Result<void, std::string> well_formed(unsigned variant) {
    auto c = negotiated();
    if (!c) return tl::unexpected("negotiate: " + c.error());
    FrontendClient& client = **c;
    auto mem = frontend::GuestMemory::create({{kMemBase, kMemBytes}});
    if (!mem) return tl::unexpected(mem.error());
    if (auto r = client.set_mem_table(*mem); !r) return tl::unexpected("mem table: " + r.error());
    if (variant == 1)
      if (auto r = client.enable_logging(4096); !r) return tl::unexpected("log: " + r.error());
    auto run = [&](frontend::GuestMemory& m) -> Result<void, std::string> {
      std::vector<frontend::VirtioDriver> drivers;
      std::vector<frontend::RingNotifiers> notifiers;
      frontend::DriverOptions d;
      d.size = 64;
      d.indirect = true;
      d.event_idx = true;
      for (std::uint32_t q = 0; q < queues(); ++q) {
        auto drv = frontend::VirtioDriver::create(m, d);
        if (!drv) return tl::unexpected(drv.error());
        drivers.push_back(std::move(*drv));
      }
      for (std::uint32_t q = 0; q < queues(); ++q) {
        auto n = client.start_queue(q, m, drivers[q]);
        if (!n) return tl::unexpected(fmt::format("start queue {}: {}", q, n.error()));
        notifiers.push_back(std::move(*n));
      }
      if (auto r = client.driver_ok(); !r) return r;
      if (auto r = one_request(m, drivers, notifiers); !r) return r;
      if (variant == 3) return {};  // disconnect with the rings running
      for (std::uint32_t q = 0; q < queues(); ++q)
        if (auto r = client.stop_queue(q); !r)
          return tl::unexpected(fmt::format("stop queue {}: {}", q, r.error()));
      return {};
    };
    if (auto r = run(*mem); !r) return r;
    if (variant == 2) {
      auto other = frontend::GuestMemory::create({{kMemBase, kMemBytes}});
      if (!other) return tl::unexpected(other.error());
      if (auto r = client.set_mem_table(*other); !r)
        return tl::unexpected("second mem table: " + r.error());
      if (auto r = run(*other); !r) return r;
    }
    client.close();
    return {};
  }

  // One blk write (status OK) or one frame looped from TX to RX (net, loopback mode).
  Result<void, std::string> one_request(frontend::GuestMemory& m,
                                        std::vector<frontend::VirtioDriver>& drv,
                                        std::vector<frontend::RingNotifiers>& n) {
    auto buf = [&](std::uint64_t len) { return *m.alloc(len, 64); };
    auto kick = [&](std::uint32_t q) {
      std::uint64_t one = 1;
      if (drv[q].kick_needed()) (void)!::write(n[q].kick.get(), &one, 8);
    };
    auto wait = [&](std::uint32_t q) -> std::optional<frontend::UsedBuffer> {
      auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      while (std::chrono::steady_clock::now() < deadline) {
        if (auto u = drv[q].poll()) return u;
        drv[q].enable_interrupts();
        if (drv[q].more_used()) continue;
        pollfd p{n[q].call.get(), POLLIN, 0};
        if (::poll(&p, 1, 50) > 0) {
          std::uint64_t v;
          (void)!::read(n[q].call.get(), &v, 8);
        }
      }
      return std::nullopt;
    };
    if (args.kind == "blk") {
      Gpa hdr = buf(16), data = buf(4096), status = buf(1);
      std::uint8_t h[16] = {};
      std::uint32_t type = blk::kTOut;
      std::uint64_t sector = rng() % 64 * 8;
      std::memcpy(h, &type, 4);
      std::memcpy(h + 8, &sector, 8);
      std::memcpy(m.host(hdr, 16), h, 16);
      std::memset(m.host(data, 4096), static_cast<int>(sector), 4096);
      *m.host(status, 1) = 0xff;
      std::vector<frontend::DriverBuffer> b{
          {hdr, 16, false}, {data, 4096, false}, {status, 1, true}};
      if (auto id = drv[0].add(b); !id) return tl::unexpected("add: " + id.error());
      kick(0);
      if (!wait(0)) return tl::unexpected(std::string("blk write: no completion in 5 s"));
      if (*m.host(status, 1) != blk::kSOk)
        return tl::unexpected(fmt::format("blk write: status {}", *m.host(status, 1)));
      return {};
    }
    // net: an RX buffer, then a 12-byte virtio-net header and a 60-byte frame on TX.
    Gpa rx = buf(2048), tx = buf(72);
    std::vector<frontend::DriverBuffer> rb{{rx, 2048, true}};
    if (auto id = drv[0].add(rb); !id) return tl::unexpected("add rx: " + id.error());
    kick(0);
    std::uint8_t* f = m.host(tx, 72);
    std::memset(f, 0, 72);
    std::memset(f + 12, 0xff, 6);  // broadcast
    f[12 + 12] = 0x88;             // an ethertype nobody minds
    f[12 + 13] = 0xb5;
    std::vector<frontend::DriverBuffer> tb{{tx, 72, false}};
    if (auto id = drv[1].add(tb); !id) return tl::unexpected("add tx: " + id.error());
    kick(1);
    if (!wait(1)) return tl::unexpected(std::string("net tx: no completion in 5 s"));
    auto got = wait(0);
    if (!got) return tl::unexpected(std::string("net rx: the looped frame did not arrive in 5 s"));
    if (got->len != 72) return tl::unexpected(fmt::format("net rx: {} bytes, not 72", got->len));
    return {};
  }

  // Hostile sessions; the daemon must refuse them and live on. Returns what was sent.
  std::string hostile(unsigned variant) {
    if (variant < 4) {
      UniqueFd fd = connect_raw(daemon.socket);
      if (!fd.valid()) return "connect failed";
      std::uint8_t junk[64];
      for (auto& b : junk) b = static_cast<std::uint8_t>(rng());
      std::uint32_t h[3];
      switch (variant) {
        case 0:  // garbage
          write_all(fd.get(), junk, 12 + rng() % 52);
          break;
        case 1:  // a payload size far beyond the maximum
          h[0] = static_cast<std::uint32_t>(FrontendRequest::set_mem_table);
          h[1] = kVersion;
          h[2] = 0x7fffffff;
          write_all(fd.get(), h, sizeof h);
          break;
        case 2:  // cut inside the header
          h[0] = static_cast<std::uint32_t>(FrontendRequest::get_features);
          h[1] = kVersion;
          write_all(fd.get(), h, 1 + rng() % 11);
          break;
        default:  // cut inside a payload
          h[0] = static_cast<std::uint32_t>(FrontendRequest::set_vring_addr);
          h[1] = kVersion;
          h[2] = sizeof(VringAddr);
          write_all(fd.get(), h, sizeof h);
          write_all(fd.get(), junk, 1 + rng() % (sizeof(VringAddr) - 1));
          break;
      }
      finish_raw(std::move(fd));
      return "raw";
    }
    auto c = negotiated();
    if (!c) return "negotiate failed: " + c.error();
    FrontendClient& client = **c;
    Message m;
    switch (variant) {
      case 4: {  // region larger than its memfd
        MemRegion r{kMemBase, 1ull << 30, kMemBase.value, 0};
        std::vector<UniqueFd> fds;
        fds.push_back(memfd(4096));
        m = *make_mem_table(std::span(&r, 1), std::move(fds));
        break;
      }
      case 5: {  // an fd that cannot be mapped (a pipe)
        int p[2];
        if (::pipe2(p, O_CLOEXEC) != 0) return "pipe failed";
        ::close(p[1]);
        MemRegion r{kMemBase, 4096, kMemBase.value, 0};
        std::vector<UniqueFd> fds;
        fds.emplace_back(p[0]);
        m = *make_mem_table(std::span(&r, 1), std::move(fds));
        break;
      }
      case 6: {  // offset beyond the fd, and one fd too many for the message
        MemRegion r{kMemBase, 4096, kMemBase.value, 1ull << 40};
        std::vector<UniqueFd> fds;
        fds.push_back(memfd(4096));
        m = *make_mem_table(std::span(&r, 1), std::move(fds));
        m.fds.push_back(memfd(4096));
        break;
      }
      case 7:  // fds on a request that takes none
        m = make_request(FrontendRequest::set_vring_num, VringState{0, 64});
        m.fds.push_back(memfd(4096));
        m.fds.emplace_back(::eventfd(0, EFD_CLOEXEC));
        break;
      case 8:  // a ring of impossible size, then a kick fd that is not an eventfd
        (void)client.request_ack(make_request(FrontendRequest::set_vring_num, VringState{0, 3}));
        m = make_vring_file(FrontendRequest::set_vring_kick, 0, memfd(4096));
        break;
      case 9:  // a log larger than its fd
        m = make_log_base(LogDesc{1ull << 30, 0}, memfd(4096));
        break;
      default:  // a memory table announcing more regions than it carries
        m = make_request(FrontendRequest::set_mem_table, MemTableHeader{8, 0});
        break;
    }
    m.flags |= kFlagNeedReply;
    (void)client.send(m);
    // The daemon answered (a refusal) or hung up; either way it must still serve.
    (void)client.request_reply(make_request(FrontendRequest::get_features));
    client.close();
    return "client";
  }
};

}  // namespace

int main(int argc, char** argv) {
  Args a = parse(argc, argv);
  ::signal(SIGPIPE, SIG_IGN);
  char tmpl[] = "/tmp/vhost-soak-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) usage("mkdtemp failed");
  std::string dir = tmpl;
  auto d = spawn(a, dir);
  if (!d) {
    std::fprintf(stderr, "vhost_soak: %s\n", d.error().c_str());
    return 1;
  }
  Daemon daemon = *d;
  std::mt19937_64 rng(a.seed);
  Session s{a, daemon, rng};
  std::vector<Sample> samples;
  std::optional<Sample> baseline;
  std::vector<std::string> failures;
  std::uint64_t good = 0, bad = 0;
  auto t0 = std::chrono::steady_clock::now();

  // Samples with the daemon quiet: a fresh connection it answers is served after every
  // earlier one has been torn down.
  auto take_sample = [&](std::uint64_t cycle) -> bool {
    auto c = FrontendClient::connect(daemon.socket);
    if (!c || !(*c)->request_reply(make_request(FrontendRequest::get_features))) {
      failures.push_back(fmt::format("cycle {}: the daemon does not answer", cycle));
      return false;
    }
    auto smp = sample(daemon.pid, cycle);
    (*c)->close();
    if (!smp) {
      failures.push_back(fmt::format("cycle {}: cannot read /proc/{}", cycle, daemon.pid));
      return false;
    }
    samples.push_back(*smp);
    std::printf("sample cycle=%llu fds=%ld maps=%ld rss_kib=%ld\n",
                static_cast<unsigned long long>(cycle), smp->fds, smp->maps, smp->rss_kib);
    std::fflush(stdout);
    if (!baseline && cycle >= a.warmup) baseline = *smp;
    return true;
  };

  bool ok = take_sample(0);
  for (std::uint64_t i = 1; ok && i <= a.cycles; ++i) {
    // 3 in 5 well-formed (4 variants), 2 in 5 hostile (11 variants).
    unsigned pick = static_cast<unsigned>(rng() % 100);
    if (pick < 60) {
      auto r = s.well_formed(pick % 4);
      ++good;
      if (!r) {
        failures.push_back(
            fmt::format("cycle {}: well-formed session {} failed: {}", i, pick % 4, r.error()));
        if (failures.size() > 5) ok = false;
      }
    } else {
      (void)s.hostile(pick % 11);
      ++bad;
    }
    if (!alive(daemon.pid)) {
      failures.push_back(fmt::format("cycle {}: the daemon died", i));
      ok = false;
      break;
    }
    if (i % a.sample_every == 0 || i == a.cycles) ok = take_sample(i) && ok;
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  long fd_growth = 0, maps_growth = 0, rss_growth = 0;
  if (baseline) {
    for (const Sample& smp : samples) {
      if (smp.cycle <= baseline->cycle) continue;
      fd_growth = std::max(fd_growth, smp.fds - baseline->fds);
      maps_growth = std::max(maps_growth, smp.maps - baseline->maps);
      rss_growth = std::max(rss_growth, smp.rss_kib - baseline->rss_kib);
    }
    if (fd_growth > a.fd_tolerance)
      failures.push_back(
          fmt::format("open fds grew by {} (tolerance {})", fd_growth, a.fd_tolerance));
    if (maps_growth > a.maps_tolerance)
      failures.push_back(
          fmt::format("mappings grew by {} (tolerance {})", maps_growth, a.maps_tolerance));
    if (rss_growth > a.rss_tolerance_kib)
      failures.push_back(
          fmt::format("RSS grew by {} KiB (tolerance {} KiB)", rss_growth, a.rss_tolerance_kib));
  } else {
    failures.push_back("no baseline sample");
  }

  // The daemon ends cleanly on SIGTERM (under ASan, LeakSanitizer runs at its exit).
  int status = 0;
  if (alive(daemon.pid)) {
    ::kill(daemon.pid, SIGTERM);
    for (int i = 0; i < 500 && ::waitpid(daemon.pid, &status, WNOHANG) == 0; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      ::kill(daemon.pid, SIGKILL);
      ::waitpid(daemon.pid, nullptr, 0);
      failures.push_back(
          fmt::format("the daemon did not exit with 0 on SIGTERM (status {:#x})", status));
    }
  }

  std::printf(
      "soak %s: %llu cycles (%llu well-formed, %llu hostile) in %.1f s; growth over "
      "the baseline at cycle %llu: fds %+ld, maps %+ld, rss %+ld KiB\n",
      a.kind.c_str(), static_cast<unsigned long long>(good + bad),
      static_cast<unsigned long long>(good), static_cast<unsigned long long>(bad), secs,
      static_cast<unsigned long long>(baseline ? baseline->cycle : 0), fd_growth, maps_growth,
      rss_growth);
  if (a.bench) {
    auto bench = [&](const char* what, double v, const char* unit) {
      std::printf("BENCH name=soak_%s_%s value=%g unit=%s\n", a.kind.c_str(), what, v, unit);
    };
    bench("cycles", static_cast<double>(good + bad), "cycles");
    bench("seconds", secs, "s");
    bench("fd_growth", static_cast<double>(fd_growth), "fds");
    bench("maps_growth", static_cast<double>(maps_growth), "mappings");
    bench("rss_growth", static_cast<double>(rss_growth), "KiB");
    if (baseline) {
      bench("baseline_fds", static_cast<double>(baseline->fds), "fds");
      bench("baseline_maps", static_cast<double>(baseline->maps), "mappings");
      bench("baseline_rss", static_cast<double>(baseline->rss_kib), "KiB");
    }
  }
  if (!failures.empty()) {
    for (const auto& f : failures) std::printf("FAIL %s\n", f.c_str());
    std::printf("daemon log: %s (last lines below)\n", daemon.log.c_str());
    std::fflush(stdout);
    std::string tail = "tail -n 20 '" + daemon.log + "'";
    (void)!std::system(tail.c_str());
    return 1;
  }
  if (a.keep) {
    std::printf("daemon log: %s\n", daemon.log.c_str());
  } else {
    std::string cleanup = "rm -rf '" + dir + "'";
    (void)!std::system(cleanup.c_str());
  }
  return 0;
}
