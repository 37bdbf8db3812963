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

// Host memory domains. Every CPU allocation is charged to the allocating thread's domain (0
// unless a MemoryDomainScope says otherwise) and its release to that same domain, whichever
// thread frees it. Two pipeline stages running as threads of one process so see the bytes each
// stage holds (what each stage's own device would hold), current and peak.
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

// The allocator for a device. For cuda devices this throws when the build has no CUDA or
// the device does not exist.
Allocator& allocator_for(Device d);

// Used by the CUDA backend to install its allocator for a GPU ordinal.
void register_cuda_allocator(int index, Allocator* a);

}  // namespace lancet
