// allocator.h — the device-allocator interface every Tensor allocates through.
//
// One allocator per device. The CPU allocator hands out 64-byte-aligned blocks; the CUDA
// backend registers its own (a caching allocator) for each GPU. Every allocator counts the
// bytes it has handed out (current and peak) so benchmarks can report memory.
#pragma once
#include <cstddef>
#include <cstdint>

#include "kernels/device.h"

namespace lancet {

class Allocator {
 public:
  virtual ~Allocator() = default;
  // Returns at least `bytes` bytes (a non-null pointer even for 0), or throws lancet::Error.
  virtual void* allocate(size_t bytes) = 0;
  // `bytes` is what was asked of allocate(). Never throws.
  virtual void deallocate(void* ptr, size_t bytes) noexcept = 0;
  virtual Device device() const = 0;

  size_t current_bytes() const { return current_; }
  size_t peak_bytes() const { return peak_; }
  void reset_peak() { peak_ = current_; }

 protected:
  void count_alloc(size_t b);
  void count_free(size_t b) { current_ -= b; }

 private:
  size_t current_ = 0;
  size_t peak_ = 0;
};

// Memory domains. Every CPU allocation is charged to the allocating thread's domain (0
// unless a MemoryDomainScope says otherwise) and its release to that same domain, whichever
// thread frees it. Two pipeline stages running as threads of one process so see the bytes each
// stage holds (what each stage's own device would hold), current and peak.
// On a GPU a domain is a pool of its own: allocator_for(cuda:N) on a thread in domain d is GPU
// N's caching allocator for d (kernels/caching_allocator.h), a separate cache created on first
// use. A block returns to the pool it came from (Storage keeps its allocator), whichever thread
// frees it. The caching allocator is not stream-aware — a freed block is handed out again at
// once — so the contract is: one pool, one stream. Domain 0 is the training thread's stream;
// each pipeline stage's thread (domain 1, 2) computes on its own stream, and memory that another
// stream reads (an activation sent to the other stage) is kept alive by its owner until that
// stream's read has completed (trainer/pipeline.h).
constexpr int kMemoryDomains = 4;
class MemoryDomainScope {
 public:
  explicit MemoryDomainScope(int domain);  // 0 <= domain < kMemoryDomains
  ~MemoryDomainScope();
  MemoryDomainScope(const MemoryDomainScope&) = delete;
  MemoryDomainScope& operator=(const MemoryDomainScope&) = delete;

 private:
  int previous_;
};
size_t memory_domain_current_bytes(int domain);
size_t memory_domain_peak_bytes(int domain);
void reset_memory_domain_peak(int domain);

// The allocator for a device: for cuda, the pool of the calling thread's memory domain. For
// cuda devices this throws when the build has no CUDA or the device does not exist.
Allocator& allocator_for(Device d);
// The allocator of `domain` on `d` (the CPU has one allocator for every domain), e.g. to read a
// pipeline stage's peak from another thread.
Allocator& allocator_for(Device d, int domain);

// Installs `a` as GPU `index`'s allocator for memory domain `domain` (the CUDA backend creates
// the missing ones on first use; tests install host-backed ones). `a` must outlive its use.
void register_cuda_allocator(int index, Allocator* a, int domain = 0);

}  // namespace lancet
