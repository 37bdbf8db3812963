#include "kernels/caching_allocator.h"

#include <algorithm>
#include <vector>

#include "kernels/error.h"

namespace lancet {

namespace {
size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }
std::string mib(size_t b) {
  const double m = static_cast<double>(b) / 1048576.0;
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB", m);
  return buf;
}
}  // namespace

CachingAllocator::CachingAllocator(RawAllocator raw, Device device) : raw_(std::move(raw)), device_(device) {
  LANCET_CHECK(raw_.alloc && raw_.free, "CachingAllocator: a raw allocator needs alloc and free");
}

CachingAllocator::~CachingAllocator() {
  // Every block, free or not, belongs to a segment: free the blocks' bookkeeping, then the
  // segments.
  std::vector<Block*> blocks(small_.begin(), small_.end());
  blocks.insert(blocks.end(), large_.begin(), large_.end());
  for (auto& [p, b] : live_) blocks.push_back(b);
  for (Block* b : blocks) delete b;
  for (auto& [base, size] : segments_) raw_.free(base);
}

CachingAllocator::Block* CachingAllocator::take_free(Pool& pool, size_t size) {
  Block key;
  key.size = size;
  key.ptr = nullptr;
  auto it = pool.lower_bound(&key);
  if (it == pool.end()) return nullptr;
  Block* b = *it;
  pool.erase(it);
  return b;
}

CachingAllocator::Block* CachingAllocator::new_segment(size_t size, bool small) {
  const size_t seg = small ? kSmallSegment : size < kMinLargeAlone ? kLargeSegment : round_up(size, kRoundLarge);
  void* p = raw_.alloc(seg);
  if (!p) {  // out of memory: give back what is cached and try once more
    release_free_segments();
    p = raw_.alloc(seg);
  }
  if (!p) {
    LANCET_FAIL("out of memory on " << device_.str() << ": " << raw_.name << " could not provide " << mib(seg)
                                    << " for a request of " << mib(size) << " (" << mib(stats_.allocated)
                                    << " in use by tensors, " << mib(stats_.reserved)
                                    << " held by lancet's cache after releasing its free segments)");
  }
  ++stats_.raw_allocs;
  ++stats_.segments;
  stats_.reserved += seg;
  stats_.peak_reserved = std::max(stats_.peak_reserved, stats_.reserved);
  Block* b = new Block;
  b->ptr = static_cast<char*>(p);
  b->size = seg;
  b->small = small;
  b->segment = b->ptr;
  segments_[b->ptr] = seg;
  return b;
}

void* CachingAllocator::allocate(size_t bytes) {
  const size_t size = round_up(std::max<size_t>(bytes, 1), kRound);
  const bool small = size <= kSmallRequest;
  std::lock_guard<std::mutex> lock(mu_);
  Pool& pool = small ? small_ : large_;
  Block* b = take_free(pool, size);
  if (b) {
    ++stats_.cache_hits;
  } else {
    b = new_segment(size, small);
  }
  // Split off the rest when it is worth keeping as a block of its own.
  const size_t rest = b->size - size;
  if (small ? rest >= kRound : rest > kSmallRequest) {
    Block* r = new Block;
    r->ptr = b->ptr + size;
    r->size = rest;
    r->small = small;
    r->segment = b->segment;
    r->prev = b;
    r->next = b->next;
    if (b->next) b->next->prev = r;
    b->next = r;
    b->size = size;
    pool.insert(r);
  }
  b->allocated = true;
  live_[b->ptr] = b;
  stats_.allocated += b->size;
  count_alloc(bytes);
  return b->ptr;
}

void CachingAllocator::merge_into(Block* dst, Block* src) {
  // src follows dst in their segment; dst absorbs it.
  dst->size += src->size;
  dst->next = src->next;
  if (src->next) src->next->prev = dst;
  delete src;
}

void CachingAllocator::deallocate(void* ptr, size_t bytes) noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.find(ptr);
  if (it == live_.end()) return;  // not ours: nothing safe to do (never happens through Tensor)
  Block* b = it->second;
  live_.erase(it);
  b->allocated = false;
  stats_.allocated -= b->size;
  count_free(bytes);
  Pool& pool = b->small ? small_ : large_;
  if (b->next && !b->next->allocated) {
    pool.erase(b->next);
    merge_into(b, b->next);
  }
  if (b->prev && !b->prev->allocated) {
    Block* p = b->prev;
    pool.erase(p);
    merge_into(p, b);
    b = p;
  }
  pool.insert(b);
}

void CachingAllocator::release_free_segments() {
  for (Pool* pool : {&small_, &large_}) {
    for (auto it = pool->begin(); it != pool->end();) {
      Block* b = *it;
      if (!b->prev && !b->next) {  // the whole segment is this free block
        it = pool->erase(it);
        segments_.erase(b->ptr);
        raw_.free(b->ptr);
        ++stats_.raw_frees;
        --stats_.segments;
        stats_.reserved -= b->size;
        delete b;
      } else {
        ++it;
      }
    }
  }
}

void CachingAllocator::empty_cache() {
  std::lock_guard<std::mutex> lock(mu_);
  release_free_segments();
}

CachingAllocatorStats CachingAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace lancet
