// loss.cpp — CPU softmax cross-entropy (torch.nn.CrossEntropyLoss, mean reduction).
//
// Gradient, with the definitions of loss.h, Wy = sum_i w[y_i], Sw = sum_k w[k], p = softmax:
//   dlogits[i, k] = ((1 - e) * w[y_i] * (p_k - [k == y_i]) + (e / K) * (Sw * p_k - w[k])) / Wy
#include "kernels/loss.h"

#include <cmath>
#include <vector>

#include "kernels/cpu_util.h"
#include "kernels/cuda_twin.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/loss.h"
#endif

namespace lancet {

float softmax_cross_entropy(const Tensor& logits, const Tensor& labels, const Tensor& class_weights,
                            float label_smoothing, Tensor& dlogits, Tensor& probs, const Stream& s) {
  LANCET_CUDA_TWIN(logits, softmax_cross_entropy(logits, labels, class_weights, label_smoothing, dlogits, probs, s));
  const char* op = "softmax_cross_entropy";
  cpu::require_cpu(op, s, logits, {&labels, &class_weights, &dlogits, &probs});
  cpu::require_dtype(op, "logits", logits, DType::f32);
  LANCET_CHECK(logits.ndim() == 2, op << ": logits must be 2-D [N, K], got " << logits.shape_str());
  const int64_t N = logits.dim(0), K = logits.dim(1);
  cpu::require_defined(op, "labels", labels);
  LANCET_CHECK(labels.shape() == Shape{N}, op << ": labels " << labels.shape_str() << " do not match logits "
                                              << logits.shape_str() << " (need [N])");
  cpu::require_dtype(op, "labels", labels, DType::i64);
  if (class_weights.defined()) {
    LANCET_CHECK(class_weights.shape() == Shape{K}, op << ": class weights " << class_weights.shape_str()
                                                       << " do not match logits " << logits.shape_str()
                                                       << " (need [K])");
    cpu::require_dtype(op, "class weights", class_weights, DType::f32);
  }
  if (dlogits.defined()) cpu::require_like(op, "dlogits", dlogits, logits, "logits");
  if (probs.defined()) cpu::require_like(op, "probs", probs, logits, "logits");
  LANCET_CHECK(label_smoothing >= 0.f && label_smoothing < 1.f,
               op << ": label smoothing must be in [0, 1), got " << label_smoothing);
  const int64_t* y = labels.data<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    LANCET_CHECK(y[i] >= 0 && y[i] < K,
                 op << ": label " << y[i] << " of sample " << i << " is out of range for " << K << " classes");

  const float* z = logits.data<float>();
  std::vector<double> w(static_cast<size_t>(K), 1.0);
  if (class_weights.defined())
    for (int64_t k = 0; k < K; ++k) w[k] = class_weights.data<float>()[k];
  double sum_w = 0, weight_total = 0;  // Sw and Wy
  for (int64_t k = 0; k < K; ++k) sum_w += w[k];
  for (int64_t i = 0; i < N; ++i) weight_total += w[y[i]];
  const double e = label_smoothing, inv_total = 1.0 / weight_total;

  std::vector<double> sample_loss(static_cast<size_t>(N));
  float* dz = dlogits.defined() ? dlogits.data<float>() : nullptr;
  float* pr = probs.defined() ? probs.data<float>() : nullptr;
  parallel_for(N, std::max<int64_t>(1, cpu::kElementwiseGrain / std::max<int64_t>(1, K)),
               [&](int64_t begin, int64_t end) {
                 std::vector<double> lp(static_cast<size_t>(K));
                 for (int64_t i = begin; i < end; ++i) {
                   const float* zi = z + i * K;
                   double m = zi[0];
                   for (int64_t k = 1; k < K; ++k) m = std::max<double>(m, zi[k]);
                   double se = 0;
                   for (int64_t k = 0; k < K; ++k) se += std::exp(zi[k] - m);
                   const double lse = m + std::log(se);
                   double smooth = 0;
                   for (int64_t k = 0; k < K; ++k) {
                     lp[k] = zi[k] - lse;
                     smooth -= w[k] * lp[k];
                   }
                   const int64_t yi = y[i];
                   sample_loss[i] = (1 - e) * w[yi] * -lp[yi] + e / static_cast<double>(K) * smooth;
                   for (int64_t k = 0; k < K; ++k) {
                     const double p = std::exp(lp[k]);
                     if (pr) pr[i * K + k] = static_cast<float>(p);
                     if (dz) {
                       const double hard = (1 - e) * w[yi] * (p - (k == yi ? 1.0 : 0.0));
                       const double soft = e / static_cast<double>(K) * (sum_w * p - w[k]);
                       dz[i * K + k] = static_cast<float>((hard + soft) * inv_total);
                     }
                   }
                 }
               });
  double total = 0;
  for (double l : sample_loss) total += l;
  return static_cast<float>(total * inv_total);
}

}  // namespace lancet
