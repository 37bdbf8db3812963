#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <vector>

#include "kernels/allocator.h"
#include "kernels/cuda/runtime.h"
#include "kernels/caching_allocator.h"

namespace lancet {

std::vector<CudaDeviceInfo> cuda_devices() {
  std::vector<CudaDeviceInfo> out;
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return out;
  }
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
    out.push_back({i, p.name, p.totalGlobalMem, p.major, p.minor});
  }
  return out;
}

std::string cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

void cuda_profiler_start() { LANCET_CUDA_CHECK(cudaProfilerStart()); }
void cuda_profiler_stop() { LANCET_CUDA_CHECK(cudaProfilerStop()); }

namespace {

// Sets the current device for a scope and restores the previous one on exit.
class DeviceGuard {
 public:
  explicit DeviceGuard(int index) {
    cudaGetDevice(&prev_);
    if (prev_ != index) LANCET_CUDA_CHECK(cudaSetDevice(index));
  }
  ~DeviceGuard() { cudaSetDevice(prev_); }

 private:
  int prev_ = 0;
};

// Segments for the caching allocator (kernels/caching_allocator.h): cudaMalloc on the device,
// nullptr when the device is out of memory (the cache then releases its free segments and
// retries), an error naming the call for anything else.
RawAllocator cuda_raw_allocator(int index) {
  RawAllocator r;
  r.name = "cudaMalloc on cuda:" + std::to_string(index);
  r.alloc = [index](size_t bytes) -> void* {
    DeviceGuard g(index);
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // clear the sticky-free error state
      return nullptr;
    }
    if (e != cudaSuccess) LANCET_FAIL("cudaMalloc(" << bytes << " bytes) on cuda:" << index << " failed: " << cudaGetErrorString(e));
    return p;
  };
  r.free = [index](void* p) {
    DeviceGuard g(index);
    cudaFree(p);
  };
  return r;
}

}  // namespace

Allocator* cuda_allocator_create(int index) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    n = 0;
  }
  LANCET_CHECK(index < n, "device cuda:" << index << " requested but " << n << " CUDA device(s) are visible");
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  // Lives for the process, like the devices themselves.
  return new CachingAllocator(cuda_raw_allocator(index), Device::cuda(index));
}

namespace {

// Page-locked host memory (cudaHostAlloc) for the data loader's batches, so host->device
// copies can be asynchronous. cudaHostAlloc is slow (it pins pages), and the loader allocates
// every batch afresh, so freed blocks are kept by size and handed out again.
class PinnedHostAllocator final : public Allocator {
 public:
  void* allocate(size_t bytes) override {
    const size_t n = bytes == 0 ? 1 : bytes;
    std::lock_guard<std::mutex> lock(mu_);
    auto& list = free_[n];
    void* p = nullptr;
    if (!list.empty()) {
      p = list.back();
      list.pop_back();
    } else {
      LANCET_CUDA_CHECK(cudaHostAlloc(&p, n, cudaHostAllocPortable));
    }
    count_alloc(bytes);
    return p;
  }
  void deallocate(void* p, size_t bytes) noexcept override {
    std::lock_guard<std::mutex> lock(mu_);
    free_[bytes == 0 ? 1 : bytes].push_back(p);  // kept for the process (blocks are batch-sized)
    count_free(bytes);
  }
  Device device() const override { return Device::cpu(); }

 private:
  std::mutex mu_;
  std::map<size_t, std::vector<void*>> free_;
};

}  // namespace

Allocator& pinned_host_allocator() {
  static PinnedHostAllocator* a = new PinnedHostAllocator;  // never destroyed: may outlive the CUDA context
  return *a;
}

void cuda_copy(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes) {
  const cudaMemcpyKind kind = dst_dev.is_cpu() ? cudaMemcpyDeviceToHost
                              : src_dev.is_cpu() ? cudaMemcpyHostToDevice
                                                 : cudaMemcpyDeviceToDevice;
  LANCET_CUDA_CHECK(cudaMemcpy(dst, src, bytes, kind));
}

void cuda_memset_zero(void* dst, Device dev, size_t bytes) {
  DeviceGuard g(dev.index);
  LANCET_CUDA_CHECK(cudaMemset(dst, 0, bytes));
}

}  // namespace lancet
