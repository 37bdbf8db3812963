// activation.cpp — CPU ReLU, sigmoid and dropout; elementwise over memory, parallel over fixed
// chunks, so either memory format works (all tensors of a call in one).
#include "kernels/activation.h"

#include <cmath>

#include "kernels/cpu_util.h"
#include "kernels/cuda_twin.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/activation.h"
#endif

namespace lancet {
namespace {

void check_unary(const char* op, const char* in_name, const Tensor& x, const char* out_name, const Tensor& y,
                 const Stream& s, std::initializer_list<const Tensor*> others = {}) {
  cpu::require_cpu_any_format(op, s, x, others);
  cpu::require_dtype(op, in_name, x, DType::f32);
  cpu::require_like(op, out_name, y, x, in_name);
}

template <typename F>
void for_each_index(int64_t n, F&& fn) {
  parallel_for(n, cpu::kElementwiseGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i);
  });
}

uint64_t mix64(uint64_t z) {  // splitmix64's finaliser
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

void check_p(const char* op, float p) {
  LANCET_CHECK(p >= 0.f && p <= 1.f, op << ": probability must be in [0, 1], got " << p);
}

}  // namespace

void relu_forward(const Tensor& x, Tensor& y, const Stream& s) {
  LANCET_CUDA_TWIN(x, relu_forward(x, y, s));
  check_unary("relu_forward", "x", x, "y", y, s, {&y});
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
  for_each_index(x.numel(), [&](int64_t i) { yp[i] = std::max(xp[i], 0.f); });  // NaN propagates, as in torch
}

void relu_backward(const Tensor& y, const Tensor& dy, Tensor& dx, const Stream& s) {
  LANCET_CUDA_TWIN(y, relu_backward(y, dy, dx, s));
  check_unary("relu_backward", "y", y, "dy", dy, s, {&dy, &dx});
  cpu::require_like("relu_backward", "dx", dx, y, "y");
  const float* yp = y.data<float>();
  const float* dyp = dy.data<float>();
  float* dxp = dx.data<float>();
  for_each_index(y.numel(), [&](int64_t i) { dxp[i] = yp[i] > 0.f ? dyp[i] : 0.f; });
}

void sigmoid_forward(const Tensor& x, Tensor& y, const Stream& s) {
  LANCET_CUDA_TWIN(x, sigmoid_forward(x, y, s));
  check_unary("sigmoid_forward", "x", x, "y", y, s, {&y});
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
  for_each_index(x.numel(), [&](int64_t i) { yp[i] = 1.f / (1.f + std::exp(-xp[i])); });
}

void sigmoid_backward(const Tensor& y, const Tensor& dy, Tensor& dx, const Stream& s) {
  LANCET_CUDA_TWIN(y, sigmoid_backward(y, dy, dx, s));
  check_unary("sigmoid_backward", "y", y, "dy", dy, s, {&dy, &dx});
  cpu::require_like("sigmoid_backward", "dx", dx, y, "y");
  const float* yp = y.data<float>();
  const float* dyp = dy.data<float>();
  float* dxp = dx.data<float>();
  for_each_index(y.numel(), [&](int64_t i) { dxp[i] = dyp[i] * yp[i] * (1.f - yp[i]); });
}

float dropout_uniform(uint64_t seed, uint64_t counter) {
  const uint64_t z = mix64(mix64(seed) + (counter + 1) * 0x9E3779B97F4A7C15ull);
  return static_cast<float>(z >> 40) * (1.f / 16777216.f);  // top 24 bits: exact in f32, < 1
}

void dropout_forward(float p, uint64_t seed, uint64_t offset, const Tensor& x, Tensor& y, Tensor& mask,
                     const Stream& s) {
  LANCET_CUDA_TWIN(x, dropout_forward(p, seed, offset, x, y, mask, s));
  const char* op = "dropout_forward";
  check_unary(op, "x", x, "y", y, s, {&y, &mask});
  check_p(op, p);
  cpu::require_shape(op, "mask", mask, x.shape(), cpu::desc("x", x));
  cpu::require_dtype(op, "mask", mask, DType::u8);
  cpu::require_same_format(op, "mask", mask, x, "x");
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
  uint8_t* mp = mask.data<uint8_t>();
  if (p == 1.f) {  // torch: everything dropped (no 1/(1-p) = inf)
    for_each_index(x.numel(), [&](int64_t i) { yp[i] = 0.f, mp[i] = 0; });
    return;
  }
  const float scale = 1.f / (1.f - p);
  for_each_index(x.numel(), [&](int64_t i) {
    const bool keep = p == 0.f || dropout_uniform(seed, offset + static_cast<uint64_t>(i)) >= p;
    mp[i] = keep ? 1 : 0;
    yp[i] = keep ? xp[i] * scale : 0.f;
  });
}

void dropout_backward(float p, const Tensor& mask, const Tensor& dy, Tensor& dx, const Stream& s) {
  LANCET_CUDA_TWIN(dy, dropout_backward(p, mask, dy, dx, s));
  const char* op = "dropout_backward";
  check_unary(op, "dy", dy, "dx", dx, s, {&mask, &dx});
  check_p(op, p);
  cpu::require_shape(op, "mask", mask, dy.shape(), cpu::desc("dy", dy));
  cpu::require_dtype(op, "mask", mask, DType::u8);
  cpu::require_same_format(op, "mask", mask, dy, "dy");
  const float scale = p == 1.f ? 0.f : 1.f / (1.f - p);
  const uint8_t* mp = mask.data<uint8_t>();
  const float* dyp = dy.data<float>();
  float* dxp = dx.data<float>();
  for_each_index(dy.numel(), [&](int64_t i) { dxp[i] = mp[i] ? dyp[i] * scale : 0.f; });
}

}  // namespace lancet
