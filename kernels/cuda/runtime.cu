#include <cuda.h>  // CUresult, CUdevice: one driver call, found through the runtime (no libcuda link)
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <map>
#include <memory>
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

// The driver's cuDevicePrimaryCtxGetState, through the runtime's entry-point lookup (lancet links
// the runtime only, and loads no driver symbol itself); null when the lookup fails.
using PrimaryCtxGetState = CUresult (*)(CUdevice, unsigned int*, int*);
PrimaryCtxGetState primary_ctx_get_state() {
  static const PrimaryCtxGetState fn = []() -> PrimaryCtxGetState {
#if CUDART_VERSION >= 12000
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t e =
        cudaGetDriverEntryPointByVersion("cuDevicePrimaryCtxGetState", &p, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t e = cudaGetDriverEntryPoint("cuDevicePrimaryCtxGetState", &p, cudaEnableDefault, &found);
#endif
    if (e != cudaSuccess) cudaGetLastError();  // leave no error behind for the next checked call
    return e == cudaSuccess && found == cudaDriverEntryPointSuccess ? reinterpret_cast<PrimaryCtxGetState>(p) : nullptr;
#else
    return nullptr;
#endif
  }();
  return fn;
}

}  // namespace

bool cuda_device_initialized(int index) noexcept {
  const PrimaryCtxGetState get_state = primary_ctx_get_state();
  if (!get_state) return true;  // cannot tell: as if it were (a guard then restores, as CUDA code usually does)
  unsigned int flags = 0;
  int active = 0;
  if (get_state(static_cast<CUdevice>(index), &flags, &active) != CUDA_SUCCESS) return true;
  return active != 0;
}

CudaDeviceGuard::CudaDeviceGuard(int index) {
  LANCET_CUDA_CHECK(cudaGetDevice(&prev_));
  if (prev_ != index) {
    LANCET_CUDA_CHECK(cudaSetDevice(index));
    changed_ = true;
  }
}
CudaDeviceGuard::~CudaDeviceGuard() {
  // Never throws. Not back to a device this process has not used (runtime.h).
  if (changed_ && cuda_device_initialized(prev_)) cudaSetDevice(prev_);
}

CudaStream::CudaStream(Device device, int priority, bool blocking) : device_(device) {
  LANCET_CHECK(device.is_cuda(), "CudaStream on " << device.str());
  CudaDeviceGuard g(device.index);
  cudaStream_t st = nullptr;
  LANCET_CUDA_CHECK(cudaStreamCreateWithPriority(&st, blocking ? cudaStreamDefault : cudaStreamNonBlocking, priority));
  native_ = st;
}
CudaStream::~CudaStream() {
  // Never throws: CudaDeviceGuard's constructor throws when cudaGetDevice fails (a sticky error
  // after a device fault, or the runtime already unloading at exit), and an exception leaving a
  // destructor is std::terminate. Switch devices by hand and ignore every status instead.
  int prev = -1;
  const bool have_prev = cudaGetDevice(&prev) == cudaSuccess;
  const bool switched = have_prev && prev != device_.index && cudaSetDevice(device_.index) == cudaSuccess;
  cudaStreamDestroy(static_cast<cudaStream_t>(native_));
  if (switched && cuda_device_initialized(prev)) cudaSetDevice(prev);  // as CudaDeviceGuard
  cudaGetLastError();  // leave no error from the teardown behind for the next checked call
}
void CudaStream::synchronize() const { LANCET_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(native_))); }

CudaEvent::CudaEvent(Device device, bool timing) : device_(device) {
  LANCET_CHECK(device.is_cuda(), "CudaEvent on " << device.str());
  CudaDeviceGuard g(device.index);
  cudaEvent_t e = nullptr;
  LANCET_CUDA_CHECK(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming));
  native_ = e;
}
CudaEvent::~CudaEvent() {
  cudaEventDestroy(static_cast<cudaEvent_t>(native_));  // never throws
  cudaGetLastError();  // a failed destroy must not be reported by the next launch check
}
void CudaEvent::record(const Stream& s) {
  LANCET_CHECK(s.device == device_, "CudaEvent on " << device_.str() << " recorded on a stream on " << s.device.str());
  CudaDeviceGuard g(device_.index);
  LANCET_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(native_), static_cast<cudaStream_t>(s.native)));
}
void CudaEvent::wait_on(const Stream& s) const {
  LANCET_CHECK(s.device.is_cuda(), "CudaEvent::wait_on a stream on " << s.device.str());
  CudaDeviceGuard g(s.device.index);
  LANCET_CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(s.native), static_cast<cudaEvent_t>(native_), 0));
}
bool CudaEvent::query() const {
  const cudaError_t e = cudaEventQuery(static_cast<cudaEvent_t>(native_));
  if (e == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  LANCET_CUDA_CHECK(e);
  return true;
}
void CudaEvent::synchronize() const { LANCET_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(native_))); }
float CudaEvent::elapsed_ms_since(const CudaEvent& start) const {
  float ms = 0;
  LANCET_CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start.native_), static_cast<cudaEvent_t>(native_)));
  return ms;
}

