// GuestMemory: memfd-backed guest RAM for the frontend side.
#include "vhostkit/frontend/guest_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include <fmt/format.h>

namespace vhostkit::frontend {

namespace {

constexpr std::uint64_t kPage = 4096;
// Carved regions start this far into the shared memfd and are separated by gaps of the
// same size: non-zero, not a multiple of any region size used in tests, page-aligned.
constexpr std::uint64_t kCarveGap = 0x3000;

Result<UniqueFd, std::string> make_memfd(const std::string& name, std::uint64_t size) {
  UniqueFd fd(::memfd_create(name.c_str(), MFD_CLOEXEC));
  if (!fd.valid()) return unexpected(fmt::format("memfd_create({}): errno {}", name, errno));
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0)
    return unexpected(fmt::format("ftruncate({}, {:#x}): errno {}", name, size, errno));
  return fd;
}

}  // namespace

Result<GuestMemory, std::string> GuestMemory::create(std::vector<GuestRegionLayout> layout) {
  // Validate the whole layout before creating anything.
  for (std::size_t i = 0; i < layout.size(); ++i) {
    const GuestRegionLayout& l = layout[i];
    if (l.size == 0 || l.size % kPage != 0)
      return unexpected(
          fmt::format("region {}: size {:#x} is not a positive multiple of 4 KiB", i, l.size));
    if (!l.gpa.checked_end(l.size))
      return unexpected(fmt::format("region {}: gpa {:#x} + size wraps", i, l.gpa.value));
    if (l.alias_of) {
      if (*l.alias_of >= i) return unexpected(fmt::format("region {}: bad alias_of", i));
      const GuestRegionLayout& src = layout[*l.alias_of];
      if (l.alias_offset % kPage != 0 || l.alias_offset > src.size ||
          l.size > src.size - l.alias_offset)
        return unexpected(fmt::format("region {}: alias range outside region {}", i, *l.alias_of));
    }
    for (std::size_t j = 0; j < i; ++j) {
      const GuestRegionLayout& o = layout[j];
      if (l.gpa.value < o.gpa.value + o.size && o.gpa.value < l.gpa.value + l.size)
        return unexpected(fmt::format("region {} overlaps region {} in GPA space", i, j));
    }
  }

  GuestMemory m;
  // The shared memfd for carved regions: each at a non-zero offset, gaps in between.
  std::vector<std::uint64_t> carve_offset(layout.size(), 0);
  std::uint64_t carve_end = 0;
  for (std::size_t i = 0; i < layout.size(); ++i) {
    if (layout[i].alias_of || layout[i].separate_fd) continue;
    carve_offset[i] = carve_end + kCarveGap;
    carve_end = carve_offset[i] + layout[i].size;
  }
  int shared_fd = -1;
  if (carve_end != 0) {
    auto fd = make_memfd("vhostkit-guest-shared", carve_end + kCarveGap);
    if (!fd) return unexpected(fd.error());
    shared_fd = fd->get();
    m.files_.push_back(std::move(*fd));
  }

  for (std::size_t i = 0; i < layout.size(); ++i) {
    const GuestRegionLayout& l = layout[i];
    GuestRegion r;
    r.gpa = l.gpa;
    r.size = l.size;
    if (l.alias_of) {
      // QEMU's alias: the same RAM block, so the same fd and host bytes at an offset.
      const GuestRegion& src = m.regions_[*l.alias_of];
      r.fd = src.fd;
      r.file_offset = src.file_offset + l.alias_offset;
      r.host = src.host + l.alias_offset;
      r.alias = true;
      m.regions_.push_back(r);
      continue;
    }
    if (l.separate_fd) {
      auto fd = make_memfd(fmt::format("vhostkit-guest-{}", i), l.size);
      if (!fd) return unexpected(fd.error());
      r.fd = fd->get();
      m.files_.push_back(std::move(*fd));
    } else {
      r.fd = shared_fd;
      r.file_offset = carve_offset[i];
    }
    void* p = ::mmap(nullptr, r.size, PROT_READ | PROT_WRITE, MAP_SHARED, r.fd,
                     static_cast<off_t>(r.file_offset));
    if (p == MAP_FAILED) return unexpected(fmt::format("region {}: mmap: errno {}", i, errno));
    m.mappings_.push_back(Mapping{p, r.size});
    r.host = static_cast<std::uint8_t*>(p);
    m.regions_.push_back(r);
  }
  return m;
}

GuestMemory::GuestMemory(GuestMemory&& other) noexcept {
  *this = std::move(other);
}

