// Memory table: validation, mapping and snapshot publication.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "vhostkit/detail/sorted_search.h"
#include "vhostkit/memory.h"

namespace vhostkit {

namespace detail {

class Mapping {
 public:
  Mapping(void* base, std::size_t len) : base_(base), len_(len) {}
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { ::munmap(base_, len_); }

  [[nodiscard]] std::uint8_t* base() const { return static_cast<std::uint8_t*>(base_); }

 private:
  void* base_;
  std::size_t len_;
};

}  // namespace detail

const char* to_string(Access a) {
  switch (a) {
    case Access::none: return "none";
    case Access::read: return "read";
    case Access::write: return "write";
    case Access::read_write: return "read-write";
  }
  return "?";
}

const char* to_string(MemoryErrc e) {
  switch (e) {
    case MemoryErrc::zero_size: return "region has zero size";
    case MemoryErrc::gpa_overflow: return "guest-physical range overflows";
    case MemoryErrc::uaddr_overflow: return "frontend address range overflows";
    case MemoryErrc::offset_overflow: return "mmap offset + size overflows";
    case MemoryErrc::gpa_overlap: return "guest-physical ranges overlap";
    case MemoryErrc::uaddr_conflict: return "frontend address ranges overlap with different memory";
    case MemoryErrc::beyond_file: return "region extends beyond the end of its file";
    case MemoryErrc::too_many_regions: return "too many memory regions";
    case MemoryErrc::bad_fd: return "bad memory region fd";
    case MemoryErrc::mmap_failed: return "mmap of memory region failed";
    case MemoryErrc::no_such_region: return "no such memory region";
    case MemoryErrc::not_mapped: return "address not mapped by any memory region";
  }
  return "unknown memory error";
}

std::string MemoryError::message() const {
  std::string m = fmt::format("{} (gpa {:#x}, size {:#x})", to_string(code), addr, size);
  if (sys_errno != 0) m += fmt::format(": {}", std::strerror(sys_errno));
  if (code == MemoryErrc::too_many_regions) m += fmt::format(" (limit {})", limit);
  if (code == MemoryErrc::beyond_file) m += fmt::format(" (file size {:#x})", limit);
  return m;
}

namespace {

MemoryError error(MemoryErrc code, Gpa gpa, std::uint64_t size, int err = 0) {
  return MemoryError{code, gpa.value, size, err, 0};
}

std::uint64_t map_alignment(const struct stat& st) {
  auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  auto blk = static_cast<std::uint64_t>(st.st_blksize);
  // hugetlbfs reports its huge page size as the block size; mappings must be aligned
  // to it. tmpfs/memfd report the base page size.
  if (blk > page && (blk & (blk - 1)) == 0 && blk <= (1ULL << 30)) return blk;
  return page;
}

// Validates a spec and maps it; on success the fd has been consumed (closed).
Result<Region, MemoryError> map_region(RegionSpec& spec) {
  if (auto ok = validate_region(spec); !ok) return unexpected(ok.error());
  struct stat st {};
  if (::fstat(spec.fd.get(), &st) != 0)
    return unexpected(error(MemoryErrc::bad_fd, spec.gpa, spec.size, errno));
  std::uint64_t align = map_alignment(st);
  std::uint64_t map_off = spec.mmap_offset & ~(align - 1);
  std::uint64_t lead = spec.mmap_offset - map_off;
  std::uint64_t map_len = lead + spec.size;
  map_len = (map_len + align - 1) & ~(align - 1);
  void* p = ::mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                   spec.fd.get(), static_cast<off_t>(map_off));
  if (p == MAP_FAILED)
    return unexpected(error(MemoryErrc::mmap_failed, spec.gpa, spec.size, errno));
  auto mapping = std::make_shared<const detail::Mapping>(p, map_len);
  Region r;
  r.gpa = spec.gpa;
  r.size = spec.size;
  r.uaddr = spec.uaddr;
  r.mmap_offset = spec.mmap_offset;
  r.host = mapping->base() + lead;
  r.file_dev = static_cast<std::uint64_t>(st.st_dev);
  r.file_ino = static_cast<std::uint64_t>(st.st_ino);
  r.mapping = std::move(mapping);
  spec.fd.reset();  // the mapping keeps the memory; the fd is no longer needed
  return r;
}

bool same_file(const Region& a, const Region& b) {
  return a.file_dev == b.file_dev && a.file_ino == b.file_ino;
}

// Checks a complete set of regions for mutual consistency.
Result<void, MemoryError> check_set(std::vector<Region>& regions, const MemoryLimits& limits) {
  if (regions.size() > limits.max_regions) {
    MemoryError e = error(MemoryErrc::too_many_regions, regions.back().gpa, regions.back().size);
    e.limit = limits.max_regions;
    return unexpected(e);
  }
  std::sort(regions.begin(), regions.end(),
            [](const Region& a, const Region& b) { return a.gpa < b.gpa; });
  for (std::size_t i = 1; i < regions.size(); ++i) {
    if (regions[i].gpa < regions[i - 1].gpa_end())
      return unexpected(error(MemoryErrc::gpa_overlap, regions[i].gpa, regions[i].size));
  }
  // Overlapping frontend addresses are only consistent if they are the same bytes of
  // the same file (an alias); anything else would make uaddr -> GPA ambiguous.
  for (std::size_t i = 0; i < regions.size(); ++i) {
    for (std::size_t j = i + 1; j < regions.size(); ++j) {
      const Region& a = regions[i];
      const Region& b = regions[j];
      std::uint64_t a_end = a.uaddr.value + a.size;
      std::uint64_t b_end = b.uaddr.value + b.size;
      bool overlap = a.uaddr.value < b_end && b.uaddr.value < a_end;
      if (!overlap) continue;
      bool consistent =
          same_file(a, b) && a.uaddr.value - a.mmap_offset == b.uaddr.value - b.mmap_offset;
      if (!consistent) return unexpected(error(MemoryErrc::uaddr_conflict, b.gpa, b.size));
    }
  }
  return {};
}

}  // namespace

