// GuestMemory: memfd-backed guest RAM for the frontend side.
#include "vhostkit/frontend/guest_memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include <fmt/format.h>

namespace vhostkit::frontend {

Result<GuestMemory, std::string> GuestMemory::create(const std::vector<GuestRegionLayout>& layout) {
  GuestMemory m;
  for (std::size_t i = 0; i < layout.size(); ++i) {
    const GuestRegionLayout& l = layout[i];
    if (l.size == 0 || l.size % 4096 != 0)
      return unexpected(fmt::format("region {}: size {:#x} is not a positive multiple of 4 KiB", i, l.size));
    GuestRegion r;
    r.gpa = l.gpa;
    r.size = l.size;
    if (l.alias_of >= 0) {
      if (static_cast<std::size_t>(l.alias_of) >= i || layout[l.alias_of].alias_of >= 0)
        return unexpected(fmt::format("region {}: bad alias_of {}", i, l.alias_of));
      const GuestRegion& src = m.regions_[static_cast<std::size_t>(l.alias_of)];
      if (l.alias_offset % 4096 != 0 || l.alias_offset + l.size > src.size)
        return unexpected(fmt::format("region {}: alias range outside region {}", i, l.alias_of));
      r.fd = ::dup(src.fd);
      r.file_offset = src.file_offset + l.alias_offset;
      r.alias = true;
    } else {
      r.fd = ::memfd_create(fmt::format("vhostkit-guest-{}", i).c_str(), MFD_CLOEXEC);
      if (r.fd < 0 || ::ftruncate(r.fd, static_cast<off_t>(l.size)) != 0) {
        if (r.fd >= 0) ::close(r.fd);
        return unexpected(fmt::format("region {}: memfd of {:#x} bytes failed", i, l.size));
      }
    }
    void* p = ::mmap(nullptr, r.size, PROT_READ | PROT_WRITE, MAP_SHARED, r.fd,
                     static_cast<off_t>(r.file_offset));
    if (p == MAP_FAILED) {
      ::close(r.fd);
      return unexpected(fmt::format("region {}: mmap failed", i));
    }
    r.host = static_cast<std::uint8_t*>(p);
    m.regions_.push_back(r);
    m.mapping_len_.push_back(r.size);
  }
  return m;
}

GuestMemory::GuestMemory(GuestMemory&& other) noexcept { *this = std::move(other); }

GuestMemory& GuestMemory::operator=(GuestMemory&& other) noexcept {
  if (this != &other) {
    release();
    regions_ = std::move(other.regions_);
    mapping_len_ = std::move(other.mapping_len_);
    alloc_region_ = other.alloc_region_;
    alloc_next_ = other.alloc_next_;
    other.regions_.clear();
    other.mapping_len_.clear();
  }
  return *this;
}

GuestMemory::~GuestMemory() { release(); }

void GuestMemory::release() {
  for (std::size_t i = 0; i < regions_.size(); ++i) {
    ::munmap(regions_[i].host, mapping_len_[i]);
    ::close(regions_[i].fd);
  }
  regions_.clear();
  mapping_len_.clear();
}

std::uint8_t* GuestMemory::host(Gpa gpa, std::uint64_t len) const {
  for (const GuestRegion& r : regions_) {
    if (r.contains(gpa) && len <= r.size - (gpa - r.gpa)) return r.host + (gpa - r.gpa);
  }
  return nullptr;
}

bool GuestMemory::read(Gpa gpa, std::span<std::uint8_t> out) const {
  std::uint64_t done = 0;
  while (done < out.size()) {
    Gpa g = gpa + done;
    const GuestRegion* r = nullptr;
    for (const GuestRegion& x : regions_)
      if (x.contains(g)) r = &x;
    if (r == nullptr) return false;
    std::uint64_t n = std::min<std::uint64_t>(out.size() - done, r->size - (g - r->gpa));
    std::memcpy(out.data() + done, r->host + (g - r->gpa), n);
    done += n;
  }
  return true;
}

bool GuestMemory::write(Gpa gpa, std::span<const std::uint8_t> in) {
  std::uint64_t done = 0;
  while (done < in.size()) {
    Gpa g = gpa + done;
    const GuestRegion* r = nullptr;
    for (const GuestRegion& x : regions_)
      if (x.contains(g)) r = &x;
    if (r == nullptr) return false;
    std::uint64_t n = std::min<std::uint64_t>(in.size() - done, r->size - (g - r->gpa));
    std::memcpy(r->host + (g - r->gpa), in.data() + done, n);
    done += n;
  }
  return true;
}

std::optional<Uaddr> GuestMemory::uaddr_of(Gpa gpa) const {
  for (const GuestRegion& r : regions_)
    if (r.contains(gpa)) return r.uaddr() + (gpa - r.gpa);
  return std::nullopt;
}

std::vector<GpaRange> GuestMemory::split_by_region(Gpa gpa, std::uint64_t len) const {
  std::vector<GpaRange> out;
  std::uint64_t done = 0;
  while (done < len) {
    Gpa g = gpa + done;
    const GuestRegion* r = nullptr;
    for (const GuestRegion& x : regions_)
      if (!x.alias && x.contains(g)) r = &x;
    if (r == nullptr) return {};
    std::uint64_t n = std::min<std::uint64_t>(len - done, r->size - (g - r->gpa));
    out.push_back(GpaRange{g, n});
    done += n;
  }
  return out;
}

RegionSpec GuestMemory::region_spec(std::size_t index) const {
  const GuestRegion& r = regions_[index];
  RegionSpec s;
  s.fd = UniqueFd(::dup(r.fd));
  s.mmap_offset = r.file_offset;
  s.size = r.size;
  s.gpa = r.gpa;
  s.uaddr = r.uaddr();
  return s;
}

std::vector<RegionSpec> GuestMemory::region_specs() const {
  std::vector<RegionSpec> v;
  for (std::size_t i = 0; i < regions_.size(); ++i) v.push_back(region_spec(i));
  return v;
}

Gpa GuestMemory::end_gpa() const {
  Gpa end(0);
  for (const GuestRegion& r : regions_) end = std::max(end, r.gpa + r.size);
  return end;
}

std::optional<Gpa> GuestMemory::alloc(std::uint64_t size, std::uint64_t align) {
  while (alloc_region_ < regions_.size()) {
    const GuestRegion& r = regions_[alloc_region_];
    if (!r.alias) {
      // Align the GPA, not the offset: regions may start at odd GPAs.
      std::uint64_t g = (r.gpa.value + alloc_next_ + align - 1) & ~(align - 1);
      std::uint64_t off = g - r.gpa.value;
      if (off + size <= r.size) {
        alloc_next_ = off + size;
        return Gpa(g);
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
