// cuda/activation.cu — CUDA ReLU, sigmoid and dropout: grid-stride elementwise kernels over
// the tensors' memory, templates over the element type (see cuda/activation.h).
#include "kernels/cuda/activation.h"
#include "kernels/cuda/common.cuh"

namespace lancet::cuda {
namespace {

// `t` matches `ref` in shape, dtype and memory format (elementwise over memory needs all three).
void require_same(const char* op, const char* name, const Tensor& t, const Tensor& ref, const char* ref_name) {
  LANCET_CHECK(t.defined(), op << ": " << name << " is an undefined tensor");
  LANCET_CHECK(t.shape() == ref.shape(),
               op << ": " << name << " " << t.shape_str() << " does not match " << ref_name << " " << ref.shape_str());
  require_dtype(op, name, t, ref.dtype());
  LANCET_CHECK(t.format() == ref.format(), op << ": " << name << " " << t.shape_str() << " and " << ref_name << " "
                                              << ref.shape_str() << " differ in memory format");
}

void check_p(const char* op, float p) {
  LANCET_CHECK(p >= 0.f && p <= 1.f, op << ": probability must be in [0, 1], got " << p);
}

__device__ __forceinline__ int64_t first_index() { return blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; }
__device__ __forceinline__ int64_t grid_stride() { return static_cast<int64_t>(blockDim.x) * gridDim.x; }

// activation.h's formula, evaluated identically on host and device (all arithmetic mod 2^64).
__host__ __device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
__host__ __device__ __forceinline__ float dropout_uniform(uint64_t seed, uint64_t counter) {
  const uint64_t z = mix64(mix64(seed) + (counter + 1) * 0x9E3779B97F4A7C15ull);
  return static_cast<float>(z >> 40) * (1.f / 16777216.f);  // 24 bits: exact in f32
}

template <typename T>
__global__ void relu_forward_kernel(const T* x, T* y, int64_t n) {  // y may alias x
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const float v = load_f(x[i]);
    y[i] = store_f<T>(v < 0.f ? 0.f : v);  // std::max(v, 0.f) of the CPU twin: NaN and -0 pass
  }
}

template <typename T>
__global__ void relu_backward_kernel(const T* y, const T* dy, T* dx, int64_t n) {  // dx may alias dy
  for (int64_t i = first_index(); i < n; i += grid_stride()) dx[i] = load_f(y[i]) > 0.f ? dy[i] : store_f<T>(0.f);
}

template <typename T>
__global__ void sigmoid_forward_kernel(const T* x, T* y, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) y[i] = store_f<T>(1.f / (1.f + expf(-load_f(x[i]))));
}

template <typename T>
__global__ void sigmoid_backward_kernel(const T* y, const T* dy, T* dx, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const float yv = load_f(y[i]);
    dx[i] = store_f<T>(load_f(dy[i]) * yv * (1.f - yv));
  }
}

// drop_all (p == 1) drops everything; otherwise keep when p == 0 or uniform >= p, exactly as
// the CPU twin decides (same float comparison of the same exact values).
template <typename T>
__global__ void dropout_forward_kernel(float p, bool drop_all, float scale, uint64_t seed, uint64_t offset, const T* x,
                                       T* y, uint8_t* mask, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const bool keep = !drop_all && (p == 0.f || dropout_uniform(seed, offset + static_cast<uint64_t>(i)) >= p);
    mask[i] = keep ? 1 : 0;
    y[i] = store_f<T>(keep ? load_f(x[i]) * scale : 0.f);
  }
}

template <typename T>
__global__ void dropout_backward_kernel(float scale, const uint8_t* mask, const T* dy, T* dx, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride())
    dx[i] = store_f<T>(mask[i] ? load_f(dy[i]) * scale : 0.f);
}

}  // namespace

void relu_forward(const Tensor& x, Tensor& y, const Stream& s) {
  const char* op = "relu_forward";
  require_cuda(op, s, x, {&y});
  require_same(op, "y", y, x, "x");
  const int64_t n = x.numel();
  if (n == 0) return;
  CudaDeviceGuard g(s.device.index);
  LANCET_CUDA_FLOAT_TYPES(x.dtype(), op, {
    relu_forward_kernel<<<grid_for(n), kBlock, 0, native(s)>>>(ptr<scalar_t>(x), ptr<scalar_t>(y), n);
  });
  LANCET_CUDA_LAUNCH_CHECK();
}

