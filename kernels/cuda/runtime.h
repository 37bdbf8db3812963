// cuda/runtime.h — the CUDA device runtime: device count and names, a guard for the current
// device, streams and events (RAII), stream-ordered copies, the pinned host allocator and the
// profiler capture range. Only compiled with LANCET_WITH_CUDA; includes no CUDA header, so
// host code (trainer/, tools/) can use it.
// The error idiom: LANCET_CUDA_CHECK(call) throws lancet::Error naming the call, the CUDA
// error string, and file:line (cuDNN and cuBLAS twins: kernels/cuda/libraries.h).
#pragma once
#include <string>
#include <vector>

#include "kernels/allocator.h"
#include "kernels/device.h"
#include "kernels/error.h"

#define LANCET_CUDA_CHECK(call)                                                                  \
  do {                                                                                           \
    cudaError_t lancet_cuda_err_ = (call);                                                       \
    if (lancet_cuda_err_ != cudaSuccess)                                                         \
      LANCET_FAIL(#call << " failed: " << cudaGetErrorString(lancet_cuda_err_));                 \
  } while (0)

namespace lancet {

struct CudaDeviceInfo {
  int index;
  std::string name;
  size_t total_bytes;
  int cc_major, cc_minor;
};

// Never throws: a machine with no GPU or no driver yields an empty list.
std::vector<CudaDeviceInfo> cuda_devices();
std::string cuda_runtime_version();  // the CUDA runtime linked in, e.g. "13.0"
std::string cudnn_version_string();  // the cuDNN loaded, e.g. "9.13.0" (kernels/cuda/libraries.cu)
std::string cublas_version_string();

// The capture range of `nsys profile --capture-range=cudaProfilerApi` (and ncu's): the steps
// between start and stop are recorded. Throws naming the call when the driver refuses.
void cuda_profiler_start();
void cuda_profiler_stop();

// Page-locked (pinned) host memory through cudaHostAlloc, caching freed blocks by size: the
// allocator for the data loader's batches (data/loader.h) when training on a GPU. Its tensors
// are CPU tensors. Allocation throws naming the call when CUDA refuses.
// With `device`, every cudaHostAlloc runs with that GPU current (the blocks are portable: usable
// with every GPU): pass the GPU the batches go to. The loader's workers are threads that never
// chose a device, so their current device is 0, and a cudaHostAlloc there would create a CUDA
// context on GPU 0 — another rank's GPU in data parallelism. Without: the calling thread's.
Allocator& pinned_host_allocator();
Allocator& pinned_host_allocator(Device device);

// Whether this process has initialised GPU `index` (its primary context is active). True when
// the driver cannot say. Never throws.
bool cuda_device_initialized(int index) noexcept;

// Makes `index` the calling thread's current device for a scope and restores the previous one —
// when that one is initialised (cuda_device_initialized). A thread that never chose a device is
// on device 0, and switching back there would create a CUDA context on GPU 0 (cudaSetDevice
// initialises the device: hundreds of MiB on another rank's GPU, or an error in exclusive-process
// mode), so such a thread stays on `index`.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int index);
  ~CudaDeviceGuard();
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

// A stream on one GPU, destroyed with the object. stream() is the lancet::Stream every op takes.
// Non-blocking by default: it does not synchronise with the legacy default stream. A blocking
// one (`blocking`) does, as CUDA defines it: work on the legacy default stream of its device
// waits for the blocking streams' earlier work, and their later work waits for it — so an op
// some layer issues on the legacy stream (Tensor::clone, to) stays ordered with it.
class CudaStream {
 public:
  explicit CudaStream(Device device, int priority = 0, bool blocking = false);
  ~CudaStream();
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  Stream stream() const { return Stream{device_, native_}; }
  void synchronize() const;

 private:
  Device device_;
  void* native_ = nullptr;  // cudaStream_t
};

// An event without timing (cudaEventDisableTiming unless `timing`), for ordering one stream
// after another: e.record(a); e.wait_on(b) makes b's later work wait for a's work so far.
class CudaEvent {
 public:
  explicit CudaEvent(Device device, bool timing = false);
  ~CudaEvent();
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  void record(const Stream& s);
  void wait_on(const Stream& s) const;  // s waits for the last record
  bool query() const;                   // true when the recorded work has finished
  void synchronize() const;
  float elapsed_ms_since(const CudaEvent& start) const;  // both with timing

 private:
  Device device_;
  void* native_ = nullptr;  // cudaEvent_t
};

// synchronize(stream): kernels/device.h.
// Copy of `bytes` ordered on stream `s` (asynchronous with respect to the host when the host
// side is pinned memory); either side may be the CPU. The caller keeps both buffers alive
// until the stream passes the copy.
void copy_async(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes, const Stream& s);

}  // namespace lancet
