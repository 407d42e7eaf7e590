// Viommu: the guest IOMMU model.
#include "vhostkit/frontend/viommu.h"

namespace vhostkit::frontend {

namespace {
constexpr std::uint64_t kPage = 4096;
}

Viommu::Viommu(ViommuMode mode, std::uint64_t iova_base, std::size_t lazy_batch)
    : mode_(mode), lazy_batch_(lazy_batch == 0 ? 1 : lazy_batch), next_iova_(iova_base) {}

Iova Viommu::map(Gpa gpa, std::uint64_t len, Access perm) {
  std::uint64_t first = gpa.value & ~(kPage - 1);
  std::uint64_t span = ((gpa.value + len + kPage - 1) & ~(kPage - 1)) - first;
  std::lock_guard lock(mu_);
  // IOVAs only grow: an IOVA is never handed out twice, so none is reused before its
  // (possibly lazy) invalidation reached the device.
  std::uint64_t iova = next_iova_;
  next_iova_ += span + kPage;  // a guard page between mappings
  maps_[iova] = ViommuMapping{Iova(iova), Gpa(first), span, perm};
  return Iova(iova + (gpa.value - first));
}

void Viommu::map_at(Iova iova, Gpa gpa, std::uint64_t len, Access perm) {
  std::uint64_t first = gpa.value & ~(kPage - 1);
  std::uint64_t span = ((gpa.value + len + kPage - 1) & ~(kPage - 1)) - first;
  std::uint64_t at = iova.value & ~(kPage - 1);
  std::lock_guard lock(mu_);
  maps_[at] = ViommuMapping{Iova(at), Gpa(first), span, perm};
}

void Viommu::unmap(Iova iova) {
  std::vector<std::pair<Iova, std::uint64_t>> now;
  InvalidateListener listener;
  {
    std::lock_guard lock(mu_);
    auto it = maps_.upper_bound(iova.value);
    if (it == maps_.begin()) return;
    --it;
    if (iova.value - it->first >= it->second.len) return;
    queued_.emplace_back(it->second.iova, it->second.len);
    maps_.erase(it);
    if (mode_ == ViommuMode::strict || queued_.size() >= lazy_batch_) invalidate_locked(now);
    listener = listener_;
  }
  if (listener)
    for (auto [i, l] : now) listener(i, l);
}

void Viommu::flush() {
  std::vector<std::pair<Iova, std::uint64_t>> now;
  InvalidateListener listener;
  {
    std::lock_guard lock(mu_);
    invalidate_locked(now);
    listener = listener_;
  }
  if (listener)
    for (auto [i, l] : now) listener(i, l);
}

void Viommu::invalidate_locked(std::vector<std::pair<Iova, std::uint64_t>>& out) {
  out.insert(out.end(), queued_.begin(), queued_.end());
  queued_.clear();
}

std::optional<ViommuMapping> Viommu::translate(Iova iova) const {
  std::lock_guard lock(mu_);
  auto it = maps_.upper_bound(iova.value);
  if (it == maps_.begin()) return std::nullopt;
  --it;
  if (iova.value - it->first >= it->second.len) return std::nullopt;
  return it->second;
}

void Viommu::set_invalidate_listener(InvalidateListener listener) {
  std::lock_guard lock(mu_);
  listener_ = std::move(listener);
}

std::size_t Viommu::mappings() const {
  std::lock_guard lock(mu_);
  return maps_.size();
}

std::size_t Viommu::pending_invalidations() const {
  std::lock_guard lock(mu_);
  return queued_.size();
}

std::vector<ViommuMapping> Viommu::all() const {
  std::lock_guard lock(mu_);
  std::vector<ViommuMapping> v;
  for (const auto& [k, m] : maps_) v.push_back(m);
  return v;
}

}  // namespace vhostkit::frontend
