#include "kernels/allocator.h"

#include <array>
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
// GPU ordinal -> one allocator per memory domain (null until created or registered).
std::vector<std::array<Allocator*, kMemoryDomains>>& cuda_allocators() {
  static std::vector<std::array<Allocator*, kMemoryDomains>> v;
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

void register_cuda_allocator(int index, Allocator* a, int domain) {
  check_domain(domain);
  LANCET_CHECK(index >= 0, "register_cuda_allocator: GPU ordinal " << index);
  std::lock_guard<std::mutex> lock(g_registry_mu);
  auto& v = cuda_allocators();
  if (static_cast<int>(v.size()) <= index) v.resize(static_cast<size_t>(index) + 1, {});
  v[static_cast<size_t>(index)][static_cast<size_t>(domain)] = a;
}

#ifdef LANCET_WITH_CUDA
Allocator* cuda_allocator_create(int index);  // kernels/cuda/runtime.cu
#endif

Allocator& allocator_for(Device d) { return allocator_for(d, t_domain); }

Allocator& allocator_for(Device d, int domain) {
  if (d.is_cpu()) {
    static CpuAllocator cpu;
    return cpu;
  }
  check_domain(domain);
  std::lock_guard<std::mutex> lock(g_registry_mu);
  auto& v = cuda_allocators();
  if (static_cast<int>(v.size()) <= d.index) v.resize(static_cast<size_t>(d.index) + 1, {});
  Allocator*& a = v[static_cast<size_t>(d.index)][static_cast<size_t>(domain)];
#ifdef LANCET_WITH_CUDA
  if (a == nullptr) a = cuda_allocator_create(d.index);  // a pool of its own for this domain
#endif
  LANCET_CHECK(a != nullptr,
               "device " << d.str() << " requested but this build of lancet has no CUDA (LANCET_CUDA=OFF)");
  return *a;
}

}  // namespace lancet
