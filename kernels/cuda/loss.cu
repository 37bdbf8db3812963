// cuda/loss.cu — CUDA fused softmax cross-entropy (see cuda/loss.h and kernels/loss.cpp for
// the formulas). Three kernels on the op's stream, then one copy back and one sync:
//   1. one warp per row: max, log-sum-exp, the row's loss term l_i and weight w[y_i] (double),
//      probs if requested; a row with an out-of-range label records its index (atomicMin, so
//      the first bad sample wins whatever the schedule) and contributes nothing;
//   2. one block: sum_i l_i, Wy = sum_i w[y_i] and Sw = sum_k w[k] in double, in a fixed
//      order (deterministic), plus the bad sample's label for the error message;
//   3. dlogits from the row's log-sum-exp and kernel 2's totals, read on the device (so no
//      host round trip sits between the kernels).
#include <climits>
#include <utility>
#include <limits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/loss.h"

namespace lancet::cuda {
namespace {

// Kernel 2's results, copied to the host in one piece.
struct Totals {
  double loss_sum;                 // sum_i l_i
  double weight_total;             // Wy = sum_i w[y_i]
  double inv_total;                // 1 / Wy
  double class_weight_sum;         // Sw = sum_k w[k]
  unsigned long long bad_sample;   // first sample with an out-of-range label; ULLONG_MAX = none
  long long bad_label;             // its label (valid when bad_sample is set)
};

constexpr int kRowsPerBlock = 8;  // kernel 1: one warp per row, 256 threads

__device__ __forceinline__ double weight_of(const float* w, int64_t k) { return w ? static_cast<double>(w[k]) : 1.0; }

// Block of kRowsPerBlock warps; warp r handles row blockIdx.x * kRowsPerBlock + r. A warp leaves
// as a whole (its row is past N or has a bad label), so every shuffle has all 32 lanes.
template <typename T>
__global__ void ce_rows_kernel(const T* z, const int64_t* labels, const float* w, int64_t N, int64_t K, double e,
                               double* row_loss, double* row_weight, double* row_lse, T* probs, Totals* tot) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (i >= N) return;
  const int64_t y = labels[i];
  if (y < 0 || y >= K) {
    if (lane == 0) {
      atomicMin(&tot->bad_sample, static_cast<unsigned long long>(i));
      row_loss[i] = 0, row_weight[i] = 0, row_lse[i] = 0;
    }
    return;
  }
  const T* zi = z + i * K;
  float m = -INFINITY;
  for (int64_t k = lane; k < K; k += 32) {
    const float v = load_f(zi[k]);
    m = v > m ? v : m;
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, m, o);
    m = other > m ? other : m;
  }
  double se = 0;
  for (int64_t k = lane; k < K; k += 32) se += exp(static_cast<double>(load_f(zi[k])) - m);
  const double lse = m + log(warp_sum(se));
  double smooth = 0;  // -sum_k w[k] * lp[k]
  for (int64_t k = lane; k < K; k += 32) smooth -= weight_of(w, k) * (load_f(zi[k]) - lse);
  smooth = warp_sum(smooth);
  if (lane == 0) {
    const double wy = weight_of(w, y), lp_y = load_f(zi[y]) - lse;
    row_loss[i] = (1 - e) * wy * -lp_y + e / static_cast<double>(K) * smooth;
    row_weight[i] = wy;
    row_lse[i] = lse;
  }
  if (probs)
    for (int64_t k = lane; k < K; k += 32)
      probs[i * K + k] = store_f<T>(static_cast<float>(exp(load_f(zi[k]) - lse)));
}

// One block (a multiple of 32 threads): each thread sums a fixed stride, then the block tree.
__global__ void ce_totals_kernel(const double* row_loss, const double* row_weight, const float* w,
                                 const int64_t* labels, int64_t N, int64_t K, Totals* tot) {
  __shared__ double shared[32];
  double l = 0, wy = 0, sw = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) l += row_loss[i], wy += row_weight[i];
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) sw += weight_of(w, k);
  l = block_sum(l, shared);
  wy = block_sum(wy, shared);
  sw = block_sum(sw, shared);
  if (threadIdx.x == 0) {
    tot->loss_sum = l;
    tot->weight_total = wy;
    tot->inv_total = 1.0 / wy;
    tot->class_weight_sum = sw;
    if (tot->bad_sample != ULLONG_MAX) tot->bad_label = labels[tot->bad_sample];
  }
}

// dlogits[i, k] = ((1 - e) w[y_i] (p_k - [k == y_i]) + (e / K)(Sw p_k - w[k])) / Wy (loss.cpp).
template <typename T>
__global__ void ce_dlogits_kernel(const T* z, const int64_t* labels, const float* w, int64_t N, int64_t K, double e,
                                  const double* row_lse, const Totals* tot, T* dz) {
  const double sw = tot->class_weight_sum, inv_total = tot->inv_total;
  const int64_t total = N * K;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < total;
       j += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t i = j / K, k = j - i * K, y = labels[i];
    if (y < 0 || y >= K) {  // the op throws after the sync; keep the reads in bounds
      dz[j] = store_f<T>(0.f);
      continue;
    }
    const double p = exp(load_f(z[j]) - row_lse[i]);
    const double hard = (1 - e) * weight_of(w, y) * (p - (k == y ? 1.0 : 0.0));
    const double soft = e / static_cast<double>(K) * (sw * p - weight_of(w, k));
    dz[j] = store_f<T>(static_cast<float>((hard + soft) * inv_total));
  }
}

}  // namespace

