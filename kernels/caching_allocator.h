// caching_allocator.h — a caching block allocator over a raw allocator (cudaMalloc/cudaFree for
// GPUs), so that a training step in steady state never calls the raw allocator: what PyTorch's
// CUDACachingAllocator does, in its simplest sound form.
//
// The raw allocator hands out segments; the cache carves them into blocks:
//   * sizes are rounded up to 512 bytes (every block 512-byte aligned within its segment);
//   * requests up to 1 MiB come from 2 MiB segments (the small pool), larger ones from the
//     large pool: a 20 MiB segment for requests under 10 MiB, else the request rounded up to
//     2 MiB — so small tensors never fragment the segments big activations need;
//   * a request takes the smallest free block of its pool that fits (best fit), split when the
//     rest is worth keeping (>= 512 bytes in the small pool, > 1 MiB in the large one);
//   * a freed block merges with free neighbours of its segment and waits for the next request;
//   * when the raw allocator refuses, every wholly free segment is released and the request
//     retried once; if it still fails, the error says what was asked for, what is in use and
//     what is cached.
// Statistics: the Allocator's current/peak bytes (what callers asked for), plus reserved bytes
// (segments held), their peak, and the raw calls made — a test asserts that a repeated step
// makes none. Thread-safe (one mutex). Blocks are not tied to streams: a block freed by one
// stream may be reused in that stream's order only, so each cache serves one stream — the CUDA
// backend keeps one per GPU and memory domain (kernels/allocator.h: pipeline stages computing
// on streams of their own each allocate from their own).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>

#include "kernels/allocator.h"

namespace lancet {

// Where segments come from. alloc returns nullptr when out of memory (the cache then releases
// what it holds and retries); any other failure throws.
struct RawAllocator {
  std::function<void*(size_t bytes)> alloc;
  std::function<void(void* ptr)> free;
  std::string name;  // "cudaMalloc on cuda:0", for errors
};

struct CachingAllocatorStats {
  size_t allocated = 0;       // bytes in blocks handed out (rounded sizes)
  size_t reserved = 0;        // bytes of segments held from the raw allocator
  size_t peak_reserved = 0;
  int64_t raw_allocs = 0, raw_frees = 0;  // raw allocator calls so far
  int64_t segments = 0;
  int64_t cache_hits = 0;     // requests served without a raw call
};

class CachingAllocator final : public Allocator {
 public:
  static constexpr size_t kRound = 512;
  static constexpr size_t kSmallRequest = size_t{1} << 20;   // <= 1 MiB: small pool
  static constexpr size_t kSmallSegment = size_t{2} << 20;   // 2 MiB
  static constexpr size_t kLargeSegment = size_t{20} << 20;  // for requests < 10 MiB
  static constexpr size_t kMinLargeAlone = size_t{10} << 20;
  static constexpr size_t kRoundLarge = size_t{2} << 20;

  CachingAllocator(RawAllocator raw, Device device);
  ~CachingAllocator() override;  // releases every segment (blocks still handed out included)

  void* allocate(size_t bytes) override;
  void deallocate(void* ptr, size_t bytes) noexcept override;
  Device device() const override { return device_; }

  // Releases every wholly free segment to the raw allocator (torch.cuda.empty_cache()).
  void empty_cache();
  CachingAllocatorStats stats() const;

 private:
  struct Block {
    char* ptr = nullptr;
    size_t size = 0;
    bool small = false;
    bool allocated = false;
    char* segment = nullptr;
    Block* prev = nullptr;  // neighbours in the segment, by address
    Block* next = nullptr;
  };
  struct BySize {
    bool operator()(const Block* a, const Block* b) const {
      return a->size != b->size ? a->size < b->size : a->ptr < b->ptr;
    }
  };
  using Pool = std::set<Block*, BySize>;

  Block* take_free(Pool& pool, size_t size);
  Block* new_segment(size_t size, bool small);
  void release_free_segments();  // mu_ held
  void merge_into(Block* dst, Block* src);

  RawAllocator raw_;
  Device device_;
  mutable std::mutex mu_;
  Pool small_, large_;
  std::unordered_map<void*, Block*> live_;  // handed-out blocks by pointer
  std::map<char*, size_t> segments_;        // base -> size
  CachingAllocatorStats stats_;
};

}  // namespace lancet
