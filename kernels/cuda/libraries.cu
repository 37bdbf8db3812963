#include <map>
#include <string>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/libraries.h"
#include "kernels/cuda/runtime.h"

namespace lancet::cuda {

namespace {

// One set of handles per thread, one per device, destroyed when the thread ends (before the
// CUDA runtime's own teardown at process exit), each with its device current: cuBLAS assumes a
// handle's device unchanged from create to destroy, and cudnnDestroy / cublasDestroy synchronise
// the current device. Never throws (statuses ignored; the thread goes back as CudaDeviceGuard does).
struct ThreadHandles {
  std::map<int, cudnnHandle_t> cudnn;
  std::map<int, cublasHandle_t> cublas;
  std::map<int, cublasLtHandle_t> cublaslt;
  ~ThreadHandles() {
    if (cudnn.empty() && cublas.empty() && cublaslt.empty()) return;
    int prev = -1;
    const bool have_prev = cudaGetDevice(&prev) == cudaSuccess;
    for (auto& [d, h] : cudnn) {
      cudaSetDevice(d);
      cudnnDestroy(h);
    }
    for (auto& [d, h] : cublas) {
      cudaSetDevice(d);
      cublasDestroy(h);
    }
    for (auto& [d, h] : cublaslt) {
      cudaSetDevice(d);
      cublasLtDestroy(h);
    }
    if (have_prev && cuda_device_initialized(prev)) cudaSetDevice(prev);
    cudaGetLastError();  // leave no error from the teardown behind
  }
};
thread_local ThreadHandles t_handles;

void require_cuda_stream(const Stream& s, const char* what) {
  LANCET_CHECK(s.device.is_cuda(), what << " for a stream on " << s.device.str());
}

}  // namespace

cudnnHandle_t cudnn_handle(const Stream& s) {
  require_cuda_stream(s, "cudnn_handle");
  auto& h = t_handles.cudnn[s.device.index];
  if (!h) {
    CudaDeviceGuard g(s.device.index);
    LANCET_CUDNN_CHECK(cudnnCreate(&h));
  }
  LANCET_CUDNN_CHECK(cudnnSetStream(h, native(s)));
  return h;
}

cublasHandle_t cublas_handle(const Stream& s) {
  require_cuda_stream(s, "cublas_handle");
  auto& h = t_handles.cublas[s.device.index];
  if (!h) {
    CudaDeviceGuard g(s.device.index);
    LANCET_CUBLAS_CHECK(cublasCreate(&h));
    // Tensor-core math for half/bf16 operands; f32 GEMMs stay IEEE f32 (no TF32) so the CUDA
    // path can be compared with the CPU reference at f32 tolerances.
    LANCET_CUBLAS_CHECK(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
  }
  LANCET_CUBLAS_CHECK(cublasSetStream(h, native(s)));
  return h;
}

cublasLtHandle_t cublaslt_handle(Device d) {
  LANCET_CHECK(d.is_cuda(), "cublaslt_handle for " << d.str());
  auto& h = t_handles.cublaslt[d.index];
  if (!h) {
    CudaDeviceGuard g(d.index);
    LANCET_CUBLAS_CHECK(cublasLtCreate(&h));
  }
  return h;
}

Tensor workspace(const Stream& s, size_t bytes) {
  if (bytes == 0) return Tensor();
  return Tensor::empty({static_cast<int64_t>(bytes)}, DType::u8, s.device);
}

cudnnDataType_t cudnn_dtype(DType t, const char* op) {
  switch (t) {
    case DType::f32: return CUDNN_DATA_FLOAT;
    case DType::f16: return CUDNN_DATA_HALF;
    case DType::bf16: return CUDNN_DATA_BFLOAT16;
    default: LANCET_FAIL(op << ": dtype " << dtype_name(t) << " has no cuDNN type (expected f32, f16 or bf16)");
  }
}

cudaDataType_t cuda_dtype(DType t, const char* op) {
  switch (t) {
    case DType::f32: return CUDA_R_32F;
    case DType::f16: return CUDA_R_16F;
    case DType::bf16: return CUDA_R_16BF;
    default: LANCET_FAIL(op << ": dtype " << dtype_name(t) << " has no CUDA math type (expected f32, f16 or bf16)");
  }
}

TensorDesc::TensorDesc(const Tensor& x, const char* op)
    : TensorDesc(x.dim(0), x.ndim() > 1 ? x.dim(1) : 1, x.ndim() > 2 ? x.dim(2) : 1, x.ndim() > 3 ? x.dim(3) : 1,
                 x.dtype(), x.format(), op) {
  LANCET_CHECK(x.ndim() >= 1 && x.ndim() <= 4, op << ": expected a 1-D to 4-D tensor, got " << x.shape_str());
}

TensorDesc::TensorDesc(int64_t n, int64_t c, int64_t h, int64_t w, DType t, MemoryFormat f, const char* op) {
  constexpr int64_t kMax = 2147483647;
  LANCET_CHECK(n * c * h * w <= kMax, op << ": tensor of " << n * c * h * w << " elements exceeds cuDNN's int32 limit");
  LANCET_CUDNN_CHECK(cudnnCreateTensorDescriptor(&d_));
  const cudnnStatus_t st = cudnnSetTensor4dDescriptor(
      d_, f == MemoryFormat::channels_last ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW, cudnn_dtype(t, op),
      static_cast<int>(n), static_cast<int>(c), static_cast<int>(h), static_cast<int>(w));
  if (st != CUDNN_STATUS_SUCCESS) {
    cudnnDestroyTensorDescriptor(d_);
    LANCET_FAIL(op << ": cudnnSetTensor4dDescriptor(" << n << ", " << c << ", " << h << ", " << w
                   << ") failed: " << cudnnGetErrorString(st));
  }
}

TensorDesc::~TensorDesc() { cudnnDestroyTensorDescriptor(d_); }

}  // namespace lancet::cuda

namespace lancet {

std::string cudnn_version_string() {
  const size_t v = cudnnGetVersion();  // major*10000 + minor*100 + patch (cuDNN 9)
  return std::to_string(v / 10000) + "." + std::to_string((v % 10000) / 100) + "." + std::to_string(v % 100);
}

std::string cublas_version_string() {
  int v = 0;
  cublasGetProperty(MAJOR_VERSION, &v);
  int mi = 0, pa = 0;
  cublasGetProperty(MINOR_VERSION, &mi);
  cublasGetProperty(PATCH_LEVEL, &pa);
  return std::to_string(v) + "." + std::to_string(mi) + "." + std::to_string(pa);
}

}  // namespace lancet
