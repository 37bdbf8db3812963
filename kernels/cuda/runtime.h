// cuda/runtime.h — the CUDA device runtime as far as the foundation needs it: device count
// and names, host<->device copies, and a device allocator. Only compiled with LANCET_WITH_CUDA.
// The error idiom: LANCET_CUDA_CHECK(call) throws lancet::Error naming the call, the CUDA
// error string, and file:line.
#pragma once
#include <string>
#include <vector>

#include "kernels/allocator.h"
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
std::string cuda_runtime_version();  // e.g. "13.0"; "no driver" when none

// The capture range of `nsys profile --capture-range=cudaProfilerApi` (and ncu's): the steps
// between start and stop are recorded. Throws naming the call when the driver refuses.
void cuda_profiler_start();
void cuda_profiler_stop();

// Page-locked (pinned) host memory through cudaHostAlloc, caching freed blocks by size: the
// allocator for the data loader's batches (data/loader.h) when training on a GPU. Its tensors
// are CPU tensors. Allocation throws naming the call when CUDA refuses.
Allocator& pinned_host_allocator();

}  // namespace lancet
