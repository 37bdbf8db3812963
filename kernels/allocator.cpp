#include "kernels/allocator.h"

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#include "kernels/error.h"

namespace lancet {

void Allocator::count_alloc(size_t b) {
  current_ += b;
  if (current_ > peak_) peak_ = current_;
}

namespace {

thread_local int t_domain = 0;

struct DomainCounters {
  std::mutex mu;
  size_t current[kMemoryDomains] = {};
  size_t peak[kMemoryDomains] = {};
};
DomainCounters& domains() {
  static DomainCounters d;
  return d;
}

// Each block carries a 64-byte header (keeping the 64-byte alignment) recording the domain it
// was charged to.
constexpr size_t kHeader = 64;

class CpuAllocator final : public Allocator {
 public:
  void* allocate(size_t bytes) override {
    const size_t rounded = ((bytes + 63) / 64) * 64;
    void* p = std::aligned_alloc(64, kHeader + rounded);
    LANCET_CHECK(p != nullptr, "out of host memory allocating " << bytes << " bytes");
    const int d = t_domain;
    *static_cast<int*>(p) = d;
    {
      std::lock_guard<std::mutex> lock(mu_);
      count_alloc(bytes);
    }
    DomainCounters& dc = domains();
    std::lock_guard<std::mutex> lock(dc.mu);
    dc.current[d] += bytes;
    if (dc.current[d] > dc.peak[d]) dc.peak[d] = dc.current[d];
    return static_cast<char*>(p) + kHeader;
  }
  void deallocate(void* ptr, size_t bytes) noexcept override {
    void* p = static_cast<char*>(ptr) - kHeader;
    const int d = *static_cast<int*>(p);
    std::free(p);
    {
      std::lock_guard<std::mutex> lock(mu_);
      count_free(bytes);
    }
    DomainCounters& dc = domains();
    std::lock_guard<std::mutex> lock(dc.mu);
    dc.current[d] -= bytes;
  }
  Device device() const override { return Device::cpu(); }

 private:
  std::mutex mu_;
};

void check_domain(int d) {
  LANCET_CHECK(d >= 0 && d < kMemoryDomains, "memory domain " << d << " out of range [0, " << kMemoryDomains << ")");
}

std::mutex g_registry_mu;
std::vector<Allocator*>& cuda_allocators() {
  static std::vector<Allocator*> v;
  return v;
}

}  // namespace

MemoryDomainScope::MemoryDomainScope(int domain) : previous_(t_domain) {
  check_domain(domain);
  t_domain = domain;
}
MemoryDomainScope::~MemoryDomainScope() { t_domain = previous_; }

size_t memory_domain_current_bytes(int d) {
  check_domain(d);
  std::lock_guard<std::mutex> lock(domains().mu);
  return domains().current[d];
}
size_t memory_domain_peak_bytes(int d) {
  check_domain(d);
  std::lock_guard<std::mutex> lock(domains().mu);
  return domains().peak[d];
}
void reset_memory_domain_peak(int d) {
  check_domain(d);
  std::lock_guard<std::mutex> lock(domains().mu);
  domains().peak[d] = domains().current[d];
}

void register_cuda_allocator(int index, Allocator* a) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  auto& v = cuda_allocators();
  if (static_cast<int>(v.size()) <= index) v.resize(index + 1, nullptr);
  v[index] = a;
}

#ifdef LANCET_WITH_CUDA
Allocator* cuda_allocator_create(int index);  // kernels/cuda/allocator.cpp
#endif

Allocator& allocator_for(Device d) {
  if (d.is_cpu()) {
    static CpuAllocator cpu;
    return cpu;
  }
#ifdef LANCET_WITH_CUDA
  std::lock_guard<std::mutex> lock(g_registry_mu);
  auto& v = cuda_allocators();
  if (static_cast<int>(v.size()) <= d.index) v.resize(d.index + 1, nullptr);
  if (v[d.index] == nullptr) v[d.index] = cuda_allocator_create(d.index);
  return *v[d.index];
#else
  LANCET_FAIL("device " << d.str() << " requested but this build of lancet has no CUDA (LANCET_CUDA=OFF)");
#endif
}

}  // namespace lancet
