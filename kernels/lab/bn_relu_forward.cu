// lab/bn_relu_forward.cu — kernel lab for the fused BatchNorm-apply + ReLU forward,
//   y[n,c,h,w] = max(x[n,c,h,w] * scale[c] + shift[c], 0),
//   scale = invstd * gamma, shift = beta - mean * scale, invstd = 1 / sqrt(var + eps),
// on NCHW activations (the eval-mode apply pass, and the second pass of training mode).
//
// Versions (each also computes the per-channel statistics from the running ones, one tiny
// launch, so all do the same work):
//   v1  the shipped kernel: lancet::cuda::batchnorm_relu_forward_eval (kernels/cuda/batchnorm.cu),
//       called, not copied. Grid (C, splits), block from HW (ChannelGrid): its own
//       configuration, so it runs once per shape ("shipped").
//   v2  one thread per element, flat grid-stride loop over memory, channel = (i / HW) % C,
//       scale/shift precomputed as a float2 per channel. Block size from the list.
//   v3  one block row per (n, c) plane (blockIdx.x = plane, blockIdx.y = tile), scale/shift
//       loaded once per block, 16-byte vector loads and stores (float4 / 8 halves) when HW is
//       a multiple of the vector width, scalar otherwise. Block size from the list.
// Check: against the CPU twin lancet::batchnorm_relu_forward_eval (kernels/fused.h) on the
// same (16-bit-rounded) inputs, |gpu - cpu| <= rtol * (|cpu| + 1) with rtol 1e-5 (f32) and one
// unit in the last place of the 16-bit type (f16 2e-3, bf16 1.6e-2): float arithmetic that may
// differ only in FMA contraction, then one rounding to the element type.
// Bytes moved: read x, write y (2 * numel * sizeof(T)); the per-channel vectors are ignored.
//
// Run: build/bin/lab_bn_relu_forward [--quick]   (--quick: the batch-32 shapes only)
#include <cstring>
#include <functional>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/fused.h"
#include "kernels/elementwise.h"
#include "kernels/fused.h"
#include "kernels/lab/lab.cuh"

namespace lancet::lab {
namespace {

using cuda::load_f;
using cuda::store_f;

// ---- the versions' kernels ----------------------------------------------------------------

// ss[c] = {scale, shift}: the shipped kernel's formulas (eval_stats_kernel, then the per-channel
// prologue of normalize_kernel), so v2 and v3 see the same coefficients as v1.
__global__ void scale_shift_kernel(const float* gamma, const float* beta, const float* running_mean,
                                   const float* running_var, float eps, int64_t C, float2* ss) {
  for (int64_t c = cuda::first_index(); c < C; c += cuda::grid_stride()) {
    const float invstd = static_cast<float>(1.0 / sqrt(static_cast<double>(running_var[c]) + eps));
    const float scale = invstd * gamma[c];
    ss[c] = make_float2(scale, beta[c] - running_mean[c] * scale);
  }
}

__device__ __forceinline__ float bn_relu(float x, float2 ss) {
  const float v = x * ss.x + ss.y;
  return v < 0.f ? 0.f : v;  // std::max(v, 0.f) of relu_forward: NaN passes
}

template <typename T>
__global__ void v2_flat_kernel(const T* __restrict__ x, const float2* __restrict__ ss, int64_t C, int64_t HW,
                               int64_t n, T* __restrict__ y) {
  for (int64_t i = cuda::first_index(); i < n; i += cuda::grid_stride())
    y[i] = store_f<T>(bn_relu(load_f(x[i]), ss[(i / HW) % C]));
}

// 16 bytes of T.
template <typename T> struct alignas(16) Vec16 {
  static constexpr int kWidth = 16 / static_cast<int>(sizeof(T));
  T v[kWidth];
};

template <typename T>
__global__ void v3_plane_vec_kernel(const T* __restrict__ x, const float2* __restrict__ ss, int64_t C, int64_t HW,
                                    T* __restrict__ y) {
  using V = Vec16<T>;
  const int64_t plane = blockIdx.x;
  const float2 k = ss[plane % C];
  const T* xp = x + plane * HW;
  T* yp = y + plane * HW;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.y;
  if (HW % V::kWidth == 0) {  // plane starts 16-byte aligned (the allocation is)
    const int64_t nv = HW / V::kWidth;
    for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < nv; i += stride) {
      V a = reinterpret_cast<const V*>(xp)[i];
#pragma unroll
      for (int j = 0; j < V::kWidth; ++j) a.v[j] = store_f<T>(bn_relu(load_f(a.v[j]), k));
      reinterpret_cast<V*>(yp)[i] = a;
    }
  } else {
    for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < HW; i += stride)
      yp[i] = store_f<T>(bn_relu(load_f(xp[i]), k));
  }
}

