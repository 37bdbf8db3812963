// The caching block allocator (kernels/caching_allocator.h) that the CUDA backend puts over
// cudaMalloc, tested over a host "raw allocator" with a memory budget: a repeated training
// step's allocations make no raw call after the first; blocks split and merge back into whole
// segments; the small and large pools stay apart; out of memory releases the cache and retries,
// then fails naming the sizes; blocks never overlap under concurrent use; a GPU's memory
// domains are pools of their own, and a block goes back to its own pool (pipeline stages).
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "kernels/caching_allocator.h"
#include "kernels/tensor.h"
#include "tests/expect_error.h"

using namespace lancet;
using namespace lancet::testing;

namespace {

// malloc-backed segments with a byte budget (a GPU of `budget` bytes).
struct FakeDevice {
  size_t budget, used = 0;
  std::vector<std::pair<void*, size_t>> live;
  explicit FakeDevice(size_t b) : budget(b) {}
  RawAllocator raw() {
    RawAllocator r;
    r.name = "fakeMalloc";
    r.alloc = [this](size_t n) -> void* {
      if (used + n > budget) return nullptr;
      void* p = std::aligned_alloc(256, n);
      used += n;
      live.emplace_back(p, n);
      return p;
    };
    r.free = [this](void* p) {
      for (auto it = live.begin(); it != live.end(); ++it)
        if (it->first == p) {
          used -= it->second;
          live.erase(it);
          break;
        }
      std::free(p);
    };
    return r;
  }
};

constexpr size_t MiB = size_t{1} << 20;

}  // namespace

TEST(CachingAllocator, ARepeatedStepMakesNoRawCalls) {
  FakeDevice dev(size_t{1} << 30);
  CachingAllocator a(dev.raw(), Device::cpu());
  // A "step": activations of several sizes alive at once, then freed in reverse; weights kept.
  const std::vector<size_t> sizes = {100, 4096, 300 * 1024, 3 * MiB, 12 * MiB, 700, 25 * MiB, 64};
  std::vector<void*> weights;
  for (int i = 0; i < 4; ++i) weights.push_back(a.allocate(2 * MiB + 10));
  int64_t raw_after_first = -1;
  for (int step = 0; step < 5; ++step) {
    std::vector<void*> acts;
    for (size_t s : sizes) acts.push_back(a.allocate(s));
    for (size_t i = acts.size(); i-- > 0;) a.deallocate(acts[i], sizes[i]);
    if (step == 0) raw_after_first = a.stats().raw_allocs;
  }
  EXPECT_EQ(a.stats().raw_allocs, raw_after_first);
  EXPECT_EQ(a.stats().raw_frees, 0);
  EXPECT_GT(a.stats().cache_hits, 30);
  // Accounting: the Allocator's bytes are what callers asked for; the cache's in rounded blocks.
  EXPECT_EQ(a.current_bytes(), 4 * (2 * MiB + 10));
  EXPECT_EQ(a.stats().allocated, 4 * ((2 * MiB + 10 + 511) / 512 * 512));
  EXPECT_GE(a.peak_bytes(), a.current_bytes() + 40 * MiB);
  for (void* w : weights) a.deallocate(w, 2 * MiB + 10);
  EXPECT_EQ(a.current_bytes(), 0u);
  EXPECT_EQ(a.stats().allocated, 0u);
  // Every segment is whole again: empty_cache gives all of it back.
  a.empty_cache();
  EXPECT_EQ(a.stats().reserved, 0u);
  EXPECT_EQ(dev.used, 0u);
  EXPECT_EQ(a.stats().raw_frees, a.stats().raw_allocs);
}

