// cuda/activation.cu — CUDA ReLU, sigmoid and dropout: grid-stride elementwise kernels over
// the tensors' memory, templates over the element type (see cuda/activation.h).
#include "kernels/cuda/activation.h"
#include "kernels/cuda/common.cuh"

namespace lancet::cuda {
namespace {

void check_p(const char* op, float p) {
  LANCET_CHECK(p >= 0.f && p <= 1.f, op << ": probability must be in [0, 1], got " << p);
}

// The dropout mask: u8 with ref's shape and memory format.
void require_mask(const char* op, const Tensor& mask, const Tensor& ref, const char* ref_name) {
  LANCET_CHECK(mask.defined(), op << ": mask is an undefined tensor");
  LANCET_CHECK(mask.shape() == ref.shape(), op << ": mask " << mask.shape_str() << " does not match " << ref_name
                                               << " " << ref.shape_str() << " (expected " << ref.shape_str() << ")");
  require_dtype(op, "mask", mask, DType::u8);
  LANCET_CHECK(mask.format() == ref.format(), op << ": mask " << mask.shape_str() << " and " << ref_name << " "
                                                 << ref.shape_str() << " differ in memory format");
}

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

// y = f(x) for ReLU and sigmoid: kernel_for(T{}) is the kernel (x, y, n) for element type T.
template <typename KernelFor>
void forward_op(const char* op, const Tensor& x, Tensor& y, const Stream& s, KernelFor kernel_for) {
  require_cuda(op, s, x, {&y});
  require_same(op, "y", y, x, "x");
  const int64_t n = x.numel();
  launch_elementwise(op, x.dtype(), n, s, [&](auto t, const ElementwiseLaunch& L) {
    using T = decltype(t);
    kernel_for(t)<<<L.grid, L.block, 0, L.stream>>>(ptr<T>(x), ptr<T>(y), n);
  });
}

// dx from the forward's output y and dy for ReLU and sigmoid: kernel_for(T{}) is the kernel
// (y, dy, dx, n) for element type T.
template <typename KernelFor>
void backward_op(const char* op, const Tensor& y, const Tensor& dy, Tensor& dx, const Stream& s, KernelFor kernel_for) {
  require_cuda(op, s, y, {&dy, &dx});
  require_same(op, "dy", dy, y, "y");
  require_same(op, "dx", dx, y, "y");
  const int64_t n = y.numel();
  launch_elementwise(op, y.dtype(), n, s, [&](auto t, const ElementwiseLaunch& L) {
    using T = decltype(t);
    kernel_for(t)<<<L.grid, L.block, 0, L.stream>>>(ptr<T>(y), ptr<T>(dy), ptr<T>(dx), n);
  });
}

}  // namespace

void relu_forward(const Tensor& x, Tensor& y, const Stream& s) {
  forward_op("relu_forward", x, y, s, [](auto t) { return relu_forward_kernel<decltype(t)>; });
}

void relu_backward(const Tensor& y, const Tensor& dy, Tensor& dx, const Stream& s) {
  backward_op("relu_backward", y, dy, dx, s, [](auto t) { return relu_backward_kernel<decltype(t)>; });
}

void sigmoid_forward(const Tensor& x, Tensor& y, const Stream& s) {
  forward_op("sigmoid_forward", x, y, s, [](auto t) { return sigmoid_forward_kernel<decltype(t)>; });
}

void sigmoid_backward(const Tensor& y, const Tensor& dy, Tensor& dx, const Stream& s) {
  backward_op("sigmoid_backward", y, dy, dx, s, [](auto t) { return sigmoid_backward_kernel<decltype(t)>; });
}

void dropout_forward(float p, uint64_t seed, uint64_t offset, const Tensor& x, Tensor& y, Tensor& mask,
                     const Stream& s) {
  const char* op = "dropout_forward";
  require_cuda(op, s, x, {&y, &mask});
  require_same(op, "y", y, x, "x");
  check_p(op, p);
  require_mask(op, mask, x, "x");
  const int64_t n = x.numel();
  const bool drop_all = p == 1.f;
  const float scale = drop_all ? 0.f : 1.f / (1.f - p);  // the CPU twin's value, computed on the host
  launch_elementwise(op, x.dtype(), n, s, [&](auto t, const ElementwiseLaunch& L) {
    using T = decltype(t);
    dropout_forward_kernel<<<L.grid, L.block, 0, L.stream>>>(p, drop_all, scale, seed, offset, ptr<T>(x), ptr<T>(y),
                                                             ptr<uint8_t>(mask), n);
  });
}

void dropout_backward(float p, const Tensor& mask, const Tensor& dy, Tensor& dx, const Stream& s) {
  const char* op = "dropout_backward";
  require_cuda(op, s, dy, {&mask, &dx});
  require_same(op, "dx", dx, dy, "dy");
  check_p(op, p);
  require_mask(op, mask, dy, "dy");
  const int64_t n = dy.numel();
  const float scale = p == 1.f ? 0.f : 1.f / (1.f - p);
  launch_elementwise(op, dy.dtype(), n, s, [&](auto t, const ElementwiseLaunch& L) {
    using T = decltype(t);
    dropout_backward_kernel<<<L.grid, L.block, 0, L.stream>>>(scale, ptr<uint8_t>(mask), ptr<T>(dy), ptr<T>(dx), n);
  });
}

}  // namespace lancet::cuda