// ---- one problem: tensors on the GPU, the CPU reference -----------------------------------

struct Problem {
  Shape shape;
  DType dtype;
  int64_t N, C, HW, numel;
  Tensor x, y, gamma, beta, running_mean, running_var, saved_mean, saved_invstd;  // on the GPU
  Tensor ss;                                                                     // C float2
  std::vector<float> ref;                                                        // CPU twin's y
};

constexpr float kEps = 1e-5f;

// f32 data on the GPU as `dt` (rounded once by the cast op).
Tensor to_gpu(const std::vector<float>& v, const Shape& shape, DType dt, const Stream& s) {
  Tensor f = Tensor::from_vector(v, shape).to(s.device);
  if (dt == DType::f32) return f;
  Tensor t = Tensor::empty(shape, dt, s.device);
  cast(f, t, s);
  return t;
}

std::vector<float> to_host(const Tensor& t, const Stream& s) {
  if (t.dtype() == DType::f32) {
    synchronize(s);
    return t.to_vector();
  }
  Tensor f = Tensor::empty(t.shape(), DType::f32, t.device());
  cast(t, f, s);
  synchronize(s);
  return f.to_vector();
}

Problem make_problem(const Shape& shape, DType dt, const Stream& s) {
  Problem p;
  p.shape = shape;
  p.dtype = dt;
  p.N = shape[0];
  p.C = shape[1];
  p.HW = shape[2] * shape[3];
  p.numel = p.N * p.C * p.HW;
  const Shape cs{p.C};
  const std::vector<float> x = uniform(p.numel, 1, -2.f, 2.f), g = uniform(p.C, 2, 0.5f, 1.5f),
                           b = uniform(p.C, 3, -0.5f, 0.5f), m = uniform(p.C, 4, -0.5f, 0.5f),
                           v = uniform(p.C, 5, 0.5f, 2.f);
  p.x = to_gpu(x, shape, dt, s);
  p.y = Tensor::empty(shape, dt, s.device);
  p.gamma = to_gpu(g, cs, DType::f32, s);
  p.beta = to_gpu(b, cs, DType::f32, s);
  p.running_mean = to_gpu(m, cs, DType::f32, s);
  p.running_var = to_gpu(v, cs, DType::f32, s);
  p.saved_mean = Tensor::empty(cs, DType::f32, s.device);
  p.saved_invstd = Tensor::empty(cs, DType::f32, s.device);
  p.ss = Tensor::empty({2 * p.C}, DType::f32, s.device);
  // The CPU twin on exactly the GPU's inputs (x after rounding to dt).
  const Tensor xc = Tensor::from_vector(dt == DType::f32 ? x : to_host(p.x, s), shape);
  Tensor yc = Tensor::empty(shape), mc = Tensor::empty(cs), ic = Tensor::empty(cs);
  BatchNormParams bp;
  bp.eps = kEps;
  batchnorm_relu_forward_eval(bp, xc, Tensor::from_vector(g, cs), Tensor::from_vector(b, cs),
                              Tensor::from_vector(m, cs), Tensor::from_vector(v, cs), yc, mc, ic, Stream::cpu());
  p.ref = yc.to_vector();
  return p;
}

// ---- the versions as launches --------------------------------------------------------------

struct Version {
  const char* name;
  std::vector<int> blocks;  // launch configurations; {0}: the version picks its own
  std::function<void(Problem&, int, const Stream&)> run;
};

void launch_scale_shift(Problem& p, const Stream& s) {
  scale_shift_kernel<<<cuda::grid_for(p.C), cuda::kBlock, 0, cuda::native(s)>>>(
      cuda::ptr<float>(p.gamma), cuda::ptr<float>(p.beta), cuda::ptr<float>(p.running_mean),
      cuda::ptr<float>(p.running_var), kEps, p.C, static_cast<float2*>(p.ss.raw_data()));
  LANCET_CUDA_LAUNCH_CHECK();
}

void run_v1(Problem& p, int, const Stream& s) {
  BatchNormParams bp;
  bp.eps = kEps;
  cuda::batchnorm_relu_forward_eval(bp, p.x, p.gamma, p.beta, p.running_mean, p.running_var, p.y, p.saved_mean,
                                    p.saved_invstd, s);
}

void run_v2(Problem& p, int block, const Stream& s) {
  launch_scale_shift(p, s);
  const float2* ss = static_cast<const float2*>(p.ss.raw_data());
  LANCET_CUDA_FLOAT_TYPES(p.dtype, "lab v2", {
    v2_flat_kernel<<<cuda::grid_for(p.numel, block), block, 0, cuda::native(s)>>>(
        cuda::ptr<scalar_t>(p.x), ss, p.C, p.HW, p.numel, cuda::ptr<scalar_t>(p.y));
  });
  LANCET_CUDA_LAUNCH_CHECK();
}

