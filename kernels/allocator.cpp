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

class CpuAllocator final : public Allocator {
 public:
  void* allocate(size_t bytes) override {
    const size_t rounded = ((bytes + 63) / 64) * 64;
    void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
    LANCET_CHECK(p != nullptr, "out of host memory allocating " << bytes << " bytes");
    std::lock_guard<std::mutex> lock(mu_);
    count_alloc(bytes);
    return p;
  }
  void deallocate(void* p, size_t bytes) noexcept override {
    std::free(p);
    std::lock_guard<std::mutex> lock(mu_);
    count_free(bytes);
  }
  Device device() const override { return Device::cpu(); }

 private:
  std::mutex mu_;
};

std::mutex g_registry_mu;
std::vector<Allocator*>& cuda_allocators() {
  static std::vector<Allocator*> v;
  return v;
}

}  // namespace

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