Result<void, MemoryError> validate_region(const RegionSpec& spec) {
  if (spec.size == 0) return unexpected(error(MemoryErrc::zero_size, spec.gpa, 0));
  if (!spec.gpa.checked_end(spec.size))
    return unexpected(error(MemoryErrc::gpa_overflow, spec.gpa, spec.size));
  if (!spec.uaddr.checked_end(spec.size))
    return unexpected(error(MemoryErrc::uaddr_overflow, spec.gpa, spec.size));
  auto file_end = checked_add(spec.mmap_offset, spec.size);
  if (!file_end || *file_end > static_cast<std::uint64_t>(INT64_MAX))
    return unexpected(error(MemoryErrc::offset_overflow, spec.gpa, spec.size));
  struct stat st {};
  if (!spec.fd.valid() || ::fstat(spec.fd.get(), &st) != 0)
    return unexpected(
        error(MemoryErrc::bad_fd, spec.gpa, spec.size, spec.fd.valid() ? errno : EBADF));
  if (!S_ISREG(st.st_mode))
    return unexpected(error(MemoryErrc::bad_fd, spec.gpa, spec.size, EINVAL));
  if (*file_end > static_cast<std::uint64_t>(st.st_size)) {
    MemoryError e = error(MemoryErrc::beyond_file, spec.gpa, spec.size);
    e.limit = static_cast<std::uint64_t>(st.st_size);
    return unexpected(e);
  }
  return {};
}

const Region* MemorySnapshot::find(Gpa gpa) const {
  std::size_t n = detail::count_le(starts_.data(), starts_.size(), gpa.value);
  if (n == 0) return nullptr;
  const Region& r = regions_[n - 1];
  return r.contains(gpa) ? &r : nullptr;
}

Result<HostRange, MemoryError> MemorySnapshot::gpa_to_host(Gpa gpa) const {
  const Region* r = find(gpa);
  if (r == nullptr) return unexpected(error(MemoryErrc::not_mapped, gpa, 0));
  std::uint64_t off = gpa - r->gpa;
  return HostRange{r->host + off, r->size - off};
}

Result<GpaRange, MemoryError> MemorySnapshot::uaddr_to_gpa(Uaddr uaddr) const {
  const Region* best = nullptr;
  if (!has_aliases()) {
    // Without aliases uaddr ranges are disjoint: only the last start <= uaddr can match.
    auto it = std::upper_bound(
        by_uaddr_.begin(), by_uaddr_.end(), uaddr.value,
        [this](std::uint64_t v, std::uint32_t idx) { return v < regions_[idx].uaddr.value; });
    if (it != by_uaddr_.begin()) {
      const Region& r = regions_[*(it - 1)];
      if (uaddr.value - r.uaddr.value < r.size) best = &r;
    }
  } else {
    // Aliased regions may share uaddrs: take the lowest GPA (regions_ is GPA-sorted).
    for (const Region& r : regions_) {
      if (uaddr >= r.uaddr && uaddr.value - r.uaddr.value < r.size) {
        best = &r;
        break;
      }
    }
  }
  if (best == nullptr) return unexpected(MemoryError{MemoryErrc::not_mapped, uaddr.value, 0, 0, 0});
  std::uint64_t off = uaddr.value - best->uaddr.value;
  return GpaRange{best->gpa + off, best->size - off};
}