void run_v3(Problem& p, int block, const Stream& s) {
  LANCET_CHECK(reinterpret_cast<uintptr_t>(p.x.raw_data()) % 16 == 0 && reinterpret_cast<uintptr_t>(p.y.raw_data()) % 16 == 0,
               "lab v3: x and y must be 16-byte aligned (the caching allocator gives 512)");
  launch_scale_shift(p, s);
  const float2* ss = static_cast<const float2*>(p.ss.raw_data());
  LANCET_CUDA_FLOAT_TYPES(p.dtype, "lab v3", {
    const int64_t width = p.HW % Vec16<scalar_t>::kWidth == 0 ? Vec16<scalar_t>::kWidth : 1;
    const int64_t tiles = (p.HW / width + block - 1) / block;
    const dim3 grid(static_cast<unsigned>(p.N * p.C), static_cast<unsigned>(std::min<int64_t>(tiles, 65535)));
    v3_plane_vec_kernel<<<grid, block, 0, cuda::native(s)>>>(cuda::ptr<scalar_t>(p.x), ss, p.C, p.HW,
                                                             cuda::ptr<scalar_t>(p.y));
  });
  LANCET_CUDA_LAUNCH_CHECK();
}

double rtol_of(DType dt) { return dt == DType::f32 ? 1e-5 : dt == DType::f16 ? 2e-3 : 1.6e-2; }

}  // namespace
}  // namespace lancet::lab

int main(int argc, char** argv) {
  using namespace lancet;
  using namespace lancet::lab;
  const char* name = "lab_bn_relu_forward";
  try {
    if (!have_device(name)) return 0;
    const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
    // MedicalCNN's BatchNorm+ReLU activations at 224x224 (stem after the stride-2 conv, then
    // stages 1-4 of the spec's widths 64-128-256-512), batch 32 and 256, and an odd shape that
    // exercises every tail path.
    std::vector<Shape> shapes = {{3, 5, 7, 9},       {32, 64, 112, 112}, {32, 64, 56, 56},
                                 {32, 128, 28, 28},  {32, 256, 14, 14},  {32, 512, 7, 7}};
    if (!quick) shapes.insert(shapes.end(), {{256, 64, 112, 112}, {256, 128, 28, 28}, {256, 512, 7, 7}});
    const std::vector<Version> versions = {{"v1 shipped", {0}, run_v1},
                                           {"v2 flat", {128, 256, 512, 1024}, run_v2},
                                           {"v3 plane-vec16", {64, 128, 256, 512}, run_v3}};
    CudaStream stream(Device::cuda(0));
    const Stream s = stream.stream();
    L2Flush flush;
    bool all_ok = true;
    std::printf("%-18s %-5s %-15s %5s %10s %8s %10s  %s\n", "shape", "dtype", "version", "block", "time_us", "GB/s",
                "max_err", "check");
    for (const DType dt : {DType::f32, DType::bf16}) {
      for (const Shape& shape : shapes) {
        Problem p = make_problem(shape, dt, s);
        const double bytes = 2.0 * static_cast<double>(p.numel) * static_cast<double>(dtype_size(dt));
        std::string best;
        double best_us = 0;
        for (const Version& v : versions) {
          for (const int block : v.blocks) {
            fill(p.y, -7.f, s);  // a stale result cannot pass the check
            v.run(p, block, s);
            const Check c = check_close(p.ref, to_host(p.y, s), rtol_of(dt));
            all_ok &= c.ok;
            const double us = c.ok ? 1e3 * time_ms([&] { v.run(p, block, s); }, s, flush) : 0;
            std::printf("%-18s %-5s %-15s %5s %10.1f %8.0f %10.2e  %s\n", shape_label(shape).c_str(),
                        dtype_name(dt), v.name, block ? std::to_string(block).c_str() : "own", us,
                        c.ok ? bytes / (us * 1e3) : 0.0, c.max_err,
                        c.ok ? "ok" : ("FAILED at element " + std::to_string(c.first_bad)).c_str());
            if (c.ok && (best.empty() || us < best_us)) {
              best_us = us;
              best = std::string(v.name) + (block ? " block " + std::to_string(block) : "");
            }
          }
        }
        std::printf("  fastest for %s %s: %s (%.1f us)\n", shape_label(shape).c_str(), dtype_name(dt),
                    best.empty() ? "none passed" : best.c_str(), best_us);
        std::fflush(stdout);
      }
    }
    std::printf("%s: %s\n", name, all_ok ? "every version matched the CPU twin" : "SOME CHECKS FAILED");
    return all_ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", name, e.what());
    return 1;
  }
}