TEST(CachingAllocator, SplitsMergesAndKeepsThePoolsApart) {
  FakeDevice dev(size_t{1} << 30);
  CachingAllocator a(dev.raw(), Device::cpu());
  // Three small blocks share one 2 MiB segment, 512-byte aligned and adjacent.
  char* x = static_cast<char*>(a.allocate(1000));
  char* y = static_cast<char*>(a.allocate(512));
  char* z = static_cast<char*>(a.allocate(1));
  EXPECT_EQ(a.stats().segments, 1);
  EXPECT_EQ(a.stats().reserved, CachingAllocator::kSmallSegment);
  EXPECT_EQ(y - x, 1024);
  EXPECT_EQ(z - y, 512);
  // Freeing the middle one leaves a hole the next fitting request reuses (best fit).
  a.deallocate(y, 512);
  EXPECT_EQ(a.allocate(300), y);
  // A large request gets its own (large-pool) segment, never the small pool's free space.
  void* big = a.allocate(3 * MiB);
  EXPECT_EQ(a.stats().segments, 2);
  EXPECT_EQ(a.stats().reserved, CachingAllocator::kSmallSegment + CachingAllocator::kLargeSegment);
  // Large blocks are split from the 20 MiB segment while they fit: 3 + 11 + 5 MiB (the last
  // takes the whole 6 MiB rest: a 1 MiB remainder is not worth a block in the large pool).
  void* huge = a.allocate(11 * MiB);
  void* mid = a.allocate(5 * MiB);
  EXPECT_EQ(a.stats().segments, 2);
  EXPECT_EQ(a.stats().allocated, 1024 + 512 + 512 + 3 * MiB + 11 * MiB + 6 * MiB);
  // A request of 10 MiB or more that does not fit: a segment of its size rounded to 2 MiB.
  void* more = a.allocate(13 * MiB);
  EXPECT_EQ(a.stats().segments, 3);
  EXPECT_EQ(a.stats().reserved, CachingAllocator::kSmallSegment + CachingAllocator::kLargeSegment + 14 * MiB);
  for (auto [p, n] : {std::pair<void*, size_t>{x, 1000}, {y, 300}, {z, 1}, {big, 3 * MiB}, {huge, 11 * MiB}, {mid, 5 * MiB}, {more, 13 * MiB}})
    a.deallocate(p, n);
  // Merged back: each segment is one free block, so all three are released.
  a.empty_cache();
  EXPECT_EQ(a.stats().segments, 0);
  EXPECT_EQ(dev.used, 0u);
}

TEST(CachingAllocator, OutOfMemoryReleasesTheCacheThenFailsNamingTheSizes) {
  FakeDevice dev(40 * MiB);
  CachingAllocator a(dev.raw(), Device::cuda(0));
  void* p = a.allocate(12 * MiB);  // a 12 MiB segment
  void* q = a.allocate(3 * MiB);   // a 20 MiB segment
  a.deallocate(q, 3 * MiB);        // cached, not released
  EXPECT_EQ(dev.used, 32 * MiB);
  // 22 MiB fits no cached block and not beside the 32 MiB held: the free 20 MiB segment is
  // released and the request retried.
  void* r = a.allocate(22 * MiB);
  EXPECT_EQ(a.stats().raw_frees, 1);
  EXPECT_EQ(dev.used, 34 * MiB);
  // Nothing left to release: a clear error.
  expect_error([&] { a.allocate(30 * MiB); },
               {"out of memory on cuda:0: fakeMalloc could not provide 30.0 MiB for a request of 30.0 MiB",
                "34.0 MiB in use by tensors"});
  a.deallocate(p, 12 * MiB);
  a.deallocate(r, 22 * MiB);
}