void MemorySnapshot::index() {
  starts_.clear();
  by_uaddr_.clear();
  aliases_.clear();
  end_gpa_ = Gpa(0);
  for (std::uint32_t i = 0; i < regions_.size(); ++i) {
    starts_.push_back(regions_[i].gpa.value);
    by_uaddr_.push_back(i);
    end_gpa_ = std::max(end_gpa_, regions_[i].gpa_end());
  }
  std::sort(by_uaddr_.begin(), by_uaddr_.end(), [this](std::uint32_t a, std::uint32_t b) {
    return std::pair(regions_[a].uaddr, regions_[a].gpa) <
           std::pair(regions_[b].uaddr, regions_[b].gpa);
  });
  for (std::size_t i = 0; i < regions_.size(); ++i) {
    for (std::size_t j = 0; j < regions_.size(); ++j) {
      if (i == j || !same_file(regions_[i], regions_[j])) continue;
      const Region& a = regions_[i];
      const Region& b = regions_[j];
      std::uint64_t lo = std::max(a.mmap_offset, b.mmap_offset);
      std::uint64_t hi = std::min(a.mmap_offset + a.size, b.mmap_offset + b.size);
      if (lo >= hi) continue;
      aliases_.push_back(
          Alias{a.gpa + (lo - a.mmap_offset), hi - lo, b.gpa + (lo - b.mmap_offset)});
    }
  }
}

MemoryTable::MemoryTable(MemoryLimits limits)
    : limits_(limits), current_(std::make_shared<const MemorySnapshot>()) {}

Result<void, MemoryError> MemoryTable::publish(std::vector<Region> regions) {
  if (auto ok = check_set(regions, limits_); !ok) return ok;
  auto snap = std::make_shared<MemorySnapshot>();
  snap->regions_ = std::move(regions);
  snap->index();
  std::lock_guard lock(mu_);
  snap->generation_ = generation_.load(std::memory_order_relaxed) + 1;
  current_ = std::move(snap);
  // Release: a reader that sees the new generation also sees the new snapshot.
  generation_.store(current_->generation_, std::memory_order_release);
  return {};
}

Result<void, MemoryError> MemoryTable::replace(std::vector<RegionSpec> specs) {
  if (specs.size() > limits_.max_regions) {
    const RegionSpec& last = specs.back();
    MemoryError e = error(MemoryErrc::too_many_regions, last.gpa, last.size);
    e.limit = limits_.max_regions;
    return unexpected(e);
  }
  // Validate every spec before mapping any, so a bad table costs no mmap.
  for (const auto& s : specs)
    if (auto ok = validate_region(s); !ok) return ok;
  std::vector<Region> regions;
  regions.reserve(specs.size());
  for (auto& s : specs) {
    auto r = map_region(s);
    if (!r) return unexpected(r.error());
    regions.push_back(std::move(*r));
  }
  return publish(std::move(regions));
}

Result<void, MemoryError> MemoryTable::add(RegionSpec spec) {
  auto snap = snapshot();
  if (snap->regions().size() + 1 > limits_.max_regions) {
    MemoryError e = error(MemoryErrc::too_many_regions, spec.gpa, spec.size);
    e.limit = limits_.max_regions;
    return unexpected(e);
  }
  auto r = map_region(spec);
  if (!r) return unexpected(r.error());
  std::vector<Region> regions(snap->regions().begin(), snap->regions().end());
  regions.push_back(std::move(*r));
  return publish(std::move(regions));
}

Result<void, MemoryError> MemoryTable::remove(Gpa gpa, std::uint64_t size) {
  auto snap = snapshot();
  std::vector<Region> regions;
  bool found = false;
  for (const Region& r : snap->regions()) {
    if (!found && r.gpa == gpa && r.size == size) {
      found = true;
      continue;
    }
    regions.push_back(r);
  }
  if (!found) return unexpected(error(MemoryErrc::no_such_region, gpa, size));
  return publish(std::move(regions));
}

void MemoryTable::clear() {
  (void)publish({});
}

std::shared_ptr<const MemorySnapshot> MemoryTable::snapshot() const {
  std::lock_guard lock(mu_);
  return current_;
}

}  // namespace vhostkit
