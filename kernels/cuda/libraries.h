// cuda/libraries.h — cuDNN and cuBLAS/cuBLASLt handles and their error idiom (CUDA twins only).
//
// Handles are per (thread, device): cuDNN and cuBLAS handles must not be used by two threads at
// once, and pipeline stages run as threads. Each accessor binds the handle to the op's stream
// before returning it. Workspaces come from the device's caching allocator (a Tensor of bytes,
// returned to the cache when the op drops it; ops on one stream may reuse it at once because
// the stream orders them).
#pragma once
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cudnn.h>

#include "kernels/error.h"
#include "kernels/tensor.h"

#define LANCET_CUDNN_CHECK(call)                                                   \
  do {                                                                             \
    cudnnStatus_t lancet_cudnn_st_ = (call);                                       \
    if (lancet_cudnn_st_ != CUDNN_STATUS_SUCCESS)                                  \
      LANCET_FAIL(#call << " failed: " << cudnnGetErrorString(lancet_cudnn_st_));  \
  } while (0)

#define LANCET_CUBLAS_CHECK(call)                                                            \
  do {                                                                                       \
    cublasStatus_t lancet_cublas_st_ = (call);                                               \
    if (lancet_cublas_st_ != CUBLAS_STATUS_SUCCESS)                                          \
      LANCET_FAIL(#call << " failed: " << cublasGetStatusName(lancet_cublas_st_) << " ("       \
                        << cublasGetStatusString(lancet_cublas_st_) << ")");                 \
  } while (0)

namespace lancet::cuda {

cudnnHandle_t cudnn_handle(const Stream& s);
cublasHandle_t cublas_handle(const Stream& s);
cublasLtHandle_t cublaslt_handle(Device d);  // cuBLASLt takes the stream per call

// `bytes` of scratch on the stream's device (an undefined tensor for 0 bytes).
Tensor workspace(const Stream& s, size_t bytes);

// The cuDNN data type of a Tensor dtype (f32, f16, bf16); throws naming `op` otherwise.
cudnnDataType_t cudnn_dtype(DType t, const char* op);
cudaDataType_t cuda_dtype(DType t, const char* op);

// A 4-D tensor descriptor for x in its memory format (nchw or channels_last), RAII.
class TensorDesc {
 public:
  explicit TensorDesc(const Tensor& x, const char* op);
  TensorDesc(int64_t n, int64_t c, int64_t h, int64_t w, DType t, MemoryFormat f, const char* op);
  ~TensorDesc();
  TensorDesc(const TensorDesc&) = delete;
  TensorDesc& operator=(const TensorDesc&) = delete;
  cudnnTensorDescriptor_t get() const { return d_; }

 private:
  cudnnTensorDescriptor_t d_ = nullptr;
};

// cudnn_version_string() / cublas_version_string(): kernels/cuda/runtime.h (host code reads them).

}  // namespace lancet::cuda