TEST(CachingAllocator, ConcurrentUseNeverHandsOutOverlappingBlocks) {
  FakeDevice dev(size_t{2} << 30);
  CachingAllocator a(dev.raw(), Device::cpu());
  auto worker = [&a](uint32_t seed, int* bad) {
    std::mt19937 rng(seed);
    std::vector<std::pair<uint8_t*, size_t>> held;
    for (int i = 0; i < 3000; ++i) {
      if (held.size() < 16 && rng() % 3 != 0) {
        const size_t n = rng() % 4 == 0 ? (rng() % (4 * MiB)) + 1 : (rng() % 8192) + 1;
        auto* p = static_cast<uint8_t*>(a.allocate(n));
        std::memset(p, static_cast<int>(seed & 0xff), n);
        held.emplace_back(p, n);
      } else if (!held.empty()) {
        const size_t k = rng() % held.size();
        auto [p, n] = held[k];
        for (size_t j = 0; j < n; j += 997) *bad += p[j] != static_cast<uint8_t>(seed & 0xff);
        a.deallocate(p, n);
        held.erase(held.begin() + static_cast<std::ptrdiff_t>(k));
      }
    }
    for (auto [p, n] : held) a.deallocate(p, n);
  };
  int bad1 = 0, bad2 = 0;
  std::thread t1(worker, 0x11u, &bad1), t2(worker, 0x22u, &bad2);
  t1.join();
  t2.join();
  EXPECT_EQ(bad1 + bad2, 0);  // another thread's block never overlapped and overwrote ours
  EXPECT_EQ(a.current_bytes(), 0u);
  a.empty_cache();
  EXPECT_EQ(dev.used, 0u);
}

// A GPU's pools per memory domain (kernels/allocator.h), over host-backed caches registered for
// a GPU ordinal no machine has (nothing here touches CUDA): a thread in domain d allocates from
// d's pool, and a block goes back to the pool it came from whichever thread frees it — what
// keeps each pipeline stage's pool used by its own stream alone.
TEST(DevicePools, EachMemoryDomainHasItsOwnPoolAndBlocksReturnToIt) {
  constexpr int kGpu = 61;
  FakeDevice dev0(64 * MiB), dev1(64 * MiB);
  CachingAllocator pool0(dev0.raw(), Device::cuda(kGpu)), pool1(dev1.raw(), Device::cuda(kGpu));
  struct Registered {  // unregistered before the pools go, whatever the test finds
    Registered(Allocator* a0, Allocator* a1) {
      register_cuda_allocator(kGpu, a0, 0);
      register_cuda_allocator(kGpu, a1, 1);
    }
    ~Registered() {
      register_cuda_allocator(kGpu, nullptr, 0);
      register_cuda_allocator(kGpu, nullptr, 1);
    }
  } registered(&pool0, &pool1);
  EXPECT_EQ(&allocator_for(Device::cuda(kGpu)), &pool0);  // this thread: domain 0
  EXPECT_EQ(&allocator_for(Device::cuda(kGpu), 1), &pool1);
  Tensor kept;
  std::thread([&] {
    MemoryDomainScope stage(1);
    EXPECT_EQ(&allocator_for(Device::cuda(kGpu)), &pool1);
    kept = Tensor::empty({1000}, DType::f32, Device::cuda(kGpu));
    { Tensor scratch = Tensor::empty({500}, DType::f32, Device::cuda(kGpu)); }  // freed at once
    Tensor again = Tensor::empty({500}, DType::f32, Device::cuda(kGpu));            // reuses its block
  }).join();
  EXPECT_EQ(pool1.current_bytes(), 4000u);
  EXPECT_EQ(pool1.peak_bytes(), 6000u);
  EXPECT_EQ(pool1.stats().raw_allocs, 1);  // one small segment serves the three
  EXPECT_EQ(pool0.current_bytes(), 0u);
  EXPECT_EQ(pool0.stats().raw_allocs, 0);
  kept = Tensor();  // freed by this thread (domain 0): back to pool 1, not into pool 0
  EXPECT_EQ(pool1.current_bytes(), 0u);
  EXPECT_EQ(pool1.stats().allocated, 0u);
  EXPECT_EQ(pool0.stats().allocated, 0u);
  expect_error([] { allocator_for(Device::cuda(kGpu), kMemoryDomains); }, {"memory domain 4 out of range"});
}
