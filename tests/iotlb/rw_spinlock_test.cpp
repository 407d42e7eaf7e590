// RwSpinLock: readers and writers hammering it concurrently never overlap, and nobody
// is left stuck (a writer's unlock once wiped out a backing-off reader's count).
#include <atomic>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "vhostkit/rw_spinlock.h"

namespace vhostkit {
namespace {

TEST(RwSpinLock, ReadersAndWritersExcludeEachOther) {
  RwSpinLock lock;
  std::atomic<int> readers{0};
  std::atomic<int> writers{0};
  std::atomic<bool> violation{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 1000000; ++i) {
        lock.lock_shared();
        readers.fetch_add(1);
        if (writers.load() != 0) violation = true;
        readers.fetch_sub(1);
        lock.unlock_shared();
      }
    });
  }
  threads.emplace_back([&] {
    for (int i = 0; i < 300000; ++i) {
      lock.lock();
      if (writers.fetch_add(1) != 0 || readers.load() != 0) violation = true;
      writers.fetch_sub(1);
      lock.unlock();
    }
  });
  for (auto& t : threads) t.join();  // a lost count would hang here (ctest times out)
  EXPECT_FALSE(violation.load());
  lock.lock();  // and the lock is free again afterwards
  lock.unlock();
  lock.lock_shared();
  lock.unlock_shared();
}

}  // namespace
}  // namespace vhostkit