void relu_backward(const Tensor& y, const Tensor& dy, Tensor& dx, const Stream& s) {
  const char* op = "relu_backward";
  require_cuda(op, s, y, {&dy, &dx});
  require_same(op, "dy", dy, y, "y");
  require_same(op, "dx", dx, y, "y");
  const int64_t n = y.numel();
  if (n == 0) return;
  CudaDeviceGuard g(s.device.index);
  LANCET_CUDA_FLOAT_TYPES(y.dtype(), op, {
    relu_backward_kernel<<<grid_for(n), kBlock, 0, native(s)>>>(ptr<scalar_t>(y), ptr<scalar_t>(dy),
                                                                ptr<scalar_t>(dx), n);
  });
  LANCET_CUDA_LAUNCH_CHECK();
}

void sigmoid_forward(const Tensor& x, Tensor& y, const Stream& s) {
  const char* op = "sigmoid_forward";
  require_cuda(op, s, x, {&y});
  require_same(op, "y", y, x, "x");
  const int64_t n = x.numel();
  if (n == 0) return;
  CudaDeviceGuard g(s.device.index);
  LANCET_CUDA_FLOAT_TYPES(x.dtype(), op, {
    sigmoid_forward_kernel<<<grid_for(n), kBlock, 0, native(s)>>>(ptr<scalar_t>(x), ptr<scalar_t>(y), n);
  });
  LANCET_CUDA_LAUNCH_CHECK();
}

void sigmoid_backward(const Tensor& y, const Tensor& dy, Tensor& dx, const Stream& s) {
  const char* op = "sigmoid_backward";
  require_cuda(op, s, y, {&dy, &dx});
  require_same(op, "dy", dy, y, "y");
  require_same(op, "dx", dx, y, "y");
  const int64_t n = y.numel();
  if (n == 0) return;
  CudaDeviceGuard g(s.device.index);
  LANCET_CUDA_FLOAT_TYPES(y.dtype(), op, {
    sigmoid_backward_kernel<<<grid_for(n), kBlock, 0, native(s)>>>(ptr<scalar_t>(y), ptr<scalar_t>(dy),
                                                                   ptr<scalar_t>(dx), n);
  });
  LANCET_CUDA_LAUNCH_CHECK();
}

void dropout_forward(float p, uint64_t seed, uint64_t offset, const Tensor& x, Tensor& y, Tensor& mask,
                     const Stream& s) {
  const char* op = "dropout_forward";
  require_cuda(op, s, x, {&y, &mask});
  require_same(op, "y", y, x, "x");
  check_p(op, p);
  LANCET_CHECK(mask.defined(), op << ": mask is an undefined tensor");
  LANCET_CHECK(mask.shape() == x.shape(), op << ": mask " << mask.shape_str() << " does not match x " << x.shape_str()
                                             << " (expected " << x.shape_str() << ")");
  require_dtype(op, "mask", mask, DType::u8);
  LANCET_CHECK(mask.format() == x.format(), op << ": mask " << mask.shape_str() << " and x " << x.shape_str()
                                               << " differ in memory format");
  const int64_t n = x.numel();
  if (n == 0) return;
  const bool drop_all = p == 1.f;
  const float scale = drop_all ? 0.f : 1.f / (1.f - p);  // the CPU twin's value, computed on the host
  CudaDeviceGuard g(s.device.index);
  LANCET_CUDA_FLOAT_TYPES(x.dtype(), op, {
    dropout_forward_kernel<<<grid_for(n), kBlock, 0, native(s)>>>(p, drop_all, scale, seed, offset, ptr<scalar_t>(x),
                                                                  ptr<scalar_t>(y), ptr<uint8_t>(mask), n);
  });
  LANCET_CUDA_LAUNCH_CHECK();
}

void dropout_backward(float p, const Tensor& mask, const Tensor& dy, Tensor& dx, const Stream& s) {
  const char* op = "dropout_backward";
  require_cuda(op, s, dy, {&mask, &dx});
  require_same(op, "dx", dx, dy, "dy");
  check_p(op, p);
  LANCET_CHECK(mask.defined(), op << ": mask is an undefined tensor");
  LANCET_CHECK(mask.shape() == dy.shape(), op << ": mask " << mask.shape_str() << " does not match dy "
                                              << dy.shape_str() << " (expected " << dy.shape_str() << ")");
  require_dtype(op, "mask", mask, DType::u8);
  LANCET_CHECK(mask.format() == dy.format(), op << ": mask " << mask.shape_str() << " and dy " << dy.shape_str()
                                                << " differ in memory format");
  const int64_t n = dy.numel();
  if (n == 0) return;
  const float scale = p == 1.f ? 0.f : 1.f / (1.f - p);
  CudaDeviceGuard g(s.device.index);
  LANCET_CUDA_FLOAT_TYPES(dy.dtype(), op, {
    dropout_backward_kernel<<<grid_for(n), kBlock, 0, native(s)>>>(scale, ptr<uint8_t>(mask), ptr<scalar_t>(dy),
                                                                   ptr<scalar_t>(dx), n);
  });
  LANCET_CUDA_LAUNCH_CHECK();
}

}  // namespace lancet::cuda
