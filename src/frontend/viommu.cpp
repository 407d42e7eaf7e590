// Viommu: the guest IOMMU model.
#include "vhostkit/frontend/viommu.h"

#include <utility>

namespace vhostkit::frontend {

namespace {
constexpr std::uint64_t kPage = 4096;
}

Viommu::Viommu(ViommuMode mode, std::uint64_t iova_base, std::size_t lazy_batch)
    : mode_(mode), lazy_batch_(lazy_batch == 0 ? 1 : lazy_batch), next_iova_(iova_base) {}

Iova Viommu::map(Gpa gpa, std::uint64_t len, Access perm) {
  if (len == 0) len = 1;
  const std::uint64_t first = gpa.value & ~(kPage - 1);
  const std::uint64_t span = ((gpa.value + len + kPage - 1) & ~(kPage - 1)) - first;
  const std::uint64_t reserved = span + kPage;  // a guard page after every mapping
  std::lock_guard lock(mu_);
  std::uint64_t iova;
  auto it = reusable_.find(reserved);
  if (it != reusable_.end() && !it->second.empty()) {
    // The most recently invalidated range of this size first, as Linux's IOVA caches do.
    iova = it->second.back();
    it->second.pop_back();
  } else {
    iova = next_iova_;
    next_iova_ += reserved;
  }
  maps_[iova] = Entry{ViommuMapping{Iova(iova), Gpa(first), span, perm}, reserved};
  return Iova(iova + (gpa.value - first));
}

bool Viommu::unmap(Iova iova, std::uint64_t len) {
  if (len == 0) len = 1;
  std::lock_guard order(order_mu_);
  std::vector<Pending> batch;
  {
    std::lock_guard lock(mu_);
    auto it = maps_.upper_bound(iova.value);
    if (it == maps_.begin()) return false;
    --it;
    const ViommuMapping& m = it->second.map;
    std::uint64_t off = iova.value - m.iova.value;
    if (off >= m.len || len > m.len - off) return false;
    queued_.push_back(Pending{m.iova, m.len, it->second.reserved});
    maps_.erase(it);
    if (mode_ == ViommuMode::strict || queued_.size() >= lazy_batch_) batch.swap(queued_);
  }
  if (!batch.empty()) invalidate(batch);
  return true;
}

void Viommu::flush() {
  std::lock_guard order(order_mu_);
  std::vector<Pending> batch;
  {
    std::lock_guard lock(mu_);
    batch.swap(queued_);
  }
  if (!batch.empty()) invalidate(batch);
}

void Viommu::invalidate(const std::vector<Pending>& batch) {
  InvalidateListener listener;
  {
    std::lock_guard lock(mu_);
    listener = listener_;
  }
  // Outside the lock: the listener may wait for the device, which may meanwhile ask
  // translate() to answer a miss.
  if (listener)
    for (const Pending& p : batch) listener(p.iova, p.len);
  // Only now, with the device's IOTLB clean, may the IOVAs be handed out again.
  std::lock_guard lock(mu_);
  for (const Pending& p : batch) reusable_[p.reserved].push_back(p.iova.value);
}

std::optional<ViommuMapping> Viommu::translate(Iova iova) const {
  std::lock_guard lock(mu_);
  auto it = maps_.upper_bound(iova.value);
  if (it == maps_.begin()) return std::nullopt;
  --it;
  const ViommuMapping& m = it->second.map;
  std::uint64_t off = (iova.value - m.iova.value) & ~(kPage - 1);
  if (iova.value - m.iova.value >= m.len) return std::nullopt;
  return ViommuMapping{m.iova + off, m.gpa + off, m.len - off, m.perm};
}

bool Viommu::answer_miss(Iova iova, const std::function<void(const ViommuMapping&)>& send) {
  std::lock_guard order(order_mu_);
  auto m = translate(iova);
  if (!m) return false;
  send(*m);
  return true;
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
  v.reserve(maps_.size());
  for (const auto& [start, e] : maps_) v.push_back(e.map);
  return v;
}

}  // namespace vhostkit::frontend