GuestMemory& GuestMemory::operator=(GuestMemory&& other) noexcept {
  if (this != &other) {
    release();
    regions_ = std::exchange(other.regions_, {});
    files_ = std::exchange(other.files_, {});
    mappings_ = std::exchange(other.mappings_, {});
    alloc_region_ = std::exchange(other.alloc_region_, 0);
    alloc_next_ = std::exchange(other.alloc_next_, 0);
  }
  return *this;
}

GuestMemory::~GuestMemory() {
  release();
}

void GuestMemory::release() {
  for (const Mapping& mp : mappings_) ::munmap(mp.addr, mp.len);
  mappings_.clear();
  files_.clear();
  regions_.clear();
}

const GuestRegion* GuestMemory::find(Gpa gpa) const {
  for (const GuestRegion& r : regions_)
    if (r.contains(gpa)) return &r;
  return nullptr;
}

std::uint8_t* GuestMemory::host(Gpa gpa, std::uint64_t len) const {
  const GuestRegion* r = find(gpa);
  if (r == nullptr || len > r->size - (gpa - r->gpa)) return nullptr;
  return r->host + (gpa - r->gpa);
}

bool GuestMemory::read(Gpa gpa, std::span<std::uint8_t> out) const {
  if (!gpa.checked_end(out.size())) return false;
  std::uint64_t done = 0;
  while (done < out.size()) {
    Gpa g = gpa + done;
    const GuestRegion* r = find(g);
    if (r == nullptr) return false;
    std::uint64_t n = std::min<std::uint64_t>(out.size() - done, r->size - (g - r->gpa));
    std::memcpy(out.data() + done, r->host + (g - r->gpa), n);
    done += n;
  }
  return true;
}

bool GuestMemory::write(Gpa gpa, std::span<const std::uint8_t> in) {
  if (!gpa.checked_end(in.size())) return false;
  std::uint64_t done = 0;
  while (done < in.size()) {
    Gpa g = gpa + done;
    const GuestRegion* r = find(g);
    if (r == nullptr) return false;
    std::uint64_t n = std::min<std::uint64_t>(in.size() - done, r->size - (g - r->gpa));
    std::memcpy(r->host + (g - r->gpa), in.data() + done, n);
    done += n;
  }
  return true;
}

std::optional<Uaddr> GuestMemory::uaddr_of(Gpa gpa) const {
  const GuestRegion* r = find(gpa);
  if (r == nullptr) return std::nullopt;
  return r->uaddr() + (gpa - r->gpa);
}

std::vector<GpaRange> GuestMemory::split_by_region(Gpa gpa, std::uint64_t len) const {
  if (!gpa.checked_end(len)) return {};
  std::vector<GpaRange> out;
  std::uint64_t done = 0;
  while (done < len) {
    Gpa g = gpa + done;
    const GuestRegion* r = find(g);
    if (r == nullptr) return {};
    std::uint64_t n = std::min<std::uint64_t>(len - done, r->size - (g - r->gpa));
    out.push_back(GpaRange{g, n});
    done += n;
  }
  return out;
}

RegionSpec GuestMemory::region_spec(std::size_t index) const {
  const GuestRegion& r = regions_.at(index);
  RegionSpec s;
  s.fd = UniqueFd(::fcntl(r.fd, F_DUPFD_CLOEXEC, 0));
  s.mmap_offset = r.file_offset;
  s.size = r.size;
  s.gpa = r.gpa;
  s.uaddr = r.uaddr();
  return s;
}

std::vector<RegionSpec> GuestMemory::region_specs() const {
  std::vector<RegionSpec> v;
  v.reserve(regions_.size());
  for (std::size_t i = 0; i < regions_.size(); ++i) v.push_back(region_spec(i));
  return v;
}

Gpa GuestMemory::end_gpa() const {
  Gpa end(0);
  for (const GuestRegion& r : regions_) end = std::max(end, r.gpa + r.size);
  return end;
}

std::optional<Gpa> GuestMemory::alloc(std::uint64_t size, std::uint64_t align) {
  if (align == 0 || (align & (align - 1)) != 0) return std::nullopt;
  while (alloc_region_ < regions_.size()) {
    const GuestRegion& r = regions_[alloc_region_];
    if (!r.alias) {
      // Align the GPA, not the offset: regions may start at any page.
      std::uint64_t want = r.gpa.value + alloc_next_;
      std::uint64_t g = (want + align - 1) & ~(align - 1);
      if (g >= want) {  // no wrap
        std::uint64_t off = g - r.gpa.value;
        if (off <= r.size && size <= r.size - off) {
          alloc_next_ = off + size;
          return Gpa(g);
        }
      }
    }
    ++alloc_region_;
    alloc_next_ = 0;
  }
  return std::nullopt;
}

void GuestMemory::reset_allocator() {
  alloc_region_ = 0;
  alloc_next_ = 0;
}

}  // namespace vhostkit::frontend