float softmax_cross_entropy(const Tensor& logits, const Tensor& labels, const Tensor& class_weights,
                            float label_smoothing, Tensor& dlogits, Tensor& probs, const Stream& s) {
  const char* op = "softmax_cross_entropy";
  require_cuda(op, s, logits, {&labels, &class_weights, &dlogits, &probs});
  LANCET_CHECK(logits.ndim() == 2, op << ": logits must be 2-D [N, K], got " << logits.shape_str());
  const int64_t N = logits.dim(0), K = logits.dim(1);
  LANCET_CHECK(labels.defined(), op << ": labels is an undefined tensor");
  LANCET_CHECK(labels.shape() == Shape{N}, op << ": labels " << labels.shape_str() << " do not match logits "
                                              << logits.shape_str() << " (need [N])");
  require_dtype(op, "labels", labels, DType::i64);
  if (class_weights.defined()) {
    LANCET_CHECK(class_weights.shape() == Shape{K}, op << ": class weights " << class_weights.shape_str()
                                                       << " do not match logits " << logits.shape_str()
                                                       << " (need [K])");
    require_dtype(op, "class weights", class_weights, DType::f32);
  }
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"dlogits", &dlogits}, {"probs", &probs}}) {
    if (!t->defined()) continue;
    LANCET_CHECK(t->shape() == logits.shape(), op << ": " << name << " " << t->shape_str() << " does not match logits "
                                                  << logits.shape_str());
    require_dtype(op, name, *t, logits.dtype());
  }
  LANCET_CHECK(label_smoothing >= 0.f && label_smoothing < 1.f,
               op << ": label smoothing must be in [0, 1), got " << label_smoothing);
  if (N == 0) return std::numeric_limits<float>::quiet_NaN();  // 0 / 0, as the CPU twin computes it

  // Scratch in 8-byte slots: Totals, then per-row loss, weight and log-sum-exp (doubles). From
  // the caching allocator; it is released after the sync below.
  constexpr int64_t kTotalsSlots = sizeof(Totals) / 8;
  static_assert(sizeof(Totals) % 8 == 0, "Totals must fill whole 8-byte slots");
  Tensor scratch = Tensor::empty({kTotalsSlots + 3 * N}, DType::i64, s.device);
  Totals* tot = static_cast<Totals*>(scratch.raw_data());
  double* row_loss = reinterpret_cast<double*>(tot + 1);
  double* row_weight = row_loss + N;
  double* row_lse = row_weight + N;
  const float* w = class_weights.defined() ? ptr<float>(class_weights) : nullptr;
  const int64_t* y = ptr<int64_t>(labels);
  const double e = label_smoothing;
  const int64_t row_blocks = (N + kRowsPerBlock - 1) / kRowsPerBlock;
  LANCET_CHECK(row_blocks <= 0x7fffffffLL, op << ": " << logits.shape_str() << " has too many rows for one grid");

  CudaDeviceGuard g(s.device.index);
  LANCET_CUDA_CHECK(cudaMemsetAsync(tot, 0xff, sizeof(Totals), native(s)));  // bad_sample = none
  LANCET_CUDA_FLOAT_TYPES(logits.dtype(), op, {
    scalar_t* pr = probs.defined() ? ptr<scalar_t>(probs) : nullptr;
    ce_rows_kernel<<<static_cast<unsigned>(row_blocks), kRowsPerBlock * 32, 0, native(s)>>>(
        ptr<scalar_t>(logits), y, w, N, K, e, row_loss, row_weight, row_lse, pr, tot);
  });
  LANCET_CUDA_LAUNCH_CHECK();
  ce_totals_kernel<<<1, kBlock, 0, native(s)>>>(row_loss, row_weight, w, y, N, K, tot);
  LANCET_CUDA_LAUNCH_CHECK();
  if (dlogits.defined() && K > 0) {
    LANCET_CUDA_FLOAT_TYPES(logits.dtype(), op, {
      ce_dlogits_kernel<<<grid_for(N * K), kBlock, 0, native(s)>>>(ptr<scalar_t>(logits), y, w, N, K, e, row_lse, tot,
                                                                   ptr<scalar_t>(dlogits));
    });
    LANCET_CUDA_LAUNCH_CHECK();
  }
  Totals host{};
  LANCET_CUDA_CHECK(cudaMemcpyAsync(&host, tot, sizeof(Totals), cudaMemcpyDeviceToHost, native(s)));
  LANCET_CUDA_CHECK(cudaStreamSynchronize(native(s)));
  LANCET_CHECK(host.bad_sample == ULLONG_MAX, op << ": label " << host.bad_label << " of sample " << host.bad_sample
                                                 << " is out of range for " << K << " classes");
  return static_cast<float>(host.loss_sum * host.inv_total);
}

}  // namespace lancet::cuda
