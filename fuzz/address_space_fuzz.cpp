// Fuzz target: hostile operation sequences against the foundation layers (memory table,
// device IOTLB, dirty log, translate path): any sizes, offsets, GPAs, uaddrs, IOVAs,
// lengths and permissions. Beyond the sanitizers it checks that every translated
// segment lies inside one region of the translator's memory snapshot, at the host
// address the region maps that GPA to, and that no fd leaks.
#include <dirent.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "fuzz_input.h"
#include "vhostkit/translate.h"

namespace {

using namespace vhostkit;

constexpr std::uint64_t kFileSize = 64 * 1024;

using fuzzing::Input;

int backing(unsigned i) {
  static int fds[2] = {-1, -1};
  if (fds[i] < 0) {
    fds[i] = ::memfd_create("as-fuzz", MFD_CLOEXEC);
    if (fds[i] < 0 || ::ftruncate(fds[i], kFileSize) != 0) std::abort();
  }
  return fds[i];
}

std::size_t fd_count() {
  std::size_t n = 0;
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (::readdir(d) != nullptr) ++n;
    ::closedir(d);
  }
  return n;
}

// Small values most of the time (so operations hit each other), anything sometimes.
std::uint64_t addr(Input& in) {
  auto sel = in.take<std::uint8_t>();
  if (sel < 200) return static_cast<std::uint64_t>(in.take<std::uint16_t>()) * 16;
  return in.take<std::uint64_t>();
}

RegionSpec region(Input& in) {
  RegionSpec s;
  auto which = in.take<std::uint8_t>();
  if (which < 240)
    s.fd = UniqueFd(::dup(backing(which & 1)));
  else if (which < 250)
    s.fd = UniqueFd(-1);
  else
    s.fd = UniqueFd(::dup(STDIN_FILENO));  // not a regular file, or closed
  s.mmap_offset = addr(in) % (2 * kFileSize);
  s.size = addr(in) % (kFileSize + 4096);
  s.gpa = Gpa(addr(in));
  s.uaddr = Uaddr(0x7f0000000000 + addr(in));
  return s;
}

void check(const std::shared_ptr<const MemorySnapshot>& mem, std::span<const Segment> segs) {
  for (const Segment& s : segs) {
    const Region* r = mem->find(s.gpa);
    if (r == nullptr) std::abort();
    if (s.gpa - r->gpa + s.len > r->size) std::abort();
    if (s.host != r->host + (s.gpa - r->gpa)) std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  (void)backing(0);
  (void)backing(1);
  const std::size_t fds_at_start = fd_count();
  {
    Input in{data, size};
    AddressSpace space(MemoryLimits{.max_regions = 8}, IotlbLimits{.max_entries = 64});
    std::vector<std::uint8_t> log_bits(1 + in.take<std::uint8_t>(), 0);
    Translator tr(space, (in.take<std::uint8_t>() & 1) ? LogMode::batched : LogMode::immediate);
    std::vector<Segment> segs(8);
    std::vector<std::uint8_t> buf;
    while (!in.empty()) {
      switch (in.take<std::uint8_t>() % 13) {
        case 0: {
          std::vector<RegionSpec> specs;
          auto n = in.take<std::uint8_t>() % 5;
          for (unsigned i = 0; i < n; ++i) specs.push_back(region(in));
          (void)space.set_mem_table(std::move(specs));
          break;
        }
        case 1: (void)space.add_region(region(in)); break;
        case 2: {
          auto g = Gpa(addr(in));
          (void)space.remove_region(g, addr(in));
          break;
        }
        case 3: {
          auto iova = Iova(addr(in));
          auto len = addr(in);
          (void)space.iotlb_update(iova, len, Gpa(addr(in)),
                                   static_cast<Access>(in.take<std::uint8_t>() % 4));
          break;
        }
        case 4: {
          auto iova = Iova(addr(in));
          auto len = addr(in);
          (void)space.iotlb_update_uaddr(iova, len, Uaddr(0x7f0000000000 + addr(in)),
                                         static_cast<Access>(in.take<std::uint8_t>() % 4));
          break;
        }
        case 5: {
          auto iova = Iova(addr(in));
          (void)space.iotlb_invalidate(iova, addr(in));
          break;
        }
        case 6: space.iotlb_flush(); break;
        case 7: space.set_iommu(in.take<std::uint8_t>() & 1); break;
        case 8:
          (void)space.set_log(DirtyLog::over(log_bits));
          space.set_logging(in.take<std::uint8_t>() & 1);
          break;
        case 9: {
          auto a = Iova(addr(in));
          buf.assign(in.take<std::uint16_t>() % 9000, 0xa5);
          tr.begin_burst();
          (void)tr.write(a, buf);
          (void)tr.end_burst();
          break;
        }
        case 10: {
          auto a = Iova(addr(in));
          buf.assign(in.take<std::uint16_t>() % 9000, 0);
          (void)tr.read(a, buf);
          break;
        }
        case 11: {
          auto a = Iova(addr(in));
          auto len = addr(in);
          auto access = static_cast<Access>(1 + in.take<std::uint8_t>() % 3);
          auto n = tr.translate(a, len == 0 ? 1 : len, access, segs);
          if (n) check(tr.memory(), std::span(segs.data(), *n));
          break;
        }
        case 12: {
          auto a = Iova(addr(in));
          auto len = 1 + in.take<std::uint16_t>();
          auto n = tr.translate(a, len, Access::write, segs);
          if (n)
            for (std::size_t i = 0; i < *n; ++i) (void)tr.log_write(segs[i]);
          (void)tr.flush_log();
          break;
        }
      }
    }
  }
  if (fd_count() != fds_at_start) std::abort();  // every fd was closed
  return 0;
}