void synchronize(const Stream& s) {
  if (!s.device.is_cuda()) return;
  CudaDeviceGuard g(s.device.index);
  LANCET_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(s.native)));
}

namespace {

cudaMemcpyKind copy_kind(Device dst_dev, Device src_dev) {
  if (dst_dev.is_cpu()) return src_dev.is_cpu() ? cudaMemcpyHostToHost : cudaMemcpyDeviceToHost;
  return src_dev.is_cpu() ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToDevice;
}

// Segments for the caching allocator (kernels/caching_allocator.h): cudaMalloc on the device,
// nullptr when the device is out of memory (the cache then releases its free segments and
// retries), an error naming the call for anything else.
RawAllocator cuda_raw_allocator(int index) {
  RawAllocator r;
  r.name = "cudaMalloc on cuda:" + std::to_string(index);
  r.alloc = [index](size_t bytes) -> void* {
    CudaDeviceGuard g(index);
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
    CudaDeviceGuard g(index);
    cudaFree(p);
  };
  return r;
}

}  // namespace

// One caching allocator per (GPU, memory domain) (kernels/allocator.h): called for each pool.
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
// every batch afresh, so freed blocks are kept by size and handed out again. `index`: the GPU
// current for cudaHostAlloc; -1: the calling thread's current device.
class PinnedHostAllocator final : public Allocator {
 public:
  explicit PinnedHostAllocator(int index) : index_(index) {}
  void* allocate(size_t bytes) override {
    const size_t n = bytes == 0 ? 1 : bytes;
    std::lock_guard<std::mutex> lock(mu_);
    auto& list = free_[n];
    void* p = nullptr;
    if (!list.empty()) {
      p = list.back();
      list.pop_back();
    } else {
      std::unique_ptr<CudaDeviceGuard> device;
      if (index_ >= 0) device = std::make_unique<CudaDeviceGuard>(index_);
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
  const int index_;
  std::mutex mu_;
  std::map<size_t, std::vector<void*>> free_;
};

PinnedHostAllocator& pinned_allocator_for(int index) {
  static std::mutex mu;
  static std::map<int, PinnedHostAllocator*> all;  // never destroyed: may outlive the CUDA context
  std::lock_guard<std::mutex> lock(mu);
  PinnedHostAllocator*& a = all[index];
  if (!a) a = new PinnedHostAllocator(index);
  return *a;
}

}  // namespace

Allocator& pinned_host_allocator() { return pinned_allocator_for(-1); }

Allocator& pinned_host_allocator(Device device) {
  LANCET_CHECK(device.is_cuda(), "pinned_host_allocator for " << device.str() << " (a GPU: the one the batches go to)");
  return pinned_allocator_for(device.index);
}

void cuda_copy(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes) {
  CudaDeviceGuard g(dst_dev.is_cuda() ? dst_dev.index : src_dev.index);
  // Between two GPUs: a peer copy (staged through the host by the driver when peer access is
  // off). The legacy default stream orders it after earlier work on both devices, and on the
  // current device, which cudaMemcpyPeer serialises with too: hence the guard, making that one
  // of the two (a thread left on another GPU would tie the copy to that GPU's work, or create a
  // context on GPU 0 when it never chose a device).
  if (dst_dev.is_cuda() && src_dev.is_cuda() && dst_dev.index != src_dev.index) {
    LANCET_CUDA_CHECK(cudaMemcpyPeer(dst, dst_dev.index, src, src_dev.index, bytes));
    return;
  }
  LANCET_CUDA_CHECK(cudaMemcpy(dst, src, bytes, copy_kind(dst_dev, src_dev)));
}

void copy_async(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes, const Stream& s) {
  if (bytes == 0) return;
  LANCET_CHECK(s.device.is_cuda(), "copy_async on a stream on " << s.device.str());
  CudaDeviceGuard g(s.device.index);
  const auto st = static_cast<cudaStream_t>(s.native);
  if (dst_dev.is_cuda() && src_dev.is_cuda() && dst_dev.index != src_dev.index)
    LANCET_CUDA_CHECK(cudaMemcpyPeerAsync(dst, dst_dev.index, src, src_dev.index, bytes, st));
  else
    LANCET_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, copy_kind(dst_dev, src_dev), st));
}

void cuda_memset_zero(void* dst, Device dev, size_t bytes) {
  CudaDeviceGuard g(dev.index);
  LANCET_CUDA_CHECK(cudaMemset(dst, 0, bytes));
}

}  // namespace lancet
